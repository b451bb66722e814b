"""The backward's kernels (notebook 11): the weight gradient, a grouped GEMM ragged along each
expert's pairs; ``moe_matmul``'s input gradient with the combine weights' gradient in its
epilogue; and the gated activation's backward, an elementwise pass after the layer's
down-projection input gradient.
"""

from __future__ import annotations

import helion
import helion.language as hl
import torch

from ..launch import sizes_of_one
from .activations import gated_product_grads

__all__ = ["gated_activation_backward", "moe_matmul_input_backward", "moe_weight_grad"]


# Taught in notebook 11, which prints this source.
@helion.kernel(static_shapes=False, key=sizes_of_one)
def moe_weight_grad(
    A: torch.Tensor,  # [T, K] the forward's input rows ([P, K], one per pair, if a_by_pair)
    grad_out: torch.Tensor,  # [T, N] the gradient of the output ([P, N] if grad_by_pair)
    sorted_pair_ids: torch.Tensor,  # [num_blocks, block_t] the pairs aligned to blocks
    expert_block_offsets: torch.Tensor,  # [E + 1] int32 first block of each expert
    combine_weights: torch.Tensor,  # [T, k] float32 weight of each pair
    a_by_pair: hl.constexpr,  # A has a row per pair (the layer's intermediate), not per token
    grad_by_pair: hl.constexpr,  # grad_out has a row per pair
    weighted: hl.constexpr,  # scale each pair by its weight (else every weight is one)
) -> torch.Tensor:  # [E, K, N] the gradient of the expert weights
    """dW[e] = sum over expert e's pairs p of w_p * A[p]^T grad_out[p]: a grouped GEMM whose
    groups are ragged along its reduction dimension, the pairs. (A row "of pair p" is the
    row of its token, p // k, unless the flags say that the tensor has one row per pair.)

    The forward's schedule splits the tokens into blocks and keeps the weights whole; here the
    output is one expert's [K, N] and the pairs are what is summed over, so the grid is (K tile,
    N tile, expert) and each program walks its expert's blocks of the aligned routing
    (``expert_block_offsets[e]`` to ``[e + 1]``, a data-dependent loop), adding ``A_block^T @
    (w * grad_block)`` in float32. Padding slots load zeros. Unweighted, both loads feed the
    dot directly (nothing is computed on them in registers first). An expert without pairs
    walks no block and stores zeros; the order of the sum is fixed, so the result is the same
    on every run. The config's block sizes are the K and N tiles.
    """
    K = hl.specialize(A.shape[1])
    N = hl.specialize(grad_out.shape[1])
    T, top_k = combine_weights.shape
    top_k = hl.specialize(top_k)
    E = expert_block_offsets.shape[0] - 1
    hl.specialize(sorted_pair_ids.shape[1])  # a block's slots are loaded whole
    num_pairs = T * top_k
    pair_weights = combine_weights.view(num_pairs)
    dW = torch.empty(E, K, N, dtype=A.dtype, device=A.device)
    # The expert is the grid's slowest dimension, so programs that run at the same time share
    # their expert's rows of A and grad_out in L2.
    for tile_k, tile_n, tile_e in hl.tile([K, N, E], block_size=[None, None, 1]):
        first = expert_block_offsets[tile_e.begin]
        last = expert_block_offsets[tile_e.begin + 1]
        acc = hl.zeros([tile_k, tile_n], dtype=torch.float32)
        for tile_b in hl.tile(first, last, block_size=1):
            pairs = sorted_pair_ids[tile_b.begin, :]  # [block_t]
            valid = pairs < num_pairs
            safe_pairs = torch.where(valid, pairs, 0)
            a_rows = safe_pairs // top_k  # the pair's token
            if a_by_pair:
                a_rows = safe_pairs
            grad_rows = safe_pairs // top_k
            if grad_by_pair:
                grad_rows = safe_pairs
            a_block = hl.load(A, [a_rows, tile_k], extra_mask=valid[:, None])
            grad = hl.load(grad_out, [grad_rows, tile_n], extra_mask=valid[:, None])
            if weighted:
                scale = pair_weights[safe_pairs]
                grad = (grad.to(torch.float32) * scale[:, None]).to(A.dtype)
            acc = torch.addmm(acc, a_block.T, grad)
        dW[tile_e.begin, tile_k, tile_n] = acc.to(dW.dtype)
    return dW


