"""moe_matmul and moe_experts as custom ops: their registrations, torch.compile with no graph
break (forward and backward), torch.export with a dynamic token count, and transformers'
compiled decode step on the "helion" backend.

On the CPU the compiled graphs run with the "aot_eager" backend, which traces through the fake
implementations and the registered backward exactly as Inductor would, then runs each node
eagerly (the kernels themselves run in Triton's interpreter).
"""

import helion_moe.layer
import helion_moe.matmul
import moe_helpers as mh

import warnings

import helion
import pytest
import torch
import transformers

mh.register_transformers_experts()

BACKEND = "aot_eager"


def layer_inputs(seed: int, nk_layout: bool = False):
    """A small top-2 layer in float32: A [T, H], W_gate_up [E, H, 2I], W_down [E, I, H] (with
    ``nk_layout``, transposed views of [E, N, K] storage, as transformers stores them), ids and
    weights, every float tensor a leaf that requires grad."""
    T, H, I, E = 10, 16, 8, 4  # noqa: E741
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(T, H, generator=g)
    W_gate_up, W_down = torch.randn(E, H, 2 * I, generator=g), torch.randn(E, I, H, generator=g)
    if nk_layout:
        W_gate_up = W_gate_up.transpose(1, 2).contiguous().transpose(1, 2)
        W_down = W_down.transpose(1, 2).contiguous().transpose(1, 2)
    ids = mh.route_zipf_top_k(T, E, 1.2, 2, seed=seed)
    weights = torch.rand(T, 2, generator=g)
    leaves = [t.to(mh.DEVICE).requires_grad_() for t in (A, W_gate_up, W_down, weights)]
    A, W_gate_up, W_down, weights = leaves
    return A, W_gate_up, W_down, ids.to(mh.DEVICE), weights


def outputs_and_grads(fn, *inputs):
    """fn's output and the gradients of its float inputs for a fixed output gradient."""
    leaves = [t for t in inputs if t.is_floating_point()]
    for leaf in leaves:
        leaf.grad = None
    out = fn(*inputs)
    out.backward(torch.linspace(-1, 1, out.numel(), device=out.device).view(out.shape))
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("variant", ["plain", "sentinels", "gpt-oss"])
def test_the_custom_ops_pass_torch_library_opcheck(variant):
    A, W_gate_up, W_down, ids, weights = (t.detach() for t in layer_inputs(0))
    check = "sentinels" if variant == "sentinels" else "device"
    if variant == "sentinels":  # pairs of another rank's experts: ids of E and above
        ids = ids.clone()
        ids[::3, 0] = W_gate_up.shape[0] + torch.arange(ids[::3].shape[0], device=ids.device)
    biases, activation, interleaved = (None, None), "silu", False
    if variant == "gpt-oss":  # biases, the clamped activation, interleaved gate and up
        E, _, N2 = W_gate_up.shape
        biases = (
            torch.randn(E, N2, device=mh.DEVICE),
            torch.randn(E, A.shape[1], device=mh.DEVICE),
        )
        activation, interleaved = mh.activation_as_text(mh.GPT_OSS_ACTIVATION), True
    W = W_gate_up[..., :8].contiguous()
    torch.library.opcheck(
        torch.ops.helion_moe.moe_matmul.default, (A, W, ids, weights, "flat", None, check)
    )
    layer_args = (A, W_gate_up, W_down, ids, weights, *biases, activation, interleaved, None)
    layer_args += (check, True)
    torch.library.opcheck(torch.ops.helion_moe.moe_experts.default, layer_args)
    gate_up = mh.moe_experts_op(*layer_args)[1]
    grad = torch.randn(A.shape, device=mh.DEVICE)
    needs = [True] * 4 + [variant == "gpt-oss"] * 2
    backward_args = (grad, A, W_gate_up, W_down, ids, weights, *biases, gate_up, activation)
    backward_args += (interleaved, needs, variant == "sentinels")
    torch.library.opcheck(torch.ops.helion_moe.moe_experts_backward.default, backward_args)
    torch.library.opcheck(
        torch.ops.helion_moe.moe_matmul_backward.default,
        (grad[:, :8], A, W, ids, weights, None, True, True, True, variant == "sentinels"),
    )


