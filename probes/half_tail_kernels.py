"""Probe kernels (``prefill_probe.py half_tails``): the layer's two flat kernels with a second
path for a block whose second half holds no pair (a block's pairs come first, its padding
last), which runs it at half height, so an expert's tail of 1-64 pairs costs a 64-row tile, not
a 128-row one. Drop-in for ``moe_gate_up_flat`` and ``moe_matmul_flat`` (same arguments), plain
path only: no bias, no interleaved columns, no stored gate and up. Helion 1.4 cannot inline a
helper that holds an ``hl.tile`` loop, so each path has its own loop; it types a variable set in
both arms of an ``if`` by both, so the half path's names differ; both loops share one K tile.
"""

from __future__ import annotations

import moe_helpers  # noqa: F401 (first: sets the mode)
from helion_moe.kernels.activations import gate_up_columns, gated_product
from helion_moe.launch import sizes_of_one

import helion
import helion.language as hl
import torch


@helion.kernel(static_shapes=False, key=sizes_of_one)
def moe_matmul_flat(
    A: torch.Tensor,
    W: torch.Tensor,
    sorted_pair_ids: torch.Tensor,
    block_expert_ids: torch.Tensor,
    combine_weights: torch.Tensor,
    nk_layout: hl.constexpr,
) -> torch.Tensor:
    if nk_layout:
        E, N, K = W.shape
    else:
        E, K, N = W.shape
    K = hl.specialize(K)
    N = hl.specialize(N)
    T, top_k = combine_weights.shape
    top_k = hl.specialize(top_k)
    num_blocks, block_t = sorted_pair_ids.shape
    block_t = hl.specialize(block_t)
    half_t = block_t // 2
    half_ids = sorted_pair_ids.reshape(num_blocks * 2, half_t)  # each block as two halves
    num_pairs = T * top_k
    W_rows = W.reshape(E * N, K) if nk_layout else W.reshape(E * K, N)
    pair_weights = combine_weights.view(num_pairs)
    C = torch.empty(num_pairs, N, dtype=A.dtype, device=A.device)
    block_n = hl.register_block_size(N)
    block_k = hl.register_block_size(K)  # one K tile for both paths' loops
    for tile_b, tile_n in hl.tile([num_blocks, N], block_size=[1, block_n]):
        e = block_expert_ids[tile_b.begin]
        if e < E:
            if half_ids[2 * tile_b.begin + 1, 0] >= num_pairs:  # second half: padding only
                pairs_h = half_ids[2 * tile_b.begin, :]  # [half_t]
                valid_h = pairs_h < num_pairs
                safe_pairs_h = torch.where(valid_h, pairs_h, 0)
                rows_h = safe_pairs_h // top_k
                acc_h = hl.zeros([half_t, tile_n], dtype=torch.float32)
                for tile_k_h in hl.tile(K, block_size=block_k):
                    if nk_layout:
                        W_frag_h = W_rows[e * N + tile_n.index, tile_k_h].T
                    else:
                        W_frag_h = W_rows[e * K + tile_k_h.index, tile_n]
                    acc_h = torch.addmm(acc_h, A[rows_h, tile_k_h], W_frag_h)
                acc_h = acc_h * pair_weights[safe_pairs_h][:, None]
                hl.store(C, [safe_pairs_h, tile_n], acc_h.to(C.dtype), extra_mask=valid_h[:, None])
            else:
                pairs = sorted_pair_ids[tile_b.begin, :]  # [block_t]
                valid = pairs < num_pairs
                safe_pairs = torch.where(valid, pairs, 0)
                rows = safe_pairs // top_k
                acc = hl.zeros([block_t, tile_n], dtype=torch.float32)
                for tile_k in hl.tile(K, block_size=block_k):
                    if nk_layout:
                        W_frag = W_rows[e * N + tile_n.index, tile_k].T
                    else:
                        W_frag = W_rows[e * K + tile_k.index, tile_n]
                    acc = torch.addmm(acc, A[rows, tile_k], W_frag)
                acc = acc * pair_weights[safe_pairs][:, None]
                hl.store(C, [safe_pairs, tile_n], acc.to(C.dtype), extra_mask=valid[:, None])
    return C.view(T, top_k, N)


