"""The OGS kernels against the float64 reference, on the CPU interpreter or the GPU."""

import random

import helion
import pytest
import torch

import moe_helpers as mh


def _inputs(T, K, N, E, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(T, K, generator=g).to(mh.DEVICE, dtype)
    W = torch.randn(E, K, N, generator=g).to(mh.DEVICE, dtype)
    return A, W


def _config(block_t, block_n, block_k):
    return helion.Config(block_sizes=[block_t, block_n, block_k], num_warps=4, num_stages=1)


@pytest.mark.parametrize(
    "T, K, N, E, block_t",
    [(64, 32, 48, 4, 16), (96, 40, 24, 3, 32), (48, 16, 16, 1, 16), (128, 64, 64, 2, 64)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seed_kernel_is_right_when_every_expert_fills_its_first_token_tile(
    T, K, N, E, block_t, dtype
):
    # Round-robin routing gives each expert T / E >= block_t tokens, so the first token tile of
    # every expert is full and no masked-off lane aliases a row written in the same store.
    A, W = _inputs(T, K, N, E, dtype, seed=T + E)
    expert_ids = torch.arange(T, device=mh.DEVICE) % E
    assert block_t <= T // E
    out = mh.moe_matmul(A, W, expert_ids, implementation="seed", config=_config(block_t, 16, 16))
    mh.assert_moe_close(out, A, W, expert_ids)


def test_seed_kernel_loses_only_rows_at_risk_of_its_racing_store():
    # Expert 0 gets 3 tokens, fewer than the 16-token tile: lanes 3..15 are pointed at its first
    # token (17) and write back the zero they read in the store where lane 0 writes the real
    # row. Expert 1 has 17 tokens: its first tile is full, so token 0 is written by lane 0 alone.
    A, W = _inputs(20, 16, 16, 2, torch.float32, seed=0)
    expert_ids = torch.tensor([1] * 17 + [0] * 3, device=mh.DEVICE)
    out = mh.moe_matmul(A, W, expert_ids, implementation="seed", config=_config(16, 16, 16))
    expected = mh.moe_matmul_reference_fp64(A, W, expert_ids)
    wrong_rows = ((out.double() - expected).abs().amax(dim=1) > 0.1).nonzero().flatten()
    race_rows = mh.seed_store_race_rows(mh.sort_tokens_by_expert(expert_ids, 2), block_t=16)
    assert race_rows.tolist() == [17]
    assert set(wrong_rows.tolist()) <= {17}
    if not mh.ON_GPU:  # the interpreter stores lanes in order: the last (masked-off) lane wins
        assert wrong_rows.tolist() == [17] and (out[17] == 0).all()


def test_references_agree():
    A, W = _inputs(50, 32, 24, 5, torch.float32, seed=3)
    expert_ids = mh.route_zipf(50, 5, 1.0, seed=3)
    for reference in (
        mh.moe_matmul_loop_reference,
        mh.moe_matmul_dense_reference,
        mh.moe_matmul_grouped_mm,
    ):
        mh.assert_moe_close(reference(A, W, expert_ids), A, W, expert_ids)


def _random_case(case: int):
    rng = random.Random(case)
    E = rng.choice([1, 2, 3, 5, 8])
    T = rng.choice([1, 2, 7, 33, 100])
    K = rng.choice([8, 16, 20, 48])
    N = rng.choice([8, 16, 24, 40])
    routing = rng.choice(["uniform", "zipf", "one_expert"])
    if routing == "uniform":
        expert_ids = mh.route_uniform(T, E, seed=case)
    elif routing == "zipf":
        expert_ids = mh.route_zipf(T, E, rng.choice([0.8, 1.5, 3.0]), seed=case)
    else:
        expert_ids = torch.full((T,), E - 1, device=mh.DEVICE)
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
    config = _config(rng.choice([16, 32]), rng.choice([16, 32]), rng.choice([16, 32]))
    return T, K, N, E, expert_ids, dtype, config


@pytest.mark.parametrize("case", range(24))
def test_masked_store_kernel_matches_the_reference_on_random_cases(case):
    T, K, N, E, expert_ids, dtype, config = _random_case(case)
    A, W = _inputs(T, K, N, E, dtype, seed=case)
    out = mh.moe_matmul(A, W, expert_ids, implementation="masked_store", config=config)
    mh.assert_moe_close(out, A, W, expert_ids)


def test_random_cases_cover_the_edges():
    cases = [_random_case(case) for case in range(24)]
    loads = [mh.expert_load(c[4], c[3]) for c in cases]
    assert any(c[3] == 1 for c in cases), "E = 1"
    assert any(c[0] == 1 for c in cases), "T = 1"
    assert any((load == 0).any() for load in loads), "an empty expert"
    assert any(c[1] % 16 or c[2] % 16 for c in cases), "K or N not a multiple of 16"
    assert any(load.max() < c[6]["block_sizes"][0] for c, load in zip(cases, loads, strict=True)), (
        "experts smaller than the token tile"
    )
    assert any(load.max() > c[6]["block_sizes"][0] for c, load in zip(cases, loads, strict=True)), (
        "an expert larger than the token tile"
    )
    assert {c[5] for c in cases} == {torch.float32, torch.float16, torch.bfloat16}


@pytest.mark.parametrize("implementation", sorted(mh.IMPLEMENTATIONS))
def test_non_contiguous_inputs_give_right_answers_and_are_not_modified(implementation):
    T, K, N, E = 64, 24, 40, 4
    g = torch.Generator().manual_seed(7)
    A = torch.randn(K, 2 * T, generator=g).to(mh.DEVICE).t()[::2]  # strides (2, 2T)
    W = torch.randn(E, N, K, generator=g).to(mh.DEVICE).transpose(1, 2)  # [E, K, N], K fastest
    # round robin, 16 tokens an expert, so the seed kernel's store does not race
    expert_ids = (torch.arange(2 * T, device=mh.DEVICE) // 2 % E)[::2]
    assert not (A.is_contiguous() or W.is_contiguous() or expert_ids.is_contiguous())
    before = [t.clone() for t in (A, W, expert_ids)]
    config = _config(16, 16, 16)
    out = mh.moe_matmul(A, W, expert_ids, implementation=implementation, config=config)
    mh.assert_moe_close(out, A, W, expert_ids)
    for tensor, saved in zip((A, W, expert_ids), before, strict=True):
        assert torch.equal(tensor, saved)


def test_empty_token_batch_returns_an_empty_result():
    A, W = _inputs(0, 16, 24, 4, torch.float16, seed=0)
    out = mh.moe_matmul(A, W, torch.empty(0, dtype=torch.int64, device=mh.DEVICE))
    assert out.shape == (0, 24) and out.dtype == torch.float16 and out.device == A.device


@pytest.mark.skipif(mh.ON_GPU, reason="the patch exists only for the CPU interpreter")
def test_interpreter_bf16_dot_multiplies_numbers_not_bit_patterns():
    import triton
    import triton.language as tl

    @triton.jit
    def dot_kernel(a_ptr, b_ptr, c_ptr, n: tl.constexpr):
        offs = tl.arange(0, n)
        a = tl.load(a_ptr + offs[:, None] * n + offs[None, :])
        b = tl.load(b_ptr + offs[:, None] * n + offs[None, :])
        tl.store(c_ptr + offs[:, None] * n + offs[None, :], tl.dot(a, b))

    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=g).bfloat16()
    b = torch.randn(16, 16, generator=g).bfloat16()
    c = torch.empty(16, 16)
    dot_kernel[(1,)](a, b, c, 16)
    torch.testing.assert_close(c, a.float() @ b.float())
