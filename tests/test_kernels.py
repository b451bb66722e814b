"""The OGS kernels against the float64 reference, on the CPU interpreter or the GPU, and the
tolerances every check holds the kernels to."""

import moe_helpers as mh
from helion_moe import launch

import collections

import helion
import helion.language as hl
import pytest
import torch


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


@pytest.mark.parametrize(
    "expert_ids, expected",
    [
        ([0, 0, 0, 1, 1, 1, 1], [0]),  # expert 1 is the largest: lanes >= 4 are masked
        ([2] * 5, []),  # one expert holds every token: nothing to race with
        ([1] * 17 + [0] * 3, [17]),  # expert 1 fills its first tile
        ([3, 0, 3, 1, 1, 0, 0], [0, 3]),  # experts 3 and 1 (2 tokens) are short of expert 0 (3)
    ],
)
def test_seed_store_race_rows_follow_both_masks(expert_ids, expected):
    ids = torch.tensor(expert_ids, device=mh.DEVICE)
    race_rows = mh.seed_store_race_rows(mh.sort_tokens_by_expert(ids, 4), block_t=16)
    assert sorted(race_rows.tolist()) == expected
    A, W = _inputs(len(expert_ids), 16, 16, 4, torch.float32, seed=1)
    out = mh.moe_matmul(A, W, ids, implementation="seed", config=_config(16, 16, 16))
    error = (out.double() - mh.moe_matmul_reference_fp64(A, W, ids)).abs().amax(dim=1)
    wrong_rows = (error > 0.1).nonzero().flatten().tolist()
    assert set(wrong_rows) <= set(expected)
    if not mh.ON_GPU:  # the interpreter's last writer is a masked-off lane: the race always hits
        assert sorted(wrong_rows) == expected


def test_references_agree():
    A, W = _inputs(50, 32, 24, 5, torch.float32, seed=3)
    expert_ids = mh.route_zipf(50, 5, 1.0, seed=3)
    for reference in (
        mh.moe_matmul_loop_reference,
        mh.moe_matmul_dense_reference,
        mh.moe_matmul_grouped_mm,
    ):
        mh.assert_moe_close(reference(A, W, expert_ids), A, W, expert_ids)


@pytest.mark.parametrize("case", range(24))
def test_masked_store_kernel_matches_the_reference_on_random_cases(case):
    c = mh.random_moe_case(case)
    out = mh.moe_matmul(c.A, c.W, c.expert_ids, implementation="masked_store", config=c.config)
    mh.assert_moe_close(out, c.A, c.W, c.expert_ids)


def test_random_cases_cover_the_edges():
    cases = [mh.random_moe_case(case) for case in range(24)]
    loads = [mh.expert_load(c.expert_ids, c.W.shape[0]) for c in cases]
    block_t = [c.config["block_sizes"][0] for c in cases]
    assert any(c.W.shape[0] == 1 for c in cases), "E = 1"
    assert any(c.A.shape[0] == 1 for c in cases), "T = 1"
    assert any((load == 0).any() for load in loads), "an empty expert"
    assert any(c.A.shape[1] % 16 or c.W.shape[2] % 16 for c in cases), "K or N not 16-aligned"
    assert any(((load > 0) & (load < bt)).any() for load, bt in zip(loads, block_t, strict=True)), (
        "an expert smaller than the token tile (the masked store's extra mask matters)"
    )
    assert any(
        len(mh.seed_store_race_rows(mh.sort_tokens_by_expert(c.expert_ids, c.W.shape[0]), bt))
        for c, bt in zip(cases, block_t, strict=True)
    ), "a case on which the seed kernel's store races"
    assert any(load.max() > bt for load, bt in zip(loads, block_t, strict=True)), (
        "an expert larger than the token tile"
    )
    assert {c.A.dtype for c in cases} == {torch.float32, torch.float16, torch.bfloat16}


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
    config = _config(1 if implementation == "per_pair" else 16, 16, 16)
    out = mh.moe_matmul(A, W, expert_ids, implementation=implementation, config=config)
    mh.assert_moe_close(out, A, W, expert_ids)
    for tensor, saved in zip((A, W, expert_ids), before, strict=True):
        assert torch.equal(tensor, saved)


