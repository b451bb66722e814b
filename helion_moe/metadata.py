"""The block-aligned routing metadata of the flat schedule (notebook 06).

The (token, expert) pairs grouped by expert and each expert's run padded to whole token
blocks: first in PyTorch ops (``align_to_blocks_reference``, the readable version and the test
oracle), then as a counting sort in two Helion kernels that never make the host wait
(``align_to_blocks``), with the constants that size their chunks beside the rule that reads them.
"""

from __future__ import annotations

import dataclasses

import helion
import helion.language as hl
import torch

from .launch import INT32_MAX, expert_weights_in_place, run_kernel, sizes_of_one
from .mode import DEVICE, ON_GPU

__all__ = [
    "MAX_METADATA_CHUNK",
    "MAX_METADATA_EXPERTS",
    "METADATA_CONFIG",
    "METADATA_PROGRAMS",
    "METADATA_STEP",
    "METADATA_TILE",
    "BlockAlignedRouting",
    "align_to_blocks",
    "align_to_blocks_reference",
    "check_integer_ids",
    "comparable_expert_ids",
    "count_experts_per_chunk",
    "max_blocks",
    "metadata_chunk",
    "num_metadata_chunks",
    "place_pairs",
]


@dataclasses.dataclass(frozen=True)
class BlockAlignedRouting:
    """Token-expert pairs grouped by expert, each expert's run padded to whole token blocks.

    With top-k routing token t sends k pairs, numbered ``t * k + j`` for its j-th expert (top-1:
    the pair number is the token). Row b of ``sorted_pair_ids`` is one block of ``block_t``
    pairs, all routed to expert ``block_expert_ids[b]``; slots past an expert's last pair hold
    P, the number of pairs, which no pair has. With ``run_blocks`` > 1 each expert's run is a
    whole number of groups of that many blocks, so that an L2 group of the flat kernels' programs
    (``l2_groupings``) never holds two experts' blocks; blocks of a run that hold no pair are
    unused. The number of blocks is a bound known without reading the routing, so blocks past
    the last expert's run are left over. An unused block's expert id is E: the kernel skips it.
    ``all_placed`` is 1 when every pair was placed, 0 when some expert id lay outside [0, E):
    such a pair has no slot.

    Taught in notebook 06.
    """

    sorted_pair_ids: torch.Tensor  # [num_blocks, block_t] int32, pair index or P (padding)
    block_expert_ids: torch.Tensor  # [num_blocks] int32, expert of each block or E (unused)
    all_placed: torch.Tensor  # [1] int32, 1 if every pair has a slot

    def kernel_args(
        self,
        A: torch.Tensor,  # [T, K]
        W: torch.Tensor,  # [E, K, N], either layout (expert_weights_in_place)
        pair_weights: torch.Tensor,  # [T, k] float32
    ) -> tuple[torch.Tensor | bool, ...]:
        """The six arguments of ``moe_matmul_flat``."""
        stored, nk_layout = expert_weights_in_place(W)
        return A, stored, self.sorted_pair_ids, self.block_expert_ids, pair_weights, nk_layout

    def expert_block_offsets(self, num_experts: int) -> torch.Tensor:  # [E + 1] int32
        """Where each expert's blocks start (its blocks are consecutive), and the end of the
        last one: counted with ``scatter_add_``, so the host does not wait."""
        block_experts = self.block_expert_ids.long()
        counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=block_experts.device)
        counts.scatter_add_(0, block_experts, torch.ones_like(block_experts, dtype=torch.int32))
        offsets = torch.zeros_like(counts)
        offsets[1:] = torch.cumsum(counts[:num_experts], 0)
        return offsets


def max_blocks(num_pairs: int, num_experts: int, block_t: int, run_blocks: int = 1) -> int:
    """Most blocks a routing of ``num_pairs`` pairs can fill: each expert with a pair (at most
    min(E, P) of them) pads its run with at most ``block_t * run_blocks - 1`` slots.

    Taught in notebook 06.
    """
    most_padding = min(num_experts, num_pairs) * (block_t * run_blocks - 1)
    return (num_pairs + most_padding) // block_t