@helion.kernel(static_shapes=False, key=sizes_of_one)
def moe_gate_up_flat(
    A: torch.Tensor,
    W: torch.Tensor,
    sorted_pair_ids: torch.Tensor,
    block_expert_ids: torch.Tensor,
    gate_up: torch.Tensor,
    bias: torch.Tensor,
    top_k: hl.constexpr,
    nk_layout: hl.constexpr,
    interleaved: hl.constexpr,
    has_bias: hl.constexpr,
    activation: hl.constexpr,
    keep_gate_up: hl.constexpr,
) -> torch.Tensor:
    if nk_layout:
        E, N2, K = W.shape
    else:
        E, K, N2 = W.shape
    K = hl.specialize(K)
    N2 = hl.specialize(N2)
    I = N2 // 2  # noqa: E741
    T = A.shape[0]
    num_blocks, block_t = sorted_pair_ids.shape
    block_t = hl.specialize(block_t)
    half_t = block_t // 2
    half_ids = sorted_pair_ids.reshape(num_blocks * 2, half_t)
    num_pairs = T * top_k
    W_rows = W.reshape(E * N2, K) if nk_layout else W.reshape(E * K, N2)
    H = torch.empty(num_pairs, I, dtype=A.dtype, device=A.device)
    block_n = hl.register_block_size(I)
    block_k = hl.register_block_size(K)  # one K tile for both paths' loops
    for tile_b, tile_n in hl.tile([num_blocks, I], block_size=[1, block_n]):
        e = block_expert_ids[tile_b.begin]
        if e < E:
            gate_cols, up_cols = gate_up_columns(tile_n, I, interleaved)
            if half_ids[2 * tile_b.begin + 1, 0] >= num_pairs:
                pairs_h = half_ids[2 * tile_b.begin, :]
                valid_h = pairs_h < num_pairs
                safe_pairs_h = torch.where(valid_h, pairs_h, 0)
                rows_h = safe_pairs_h // top_k
                gate_h = hl.zeros([half_t, tile_n], dtype=torch.float32)
                up_h = hl.zeros([half_t, tile_n], dtype=torch.float32)
                for tile_k_h in hl.tile(K, block_size=block_k):
                    A_frag_h = A[rows_h, tile_k_h]
                    if nk_layout:
                        gate_frag_h = W_rows[e * N2 + gate_cols, tile_k_h].T
                        up_frag_h = W_rows[e * N2 + up_cols, tile_k_h].T
                    else:
                        gate_frag_h = W_rows[e * K + tile_k_h.index, gate_cols]
                        up_frag_h = W_rows[e * K + tile_k_h.index, up_cols]
                    gate_h = torch.addmm(gate_h, A_frag_h, gate_frag_h)
                    up_h = torch.addmm(up_h, A_frag_h, up_frag_h)
                hidden_h = gated_product(gate_h, up_h, activation)
                hl.store(
                    H, [safe_pairs_h, tile_n], hidden_h.to(H.dtype), extra_mask=valid_h[:, None]
                )
            else:
                pairs = sorted_pair_ids[tile_b.begin, :]
                valid = pairs < num_pairs
                safe_pairs = torch.where(valid, pairs, 0)
                rows = safe_pairs // top_k
                gate = hl.zeros([block_t, tile_n], dtype=torch.float32)
                up = hl.zeros([block_t, tile_n], dtype=torch.float32)
                for tile_k in hl.tile(K, block_size=block_k):
                    A_frag = A[rows, tile_k]
                    if nk_layout:
                        gate_frag = W_rows[e * N2 + gate_cols, tile_k].T
                        up_frag = W_rows[e * N2 + up_cols, tile_k].T
                    else:
                        gate_frag = W_rows[e * K + tile_k.index, gate_cols]
                        up_frag = W_rows[e * K + tile_k.index, up_cols]
                    gate = torch.addmm(gate, A_frag, gate_frag)
                    up = torch.addmm(up, A_frag, up_frag)
                hidden = gated_product(gate, up, activation)
                hl.store(H, [safe_pairs, tile_n], hidden.to(H.dtype), extra_mask=valid[:, None])
    return H
