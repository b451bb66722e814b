"""What only a GPU shows: no host waits, CUDA graphs, device-side checks, sizes past int32."""

import moe_helpers as mh

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not mh.ON_GPU, reason="needs a CUDA GPU")


def _run_in_a_fresh_process(script: str) -> subprocess.CompletedProcess:
    """A failed device-side assertion spoils the CUDA context, so such a test runs its own."""
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=Path(mh.__file__).parent,
        timeout=300,
    )


@pytest.mark.parametrize(
    "T, replay",
    # decode sizes replayed from a graph of the flat kernel, or launched one by one (per-pair at
    # one token, flat at 8 and 64); prefill is never replayed
    [(1, True), (8, True), (64, True), (1, False), (8, False), (64, False), (4096, False)],
)
def test_moe_matmul_never_waits_for_the_gpu(T, replay):
    A = torch.randn(T, 256, device=mh.DEVICE, dtype=torch.bfloat16)
    W = torch.randn(64, 256, 512, device=mh.DEVICE, dtype=torch.bfloat16)
    expert_ids, weights = mh.route_top_k(mh.gating_logits(A, 64), 4)
    with mh.decode_replay(replay):
        mh.moe_matmul(A, W, expert_ids, weights)  # compile (and capture) first
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any device-to-host wait raises
        try:
            out = mh.moe_matmul(A, W, expert_ids, weights)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    mh.assert_moe_close(out, A, W, expert_ids, weights)


@pytest.mark.parametrize(
    "T, in_a_graph, replay",
    # the per-pair path, the flat path, a caller's graph replay, an eager call replayed
    [(1, False, False), (64, False, False), (4, True, False), (1, False, True)],
)
def test_a_bad_expert_id_fails_the_default_device_side_check(T, in_a_graph, replay):
    script = f"""
import moe_helpers as mh
import torch
A = torch.randn({T}, 64, device="cuda", dtype=torch.bfloat16)
W = torch.randn(8, 64, 128, device="cuda", dtype=torch.bfloat16)
expert_ids = torch.arange({T}, device="cuda") % 8
def call():
    with mh.decode_replay({replay}):
        return mh.moe_matmul(A, W, expert_ids)
if {in_a_graph}:
    call = mh.cuda_graph_replay(call)
call()
torch.cuda.synchronize()
print("valid call done", flush=True)
expert_ids[0] = 8
try:
    call()
    torch.cuda.synchronize()
except RuntimeError as error:
    print("call failed:", error)
"""
    result = _run_in_a_fresh_process(script)
    output = result.stdout + result.stderr
    assert "valid call done" in result.stdout, output[-3000:]
    assert "call failed:" in result.stdout and "device-side assert" in result.stdout, output[-3000:]


def test_the_host_check_cannot_be_captured_in_a_cuda_graph():
    A = torch.randn(4, 64, device=mh.DEVICE, dtype=torch.bfloat16)
    W = torch.randn(8, 64, 128, device=mh.DEVICE, dtype=torch.bfloat16)
    expert_ids = torch.tensor([0, 3, 7, 1], device=mh.DEVICE)
    with pytest.raises(ValueError, match="expert_id_check='host' waits for the GPU"):
        mh.cuda_graph_replay(lambda: mh.moe_matmul(A, W, expert_ids, expert_id_check="host"))


def test_moe_matmul_captured_in_a_cuda_graph_replays_on_new_inputs():
    # 4 pairs: the eager warm-up call is replayed from a graph of the course's own
    # (tests/test_decode_graphs.py), the captured one runs the flat kernel
    A = torch.randn(2, 64, device=mh.DEVICE, dtype=torch.bfloat16)
    W = torch.randn(8, 64, 128, device=mh.DEVICE, dtype=torch.bfloat16)
    expert_ids, weights = mh.route_top_k(mh.gating_logits(A, 8), 2)
    replay = mh.cuda_graph_replay(lambda: mh.moe_matmul(A, W, expert_ids, weights))
    for seed in range(2):  # new values in the captured input tensors, then replay
        torch.manual_seed(seed)
        A.copy_(torch.randn_like(A))
        new_ids, new_weights = mh.route_top_k(mh.gating_logits(A, 8), 2)
        expert_ids.copy_(new_ids)
        weights.copy_(new_weights)
        mh.assert_moe_close(replay().clone(), A, W, expert_ids, weights)


@pytest.mark.parametrize(
    "T, replay", [(1, False), (8, True), (512, True)]
)  # per-pair, flat decode replayed from a graph, flat prefill
def test_deepseek_v3_gate_up_weights_past_int32_run(T, replay):
    # [256, 7168, 4096] bf16: 7.5e9 elements, 15 GB
    E, K, N, top_k = 256, 7168, 4096, 8
    g = torch.Generator(device=mh.DEVICE).manual_seed(T)
    W = torch.randn(E, K, N, device=mh.DEVICE, dtype=torch.bfloat16, generator=g)
    W /= K**0.5
    A = torch.randn(T, K, device=mh.DEVICE, dtype=torch.bfloat16, generator=g)
    expert_ids, weights = mh.route_top_k(mh.gating_logits(A, E, seed=T), top_k)
    assert mh.kernel_index_dtype(A, W, T * top_k) == torch.int64
    with mh.decode_replay(replay):
        out = mh.moe_matmul(A, W, expert_ids, weights)
    rows = torch.arange(0, T, max(1, T // 8), device=mh.DEVICE)
    mh.assert_moe_close(out, A, W, expert_ids, weights, rows=rows)