def test_empty_token_batch_returns_an_empty_result():
    A, W = _inputs(0, 16, 24, 4, torch.float16, seed=0)
    out = mh.moe_matmul(A, W, torch.empty(0, dtype=torch.int64, device=mh.DEVICE))
    assert out.shape == (0, 24) and out.dtype == torch.float16 and out.device == A.device


def test_seed_schedule_counts_the_tiles_of_the_per_expert_grid():
    # max tokens 17 -> 3 token tiles of 8, N = 40 -> 3 column tiles of 16: 9 tiles a program.
    # Useful token tiles: ceil(5/8) + 0 + ceil(17/8) + ceil(1/8) = 1 + 0 + 3 + 1 = 5, x 3 columns.
    schedule = mh.seed_schedule(torch.tensor([5, 0, 17, 1]), N=40, block_t=8, block_n=16)
    assert schedule == mh.SeedSchedule(programs=4, tiles_per_program=9, useful_tiles=15)


@pytest.mark.parametrize(
    "implementation, block_t", [("flat", 16), ("per_pair", 1), ("masked_store", 16)]
)
def test_kernels_accumulate_in_float32_over_many_k_tiles(implementation, block_t):
    # 64 K tiles of 16: a kernel that rounded its accumulator to bfloat16 after each tile would
    # be off by several times bfloat16's rounding (test_the_tolerances_reject_real_bugs).
    A, W = _inputs(33, 1024, 24, 3, torch.bfloat16, seed=7)
    expert_ids = torch.arange(33, device=mh.DEVICE) % 3
    out = mh.moe_matmul(
        A, W, expert_ids, implementation=implementation, config=_config(block_t, 16, 16)
    )
    mh.assert_moe_close(out, A, W, expert_ids)


def _rounded_after_every_k_tile(A, W, expert_ids, block_k=16):
    """The MoE matmul as a kernel with a bug would compute it: the accumulator rounded to the
    input dtype after every K tile."""
    acc = torch.zeros(A.shape[0], W.shape[2])
    for k in range(0, A.shape[1], block_k):
        tile = torch.einsum(
            "tk,tkn->tn", A[:, k : k + block_k].float(), W[expert_ids, k : k + block_k].float()
        )
        acc = (acc + tile).to(A.dtype).float()
    return acc.to(A.dtype)


def _truncated_to_tf32(values: torch.Tensor) -> torch.Tensor:  # float32
    """float32 values with the 13 low bits of their 23-bit mantissa cleared: the 10 bits that a
    tensor core's tf32 keeps of each operand."""
    return (values.view(torch.int32) & ~0x1FFF).view(torch.float32)


@pytest.mark.parametrize("dtype", mh.SUPPORTED_DTYPES)
def test_the_tolerances_reject_real_bugs(dtype):
    # A tolerance loose enough to pass these would let such a kernel pass every test.
    A, W = _inputs(33, 1024, 24, 3, dtype, seed=3)
    A, W = A.cpu(), W.cpu()
    expert_ids = torch.arange(33) % 3
    right = mh.moe_matmul_reference_fp64(A, W, expert_ids)
    wrong_expert = right.clone()
    wrong_expert[5] = A[5].double() @ W[(expert_ids[5] + 1) % 3].double()  # one row, wrong W
    bugs = {"a row through the wrong expert": wrong_expert.to(dtype)}
    if dtype != torch.float32:
        bugs["accumulation in the input dtype"] = _rounded_after_every_k_tile(A, W, expert_ids)
    elif not mh.ON_GPU:  # the GPU's float32 tolerance covers tf32, which keeps 10 bits

        def product_of(convert):  # the products of converted operands, summed in float64
            a, w = (convert(t).double() for t in (A, W))
            return torch.einsum("tk,tkn->tn", a, w[expert_ids]).to(dtype)

        bugs["products of bfloat16 operands"] = product_of(lambda t: t.to(torch.bfloat16))
        bugs["operands truncated to tf32"] = product_of(_truncated_to_tf32)
        bugs["the output rounded through bfloat16"] = right.to(torch.bfloat16).to(dtype)
    mh.assert_moe_close(right.to(dtype), A, W, expert_ids)  # one final rounding passes
    for name, result in bugs.items():
        with pytest.raises(AssertionError):
            mh.assert_moe_close(result, A, W, expert_ids)
            pytest.fail(f"{dtype}: {name} passed the check")


