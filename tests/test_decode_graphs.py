"""Eager decode replayed from CUDA graphs (``helion_moe.decode_graphs``): on a GPU, but for the
switch."""

import helion_moe.layer
import helion_moe.matmul
import moe_helpers as mh
from helion_moe import decode_graphs

import pytest
import torch

needs_gpu = pytest.mark.skipif(not mh.ON_GPU, reason="needs a CUDA GPU")


def refuse_the_op(*args):
    raise AssertionError("an eager decode call went through the custom op")


def test_decode_replay_switches_the_replay_off_within_its_block_only():
    assert mh.replay_enabled()
    with pytest.raises(RuntimeError, match="inside"), mh.decode_replay(False):
        assert not mh.replay_enabled()
        raise RuntimeError("inside")
    assert mh.replay_enabled()  # restored, even after an error
    with pytest.raises(TypeError, match="enabled must be a bool"), mh.decode_replay("no"):
        pass


def test_calls_on_the_cpu_are_never_replayed():
    A, W = torch.zeros(1, 8), torch.zeros(2, 8, 8)
    assert not mh.host_paced(A, W, "device")
    assert not mh.replays_eager_call(A, W, "auto", None, "device")


def layer_inputs(T, E=16, K=256, I=128, N=256, seed=0):  # noqa: E741
    g = torch.Generator(device="cuda").manual_seed(seed)
    A = torch.randn(T, K, generator=g, device="cuda").to(torch.bfloat16)
    ids = torch.randint(0, E, (T, 2), generator=g, device="cuda")
    weights = torch.rand(T, 2, generator=g, device="cuda")
    return A, ids, weights


@needs_gpu
def test_eager_decode_replays_one_graph_per_shape_on_the_inputs_of_each_call(monkeypatch):
    g = torch.Generator(device="cuda").manual_seed(1)
    W_gate_up = (torch.randn(16, 256, 256, generator=g, device="cuda") / 16).to(torch.bfloat16)
    W_down = (torch.randn(16, 128, 256, generator=g, device="cuda") / 11).to(torch.bfloat16)
    decode_graphs._GRAPHS.clear()
    monkeypatch.setattr(helion_moe.layer, "moe_experts_op", refuse_the_op)  # eager: no dispatch
    outputs = []
    for seed, T in enumerate((1, 2, 1, 2)):
        A, ids, weights = layer_inputs(T, seed=seed)
        before = [t.clone() for t in (A, ids, weights, W_gate_up, W_down)]
        assert mh.host_paced(A, W_down, "device")
        out = mh.moe_experts(A, W_gate_up, W_down, ids, weights)
        mh.assert_experts_close(out, A, W_gate_up, W_down, ids, weights)
        for t, b in zip((A, ids, weights, W_gate_up, W_down), before, strict=True):
            assert torch.equal(t, b), "an input was modified"
        outputs.append(out)
    assert len(decode_graphs._GRAPHS) == 2  # one graph per token count
    # each result is a copy: later replays did not overwrite the first call's
    A, ids, weights = layer_inputs(1, seed=0)
    mh.assert_experts_close(outputs[0], A, W_gate_up, W_down, ids, weights)
    # weights changed in place are read as they are then (the graph reads them where they are)
    doubled = mh.moe_experts(A, W_gate_up, W_down.mul_(2), ids, weights)
    assert torch.equal(doubled, 2 * outputs[0])
    # new weights at another address get their own graph; past MAX_DECODE_GRAPHS the oldest goes
    monkeypatch.setattr(decode_graphs, "MAX_DECODE_GRAPHS", 2)
    out = mh.moe_experts(A, W_gate_up, W_down.clone(), ids, weights)
    assert torch.equal(out, doubled) and len(decode_graphs._GRAPHS) == 2


@needs_gpu
def test_prefills_calls_a_graph_captures_and_calls_that_wait_are_not_replayed():
    W_gate_up = torch.randn(16, 256, 256, device="cuda").to(torch.bfloat16) / 16
    W_down = torch.randn(16, 128, 256, device="cuda").to(torch.bfloat16) / 11
    A, ids, weights = layer_inputs(1)
    assert not mh.host_paced(A, W_down, "host")
    assert not mh.host_paced(A.cpu(), W_down, "device")
    tokens = torch.zeros(decode_graphs.REPLAY_MAX_TOKENS + 1, 256, device="cuda")
    assert mh.host_paced(tokens[:-1], W_down, "device")  # a decode batch
    assert not mh.host_paced(tokens, W_down, "device")  # a prefill
    with mh.decode_replay(False):
        assert not mh.host_paced(tokens[:1], W_down, "device")
    decode_graphs._GRAPHS.clear()
    mh.moe_experts(A, W_gate_up, W_down, ids, weights)  # an eager call: one graph of its own
    assert len(decode_graphs._GRAPHS) == 1
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # a caller's capture
        out = mh.moe_experts(A, W_gate_up, W_down, ids, weights)
    graph.replay()
    assert len(decode_graphs._GRAPHS) == 1  # inside the capture the call ran as it is
    mh.assert_experts_close(out, A, W_gate_up, W_down, ids, weights)


@needs_gpu
def test_eager_decode_calls_of_moe_matmul_replay_the_flat_kernel(monkeypatch):
    g = torch.Generator(device="cuda").manual_seed(2)
    W = (torch.randn(16, 256, 128, generator=g, device="cuda") / 16).to(torch.bfloat16)
    decode_graphs._GRAPHS.clear()
    monkeypatch.setattr(helion_moe.matmul, "moe_matmul_op", refuse_the_op)  # eager: no dispatch
    with monkeypatch.context() as replayed:  # the flat kernel, never the per-pair one
        replayed.setattr(helion_moe.matmul, "moe_matmul_per_pair", None)
        for seed, T in enumerate((1, 3, 1)):
            A, ids, weights = layer_inputs(T, seed=seed)
            before = [t.clone() for t in (A, ids, weights, W)]
            out = mh.moe_matmul(A, W, ids, weights)
            mh.assert_moe_close(out, A, W, ids, weights)
            for t, b in zip((A, ids, weights, W), before, strict=True):
                assert torch.equal(t, b), "an input was modified"
    assert len(decode_graphs._GRAPHS) == 2  # one graph per token count
    with mh.decode_replay(False):  # launched one by one: the per-pair kernel
        mh.assert_moe_close(mh.moe_matmul(A, W, ids, weights), A, W, ids, weights)
    explicit = mh.moe_matmul(A, W, ids, weights, implementation="per_pair")  # as asked
    mh.assert_moe_close(explicit, A, W, ids, weights)
    assert len(decode_graphs._GRAPHS) == 2


@needs_gpu
def test_moe_matmul_past_the_metadatas_experts_is_not_replayed():
    # the flat path's metadata takes MAX_METADATA_EXPERTS experts; a few pairs past them run
    # the per-pair kernel, launched as they come
    E = mh.MAX_METADATA_EXPERTS + 1
    W = torch.randn(E, 64, 32, device="cuda").to(torch.bfloat16)
    A = torch.randn(2, 64, device="cuda").to(torch.bfloat16)
    ids = torch.tensor([0, E - 1], device="cuda")
    assert not mh.replays_eager_call(A, W, "auto", None, "device")
    mh.assert_moe_close(mh.moe_matmul(A, W, ids), A, W, ids)
