"""Sorting: the tokens grouped by expert, as the seed's per-expert kernels read them (notebook 02).

A stable argsort, per-expert counts and offsets, and the dummy tensor whose size carries the
largest expert's token count; nothing here makes the host wait for the GPU.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["ExpertSort", "sort_tokens_by_expert"]


@dataclasses.dataclass(frozen=True)
class ExpertSort:
    """Tokens grouped by expert: what the OGS kernels need besides A and W.

    Expert e owns sorted positions ``expert_token_offsets[e] : expert_token_offsets[e + 1]``;
    sorted position s holds the original token ``sorted_to_orig_token_idx[s]``.

    Taught in notebook 02.
    """

    expert_token_counts: torch.Tensor  # [E] int32
    expert_token_offsets: torch.Tensor  # [E + 1] int32, starts at 0, ends at T
    sorted_to_orig_token_idx: torch.Tensor  # [T] int32

    @property
    def max_tokens_per_expert(self) -> int:
        """The largest count, read on the host: a device-to-host synchronisation, paid only
        by code that asks for it (the OGS kernels' arguments do)."""
        return int(self.expert_token_counts.max())

    def kernel_args(
        self,
        A: torch.Tensor,  # [T, K]
        W: torch.Tensor,  # [E, K, N]
    ) -> tuple[torch.Tensor, ...]:
        """The six arguments of the OGS kernels, in the seed's order.

        The last one is an empty tensor whose *length* is the largest expert's token count:
        a kernel compiled with ``static_shapes=False`` reads it as a size, so the same compiled
        code serves every routing.
        """
        max_tokens_per_expert_tensor = torch.empty(self.max_tokens_per_expert, device=A.device)
        return (
            A,
            W,
            self.expert_token_counts,
            self.expert_token_offsets,
            self.sorted_to_orig_token_idx,
            max_tokens_per_expert_tensor,
        )


def sort_tokens_by_expert(
    expert_ids: torch.Tensor,  # [T] integer
    num_experts: int,
) -> ExpertSort:
    """Stable sort of the tokens by expert, with per-expert counts and offsets.

    The sort is stable so that tokens keep their original order inside each expert, which
    makes the permutation reproducible (and cache-friendly: neighbouring tokens stay close).
    Nothing here waits for the GPU: counting with ``scatter_add_`` rather than
    ``torch.bincount`` avoids the host read that CUDA's ``bincount`` makes to size its output,
    and ``max_tokens_per_expert`` is read only when asked for.

    Taught in notebook 02.
    """
    expert_ids = expert_ids.long()
    sorted_to_orig_token_idx = torch.argsort(expert_ids, stable=True).to(torch.int32)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=expert_ids.device)
    counts.scatter_add_(0, expert_ids, torch.ones_like(expert_ids, dtype=torch.int32))
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=expert_ids.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return ExpertSort(counts, offsets, sorted_to_orig_token_idx)
