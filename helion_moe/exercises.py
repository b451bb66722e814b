"""Checkers for the notebooks' kernel exercises (notebooks 04, 07, 10, 11 and 13).

Each runs a kernel the reader wrote on a few small random cases, through the course's own
sorting or routing metadata and an explicit config (so nothing autotunes), compares its result
with a float64 reference and raises AssertionError, naming the case, on a wrong answer. On the
CPU the kernels run in Triton's interpreter, so every exercise can be done without a GPU.
"""

from __future__ import annotations

import helion
import torch

from .checks import FP8_TOLERANCE, assert_sum_close
from .kernels.fp8 import E4M3_MAX, FP8_DTYPE
from .launch import run_kernel
from .metadata import BlockAlignedRouting, align_to_blocks
from .mode import DEVICE
from .routing import cpu_generator, route_zipf, route_zipf_top_k
from .sorting import sort_tokens_by_expert

__all__ = [
    "check_interleaved_gate_up_kernel",
    "check_per_expert_bias_kernel",
    "check_rowwise_fp8_kernel",
    "check_weight_grad_nk_kernel",
    "check_weighted_seed_kernel",
]

# [tokens, N, K] tiles for the per-expert kernels, [N, K] (or [K, N]) for the flat ones
_SEED_CONFIG = helion.Config(block_sizes=[16, 16, 16], num_warps=4, num_stages=1)
_FLAT_CONFIG = helion.Config(block_sizes=[16, 16], num_warps=4, num_stages=1)
_BLOCK_T = 16
# (tokens, K, N, experts, k): a routing with empty experts, one whose experts are smaller than
# the 16-row token tile, and odd sizes
_CASES = ((7, 24, 40, 3, 2), (33, 16, 24, 4, 2), (20, 40, 16, 5, 1))


def _random(case: int, *shape: int) -> torch.Tensor:  # float32 on DEVICE
    return torch.randn(*shape, generator=cpu_generator(case)).to(DEVICE)


def _report(name: str, case: tuple[int, ...], error: AssertionError) -> AssertionError:
    T, K, N, E, k = case
    return AssertionError(f"{name}: wrong at T={T}, K={K}, N={N}, E={E}, k={k}:\n{error}")


def check_weighted_seed_kernel(kernel: helion.Kernel) -> None:
    """Notebook 04's exercise: a per-expert kernel with the seed's six arguments and a seventh,
    ``weights`` [T] float32, returning [T, N] with row t = weights[t] * A[t] @ W[e(t)]. Checked
    on top-1 routings, one whose small expert races in the seed's store.

    Taught in notebook 04.
    """
    # expert 0's 3 tokens, fewer than the 16-row tile and expert 1's 17, race in the seed's store
    routings = [(torch.tensor([1] * 17 + [0] * 3), 2)]
    routings += [
        (route_zipf(T, E, 1.5, seed=n, device="cpu"), E) for n, (T, _, _, E, _) in enumerate(_CASES)
    ]
    for n, (ids, E) in enumerate(routings):
        T, (K, N) = ids.numel(), _CASES[n % len(_CASES)][1:3]
        A, W, weights = _random(n, T, K), _random(n + 100, E, K, N), _random(n + 200, T).abs()
        ids = ids.to(DEVICE)
        args = (*sort_tokens_by_expert(ids, E).kernel_args(A, W), weights)
        out = run_kernel(kernel, args, _SEED_CONFIG)
        terms = [weights[:, None].double() * (A.double()[:, None, :] @ W.double()[ids]).squeeze(1)]
        try:
            assert_sum_close(out, terms, torch.float32)
        except AssertionError as error:
            raise _report("check_weighted_seed_kernel", (T, K, N, E, 1), error) from None
    print(f"check_weighted_seed_kernel: right on {len(routings)} routings")


