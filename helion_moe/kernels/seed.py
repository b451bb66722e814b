"""The seed's per-expert kernels (notebook 04): one program per expert over a [max tokens, N]
grid of tiles; the seed kernel exactly as Helion's ``moe_matmul_ogs`` example wrote it, with its
racing store, and the same kernel with that store masked. ``seed_schedule`` counts the tiles
their grid walks (notebooks 04 and 05).
"""

from __future__ import annotations

import dataclasses
import math

import helion
import helion.language as hl
import torch

__all__ = ["SeedSchedule", "moe_matmul_ogs", "moe_matmul_ogs_masked_store", "seed_schedule"]


# Taught in notebook 04, which prints this source.
@helion.kernel(static_shapes=False)
def moe_matmul_ogs(
    A: torch.Tensor,  # [T, K] input activations
    W: torch.Tensor,  # [E, K, N] expert weights
    expert_token_counts: torch.Tensor,  # [E] tokens per expert
    expert_token_offsets: torch.Tensor,  # [E + 1] first sorted position of each expert
    sorted_to_orig_token_idx: torch.Tensor,  # [T] sorted position -> original token
    max_T_per_expert_tensor: torch.Tensor,  # [max_T_per_expert] only its size is used
) -> torch.Tensor:  # [T, N]
    """The seed kernel, as Helion's ``moe_matmul_ogs`` example wrote it.

    One program per expert; each walks [max tokens per expert, N] in tiles, gathers its
    tokens' rows of A, multiplies by the expert's W with fp32 accumulation, and writes the
    rows back with a masked read-modify-write. Kept exactly as written: notebook 04 shows that
    this store races when an expert has fewer tokens than the token tile and than the largest
    expert (``seed_store_race_rows``).
    """
    T, K = A.shape
    E, _, N = W.shape
    max_T_per_expert = max_T_per_expert_tensor.numel()
    C = torch.zeros(T, N, dtype=torch.promote_types(A.dtype, W.dtype), device=A.device)
    for e_idx in hl.grid(E):
        start = expert_token_offsets[e_idx]
        num_tokens = expert_token_counts[e_idx]
        if num_tokens != 0:
            for tile_t, tile_n in hl.tile([max_T_per_expert, N]):
                local_token_offsets = tile_t.index
                token_valid = local_token_offsets < num_tokens
                local_token_offsets_valid = torch.where(token_valid, local_token_offsets, 0)
                expert_sorted_token_indices = start + local_token_offsets_valid
                expert_orig_token_indices = sorted_to_orig_token_idx[
                    expert_sorted_token_indices.squeeze(0)
                ]
                acc = hl.zeros([tile_t, tile_n], dtype=torch.float32)
                for tile_k in hl.tile(K):
                    A_frag = A[expert_orig_token_indices, tile_k]
                    W_frag = W[e_idx, tile_k, tile_n]
                    acc = torch.addmm(acc, A_frag, W_frag)
                block_T, block_N = acc.size()
                existing_values = C[expert_orig_token_indices, tile_n]
                mask_2d = token_valid.view(block_T, 1).expand(block_T, block_N)
                C[expert_orig_token_indices, tile_n] = torch.where(
                    mask_2d, acc.to(C.dtype), existing_values
                )
    return C


# Taught in notebook 04, which prints this source.
@helion.kernel(static_shapes=False)
def moe_matmul_ogs_masked_store(
    A: torch.Tensor,  # [T, K] input activations
    W: torch.Tensor,  # [E, K, N] expert weights
    expert_token_counts: torch.Tensor,  # [E] tokens per expert
    expert_token_offsets: torch.Tensor,  # [E + 1] first sorted position of each expert
    sorted_to_orig_token_idx: torch.Tensor,  # [T] sorted position -> original token
    max_T_per_expert_tensor: torch.Tensor,  # [max_T_per_expert] only its size is used
) -> torch.Tensor:  # [T, N]
    """The seed kernel with its racing store fixed: masked-off lanes write nothing.

    Everything up to the store is the seed's. The seed pointed masked-off lanes at the expert's
    first token and had them write back the old value in the same store in which the valid
    lane for that token writes the new one; here ``hl.store``'s ``extra_mask`` drops those
    lanes, so each element of C is written by exactly one lane, and C is never read.
    """
    T, K = A.shape
    E, _, N = W.shape
    max_T_per_expert = max_T_per_expert_tensor.numel()
    C = torch.zeros(T, N, dtype=torch.promote_types(A.dtype, W.dtype), device=A.device)
    for e_idx in hl.grid(E):
        start = expert_token_offsets[e_idx]
        num_tokens = expert_token_counts[e_idx]
        if num_tokens != 0:
            for tile_t, tile_n in hl.tile([max_T_per_expert, N]):
                local_token_offsets = tile_t.index
                token_valid = local_token_offsets < num_tokens
                local_token_offsets_valid = torch.where(token_valid, local_token_offsets, 0)
                expert_sorted_token_indices = start + local_token_offsets_valid
                expert_orig_token_indices = sorted_to_orig_token_idx[
                    expert_sorted_token_indices.squeeze(0)
                ]
                acc = hl.zeros([tile_t, tile_n], dtype=torch.float32)
                for tile_k in hl.tile(K):
                    A_frag = A[expert_orig_token_indices, tile_k]
                    W_frag = W[e_idx, tile_k, tile_n]
                    acc = torch.addmm(acc, A_frag, W_frag)
                hl.store(
                    C,
                    [expert_orig_token_indices, tile_n],
                    acc.to(C.dtype),
                    extra_mask=token_valid[:, None],
                )
    return C


@dataclasses.dataclass(frozen=True)
class SeedSchedule:
    """The work of the per-expert grid of the OGS kernels, counted in output tiles.

    Taught in notebook 04.
    """

    programs: int  # launched: one per expert (those without tokens exit at once)
    tiles_per_program: int  # token tiles x N tiles that every busy program walks, one by one
    useful_tiles: int  # tiles, over all programs, holding at least one valid token


def seed_schedule(
    expert_token_counts: torch.Tensor,  # [E]
    N: int,
    block_t: int,
    block_n: int,
) -> SeedSchedule:
    """Count the tiles of the seed's grid: each busy expert walks ceil(max_T / block_t) token
    tiles by ceil(N / block_n) column tiles, however few tokens it has.

    Taught in notebook 04.
    """
    counts = expert_token_counts.long().cpu()
    n_tiles = math.ceil(N / block_n)
    return SeedSchedule(
        programs=len(counts),
        tiles_per_program=math.ceil(int(counts.max()) / block_t) * n_tiles,
        useful_tiles=int((counts + block_t - 1).div(block_t, rounding_mode="floor").sum())
        * n_tiles,
    )
