"""Sorting tokens by expert: counts, offsets and a stable permutation."""

import moe_helpers as mh

import pytest
import torch


@pytest.mark.parametrize(
    "expert_ids, num_experts",
    [
        (mh.route_uniform(100, 6, seed=2), 6),
        (mh.route_zipf(257, 16, 1.5, seed=3), 16),  # some experts empty
        (torch.zeros(5, dtype=torch.int64, device=mh.DEVICE), 1),
        (torch.tensor([3], device=mh.DEVICE), 4),
        (torch.tensor([2, 0, 2, 1, 0, 2], dtype=torch.int32, device=mh.DEVICE), 3),
    ],
)
def test_sort_invariants(expert_ids, num_experts):
    s = mh.sort_tokens_by_expert(expert_ids, num_experts)
    T = expert_ids.numel()
    for tensor in (s.expert_token_counts, s.expert_token_offsets, s.sorted_to_orig_token_idx):
        assert tensor.dtype == torch.int32 and tensor.device == expert_ids.device
    counts = s.expert_token_counts.long()
    offsets = s.expert_token_offsets.long()
    perm = s.sorted_to_orig_token_idx.long()
    assert torch.equal(counts, torch.bincount(expert_ids.long(), minlength=num_experts))
    assert offsets[0] == 0 and offsets[-1] == T
    assert torch.equal(offsets.diff(), counts)
    assert s.max_tokens_per_expert == int(counts.max())
    # a bijection of [0, T)
    assert torch.equal(perm.sort().values, torch.arange(T, device=perm.device))
    # grouped by expert, in the order of the offsets
    sorted_ids = expert_ids.long()[perm]
    for e in range(num_experts):
        assert (sorted_ids[offsets[e] : offsets[e + 1]] == e).all()
        # stable: tokens keep their original order inside an expert
        assert (perm[offsets[e] : offsets[e + 1]].diff() > 0).all()


def test_kernel_args_carry_max_tokens_per_expert_as_a_size():
    ids = torch.tensor([1, 1, 1, 0, 2], device=mh.DEVICE)
    A = torch.randn(5, 4, device=mh.DEVICE)
    W = torch.randn(3, 4, 2, device=mh.DEVICE)
    args = mh.sort_tokens_by_expert(ids, 3).kernel_args(A, W)
    assert args[0] is A and args[1] is W
    assert [a.tolist() for a in args[2:5]] == [[1, 3, 1], [0, 1, 4, 5], [3, 0, 1, 2, 4]]
    assert args[5].shape == (3,)
