"""FP8 kernels (notebook 13): e4m3 values with float32 block scales, as DeepSeek-V3 and Kimi-K2
ship their experts. ``quantize_rows_fp8`` turns activations into e4m3 with one scale per token
and 128 columns; ``moe_matmul_flat_fp8`` and ``moe_gate_up_flat_fp8`` are the flat schedule's
two kernels (``moe_matmul_flat``, ``moe_gate_up_flat``) on such operands, applying both scales
once per K block of the main loop, and the gate_up kernel quantizes its output for the down GEMM
in its epilogue.
"""

from __future__ import annotations

import helion
import helion.language as hl
import torch

from ..launch import sizes_of_one
from .activations import gated_product

__all__ = [
    "E4M3_MAX",
    "FP8_DTYPE",
    "FP8_GROUP",
    "SMALLEST_AMAX",
    "moe_gate_up_flat_fp8",
    "moe_matmul_flat_fp8",
    "quantize_groups",
    "quantize_rows_fp8",
]

FP8_DTYPE = torch.float8_e4m3fn  # 4 exponent bits, 3 mantissa bits, no infinities
E4M3_MAX = 448.0  # its largest finite value, 1.75 * 2**8
# The side of a scale's block: a weight scale covers 128 x 128 values, an activation scale 128
# consecutive values of one token (DeepSeek-V3's checkpoints and its inference code).
FP8_GROUP = 128
# A group of zeros gets this amax, so its scale is positive and its values quantize to zero.
SMALLEST_AMAX = 1e-10


def quantize_groups(
    x: torch.Tensor,  # [rows, FP8_GROUP] float32 tile
) -> tuple[torch.Tensor, torch.Tensor]:  # [rows, FP8_GROUP] e4m3; [rows] float32 scales
    """One e4m3 scale per row of a tile of ``FP8_GROUP`` columns: s = amax / 448, so the row's
    largest value maps to e4m3's largest, and x / s rounded to e4m3 (x ~ q * s). Device code
    that Helion inlines into the kernels that call it.

    The clamp makes every conversion agree on a quotient that rounding pushed past 448: a GPU's
    saturates, but one that does not gives NaN above 464 (halfway to 480, whose bit pattern is
    NaN: e4m3 has no infinity).

    Taught in notebook 13.
    """
    amax = torch.clamp(torch.amax(torch.abs(x), dim=1, keepdim=True), min=SMALLEST_AMAX)
    scale = amax * (1.0 / E4M3_MAX)  # [rows, 1]; a product, rounded alike on every device
    q = torch.clamp(x / scale, min=-E4M3_MAX, max=E4M3_MAX)
    return q.to(FP8_DTYPE), scale.squeeze(1)


# Taught in notebook 13, which prints this source.
@helion.kernel(static_shapes=False, key=sizes_of_one)
def quantize_rows_fp8(
    X: torch.Tensor,  # [T, K] activations, any float dtype
) -> tuple[torch.Tensor, torch.Tensor]:  # [T, K] e4m3; [T, ceil(K / 128)] float32 scales
    """Each token's activations in groups of ``FP8_GROUP`` columns, each group scaled by its own
    largest magnitude (``quantize_groups``): one program per [tokens, 128] tile."""
    T, K = X.shape
    Xq = torch.empty([T, K], dtype=FP8_DTYPE, device=X.device)
    groups = (K + FP8_GROUP - 1) // FP8_GROUP
    scales = torch.empty([T, groups], dtype=torch.float32, device=X.device)
    for tile_t, tile_k in hl.tile([T, K], block_size=[None, FP8_GROUP]):
        q, scale = quantize_groups(X[tile_t, tile_k].to(torch.float32))
        Xq[tile_t, tile_k] = q
        scales[tile_t, tile_k.id] = scale
    return Xq, scales


