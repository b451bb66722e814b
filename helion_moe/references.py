"""References in PyTorch (notebook 03, the layer's in notebooks 10 and 11): the seed's loop, the
dense one-hot formulation, ``torch._grouped_mm`` as a whole pipeline, and the float64
yardsticks that every check compares against.
"""

from __future__ import annotations

import torch

from .fp8 import dequantize_fp8, quantize_blocks_fp8
from .kernels.activations import GatedActivation, as_gated_activation
from .kernels.fp8 import E4M3_MAX, FP8_DTYPE, FP8_GROUP
from .routing import as_top_k
from .sorting import sort_tokens_by_expert

__all__ = [
    "activation_reference",
    "concatenated_gate_up",
    "e4m3_rounding_ambiguity",
    "gated_product_reference",
    "moe_experts_fp8_reference_fp64",
    "moe_experts_gather_reference",
    "moe_experts_reference_fp64",
    "moe_matmul_dense_reference",
    "moe_matmul_grouped_mm",
    "moe_matmul_loop_reference",
    "moe_matmul_reference_fp64",
]


# Taught in notebook 03, which prints this source.
def moe_matmul_loop_reference(
    A: torch.Tensor,  # [T, K]
    W: torch.Tensor,  # [E, K, N]
    expert_ids: torch.Tensor,  # [T]
) -> torch.Tensor:  # [T, N]
    """The seed's reference: one PyTorch matmul per expert over the rows routed to it, in A's
    dtype (W's expert matrices are converted to it one at a time, so a float64 reference never
    holds a float64 copy of all of W)."""
    C = torch.empty(A.shape[0], W.shape[2], device=A.device, dtype=A.dtype)
    for e in range(W.shape[0]):
        token_idx = (expert_ids == e).nonzero(as_tuple=True)[0]
        if token_idx.numel() == 0:
            continue
        C[token_idx] = A[token_idx] @ W[e].to(A.dtype)
    return C


# Taught in notebook 03, which prints this source.
def moe_matmul_reference_fp64(
    A: torch.Tensor,  # [T, K]
    W: torch.Tensor,  # [E, K, N]
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None = None,  # expert_ids' shape
) -> torch.Tensor:  # [T, N] float64
    """The loop reference on inputs upcast to float64: the yardstick for every check.

    With top-k routing it runs once per rank j (each token's j-th expert) and sums the
    outputs, weighted by ``combine_weights`` (one when None).
    """
    ids = as_top_k(expert_ids)
    weights = torch.ones(ids.shape) if combine_weights is None else as_top_k(combine_weights)
    return sum(
        weights[:, j, None].to(A.device, torch.float64)
        * moe_matmul_loop_reference(A.double(), W, ids[:, j])
        for j in range(ids.shape[1])
    )


# Taught in notebook 03, which prints this source.
def moe_matmul_dense_reference(
    A: torch.Tensor,  # [T, K]
    W: torch.Tensor,  # [E, K, N]
    expert_ids: torch.Tensor,  # [T]
) -> torch.Tensor:  # [T, N]
    """Dense one-hot formulation: every token through every expert, then keep its own.

    E times the arithmetic and a [T, E, N] intermediate, but no data-dependent indexing at all:
    the result is ``sum_e onehot[t, e] * (A @ W[e])[t]``.
    """
    onehot = torch.nn.functional.one_hot(expert_ids.long(), W.shape[0]).to(A.dtype)  # [T, E]
    every_expert = torch.einsum("tk,ekn->ten", A, W)  # [T, E, N]
    return torch.einsum("te,ten->tn", onehot, every_expert)


# Taught in notebook 03, which prints this source.
def moe_matmul_grouped_mm(
    A: torch.Tensor,  # [T, K]
    W: torch.Tensor,  # [E, K, N]
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None = None,  # expert_ids' shape
) -> torch.Tensor:  # [T, N]
    """PyTorch's grouped GEMM as a whole pipeline: sort, gather, ``torch._grouped_mm``, scatter.

    ``torch._grouped_mm`` multiplies consecutive row groups of its first operand by one matrix
    each; group e ends at row ``offs[e]``. It needs row strides that are multiples of 16 bytes
    (K and N multiples of 8 in 16-bit dtypes). With top-k routing the rows are the (token,
    expert) pairs, and a last step sums each token's k rows, weighted, in float32.
    """
    T = A.shape[0]
    pair_experts = as_top_k(expert_ids)
    top_k = pair_experts.shape[1]
    sort = sort_tokens_by_expert(pair_experts.flatten(), W.shape[0])
    pairs = sort.sorted_to_orig_token_idx.long()
    rows = pairs if top_k == 1 else pairs // top_k
    C_sorted = torch._grouped_mm(A[rows], W, offs=sort.expert_token_offsets[1:])
    C_pairs = torch.empty_like(C_sorted)
    C_pairs[pairs] = C_sorted
    if combine_weights is None and top_k == 1:
        return C_pairs
    weights = (
        torch.ones_like(pair_experts, dtype=torch.float32)
        if combine_weights is None
        else as_top_k(combine_weights)
    )
    weighted = C_pairs.view(T, top_k, -1) * weights[..., None]
    return weighted.sum(dim=1, dtype=torch.float32).to(A.dtype)


