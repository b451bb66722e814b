"""Checks: the tolerances per dtype and why (notebook 03), assertions that raise on a wrong
result or gradient, the randomized cases the tests and notebooks run, and the rows the seed's
racing store can lose (notebook 04).
"""

from __future__ import annotations

import dataclasses
import random

import helion
import torch

from .fp8 import dequantize_fp8, quantize_activations_fp8
from .kernels.activations import GatedActivation
from .mode import DEVICE, ON_GPU
from .references import (
    moe_experts_fp8_reference_fp64,
    moe_experts_reference_fp64,
    moe_matmul_reference_fp64,
)
from .routing import as_top_k, cpu_generator, route_uniform, route_zipf
from .sorting import ExpertSort

__all__ = [
    "FP8_HIDDEN_SLACK",
    "FP8_TOLERANCE",
    "GRADIENT_TOLERANCES",
    "TOLERANCES",
    "MoECase",
    "assert_experts_close",
    "assert_experts_fp8_close",
    "assert_grad_close",
    "assert_moe_close",
    "assert_moe_fp8_close",
    "assert_sum_close",
    "random_moe_case",
    "seed_store_race_rows",
]

# Relative tolerance per dtype of the inputs and the output; the absolute tolerance is the same
# number times the RMS of the reference's row (the token's outputs), because the error of a
# K-term dot product scales with the size of the token's dot products, not with the one element
# that happens to be near zero. A row's own RMS, not the whole output's: one token of large
# activations (LLMs have such outliers) must not widen the other tokens' allowance.
# - float16 / bfloat16: the kernels accumulate in fp32 and round once to the output dtype, a
#   relative error of at most 2**-11 (fp16) or 2**-8 (bf16); the tolerance is 4x that.
# - float32 on a GPU: tl.dot of fp32 operands runs on tensor cores in tf32, which keeps 10
#   mantissa bits of each operand, so each product is off by up to about 2**-10 relative.
#   Measured on an H100 and an H200 alike at K = 2048 (notebook 03): mean error 6e-4, max
#   4.6e-3 of the RMS. The tolerance, 2**-7 (7.8e-3), is 8x the per-product bound.
# - float32 in the interpreter: true fp32 products; errors near 1e-6 of the RMS at K = 128.
#   The tolerance, 2**-14 (6.1e-5), still catches a result that went through bf16 or tf32.
# - top-k: each pair's weighted output is rounded to the output dtype, then a token's k pairs are
#   summed in fp32 and rounded again, so an element is off by up to u * (sum_j |w_j c_j| + |C|)
#   <= 2u * sum_j |w_j c_j|, with u the dtype's rounding bound and c_j the pair outputs. That
#   bound follows the magnitudes of the terms, not their sum, which can cancel: the relative
#   part of the tolerance is taken of sum_j |w_j c_j| (for top-1 that is |C| itself), and 4u
#   leaves twice the bound.
TOLERANCES = {
    torch.float16: 4 * 2.0**-11,
    torch.bfloat16: 4 * 2.0**-8,
    torch.float32: 2.0**-7 if ON_GPU else 2.0**-14,
}

# A float32 weight gradient of the layer on a GPU is a tf32 GEMM of operands that come out of
# tf32 GEMMs themselves (the forward's gate_up, the down GEMM's backward), each GEMM truncating
# both its operands to 10 mantissa bits. Triton's interpreter with every float32 dot operand so
# truncated reproduces the errors an H100 gave, to the digits printed: 2.0% and 0.9% of the RMS
# at the worst elements of two layer gradients (512 experts; a clamped SiLU), past the
# forward's 2**-7. Gradients take twice the forward's tolerance there.
# In float16 and bfloat16 the layer's gradients are sums over pairs of operands that the forward
# and the backward rounded to the dtype (the saved gate and up, the weighted hidden, d(gate, up)):
# two or three roundings in each term, not the one final rounding the forward's 4u allows for.
# In 16 random bfloat16 layer cases in the interpreter (T = 5 to 256, uniform and Zipf routing,
# top-1 and top-2) the worst element of dA, dW_gate_up, dW_down and the combine weights' gradient
# needed up to 7.3u under this criterion (u = 2**-8), so gradients take four times the
# forward's tolerance, 16u: twice the largest seen, and still a sixteenth of the RMS by which a
# pair through the wrong expert is off. float16 takes the same factor for the same count of
# roundings (not measured).
GRADIENT_TOLERANCES = {
    torch.float16: 4 * TOLERANCES[torch.float16],
    torch.bfloat16: 4 * TOLERANCES[torch.bfloat16],
    torch.float32: TOLERANCES[torch.float32] * (2 if ON_GPU else 1),
}