# Taught in notebook 13, which prints this source.
@helion.kernel(static_shapes=False, key=sizes_of_one)
def moe_matmul_flat_fp8(
    A: torch.Tensor,  # [T, K] e4m3
    A_scales: torch.Tensor,  # [T, ceil(K / 128)] float32, per token and 128 columns
    W: torch.Tensor,  # [E, K, N] e4m3, or [E, N, K] when nk_layout
    W_scales: torch.Tensor,  # [E, K / 128, N / 128] float32 (ceil), or [E, N / 128, K / 128]
    sorted_pair_ids: torch.Tensor,  # [num_blocks, block_t] pairs grouped by expert, P = padding
    block_expert_ids: torch.Tensor,  # [num_blocks] expert of each block, E = unused block
    combine_weights: torch.Tensor,  # [T, k] float32 weight of each token's k experts
    nk_layout: hl.constexpr,  # W and W_scales are stored [E, N, K], transformers' layout
    half_tails: hl.constexpr = False,  # as in moe_matmul_flat
) -> torch.Tensor:  # [T, k, N] bfloat16, each pair's weighted expert output
    """``moe_matmul_flat`` on e4m3 operands: A ~ A_q * A_scales and W ~ W_q * W_scales.

    The K and N tiles divide the 128 of a scale block (checked by the caller), so each step's
    e4m3 dot (exact products, summed by a Hopper tensor core in a narrower accumulator than
    float32) lies in one scale block of W: it is multiplied by one [block_t, 1] product, each
    row's A scale times the block's W scale, and added to the float32 accumulator, as DeepGEMM
    promotes its sums every 128 values. Handing the running sum to the dot instead
    (``hl.dot(..., acc=acc)``) would leave it in that narrower sum across all of K: Triton does
    not promote FP8 dots on Hopper by default.
    """
    if nk_layout:
        E, N, K = W.shape
        _, n_blocks, k_blocks = W_scales.shape
    else:
        E, K, N = W.shape
        _, k_blocks, n_blocks = W_scales.shape
    K = hl.specialize(K)
    N = hl.specialize(N)
    T, top_k = combine_weights.shape
    top_k = hl.specialize(top_k)
    num_blocks, block_t = sorted_pair_ids.shape
    block_t = hl.specialize(block_t)
    num_pairs = T * top_k
    W_rows = W.reshape(E * N, K) if nk_layout else W.reshape(E * K, N)
    scale_list = W_scales.reshape(-1)  # 1-D: a 2-D view loses its vector index (Helion 1.4)
    pair_weights = combine_weights.view(num_pairs)
    C = torch.empty(num_pairs, N, dtype=torch.bfloat16, device=A.device)
    half_t = block_t // 2
    block_n = hl.register_block_size(N)
    block_k = hl.register_block_size(K)  # one K tile for both loops below
    for tile_b, tile_n in hl.tile([num_blocks, N], block_size=[1, block_n]):
        e = block_expert_ids[tile_b.begin]
        if e < E:
            n_block = tile_n.begin // FP8_GROUP  # the tile's scale block of columns
            if half_tails and sorted_pair_ids[tile_b.begin, half_t] >= num_pairs:
                # the expert's last block, at most half full, as in moe_matmul_flat
                pairs_h = sorted_pair_ids[tile_b.begin, :half_t]
                valid_h = pairs_h < num_pairs
                safe_pairs_h = torch.where(valid_h, pairs_h, 0)
                rows_h = safe_pairs_h // top_k
                acc_h = hl.zeros([half_t, tile_n], dtype=torch.float32)
                for tile_k in hl.tile(K, block_size=block_k):
                    k_block = tile_k.begin // FP8_GROUP
                    if nk_layout:
                        W_frag = W_rows[e * N + tile_n.index, tile_k].T
                        W_scale = scale_list[(e * n_blocks + n_block) * k_blocks + k_block]
                    else:
                        W_frag = W_rows[e * K + tile_k.index, tile_n]
                        W_scale = scale_list[(e * k_blocks + k_block) * n_blocks + n_block]
                    scale_h = A_scales[rows_h, k_block][:, None] * W_scale  # [half_t, 1]
                    acc_h = acc_h + hl.dot(A[rows_h, tile_k], W_frag) * scale_h
                acc_h = acc_h * pair_weights[safe_pairs_h][:, None]
                hl.store(C, [safe_pairs_h, tile_n], acc_h.to(C.dtype), extra_mask=valid_h[:, None])
            else:
                pairs = sorted_pair_ids[tile_b.begin, :]  # [block_t]
                valid = pairs < num_pairs
                safe_pairs = torch.where(valid, pairs, 0)
                rows = safe_pairs // top_k
                acc = hl.zeros([block_t, tile_n], dtype=torch.float32)
                for tile_k in hl.tile(K, block_size=block_k):
                    k_block = tile_k.begin // FP8_GROUP
                    if nk_layout:
                        W_frag = W_rows[e * N + tile_n.index, tile_k].T
                        W_scale = scale_list[(e * n_blocks + n_block) * k_blocks + k_block]
                    else:
                        W_frag = W_rows[e * K + tile_k.index, tile_n]
                        W_scale = scale_list[(e * k_blocks + k_block) * n_blocks + n_block]
                    scale = A_scales[rows, k_block][:, None] * W_scale  # [block_t, 1]
                    acc = acc + hl.dot(A[rows, tile_k], W_frag) * scale
                acc = acc * pair_weights[safe_pairs][:, None]
                hl.store(C, [safe_pairs, tile_n], acc.to(C.dtype), extra_mask=valid[:, None])
    return C.view(T, top_k, N)


