"""The flat FP8 kernels with their dots' operands swapped, for decode (``fp8_probe.py
decode_swapped``): each K step computes ``W_tile @ A_tile.T``, a [N tile, token block] product,
instead of ``A_tile @ W_tile``. At one token a block holds 16 rows of which at most 2 are pairs;
a Hopper warpgroup's MMA is 64 rows tall, so with the token block as the dot's rows the tensor
core runs a 16-row instruction form, while with W's N tile as the rows (128) it runs the 64-row
form with the 16 tokens as its narrow side (the "swap AB" of small-batch GEMM libraries).

Same arguments and results as ``moe_matmul_flat_fp8`` and ``moe_gate_up_flat_fp8``
(helion_moe/kernels/fp8.py), so the probe can put them in the layer's place; the package
kernels' half-height tails are left out (the layer runs them only with 128-row blocks, never at
decode's 16; the probe asserts that its configs' token block is 16), and the gate_up kernel takes
up's columns as whole scale blocks only (the probe's models have I % 128 == 0).
"""

import moe_helpers as mh

import helion
import helion.language as hl
import torch


@helion.kernel(static_shapes=False, key=mh.sizes_of_one)
def moe_matmul_flat_fp8_swapped(
    A: torch.Tensor,  # [T, K] e4m3
    A_scales: torch.Tensor,  # [T, ceil(K / 128)] float32
    W: torch.Tensor,  # [E, K, N] e4m3, or [E, N, K] when nk_layout
    W_scales: torch.Tensor,  # [E, K / 128, N / 128] float32, or [E, N / 128, K / 128]
    sorted_pair_ids: torch.Tensor,  # [num_blocks, block_t]
    block_expert_ids: torch.Tensor,  # [num_blocks]
    combine_weights: torch.Tensor,  # [T, k] float32
    nk_layout: hl.constexpr,
    half_tails: hl.constexpr = False,  # must be False: no half-height branch here
) -> torch.Tensor:  # [T, k, N] bfloat16
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
    scale_list = W_scales.reshape(-1)
    pair_weights = combine_weights.view(num_pairs)
    C = torch.empty(num_pairs, N, dtype=torch.bfloat16, device=A.device)
    block_n = hl.register_block_size(N)
    block_k = hl.register_block_size(K)
    for tile_b, tile_n in hl.tile([num_blocks, N], block_size=[1, block_n]):
        e = block_expert_ids[tile_b.begin]
        if e < E:
            n_block = tile_n.begin // mh.FP8_GROUP
            pairs = sorted_pair_ids[tile_b.begin, :]
            valid = pairs < num_pairs
            safe_pairs = torch.where(valid, pairs, 0)
            rows = safe_pairs // top_k
            acc = hl.zeros([tile_n, block_t], dtype=torch.float32)  # C's tile, transposed
            for tile_k in hl.tile(K, block_size=block_k):
                k_block = tile_k.begin // mh.FP8_GROUP
                if nk_layout:
                    W_frag = W_rows[e * N + tile_n.index, tile_k]  # [N tile, K tile]
                    W_scale = scale_list[(e * n_blocks + n_block) * k_blocks + k_block]
                else:
                    W_frag = W_rows[e * K + tile_k.index, tile_n].T
                    W_scale = scale_list[(e * k_blocks + k_block) * n_blocks + n_block]
                scale = A_scales[rows, k_block][None, :] * W_scale  # [1, block_t]
                acc = acc + hl.dot(W_frag, A[rows, tile_k].T) * scale
            out = acc.T * pair_weights[safe_pairs][:, None]
            hl.store(C, [safe_pairs, tile_n], out.to(C.dtype), extra_mask=valid[:, None])
    return C.view(T, top_k, N)