# The FP8 kernels against a float64 reference on the values their e4m3 numbers stand for, A
# quantized by the layer's own kernel (``quantize_rows_fp8``, checked against PyTorch by itself):
# each pair's row is rounded to bfloat16 and the k rows' sum rounded again, the bfloat16 bound
# of ``TOLERANCES``, and the sums differ in their rounding: in float32 here, and on a GPU in the
# tensor core's narrower accumulator inside each 128-wide e4m3 dot (about 14 bits, as DeepSeek-V3
# reports), which is why each block's dot is added into a float32 accumulator.
FP8_TOLERANCE = TOLERANCES[torch.bfloat16]

# In the layer the kernel quantizes its own hidden, which differs from float64's by those sums
# (and on a GPU by approximate exp and division): a value near the midpoint between two e4m3
# numbers may round the other way, one e4m3 step (up to 2**-3 of the value) in one of the I
# terms of an output. The reference adds that step's share to each element's allowance wherever
# the hidden lies within this fraction of its group's largest magnitude from a midpoint.
# ``probes/fp8_probe.py hidden`` on an H100 (the pairs of 8 tokens at DeepSeek-V3's, Kimi-K2's
# and Qwen3-235B-A22B's sizes, and 256 tokens at K = 128 with SwiGLU and gpt-oss's activation)
# found at most 2 values per case rounded the other way, each within 2**-24 of its midpoint. Yet
# tests/test_fp8.py's one-expert case (K = 128) failed on an H200 at 2**-20 (1 and 25 of 2,376
# outputs outside, the kernel then applying a scale per column), a case the probe does not
# explain; 2**-12 passed every test on the H100 with both kernels, and is kept.
FP8_HIDDEN_SLACK = 2.0**-12


def assert_moe_close(
    actual: torch.Tensor,  # [T, N]
    A: torch.Tensor,  # [T, K]
    W: torch.Tensor,  # [E, K, N]
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None = None,  # expert_ids' shape
    rows: torch.Tensor | None = None,  # [R] token indices: check only these rows
) -> float:
    """Raise AssertionError unless ``actual`` matches the float64 reference within the dtype's
    tolerance ``tol`` (``TOLERANCES``); return the largest error relative to the reference's RMS.

    An element passes when ``|actual - reference| <= tol * magnitude + tol * RMS(row)``,
    where ``magnitude`` is the sum of the absolute values of the k weighted expert outputs the
    element adds up (``|reference|`` itself for top-1): the error of a rounded sum follows the
    size of its terms; ``RMS(row)`` is the RMS of the magnitudes of the element's token (of its
    row of the reference for top-1). ``rows`` checks a sample of the tokens (the reference then
    computes only those), for shapes where the whole reference would take too long.

    Taught in notebook 03.
    """
    if rows is not None:
        actual, A, expert_ids = actual[rows], A[rows], expert_ids[rows]
        combine_weights = None if combine_weights is None else combine_weights[rows]
    ids = as_top_k(expert_ids)
    weights = None if combine_weights is None else as_top_k(combine_weights)
    terms = [  # each token's j-th weighted expert output, in float64
        moe_matmul_reference_fp64(A, W, ids[:, j], None if weights is None else weights[:, j])
        for j in range(ids.shape[1])
    ]
    return assert_sum_close(actual, terms, A.dtype)


def assert_experts_close(
    actual: torch.Tensor,  # [T, N]
    A: torch.Tensor,  # [T, K]
    W_gate_up: torch.Tensor,  # [E, K, 2I]
    W_down: torch.Tensor,  # [E, I, N]
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None = None,  # expert_ids' shape
    activation: str | GatedActivation = "silu",
    rows: torch.Tensor | None = None,  # [R] token indices: check only these rows
    *,
    gate_up_bias: torch.Tensor | None = None,  # [E, 2I]
    down_bias: torch.Tensor | None = None,  # [E, N]
    interleaved: bool = False,
) -> float:
    """``assert_moe_close`` for ``moe_experts``: the same criterion, against
    ``moe_experts_reference_fp64``'s weighted output of each token's j-th expert (with the
    layer's biases and layout, if any).

    Taught in notebook 10.
    """
    if rows is not None:
        actual, A, expert_ids = actual[rows], A[rows], expert_ids[rows]
        combine_weights = None if combine_weights is None else combine_weights[rows]
    ids = as_top_k(expert_ids)
    weights = torch.ones(ids.shape) if combine_weights is None else as_top_k(combine_weights)
    extras = (gate_up_bias, down_bias, interleaved)
    terms = [
        moe_experts_reference_fp64(
            A, W_gate_up, W_down, ids[:, j], weights[:, j], activation, *extras
        )
        for j in range(ids.shape[1])
    ]
    return assert_sum_close(actual, terms, A.dtype)


