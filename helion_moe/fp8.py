"""FP8 experts (notebook 13): weights quantized once to e4m3 with one float32 scale per 128 x 128
block, as DeepSeek-V3 and Kimi-K2 ship them, and activations quantized on the fly, one scale per
token and 128 columns (``quantize_rows_fp8``). ``moe_matmul_fp8`` and ``moe_experts_fp8`` are
``moe_matmul``'s flat path and ``moe_experts``' fused layer on them, forward only, as custom ops.
"""

from __future__ import annotations

import helion
import torch

from .configs import (
    configs_as_text,
    configs_from_text,
    flat_half_tails,
    flat_run_blocks,
    fp8_configs,
)
from .kernels.activations import (
    GatedActivation,
    activation_as_text,
    activation_from_text,
    as_gated_activation,
)
from .kernels.fp8 import (
    E4M3_MAX,
    FP8_DTYPE,
    FP8_GROUP,
    SMALLEST_AMAX,
    moe_gate_up_flat_fp8,
    moe_matmul_flat_fp8,
    quantize_rows_fp8,
)
from .launch import expert_weights_in_place, kernel_index_dtype, run_kernel
from .matmul import one_token_as_two, output_without_products, pair_weights, sum_over_experts
from .metadata import align_to_blocks, comparable_expert_ids
from .routing import as_top_k
from .validation import (
    SUPPORTED_DTYPES,
    check_expert_id_check,
    runs_through_op,
    start_expert_id_check,
    validate_down_weights,
    validate_moe_inputs,
)

__all__ = [
    "QUANTIZE_CONFIG",
    "dequantize_fp8",
    "moe_experts_fp8",
    "moe_experts_fp8_forward",
    "moe_experts_fp8_op",
    "moe_matmul_fp8",
    "moe_matmul_fp8_forward",
    "moe_matmul_fp8_op",
    "quantize_activations_fp8",
    "quantize_blocks_fp8",
    "quantize_weights_fp8",
    "validate_fp8_scales",
]

# quantize_rows_fp8's tile: 32 tokens by 128 columns per program (not timed on a GPU).
QUANTIZE_CONFIG = helion.Config(block_sizes=[32], num_warps=4, num_stages=1)