@helion.kernel(static_shapes=False, key=mh.sizes_of_one)
def moe_gate_up_flat_fp8_swapped(
    A: torch.Tensor,  # [T, K] e4m3
    A_scales: torch.Tensor,  # [T, ceil(K / 128)] float32
    W: torch.Tensor,  # [E, K, 2I] e4m3, or [E, 2I, K] (nk_layout)
    W_scales: torch.Tensor,  # [E, K / 128, 2I / 128] float32, or [E, 2I / 128, K / 128]
    sorted_pair_ids: torch.Tensor,  # [num_blocks, block_t]
    block_expert_ids: torch.Tensor,  # [num_blocks]
    top_k: hl.constexpr,
    nk_layout: hl.constexpr,
    activation: hl.constexpr,  # a GatedActivation, as a tuple
    up_aligned: hl.constexpr,  # must be True: I % 128 == 0
    half_tails: hl.constexpr = False,  # must be False: no half-height branch here
) -> tuple[torch.Tensor, torch.Tensor]:  # [P, I] e4m3; [P, ceil(I / 128)] float32
    if nk_layout:
        E, N2, K = W.shape
        _, n_blocks, k_blocks = W_scales.shape
    else:
        E, K, N2 = W.shape
        _, k_blocks, n_blocks = W_scales.shape
    K = hl.specialize(K)
    N2 = hl.specialize(N2)
    I = N2 // 2  # noqa: E741
    T = A.shape[0]
    num_blocks, block_t = sorted_pair_ids.shape
    block_t = hl.specialize(block_t)
    num_pairs = T * top_k
    W_rows = W.reshape(E * N2, K) if nk_layout else W.reshape(E * K, N2)
    scale_list = W_scales.reshape(-1)
    H = torch.empty(num_pairs, I, dtype=mh.FP8_DTYPE, device=A.device)
    H_scales = torch.empty(
        num_pairs, (I + mh.FP8_GROUP - 1) // mh.FP8_GROUP, dtype=torch.float32, device=A.device
    )
    block_n = hl.register_block_size(I)
    block_k = hl.register_block_size(K)
    for tile_b, tile_n in hl.tile([num_blocks, I], block_size=[1, block_n]):
        e = block_expert_ids[tile_b.begin]
        if e < E:
            gate_cols, up_cols = tile_n.index, I + tile_n.index
            gate_block = tile_n.begin // mh.FP8_GROUP
            up_block = (I + tile_n.begin) // mh.FP8_GROUP
            pairs = sorted_pair_ids[tile_b.begin, :]
            valid = pairs < num_pairs
            safe_pairs = torch.where(valid, pairs, 0)
            rows = safe_pairs // top_k
            gate = hl.zeros([tile_n, block_t], dtype=torch.float32)  # transposed, as above
            up = hl.zeros([tile_n, block_t], dtype=torch.float32)
            for tile_k in hl.tile(K, block_size=block_k):
                k_block = tile_k.begin // mh.FP8_GROUP
                A_frag_t = A[rows, tile_k].T  # [K tile, block_t]
                A_scale = A_scales[rows, k_block][None, :]  # [1, block_t]
                if nk_layout:
                    gate_frag = W_rows[e * N2 + gate_cols, tile_k]
                    up_frag = W_rows[e * N2 + up_cols, tile_k]
                    gate_scale = scale_list[(e * n_blocks + gate_block) * k_blocks + k_block]
                    up_scale = scale_list[(e * n_blocks + up_block) * k_blocks + k_block]
                else:
                    gate_frag = W_rows[e * K + tile_k.index, gate_cols].T
                    up_frag = W_rows[e * K + tile_k.index, up_cols].T
                    gate_scale = scale_list[(e * k_blocks + k_block) * n_blocks + gate_block]
                    up_scale = scale_list[(e * k_blocks + k_block) * n_blocks + up_block]
                gate = gate + hl.dot(gate_frag, A_frag_t) * (A_scale * gate_scale)
                up = up + hl.dot(up_frag, A_frag_t) * (A_scale * up_scale)
            q, scale = mh.quantize_groups(mh.gated_product(gate.T, up.T, activation))
            hl.store(H, [safe_pairs, tile_n], q, extra_mask=valid[:, None])
            hl.store(H_scales, [safe_pairs, tile_n.id], scale, extra_mask=valid)
    return H, H_scales