def activation_reference(name: str, x: torch.Tensor) -> torch.Tensor:
    """The activations of ``ACTIVATIONS`` as PyTorch computes them.

    Taught in notebook 10.
    """
    if name == "silu":
        return torch.nn.functional.silu(x)
    return torch.nn.functional.gelu(x, approximate="tanh")


def gated_product_reference(
    activation: str | GatedActivation,
    gate: torch.Tensor,  # [..., I]
    up: torch.Tensor,  # gate's shape
) -> torch.Tensor:  # gate's shape
    """``GatedActivation``'s ``act(g) * (u + up_shift)`` in differentiable PyTorch ops, with
    g = min(gate, limit) and u = clamp(up, -limit, limit).

    Taught in notebook 10.
    """
    name, alpha, limit, up_shift = as_gated_activation(activation)
    gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    act = gate * torch.sigmoid(alpha * gate) if name == "silu" else activation_reference(name, gate)
    return act * (up + up_shift)


def concatenated_gate_up(
    W_gate_up: torch.Tensor,  # [E, K, 2I]
    gate_up_bias: torch.Tensor | None,  # [E, 2I]
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # gate columns then up columns
    """Interleaved gate and up columns (gate ``[..., ::2]``, up ``[..., 1::2]``, gpt-oss's
    layout) put as the course lays them out, all gate columns first (copies); others as given.

    Taught in notebook 10.
    """
    if not interleaved:
        return W_gate_up, gate_up_bias

    def regroup(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[..., ::2], x[..., 1::2]], dim=-1)

    return regroup(W_gate_up), None if gate_up_bias is None else regroup(gate_up_bias)


def moe_experts_reference_fp64(
    A: torch.Tensor,  # [T, K]
    W_gate_up: torch.Tensor,  # [E, K, 2I] gate columns then up columns
    W_down: torch.Tensor,  # [E, I, N]
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None = None,  # expert_ids' shape
    activation: str | GatedActivation = "silu",
    gate_up_bias: torch.Tensor | None = None,  # [E, 2I]
    down_bias: torch.Tensor | None = None,  # [E, N]
    interleaved: bool = False,
) -> torch.Tensor:  # [T, N] float64
    """The gated MLP experts of an MoE layer in float64, one (token, expert) pair at a time:
    ``sum_j w_tj * down_e(act(A[t] @ gate_e) * (A[t] @ up_e))`` with ``e = expert_ids[t, j]``
    (each GEMM adding its expert's bias, if given). Only the experts of the given tokens are
    upcast, one at a time, on the weights' device.

    Taught in notebook 10.
    """
    W_gate_up, gate_up_bias = concatenated_gate_up(W_gate_up, gate_up_bias, interleaved)
    ids = as_top_k(expert_ids).tolist()
    if combine_weights is None:
        weights = [[1.0] * len(experts) for experts in ids]
    else:
        weights = as_top_k(combine_weights).tolist()
    I = W_gate_up.shape[2] // 2  # noqa: E741
    rows = []
    for t, experts in enumerate(ids):
        row = torch.zeros(W_down.shape[2], dtype=torch.float64, device=W_down.device)
        for e, weight in zip(experts, weights[t], strict=True):
            projected = A[t].double() @ W_gate_up[e].double()
            if gate_up_bias is not None:
                projected += gate_up_bias[e].double()
            hidden = gated_product_reference(activation, projected[:I], projected[I:])
            out = hidden @ W_down[e].double()
            row += weight * (out if down_bias is None else out + down_bias[e].double())
        rows.append(row)
    return torch.stack(rows) if rows else A.new_zeros(0, W_down.shape[2], dtype=torch.float64)


def moe_experts_gather_reference(
    A: torch.Tensor,  # [T, K]
    W_gate_up: torch.Tensor,  # [E, K, 2I]
    W_down: torch.Tensor,  # [E, I, N]
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None = None,  # expert_ids' shape
    activation: str | GatedActivation = "silu",
    gate_up_bias: torch.Tensor | None = None,  # [E, 2I]
    down_bias: torch.Tensor | None = None,  # [E, N]
    interleaved: bool = False,
) -> torch.Tensor:  # [T, N]
    """The experts layer in differentiable PyTorch ops, gathering each pair's expert weights
    (a [T, K, 2I] copy per rank j): the float64 yardstick for the layer's gradients.

    Taught in notebook 11.
    """
    W_gate_up, gate_up_bias = concatenated_gate_up(W_gate_up, gate_up_bias, interleaved)
    ids = as_top_k(expert_ids)
    weights = (
        torch.ones(ids.shape, device=A.device)
        if combine_weights is None
        else as_top_k(combine_weights)
    )
    I = W_gate_up.shape[2] // 2  # noqa: E741
    out = 0
    for j in range(ids.shape[1]):
        projected = torch.einsum("tk,tkn->tn", A, W_gate_up[ids[:, j]])
        if gate_up_bias is not None:
            projected = projected + gate_up_bias[ids[:, j]]
        hidden = gated_product_reference(activation, projected[:, :I], projected[:, I:])
        down = torch.einsum("ti,tin->tn", hidden, W_down[ids[:, j]])
        if down_bias is not None:
            down = down + down_bias[ids[:, j]]
        out = out + weights[:, j, None] * down
    return out