def test_an_outlier_token_widens_no_other_tokens_tolerance():
    # One token of activations 1000x the others' (LLMs have such outliers): scaled by the RMS of
    # the whole output, the bfloat16 allowance would pass a zeroed row of any other token.
    A, W = _inputs(33, 1024, 24, 3, torch.bfloat16, seed=3)
    A, W = A.cpu(), W.cpu()
    A[0] *= 1000
    expert_ids = torch.arange(33) % 3
    result = mh.moe_matmul_reference_fp64(A, W, expert_ids).to(torch.bfloat16)
    mh.assert_moe_close(result, A, W, expert_ids)
    result[5] = 0
    with pytest.raises(AssertionError, match="outside the"):
        mh.assert_moe_close(result, A, W, expert_ids)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_top_k_rounds_twice_within_the_bound_its_tolerance_assumes(dtype):
    # The flat kernel rounds each pair's weighted output to the dtype, and the sum of a token's
    # k pairs once more: off by at most 2u times the sum of the terms' magnitudes.
    A, W = _inputs(40, 64, 48, 6, dtype, seed=11)
    expert_ids, weights = mh.route_top_k(mh.gating_logits(A, 6, seed=4), 4)
    out = mh.moe_matmul(A, W, expert_ids, weights, config=_config(16, 16, 16))
    terms = [mh.moe_matmul_reference_fp64(A, W, expert_ids[:, j], weights[:, j]) for j in range(4)]
    unit = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    magnitude = sum(term.abs() for term in terms)
    error = (out.double() - sum(terms)).abs()
    assert (error <= 2 * unit * magnitude * 1.01 + 1e-6).all()
    mh.assert_moe_close(out, A, W, expert_ids, weights)


@pytest.mark.parametrize("dtype", mh.SUPPORTED_DTYPES)
def test_the_top_k_tolerance_rejects_real_bugs(dtype):
    A, W = _inputs(24, 256, 32, 4, dtype, seed=5)
    A, W = A.cpu(), W.cpu()
    expert_ids, weights = mh.route_top_k(mh.gating_logits(A, 4, seed=6), 2)
    right = mh.moe_matmul_reference_fp64(A, W, expert_ids, weights)
    dropped, wrong_expert = weights.clone(), expert_ids.clone()
    dropped[3, 1] = 0.0  # one pair left out of its token's sum
    wrong_expert[7, 0] = (wrong_expert[7, 0] + 1) % 4  # one pair through the wrong expert
    reference = mh.moe_matmul_reference_fp64
    bugs = {
        "a pair left out": reference(A, W, expert_ids, dropped),
        "a pair through the wrong expert": reference(A, W, wrong_expert, weights),
        "weights of the ranks swapped": reference(A, W, expert_ids, weights.flip(1)),
    }
    mh.assert_moe_close(right.to(dtype), A, W, expert_ids, weights)
    for name, result in bugs.items():
        with pytest.raises(AssertionError, match="outside the"):
            mh.assert_moe_close(result.to(dtype), A, W, expert_ids, weights)
            pytest.fail(f"{dtype}: {name} passed the check")


@helion.kernel(static_shapes=False)
def _add_one(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    for tile in hl.tile(x.shape[0]):
        out[tile] = x[tile] + 1
    return out


def test_run_kernel_compiles_once_per_argument_key_and_keeps_the_latest(monkeypatch):
    compiled = []  # the sizes run_kernel compiled for, in order

    def compiled_launcher(kernel, args, config):
        compiled.append(args[0].shape[0])
        return real(kernel, args, config)

    real = launch._compiled_launcher
    monkeypatch.setattr(launch, "_compiled_launcher", compiled_launcher)
    monkeypatch.setattr(launch, "_LAUNCHERS", collections.OrderedDict())
    monkeypatch.setattr(launch, "MAX_LAUNCHERS", 2)
    config = helion.Config(block_sizes=[16])
    for n in (4, 4, 5, 4, 6, 4, 5):
        x = torch.arange(n, dtype=torch.float32, device=mh.DEVICE)
        assert torch.equal(mh.run_kernel(_add_one, (x,), config), x + 1)
    # 4 and 5 compile; 4 is found; 6 pushes out 5, the least recently used; 5 compiles again
    assert compiled == [4, 5, 6, 5]