@pytest.mark.parametrize("nk_layout", [False, True], ids=["KN layout", "nn.Linear layout"])
def test_compiled_layer_gives_the_eager_output_and_gradients_bit_for_bit(nk_layout):
    inputs = layer_inputs(1, nk_layout)
    expected = outputs_and_grads(mh.moe_experts, *inputs)
    compiled = torch.compile(mh.moe_experts, fullgraph=True, backend=BACKEND)
    out, grads = outputs_and_grads(compiled, *inputs)
    assert torch.equal(out, expected[0])
    for name, grad, expected_grad in zip(
        ("A", "W_gate_up", "W_down", "weights"), grads, expected[1], strict=True
    ):
        assert torch.equal(grad, expected_grad), name


def test_calls_with_explicit_configs_compile_without_a_graph_break():
    A, W_gate_up, W_down, ids, weights = (t.detach() for t in layer_inputs(6))
    configs = (mh.GATE_UP_CONFIGS[A.dtype][16], mh.FLAT_CONFIGS[A.dtype][16])
    assert mh.configs_from_text(mh.configs_as_text(configs)) == configs

    def layer(*args):
        return mh.moe_experts(*args, configs=configs)

    compiled = torch.compile(layer, fullgraph=True, backend=BACKEND)
    assert torch.equal(
        compiled(A, W_gate_up, W_down, ids, weights), layer(A, W_gate_up, W_down, ids, weights)
    )
    W = W_gate_up[..., :8].contiguous()

    def matmul(A, weights):
        return mh.moe_matmul(A, W, ids, weights, config=configs[1])

    compiled = torch.compile(matmul, fullgraph=True, backend=BACKEND)
    assert torch.equal(compiled(A, weights), matmul(A, weights))


@pytest.mark.parametrize("entry", ["moe_experts", "moe_matmul"])
def test_an_export_with_a_dynamic_token_count_runs_other_counts_as_eager_does(entry):
    A, W_gate_up, W_down, ids, weights = (t.detach() for t in layer_inputs(7))
    W = W_gate_up[..., :8].contiguous()
    # explicit configs: without, an eager GPU call of a few tokens replays a CUDA graph or runs
    # the per-pair kernels, which the op (what the export runs) does not, and sums differently
    configs = (mh.GATE_UP_CONFIGS[A.dtype][16], mh.FLAT_CONFIGS[A.dtype][16])
    calls = {
        "moe_experts": lambda A, ids, weights: mh.moe_experts(
            A, W_gate_up, W_down, ids, weights, configs=configs
        ),
        "moe_matmul": lambda A, ids, weights: mh.moe_matmul(A, W, ids, weights, config=configs[1]),
    }

    class Experts(torch.nn.Module):
        def forward(self, A, ids, weights):
            return calls[entry](A, ids, weights)

    tokens = torch.export.Dim("tokens")
    dynamic = ({0: tokens}, {0: tokens}, {0: tokens})
    exported = torch.export.export(Experts(), (A, ids, weights), dynamic_shapes=dynamic)
    for T in (1, 3, 17):
        g = torch.Generator().manual_seed(T)
        A_t = torch.randn(T, A.shape[1], generator=g).to(mh.DEVICE)
        ids_t = mh.route_zipf_top_k(T, W_down.shape[0], 1.2, 2, seed=T).to(mh.DEVICE)
        weights_t = torch.rand(T, 2, generator=g).to(mh.DEVICE)
        expected = calls[entry](A_t, ids_t, weights_t)
        assert torch.equal(exported.module()(A_t, ids_t, weights_t), expected), T


def test_compiled_moe_matmul_gives_the_eager_output_and_gradients_bit_for_bit():
    A, W_gate_up, _, ids, weights = layer_inputs(2)
    W = W_gate_up.detach()[..., :8].contiguous().requires_grad_()
    expected = outputs_and_grads(mh.moe_matmul, A, W, ids, weights)
    compiled = torch.compile(mh.moe_matmul, fullgraph=True, backend=BACKEND)
    out, grads = outputs_and_grads(compiled, A, W, ids, weights)
    assert torch.equal(out, expected[0])
    for name, grad, expected_grad in zip(("A", "W", "weights"), grads, expected[1], strict=True):
        assert torch.equal(grad, expected_grad), name


