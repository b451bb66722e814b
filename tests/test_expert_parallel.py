"""The expert-parallel layer in real process groups: gloo on the CPU, NCCL on one GPU."""

import moe_helpers as mh

import os
import re
import time

import pytest
import torch


def run_and_check(world_size, case, on_gpus=False):
    """Run ``case`` over ``world_size`` ranks; check the output against the single-process
    layer's reference and the stats against the routing; return the ranks' results."""
    results = mh.run_expert_parallel(
        world_size, mh.expert_parallel_worker, case, on_gpus=on_gpus, timeout_s=240
    )
    A, W_gate_up, W_down, ids, weights = case.inputs(torch.device("cpu"))
    out = torch.cat([result["output"] for result in results])
    mh.assert_experts_close(out, A, W_gate_up, W_down, ids, weights)
    single = mh.moe_experts(*(t.to(mh.DEVICE) for t in (A, W_gate_up, W_down, ids, weights)))
    tol = mh.TOLERANCES[torch.float32]  # the single-process layer may run on a GPU, in tf32
    torch.testing.assert_close(out, single.cpu(), rtol=tol, atol=tol)
    received = torch.tensor([result["stats"]["pairs_received"] for result in results])
    sent = torch.tensor([result["stats"]["pairs_sent"] for result in results])
    assert torch.equal(received, sent.T), "rank r received from s what s sent to r"
    per_rank = case.E // world_size
    expected = torch.bincount(ids.flatten() // per_rank, minlength=world_size)
    assert torch.equal(received.sum(1), expected)
    for result in results:
        assert set(result["stats"]["seconds"]) == set(mh.EXPERT_PARALLEL_PHASES)
    return results


def test_one_rank_is_the_single_process_layer():
    run_and_check(1, mh.ExpertParallelCase(T=9, H=16, I=8, E=4, top_k=2))


def test_two_ranks_with_skewed_routing_are_deterministic():
    case = mh.ExpertParallelCase(T=21, H=16, I=12, E=6, top_k=3, routing="zipf", seed=3)
    first = run_and_check(2, case)
    again = mh.run_expert_parallel(2, mh.expert_parallel_worker, case, timeout_s=240)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["output"], b["output"])


def test_four_ranks_where_two_receive_nothing():
    case = mh.ExpertParallelCase(T=18, H=16, I=8, E=8, top_k=2, routing="first half", seed=1)
    results = run_and_check(4, case)
    assert [sum(r["stats"]["pairs_received"]) for r in results][2:] == [0, 0]


@pytest.mark.parametrize(
    "case, message",
    [
        (mh.ExpertParallelCase(T=8, H=16, I=8, E=3, top_k=1), "multiple of the world size 2"),
        (
            mh.ExpertParallelCase(T=8, H=16, I=8, E=4, top_k=2, bad_id_rank=1),
            r"bad input on rank\(s\) \[1\]: rank 1: expert_ids must lie in \[0, num_experts=4\)",
        ),
    ],
)
def test_bad_input_on_any_rank_raises_on_every_rank(case, message):
    start = time.monotonic()
    with pytest.raises(RuntimeError) as error:
        mh.run_expert_parallel(2, mh.expert_parallel_worker, case, timeout_s=240)
    for rank in range(2):
        assert f"rank {rank} failed:\nValueError: moe_experts_expert_parallel got bad" in str(
            error.value
        )
    lines = str(error.value).splitlines()
    assert sum(bool(re.search(message, line)) for line in lines) == 2, str(error.value)
    assert time.monotonic() - start < 120, "the ranks waited for a collective timeout"


def sleeping_worker(rank, world_size, device, pid_file):
    """A rank that never finishes, for the launcher's timeout."""
    with open(pid_file, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(600)


def test_the_launcher_kills_ranks_that_do_not_finish(tmp_path):
    pid_file = tmp_path / "pids"
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] did not finish within 40"):
        mh.run_expert_parallel(2, sleeping_worker, str(pid_file), timeout_s=40)
    pids = [int(line) for line in pid_file.read_text().split()]
    assert len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_the_backend_follows_the_device():
    assert mh.expert_parallel_backend(torch.device("cpu")) == "gloo"
    assert mh.expert_parallel_backend(torch.device("cuda", 0)) == "nccl"


@pytest.mark.skipif(not mh.ON_GPU, reason="needs a GPU")
def test_nccl_world_of_one_gpu():
    case = mh.ExpertParallelCase(T=16, H=64, I=32, E=8, top_k=2, dtype=torch.bfloat16)
    results = mh.run_expert_parallel(1, mh.expert_parallel_worker, case, on_gpus=True)
    A, W_gate_up, W_down, ids, weights = case.inputs(mh.DEVICE)
    mh.assert_experts_close(results[0]["output"].to(mh.DEVICE), A, W_gate_up, W_down, ids, weights)