def assert_moe_fp8_close(
    actual: torch.Tensor,  # [T, N]
    A: torch.Tensor,  # [T, K] as passed to moe_matmul_fp8
    W: torch.Tensor,  # [E, K, N] e4m3
    W_scales: torch.Tensor,  # [E, K / 128, N / 128]
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None = None,  # expert_ids' shape
) -> float:
    """``assert_moe_close`` for ``moe_matmul_fp8``: against the float64 reference of A quantized
    by ``quantize_activations_fp8`` and W's dequantized values, within ``FP8_TOLERANCE``.

    Taught in notebook 13.
    """
    A_values = dequantize_fp8(*quantize_activations_fp8(A))
    W_values = dequantize_fp8(W, W_scales)
    ids = as_top_k(expert_ids)
    weights = torch.ones(ids.shape) if combine_weights is None else as_top_k(combine_weights)
    terms = [
        moe_matmul_reference_fp64(A_values, W_values, ids[:, j], weights[:, j])
        for j in range(ids.shape[1])
    ]
    return assert_sum_close(actual, terms, A.dtype, tol=FP8_TOLERANCE)


def assert_experts_fp8_close(
    actual: torch.Tensor,  # [T, N]
    A: torch.Tensor,  # [T, K]
    W_gate_up: torch.Tensor,  # [E, K, 2I] e4m3
    gate_up_scales: torch.Tensor,  # [E, K / 128, 2I / 128]
    W_down: torch.Tensor,  # [E, I, N] e4m3
    down_scales: torch.Tensor,  # [E, I / 128, N / 128]
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None = None,  # expert_ids' shape
    activation: str | GatedActivation = "silu",
) -> float:
    """``assert_experts_close`` for ``moe_experts_fp8``: against
    ``moe_experts_fp8_reference_fp64``'s terms on A quantized by ``quantize_activations_fp8``,
    within ``FP8_TOLERANCE`` plus the reference's allowance for hidden values that may round
    either way (``FP8_HIDDEN_SLACK``).

    Taught in notebook 13.
    """
    ids = as_top_k(expert_ids)
    weights = torch.ones(ids.shape) if combine_weights is None else as_top_k(combine_weights)
    weights = weights.to(A.device)
    A_q, A_scales = quantize_activations_fp8(A)
    scaled = (W_gate_up, gate_up_scales, W_down, down_scales)
    terms, allowance = [], 0
    for j in range(ids.shape[1]):
        term, ambiguity = moe_experts_fp8_reference_fp64(
            A_q, A_scales, *scaled, ids[:, j], weights[:, j], activation, FP8_HIDDEN_SLACK
        )
        terms.append(term)
        allowance = allowance + ambiguity
    return assert_sum_close(actual, terms, A.dtype, tol=FP8_TOLERANCE, allowance=allowance)


def assert_sum_close(
    actual: torch.Tensor,  # [T, N]
    terms: list[torch.Tensor],  # k tensors [T, N] float64 whose sum is the reference
    dtype: torch.dtype,  # the inputs' dtype, which sets the tolerance
    tol: float | None = None,  # the tolerance when not TOLERANCES[dtype] (FP8_TOLERANCE)
    allowance: torch.Tensor | None = None,  # [T, N] float64 added to each element's bound
) -> float:
    """The criterion of ``assert_moe_close``, for a reference given as the k terms it sums.

    Taught in notebook 08.
    """
    expected = sum(terms)
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    if actual.dtype != dtype:
        raise AssertionError(f"dtype {actual.dtype}, expected {dtype}")
    if expected.numel() == 0:
        return 0.0
    tolerance = f"the {dtype} tolerance" if tol is None else f"the tolerance {tol:.3g}"
    tol = TOLERANCES[dtype] if tol is None else tol
    scale = expected.pow(2).mean().sqrt().item() or 1.0
    error = (actual.double() - expected).abs()
    magnitude = sum(term.abs() for term in terms)
    row_scale = magnitude.pow(2).mean(1, keepdim=True).sqrt()  # [T, 1]
    allowed = tol * magnitude + tol * row_scale
    if allowance is not None:
        allowed = allowed + allowance
    if not (error <= allowed).all():  # also catches NaN
        bad = ~(error <= allowed)
        worst = torch.argmax(torch.where(bad, error - allowed, -1.0)).item()
        row, column = divmod(worst, expected.shape[1])
        raise AssertionError(
            f"{int(bad.sum())} of {error.numel()} elements outside {tolerance}, "
            f"the worst at [{row}, {column}]\n"
            f"{actual[row, column].item():.6g} against the reference's "
            f"{expected[row, column].item():.6g}: allowed difference "
            f"{allowed[row, column].item():.3g} (the row's RMS {row_scale[row, 0].item():.3g})"
        )
    return (error.max() / scale).item()