@helion.kernel(static_shapes=False, key=sizes_of_one)
def moe_matmul_input_backward(
    grad_out: torch.Tensor,  # [T, N] the gradient of moe_matmul's output, A's dtype
    W: torch.Tensor,  # [E, K, N] the forward's weights, or [E, N, K] when nk_layout
    sorted_pair_ids: torch.Tensor,  # [num_blocks, block_t] the pairs aligned to blocks
    block_expert_ids: torch.Tensor,  # [num_blocks]
    combine_weights: torch.Tensor,  # [T, k] float32 weight w of each pair
    nk_layout: hl.constexpr,  # W is stored [E, N, K] (expert_weights_in_place)
    A: torch.Tensor,  # [T, K] the forward's input
) -> tuple[torch.Tensor, torch.Tensor]:
    """dA's rows and the combine weights' gradient of ``moe_matmul``, in one launch.

    The flat schedule over the K columns of W^T: each program multiplies its block's rows of
    the output gradient (one per pair, its token's row) by its expert's transposed weights,
    read in place, giving g_p = grad_out[t] W_e^T, and its epilogue loads the same tile of
    the token's row of A. It returns two tensors:

    - [T, k, K] w * g_p, each pair's share of dA (summed over the token's pairs afterwards);
    - [P, K tiles] each K tile's share of <g_p, A[t]>, the combine weight's gradient
      dw_p = <grad_out[t], A[t] W_e>, summed over the tiles afterwards (a fixed order).

    Taught in notebook 11.
    """
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
    num_pairs = T * top_k
    pair_weights = combine_weights.view(num_pairs)
    W_rows = W.reshape(E * N, K) if nk_layout else W.reshape(E * K, N)
    rows = torch.empty(num_pairs, K, dtype=grad_out.dtype, device=grad_out.device)
    block_k = hl.register_block_size(K)
    d_weight_parts = torch.empty(
        num_pairs, (K + block_k - 1) // block_k, dtype=torch.float32, device=grad_out.device
    )
    for tile_b, tile_k in hl.tile([num_blocks, K], block_size=[1, block_k]):
        e = block_expert_ids[tile_b.begin]
        if e < E:
            pairs = sorted_pair_ids[tile_b.begin, :]
            valid = pairs < num_pairs
            safe_pairs = torch.where(valid, pairs, 0)
            tokens = safe_pairs // top_k
            acc = hl.zeros([block_t, tile_k], dtype=torch.float32)
            for tile_n in hl.tile(N):
                grad_frag = grad_out[tokens, tile_n]
                if nk_layout:
                    W_frag = W_rows[e * N + tile_n.index, tile_k]
                else:
                    W_frag = W_rows[e * K + tile_k.index, tile_n].T
                acc = torch.addmm(acc, grad_frag, W_frag)
            mask = valid[:, None]
            a = hl.load(A, [tokens, tile_k], extra_mask=mask).to(torch.float32)
            hl.store(
                d_weight_parts, [safe_pairs, tile_k.id], (acc * a).sum(dim=1), extra_mask=valid
            )
            weighted = acc * pair_weights[safe_pairs][:, None]
            hl.store(rows, [safe_pairs, tile_k], weighted.to(rows.dtype), extra_mask=mask)
    return rows.view(T, top_k, K), d_weight_parts


@helion.kernel(static_shapes=False, key=sizes_of_one)
def gated_activation_backward(
    grad_h: torch.Tensor,  # [P, I] the gradient of each pair's h = act(gate) * up, unweighted
    gate_up: torch.Tensor,  # [P, 2, I] the forward's gate and up (moe_gate_up_flat keeps them)
    combine_weights: torch.Tensor,  # [T, k] float32 weight w of each pair, T k = P
    activation: hl.constexpr,  # a GatedActivation, as a tuple
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gated activation's backward, one elementwise pass over the pairs' rows.

    grad_h = grad_out[t] W_down^T is the down projection's input gradient before the pair's
    weight (the flat kernel computes it, unweighted). Each program loads a tile of it and the
    same tile of the forward's gate and up, and applies the weight w and the derivative
    (``gated_product_grads``): with dh = w grad_h, d gate = dh * up * act'(gate) and
    d up = dh * act(gate), for plain SwiGLU. It returns three tensors:

    - [P, 2I] d(gate, up), side by side, the gradient of the first GEMM's output;
    - [P, I] w * h, the down projection's input as the layer weighted it, so that the down
      weights' gradient is an unweighted ``moe_weight_grad``;
    - [P, I tiles] each I tile's share of <grad_h, h>, the combine weight's gradient, summed
      over the tiles afterwards (a fixed order, unlike atomic adds).

    The config's block sizes are [I tile, pair rows]: the I tile is registered first.

    Taught in notebook 11.
    """
    P, I = grad_h.shape  # noqa: E741 (the course's name for the intermediate size)
    I = hl.specialize(I)  # noqa: E741
    pair_weights = combine_weights.view(P)
    # [P, 2, I] is [P, 2I] with the gate half first; a store at columns I + n of a [P, 2I]
    # tensor miscompiles in Helion 1.4 (it broadcasts the rows into a third dimension)
    d_gate_up = torch.empty(P, 2, I, dtype=grad_h.dtype, device=grad_h.device)
    weighted_hidden = torch.empty(P, I, dtype=grad_h.dtype, device=grad_h.device)
    block_n = hl.register_block_size(I)
    d_weight_parts = torch.empty(
        P, (I + block_n - 1) // block_n, dtype=torch.float32, device=grad_h.device
    )
    for tile_p, tile_n in hl.tile([P, I], block_size=[None, block_n]):
        gate = gate_up[tile_p, 0, tile_n].to(torch.float32)
        up = gate_up[tile_p, 1, tile_n].to(torch.float32)
        grad = grad_h[tile_p, tile_n].to(torch.float32)
        weight = pair_weights[tile_p][:, None]
        h, d_gate, d_up = gated_product_grads(gate, up, grad * weight, activation)
        d_gate_up[tile_p, 0, tile_n] = d_gate.to(grad_h.dtype)
        d_gate_up[tile_p, 1, tile_n] = d_up.to(grad_h.dtype)
        weighted_hidden[tile_p, tile_n] = (h * weight).to(grad_h.dtype)
        d_weight_parts[tile_p, tile_n.id] = (grad * h).sum(dim=1)
    return d_gate_up.view(P, 2 * I), weighted_hidden, d_weight_parts