# Taught in notebook 13, which prints this source.
@helion.kernel(static_shapes=False, key=sizes_of_one)
def moe_gate_up_flat_fp8(
    A: torch.Tensor,  # [T, K] e4m3
    A_scales: torch.Tensor,  # [T, ceil(K / 128)] float32
    W: torch.Tensor,  # [E, K, 2I] e4m3, gate columns then up columns, or [E, 2I, K] (nk_layout)
    W_scales: torch.Tensor,  # [E, K / 128, 2I / 128] float32 (ceil), or [E, 2I / 128, K / 128]
    sorted_pair_ids: torch.Tensor,  # [num_blocks, block_t] pairs grouped by expert, P = padding
    block_expert_ids: torch.Tensor,  # [num_blocks] expert of each block, E = unused block
    top_k: hl.constexpr,  # experts per token: pair p is token p // top_k
    nk_layout: hl.constexpr,  # W and W_scales are stored [E, 2I, K], transformers' layout
    activation: hl.constexpr,  # a GatedActivation, as a tuple
    up_aligned: hl.constexpr,  # I % 128 == 0, so each N tile of up is one scale block too
    half_tails: hl.constexpr = False,  # as in moe_matmul_flat
) -> tuple[torch.Tensor, torch.Tensor]:  # [P, I] e4m3; [P, ceil(I / 128)] float32 scales
    """``moe_gate_up_flat`` on e4m3 operands, whose output is the down GEMM's e4m3 input.

    Each program computes 128 columns of I (one activation scale group) for one block of pairs:
    gate and up accumulate as in ``moe_matmul_flat_fp8``, ``gated_product`` joins them, and
    ``quantize_groups`` turns each pair's 128 values into e4m3 and one scale, so the [P, I]
    activations leave the kernel as one byte each and never exist in a wider type in memory.
    """
    if nk_layout:
        E, N2, K = W.shape
        _, n_blocks, k_blocks = W_scales.shape
    else:
        E, K, N2 = W.shape
        _, k_blocks, n_blocks = W_scales.shape
    K = hl.specialize(K)
    N2 = hl.specialize(N2)
    I = N2 // 2  # noqa: E741 (the course's name for the intermediate size)
    T = A.shape[0]
    num_blocks, block_t = sorted_pair_ids.shape
    block_t = hl.specialize(block_t)
    num_pairs = T * top_k
    W_rows = W.reshape(E * N2, K) if nk_layout else W.reshape(E * K, N2)
    scale_list = W_scales.reshape(-1)  # 1-D: a 2-D view loses its vector index (Helion 1.4)
    H = torch.empty(num_pairs, I, dtype=FP8_DTYPE, device=A.device)
    H_scales = torch.empty(
        num_pairs, (I + FP8_GROUP - 1) // FP8_GROUP, dtype=torch.float32, device=A.device
    )
    half_t = block_t // 2
    block_n = hl.register_block_size(I)
    block_k = hl.register_block_size(K)  # one K tile for both loops below
    for tile_b, tile_n in hl.tile([num_blocks, I], block_size=[1, block_n]):
        e = block_expert_ids[tile_b.begin]
        if e < E:
            gate_cols, up_cols = tile_n.index, I + tile_n.index
            gate_block = tile_n.begin // FP8_GROUP  # the gate tile is one scale block
            up_block = (I + tile_n.begin) // FP8_GROUP  # so is up's when up_aligned,
            up_blocks = up_cols // FP8_GROUP  # else it straddles two: a block per column
            if half_tails and sorted_pair_ids[tile_b.begin, half_t] >= num_pairs:
                # the expert's last block, at most half full, as in moe_matmul_flat
                pairs_h = sorted_pair_ids[tile_b.begin, :half_t]
                valid_h = pairs_h < num_pairs
                safe_pairs_h = torch.where(valid_h, pairs_h, 0)
                rows_h = safe_pairs_h // top_k
                gate_h = hl.zeros([half_t, tile_n], dtype=torch.float32)
                up_h = hl.zeros([half_t, tile_n], dtype=torch.float32)
                for tile_k in hl.tile(K, block_size=block_k):
                    k_block = tile_k.begin // FP8_GROUP
                    A_frag_h = A[rows_h, tile_k]
                    A_scale_h = A_scales[rows_h, k_block][:, None]  # [half_t, 1]
                    if nk_layout:
                        gate_frag = W_rows[e * N2 + gate_cols, tile_k].T
                        up_frag = W_rows[e * N2 + up_cols, tile_k].T
                        gate_scale = scale_list[(e * n_blocks + gate_block) * k_blocks + k_block]
                        up_scale = scale_list[(e * n_blocks + up_block) * k_blocks + k_block]
                        up_scales = scale_list[(e * n_blocks + up_blocks) * k_blocks + k_block]
                    else:
                        gate_frag = W_rows[e * K + tile_k.index, gate_cols]
                        up_frag = W_rows[e * K + tile_k.index, up_cols]
                        gate_scale = scale_list[(e * k_blocks + k_block) * n_blocks + gate_block]
                        up_scale = scale_list[(e * k_blocks + k_block) * n_blocks + up_block]
                        up_scales = scale_list[(e * k_blocks + k_block) * n_blocks + up_blocks]
                    gate_h = gate_h + hl.dot(A_frag_h, gate_frag) * (A_scale_h * gate_scale)
                    if up_aligned:
                        up_h = up_h + hl.dot(A_frag_h, up_frag) * (A_scale_h * up_scale)
                    else:
                        up_h = up_h + hl.dot(A_frag_h, up_frag) * (A_scale_h * up_scales[None, :])
                q_h, scale_h = quantize_groups(gated_product(gate_h, up_h, activation))
                hl.store(H, [safe_pairs_h, tile_n], q_h, extra_mask=valid_h[:, None])
                hl.store(H_scales, [safe_pairs_h, tile_n.id], scale_h, extra_mask=valid_h)
            else:
                pairs = sorted_pair_ids[tile_b.begin, :]  # [block_t]
                valid = pairs < num_pairs
                safe_pairs = torch.where(valid, pairs, 0)
                rows = safe_pairs // top_k
                gate = hl.zeros([block_t, tile_n], dtype=torch.float32)
                up = hl.zeros([block_t, tile_n], dtype=torch.float32)
                for tile_k in hl.tile(K, block_size=block_k):
                    k_block = tile_k.begin // FP8_GROUP
                    A_frag = A[rows, tile_k]
                    A_scale = A_scales[rows, k_block][:, None]  # [block_t, 1]
                    if nk_layout:
                        gate_frag = W_rows[e * N2 + gate_cols, tile_k].T
                        up_frag = W_rows[e * N2 + up_cols, tile_k].T
                        gate_scale = scale_list[(e * n_blocks + gate_block) * k_blocks + k_block]
                        up_scale = scale_list[(e * n_blocks + up_block) * k_blocks + k_block]
                        up_scales = scale_list[(e * n_blocks + up_blocks) * k_blocks + k_block]
                    else:
                        gate_frag = W_rows[e * K + tile_k.index, gate_cols]
                        up_frag = W_rows[e * K + tile_k.index, up_cols]
                        gate_scale = scale_list[(e * k_blocks + k_block) * n_blocks + gate_block]
                        up_scale = scale_list[(e * k_blocks + k_block) * n_blocks + up_block]
                        up_scales = scale_list[(e * k_blocks + k_block) * n_blocks + up_blocks]
                    gate = gate + hl.dot(A_frag, gate_frag) * (A_scale * gate_scale)
                    if up_aligned:
                        up = up + hl.dot(A_frag, up_frag) * (A_scale * up_scale)
                    else:
                        up = up + hl.dot(A_frag, up_frag) * (A_scale * up_scales[None, :])
                q, scale = quantize_groups(gated_product(gate, up, activation))
                hl.store(H, [safe_pairs, tile_n], q, extra_mask=valid[:, None])
                hl.store(H_scales, [safe_pairs, tile_n.id], scale, extra_mask=valid)
    return H, H_scales