def e4m3_rounding_ambiguity(
    quotients: torch.Tensor,  # values divided by their scale, in e4m3's range [-448, 448]
    slack: float,  # how far from float64 another computation's quotients may lie, over 448
) -> torch.Tensor:  # quotients' shape, float64
    """The e4m3 step between the two values around each quotient where the quotient lies within
    ``slack * 448`` of their midpoint (so a computation that is off by that much may round it
    the other way), else 0.

    Taught in notebook 13.
    """
    grid = torch.arange(127, dtype=torch.uint8).view(FP8_DTYPE).double().to(quotients.device)
    magnitudes = quotients.double().abs().clamp(max=E4M3_MAX)  # grid: 0 to 448, increasing
    upper = torch.searchsorted(grid, magnitudes).clamp(1, grid.numel() - 1)
    low, high = grid[upper - 1], grid[upper]
    near = (magnitudes - (low + high) / 2).abs() <= slack * E4M3_MAX
    return torch.where(near, high - low, 0.0)


def moe_experts_fp8_reference_fp64(
    A_q: torch.Tensor,  # [T, K] e4m3, A as the layer quantizes it
    A_scales: torch.Tensor,  # [T, K / 128] float32
    W_gate_up: torch.Tensor,  # [E, K, 2I] e4m3
    gate_up_scales: torch.Tensor,  # [E, K / 128, 2I / 128] float32
    W_down: torch.Tensor,  # [E, I, N] e4m3
    down_scales: torch.Tensor,  # [E, I / 128, N / 128] float32
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None = None,  # expert_ids' shape
    activation: str | GatedActivation = "silu",
    hidden_slack: float = 0.0,  # how far the kernel's hidden may lie from float64's, over amax
) -> tuple[torch.Tensor, torch.Tensor]:  # [T, N] float64 each
    """``moe_experts_fp8``'s arithmetic in float64 on the values its e4m3 numbers stand for:
    A's, each used expert's weights dequantized (once), ``act(g) * (u + up_shift)``,
    quantized per 128 values as the kernel's epilogue does, and the down GEMM.

    Also returns how much the output may move because a hidden value lies so near the midpoint
    between two e4m3 numbers that a kernel whose hidden is within ``hidden_slack`` of its
    group's largest magnitude may round it the other way (``e4m3_rounding_ambiguity``): for
    each output element, the sum over such values of one e4m3 step times |W_down| and |w|.

    Taught in notebook 13.
    """
    A_values = dequantize_fp8(A_q, A_scales).double()
    ids = as_top_k(expert_ids).tolist()
    weights = (
        [[1.0] * len(e) for e in ids]
        if combine_weights is None
        else as_top_k(combine_weights).tolist()
    )
    I = W_down.shape[1]  # noqa: E741
    experts = {}
    rows, ambiguities = [], []
    for t, pair_experts in enumerate(ids):
        row = torch.zeros(W_down.shape[2], dtype=torch.float64, device=A_q.device)
        ambiguity = torch.zeros_like(row)
        for e, weight in zip(pair_experts, weights[t], strict=True):
            if e not in experts:
                experts[e] = (
                    dequantize_fp8(W_gate_up[e], gate_up_scales[e]).double(),
                    dequantize_fp8(W_down[e], down_scales[e]).double(),
                )
            gate_up, down = experts[e]
            projected = A_values[t] @ gate_up
            hidden = gated_product_reference(activation, projected[:I], projected[I:])
            q, scales = quantize_blocks_fp8(hidden[None].float(), 1)  # as the epilogue does
            row += weight * (dequantize_fp8(q, scales)[0].double() @ down)
            scales = scales[0].double().repeat_interleave(FP8_GROUP)[:I]  # each value's
            steps = e4m3_rounding_ambiguity(hidden / scales, hidden_slack) * scales
            ambiguity += abs(weight) * (steps @ down.abs())
        rows.append(row)
        ambiguities.append(ambiguity)
    if not rows:
        empty = A_q.new_zeros(0, W_down.shape[2], dtype=torch.float64)
        return empty, empty
    return torch.stack(rows), torch.stack(ambiguities)
