"""The flat schedule: one program per (block of one expert's pairs, N tile) over all experts at
once, on the block-aligned routing (``helion_moe.metadata``). ``moe_matmul_flat`` is the MoE
matmul (notebook 07, top-k in notebook 08); ``moe_gate_up_flat`` is the first GEMM of a gated MLP
expert with its activation fused into the epilogue (notebook 10).
"""

from __future__ import annotations

import helion
import helion.language as hl
import torch

from ..launch import sizes_of_one
from .activations import gate_up_columns, gated_product

__all__ = ["moe_gate_up_flat", "moe_matmul_flat"]


# Taught in notebook 07, which prints this source.
@helion.kernel(static_shapes=False, key=sizes_of_one)
def moe_matmul_flat(
    A: torch.Tensor,  # [T, K] input activations
    W: torch.Tensor,  # [E, K, N] expert weights, or [E, N, K] when nk_layout
    sorted_pair_ids: torch.Tensor,  # [num_blocks, block_t] pairs grouped by expert, P = padding
    block_expert_ids: torch.Tensor,  # [num_blocks] expert of each block, E = unused block
    combine_weights: torch.Tensor,  # [T, k] float32 weight of each token's k experts
    nk_layout: hl.constexpr,  # W is stored [E, N, K], nn.Linear's [out, in] (transformers')
    half_tails: hl.constexpr = False,  # a block whose second half is padding runs half as tall
) -> torch.Tensor:  # [T, k, N] each pair's weighted expert output
    """The block-aligned flat schedule: one program per (block of one expert's pairs, N tile).

    The grid covers every expert's row blocks at once, so all SMs work whatever the routing.
    Each program gathers its block's rows of A, multiplies them by its expert's W with fp32
    accumulation, scales each row by its combine weight and stores only the valid rows. The
    token block is part of the data layout (``align_to_blocks``), so ``block_t`` is read from
    ``sorted_pair_ids``' shape, and the config's block sizes are the N and K tiles only.
    ``nk_layout`` is a compile-time flag: the weights are read in place in either layout
    (``expert_weights_in_place``), a [K tile, N tile] slice of [E, K, N] or the transpose of an
    [N tile, K tile] slice of [E, N, K]. With ``half_tails``, a block whose second half holds no
    pair runs with tiles of ``block_t / 2`` rows: half the tensor-core work, the same W tiles.
    """
    if nk_layout:
        E, N, K = W.shape
    else:
        E, K, N = W.shape
    # The weights' K and N are fixed per layer, so they are compiled in (one kernel per layer
    # shape; tokens stay dynamic): loads along K and N need no bounds masks when the tiles
    # divide them.
    K = hl.specialize(K)
    N = hl.specialize(N)
    T, top_k = combine_weights.shape
    top_k = hl.specialize(top_k)
    num_blocks, block_t = sorted_pair_ids.shape
    block_t = hl.specialize(block_t)
    num_pairs = T * top_k
    # A 2-D view of the rows of W: Helion 1.4 fails to compile W[e, tile_k, tile_n] when e is
    # loaded from memory
    W_rows = W.reshape(E * N, K) if nk_layout else W.reshape(E * K, N)
    pair_weights = combine_weights.view(num_pairs)
    C = torch.empty(num_pairs, N, dtype=A.dtype, device=A.device)
    half_t = block_t // 2
    block_n = hl.register_block_size(N)
    block_k = hl.register_block_size(K)  # one K tile for both loops below
    for tile_b, tile_n in hl.tile([num_blocks, N], block_size=[1, block_n]):
        e = block_expert_ids[tile_b.begin]
        if e < E:
            if half_tails and sorted_pair_ids[tile_b.begin, half_t] >= num_pairs:
                # the expert's last block, at most half full (a block's pairs come first, so
                # slot half_t is padding only if all after it are): a tile of half_t rows.
                # Helion gives a name set in both branches one type: names of another shape
                # get an _h twin
                pairs_h = sorted_pair_ids[tile_b.begin, :half_t]
                valid_h = pairs_h < num_pairs
                safe_pairs_h = torch.where(valid_h, pairs_h, 0)
                rows_h = safe_pairs_h // top_k
                acc_h = hl.zeros([half_t, tile_n], dtype=torch.float32)
                for tile_k in hl.tile(K, block_size=block_k):
                    if nk_layout:
                        W_frag = W_rows[e * N + tile_n.index, tile_k].T
                    else:
                        W_frag = W_rows[e * K + tile_k.index, tile_n]
                    acc_h = torch.addmm(acc_h, A[rows_h, tile_k], W_frag)
                acc_h = acc_h * pair_weights[safe_pairs_h][:, None]
                hl.store(C, [safe_pairs_h, tile_n], acc_h.to(C.dtype), extra_mask=valid_h[:, None])
            else:
                pairs = sorted_pair_ids[tile_b.begin, :]  # [block_t]
                valid = pairs < num_pairs
                safe_pairs = torch.where(valid, pairs, 0)
                rows = safe_pairs // top_k  # the token of each pair
                acc = hl.zeros([block_t, tile_n], dtype=torch.float32)
                for tile_k in hl.tile(K, block_size=block_k):
                    A_frag = A[rows, tile_k]
                    if nk_layout:
                        W_frag = W_rows[e * N + tile_n.index, tile_k].T
                    else:
                        W_frag = W_rows[e * K + tile_k.index, tile_n]
                    acc = torch.addmm(acc, A_frag, W_frag)
                acc = acc * pair_weights[safe_pairs][:, None]
                hl.store(C, [safe_pairs, tile_n], acc.to(C.dtype), extra_mask=valid[:, None])
    return C.view(T, top_k, N)