# Taught in notebook 06, which prints this source.
def align_to_blocks_reference(
    expert_ids: torch.Tensor,  # [T] or [T, k] integer
    num_experts: int,
    block_t: int,
    run_blocks: int = 1,
) -> BlockAlignedRouting:
    """``align_to_blocks`` in PyTorch tensor ops: the readable version, and the one it is checked
    against.

    Device-side ops only, so the GPU never waits for the host: the counts come from
    ``scatter_add_``, each pair's slot is its expert's padded start plus its rank inside the
    expert, and each block's expert is found by ``searchsorted`` in the padded ends (E for a
    block past its expert's pairs, which ``run_blocks`` > 1 leaves). A few dozen small ops,
    each a launch, so on a GPU it costs what the host takes to issue them.
    """
    pair_experts = expert_ids.flatten().long()  # [P]
    num_pairs, device = pair_experts.numel(), pair_experts.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, pair_experts, torch.ones_like(pair_experts))
    run = block_t * run_blocks  # each expert's run is a whole number of these
    padded_counts = (counts + run - 1) // run * run
    padded_ends = torch.cumsum(padded_counts, 0)
    order = torch.argsort(pair_experts, stable=True)  # pairs in sorted order
    sorted_experts = pair_experts[order]
    rank = (
        torch.arange(num_pairs, device=device) - (torch.cumsum(counts, 0) - counts)[sorted_experts]
    )
    slots = (padded_ends - padded_counts)[sorted_experts] + rank
    num_blocks = max_blocks(num_pairs, num_experts, block_t, run_blocks)
    sorted_pair_ids = torch.full(
        (num_blocks * block_t,), num_pairs, dtype=torch.int32, device=device
    )
    sorted_pair_ids[slots] = order.to(torch.int32)
    block_starts = torch.arange(num_blocks, device=device) * block_t
    block_experts = torch.searchsorted(padded_ends, block_starts, right=True)
    pairs_ends = torch.cat([padded_ends - padded_counts + counts, padded_ends.new_zeros(1)])
    unused = block_starts >= pairs_ends[block_experts]  # past the last expert, or its pairs
    block_expert_ids = torch.where(unused, num_experts, block_experts).to(torch.int32)
    all_placed = ((pair_experts >= 0) & (pair_experts < num_experts)).to(torch.int32).min()
    return BlockAlignedRouting(
        sorted_pair_ids.view(num_blocks, block_t), block_expert_ids, all_placed.view(1)
    )


# The routing metadata as a counting sort by expert, in two Helion kernels (count, then place).
# Both split the slots into chunks of C (``metadata_chunk``): count program c reads chunk c of the
# pairs' ids in their own integer dtype, counts them per expert and writes them back as int32, -1
# for an id outside [0, E) and past the last pair, into whole chunks; place program c reads those
# (no pair past P to mask, whatever P's divisibility), places chunk c of the pairs and fills chunk
# c of the slots. Each program walks its chunk in steps of pairs, so what a program holds at once
# is a [step, E] tile however large the chunk: METADATA_STEP pairs up to 256 experts, fewer past
# that, so that no tile of pairs (or of a chunk's blocks) by experts holds more than METADATA_TILE
# elements. Expert ids outside [0, E) are counted nowhere and placed nowhere, so a bad id never
# sends a kernel outside its tensors; a flag says whether every pair was placed, and moe_matmul
# checks it. A place program holds all E experts in one tile and reads every chunk's counts, so E
# is bounded: up to MAX_METADATA_EXPERTS, where the step is down to 16 pairs.
METADATA_CONFIG = helion.Config(num_warps=4, num_stages=1)


METADATA_STEP = 64


METADATA_TILE = 64 * 256  # METADATA_STEP pairs by 256 experts, the tile that ran on an H200


MAX_METADATA_CHUNK = 1024


MAX_METADATA_EXPERTS = 1024


# How many programs the chunks aim at: about two per SM of an H200 on a GPU; on the CPU few,
# since the interpreter's cost is per program and per tile operation.
METADATA_PROGRAMS = 256 if ON_GPU else 4