def _pairs(
    case: int, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, BlockAlignedRouting]:
    """A case's inputs: A [T, K], expert ids [T, k], combine weights [T, k], and the routing
    aligned to 16-row blocks."""
    T, K, _, E, _ = _CASES[case]
    ids = route_zipf_top_k(T, E, 1.2, top_k, seed=case, device=DEVICE)
    weights = torch.softmax(_random(case + 300, T, top_k), dim=1)
    return _random(case, T, K), ids, weights, align_to_blocks(ids, E, _BLOCK_T)


def check_per_expert_bias_kernel(kernel: helion.Kernel) -> None:
    """Notebook 07's exercise: the flat kernel with a sixth argument, ``bias`` [E, N], returning
    [T, k, N] with pair (t, j) = combine_weights[t, j] * (A[t] @ W[e] + bias[e]), e = its
    expert. Checked on top-2 routings with empty experts, whose combine weights are not 1, so a
    bias added after the weight is caught.

    Taught in notebook 07.
    """
    for case, (T, K, N, E, _) in enumerate(_CASES):
        A, ids, weights, routing = _pairs(case, top_k=2)
        W, bias = _random(case + 100, E, K, N), _random(case + 200, E, N)
        args = (*routing.kernel_args(A, W, weights)[:5], bias)
        out = run_kernel(kernel, args, _FLAT_CONFIG)
        e = ids.flatten()  # pair p = 2 t + j
        products = (A.double().repeat_interleave(2, dim=0)[:, None, :] @ W.double()[e]).squeeze(1)
        expected = weights.double().reshape(-1, 1) * (products + bias.double()[e])
        try:
            assert out.shape == (T, 2, N), (
                f"returned shape {tuple(out.shape)}, not [T, k, N] = {(T, 2, N)}"
            )
            assert_sum_close(out.reshape(2 * T, N), [expected], torch.float32)
        except AssertionError as error:
            raise _report("check_per_expert_bias_kernel", (T, K, N, E, 2), error) from None
    print(f"check_per_expert_bias_kernel: right on {len(_CASES)} routings")


def check_interleaved_gate_up_kernel(kernel: helion.Kernel) -> None:
    """Notebook 10's exercise: the fused gate_up kernel for weights whose gate and up columns
    alternate (gate = ``W[..., 0::2]``, up = ``W[..., 1::2]``, gpt-oss's layout), with arguments
    (A, W, sorted_pair_ids, block_expert_ids, top_k), returning [P, I] with row p =
    silu(A[t] @ gate_e) * (A[t] @ up_e). Checked on top-2 routings.

    Taught in notebook 10.
    """
    for case, (T, K, N, E, _) in enumerate(_CASES):
        A, ids, _, routing = _pairs(case, top_k=2)
        W = _random(case + 100, E, K, 2 * N)
        args = (A, W, routing.sorted_pair_ids, routing.block_expert_ids, 2)
        out = run_kernel(kernel, args, _FLAT_CONFIG)
        rows = A.double()[torch.arange(T, device=DEVICE).repeat_interleave(2)]
        W_pairs = W.double()[ids.flatten()]
        gate, up = ((rows[:, None, :] @ W_pairs[..., i::2]).squeeze(1) for i in (0, 1))
        expected = torch.nn.functional.silu(gate) * up
        try:
            assert_sum_close(out, [expected], torch.float32)
        except AssertionError as error:
            raise _report("check_interleaved_gate_up_kernel", (T, K, N, E, 2), error) from None
    print(f"check_interleaved_gate_up_kernel: right on {len(_CASES)} routings")


