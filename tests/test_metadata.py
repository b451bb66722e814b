"""The block-aligned routing metadata: the torch-ops reference and the two Helion kernels."""

import moe_helpers as mh
from helion_moe import metadata

import helion
import pytest
import torch


@pytest.mark.parametrize(
    "expert_ids, num_experts, block_t",
    [
        (mh.route_uniform(100, 6, seed=2), 6, 16),
        (mh.route_zipf(257, 16, 1.5, seed=3), 16, 32),  # some experts empty
        (torch.zeros(5, dtype=torch.int64, device=mh.DEVICE), 1, 16),
        (torch.tensor([3], device=mh.DEVICE), 4, 64),
        (mh.route_top_k(torch.randn(40, 8).to(mh.DEVICE), 3)[0], 8, 16),  # [T, k] routing
    ],
)
def test_aligned_routing_puts_every_pair_once_in_a_block_of_its_expert(
    expert_ids, num_experts, block_t
):
    routing = mh.align_to_blocks(expert_ids, num_experts, block_t)
    pair_experts = expert_ids.flatten().long()
    P = pair_experts.numel()
    num_blocks = mh.max_blocks(P, num_experts, block_t)
    assert routing.sorted_pair_ids.shape == (num_blocks, block_t)
    assert routing.block_expert_ids.shape == (num_blocks,)
    assert routing.sorted_pair_ids.dtype == routing.block_expert_ids.dtype == torch.int32
    slots = routing.sorted_pair_ids.long()
    valid = slots < P
    assert ((slots == P) | valid).all(), "padding is P, nothing else"
    assert torch.equal(slots[valid].sort().values, torch.arange(P, device=slots.device))
    block_experts = routing.block_expert_ids.long()
    # each pair sits in a block of its own expert, in token order inside the expert
    row_of_slot = torch.arange(num_blocks, device=slots.device)[:, None].expand_as(slots)
    assert torch.equal(block_experts[row_of_slot[valid]], pair_experts[slots[valid]])
    for e in range(num_experts):
        pairs = slots[valid & (block_experts[:, None] == e)]
        assert torch.equal(pairs, pairs.sort().values)
    # blocks in use come first, each holds a pair, and only unused blocks have expert E
    load = mh.expert_load(expert_ids, num_experts)
    used = int(((load + block_t - 1) // block_t).sum())
    assert (block_experts[:used] < num_experts).all() and (
        block_experts[used:] == num_experts
    ).all()
    assert valid[:used].any(dim=1).all() and not valid[used:].any()
    assert torch.equal(block_experts[:used], block_experts[:used].sort().values)


def _assert_metadata_kernels_match_the_reference(expert_ids, num_experts, block_t, run_blocks=1):
    routing = mh.align_to_blocks(expert_ids, num_experts, block_t, run_blocks)
    reference = mh.align_to_blocks_reference(expert_ids, num_experts, block_t, run_blocks)
    assert torch.equal(routing.sorted_pair_ids, reference.sorted_pair_ids)
    assert torch.equal(routing.block_expert_ids, reference.block_expert_ids)
    assert routing.all_placed.tolist() == reference.all_placed.tolist() == [1]


@pytest.mark.parametrize(
    "num_pairs, num_experts, block_t, skew",
    [
        (1, 1, 16, 0.0),
        (2, 8, 16, 0.0),
        (128, 5, 16, 0.0),  # exactly one chunk of the count and place kernels
        (129, 5, 32, 2.0),  # a second chunk of one pair
        (1000, 64, 16, 1.2),  # many chunks, experts left empty
        (700, 130, 64, 0.0),  # more experts than one expert tile of the count kernel
        (3000, 3, 128, 0.4),  # more chunks than one tile of place_pairs' loop over chunks
        (600, 256, 16, 1.0),  # the last count with the full step of pairs
        (900, 384, 16, 1.0),  # Kimi-K2's experts: half the step, fewer blocks per chunk
        (1200, 512, 64, 0.0),  # Qwen3-Next's
        (800, 1024, 16, 1.2),  # MAX_METADATA_EXPERTS: a step of 16 pairs
    ],
)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_metadata_kernels_sort_as_the_torch_reference_does(
    num_pairs, num_experts, block_t, skew, dtype
):
    expert_ids = mh.route_zipf(num_pairs, num_experts, skew, seed=num_pairs).to(dtype)
    _assert_metadata_kernels_match_the_reference(expert_ids, num_experts, block_t)


@pytest.mark.parametrize(
    "num_pairs, num_experts, block_t",
    [(3000, 3, 128), (5000, 256, 16), (20000, 40, 64), (6000, 512, 16)],
)
def test_metadata_kernels_sort_right_with_the_gpus_chunks(
    num_pairs, num_experts, block_t, monkeypatch
):
    # On a GPU the chunks aim at METADATA_PROGRAMS = 256 programs, so they are smaller: here
    # one block per chunk (3000 pairs in blocks of 128), and many chunks of a few steps.
    monkeypatch.setattr(metadata, "METADATA_PROGRAMS", 256)
    expert_ids = mh.route_zipf(num_pairs, num_experts, 1.0, seed=num_experts)
    _assert_metadata_kernels_match_the_reference(expert_ids, num_experts, block_t)


@pytest.mark.parametrize(
    "num_pairs, num_experts, block_t, run_blocks, skew",
    [
        (1, 1, 16, 4, 0.0),
        (128, 5, 16, 4, 0.0),
        (1000, 64, 16, 4, 1.2),  # experts left empty, runs of 1 to many groups
        (3000, 3, 128, 2, 0.4),
        (900, 384, 16, 4, 1.0),  # fewer blocks per chunk than a group: runs cross chunks
    ],
)
def test_expert_runs_in_whole_groups_of_blocks(num_pairs, num_experts, block_t, run_blocks, skew):
    expert_ids = mh.route_zipf(num_pairs, num_experts, skew, seed=num_pairs + run_blocks)
    _assert_metadata_kernels_match_the_reference(expert_ids, num_experts, block_t, run_blocks)
    routing = mh.align_to_blocks(expert_ids, num_experts, block_t, run_blocks)
    slots, experts = routing.sorted_pair_ids.long(), routing.block_expert_ids.long()
    assert len(experts) == mh.max_blocks(num_pairs, num_experts, block_t, run_blocks)
    valid = slots < num_pairs
    assert torch.equal(slots[valid].sort().values, torch.arange(num_pairs, device=slots.device))
    # a block holds pairs exactly when it has an expert; each expert's first block starts a
    # group of run_blocks, and no group holds two experts
    assert torch.equal(valid.any(dim=1), experts < num_experts)
    load = mh.expert_load(expert_ids, num_experts)
    groups = experts[: len(experts) // run_blocks * run_blocks].view(-1, run_blocks)
    for e in torch.nonzero(load).flatten().tolist():
        blocks = torch.nonzero(experts == e).flatten()
        assert blocks[0] % run_blocks == 0 and len(blocks) == -(-int(load[e]) // block_t)
        with_e = groups[(groups == e).any(dim=1)]
        assert ((with_e == e) | (with_e == num_experts)).all()


def test_max_blocks_in_groups_of_one_is_the_plain_bound():
    for P in (0, 1, 7, 100, 1000):
        for E in (1, 3, 64, 2000):
            for block_t in (16, 128):
                plain = min(P, (P + E * (block_t - 1)) // block_t)
                assert mh.max_blocks(P, E, block_t) == mh.max_blocks(P, E, block_t, 1) == plain


@pytest.mark.parametrize("num_experts", [1, 8, 256, 384, mh.MAX_METADATA_EXPERTS])
def test_metadata_chunks_are_powers_of_two_holding_whole_blocks(num_experts):
    E_tile = helion.next_power_of_2(num_experts)
    for num_slots in (16, 1000, 10**6):
        for block_t in (16, 128):
            chunk = mh.metadata_chunk(num_slots, block_t, num_experts)
            assert chunk & (chunk - 1) == 0 and chunk % block_t == 0
            assert min(mh.METADATA_STEP, block_t) <= chunk <= max(block_t, mh.MAX_METADATA_CHUNK)
            assert mh.num_metadata_chunks(num_slots, chunk) * chunk >= num_slots
            # a place program's [blocks, experts] tile stays within METADATA_TILE elements
            assert chunk == block_t or chunk // block_t * E_tile <= mh.METADATA_TILE


def test_metadata_kernels_sort_top_k_routing_as_the_torch_reference_does():
    expert_ids, _ = mh.route_top_k(torch.randn(300, 16).to(mh.DEVICE), 4)  # [T, k]
    _assert_metadata_kernels_match_the_reference(expert_ids, 16, 32)


def test_metadata_kernels_leave_out_expert_ids_out_of_range():
    # 2**32 + 1 and 2**31 would read as 1 and as negative in int32
    expert_ids = torch.tensor([0, 3, -1, 1, 2**32 + 1, 2, 1, 2**31, 7], device=mh.DEVICE)
    valid = (expert_ids >= 0) & (expert_ids < 3)
    num_pairs, num_valid = expert_ids.numel(), int(valid.sum())
    routing = mh.align_to_blocks(expert_ids, 3, 16)
    # renumber the placed pairs 0, 1, 2... as the reference numbers the valid ones, and padding
    renumbered = torch.full((num_pairs + 1,), num_valid, device=mh.DEVICE)
    renumbered[:num_pairs][valid] = torch.arange(num_valid, device=mh.DEVICE)
    placed = renumbered[routing.sorted_pair_ids.long()]
    reference = mh.align_to_blocks_reference(expert_ids[valid], 3, 16)
    assert torch.equal(placed, reference.sorted_pair_ids.long())
    assert torch.equal(routing.block_expert_ids, reference.block_expert_ids)
    assert routing.all_placed.tolist() == [0]


@pytest.mark.parametrize(
    "expert_ids, num_experts, error, message",
    [
        (torch.zeros(4), 3, TypeError, "expert_ids must be an integer tensor"),
        (torch.zeros(4, dtype=torch.int64), 0, ValueError, "num_experts .* is 0"),
        (torch.zeros(4, dtype=torch.int64), 1025, ValueError, "takes 1 to 1024 experts"),
    ],
)
def test_metadata_refuses_what_its_kernels_cannot_take(expert_ids, num_experts, error, message):
    with pytest.raises(error, match=message):
        mh.align_to_blocks(expert_ids.to(mh.DEVICE), num_experts, 16)


def test_metadata_refuses_routings_whose_slots_int32_cannot_number():
    # 2**31 - 2**16 pairs fit int32, but not once 256 experts pad their runs to 4 blocks of 128;
    # the ids are one element seen 2**31 - 2**16 times, so nothing that size is allocated
    expert_ids = torch.zeros(1, dtype=torch.int32, device=mh.DEVICE).expand(2**31 - 2**16)
    with pytest.raises(ValueError, match=r"expert_ids routes 2147418112 .* numbers slots in int32"):
        mh.align_to_blocks(expert_ids, 256, 128, run_blocks=4)