class OpNames(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the name of every op that reaches the dispatcher while it is active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def refuse_the_op(*args):
    raise AssertionError("plain eager inference called the custom op")


def test_eager_inference_runs_the_ops_body_and_anything_else_runs_the_op(monkeypatch):
    # Plain eager calls without autograd skip the op's dispatch (host time), with the op's
    # output bit for bit. With inputs that need grad, under torch.jit.trace, a dispatch mode or
    # a functorch transform, or inside torch.compile (the tests above), the op is called.
    A, W_gate_up, W_down, ids, weights = (t.detach() for t in layer_inputs(5))
    W = W_gate_up[..., :8].contiguous()
    options = (None, None, "silu", False, None, "device", False)
    layer = torch.ops.helion_moe.moe_experts(A, W_gate_up, W_down, ids, weights, *options)[0]
    matmul = torch.ops.helion_moe.moe_matmul(A, W, ids, weights, "auto", None, "device")
    with OpNames() as recorded:
        assert torch.equal(mh.moe_experts(A, W_gate_up, W_down, ids, weights), layer)
        assert torch.equal(mh.moe_matmul(A, W, ids, weights), matmul)
    assert recorded.names[:1] == ["helion_moe.moe_experts"], recorded.names[:3]
    assert "helion_moe.moe_matmul" in recorded.names
    with warnings.catch_warnings():  # the input checks read sizes, which the trace fixes
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(lambda a: mh.moe_matmul(a, W, ids, weights), (A,))
    assert "helion_moe::moe_matmul" in str(traced.graph)
    seen = []
    torch.func.vmap(lambda row: seen.append(mh.runs_through_op(row)) or row)(A)
    assert seen == [True]
    monkeypatch.setattr(helion_moe.layer, "moe_experts_op", refuse_the_op)
    monkeypatch.setattr(helion_moe.matmul, "moe_matmul_op", refuse_the_op)
    parameter = torch.nn.Parameter(W_gate_up, requires_grad=False)
    # launched one by one, as the op's body runs: on a GPU a decode-sized eager call is replayed
    # from a graph of the flat kernels instead (tests/test_decode_graphs.py checks that it skips
    # the op too), where the op may take the per-pair path
    with mh.decode_replay(False):
        assert torch.equal(mh.moe_experts(A, parameter, W_down, ids, weights), layer)
        assert torch.equal(mh.moe_matmul(A, W, ids, weights), matmul)
        A.requires_grad_()
        with torch.no_grad():
            assert torch.equal(mh.moe_experts(A, W_gate_up, W_down, ids, weights), layer)
    with pytest.raises(AssertionError, match="plain eager inference called the custom op"):
        mh.moe_experts(A, W_gate_up, W_down, ids, weights)  # A needs grad: through the op


@pytest.mark.skipif(mh.ON_GPU, reason="on a GPU a bad id fails a device-side assertion")
def test_a_bad_expert_id_raises_the_eager_error_under_compile():
    A, W_gate_up, W_down, ids, weights = (t.detach() for t in layer_inputs(3))
    bad = ids.clone()
    bad[3, 1] = W_gate_up.shape[0]
    compiled = torch.compile(mh.moe_experts, fullgraph=True, backend=BACKEND)
    with pytest.raises(ValueError, match=r"expert_ids must lie in \[0, E=4\), found 4"):
        compiled(A, W_gate_up, W_down, bad, weights)


def test_a_weight_whose_grad_is_set_runs_a_kernel_compiled_anew():
    # A config no other test uses, so the kernel is compiled for these arguments here: Helion
    # would fail reading W.grad had run_kernel not detached the arguments.
    A, W_gate_up, _, ids, weights = (t.detach() for t in layer_inputs(4))
    W = W_gate_up[..., :8].contiguous()
    W.grad = torch.ones_like(W)
    config = helion.Config(block_sizes=[16, 8, 16], num_warps=2, num_stages=1)
    out = mh.moe_matmul(A, W, ids, weights, implementation="flat", config=config)
    mh.assert_moe_close(out, A, W, ids, weights)


@pytest.mark.parametrize("name", mh.TINY_TRANSFORMERS_MODELS)
def test_compiled_static_cache_generate_gives_eager_tokens(name):
    model = mh.tiny_transformers_model(name)
    input_ids = torch.randint(0, model.config.vocab_size, (1, 6), device=mh.DEVICE)
    options = dict(max_new_tokens=5, do_sample=False, cache_implementation="static", pad_token_id=0)
    model.set_experts_implementation("eager")  # transformers' loop: not compiled with fullgraph
    with torch.no_grad():
        expected = model.generate(input_ids, disable_compile=True, **options)
    model.set_experts_implementation("helion")
    compile_config = transformers.CompileConfig(fullgraph=True, backend=BACKEND, mode=None)
    compile_config._compile_all_devices = True  # transformers compiles on GPUs only otherwise
    torch._dynamo.reset()
    with torch.no_grad():
        tokens = model.generate(input_ids, compile_config=compile_config, **options)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    assert torch.equal(tokens, expected)
