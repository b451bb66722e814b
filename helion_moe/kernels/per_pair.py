"""The per-pair schedule for a handful of pairs: one program per (pair, N tile), no routing
metadata, one launch where the flat path needs three (notebook 07, and the layer's decode path
in notebook 10).
"""

from __future__ import annotations

import helion
import helion.language as hl
import torch

from ..launch import sizes_of_one
from .activations import gate_up_columns, gated_product

__all__ = ["moe_gate_up_per_pair", "moe_matmul_per_pair"]


# Taught in notebook 07, which prints this source.
@helion.kernel(static_shapes=False, key=sizes_of_one)
def moe_matmul_per_pair(
    A: torch.Tensor,  # [T, K] input activations
    W: torch.Tensor,  # [E, K, N] expert weights, or [E, N, K] when nk_layout
    pair_experts: torch.Tensor,  # [T, k] integer expert of each (token, expert) pair
    combine_weights: torch.Tensor,  # [T, k] float32 weight of each pair
    placed: torch.Tensor,  # [T * k] int32, written: 1 where the pair's expert id is in [0, E)
    nk_layout: hl.constexpr,  # as in moe_matmul_flat
) -> torch.Tensor:  # [T, k, N] each pair's weighted expert output, zero outside [0, E)
    """For a handful of pairs: one program per (pair, N tile), no routing metadata at all.

    Each program reads its pair's expert id and multiplies its token's row of A by that
    expert's [K, N tile] weights on the CUDA cores (one row is too few for a tensor core): it
    accumulates the products of each K tile elementwise in a [K tile, N tile] float32 tile and
    sums over K once, at the end, then scales the row by the pair's combine weight. It is one
    launch where the flat path needs three, which is what counts when the host's launches, not
    the GPU, set the pace (decode called from Python); but pairs of the same expert each read
    its weights, so it loses to the flat kernel as soon as pairs share experts or the GPU is the
    limit.
    """
    if nk_layout:
        E, N, K = W.shape
    else:
        E, K, N = W.shape
    K = hl.specialize(K)
    N = hl.specialize(N)
    T, top_k = pair_experts.shape
    top_k = hl.specialize(top_k)
    num_pairs = T * top_k
    W_rows = W.reshape(E * N, K) if nk_layout else W.reshape(E * K, N)  # as in moe_matmul_flat
    experts = pair_experts.reshape(num_pairs)
    weights = combine_weights.reshape(num_pairs)
    C = torch.empty(num_pairs, N, dtype=A.dtype, device=A.device)
    block_k = hl.register_block_size(K)
    for tile_p, tile_n in hl.tile([num_pairs, N], block_size=[1, None]):
        pair = tile_p.begin
        e = experts[pair]
        valid = (e >= 0) & (e < E)
        placed[pair] = valid.to(torch.int32)  # every N tile writes the same flag
        if valid:
            acc = hl.zeros([block_k, tile_n], dtype=torch.float32)
            for tile_k in hl.tile(K, block_size=block_k):
                a = A[pair // top_k, tile_k].to(torch.float32)
                if nk_layout:
                    w_tile = W_rows[e * N + tile_n.index, tile_k].T.to(torch.float32)
                else:
                    w_tile = W_rows[e * K + tile_k.index, tile_n].to(torch.float32)
                acc = acc + a[:, None] * w_tile
            C[pair, tile_n] = (acc.sum(0) * weights[pair]).to(C.dtype)
        else:  # another rank's pair (expert_id_check="sentinels") adds a zero row
            C[pair, tile_n] = hl.zeros([tile_n], dtype=C.dtype)
    return C.view(T, top_k, N)


@helion.kernel(static_shapes=False, key=sizes_of_one)
def moe_gate_up_per_pair(
    A: torch.Tensor,  # [T, K] input activations
    W: torch.Tensor,  # [E, K, 2I] gate columns then up columns, or [E, 2I, K] when nk_layout
    pair_experts: torch.Tensor,  # [T, k] integer expert of each (token, expert) pair
    placed: torch.Tensor,  # [T * k] int32, written: 1 where the pair's expert id is in [0, E)
    gate_up: torch.Tensor,  # [T * k, 2, I] written when keep_gate_up (else any [0, 2, I])
    bias: torch.Tensor,  # [E, 2I] in W's column order, read when has_bias (else any tensor)
    nk_layout: hl.constexpr,  # as in moe_gate_up_flat
    interleaved: hl.constexpr,  # as in moe_gate_up_flat
    has_bias: hl.constexpr,  # as in moe_gate_up_flat
    activation: hl.constexpr,  # a GatedActivation, as a tuple
    keep_gate_up: hl.constexpr,  # as in moe_gate_up_flat
) -> torch.Tensor:  # [T * k, I] act(gate) * up of each pair, unweighted
    """``moe_gate_up_flat`` for a handful of pairs, scheduled as ``moe_matmul_per_pair``: one
    program per (pair, N tile of I), no routing metadata, two [K tile, N tile] float32
    accumulators (gate and up) on the CUDA cores, each summed over K once at the end, the bias
    added, and ``act(gate) * up`` stored (and gate and up with ``keep_gate_up``).

    Taught in notebook 10.
    """
    if nk_layout:
        E, N2, K = W.shape
    else:
        E, K, N2 = W.shape
    K = hl.specialize(K)
    N2 = hl.specialize(N2)
    I = N2 // 2  # noqa: E741
    T, top_k = pair_experts.shape
    top_k = hl.specialize(top_k)
    num_pairs = T * top_k
    W_rows = W.reshape(E * N2, K) if nk_layout else W.reshape(E * K, N2)
    bias_rows = bias.reshape(-1)
    experts = pair_experts.reshape(num_pairs)
    H = torch.empty(num_pairs, I, dtype=A.dtype, device=A.device)
    block_k = hl.register_block_size(K)
    block_n = hl.register_block_size(I)
    for tile_p, tile_n in hl.tile([num_pairs, I], block_size=[1, block_n]):
        pair = tile_p.begin
        e = experts[pair]
        valid = (e >= 0) & (e < E)
        placed[pair] = valid.to(torch.int32)  # every N tile writes the same flag
        if valid:
            gate_cols, up_cols = gate_up_columns(tile_n, I, interleaved)
            if interleaved and not nk_layout:
                # as in moe_gate_up_flat: the 2 * block_n contiguous columns from 2n, one
                # accumulator over them, split into gate (even) and up (odd) after the K loop
                cols = 2 * tile_n.begin + hl.arange(2 * block_n)
                inside = cols < N2
                both_acc = hl.zeros([block_k, 2 * block_n], dtype=torch.float32)
                for tile_k in hl.tile(K, block_size=block_k):
                    a = A[pair // top_k, tile_k].to(torch.float32)[:, None]
                    w = hl.load(W_rows, [e * K + tile_k.index, cols], extra_mask=inside[None, :])
                    both_acc = both_acc + a * w.to(torch.float32)
                gate, up = hl.split(both_acc.sum(0).reshape([block_n, 2]))
            else:
                gate_acc = hl.zeros([block_k, tile_n], dtype=torch.float32)
                up_acc = hl.zeros([block_k, tile_n], dtype=torch.float32)
                for tile_k in hl.tile(K, block_size=block_k):
                    a = A[pair // top_k, tile_k].to(torch.float32)[:, None]
                    if nk_layout:
                        gate_w = W_rows[e * N2 + gate_cols, tile_k].T
                        up_w = W_rows[e * N2 + up_cols, tile_k].T
                    else:
                        gate_w = W_rows[e * K + tile_k.index, gate_cols]
                        up_w = W_rows[e * K + tile_k.index, up_cols]
                    gate_acc = gate_acc + a * gate_w.to(torch.float32)
                    up_acc = up_acc + a * up_w.to(torch.float32)
                gate = gate_acc.sum(0)
                up = up_acc.sum(0)
            if has_bias:
                gate = gate + bias_rows[e * N2 + gate_cols].to(torch.float32)
                up = up + bias_rows[e * N2 + up_cols].to(torch.float32)
            if keep_gate_up:
                gate_up[pair, 0, tile_n] = gate.to(H.dtype)
                gate_up[pair, 1, tile_n] = up.to(H.dtype)
            H[pair, tile_n] = gated_product(gate, up, activation).to(H.dtype)
    return H