# Taught in notebook 10, which prints this source.
@helion.kernel(static_shapes=False, key=sizes_of_one)
def moe_gate_up_flat(
    A: torch.Tensor,  # [T, K] input activations
    W: torch.Tensor,  # [E, K, 2I] gate columns then up columns, or [E, 2I, K] when nk_layout
    sorted_pair_ids: torch.Tensor,  # [num_blocks, block_t] pairs grouped by expert, P = padding
    block_expert_ids: torch.Tensor,  # [num_blocks] expert of each block, E = unused block
    gate_up: torch.Tensor,  # [P, 2, I] written when keep_gate_up (else any [0, 2, I] tensor)
    bias: torch.Tensor,  # [E, 2I] in W's column order, read when has_bias (else any tensor)
    top_k: hl.constexpr,  # experts per token: pair p is token p // top_k
    nk_layout: hl.constexpr,  # W is stored [E, 2I, K], transformers' gate_up_proj
    interleaved: hl.constexpr,  # gate and up columns alternate: gate 2n, up 2n + 1 (gpt-oss)
    has_bias: hl.constexpr,  # add bias to gate and up before the activation
    activation: hl.constexpr,  # a GatedActivation, as a tuple
    keep_gate_up: hl.constexpr,  # also store gate and up themselves, for the backward
    half_tails: hl.constexpr = False,  # as in moe_matmul_flat
) -> torch.Tensor:  # [P, I] act(gate) * up of each pair, unweighted
    """The first GEMM of a gated MLP expert with its activation fused: ``act(A W_gate) * (A W_up)``.

    The flat schedule of ``moe_matmul_flat``, with the same routing, over the I columns of
    the result: each program computes two [block_t, N tile] accumulators, one against the
    expert's gate weights (columns n of W) and one against its up weights (columns I + n;
    with ``interleaved``, columns 2n and 2n + 1), adds the bias of those columns, and stores
    ``act(gate) * up`` (``gated_product``). Without ``keep_gate_up`` (inference)
    the [P, 2I] product of the two never exists in memory; with it (training) the kernel also
    stores gate and up, which the backward's activation derivative needs. With ``half_tails``
    an expert's last block, when at most half full, runs at half height as in
    ``moe_matmul_flat``, except on the one-accumulator path of interleaved [E, K, 2I] weights
    (``slab``): with a half path of two accumulators over their alternate columns, the layer
    at gpt-oss-120b's size took 1.4-2.3x its time on an H100.
    """
    if nk_layout:
        E, N2, K = W.shape
    else:
        E, K, N2 = W.shape
    K = hl.specialize(K)
    N2 = hl.specialize(N2)
    I = N2 // 2  # noqa: E741 (the course's name for the intermediate size)
    T = A.shape[0]
    num_blocks, block_t = sorted_pair_ids.shape
    block_t = hl.specialize(block_t)
    num_pairs = T * top_k
    W_rows = W.reshape(E * N2, K) if nk_layout else W.reshape(E * K, N2)
    bias_rows = bias.reshape(-1)  # [E * 2I], a 1-D view as W_rows
    H = torch.empty(num_pairs, I, dtype=A.dtype, device=A.device)
    slab = interleaved and not nk_layout  # gate and up columns side by side in each K row
    half_t = block_t // 2
    block_n = hl.register_block_size(I)
    block_k = hl.register_block_size(K)  # one K tile for every loop below
    for tile_b, tile_n in hl.tile([num_blocks, I], block_size=[1, block_n]):
        e = block_expert_ids[tile_b.begin]
        if e < E:
            if half_tails and not slab and sorted_pair_ids[tile_b.begin, half_t] >= num_pairs:
                # the expert's last block, at most half full, as in moe_matmul_flat
                pairs_h = sorted_pair_ids[tile_b.begin, :half_t]
                valid_h = pairs_h < num_pairs
                safe_pairs_h = torch.where(valid_h, pairs_h, 0)
                rows_h = safe_pairs_h // top_k
                gate_cols, up_cols = gate_up_columns(tile_n, I, interleaved)
                gate_h = hl.zeros([half_t, tile_n], dtype=torch.float32)
                up_h = hl.zeros([half_t, tile_n], dtype=torch.float32)
                for tile_k in hl.tile(K, block_size=block_k):
                    A_frag_h = A[rows_h, tile_k]
                    if nk_layout:
                        gate_frag = W_rows[e * N2 + gate_cols, tile_k].T
                        up_frag = W_rows[e * N2 + up_cols, tile_k].T
                    else:
                        gate_frag = W_rows[e * K + tile_k.index, gate_cols]
                        up_frag = W_rows[e * K + tile_k.index, up_cols]
                    gate_h = torch.addmm(gate_h, A_frag_h, gate_frag)
                    up_h = torch.addmm(up_h, A_frag_h, up_frag)
                if has_bias:
                    gate_h = gate_h + bias_rows[e * N2 + gate_cols].to(torch.float32)[None, :]
                    up_h = up_h + bias_rows[e * N2 + up_cols].to(torch.float32)[None, :]
                if keep_gate_up:
                    mask_h = valid_h[:, None]
                    hl.store(
                        gate_up, [safe_pairs_h, 0, tile_n], gate_h.to(H.dtype), extra_mask=mask_h
                    )
                    hl.store(
                        gate_up, [safe_pairs_h, 1, tile_n], up_h.to(H.dtype), extra_mask=mask_h
                    )
                hidden_h = gated_product(gate_h, up_h, activation)
                hl.store(
                    H, [safe_pairs_h, tile_n], hidden_h.to(H.dtype), extra_mask=valid_h[:, None]
                )
            else:
                pairs = sorted_pair_ids[tile_b.begin, :]  # [block_t]
                valid = pairs < num_pairs
                safe_pairs = torch.where(valid, pairs, 0)
                rows = safe_pairs // top_k
                if slab:
                    # gate and up of tile_n are the 2 * block_n contiguous columns from 2n: one
                    # accumulator over them, split into gate (even) and up (odd) after the K loop
                    cols = 2 * tile_n.begin + hl.arange(2 * block_n)
                    inside = cols < N2
                    both = hl.zeros([block_t, 2 * block_n], dtype=torch.float32)
                    for tile_k in hl.tile(K, block_size=block_k):
                        W_frag = hl.load(W_rows, [e * K + tile_k.index, cols], extra_mask=inside)
                        both = torch.addmm(both, A[rows, tile_k], W_frag)
                    if has_bias:
                        b = hl.load(bias_rows, [e * N2 + cols], extra_mask=inside)
                        both = both + b.to(torch.float32)[None, :]
                    gate, up = hl.split(both.reshape([block_t, block_n, 2]))
                else:
                    gate_cols, up_cols = gate_up_columns(tile_n, I, interleaved)
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
                    if has_bias:
                        gate = gate + bias_rows[e * N2 + gate_cols].to(torch.float32)[None, :]
                        up = up + bias_rows[e * N2 + up_cols].to(torch.float32)[None, :]
                if keep_gate_up:
                    mask = valid[:, None]
                    hl.store(gate_up, [safe_pairs, 0, tile_n], gate.to(H.dtype), extra_mask=mask)
                    hl.store(gate_up, [safe_pairs, 1, tile_n], up.to(H.dtype), extra_mask=mask)
                hidden = gated_product(gate, up, activation)
                hl.store(H, [safe_pairs, tile_n], hidden.to(H.dtype), extra_mask=valid[:, None])
    return H
