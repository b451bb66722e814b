"""The combine (notebook 08): each token's k weighted pair rows summed in float32, in a fixed
order, and rounded once, in one pass over the rows. A pair whose expert id lies outside [0, E)
adds nothing: under expert parallelism it is another rank's (notebook 12), and the flat kernels
leave its row unwritten."""

from __future__ import annotations

import helion
import helion.language as hl
import torch

from ..launch import sizes_of_one

__all__ = ["sum_pair_rows"]


# Taught in notebook 08, which prints this source.
@helion.kernel(static_shapes=False, key=sizes_of_one)
def sum_pair_rows(
    pair_rows: torch.Tensor,  # [T, k, N] each pair's weighted output
    pair_experts: torch.Tensor,  # [T, k] integer expert of each pair (read if skip_outside)
    plus: torch.Tensor,  # [T, N] float32 added before the rounding (read if has_plus)
    experts: torch.Tensor,  # [E] only its size is used
    skip_outside: hl.constexpr,  # leave out the pairs whose expert lies outside [0, E)
    has_plus: hl.constexpr,
) -> torch.Tensor:  # [T, N], pair_rows' dtype
    """Row t of the result is the sum over j of pair_rows[t, j] (with ``skip_outside``, only
    where pair_experts[t, j] lies in [0, E)), plus plus[t], rounded once to pair_rows' dtype."""
    T, k, N = pair_rows.shape
    k = hl.specialize(k)
    E = experts.size(0)
    out = torch.empty([T, N], dtype=pair_rows.dtype, device=pair_rows.device)
    for tile_t, tile_n in hl.tile([T, N]):
        total = hl.zeros([tile_t, tile_n], dtype=torch.float32)
        for j in hl.static_range(k):
            rows = pair_rows[tile_t, j, tile_n].to(torch.float32)
            if skip_outside:  # the row may be unwritten: selected away, never multiplied
                expert = pair_experts[tile_t, j]
                rows = torch.where(((expert >= 0) & (expert < E))[:, None], rows, 0.0)
            total = total + rows
        if has_plus:
            total = total + plus[tile_t, tile_n]
        out[tile_t, tile_n] = total.to(out.dtype)
    return out