def metadata_chunk(num_slots: int, block_t: int, num_experts: int) -> int:
    """Slots (and pairs) per metadata program: a power of two from METADATA_STEP to
    MAX_METADATA_CHUNK that makes about METADATA_PROGRAMS chunks, and at least one block. Past
    256 experts, fewer blocks per chunk, so that a [blocks, E] tile holds at most
    METADATA_TILE elements.

    Taught in notebook 06.
    """
    target = helion.next_power_of_2(-(-num_slots // METADATA_PROGRAMS))
    most_blocks = max(1, METADATA_TILE // helion.next_power_of_2(num_experts))
    largest = min(MAX_METADATA_CHUNK, most_blocks * block_t)
    return max(block_t, min(largest, max(METADATA_STEP, target)))


def num_metadata_chunks(num_slots: int, chunk: int) -> int:
    """Chunks of ``chunk`` slots (a routing has at least as many slots as pairs), at least two:
    Helion 1.4 reads a dimension of size 1 as if every row of a tile were row 0 (unmasked),
    which would count one chunk many times.

    Taught in notebook 06.
    """
    return max(2, -(-num_slots // chunk))


# Taught in notebook 06, which prints this source.
@helion.kernel(config=METADATA_CONFIG, static_shapes=False, key=sizes_of_one)
def count_experts_per_chunk(
    pair_experts: torch.Tensor,  # [P] integer expert of each pair
    chunk_counts: torch.Tensor,  # [num_chunks, E] int32, written
    chunk_experts: torch.Tensor,  # [num_chunks, C] int32, written: each pair's expert, or -1
) -> None:
    """Count, per chunk of C pairs, the pairs routed to each expert (ids in [0, E) only), and
    write each pair's expert as int32 for ``place_pairs`` (-1: outside [0, E), or no pair)."""
    (P,) = pair_experts.shape
    num_chunks, E = chunk_counts.shape
    E = hl.specialize(E)
    C = hl.specialize(chunk_experts.size(1))
    step = min(METADATA_STEP, C, METADATA_TILE // helion.next_power_of_2(E))
    for tile_c, tile_e in hl.tile([num_chunks, E], block_size=[1, helion.next_power_of_2(E)]):
        counts = hl.zeros([tile_e], dtype=torch.int32)
        for tile_s in hl.tile(C, block_size=step):
            pair = tile_c.begin * C + tile_s.index
            in_range = pair < P  # chunks past the pairs count nothing
            experts = hl.load(pair_experts, [pair], extra_mask=in_range)
            valid = in_range & (experts >= 0) & (experts < E)
            expert = torch.where(valid, experts, -1).to(torch.int32)  # -1: counted nowhere
            chunk_experts[tile_c.begin, tile_s] = expert
            hits = expert[:, None] == tile_e.index[None, :]
            counts = counts + hits.sum(0, dtype=torch.int32)
        chunk_counts[tile_c.begin, tile_e] = counts


# Taught in notebook 06, which prints this source.
@helion.kernel(config=METADATA_CONFIG, static_shapes=False, key=sizes_of_one)
def place_pairs(
    pair_experts: torch.Tensor,  # [P] only its size is used: the pairs
    chunk_experts: torch.Tensor,  # [num_chunks, C] int32 from count_experts_per_chunk
    chunk_counts: torch.Tensor,  # [num_chunks, E] int32 from count_experts_per_chunk
    block_expert_ids: torch.Tensor,  # [num_chunks, C // block_t] int32, written: expert or E
    sorted_pair_ids: torch.Tensor,  # [num_chunks, C] int32, written: pair or P (padding)
    all_placed: torch.Tensor,  # [1] int32, written: 1 if every pair's id was in [0, E)
    run_blocks: hl.constexpr,  # each expert's run is a multiple of this many blocks
) -> None:
    """Program c places chunk c's pairs and fills chunk c's slots.

    From all the counts it finds each expert's run (its total padded to whole groups of
    ``run_blocks`` blocks, laid out in expert order) and where chunk c's pairs of each expert
    start (the run's start plus the pairs of earlier chunks). It gives each of its blocks an
    expert (the number of runs that end at or before the block; E if the block starts past that
    expert's pairs) and writes P into the slots past that expert's pairs. Then it walks its
    pairs' experts (the count kernel's int32 copy) in steps: each pair goes to its expert's next
    free slot, after the pairs of the same expert earlier in the step, so the sort is stable.
    """
    (P,) = pair_experts.shape
    num_chunks, E = chunk_counts.shape
    E = hl.specialize(E)
    C = hl.specialize(sorted_pair_ids.size(1))
    blocks_per_chunk = hl.specialize(block_expert_ids.size(1))
    block_t = C // blocks_per_chunk
    slots_flat = sorted_pair_ids.view(num_chunks * C)
    slots_by_block = sorted_pair_ids.view(num_chunks, blocks_per_chunk, block_t)
    step = min(METADATA_STEP, C, METADATA_TILE // helion.next_power_of_2(E))
    # One program per chunk; its tiles hold all experts and all of the chunk's blocks.
    for tile_c, tile_e, tile_b in hl.tile(
        [num_chunks, E, blocks_per_chunk],
        block_size=[1, helion.next_power_of_2(E), blocks_per_chunk],
    ):
        c = tile_c.begin
        totals = hl.zeros([tile_e], dtype=torch.int32)
        before = hl.zeros([tile_e], dtype=torch.int32)  # pairs in earlier chunks
        for tile_cc in hl.tile(num_chunks, block_size=16):
            counts = chunk_counts[tile_cc, tile_e]
            earlier_chunk = (tile_cc.index < c).to(torch.int32)
            totals = totals + counts.sum(0, dtype=torch.int32)
            before = before + (counts * earlier_chunk[:, None]).sum(0, dtype=torch.int32)
        run = block_t * run_blocks
        padded = (totals + run - 1) // run * run
        run_ends = torch.cumsum(padded, 0).to(torch.int32)
        run_starts = run_ends - padded
        # every program writes the same flag
        all_placed[0] = (totals.sum(0, dtype=torch.int32) == P).to(torch.int32)

        # this chunk's blocks: their expert (E past every run) and where its pairs end
        block_start = (c * blocks_per_chunk + tile_b.index) * block_t
        is_expert = tile_e.index < E  # the tile is a power of two, E need not be
        ended = (run_ends[None, :] <= block_start[:, None]) & is_expert[None, :]
        block_expert = ended.sum(1, dtype=torch.int32)
        owner = (tile_e.index[None, :] == block_expert[:, None]).to(torch.int32)
        pairs_end = ((run_starts + totals)[None, :] * owner).sum(1, dtype=torch.int32)
        block_expert_ids[c, tile_b] = torch.where(block_start < pairs_end, block_expert, E)

        # fill this chunk's slots that no pair takes, as a [block, slot in block] tile
        for tile_j in hl.tile(block_t, block_size=block_t):
            slot = (c * blocks_per_chunk + tile_b.index[:, None]) * block_t + tile_j.index[None, :]
            padding = slot >= pairs_end[:, None]
            fill = hl.full([tile_b, tile_j], P, torch.int32)
            hl.store(slots_by_block, [c, tile_b, tile_j], fill, extra_mask=padding)

        # place this chunk's pairs, one step at a time
        next_slot = run_starts + before
        for tile_s in hl.tile(C, block_size=step):
            pair = c * C + tile_s.index
            expert = chunk_experts[c, tile_s]  # -1: placed nowhere, the rank of no pair
            valid = expert >= 0
            of_expert = (expert[:, None] == tile_e.index[None, :]).to(torch.int32)
            same_expert_before = (expert[:, None] == expert[None, :]) & (
                tile_s.index[None, :] < tile_s.index[:, None]
            )
            rank = same_expert_before.sum(1, dtype=torch.int32)
            slot = (next_slot[None, :] * of_expert).sum(1, dtype=torch.int32) + rank
            hl.store(slots_flat, [slot], pair.to(torch.int32), extra_mask=valid)
            next_slot = next_slot + of_expert.sum(0, dtype=torch.int32)


def check_integer_ids(expert_ids: torch.Tensor) -> None:
    """Raise a TypeError naming ``expert_ids`` unless it holds integers (bool is not).

    Taught in notebook 06.
    """
    dtype = expert_ids.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise TypeError(f"expert_ids must be an integer tensor, got {dtype}")


def comparable_expert_ids(expert_ids: torch.Tensor) -> torch.Tensor:
    """``expert_ids`` in a type that the kernels and checks can compare with E and -1: int32
    and int64 as given, any other integer type (int8, uint8...) copied to int64, in which such
    a comparison cannot wrap around.

    Taught in notebook 06.
    """
    return expert_ids if expert_ids.dtype in (torch.int32, torch.int64) else expert_ids.long()


# Taught in notebook 06, which prints this source.
def align_to_blocks(
    expert_ids: torch.Tensor,  # [T] or [T, k] integer
    num_experts: int,
    block_t: int,
    run_blocks: int = 1,
) -> BlockAlignedRouting:
    """Group the pairs by expert (stably) and pad each expert's run to a multiple of
    ``run_blocks`` blocks of ``block_t`` slots (the flat kernels' L2 group: ``flat_run_blocks``).

    A counting sort in two Helion kernels, all on the device, so the GPU never waits for the
    host, which issues two launches (three if ``expert_ids`` must be copied to be flattened).
    Equal to ``align_to_blocks_reference`` for ids in [0, E); pairs with other ids are left
    out, and ``all_placed`` is then 0.
    """
    check_integer_ids(expert_ids)
    if expert_ids.device.type != DEVICE.type:
        raise ValueError(
            f"expert_ids is on {expert_ids.device} but the metadata kernels run on "
            f"{DEVICE.type} here"
        )
    if not 1 <= num_experts <= MAX_METADATA_EXPERTS:
        raise ValueError(
            f"num_experts (E, W's first dimension) is {num_experts}; the flat kernel's metadata "
            f"takes 1 to {MAX_METADATA_EXPERTS} experts (MAX_METADATA_EXPERTS)"
        )
    num_pairs, device = expert_ids.numel(), expert_ids.device
    num_blocks = max_blocks(num_pairs, num_experts, block_t, run_blocks)
    num_slots = num_blocks * block_t
    if num_slots > INT32_MAX:  # checked here, where the sizes are concrete even under export
        raise ValueError(
            f"expert_ids routes {num_pairs} (token, expert) pairs, up to {num_slots} slots in "
            f"blocks of {block_t}; the routing metadata numbers slots in int32, so split the "
            "tokens into batches"
        )
    pair_experts = comparable_expert_ids(expert_ids).flatten()
    chunk = metadata_chunk(num_slots, block_t, num_experts)
    num_chunks = num_metadata_chunks(num_slots, chunk)
    chunk_counts = torch.empty(num_chunks, num_experts, dtype=torch.int32, device=device)
    chunk_experts = torch.empty(num_chunks, chunk, dtype=torch.int32, device=device)
    run_kernel(
        count_experts_per_chunk, (pair_experts, chunk_counts, chunk_experts), METADATA_CONFIG
    )
    # whole chunks of slots and blocks are written; the routing is the first num_blocks
    block_expert_ids = torch.empty(num_chunks, chunk // block_t, dtype=torch.int32, device=device)
    sorted_pair_ids = torch.empty(num_chunks, chunk, dtype=torch.int32, device=device)
    all_placed = torch.empty(1, dtype=torch.int32, device=device)
    place_args = (pair_experts, chunk_experts, chunk_counts, block_expert_ids, sorted_pair_ids)
    run_kernel(place_pairs, (*place_args, all_placed, run_blocks), METADATA_CONFIG)
    return BlockAlignedRouting(
        sorted_pair_ids.view(-1)[:num_slots].view(num_blocks, block_t),
        block_expert_ids.view(-1)[:num_blocks],
        all_placed,
    )