def check_weight_grad_nk_kernel(kernel: helion.Kernel) -> None:
    """Notebook 11's exercise: the weight gradient for weights stored [E, N, K] (nn.Linear's
    layout), with arguments (A [T, K], grad_out [T, N], sorted_pair_ids, expert_block_offsets,
    top_k), returning dW [E, N, K] with dW[e] = sum over e's pairs p of grad_out[t]^T A[t],
    contiguous (no transposed view). Checked on top-2 routings with empty experts.

    Taught in notebook 11.
    """
    for case, (T, K, N, E, _) in enumerate(_CASES):
        A, ids, _, routing = _pairs(case, top_k=2)
        grad = _random(case + 100, T, N)
        args = (A, grad, routing.sorted_pair_ids, routing.expert_block_offsets(E), 2)
        out = run_kernel(kernel, args, _FLAT_CONFIG)
        tokens = torch.arange(T, device=DEVICE).repeat_interleave(2)
        expected = torch.zeros(E, N, K, dtype=torch.float64, device=DEVICE)
        expected.index_add_(
            0, ids.flatten(), grad.double()[tokens, :, None] * A.double()[tokens, None, :]
        )
        try:
            assert out.shape == (E, N, K), (
                f"returned shape {tuple(out.shape)}, not [E, N, K] = {(E, N, K)}"
            )
            assert out.is_contiguous(), (
                "the result is a strided view (a transposed [E, K, N]?): store dW as [E, N, K]"
            )
            # each row of dW (one expert's column) against its own RMS: an empty expert's rows
            # must be exact zeros
            assert_sum_close(out.reshape(E * N, K), [expected.reshape(E * N, K)], torch.float32)
        except AssertionError as error:
            raise _report("check_weight_grad_nk_kernel", (T, K, N, E, 2), error) from None
    print(f"check_weight_grad_nk_kernel: right on {len(_CASES)} routings")


def check_rowwise_fp8_kernel(kernel: helion.Kernel) -> None:
    """Notebook 13's exercise: the flat FP8 kernel with rowwise scales (``torch._scaled_mm``'s):
    arguments (A_q [T, K] e4m3, A_scales [T] float32, one per token, W_q [E, K, N] e4m3,
    W_scales [E, N] float32, one per output column of each expert, sorted_pair_ids,
    block_expert_ids, combine_weights [T, k]), returning [T, k, N] bfloat16 with pair (t, j) =
    combine_weights[t, j] * A_scales[t] * (A_q[t] @ W_q[e]) * W_scales[e]. Checked on top-2
    routings with empty experts, against float64 on the e4m3 values.

    Taught in notebook 13.
    """
    for case, (T, K, N, E, _) in enumerate(_CASES):
        A, ids, weights, routing = _pairs(case, top_k=2)
        W = _random(case + 100, E, K, N)
        A_scales = A.abs().amax(1).clamp(min=1e-10) / E4M3_MAX
        W_scales = W.abs().amax(1).clamp(min=1e-10) / E4M3_MAX  # [E, N]
        A_q = (A / A_scales[:, None]).to(FP8_DTYPE)
        W_q = (W / W_scales[:, None, :]).to(FP8_DTYPE)
        args = (A_q, A_scales, W_q, W_scales, routing.sorted_pair_ids, routing.block_expert_ids)
        out = run_kernel(kernel, (*args, weights), _FLAT_CONFIG)
        A_values = A_q.double() * A_scales.double()[:, None]
        W_values = W_q.double() * W_scales.double()[:, None, :]
        e = ids.flatten()  # pair p = 2 t + j
        products = (A_values.repeat_interleave(2, dim=0)[:, None, :] @ W_values[e]).squeeze(1)
        expected = weights.double().reshape(-1, 1) * products
        try:
            assert out.shape == (T, 2, N), (
                f"returned shape {tuple(out.shape)}, not [T, k, N] = {(T, 2, N)}"
            )
            rows = out.reshape(2 * T, N)
            assert_sum_close(rows, [expected], torch.bfloat16, tol=FP8_TOLERANCE)
        except AssertionError as error:
            raise _report("check_rowwise_fp8_kernel", (T, K, N, E, 2), error) from None
    print(f"check_rowwise_fp8_kernel: right on {len(_CASES)} routings")