def quantize_blocks_fp8(
    x: torch.Tensor,  # [..., R, C] floating point
    block_rows: int,  # rows per scale block: 128 (weights) or 1 (a token's groups)
) -> tuple[torch.Tensor, torch.Tensor]:  # [..., R, C] e4m3; [..., R / rows, C / 128] float32
    """e4m3 values and one float32 scale per block of ``block_rows`` x 128 values (R and C
    padded with zeros to whole blocks), in PyTorch: s = amax * (1 / 448), the block's largest
    magnitude mapping to e4m3's largest, and x / s in float32, clamped to +-448 and rounded to
    nearest, ties to even. With ``block_rows=1`` it is ``quantize_rows_fp8``'s arithmetic.

    Taught in notebook 13.
    """
    *lead, R, C = x.shape
    rows, cols = -(-R // block_rows), -(-C // FP8_GROUP)
    padded = x.new_zeros(*lead, rows * block_rows, cols * FP8_GROUP, dtype=torch.float32)
    padded[..., :R, :C] = x
    blocks = padded.view(*lead, rows, block_rows, cols, FP8_GROUP)
    scales = blocks.abs().amax(dim=(-3, -1), keepdim=True).clamp(min=SMALLEST_AMAX)
    scales = scales * (1 / E4M3_MAX)
    q = (blocks / scales).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    q = q.view(*lead, rows * block_rows, cols * FP8_GROUP)[..., :R, :C]
    return q, scales.view(*lead, rows, cols)


def quantize_weights_fp8(
    W: torch.Tensor,  # [E, R, C] floating point, any layout
) -> tuple[torch.Tensor, torch.Tensor]:  # [E, R, C] e4m3 in W's layout; [E, R/128, C/128] float32
    """Expert weights as an FP8 checkpoint stores them: e4m3 values and one float32 scale per
    128 x 128 block (R/128 and C/128 rounded up), the block's largest magnitude over 448, so
    W ~ W_q * scale (``quantize_blocks_fp8``). Done once, one expert at a time (no float32
    copy of all the weights).

    A transposed view (``gate_up_proj.transpose(1, 2)``) is quantized in its storage layout
    and both results come back as the same view, as ``expert_weights_in_place`` reads them.

    Taught in notebook 13.
    """
    if not isinstance(W, torch.Tensor) or W.dim() != 3 or W.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"W must be a 3-D tensor of {SUPPORTED_DTYPES}, got "
            f"{getattr(W, 'dtype', type(W).__name__)} of shape {tuple(getattr(W, 'shape', ()))}"
        )
    stored, transposed = expert_weights_in_place(W.detach())  # a checkpoint holds no graph
    E, R, C = stored.shape
    W_q = torch.empty(E, R, C, dtype=FP8_DTYPE, device=W.device)
    blocks = (E, -(-R // FP8_GROUP), -(-C // FP8_GROUP))
    scales = torch.empty(blocks, dtype=torch.float32, device=W.device)
    for e in range(E):
        W_q[e], scales[e] = quantize_blocks_fp8(stored[e], FP8_GROUP)
    if transposed:
        return W_q.transpose(1, 2), scales.transpose(1, 2)
    return W_q, scales


def quantize_activations_fp8(
    A: torch.Tensor,  # [T, K] floating point
) -> tuple[torch.Tensor, torch.Tensor]:  # [T, K] e4m3; [T, ceil(K / 128)] float32
    """Each token's activations as e4m3, one float32 scale per 128 columns, by the Helion kernel
    ``quantize_rows_fp8``: what the FP8 entry points run before their first GEMM.

    Taught in notebook 13.
    """
    if not isinstance(A, torch.Tensor) or A.dim() != 2 or A.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"A must be a 2-D tensor of {SUPPORTED_DTYPES}, got "
            f"{getattr(A, 'dtype', type(A).__name__)} of shape {tuple(getattr(A, 'shape', ()))}"
        )
    T, K = A.shape
    if T == 0 or K == 0:
        scales = A.new_empty(T, -(-K // FP8_GROUP), dtype=torch.float32)
        return A.new_empty(T, K, dtype=FP8_DTYPE), scales
    return run_kernel(quantize_rows_fp8, (A,), QUANTIZE_CONFIG)


def dequantize_fp8(
    q: torch.Tensor,  # [..., R, C] e4m3
    scales: torch.Tensor,  # [..., R / rows, C / 128] float32: rows 128 (weights) or 1 (tokens)
) -> torch.Tensor:  # [..., R, C] float32, q * scale of its block
    """The values an FP8 tensor stands for: each element times its block's scale. A scale
    dimension of q's size has blocks of 1 along it (per token), any other blocks of 128; other
    shapes of ``scales`` get a ValueError naming it.

    Taught in notebook 13.
    """
    blocks = [(size, -(-size // FP8_GROUP)) for size in q.shape[-2:]]
    if (
        scales.dim() != q.dim()
        or scales.shape[:-2] != q.shape[:-2]
        or any(size not in allowed for size, allowed in zip(scales.shape[-2:], blocks, strict=True))
    ):
        raise ValueError(
            f"scales must have shape [..., R or ceil(R / 128), C or ceil(C / 128)] for q of shape "
            f"[..., R, C] = {list(q.shape)}: one scale per row or 128 rows, and per column or "
            f"128 columns; got {list(scales.shape)}"
        )
    for dim in (-2, -1):
        if scales.shape[dim] != q.shape[dim]:
            scales = scales.repeat_interleave(FP8_GROUP, dim).narrow(dim, 0, q.shape[dim])
    return q.float() * scales


def validate_fp8_scales(
    W: torch.Tensor,  # [E, K, N] e4m3, validated
    scales: torch.Tensor,  # [E, ceil(K / 128), ceil(N / 128)] float32
    weight_name: str,
    scales_name: str,
) -> None:
    """Raise a clear error, naming ``scales_name``, unless ``scales`` holds one float32 scale
    per 128 x 128 block of ``W``, on its device. A checkpoint quantized in other blocks has
    other shapes: its weights need quantizing again (``quantize_weights_fp8``).

    Taught in notebook 13.
    """
    if not isinstance(scales, torch.Tensor):
        raise TypeError(f"{scales_name} must be a torch.Tensor, got {type(scales).__name__}")
    if scales.dtype != torch.float32:
        raise TypeError(f"{scales_name} must be float32, got {scales.dtype}")
    E, K, N = W.shape
    expected = (E, -(-K // FP8_GROUP), -(-N // FP8_GROUP))
    if tuple(scales.shape) != expected:
        raise ValueError(
            f"{scales_name} must have shape {list(expected)}, one scale per 128 x 128 block of "
            f"{weight_name} {list(W.shape)}; got {list(scales.shape)}"
        )
    if scales.device != W.device:
        raise ValueError(f"{scales_name} is on {scales.device} but {weight_name} on {W.device}")


def _stored_with_scales(
    W: torch.Tensor,  # [E, K, N] e4m3, either layout
    scales: torch.Tensor,  # [E, K / 128, N / 128]
) -> tuple[torch.Tensor, torch.Tensor, bool]:  # W and scales as stored, whether [E, N, K]
    stored, nk_layout = expert_weights_in_place(W)
    scales = scales.transpose(1, 2) if nk_layout else scales
    return stored, scales.contiguous(), nk_layout  # no copy when they match W's layout


def moe_matmul_fp8(
    A: torch.Tensor,  # [T, K] floating point
    W: torch.Tensor,  # [E, K, N] e4m3
    W_scales: torch.Tensor,  # [E, ceil(K / 128), ceil(N / 128)] float32
    expert_ids: torch.Tensor,  # [T] or [T, k] integer
    combine_weights: torch.Tensor | None = None,  # expert_ids' shape
    *,
    config: helion.Config | None = None,
    expert_id_check: str = "device",
) -> torch.Tensor:  # [T, N], A's dtype
    """``moe_matmul`` with FP8 expert weights: row t is ``sum_j w_tj A8[t] @ W8[e_tj]``, where A8
    is A quantized per token and 128 columns and W8 = W * W_scales block by block.

    The flat path only: A is quantized by ``quantize_rows_fp8``, the routing aligned as for
    ``moe_matmul``, and ``moe_matmul_flat_fp8`` multiplies, each pair's row rounded to bfloat16
    and each token's k rows summed in float32. Forward only. ``config`` is a flat config of
    [tokens, N, K] tiles whose K and N tiles divide 128 (``fp8_configs``); ``expert_id_check`` as
    for ``moe_matmul``. Weights may be a transposed view ([E, N, K] storage, transformers'),
    with scales in either layout.

    Taught in notebook 13.
    """
    check_expert_id_check(expert_id_check)
    validate_moe_inputs(A, W, expert_ids, combine_weights, weight_dtype=FP8_DTYPE)
    expert_ids = comparable_expert_ids(expert_ids)
    validate_fp8_scales(W, W_scales, "W", "W_scales")
    configs = None if config is None else (config,)
    if configs is not None:  # raises, naming configs, before they become the op's text
        fp8_configs(configs, expert_ids.numel(), W.shape[0])
    args = (A, W, W_scales, expert_ids, combine_weights)
    if not runs_through_op(*args):  # plain eager inference: the op's body, without dispatch
        return moe_matmul_fp8_forward(*args, config, expert_id_check)
    return moe_matmul_fp8_op(*args, configs_as_text(configs), expert_id_check)


def moe_matmul_fp8_forward(
    A: torch.Tensor,  # [T, K]
    W: torch.Tensor,  # [E, K, N] e4m3, either layout
    W_scales: torch.Tensor,  # [E, K / 128, N / 128]
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None,
    config: helion.Config | None,
    expert_id_check: str,
) -> torch.Tensor:  # [T, N]
    """``moe_matmul_fp8`` on checked inputs.

    Taught in notebook 13.
    """
    T = A.shape[0]
    E, K, N = W.shape
    out = output_without_products(A, N, expert_ids, E, K == 0, expert_id_check)
    if out is not None:
        return out
    if T == 1:
        A, expert_ids, combine_weights = one_token_as_two(A, expert_ids, combine_weights)
    num_pairs = expert_ids.numel()
    configs = None if config is None else (config,)
    block_t, _, kernel_config = fp8_configs(configs, num_pairs, E)
    routing = align_to_blocks(expert_ids, E, block_t, flat_run_blocks(W, kernel_config))
    finish_check = start_expert_id_check(routing.all_placed, expert_ids, E, expert_id_check)
    A_q, A_scales = quantize_activations_fp8(A)
    stored, scales, nk_layout = _stored_with_scales(W, W_scales)
    args = (A_q, A_scales, stored, scales, routing.sorted_pair_ids, routing.block_expert_ids)
    args += (pair_weights(expert_ids, combine_weights), nk_layout)
    index_dtype = kernel_index_dtype(A, W, num_pairs)
    pair_outputs = run_kernel(moe_matmul_flat_fp8, args, kernel_config, index_dtype)
    skip = (expert_ids, E) if expert_id_check == "sentinels" else None
    out = sum_over_experts(pair_outputs, skip_outside=skip)[:T].to(A.dtype)
    finish_check()
    return out


def moe_experts_fp8(
    A: torch.Tensor,  # [T, K] floating point
    W_gate_up: torch.Tensor,  # [E, K, 2I] e4m3: gate columns, then up columns
    gate_up_scales: torch.Tensor,  # [E, ceil(K / 128), ceil(2I / 128)] float32
    W_down: torch.Tensor,  # [E, I, N] e4m3
    down_scales: torch.Tensor,  # [E, ceil(I / 128), ceil(N / 128)] float32
    expert_ids: torch.Tensor,  # [T] or [T, k] integer
    combine_weights: torch.Tensor | None = None,  # expert_ids' shape
    *,
    activation: str | GatedActivation = "silu",
    configs: tuple[helion.Config, helion.Config] | None = None,
    expert_id_check: str = "device",
) -> torch.Tensor:  # [T, N], A's dtype
    """``moe_experts`` with FP8 expert weights, in four launches: A quantized per token and 128
    columns (``quantize_rows_fp8``), the routing metadata, the fused gate_up kernel
    (``moe_gate_up_flat_fp8``), which quantizes each pair's activations ``act(g) * (u +
    up_shift)`` to e4m3 in its epilogue, and the flat down GEMM (``moe_matmul_flat_fp8``);
    each token's k rows are then summed in float32.

    Forward only (FP8 checkpoints serve inference), concatenated gate and up columns, no
    biases. The weights may be transposed views of transformers' [E, 2I, K] and [E, N, I]
    tensors, read in place, with scales in either layout. ``configs`` is a (gate_up, down)
    pair as for ``moe_experts``, checked by ``fp8_configs``; ``activation`` and
    ``expert_id_check`` as for ``moe_experts``.

    Taught in notebook 13.
    """
    activation = as_gated_activation(activation)
    check_expert_id_check(expert_id_check)
    validate_moe_inputs(
        A, W_gate_up, expert_ids, combine_weights, "W_gate_up", weight_dtype=FP8_DTYPE
    )
    expert_ids = comparable_expert_ids(expert_ids)
    validate_down_weights(W_gate_up, W_down)
    validate_fp8_scales(W_gate_up, gate_up_scales, "W_gate_up", "gate_up_scales")
    validate_fp8_scales(W_down, down_scales, "W_down", "down_scales")
    if configs is not None:  # raises, naming configs, before they become the op's text
        fp8_configs(configs, expert_ids.numel(), W_gate_up.shape[0])
    args = (A, W_gate_up, gate_up_scales, W_down, down_scales, expert_ids, combine_weights)
    if not runs_through_op(*args):  # plain eager inference: the op's body, without dispatch
        return moe_experts_fp8_forward(*args, activation, configs, expert_id_check)
    options = (activation_as_text(activation), configs_as_text(configs), expert_id_check)
    return moe_experts_fp8_op(*args, *options)


def moe_experts_fp8_forward(
    A: torch.Tensor,  # [T, K]
    W_gate_up: torch.Tensor,  # [E, K, 2I] e4m3, either layout
    gate_up_scales: torch.Tensor,  # [E, K / 128, 2I / 128]
    W_down: torch.Tensor,  # [E, I, N] e4m3, either layout
    down_scales: torch.Tensor,  # [E, I / 128, N / 128]
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None,
    activation: GatedActivation,
    configs: tuple[helion.Config, helion.Config] | None,
    expert_id_check: str,
) -> torch.Tensor:  # [T, N]
    """``moe_experts_fp8`` on checked inputs.

    Taught in notebook 13.
    """
    T, K = A.shape
    E, I, N = W_down.shape  # noqa: E741
    no_products = K == 0 or I == 0  # act(0) * 0 = 0 for every pair
    out = output_without_products(A, N, expert_ids, E, no_products, expert_id_check)
    if out is not None:
        return out
    if T == 1:
        A, expert_ids, combine_weights = one_token_as_two(A, expert_ids, combine_weights)
    num_pairs = expert_ids.numel()
    block_t, gate_up_config, down_config = fp8_configs(configs, num_pairs, E)
    top_k = as_top_k(expert_ids).shape[1]
    run_blocks = flat_run_blocks(W_gate_up, gate_up_config, down_config)
    routing = align_to_blocks(expert_ids, E, block_t, run_blocks)
    finish_check = start_expert_id_check(routing.all_placed, expert_ids, E, expert_id_check)
    blocks = (routing.sorted_pair_ids, routing.block_expert_ids)
    A_q, A_scales = quantize_activations_fp8(A)
    stored, scales, nk_layout = _stored_with_scales(W_gate_up, gate_up_scales)
    up_aligned = I % FP8_GROUP == 0
    half_tails = flat_half_tails(block_t)
    args = (A_q, A_scales, stored, scales, *blocks, top_k, nk_layout, tuple(activation))
    args += (up_aligned, half_tails)
    index_dtype = kernel_index_dtype(A, W_gate_up, num_pairs)
    hidden, hidden_scales = run_kernel(moe_gate_up_flat_fp8, args, gate_up_config, index_dtype)
    weights = pair_weights(expert_ids, combine_weights).view(num_pairs, 1)
    stored, scales, nk_layout = _stored_with_scales(W_down, down_scales)
    args = (hidden, hidden_scales, stored, scales, *blocks, weights, nk_layout, half_tails)
    index_dtype = kernel_index_dtype(hidden, W_down, num_pairs)
    pair_outputs = run_kernel(moe_matmul_flat_fp8, args, down_config, index_dtype)
    pair_outputs = pair_outputs.view(-1, top_k, N)
    skip = (expert_ids, E) if expert_id_check == "sentinels" else None
    out = sum_over_experts(pair_outputs, skip_outside=skip)[:T].to(A.dtype)
    finish_check()
    return out


# The custom ops, as for moe_matmul, without autograd: FP8 weights are for inference.
# Taught in notebook 13.
@torch.library.custom_op("helion_moe::moe_matmul_fp8", mutates_args=())
def moe_matmul_fp8_op(
    A: torch.Tensor,
    W: torch.Tensor,
    W_scales: torch.Tensor,
    expert_ids: torch.Tensor,
    combine_weights: torch.Tensor | None,
    configs: str | None,  # configs_as_text of (config,)
    expert_id_check: str,
) -> torch.Tensor:
    """``moe_matmul_fp8_forward`` as the custom op ``helion_moe::moe_matmul_fp8``."""
    config = configs_from_text(configs)
    args = (A, W, W_scales, expert_ids, combine_weights)
    return moe_matmul_fp8_forward(*args, config and config[0], expert_id_check)


@moe_matmul_fp8_op.register_fake
def _moe_matmul_fp8_shape(A, W, *rest):
    return A.new_empty(A.shape[0], W.shape[2])


@torch.library.custom_op("helion_moe::moe_experts_fp8", mutates_args=())
def moe_experts_fp8_op(
    A: torch.Tensor,
    W_gate_up: torch.Tensor,
    gate_up_scales: torch.Tensor,
    W_down: torch.Tensor,
    down_scales: torch.Tensor,
    expert_ids: torch.Tensor,
    combine_weights: torch.Tensor | None,
    activation: str,  # activation_as_text of a GatedActivation
    configs: str | None,  # configs_as_text of (gate_up config, down config)
    expert_id_check: str,
) -> torch.Tensor:
    """``moe_experts_fp8_forward`` as the custom op ``helion_moe::moe_experts_fp8``.

    Taught in notebook 13.
    """
    args = (A, W_gate_up, gate_up_scales, W_down, down_scales, expert_ids, combine_weights)
    options = (activation_from_text(activation), configs_from_text(configs), expert_id_check)
    return moe_experts_fp8_forward(*args, *options)


@moe_experts_fp8_op.register_fake
def _moe_experts_fp8_shape(A, W_gate_up, gate_up_scales, W_down, *rest):
    return A.new_empty(A.shape[0], W_down.shape[2])