def assert_grad_close(
    actual: torch.Tensor | None,
    expected: torch.Tensor,  # float64, from autograd through a float64 reference
    dtype: torch.dtype,  # the inputs' dtype, which sets the tolerance
    name: str,  # which gradient, for the message
) -> float:
    """Raise AssertionError unless a gradient matches its float64 reference elementwise within
    ``tol * |expected| + tol * RMS(expected)``, ``tol = GRADIENT_TOLERANCES[dtype]``: the
    forward's criterion, with the element's own size standing for the size of its terms and the
    RMS of the whole gradient for its absolute part (a gradient's elements are not one token's
    outputs). Returns the largest error over the RMS.

    Taught in notebook 11.
    """
    if actual is None:
        raise AssertionError(f"{name}: no gradient")
    if actual.shape != expected.shape:
        raise AssertionError(
            f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
        )
    tol = GRADIENT_TOLERANCES[dtype]
    scale = expected.pow(2).mean().sqrt().item() if expected.numel() else 0.0
    scale = scale or 1.0
    error = (actual.detach().double() - expected).abs()
    bad = ~(error <= tol * expected.abs() + tol * scale)
    if bad.any():
        worst = torch.argmax(torch.where(bad, error, -1.0)).item()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {error.numel()} elements outside the {dtype} "
            f"tolerance; the worst, flat index {worst}, is off by {error.flatten()[worst]:.3g} "
            f"(reference RMS {scale:.3g})"
        )
    return (error.max() / scale).item() if error.numel() else 0.0


@dataclasses.dataclass(frozen=True)
class MoECase:
    """One randomized correctness case: inputs, a routing and a kernel config.

    Taught in notebook 04.
    """

    A: torch.Tensor  # [T, K]
    W: torch.Tensor  # [E, K, N]
    expert_ids: torch.Tensor  # [T]
    config: helion.Config


def random_moe_case(case: int) -> MoECase:
    """A small random case, the same on every machine for a given ``case`` number.

    Shapes include T = 1, E = 1 and K, N that are not multiples of 16; routings are uniform,
    Zipf-skewed (which leaves experts empty) or all tokens on one expert; dtypes are float32,
    float16 and bfloat16; token tiles are smaller or larger than the experts.

    Taught in notebook 04.
    """
    rng = random.Random(case)
    T = rng.choice([1, 2, 7, 33, 100])
    K = rng.choice([8, 16, 20, 48])
    N = rng.choice([8, 16, 24, 40])
    E = rng.choice([1, 2, 3, 5, 8])
    routing = rng.choice(["uniform", "zipf", "one expert"])
    if routing == "uniform":
        expert_ids = route_uniform(T, E, seed=case)
    elif routing == "zipf":
        expert_ids = route_zipf(T, E, rng.choice([0.8, 1.5, 3.0]), seed=case)
    else:
        expert_ids = torch.full((T,), E - 1, device=DEVICE)
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
    block_sizes = [rng.choice([16, 32, 64]), rng.choice([16, 32]), rng.choice([16, 32])]
    g = cpu_generator(case)
    return MoECase(
        A=torch.randn(T, K, generator=g).to(DEVICE, dtype),
        W=torch.randn(E, K, N, generator=g).to(DEVICE, dtype),
        expert_ids=expert_ids,
        config=helion.Config(block_sizes=block_sizes, num_warps=4, num_stages=1),
    )


def seed_store_race_rows(
    sort: ExpertSort,
    block_t: int,
) -> torch.Tensor:  # [R] int64, original token indices
    """Rows the seed kernel's racing store can lose, for a token tile of ``block_t`` rows.

    In an expert's first token tile, lanes past its token count are pointed at its first token
    and write back the old value in the same store in which lane 0 writes the new one. Lanes
    at or past ``max_tokens_per_expert`` store nothing (Helion's own tile mask), so this
    happens when the expert has at least one token but fewer than both ``block_t`` and the
    largest expert. (Later tiles are safe: their masked-off lanes write back the value the
    first tile already stored.)

    Taught in notebook 04.
    """
    counts = sort.expert_token_counts
    short = (counts > 0) & (counts < min(block_t, sort.max_tokens_per_expert))
    first_sorted_position = sort.expert_token_offsets[:-1][short]
    return sort.sorted_to_orig_token_idx[first_sorted_position].long()
