"""Shared code of the MoE matmul course: routing, sorting, Helion kernels, references, checks.

The notebooks import this module and explain it piece by piece. Its sections follow the data:

    mode -> routing -> sorting -> kernels (forward and backward) -> references -> entry points
    (moe_matmul, the layer's moe_experts, their backward) -> transformers backend -> expert
    parallelism (torch.distributed) -> checks -> benchmarks -> plots -> command line

On a machine without CUDA, importing this module switches Triton to its CPU interpreter
(``TRITON_INTERPRET=1``) before any kernel is defined, so every kernel here runs on a laptop,
slowly and at small sizes. ``ON_GPU`` tells notebooks which mode they are in.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

# ---------------------------------------------------------------------------------------------
# Mode: compiled for a CUDA GPU, or run by Triton's CPU interpreter
# ---------------------------------------------------------------------------------------------

ON_GPU: bool = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

# Before Triton loads: its library functions written in Triton (tl.sum, tl.cdiv...) run in the
# interpreter only if the variable is set when they are defined, at Triton's import.
if not ON_GPU:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise ImportError(
            "Triton was imported before moe_helpers on a machine without a GPU, so its CPU "
            "interpreter cannot run reductions; import moe_helpers first, or set "
            "TRITON_INTERPRET=1 before starting Python"
        )
    os.environ["TRITON_INTERPRET"] = "1"

import helion  # noqa: E402
import helion.language as hl  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import triton.testing  # noqa: E402
from tqdm import tqdm  # noqa: E402


def _patch_interpreter_bfloat16() -> None:
    """Make Triton's CPU interpreter handle bfloat16 as a GPU does.

    The interpreter stores bfloat16 tensors as raw ``uint16`` and has two defects with them
    (seen in Triton 3.9): ``tl.dot`` hands the raw bit patterns to ``np.matmul``, returning
    values near 1e10 (triton-lang/triton#11584), and a cast to bfloat16 truncates the mantissa
    where a GPU rounds to nearest even, doubling the rounding error. Both conversions are done
    here by PyTorch, whose bfloat16 conversions are exact (widening) and round to nearest even.
    """
    import triton.language as tl
    from triton.runtime import interpreter

    def bits_to_float32(bits: np.ndarray) -> np.ndarray:
        return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()

    def float_to_bits(values: np.ndarray) -> np.ndarray:
        as_bf16 = torch.from_numpy(np.array(values)).to(torch.bfloat16)
        return as_bf16.view(torch.int16).numpy().view(np.uint16)

    def widen(operand: interpreter.TensorHandle) -> interpreter.TensorHandle:
        if operand.dtype != tl.bfloat16:
            return operand
        return interpreter.TensorHandle(bits_to_float32(operand.data), tl.float32)

    create_dot = interpreter.InterpreterBuilder.create_dot

    def create_dot_bf16(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    cast_impl = interpreter.InterpreterBuilder.cast_impl

    def cast_impl_bf16(self, src, dst_type):
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar in (tl.float32, tl.float64):
            return interpreter.TensorHandle(float_to_bits(src.data), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    interpreter.InterpreterBuilder.create_dot = create_dot_bf16
    interpreter.InterpreterBuilder.cast_impl = cast_impl_bf16


def _patch_interpreter_loop_bounds() -> None:
    """Let Triton's CPU interpreter run loops whose bound is a kernel argument.

    The interpreter holds a scalar as a one-element array and turns it into a Python int for
    ``range`` with ``int(array)``. NumPy 2.4 refuses that for arrays of one dimension
    ("only 0-dimensional arrays can be converted to Python scalars"); Triton 3.9 converts
    ``array.squeeze()`` instead, Triton 3.6 (the GPU machine's, whose CPU worlds in notebook 11
    use the interpreter) does not. This applies Triton 3.9's conversion to any version.
    """
    from triton.runtime import interpreter

    patch_lang_tensor = interpreter._patch_lang_tensor

    def patch_lang_tensor_squeezed(tensor, scope):
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor_squeezed


if not ON_GPU:
    _patch_interpreter_bfloat16()
    _patch_interpreter_loop_bounds()


# ---------------------------------------------------------------------------------------------
# Routing: which expert (or experts) each token goes to
# ---------------------------------------------------------------------------------------------


def _cpu_generator(seed: int) -> torch.Generator:
    """Random draws are made on the CPU so a seed gives the same routing on every machine."""
    return torch.Generator(device="cpu").manual_seed(seed)


def route_uniform(
    num_tokens: int, num_experts: int, *, seed: int = 0, device: torch.device = DEVICE
) -> torch.Tensor:  # [T] int64
    """Top-1 routing where every expert is equally likely for every token.

    Args:
        num_tokens: T, the number of tokens.
        num_experts: E, the number of experts.
        seed: Seed of the CPU generator that draws the assignment.
        device: Where the returned tensor lives.

    Returns:
        Expert id of each token, shape [T], values in [0, E).
    """
    ids = torch.randint(num_experts, (num_tokens,), generator=_cpu_generator(seed))
    return ids.to(device)


def zipf_probabilities(num_experts: int, skew: float) -> torch.Tensor:  # [E] float64
    """Probability of each expert under a Zipf law: p_e proportional to (e + 1) ** -skew.

    ``skew = 0`` is uniform; larger skews send more tokens to the first experts.
    """
    weights = torch.arange(1, num_experts + 1, dtype=torch.float64) ** -skew
    return weights / weights.sum()


def route_zipf(
    num_tokens: int,
    num_experts: int,
    skew: float,
    *,
    seed: int = 0,
    device: torch.device = DEVICE,
) -> torch.Tensor:  # [T] int64
    """Top-1 routing with a Zipf-skewed load: expert 0 is the most popular.

    Args:
        num_tokens: T, the number of tokens.
        num_experts: E, the number of experts.
        skew: Zipf exponent (0 = uniform, 1.2 = strongly skewed).
        seed: Seed of the CPU generator that draws the assignment.
        device: Where the returned tensor lives.

    Returns:
        Expert id of each token, shape [T], values in [0, E).
    """
    if num_tokens == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    probs = zipf_probabilities(num_experts, skew)
    ids = torch.multinomial(probs, num_tokens, replacement=True, generator=_cpu_generator(seed))
    return ids.to(device)


def route_zipf_top_k(
    num_tokens: int,
    num_experts: int,
    skew: float,
    top_k: int,
    *,
    seed: int = 0,
    device: torch.device = DEVICE,
) -> torch.Tensor:  # [T, k] int64
    """Top-k routing with a Zipf-skewed load: each token draws k distinct experts, expert e with
    probability proportional to (e + 1) ** -skew among those it has not drawn yet.

    Args:
        num_tokens: T, the number of tokens.
        num_experts: E, the number of experts.
        skew: Zipf exponent (0 = uniform).
        top_k: k, the experts of each token (1 <= k <= E).
        seed: Seed of the CPU generator that draws the assignment.
        device: Where the returned tensor lives.

    Returns:
        The experts of each token, shape [T, k], values in [0, E), distinct within a row.
    """
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, E={num_experts}], got {top_k}")
    probs = zipf_probabilities(num_experts, skew).expand(num_tokens, num_experts)
    ids = torch.multinomial(probs, top_k, replacement=False, generator=_cpu_generator(seed))
    return ids.to(device)


def gating_logits(
    A: torch.Tensor,  # [T, K]
    num_experts: int,
    *,
    seed: int = 0,
) -> torch.Tensor:  # [T, E] float32
    """Router scores from a small gating network: one linear layer, weights drawn from ``seed``.

    The layer's weight is [K, E] with entries of variance 1/K, the usual initialisation, so
    the logits of unit-variance activations have unit variance. The product is taken in
    float64, so the same activations give the same routing on every machine.
    """
    K = A.shape[1]
    gate = torch.randn(K, num_experts, generator=_cpu_generator(seed), dtype=torch.float64)
    return (A.double() @ (gate / math.sqrt(K)).to(A.device)).float()


def route_top_k(
    logits: torch.Tensor,  # [T, E]
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([T, k] int64, [T, k] float32)
    """Top-k routing: each token keeps its k largest logits; softmax over those k gives weights.

    This is the Mixtral recipe. It equals taking the softmax over all experts, keeping the k
    largest probabilities and renormalising them to sum to one. A token's output is the sum
    over its k experts of the expert's output times that combine weight.

    Args:
        logits: Router scores, one row per token.
        k: How many experts each token goes to (1 <= k <= E).

    Returns:
        ``(expert_ids, combine_weights)``, each [T, k], best expert first.
    """
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k must be in [1, E={logits.shape[1]}], got {k}")
    top_logits, expert_ids = torch.topk(logits.float(), k, dim=1)
    return expert_ids, torch.softmax(top_logits, dim=1)


def as_top_k(routing: torch.Tensor) -> torch.Tensor:  # [T] or [T, k] -> [T, k]
    """Top-1 expert ids or combine weights ([T]) as top-k ones with k = 1 ([T, 1], a view)."""
    return routing[:, None] if routing.dim() == 1 else routing


def expert_load(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:  # [E] int64
    """Number of tokens (or token-expert pairs, for top-k ids) each expert receives."""
    return torch.bincount(expert_ids.flatten(), minlength=num_experts)


@dataclasses.dataclass(frozen=True)
class LoadStats:
    """How unevenly tokens spread over experts."""

    max_over_mean: float  # 1.0 is perfect balance; the busiest expert sets the pace
    coefficient_of_variation: float  # std / mean of the per-expert loads
    empty_experts: int  # experts that received no token


def load_stats(load: torch.Tensor) -> LoadStats:  # load: [E]
    """Imbalance statistics of a per-expert load (from ``expert_load``)."""
    load = load.double().cpu()
    if load.sum() == 0:
        raise ValueError("load must count at least one token")
    mean = load.mean().item()
    return LoadStats(
        max_over_mean=load.max().item() / mean,
        coefficient_of_variation=load.std(correction=0).item() / mean,
        empty_experts=int((load == 0).sum()),
    )


# ---------------------------------------------------------------------------------------------
# Sorting: group the tokens of each expert together, as the kernels read them
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExpertSort:
    """Tokens grouped by expert: what the OGS kernels need besides A and W.

    Expert e owns sorted positions ``expert_token_offsets[e] : expert_token_offsets[e + 1]``;
    sorted position s holds the original token ``sorted_to_orig_token_idx[s]``.
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
    """
    expert_ids = expert_ids.long()
    sorted_to_orig_token_idx = torch.argsort(expert_ids, stable=True).to(torch.int32)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=expert_ids.device)
    counts.scatter_add_(0, expert_ids, torch.ones_like(expert_ids, dtype=torch.int32))
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=expert_ids.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return ExpertSort(counts, offsets, sorted_to_orig_token_idx)


def sizes_of_one(*args: object) -> tuple[object, ...]:
    """Extra cache key for a Helion kernel: which dimensions of its tensor arguments are 1, and
    the values of its other arguments (the ``hl.constexpr`` ones, such as the weights' layout).

    With ``static_shapes=False``, Helion 1.4 compiles sizes of 1 in as constants but leaves them
    out of its cache key, so a kernel first compiled for E = 1 would be reused, wrongly, for
    E = 8. Keying on them compiles one kernel per pattern of sizes of 1.
    """
    return tuple(
        tuple(size == 1 for size in arg.shape) if isinstance(arg, torch.Tensor) else arg
        for arg in args
    )


@dataclasses.dataclass(frozen=True)
class BlockAlignedRouting:
    """Token-expert pairs grouped by expert, each expert's run padded to whole token blocks.

    With top-k routing token t sends k pairs, numbered ``t * k + j`` for its j-th expert (top-1:
    the pair number is the token). Row b of ``sorted_pair_ids`` is one block of ``block_t``
    pairs, all routed to expert ``block_expert_ids[b]``; slots past an expert's last pair hold
    P, the number of pairs, which no pair has. The number of blocks is a bound known without
    reading the routing, so blocks past the last expert's run are left over: their expert id is
    E and the kernel skips them. ``all_placed`` is 1 when every pair was placed, 0 when some
    expert id lay outside [0, E): such a pair has no slot.
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


def max_blocks(num_pairs: int, num_experts: int, block_t: int) -> int:
    """Most blocks a routing of ``num_pairs`` pairs can fill: each expert wastes at most
    ``block_t - 1`` slots of padding, and each block in use holds at least one pair."""
    return min(num_pairs, (num_pairs + num_experts * (block_t - 1)) // block_t)


def align_to_blocks_reference(
    expert_ids: torch.Tensor,  # [T] or [T, k] integer
    num_experts: int,
    block_t: int,
) -> BlockAlignedRouting:
    """``align_to_blocks`` in PyTorch tensor ops: the readable version, and its test oracle.

    Device-side ops only, so the GPU never waits for the host: the counts come from
    ``scatter_add_``, each pair's slot is its expert's padded start plus its rank inside the
    expert, and each block's expert is found by ``searchsorted`` in the padded ends. About
    twenty small ops, each a launch, so on a GPU it costs what the host takes to issue them.
    """
    pair_experts = expert_ids.flatten().long()  # [P]
    num_pairs, device = pair_experts.numel(), pair_experts.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, pair_experts, torch.ones_like(pair_experts))
    padded_counts = (counts + block_t - 1) // block_t * block_t
    padded_ends = torch.cumsum(padded_counts, 0)
    order = torch.argsort(pair_experts, stable=True)  # pairs in sorted order
    sorted_experts = pair_experts[order]
    rank = (
        torch.arange(num_pairs, device=device) - (torch.cumsum(counts, 0) - counts)[sorted_experts]
    )
    slots = (padded_ends - padded_counts)[sorted_experts] + rank
    num_blocks = max_blocks(num_pairs, num_experts, block_t)
    sorted_pair_ids = torch.full(
        (num_blocks * block_t,), num_pairs, dtype=torch.int32, device=device
    )
    sorted_pair_ids[slots] = order.to(torch.int32)
    block_starts = torch.arange(num_blocks, device=device) * block_t
    block_expert_ids = torch.searchsorted(padded_ends, block_starts, right=True).to(torch.int32)
    all_placed = ((pair_experts >= 0) & (pair_experts < num_experts)).to(torch.int32).min()
    return BlockAlignedRouting(
        sorted_pair_ids.view(num_blocks, block_t), block_expert_ids, all_placed.view(1)
    )


# The routing metadata as a counting sort by expert, in two Helion kernels (count, then place)
# that read the expert ids in their own integer dtype. Both split the slots into chunks of C
# (``metadata_chunk``): count program c counts chunk c of the pairs per expert; place program c
# places chunk c of the pairs and fills chunk c of the slots. Each program walks its chunk in
# steps of METADATA_STEP pairs, so what a program holds at once is a [METADATA_STEP, E] tile
# however large the chunk. Expert ids outside [0, E) are counted nowhere and placed nowhere,
# so a bad id never sends a kernel outside its tensors; a flag says whether every pair was
# placed, and moe_matmul checks it. A place program holds all E experts in one tile and reads
# every chunk's counts, so E is bounded: up to MAX_METADATA_EXPERTS (tiles of 256 experts ran
# on an H200; 2048 exceed Triton's tensor size).
METADATA_CONFIG = helion.Config(num_warps=4, num_stages=1)
METADATA_STEP = 64
MAX_METADATA_CHUNK = 1024
MAX_METADATA_EXPERTS = 256
# How many programs the chunks aim at: about two per SM of an H200 on a GPU; on the CPU few,
# since the interpreter's cost is per program and per tile operation.
METADATA_PROGRAMS = 256 if ON_GPU else 4


def metadata_chunk(num_slots: int, block_t: int) -> int:
    """Slots (and pairs) per metadata program: a power of two from METADATA_STEP to
    MAX_METADATA_CHUNK that makes about METADATA_PROGRAMS chunks, and at least one block."""
    target = helion.next_power_of_2(-(-num_slots // METADATA_PROGRAMS))
    return max(block_t, min(MAX_METADATA_CHUNK, max(METADATA_STEP, target)))


def num_metadata_chunks(num_slots: int, chunk: int) -> int:
    """Chunks of ``chunk`` slots (a routing has at least as many slots as pairs), at least two:
    Helion 1.4 reads a dimension of size 1 as if every row of a tile were row 0 (unmasked),
    which would count one chunk many times."""
    return max(2, -(-num_slots // chunk))


@helion.kernel(config=METADATA_CONFIG, static_shapes=False, key=sizes_of_one)
def count_experts_per_chunk(
    pair_experts: torch.Tensor,  # [P] integer expert of each pair
    chunk_counts: torch.Tensor,  # [num_chunks, E] int32, written
    chunk: torch.Tensor,  # [C] only its size is used: pairs per chunk
) -> None:
    """Count, per chunk of C pairs, the pairs routed to each expert (ids in [0, E) only)."""
    (P,) = pair_experts.shape
    num_chunks, E = chunk_counts.shape
    E = hl.specialize(E)
    C = hl.specialize(chunk.size(0))
    for tile_c, tile_e in hl.tile([num_chunks, E], block_size=[1, helion.next_power_of_2(E)]):
        counts = hl.zeros([tile_e], dtype=torch.int32)
        for tile_s in hl.tile(C, block_size=min(METADATA_STEP, C)):
            pair = tile_c.begin * C + tile_s.index
            in_range = pair < P  # chunks past the pairs count nothing
            experts = hl.load(pair_experts, [pair], extra_mask=in_range)
            valid = in_range & (experts >= 0) & (experts < E)
            expert = torch.where(valid, experts, -1).to(torch.int32)  # -1: counted nowhere
            hits = expert[:, None] == tile_e.index[None, :]
            counts = counts + hits.sum(0, dtype=torch.int32)
        chunk_counts[tile_c.begin, tile_e] = counts


@helion.kernel(config=METADATA_CONFIG, static_shapes=False, key=sizes_of_one)
def place_pairs(
    pair_experts: torch.Tensor,  # [P] integer expert of each pair
    chunk_counts: torch.Tensor,  # [num_chunks, E] int32 from count_experts_per_chunk
    block_expert_ids: torch.Tensor,  # [num_chunks, C // block_t] int32, written: expert or E
    sorted_pair_ids: torch.Tensor,  # [num_chunks, C] int32, written: pair or P (padding)
    all_placed: torch.Tensor,  # [1] int32, written: 1 if every pair's id was in [0, E)
) -> None:
    """Program c places chunk c's pairs and fills chunk c's slots.

    From all the counts it finds each expert's run (its total padded to whole blocks, laid out
    in expert order) and where chunk c's pairs of each expert start (the run's start plus the
    pairs of earlier chunks). It gives each of its blocks an expert (the number of runs that
    end at or before the block) and writes P into the slots past that expert's pairs. Then it
    walks its pairs in steps: each goes to its expert's next free slot, after the pairs of the
    same expert earlier in the step, so the sort is stable.
    """
    (P,) = pair_experts.shape
    num_chunks, E = chunk_counts.shape
    E = hl.specialize(E)
    C = hl.specialize(sorted_pair_ids.size(1))
    blocks_per_chunk = hl.specialize(block_expert_ids.size(1))
    block_t = C // blocks_per_chunk
    slots_flat = sorted_pair_ids.view(num_chunks * C)
    slots_by_block = sorted_pair_ids.view(num_chunks, blocks_per_chunk, block_t)
    step = min(METADATA_STEP, C)
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
        padded = (totals + block_t - 1) // block_t * block_t
        run_ends = torch.cumsum(padded, 0).to(torch.int32)
        run_starts = run_ends - padded
        # every program writes the same flag
        all_placed[0] = (totals.sum(0, dtype=torch.int32) == P).to(torch.int32)

        # this chunk's blocks: their expert (E past every run) and where its pairs end
        block_start = (c * blocks_per_chunk + tile_b.index) * block_t
        is_expert = tile_e.index < E  # the tile is a power of two, E need not be
        ended = (run_ends[None, :] <= block_start[:, None]) & is_expert[None, :]
        block_expert = ended.sum(1, dtype=torch.int32)
        block_expert_ids[c, tile_b] = block_expert
        owner = (tile_e.index[None, :] == block_expert[:, None]).to(torch.int32)
        pairs_end = ((run_starts + totals)[None, :] * owner).sum(1, dtype=torch.int32)

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
            in_range = pair < P
            experts = hl.load(pair_experts, [pair], extra_mask=in_range)
            valid = in_range & (experts >= 0) & (experts < E)
            # compared in int32 after the range check (-1: placed nowhere, rank of no pair)
            expert = torch.where(valid, experts, -1).to(torch.int32)
            of_expert = (expert[:, None] == tile_e.index[None, :]).to(torch.int32)
            same_expert_before = (expert[:, None] == expert[None, :]) & (
                tile_s.index[None, :] < tile_s.index[:, None]
            )
            rank = same_expert_before.sum(1, dtype=torch.int32)
            slot = (next_slot[None, :] * of_expert).sum(1, dtype=torch.int32) + rank
            hl.store(slots_flat, [slot], pair.to(torch.int32), extra_mask=valid)
            next_slot = next_slot + of_expert.sum(0, dtype=torch.int32)


def check_integer_ids(expert_ids: torch.Tensor) -> None:
    """Raise a TypeError naming ``expert_ids`` unless it holds integers (bool is not)."""
    dtype = expert_ids.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise TypeError(f"expert_ids must be an integer tensor, got {dtype}")


def align_to_blocks(
    expert_ids: torch.Tensor,  # [T] or [T, k] integer
    num_experts: int,
    block_t: int,
) -> BlockAlignedRouting:
    """Group the pairs by expert (stably) and pad each expert's run to a multiple of ``block_t``.

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
    pair_experts = expert_ids.flatten()
    num_pairs, device = pair_experts.numel(), pair_experts.device
    num_blocks = max_blocks(num_pairs, num_experts, block_t)
    num_slots = num_blocks * block_t
    chunk = metadata_chunk(num_slots, block_t)
    num_chunks = num_metadata_chunks(num_slots, chunk)
    chunk_counts = torch.empty(num_chunks, num_experts, dtype=torch.int32, device=device)
    count_args = (pair_experts, chunk_counts, torch.empty(chunk, device=device))
    run_kernel(count_experts_per_chunk, count_args, METADATA_CONFIG)
    # whole chunks of slots and blocks are written; the routing is the first num_blocks
    block_expert_ids = torch.empty(num_chunks, chunk // block_t, dtype=torch.int32, device=device)
    sorted_pair_ids = torch.empty(num_chunks, chunk, dtype=torch.int32, device=device)
    all_placed = torch.empty(1, dtype=torch.int32, device=device)
    place_args = (pair_experts, chunk_counts, block_expert_ids, sorted_pair_ids, all_placed)
    run_kernel(place_pairs, place_args, METADATA_CONFIG)
    return BlockAlignedRouting(
        sorted_pair_ids.view(-1)[:num_slots].view(num_blocks, block_t),
        block_expert_ids.view(-1)[:num_blocks],
        all_placed,
    )


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


def expert_weights_in_place(
    W: torch.Tensor,  # [E, K, N]: a contiguous tensor, or a transposed view of an [E, N, K] one
) -> tuple[torch.Tensor, bool]:  # (the tensor the kernels read, whether it is [E, N, K])
    """The expert weights as the flat and per-pair kernels read them, without a copy.

    The course writes expert weights [E, K, N], inputs by outputs; nn.Linear and transformers
    store them [E, N, K], outputs by inputs, and ``W_nk.transpose(1, 2)`` is that tensor as an
    [E, K, N] view. The kernels take both: they read [E, N, K] storage through the flag
    ``nk_layout``. Weights in any other layout (a slice with gaps, say) are copied once to
    [E, K, N], as ``torch.reshape`` would.
    """
    as_nk = W.transpose(1, 2)
    if as_nk.is_contiguous() and not W.is_contiguous():
        return as_nk, True
    return W.contiguous(), False


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


@helion.kernel(static_shapes=False, key=sizes_of_one)
def moe_matmul_flat(
    A: torch.Tensor,  # [T, K] input activations
    W: torch.Tensor,  # [E, K, N] expert weights, or [E, N, K] when nk_layout
    sorted_pair_ids: torch.Tensor,  # [num_blocks, block_t] pairs grouped by expert, P = padding
    block_expert_ids: torch.Tensor,  # [num_blocks] expert of each block, E = unused block
    combine_weights: torch.Tensor,  # [T, k] float32 weight of each token's k experts
    nk_layout: hl.constexpr,  # W is stored [E, N, K], nn.Linear's [out, in] (transformers')
) -> torch.Tensor:  # [T, k, N] each pair's weighted expert output
    """The block-aligned flat schedule: one program per (block of one expert's pairs, N tile).

    The grid covers every expert's row blocks at once, so all SMs work whatever the routing.
    Each program gathers its block's rows of A, multiplies them by its expert's W with fp32
    accumulation, scales each row by its combine weight and stores only the valid rows. The
    token block is part of the data layout (``align_to_blocks``), so ``block_t`` is read from
    ``sorted_pair_ids``' shape, and the config's block sizes are the N and K tiles only.
    ``nk_layout`` is a compile-time flag: the weights are read in place in either layout
    (``expert_weights_in_place``), a [K tile, N tile] slice of [E, K, N] or the transpose of an
    [N tile, K tile] slice of [E, N, K].
    """
    if nk_layout:
        E, N, K = W.shape
    else:
        E, K, N = W.shape
    # The weights' K and N are fixed per layer, so they are compiled in (one kernel per layer
    # shape; tokens stay dynamic): loads along K and N need no bounds masks when the tiles
    # divide them, which made this kernel 17% faster at the Mixtral-like shape (NOTES.md).
    K = hl.specialize(K)
    N = hl.specialize(N)
    T, top_k = combine_weights.shape
    top_k = hl.specialize(top_k)
    num_blocks, block_t = sorted_pair_ids.shape
    block_t = hl.specialize(block_t)
    num_pairs = T * top_k
    # A 2-D view of the rows of W: Helion 1.4 miscompiles W[e, tile_k, tile_n] when e is
    # loaded from memory
    W_rows = W.reshape(E * N, K) if nk_layout else W.reshape(E * K, N)
    pair_weights = combine_weights.view(num_pairs)
    C = torch.empty(num_pairs, N, dtype=A.dtype, device=A.device)
    for tile_b, tile_n in hl.tile([num_blocks, N], block_size=[1, None]):
        e = block_expert_ids[tile_b.begin]
        if e < E:
            pairs = sorted_pair_ids[tile_b.begin, :]  # [block_t]
            valid = pairs < num_pairs
            safe_pairs = torch.where(valid, pairs, 0)
            rows = safe_pairs // top_k  # the token of each pair
            acc = hl.zeros([block_t, tile_n], dtype=torch.float32)
            for tile_k in hl.tile(K):
                A_frag = A[rows, tile_k]
                if nk_layout:
                    W_frag = W_rows[e * N + tile_n.index, tile_k].T
                else:
                    W_frag = W_rows[e * K + tile_k.index, tile_n]
                acc = torch.addmm(acc, A_frag, W_frag)
            acc = acc * pair_weights[safe_pairs][:, None]
            hl.store(C, [safe_pairs, tile_n], acc.to(C.dtype), extra_mask=valid[:, None])
    return C.view(T, top_k, N)


ACTIVATIONS = ("silu", "gelu_tanh")


# Device code shared by the gated kernels: Helion inlines a plain function called inside a
# kernel's loops, so these two are traced into each kernel that calls them (``activation`` is
# the kernel's compile-time flag, so only one branch is generated).
def gate_activation(gate: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) on a float32 tile. ``gelu_tanh`` is the tanh approximation of GELU, written as
    ``x * sigmoid(1.5958 (x + 0.044715 x^3))``, which equals it exactly (and needs no tanh,
    which Triton's CPU interpreter lacks)."""
    if activation == "silu":
        return gate * torch.sigmoid(gate)
    return gate * torch.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate))


def gate_activation_slope(gate: torch.Tensor, activation: str) -> torch.Tensor:
    """act'(gate) on a float32 tile: for x * sigmoid(z), sigmoid(z) + x sigmoid'(z) dz/dx,
    with z = x (SiLU) or z = c (x + 0.044715 x^3) (GELU's tanh approximation)."""
    if activation == "silu":
        s = torch.sigmoid(gate)
        return s * (1.0 + gate * (1.0 - s))
    s = torch.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate))
    dz = 1.5957691216057308 * (1.0 + 3 * 0.044715 * gate * gate)
    return s + gate * s * (1.0 - s) * dz


@helion.kernel(static_shapes=False, key=sizes_of_one)
def moe_gate_up_flat(
    A: torch.Tensor,  # [T, K] input activations
    W: torch.Tensor,  # [E, K, 2I] gate columns then up columns, or [E, 2I, K] when nk_layout
    sorted_pair_ids: torch.Tensor,  # [num_blocks, block_t] pairs grouped by expert, P = padding
    block_expert_ids: torch.Tensor,  # [num_blocks] expert of each block, E = unused block
    gate_up: torch.Tensor,  # [P, 2, I] written when keep_gate_up (else any [0, 2, I] tensor)
    top_k: hl.constexpr,  # experts per token: pair p is token p // top_k
    nk_layout: hl.constexpr,  # W is stored [E, 2I, K], transformers' gate_up_proj
    activation: hl.constexpr,  # one of ACTIVATIONS
    keep_gate_up: hl.constexpr,  # also store gate and up themselves, for the backward
) -> torch.Tensor:  # [P, I] act(gate) * up of each pair, unweighted
    """The first GEMM of a gated MLP expert with its activation fused: ``act(A W_gate) * (A W_up)``.

    The flat schedule of ``moe_matmul_flat``, with the same routing, over the I columns of
    the result: each program computes two [block_t, N tile] accumulators, one against the
    expert's gate weights (columns n of W) and one against its up weights (columns I + n),
    and stores ``act(gate) * up`` (``gate_activation``). Without ``keep_gate_up`` (inference)
    the [P, 2I] product of the two never exists in memory; with it (training) the kernel also
    stores gate and up, which the backward's activation derivative needs.
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
    H = torch.empty(num_pairs, I, dtype=A.dtype, device=A.device)
    for tile_b, tile_n in hl.tile([num_blocks, I], block_size=[1, None]):
        e = block_expert_ids[tile_b.begin]
        if e < E:
            pairs = sorted_pair_ids[tile_b.begin, :]  # [block_t]
            valid = pairs < num_pairs
            safe_pairs = torch.where(valid, pairs, 0)
            rows = safe_pairs // top_k
            gate = hl.zeros([block_t, tile_n], dtype=torch.float32)
            up = hl.zeros([block_t, tile_n], dtype=torch.float32)
            for tile_k in hl.tile(K):
                A_frag = A[rows, tile_k]
                if nk_layout:
                    gate_frag = W_rows[e * N2 + tile_n.index, tile_k].T
                    up_frag = W_rows[e * N2 + I + tile_n.index, tile_k].T
                else:
                    gate_frag = W_rows[e * K + tile_k.index, tile_n]
                    up_frag = W_rows[e * K + tile_k.index, I + tile_n.index]
                gate = torch.addmm(gate, A_frag, gate_frag)
                up = torch.addmm(up, A_frag, up_frag)
            if keep_gate_up:
                mask = valid[:, None]
                hl.store(gate_up, [safe_pairs, 0, tile_n], gate.to(H.dtype), extra_mask=mask)
                hl.store(gate_up, [safe_pairs, 1, tile_n], up.to(H.dtype), extra_mask=mask)
            hidden = gate_activation(gate, activation) * up
            hl.store(H, [safe_pairs, tile_n], hidden.to(H.dtype), extra_mask=valid[:, None])
    return H


@helion.kernel(static_shapes=False, key=sizes_of_one)
def moe_matmul_per_pair(
    A: torch.Tensor,  # [T, K] input activations
    W: torch.Tensor,  # [E, K, N] expert weights, or [E, N, K] when nk_layout
    pair_experts: torch.Tensor,  # [T, k] integer expert of each (token, expert) pair
    combine_weights: torch.Tensor,  # [T, k] float32 weight of each pair
    placed: torch.Tensor,  # [T * k] int32, written: 1 where the pair's expert id is in [0, E)
    nk_layout: hl.constexpr,  # as in moe_matmul_flat
) -> torch.Tensor:  # [T, k, N] each pair's weighted expert output
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
    return C.view(T, top_k, N)


@helion.kernel(static_shapes=False, key=sizes_of_one)
def moe_gate_up_per_pair(
    A: torch.Tensor,  # [T, K] input activations
    W: torch.Tensor,  # [E, K, 2I] gate columns then up columns, or [E, 2I, K] when nk_layout
    pair_experts: torch.Tensor,  # [T, k] integer expert of each (token, expert) pair
    placed: torch.Tensor,  # [T * k] int32, written: 1 where the pair's expert id is in [0, E)
    gate_up: torch.Tensor,  # [T * k, 2, I] written when keep_gate_up (else any [0, 2, I])
    nk_layout: hl.constexpr,  # as in moe_gate_up_flat
    activation: hl.constexpr,  # one of ACTIVATIONS
    keep_gate_up: hl.constexpr,  # as in moe_gate_up_flat
) -> torch.Tensor:  # [T * k, I] act(gate) * up of each pair, unweighted
    """``moe_gate_up_flat`` for a handful of pairs, scheduled as ``moe_matmul_per_pair``: one
    program per (pair, N tile of I), no routing metadata, two [K tile, N tile] float32
    accumulators (gate and up) on the CUDA cores, each summed over K once at the end, and
    ``act(gate) * up`` stored (and gate and up with ``keep_gate_up``)."""
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
    experts = pair_experts.reshape(num_pairs)
    H = torch.empty(num_pairs, I, dtype=A.dtype, device=A.device)
    block_k = hl.register_block_size(K)
    for tile_p, tile_n in hl.tile([num_pairs, I], block_size=[1, None]):
        pair = tile_p.begin
        e = experts[pair]
        valid = (e >= 0) & (e < E)
        placed[pair] = valid.to(torch.int32)  # every N tile writes the same flag
        if valid:
            gate_acc = hl.zeros([block_k, tile_n], dtype=torch.float32)
            up_acc = hl.zeros([block_k, tile_n], dtype=torch.float32)
            for tile_k in hl.tile(K, block_size=block_k):
                a = A[pair // top_k, tile_k].to(torch.float32)[:, None]
                if nk_layout:
                    gate_w = W_rows[e * N2 + tile_n.index, tile_k].T
                    up_w = W_rows[e * N2 + I + tile_n.index, tile_k].T
                else:
                    gate_w = W_rows[e * K + tile_k.index, tile_n]
                    up_w = W_rows[e * K + tile_k.index, I + tile_n.index]
                gate_acc = gate_acc + a * gate_w.to(torch.float32)
                up_acc = up_acc + a * up_w.to(torch.float32)
            gate = gate_acc.sum(0)
            up = up_acc.sum(0)
            if keep_gate_up:
                gate_up[pair, 0, tile_n] = gate.to(H.dtype)
                gate_up[pair, 1, tile_n] = up.to(H.dtype)
            H[pair, tile_n] = (gate_activation(gate, activation) * up).to(H.dtype)
    return H


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
def moe_down_backward(
    grad_out: torch.Tensor,  # [T, N] the gradient of the layer's output, A's dtype
    W: torch.Tensor,  # [E, I, N] the down weights, or [E, N, I] when nk_layout
    gate_up: torch.Tensor,  # [P, 2, I] the forward's gate and up (moe_gate_up_flat keeps them)
    sorted_pair_ids: torch.Tensor,  # [num_blocks, block_t] the pairs aligned to blocks
    block_expert_ids: torch.Tensor,  # [num_blocks]
    combine_weights: torch.Tensor,  # [T, k] float32 weight w of each pair
    nk_layout: hl.constexpr,  # W is stored [E, N, I], transformers' down_proj
    activation: hl.constexpr,  # one of ACTIVATIONS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The down projection's input gradient with the gated activation's backward in its epilogue.

    The flat schedule over the I columns: each program multiplies its block's rows of the
    output gradient (one per pair, its token's row) by its expert's transposed down weights,
    the gradient of h = act(gate) * up before the pair's weight: grad_h = grad_out[t] W_down^T.
    Its epilogue loads the same tile of the forward's gate and up and applies the weight w and
    the derivative: with dh = w grad_h, d gate = dh * up * act'(gate) and d up = dh * act(gate).
    Neither grad_h nor dh is ever stored. It returns three tensors:

    - [P, 2I] d(gate, up), side by side, the gradient of the first GEMM's output;
    - [P, I] w * h, the down projection's input as the layer weighted it, so that the down
      weights' gradient is an unweighted ``moe_weight_grad``;
    - [P, I tiles] each I tile's share of <grad_h, h>, the combine weight's gradient, summed
      over the tiles afterwards (a fixed order, unlike atomic adds).
    """
    if nk_layout:
        E, N, I = W.shape  # noqa: E741 (the course's name for the intermediate size)
    else:
        E, I, N = W.shape  # noqa: E741
    I = hl.specialize(I)  # noqa: E741
    N = hl.specialize(N)
    T, top_k = combine_weights.shape
    top_k = hl.specialize(top_k)
    num_blocks, block_t = sorted_pair_ids.shape
    block_t = hl.specialize(block_t)
    num_pairs = T * top_k
    pair_weights = combine_weights.view(num_pairs)
    W_rows = W.reshape(E * N, I) if nk_layout else W.reshape(E * I, N)
    # [P, 2, I] is [P, 2I] with the gate half first; a store at columns I + n of a [P, 2I]
    # tensor miscompiles in Helion 1.4 (it broadcasts the rows into a third dimension)
    d_gate_up = torch.empty(num_pairs, 2, I, dtype=grad_out.dtype, device=grad_out.device)
    weighted_hidden = torch.empty(num_pairs, I, dtype=grad_out.dtype, device=grad_out.device)
    block_n = hl.register_block_size(I)
    d_weight_parts = torch.empty(
        num_pairs, (I + block_n - 1) // block_n, dtype=torch.float32, device=grad_out.device
    )
    for tile_b, tile_n in hl.tile([num_blocks, I], block_size=[1, block_n]):
        e = block_expert_ids[tile_b.begin]
        if e < E:
            pairs = sorted_pair_ids[tile_b.begin, :]
            valid = pairs < num_pairs
            safe_pairs = torch.where(valid, pairs, 0)
            rows = safe_pairs // top_k
            grad_h = hl.zeros([block_t, tile_n], dtype=torch.float32)
            for tile_k in hl.tile(N):
                grad_frag = grad_out[rows, tile_k]
                if nk_layout:
                    W_frag = W_rows[e * N + tile_k.index, tile_n]
                else:
                    W_frag = W_rows[e * I + tile_n.index, tile_k].T
                grad_h = torch.addmm(grad_h, grad_frag, W_frag)
            mask = valid[:, None]
            gate = hl.load(gate_up, [safe_pairs, 0, tile_n], extra_mask=mask).to(torch.float32)
            up = hl.load(gate_up, [safe_pairs, 1, tile_n], extra_mask=mask).to(torch.float32)
            act = gate_activation(gate, activation)
            act_slope = gate_activation_slope(gate, activation)
            weight = pair_weights[safe_pairs][:, None]
            h = act * up
            dh = grad_h * weight
            dtype = grad_out.dtype
            d_gate = (dh * up * act_slope).to(dtype)
            hl.store(d_gate_up, [safe_pairs, 0, tile_n], d_gate, extra_mask=mask)
            hl.store(d_gate_up, [safe_pairs, 1, tile_n], (dh * act).to(dtype), extra_mask=mask)
            hl.store(weighted_hidden, [safe_pairs, tile_n], (h * weight).to(dtype), extra_mask=mask)
            part = (grad_h * h).sum(dim=1)
            hl.store(d_weight_parts, [safe_pairs, tile_n.id], part, extra_mask=valid)
    return d_gate_up.view(num_pairs, 2 * I), weighted_hidden, d_weight_parts


IMPLEMENTATIONS = {
    "seed": moe_matmul_ogs,
    "masked_store": moe_matmul_ogs_masked_store,
    "flat": moe_matmul_flat,
    "per_pair": moe_matmul_per_pair,
}
PER_EXPERT_IMPLEMENTATIONS = ("seed", "masked_store")

# block_sizes are the tiles of [tokens, N, K]. Helion's own default for these kernels, what
# it runs untuned: 16x16x16 tiles, 4 warps, no software pipelining.
HELION_DEFAULT_CONFIG = helion.Config(block_sizes=[16, 16, 16], num_warps=4, num_stages=1)
# What moe_matmul runs when given no config, per input dtype: the fastest of ten hand-picked
# configs of the masked-store kernel, measured on an H200 in bf16 at the two prefill shapes of
# notebook 05. float32 tiles take twice the shared memory, so float32 gets a 128-wide N tile.
# Large tiles also suit the interpreter, whose cost is per tile operation, not per element.
DEFAULT_CONFIGS = {
    torch.bfloat16: helion.Config(block_sizes=[128, 256, 64], num_warps=8, num_stages=3),
    torch.float16: helion.Config(block_sizes=[128, 256, 64], num_warps=8, num_stages=3),
    torch.float32: helion.Config(block_sizes=[128, 128, 64], num_warps=8, num_stages=3),
}


# The flat kernel's configs, per input dtype and token block, with block_sizes = [token block,
# N tile, K tile]. ``flat_token_block`` picks the block from the routing, and the block the
# tiles. Measured on an H200 in bf16 (notebooks/results/config_sweep.csv, kernel alone): 13
# configs at Mixtral-8x7B's two expert GEMMs from 8 to 16384 tokens and at DeepSeek-V3's gate_up
# from 8 to 512 tokens (the sweep ran out of time there). The 16-, 32- and 128-row entries were the
# fastest or within 2% of it wherever their block was the best one; the 64-row entry was the
# best 64-row config everywhere, though no size timed had 64 as its best block. 16 rows is the
# smallest block a tensor-core dot takes; 128 rows with 256-wide N tiles reached 611-631
# TFLOP/s at Mixtral-8x7B prefill. float32 tiles take twice the shared memory, so they are
# narrower (not timed).
FLAT_CONFIGS = {
    dtype: {
        16: helion.Config(block_sizes=[16, 128, 256], num_warps=4, num_stages=3),
        32: helion.Config(block_sizes=[32, 128, 128], num_warps=4, num_stages=3),
        64: helion.Config(block_sizes=[64, 256, 64], num_warps=8, num_stages=3),
        128: helion.Config(block_sizes=[128, 256, 64], num_warps=8, num_stages=3),
    }
    for dtype in (torch.bfloat16, torch.float16)
}
FLAT_CONFIGS[torch.float32] = {
    16: helion.Config(block_sizes=[16, 64, 128], num_warps=4, num_stages=3),
    32: helion.Config(block_sizes=[32, 64, 128], num_warps=4, num_stages=3),
    64: helion.Config(block_sizes=[64, 64, 64], num_warps=4, num_stages=3),
    128: helion.Config(block_sizes=[128, 128, 64], num_warps=8, num_stages=3),
}
# The fused gate_up kernel's configs (``moe_gate_up_flat``), per dtype and token block, with
# block_sizes = [token block, N tile of I, K tile]. It keeps two accumulators and loads two weight
# tiles per K step, so 256-wide N tiles run out of shared memory; on an H200 in bf16 (kernel
# alone, transformers' [E, 2I, H] weights, 4-5 tilings per block at two or three model sizes
# each, NOTES.md) these were the fastest or within 1.3% of it.
GATE_UP_CONFIGS = {
    dtype: {
        16: helion.Config(block_sizes=[16, 128, 128], num_warps=4, num_stages=4),
        32: helion.Config(block_sizes=[32, 128, 128], num_warps=4, num_stages=3),
        64: helion.Config(block_sizes=[64, 128, 64], num_warps=4, num_stages=3),
        128: helion.Config(block_sizes=[128, 128, 64], num_warps=8, num_stages=4),
    }
    for dtype in (torch.bfloat16, torch.float16)
}
GATE_UP_CONFIGS[torch.float32] = {
    16: helion.Config(block_sizes=[16, 64, 128], num_warps=4, num_stages=3),
    32: helion.Config(block_sizes=[32, 64, 128], num_warps=4, num_stages=3),
    64: helion.Config(block_sizes=[64, 64, 64], num_warps=4, num_stages=3),
    128: helion.Config(block_sizes=[128, 64, 64], num_warps=8, num_stages=3),
}
# The layer backward's dh kernel (``moe_down_backward``): block_sizes = [token block, I tile,
# N tile]. One accumulator, but an epilogue that loads two tiles and stores three, so it takes
# the fused gate_up kernel's tiles, except for 128-row blocks, which the training sizes run:
# there, of seven tilings on an H200 in bf16 (probe down_backward_configs, kernel alone, at
# Mixtral-8x7B and DeepSeek-V3 with 8192 tokens and Qwen3-30B-A3B with 16384), 128 x 128 took
# the least time in all, 0.9% less than gate_up's 128 x 64 (17.2 against 17.3 ms).
DOWN_BACKWARD_CONFIGS = {dtype: dict(GATE_UP_CONFIGS[dtype]) for dtype in GATE_UP_CONFIGS}
DOWN_BACKWARD_CONFIGS[torch.bfloat16][128] = DOWN_BACKWARD_CONFIGS[torch.float16][128] = (
    helion.Config(block_sizes=[128, 128, 128], num_warps=8, num_stages=3)
)
# The weight-gradient kernel's configs (``moe_weight_grad``): block_sizes = [K tile, N tile].
# For 16-bit types, the least total time of eight tilings on an H200 in bf16 over both of the
# layer's weight gradients (both unweighted, as the layer runs them) at Mixtral-8x7B and
# DeepSeek-V3 (8192 tokens) and Qwen3-30B-A3B (16384), kernel alone
# (results/weight_grad_sweep.json): 36.6 ms in all, against 39.7 for 256 x 128 tiles and 48.5
# for 128 x 128; fastest or within 3% of the fastest at every point. float32 tiles take twice
# the shared memory (not timed).
WEIGHT_GRAD_CONFIGS = {
    torch.bfloat16: helion.Config(block_sizes=[128, 256], num_warps=8, num_stages=2),
    torch.float16: helion.Config(block_sizes=[128, 256], num_warps=8, num_stages=2),
    torch.float32: helion.Config(block_sizes=[64, 64], num_warps=4, num_stages=3),
}
# The per-pair kernel's configs: block_sizes = [1 (one pair per program), N tile, K tile].
# Six tilings timed on an H200 in bf16, in CUDA graphs, at 1-8 tokens of the Mixtral-8x7B and
# DeepSeek-V3 gate_up GEMMs (NOTES.md): 64x128 with 8 warps was best or within 6% of the best
# at one token (134 and 158 us); at 4-8 tokens 32x128 with 4 warps was faster (by 12-26%).
# float32 takes the same tiles, untimed.
PER_PAIR_CONFIGS = {
    dtype: helion.Config(block_sizes=[1, 64, 128], num_warps=8, num_stages=4)
    for dtype in (torch.bfloat16, torch.float16, torch.float32)
}
# implementation="auto" runs the per-pair kernel, outside CUDA graphs, up to PER_PAIR_MAX_PAIRS
# pairs and up to one pair per PER_PAIR_EXPERTS_PER_PAIR experts. An eager call takes about the
# larger of its host time and its GPU time; on an H200 (NOTES.md, one run) the per-pair call
# with the tiles above took 312-525 us at 1-4 Mixtral-8x7B tokens (2-8 pairs on 8 experts)
# where the flat call took 440-699 us of host time; at 8 tokens the flat call won (494 against
# 848 us). At DeepSeek-V3's 256 experts the per-pair call won at 1 and 2 tokens (16 pairs:
# 398 against 431 us) and lost at 4 (492 against 456 us).
PER_PAIR_MAX_PAIRS = 8
PER_PAIR_EXPERTS_PER_PAIR = 16
# The layer (moe_experts) runs its two per-pair kernels (``moe_experts_per_pair``) outside CUDA
# graph capture while its pairs are few and their expert weights small. Where it runs, the
# per-pair kernels read each pair's weights (a shared expert once per pair) at 1.2-3.7 TB/s on
# an H200, while the flat path spent a median 164 us more host time per call on its metadata
# and launches. In that run (results/layer_decode.csv: six models at 1-32 tokens, eager) the
# per-pair layer was the faster one wherever its pairs' weights (pairs x one expert's gate_up
# and down) came to at most 1 GiB, except gpt-oss-120b's 16 pairs (0.80x), and the flat one
# wherever they came to more, except three points of 32-256 pairs of small experts (Qwen3
# models, where per pair was 1.2-2.0x faster). On the CPU the interpreter's time grows with the
# programs instead: 64 pairs per pair took 3.4x the flat layer's time there, 16 pairs 1.06x.
LAYER_PER_PAIR_MAX_BYTES = 2**30
LAYER_PER_PAIR_MAX_PAIRS = {"cuda": 64, "cpu": 16}  # by the device's type


def run_kernel(
    kernel: helion.Kernel,
    args: tuple[torch.Tensor, ...],
    config: helion.Config,
    index_dtype: torch.dtype = torch.int32,
) -> torch.Tensor:
    """Run a Helion kernel with an explicit config (compiled once per config, then cached).

    Without a config Helion would autotune on the first call, which needs a GPU and minutes.
    ``index_dtype`` is the type of the kernel's element offsets (``kernel_index_dtype``).
    """
    return kernel_with_config(kernel, config, index_dtype)(*args)


@functools.cache
def kernel_with_config(
    kernel: helion.Kernel, config: helion.Config, index_dtype: torch.dtype = torch.int32
) -> helion.Kernel:
    """``kernel`` declared again with ``config`` as its only config, once per config.

    Helion dispatches repeat calls of such a kernel on a cheap key of the arguments' shapes and
    strides, where ``kernel.bind(args)`` would rebuild the full key on every call: 42 instead
    of 72 microseconds of host time per call of the flat kernel on the H200 machine
    (``NOTES.md``). ``key=sizes_of_one`` as for the flat kernel, which all kernels need.
    """
    settings = dataclasses.replace(kernel.settings, index_dtype=index_dtype)
    return helion.kernel(kernel.fn, config=config, settings=settings, key=sizes_of_one)


def triton_code(
    kernel: helion.Kernel, args: tuple[torch.Tensor, ...], config: helion.Config
) -> str:
    """The Triton code Helion generates for ``kernel`` at ``config``, without its
    ``# src[...]`` comments that repeat the Helion source line by line."""
    code = kernel.bind(args).to_triton_code(config)
    return "\n".join(line for line in code.splitlines() if not line.lstrip().startswith("# src["))


@dataclasses.dataclass(frozen=True)
class SeedSchedule:
    """The work of the per-expert grid of the OGS kernels, counted in output tiles."""

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
    tiles by ceil(N / block_n) column tiles, however few tokens it has."""
    counts = expert_token_counts.long().cpu()
    n_tiles = math.ceil(N / block_n)
    return SeedSchedule(
        programs=len(counts),
        tiles_per_program=math.ceil(int(counts.max()) / block_t) * n_tiles,
        useful_tiles=int((counts + block_t - 1).div(block_t, rounding_mode="floor").sum())
        * n_tiles,
    )


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------


def moe_matmul_loop_reference(
    A: torch.Tensor,  # [T, K]
    W: torch.Tensor,  # [E, K, N]
    expert_ids: torch.Tensor,  # [T]
) -> torch.Tensor:  # [T, N]
    """The seed's reference: one PyTorch matmul per expert over the rows routed to it, in A's
    dtype (W's expert matrices are converted to it one at a time, so a float64 reference never
    holds a float64 copy of all of W)."""
    C = torch.empty(A.shape[0], W.shape[2], device=A.device, dtype=A.dtype)
    for e in range(W.shape[0]):
        token_idx = (expert_ids == e).nonzero(as_tuple=True)[0]
        if token_idx.numel() == 0:
            continue
        C[token_idx] = A[token_idx] @ W[e].to(A.dtype)
    return C


def moe_matmul_reference_fp64(
    A: torch.Tensor,  # [T, K]
    W: torch.Tensor,  # [E, K, N]
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None = None,  # expert_ids' shape
) -> torch.Tensor:  # [T, N] float64
    """The loop reference on inputs upcast to float64: the yardstick for every check.

    With top-k routing it runs once per rank j (each token's j-th expert) and sums the
    outputs, weighted by ``combine_weights`` (one when None).
    """
    ids = as_top_k(expert_ids)
    weights = torch.ones(ids.shape) if combine_weights is None else as_top_k(combine_weights)
    return sum(
        weights[:, j, None].to(A.device, torch.float64)
        * moe_matmul_loop_reference(A.double(), W, ids[:, j])
        for j in range(ids.shape[1])
    )


def activation_reference(name: str, x: torch.Tensor) -> torch.Tensor:
    """The activations of ``ACTIVATIONS`` as PyTorch computes them."""
    if name == "silu":
        return torch.nn.functional.silu(x)
    return torch.nn.functional.gelu(x, approximate="tanh")


def moe_experts_reference_fp64(
    A: torch.Tensor,  # [T, K]
    W_gate_up: torch.Tensor,  # [E, K, 2I] gate columns then up columns
    W_down: torch.Tensor,  # [E, I, N]
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None = None,  # expert_ids' shape
    activation: str = "silu",
) -> torch.Tensor:  # [T, N] float64
    """The gated MLP experts of an MoE layer in float64, one (token, expert) pair at a time:
    ``sum_j w_tj * down_e(act(A[t] @ gate_e) * (A[t] @ up_e))`` with ``e = expert_ids[t, j]``.
    Only the experts of the given tokens are upcast, one at a time, on the weights' device."""
    ids = as_top_k(expert_ids).tolist()
    if combine_weights is None:
        weights = [[1.0] * len(experts) for experts in ids]
    else:
        weights = as_top_k(combine_weights).tolist()
    I = W_gate_up.shape[2] // 2  # noqa: E741
    rows = []
    for t, experts in enumerate(ids):
        row = torch.zeros(W_down.shape[2], dtype=torch.float64, device=W_down.device)
        for e, weight in zip(experts, weights[t], strict=True):
            projected = A[t].double() @ W_gate_up[e].double()
            hidden = activation_reference(activation, projected[:I]) * projected[I:]
            row += weight * (hidden @ W_down[e].double())
        rows.append(row)
    return torch.stack(rows) if rows else A.new_zeros(0, W_down.shape[2], dtype=torch.float64)


def moe_experts_gather_reference(
    A: torch.Tensor,  # [T, K]
    W_gate_up: torch.Tensor,  # [E, K, 2I]
    W_down: torch.Tensor,  # [E, I, N]
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None = None,  # expert_ids' shape
    activation: str = "silu",
) -> torch.Tensor:  # [T, N]
    """The experts layer in differentiable PyTorch ops, gathering each pair's expert weights
    (a [T, K, 2I] copy per rank j): the float64 yardstick for the layer's gradients."""
    ids = as_top_k(expert_ids)
    weights = (
        torch.ones(ids.shape, device=A.device)
        if combine_weights is None
        else as_top_k(combine_weights)
    )
    I = W_gate_up.shape[2] // 2  # noqa: E741
    out = 0
    for j in range(ids.shape[1]):
        projected = torch.einsum("tk,tkn->tn", A, W_gate_up[ids[:, j]])
        hidden = activation_reference(activation, projected[:, :I]) * projected[:, I:]
        out = out + weights[:, j, None] * torch.einsum("ti,tin->tn", hidden, W_down[ids[:, j]])
    return out


def moe_matmul_dense_reference(
    A: torch.Tensor,  # [T, K]
    W: torch.Tensor,  # [E, K, N]
    expert_ids: torch.Tensor,  # [T]
) -> torch.Tensor:  # [T, N]
    """Dense one-hot formulation: every token through every expert, then keep its own.

    E times the arithmetic and a [T, E, N] intermediate, but no data-dependent indexing at all:
    the result is ``sum_e onehot[t, e] * (A @ W[e])[t]``.
    """
    onehot = torch.nn.functional.one_hot(expert_ids.long(), W.shape[0]).to(A.dtype)  # [T, E]
    every_expert = torch.einsum("tk,ekn->ten", A, W)  # [T, E, N]
    return torch.einsum("te,ten->tn", onehot, every_expert)


def moe_matmul_grouped_mm(
    A: torch.Tensor,  # [T, K]
    W: torch.Tensor,  # [E, K, N]
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None = None,  # expert_ids' shape
) -> torch.Tensor:  # [T, N]
    """PyTorch's grouped GEMM as a whole pipeline: sort, gather, ``torch._grouped_mm``, scatter.

    ``torch._grouped_mm`` multiplies consecutive row groups of its first operand by one matrix
    each; group e ends at row ``offs[e]``. It needs row strides that are multiples of 16 bytes
    (K and N multiples of 8 in 16-bit dtypes). With top-k routing the rows are the (token,
    expert) pairs, and a last step sums each token's k rows, weighted, in float32.
    """
    T = A.shape[0]
    pair_experts = as_top_k(expert_ids)
    top_k = pair_experts.shape[1]
    sort = sort_tokens_by_expert(pair_experts.flatten(), W.shape[0])
    pairs = sort.sorted_to_orig_token_idx.long()
    rows = pairs if top_k == 1 else pairs // top_k
    C_sorted = torch._grouped_mm(A[rows], W, offs=sort.expert_token_offsets[1:])
    C_pairs = torch.empty_like(C_sorted)
    C_pairs[pairs] = C_sorted
    if combine_weights is None and top_k == 1:
        return C_pairs
    weights = (
        torch.ones_like(pair_experts, dtype=torch.float32)
        if combine_weights is None
        else as_top_k(combine_weights)
    )
    weighted = C_pairs.view(T, top_k, -1) * weights[..., None]
    return weighted.sum(dim=1, dtype=torch.float32).to(A.dtype)


# ---------------------------------------------------------------------------------------------
# Entry points: moe_matmul, and the layer's moe_experts
# ---------------------------------------------------------------------------------------------

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT32_MAX = torch.iinfo(torch.int32).max


def _largest_offset(tensor: torch.Tensor) -> int:
    """Largest element offset a kernel computes into ``tensor``: sum of (size - 1) * stride."""
    if tensor.numel() == 0:
        return 0
    return sum(
        (size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
    )


def validate_moe_inputs(
    A: torch.Tensor,  # [T, K]
    W: torch.Tensor,  # [E, K, N]
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None = None,  # expert_ids' shape
    weight_name: str = "W",  # what the caller calls W (moe_experts: "W_gate_up")
) -> None:
    """Raise a clear error, naming the argument, for inputs the kernels cannot take.

    Raises:
        TypeError: An argument is not a tensor, a dtype is unsupported or A and W differ, or
            expert_ids is not integer, or combine_weights is not floating point.
        ValueError: A shape, device or size is out of range. (The values of expert_ids are
            checked on the device by ``start_expert_id_check``.)
    """
    named = {"A": A, weight_name: W, "expert_ids": expert_ids}
    if combine_weights is not None:
        named["combine_weights"] = combine_weights
    for name, value in named.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if A.dim() != 2:
        raise ValueError(f"A must be 2-D [T, K], got shape {tuple(A.shape)}")
    if W.dim() != 3:
        raise ValueError(f"{weight_name} must be 3-D [E, K, N], got shape {tuple(W.shape)}")
    T, K = A.shape
    E, K_w, _ = W.shape
    if K_w != K:
        raise ValueError(f"A is [T, K] with K={K} but {weight_name} is [E, K, N] with K={K_w}")
    if E == 0:
        raise ValueError(f"{weight_name} has no experts (E = 0)")
    if A.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"A has dtype {A.dtype}; supported: {SUPPORTED_DTYPES}")
    if W.dtype != A.dtype:
        raise TypeError(f"{weight_name} has dtype {W.dtype} but A has {A.dtype}; they must match")
    check_integer_ids(expert_ids)
    if expert_ids.dim() not in (1, 2) or expert_ids.shape[0] != T:
        raise ValueError(
            f"expert_ids must have shape [T] or [T, k] with T={T}, got {tuple(expert_ids.shape)}"
        )
    top_k = expert_ids.shape[1] if expert_ids.dim() == 2 else 1
    if not 1 <= top_k <= E:
        raise ValueError(f"expert_ids is [T, k] with k={top_k}; k must be in [1, E={E}]")
    if combine_weights is not None:
        if not combine_weights.dtype.is_floating_point:
            raise TypeError(
                f"combine_weights must be a floating-point tensor, got {combine_weights.dtype}"
            )
        if combine_weights.shape != expert_ids.shape:
            raise ValueError(
                f"combine_weights must have expert_ids' shape {tuple(expert_ids.shape)}, "
                f"got {tuple(combine_weights.shape)}"
            )
    # Element offsets may pass int32 (kernel_index_dtype), but pairs and slots are numbered
    # in int32 by the routing metadata: P plus at most E * (128 - 1) padding slots.
    if T * top_k + E * 128 > _INT32_MAX:
        raise ValueError(
            f"expert_ids routes {T * top_k} (token, expert) pairs; the routing metadata numbers "
            f"pairs and their padded slots in int32, so split the tokens into batches"
        )
    for name, tensor in named.items():
        if tensor.device.type != DEVICE.type:
            raise ValueError(
                f"{name} is on {tensor.device} but the kernels run on {DEVICE.type} here"
            )
    if len({tensor.device for tensor in named.values()}) != 1:
        devices = ", ".join(f"{name} on {tensor.device}" for name, tensor in named.items())
        raise ValueError(f"{', '.join(named)} must be on one device, got {devices}")


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an op on ``tensors`` here: grad mode is on and one of them
    requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def kernel_index_dtype(
    A: torch.Tensor,  # [T, K]
    W: torch.Tensor,  # [E, K, N]
    num_pairs: int,
) -> torch.dtype:
    """The type of a kernel's element offsets: int32 while every offset into A, W and the
    [P, N] output fits it (cheaper address arithmetic), else int64.

    Helion picks int64 by itself only for an input of more than 2**31 elements; the output is
    allocated inside the kernel and a view's strides can reach past its element count, so the
    largest offset is computed here. DeepSeek-V3's experts' gate_up weights, [256, 7168, 4096],
    have 7.5e9 elements.
    """
    largest = max(_largest_offset(A), _largest_offset(W), num_pairs * W.shape[2] - 1)
    return torch.int64 if largest > _INT32_MAX else torch.int32


def check_expert_id_range(
    expert_ids: torch.Tensor,  # [T] or [T, k] integer, validated by validate_moe_inputs
    num_experts: int,
) -> None:
    """Raise a ValueError naming an expert id outside [0, E). Reads the ids' range on the
    host, so the host waits for the GPU: the per-expert kernels run it first; the flat path
    runs it only once its own check has found a pair that it could not place."""
    lowest, highest = torch.stack(torch.aminmax(expert_ids.flatten().long())).tolist()
    if lowest < 0 or highest >= num_experts:
        bad = lowest if lowest < 0 else highest
        raise ValueError(f"expert_ids must lie in [0, E={num_experts}), found {bad}")


EXPERT_ID_CHECKS = ("device", "host")
# What a failed device-side check says (in the CUDA error's device log).
UNPLACED_PAIRS_MESSAGE = "moe_matmul: expert_ids holds an id outside [0, E)"


def start_expert_id_check(
    all_placed: torch.Tensor,  # 1 element, nonzero when every pair was placed
    expert_ids: torch.Tensor,  # [T] or [T, k] integer, validated by validate_moe_inputs
    num_experts: int,
    mode: str,
) -> Callable[[], None]:
    """Check that the kernels placed every pair, which they do unless an expert id lies
    outside [0, E). The kernels skip such a pair, so nothing reads outside a tensor; the
    check makes sure the caller never takes the result as valid.

    - ``"device"`` (the default): on a GPU a device-side assertion, as PyTorch's own indexing
      makes; nothing waits, and a bad id fails the next CUDA call with "device-side assert
      triggered", after which the process must restart. It is also the check a CUDA graph
      replays.
    - ``"host"``: the flag is copied to pinned host memory behind a CUDA event; the returned
      function, called once the caller has issued its work, waits for that event only and
      raises a ValueError naming the bad id. The process lives on, but every call waits for its
      metadata, so the host can no longer run ahead of the GPU.

    On the CPU both raise the ValueError at once: the host holds the flag already. The returned
    function finishes the check (it does nothing unless the mode is "host" on a GPU).
    """
    if not all_placed.is_cuda:
        if not bool(all_placed):
            check_expert_id_range(expert_ids, num_experts)
        return lambda: None
    if mode == "device":
        torch._assert_async(all_placed, UNPLACED_PAIRS_MESSAGE)
        return lambda: None
    if torch.cuda.is_current_stream_capturing():
        raise ValueError(
            "expert_id_check='host' waits for the GPU, which a CUDA graph being captured "
            "cannot; use expert_id_check='device'"
        )
    on_host = torch.empty(all_placed.shape, dtype=all_placed.dtype, pin_memory=True)
    on_host.copy_(all_placed, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(all_placed.device))  # the stream of the copy

    def finish() -> None:
        copied.synchronize()
        if not bool(on_host):
            check_expert_id_range(expert_ids, num_experts)
            raise RuntimeError("the metadata left pairs out although every expert id is valid")

    return finish


def check_config(config: helion.Config) -> None:
    """Raise a clear error naming ``config`` unless it is a Helion config whose
    ``block_sizes`` are three positive tiles, of [tokens, N, K]."""
    if not isinstance(config, helion.Config):
        raise TypeError(
            f"config must be a helion.Config (or None), got {type(config).__name__}; e.g. "
            "helion.Config(block_sizes=[128, 256, 64], num_warps=8, num_stages=3)"
        )
    block_sizes = config.config.get("block_sizes")
    if (
        not isinstance(block_sizes, list | tuple)
        or len(block_sizes) != 3
        or not all(isinstance(size, int) and size > 0 for size in block_sizes)
    ):
        raise ValueError(
            f"config's block_sizes must be three positive tiles [tokens, N, K], got {block_sizes!r}"
        )


def split_token_block(
    config: helion.Config, implementation: str = "flat"
) -> tuple[int, helion.Config]:
    """Split a config for ``moe_matmul`` into the token block and the kernel's config.

    Every implementation takes ``block_sizes`` as the tiles of [tokens, N, K]. The flat kernel
    gets its token block from the aligned routing instead, so the first entry goes to
    ``align_to_blocks`` and the rest (N and K tiles, warps, stages...) to the kernel; the
    per-pair kernel's token block is one pair.
    """
    block_t, *block_n_k = config["block_sizes"]
    if implementation == "per_pair":
        if block_t != 1:
            raise ValueError(
                "implementation 'per_pair' runs one pair per program: config's token block "
                f"(block_sizes[0]) must be 1, got {block_t}"
            )
    elif block_t < 16 or block_t & (block_t - 1):
        raise ValueError(
            f"config's token block (block_sizes[0]) must be a power of two >= 16, got {block_t}"
        )
    return block_t, helion.Config(**{**config.config, "block_sizes": block_n_k})


def pair_weights(
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None,  # expert_ids' shape, or None for weights of one
) -> torch.Tensor:  # [T, k] float32, contiguous
    """The flat kernel's combine weights: one per (token, expert) pair, in float32."""
    if combine_weights is None:
        return torch.ones(as_top_k(expert_ids).shape, device=expert_ids.device)
    return as_top_k(combine_weights).float().contiguous()


def flat_kernel_args(
    A: torch.Tensor,  # [T, K]
    W: torch.Tensor,  # [E, K, N]
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None,  # expert_ids' shape, or None for weights of one
    block_t: int,
) -> tuple[torch.Tensor, ...]:
    """The five arguments of ``moe_matmul_flat``: routing aligned to ``block_t``-pair blocks."""
    routing = align_to_blocks(expert_ids, W.shape[0], block_t)
    return routing.kernel_args(A, W, pair_weights(expert_ids, combine_weights))


def one_token_as_two(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Each [1, ...] tensor as [2, ...], two copies of its row (views; None stays None).

    Helion specializes sizes of 1, and its gather from a dimension of size 1 drops that
    dimension, so the flat kernel runs a one-token batch as two copies of its token: both fit
    in the token block that one token fills anyway, so the second costs nothing.
    """
    return tuple(None if t is None else t.expand(2, *t.shape[1:]) for t in tensors)


def sum_over_experts(pair_outputs: torch.Tensor) -> torch.Tensor:  # [T, k, N] -> [T, N]
    """Each token's k weighted expert outputs summed in float32: the one pass after the kernel.

    A fixed order of additions, so the result is the same on every run (atomic adds into C
    from the kernel would finish in whatever order the programs do).
    """
    if pair_outputs.shape[1] == 1:
        return pair_outputs[:, 0]
    return pair_outputs.sum(dim=1, dtype=torch.float32).to(pair_outputs.dtype)


# Configs found by autotuning (notebook 08), per card and problem; moe_matmul reuses them.
TUNED_CONFIGS_PATH = Path(__file__).parent / "notebooks" / "results" / "tuned_configs.json"


def tuned_config_key(
    dtype: torch.dtype, num_pairs: int, K: int, N: int, E: int, card: str | None = None
) -> str:
    """Key of a tuned config: the card it was tuned on (this machine's when None) and the
    problem's sizes."""
    return f"{card or this_card()} | {dtype} | pairs={num_pairs} K={K} N={N} E={E}"


@functools.cache
def this_card() -> str:
    """The name of this machine's GPU ("cpu" without one), asked once."""
    return torch.cuda.get_device_name() if ON_GPU else "cpu"


def load_tuned_configs() -> dict[str, helion.Config]:
    """The saved tuned configs, by ``tuned_config_key`` (none if the file does not exist).

    ``moe_matmul`` asks on every call, so the file is parsed once per version of it.
    """
    if not TUNED_CONFIGS_PATH.exists():
        return {}
    return _read_tuned_configs(TUNED_CONFIGS_PATH, TUNED_CONFIGS_PATH.stat().st_mtime_ns)


@functools.cache
def _read_tuned_configs(path: Path, mtime_ns: int) -> dict[str, helion.Config]:
    saved = json.loads(path.read_text())
    return {key: helion.Config(**config) for key, config in saved.items()}


def save_tuned_config(key: str, config: helion.Config) -> None:
    """Add (or replace) one tuned config in ``TUNED_CONFIGS_PATH``."""
    saved = json.loads(TUNED_CONFIGS_PATH.read_text()) if TUNED_CONFIGS_PATH.exists() else {}
    saved[key] = dict(config)
    TUNED_CONFIGS_PATH.write_text(json.dumps(saved, indent=1, sort_keys=True) + "\n")


def flat_token_block(num_pairs: int, num_experts: int) -> int:
    """The flat kernel's token block for a routing: twice the pairs an expert gets on average,
    as a power of two from 16 to 128.

    Each block of an expert reads all of its weights, so while the weights are what takes the
    time (few pairs per expert) a block should hold an expert's whole share, which varies
    around the average: with twice the average, most experts fill one block and their weights
    are read once (16-row blocks at 16 pairs per expert were 1.2x slower than 32-row ones at
    DeepSeek-V3, T = 512). From 64 pairs per expert on, the GEMM is bound by arithmetic and
    128-row tiles are the fastest.
    """
    average = -(-num_pairs // num_experts)
    return min(128, max(16, helion.next_power_of_2(2 * average)))


def default_config(
    implementation: str, dtype: torch.dtype, num_pairs: int, K: int, N: int, E: int
) -> helion.Config:
    """The config ``moe_matmul`` runs when given none.

    Per-expert kernels: ``DEFAULT_CONFIGS[dtype]``; per-pair kernel: ``PER_PAIR_CONFIGS[dtype]``.
    Flat kernel: a config tuned for this card and problem if one was saved (notebook 08), else
    ``FLAT_CONFIGS[dtype][flat_token_block(num_pairs, E)]``.
    """
    if implementation == "per_pair":
        return PER_PAIR_CONFIGS[dtype]
    if implementation != "flat":
        return DEFAULT_CONFIGS[dtype]
    tuned = load_tuned_configs().get(tuned_config_key(dtype, num_pairs, K, N, E))
    if tuned is not None:
        return tuned
    return FLAT_CONFIGS[dtype][flat_token_block(num_pairs, E)]


def per_pair_max_pairs(num_experts: int) -> int:
    """Up to how many pairs ``implementation="auto"`` runs the per-pair kernel: while pairs
    rarely share an expert (at most one pair per ``PER_PAIR_EXPERTS_PER_PAIR`` experts), it
    reads each active expert's weights once, as the flat kernel does, in one launch instead of
    three; and always up to ``PER_PAIR_MAX_PAIRS``."""
    return max(PER_PAIR_MAX_PAIRS, num_experts // PER_PAIR_EXPERTS_PER_PAIR)


def capturing_cuda_graph() -> bool:
    """Whether a CUDA graph is being captured on the current stream. A graph launches
    everything for the cost of one launch, so the flat kernels' GPU speed counts there."""
    return ON_GPU and torch.cuda.is_current_stream_capturing()


def choose_implementation(
    num_pairs: int,
    num_experts: int,
    config: helion.Config | None,
) -> str:
    """What ``implementation="auto"`` runs. With a config, its token block decides: 1 is the
    per-pair kernel, larger the flat one. Without: the per-pair kernel for at most
    ``per_pair_max_pairs(E)`` pairs, one launch where the host's launches set the pace, unless
    a CUDA graph is being captured; else the flat kernel."""
    if config is not None:
        return "per_pair" if config["block_sizes"][0] == 1 else "flat"
    few = num_pairs <= per_pair_max_pairs(num_experts)
    return "per_pair" if few and not capturing_cuda_graph() else "flat"


def layer_pairs_are_few(num_pairs: int, expert_bytes: int, device_type: str = DEVICE.type) -> bool:
    """The layer's per-pair bound: at most ``LAYER_PER_PAIR_MAX_PAIRS[device_type]`` pairs whose
    expert weights (``expert_bytes`` each, gate_up and down) come to at most
    ``LAYER_PER_PAIR_MAX_BYTES``, counting a shared expert once per pair as the per-pair
    kernels read it."""
    few = num_pairs <= LAYER_PER_PAIR_MAX_PAIRS[device_type]
    return few and num_pairs * expert_bytes <= LAYER_PER_PAIR_MAX_BYTES


def layer_path(
    num_pairs: int,
    W_gate_up: torch.Tensor,  # [E, K, 2I]
    W_down: torch.Tensor,  # [E, I, N]
) -> str:
    """What ``moe_experts`` runs without configs: "per_pair" (``moe_experts_per_pair``) outside
    CUDA graph capture while ``layer_pairs_are_few`` on this machine; else "flat"."""
    expert_bytes = (W_gate_up[0].numel() + W_down[0].numel()) * W_gate_up.element_size()
    few = layer_pairs_are_few(num_pairs, expert_bytes)
    return "per_pair" if few and not capturing_cuda_graph() else "flat"


def moe_matmul(
    A: torch.Tensor,  # [T, K]
    W: torch.Tensor,  # [E, K, N]
    expert_ids: torch.Tensor,  # [T] or [T, k] integer, values in [0, E)
    combine_weights: torch.Tensor | None = None,  # expert_ids' shape
    *,
    implementation: str = "auto",
    config: helion.Config | None = None,
    expert_id_check: str = "device",
) -> torch.Tensor:  # [T, N], A's dtype
    """MoE matmul: row t of the result is ``sum_j combine_weights[t, j] * A[t] @ W[e_tj]``
    where ``e_tj = expert_ids[t, j]`` (top-1: ``expert_ids`` is [T]).

    Args:
        A: Token activations.
        W: One [K, N] weight matrix per expert.
        expert_ids: The expert of each token ([T]) or its k experts ([T, k]).
        combine_weights: The weight of each (token, expert) pair; None weighs each by one.
        implementation: "auto" (``choose_implementation``: "per_pair" for a few pairs, else
            "flat") or a key of ``IMPLEMENTATIONS``. The per-expert kernels ("seed",
            "masked_store") take top-1 routing without combine weights; "flat" takes up to
            ``MAX_METADATA_EXPERTS`` experts.
        config: Helion config whose ``block_sizes`` are the tiles of [tokens, N, K] (the
            per-pair kernel's token tile is 1); ``default_config(...)`` when None.
        expert_id_check: How the flat and per-pair paths check that every expert id lies in
            [0, E) (``start_expert_id_check``): "device" (a device-side assertion; nothing
            waits for the GPU) or "host" (waits for the check, raises ValueError: on the flat
            path for the routing metadata, on the per-pair path for the kernel).

    Returns:
        The MoE layer's output, a new tensor; the inputs are not modified. When A, W or
        combine_weights requires grad, the call runs the flat path through
        ``MoEMatmulFunction``, whose backward is ``moe_matmul_backward``.

    Raises:
        TypeError, ValueError: for input the kernels cannot take, naming the argument
            (``validate_moe_inputs``). An expert id outside [0, E) raises a ValueError naming
            ``expert_ids`` on the CPU, with the per-expert kernels, and with
            ``expert_id_check="host"``; on a GPU with "device" it fails a later CUDA call with
            "device-side assert triggered" (the kernels skip the pair, so they never read
            outside a tensor).
    """
    if implementation != "auto" and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be 'auto' or one of {sorted(IMPLEMENTATIONS)}, "
            f"got {implementation!r}"
        )
    if expert_id_check not in EXPERT_ID_CHECKS:
        raise ValueError(
            f"expert_id_check must be one of {EXPERT_ID_CHECKS}, got {expert_id_check!r}"
        )
    validate_moe_inputs(A, W, expert_ids, combine_weights)
    if config is not None:
        check_config(config)
    if needs_grad(A, W, combine_weights):
        if implementation not in ("auto", "flat"):
            raise ValueError(
                f"implementation {implementation!r} has no backward; with inputs that require "
                "grad, moe_matmul runs 'flat' (implementation='auto' or 'flat')"
            )
        return MoEMatmulFunction.apply(A, W, expert_ids, combine_weights, config, expert_id_check)
    if implementation == "auto":
        implementation = choose_implementation(expert_ids.numel(), W.shape[0], config)
    if implementation in PER_EXPERT_IMPLEMENTATIONS and (
        expert_ids.dim() != 1 or combine_weights is not None
    ):
        raise ValueError(
            f"implementation {implementation!r} takes top-1 routing (expert_ids [T]) without "
            "combine_weights; 'flat' and 'per_pair' take top-k routing and weights"
        )
    T = A.shape[0]
    E, K, N = W.shape
    if T == 0:
        return A.new_empty(0, N)
    if K == 0:  # a sum of no products: zeros (the ids are still checked)
        check_expert_id_range(expert_ids, E)
        return A.new_zeros(T, N)
    if config is None:
        config = default_config(implementation, A.dtype, expert_ids.numel(), K, N, E)
    index_dtype = kernel_index_dtype(A, W, expert_ids.numel())
    if implementation in PER_EXPERT_IMPLEMENTATIONS:
        check_expert_id_range(expert_ids, E)  # the per-expert kernels index with the ids
        args = sort_tokens_by_expert(expert_ids, E).kernel_args(A, W)
        return run_kernel(IMPLEMENTATIONS[implementation], args, config, index_dtype)
    if implementation == "per_pair":
        weights = pair_weights(expert_ids, combine_weights)
        _, kernel_config = split_token_block(config, "per_pair")
        pair_experts = as_top_k(expert_ids).contiguous()  # the kernel reads it as [T * k]
        placed = torch.empty(pair_experts.numel(), dtype=torch.int32, device=A.device)
        stored, nk_layout = expert_weights_in_place(W)
        args = (A, stored, pair_experts, weights, placed, nk_layout)
        pair_outputs = run_kernel(moe_matmul_per_pair, args, kernel_config, index_dtype)
        finish_check = start_expert_id_check(placed.all(), expert_ids, E, expert_id_check)
        out = sum_over_experts(pair_outputs)
    else:
        if T == 1:
            A, expert_ids, combine_weights = one_token_as_two(A, expert_ids, combine_weights)
        weights = pair_weights(expert_ids, combine_weights)
        block_t, kernel_config = split_token_block(config)
        routing = align_to_blocks(expert_ids, E, block_t)
        finish_check = start_expert_id_check(routing.all_placed, expert_ids, E, expert_id_check)
        args = routing.kernel_args(A, W, weights)
        out = sum_over_experts(run_kernel(moe_matmul_flat, args, kernel_config, index_dtype))
        out = out[:T]
    finish_check()  # "host": waits for the check only, issued before the matmul finishes
    return out


def check_output_grad(
    grad_out: torch.Tensor,  # [T, N] the gradient of a forward's output
    shape: tuple[int, int],  # [T, N]
    name: str,  # the forward's name in the possessive ("moe_matmul's"), for the message
) -> None:
    """Raise a clear error unless ``grad_out`` is a floating-point tensor of ``shape``."""
    if not isinstance(grad_out, torch.Tensor) or not grad_out.dtype.is_floating_point:
        raise TypeError(
            f"the gradient of {name} output must be a floating-point tensor, got "
            f"{getattr(grad_out, 'dtype', type(grad_out).__name__)}"
        )
    if grad_out.shape != shape:
        raise ValueError(
            f"the gradient of {name} output must have its shape [T, N] = {list(shape)}, "
            f"got {tuple(grad_out.shape)}"
        )


def backward_routing_inputs(
    grad_out: torch.Tensor,  # [T, N], checked by check_output_grad
    A: torch.Tensor,  # [T, K]
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # grad, A, ids, weights
    """What a backward runs its kernels on, as the forward ran them: the gradient in A's dtype,
    [T, k] ids and float32 weights, and a one-token batch as two copies of its token
    (``one_token_as_two``) whose second gradient row is zero, so no weight gradient counts it."""
    grad = grad_out.to(A.dtype).contiguous()
    ids, weights = as_top_k(expert_ids), pair_weights(expert_ids, combine_weights)
    if A.shape[0] == 1:
        A, ids, weights = one_token_as_two(A, ids, weights)
        weights = weights.contiguous()
        grad = torch.cat([grad, torch.zeros_like(grad)])
    return grad, A, ids, weights


def moe_matmul_backward(
    grad_out: torch.Tensor,  # [T, N] the gradient of moe_matmul's output
    A: torch.Tensor,  # [T, K]
    W: torch.Tensor,  # [E, K, N], either layout
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None,  # expert_ids' shape
    config: helion.Config | None,  # the forward's (its token block is reused)
    needs: tuple[bool, bool, bool],  # which of A, W, combine_weights need a gradient
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:  # dA, dW, dweights
    """The three gradients of ``moe_matmul``, from Helion kernels and the forward's routing:

    - dA[t] = sum_j w_tj grad[t] @ W[e_tj]^T: the flat kernel itself, on W^T read in place
      (``expert_weights_in_place`` sees the transposed view), weights in its epilogue;
    - dW[e] = sum over e's pairs of w_p A[t_p]^T grad[t_p]: ``moe_weight_grad``;
    - dw_tj = <grad[t] @ W[e_tj]^T, A[t]>: when the weights need a gradient,
      ``moe_matmul_input_backward`` runs instead of the flat kernel, the same schedule with a
      dot against A's tile in its epilogue, before the weight is applied.

    The routing is recomputed (one metadata launch pair) rather than saved; nothing else but the
    inputs is kept from the forward.
    """
    T, K = A.shape
    E, _, N = W.shape
    check_output_grad(grad_out, (T, N), "moe_matmul's")
    need_A, need_W, need_weights = needs
    need_weights = need_weights and combine_weights is not None
    if T == 0 or K == 0 or N == 0:
        return (
            torch.zeros_like(A) if need_A else None,
            torch.zeros(W.shape, dtype=W.dtype, device=W.device) if need_W else None,
            torch.zeros_like(combine_weights) if need_weights else None,
        )
    grad_run, A_run, ids, weights = backward_routing_inputs(
        grad_out, A, expert_ids, combine_weights
    )
    num_pairs = ids.numel()
    if config is None:
        config = default_config("flat", A.dtype, num_pairs, K, N, E)
    block_t = split_token_block(config)[0]
    routing = align_to_blocks(ids, E, block_t)
    dA = dW = d_weights = None
    if need_A or need_weights:
        _, kernel_config = split_token_block(FLAT_CONFIGS[A.dtype][block_t])
        W_t = W.transpose(1, 2)  # [E, N, K]: read in place
        index_dtype = kernel_index_dtype(grad_run, W_t, num_pairs)
        if need_weights:  # the same arguments as the flat kernel's for W, and A
            args = (*routing.kernel_args(grad_run, W, weights), A_run)
            rows, d_weight_parts = run_kernel(
                moe_matmul_input_backward, args, kernel_config, index_dtype
            )
            d_weights = d_weight_parts.sum(-1).view(ids.shape)[:T]
            d_weights = d_weights.view(combine_weights.shape).to(combine_weights.dtype)
        else:
            args = routing.kernel_args(grad_run, W_t, weights)
            rows = run_kernel(moe_matmul_flat, args, kernel_config, index_dtype)  # [T, k, K]
        dA = sum_over_experts(rows)[:T] if need_A else None
    if need_W:
        offsets = routing.expert_block_offsets(E)
        weighted = combine_weights is not None
        args = (A_run, grad_run, routing.sorted_pair_ids, offsets, weights, False, False, weighted)
        dW = run_kernel(
            moe_weight_grad, args, WEIGHT_GRAD_CONFIGS[A.dtype], kernel_index_dtype(A, W, num_pairs)
        )
    return dA, dW, d_weights


class MoEMatmulFunction(torch.autograd.Function):
    """``moe_matmul`` with a backward (``moe_matmul_backward``): what it runs when an input
    requires grad. It saves only references to its inputs (A and W are needed for dW and dA,
    the ids and weights to rebuild the routing); the forward's result is not saved."""

    @staticmethod
    def forward(ctx, A, W, expert_ids, combine_weights, config, expert_id_check):
        ctx.save_for_backward(A, W, expert_ids, combine_weights)
        ctx.config = config
        return moe_matmul(
            A,
            W,
            expert_ids,
            combine_weights,
            implementation="flat",
            config=config,
            expert_id_check=expert_id_check,
        )

    @staticmethod
    def backward(ctx, grad_out):
        A, W, expert_ids, combine_weights = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3])
        dA, dW, d_weights = moe_matmul_backward(
            grad_out, A, W, expert_ids, combine_weights, ctx.config, needs
        )
        return dA, dW, None, d_weights, None, None


def validate_down_weights(
    W_gate_up: torch.Tensor,  # [E, K, 2I], validated by validate_moe_inputs
    W_down: torch.Tensor,  # [E, I, N]
) -> None:
    """Raise a clear error, naming the argument, unless ``W_down`` is the down projection that
    goes with ``W_gate_up``: [E, I, N] for a gate_up of [E, K, 2I], same dtype and device."""
    E, _, N2 = W_gate_up.shape
    if not isinstance(W_down, torch.Tensor):
        raise TypeError(f"W_down must be a torch.Tensor, got {type(W_down).__name__}")
    if N2 % 2:
        raise ValueError(
            f"W_gate_up is [E, K, 2I] with gate columns then up columns, so its last size must "
            f"be even, got {N2}"
        )
    if W_down.dim() != 3 or W_down.shape[:2] != (E, N2 // 2):
        raise ValueError(
            f"W_down must be [E, I, N] = [{E}, {N2 // 2}, N] for W_gate_up of shape "
            f"{tuple(W_gate_up.shape)}, got {tuple(W_down.shape)}"
        )
    if W_down.dtype != W_gate_up.dtype:
        raise TypeError(f"W_down has dtype {W_down.dtype} but W_gate_up has {W_gate_up.dtype}")
    if W_down.device != W_gate_up.device:
        raise ValueError(f"W_down is on {W_down.device} but W_gate_up is on {W_gate_up.device}")


def layer_configs(
    configs: tuple[helion.Config, helion.Config] | None,
    dtype: torch.dtype,
    num_pairs: int,
    num_experts: int,
) -> tuple[int, helion.Config, helion.Config]:
    """The token block and the two kernels' configs of ``moe_experts``: from ``configs``, a
    (gate_up, down) pair of [tokens, N, K] configs with one token block (1 for the per-pair
    kernels), or by the flat rule (``flat_token_block``, ``GATE_UP_CONFIGS``,
    ``FLAT_CONFIGS``)."""
    if configs is None:
        block_t = flat_token_block(num_pairs, num_experts)
        configs = GATE_UP_CONFIGS[dtype][block_t], FLAT_CONFIGS[dtype][block_t]
    if not isinstance(configs, tuple | list) or len(configs) != 2:
        raise TypeError(
            f"configs must be None or a (gate_up, down) pair of helion.Config, got {configs!r}"
        )
    for config in configs:
        check_config(config)
    (block_t, gate_up), (down_block_t, down) = (
        split_token_block(c, "per_pair" if c["block_sizes"][0] == 1 else "flat") for c in configs
    )
    if block_t != down_block_t:
        raise ValueError(
            "configs must share their token block (block_sizes[0]): both GEMMs read one "
            f"routing, got {block_t} and {down_block_t}"
        )
    return block_t, gate_up, down


def moe_experts(
    A: torch.Tensor,  # [T, K]
    W_gate_up: torch.Tensor,  # [E, K, 2I]: gate columns, then up columns
    W_down: torch.Tensor,  # [E, I, N]
    expert_ids: torch.Tensor,  # [T] or [T, k] integer, values in [0, E)
    combine_weights: torch.Tensor | None = None,  # expert_ids' shape
    *,
    activation: str = "silu",
    configs: tuple[helion.Config, helion.Config] | None = None,
    expert_id_check: str = "device",
) -> torch.Tensor:  # [T, N], A's dtype
    """The experts of an MoE layer, gated MLPs: row t of the result is
    ``sum_j combine_weights[t, j] * down_e(act(A[t] @ gate_e) * (A[t] @ up_e))`` with
    ``e = expert_ids[t, j]``, the sum over j in a fixed order.

    The routing metadata is built once (``align_to_blocks``) and read by both GEMMs: the fused
    gate_up kernel (``moe_gate_up_flat``) writes the [P, I] activations of the P pairs, and the
    flat kernel multiplies them by the down weights, one pair per row, weighting each row by its
    combine weight; each token's k rows are then summed in float32 (``sum_over_experts``).

    Args:
        A: Token activations (hidden states).
        W_gate_up: Each expert's gate and up projections side by side, inputs by outputs. The
            transformers layout, ``gate_up_proj`` [E, 2I, K], is read in place as
            ``gate_up_proj.transpose(1, 2)`` (``expert_weights_in_place``).
        W_down: Each expert's down projection; ``down_proj.transpose(1, 2)`` likewise.
        expert_ids, combine_weights, expert_id_check: as for ``moe_matmul``.
        activation: The gate's activation, one of ``ACTIVATIONS``.
        configs: (gate_up, down) Helion configs of [tokens, N, K] tiles with one token block;
            a token block of 1 runs the per-pair kernels (``moe_experts_per_pair``). When None,
            ``layer_path`` chooses: a few pairs of small experts outside CUDA graph capture run
            per pair, and ``layer_configs`` picks the flat kernels' configs for the others.

    Returns:
        A new tensor; the inputs are not modified. When an input requires grad, the call goes
        through ``MoEExpertsFunction``: the forward also keeps each pair's gate and up for the
        backward (``moe_experts_forward``), and the gradients come from
        ``moe_experts_backward``.

    Raises:
        TypeError, ValueError: for input the kernels cannot take, naming the argument.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if expert_id_check not in EXPERT_ID_CHECKS:
        raise ValueError(
            f"expert_id_check must be one of {EXPERT_ID_CHECKS}, got {expert_id_check!r}"
        )
    validate_moe_inputs(A, W_gate_up, expert_ids, combine_weights, weight_name="W_gate_up")
    validate_down_weights(W_gate_up, W_down)
    args = (A, W_gate_up, W_down, expert_ids, combine_weights, activation, configs)
    if needs_grad(A, W_gate_up, W_down, combine_weights):
        return MoEExpertsFunction.apply(*args, expert_id_check)
    return moe_experts_forward(*args, expert_id_check, keep_gate_up=False)[0]


def moe_experts_forward(
    A: torch.Tensor,  # [T, K]
    W_gate_up: torch.Tensor,  # [E, K, 2I], either layout
    W_down: torch.Tensor,  # [E, I, N], either layout
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None,  # expert_ids' shape
    activation: str,
    configs: tuple[helion.Config, helion.Config] | None,
    expert_id_check: str,
    keep_gate_up: bool,  # also return each pair's gate and up, which the backward reads
) -> tuple[torch.Tensor, torch.Tensor | None]:  # [T, N]; [T * k, 2, I] or None
    """``moe_experts`` on checked inputs: the output, and with ``keep_gate_up`` the [P, 2I]
    gate and up of the P pairs, in pair order, which the gate_up kernel stores beside its
    output (None where no kernel runs: no token, K or I)."""
    T, K = A.shape
    E, I, N = W_down.shape  # noqa: E741
    if T == 0:
        return A.new_empty(0, N), None
    if K == 0 or I == 0:  # act(0) * 0 = 0 for every pair (the ids are still checked)
        check_expert_id_range(expert_ids, E)
        return A.new_zeros(T, N), None
    num_pairs = expert_ids.numel()
    if configs is None and layer_path(num_pairs, W_gate_up, W_down) == "per_pair":
        configs = PER_PAIR_CONFIGS[A.dtype], PER_PAIR_CONFIGS[A.dtype]
    block_t, gate_up_config, down_config = layer_configs(configs, A.dtype, num_pairs, E)
    if block_t == 1:
        configs = gate_up_config, down_config
        args = (A, W_gate_up, W_down, expert_ids, combine_weights, activation, configs)
        return moe_experts_per_pair(*args, expert_id_check, keep_gate_up)
    if T == 1:  # the flat rule then picks its token block for the doubled pairs
        A, expert_ids, combine_weights = one_token_as_two(A, expert_ids, combine_weights)
        num_pairs = expert_ids.numel()
        block_t, gate_up_config, down_config = layer_configs(configs, A.dtype, num_pairs, E)
    top_k = as_top_k(expert_ids).shape[1]
    routing = align_to_blocks(expert_ids, E, block_t)
    finish_check = start_expert_id_check(routing.all_placed, expert_ids, E, expert_id_check)
    stored, nk_layout = expert_weights_in_place(W_gate_up)
    gate_up = A.new_empty(num_pairs if keep_gate_up else 0, 2, I)
    gate_up_args = (A, stored, routing.sorted_pair_ids, routing.block_expert_ids, gate_up, top_k)
    gate_up_args += (nk_layout, activation, keep_gate_up)
    hidden = run_kernel(
        moe_gate_up_flat, gate_up_args, gate_up_config, kernel_index_dtype(A, W_gate_up, num_pairs)
    )  # [P, I]
    weights = pair_weights(expert_ids, combine_weights).view(num_pairs, 1)
    down_args = routing.kernel_args(hidden, W_down, weights)  # one pair per row of hidden
    index_dtype = kernel_index_dtype(hidden, W_down, num_pairs)
    pair_outputs = run_kernel(moe_matmul_flat, down_args, down_config, index_dtype)
    out = sum_over_experts(pair_outputs.view(-1, top_k, N))[:T]
    finish_check()
    return out, gate_up[: T * top_k] if keep_gate_up else None


def moe_experts_per_pair(
    A: torch.Tensor,  # [T, K]
    W_gate_up: torch.Tensor,  # [E, K, 2I], either layout
    W_down: torch.Tensor,  # [E, I, N], either layout
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None,
    activation: str,
    configs: tuple[helion.Config, helion.Config],  # (gate_up, down), token block split off
    expert_id_check: str,
    keep_gate_up: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # as moe_experts_forward's
    """``moe_experts_forward`` for a handful of pairs, in two launches and no routing metadata:
    ``moe_gate_up_per_pair`` writes each pair's [I] activations, and ``moe_matmul_per_pair``
    multiplies them by the pair's down weights (one pair per row, so top-1 over the [P, I]
    rows) and weights them; each token's k rows are then summed as in the flat path."""
    T = A.shape[0]
    E, I, N = W_down.shape  # noqa: E741
    gate_up_config, down_config = configs
    pair_experts = as_top_k(expert_ids).contiguous()  # the kernels read it as [T * k]
    num_pairs = pair_experts.numel()
    placed = torch.empty(num_pairs, dtype=torch.int32, device=A.device)
    stored, nk_layout = expert_weights_in_place(W_gate_up)
    gate_up = A.new_empty(num_pairs if keep_gate_up else 0, 2, I)
    args = (A, stored, pair_experts, placed, gate_up, nk_layout, activation, keep_gate_up)
    index_dtype = kernel_index_dtype(A, W_gate_up, num_pairs)
    hidden = run_kernel(moe_gate_up_per_pair, args, gate_up_config, index_dtype)  # [P, I]
    finish_check = start_expert_id_check(placed.all(), expert_ids, E, expert_id_check)
    weights = pair_weights(expert_ids, combine_weights).view(num_pairs, 1)
    stored, nk_layout = expert_weights_in_place(W_down)
    down_placed = torch.empty_like(placed)  # the same flags again
    args = (hidden, stored, pair_experts.view(num_pairs, 1), weights, down_placed, nk_layout)
    index_dtype = kernel_index_dtype(hidden, W_down, num_pairs)
    pair_outputs = run_kernel(moe_matmul_per_pair, args, down_config, index_dtype)
    out = sum_over_experts(pair_outputs.view(T, -1, N))
    finish_check()
    return out, gate_up if keep_gate_up else None


def moe_experts_backward(
    grad_out: torch.Tensor,  # [T, N]
    A: torch.Tensor,  # [T, K]
    W_gate_up: torch.Tensor,  # [E, K, 2I], either layout
    W_down: torch.Tensor,  # [E, I, N], either layout
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None,  # expert_ids' shape
    gate_up: torch.Tensor | None,  # [T * k, 2, I] the forward's (moe_experts_forward's)
    activation: str,
    needs: tuple[bool, bool, bool, bool],  # which of A, W_gate_up, W_down, weights need one
) -> tuple[torch.Tensor | None, ...]:  # dA, dW_gate_up, dW_down, d combine_weights
    """The layer's gradients, in four Helion launches over routing aligned anew (the flat
    rule's token block, whatever the forward ran: the saved gate and up are in pair order):

    1. ``moe_down_backward``: grad_h = grad @ W_down^T (W_down read in place), with the
       pair's weight and the activation's derivative applied in its epilogue to the forward's
       gate and up: d(gate, up) [P, 2I], w * h [P, I] with h = act(gate) * up, and per-tile
       shares of <grad_h_p, h_p>, the combine weights' gradient;
    2. dW_down[e] = sum_p (w_p h_p)^T grad[t_p] and 3. dW_gate_up[e] = sum_p A[t_p]^T d(gate,
       up)_p, both ``moe_weight_grad`` unweighted;
    4. dA = the sum over each token's pairs of d(gate, up)_p @ W_gate_up^T, the flat kernel.

    Saved by the forward: references to its inputs, and the [P, 2I] gate and up (the one
    tensor the derivative needs that the inputs cannot give without repeating the first GEMM).
    """
    T, K = A.shape
    E, I, N = W_down.shape  # noqa: E741
    check_output_grad(grad_out, (T, N), "moe_experts'")
    need_A, need_gate_up, need_down, need_weights = needs
    need_weights = need_weights and combine_weights is not None
    if T == 0 or K == 0 or I == 0:
        return (
            torch.zeros_like(A) if need_A else None,
            torch.zeros_like(W_gate_up) if need_gate_up else None,
            torch.zeros_like(W_down) if need_down else None,
            torch.zeros_like(combine_weights) if need_weights else None,
        )
    grad_run, A_run, ids, weights = backward_routing_inputs(
        grad_out, A, expert_ids, combine_weights
    )
    if T == 1:  # backward_routing_inputs runs one token as two; the second one's rows again
        gate_up = gate_up.repeat(2, 1, 1)
    T_run, top_k = ids.shape
    num_pairs = ids.numel()
    block_t = flat_token_block(num_pairs, E)
    _, dh_config = split_token_block(DOWN_BACKWARD_CONFIGS[A.dtype][block_t])
    _, flat_config = split_token_block(FLAT_CONFIGS[A.dtype][block_t])
    routing = align_to_blocks(ids, E, block_t)
    offsets = routing.expert_block_offsets(E)
    ones = torch.ones_like(weights)

    def index_dtype(*tensors: torch.Tensor) -> torch.dtype:
        return kernel_index_dtype(tensors[0], tensors[1], num_pairs)

    stored, nk_layout = expert_weights_in_place(W_down)
    args = (grad_run, stored, gate_up, routing.sorted_pair_ids, routing.block_expert_ids, weights)
    d_gate_up, weighted_hidden, d_weight_parts = run_kernel(
        moe_down_backward,
        (*args, nk_layout, activation),
        dh_config,
        index_dtype(grad_run, W_down),
    )
    d_weights = None
    if need_weights:
        d_weights = d_weight_parts.sum(-1).view(T_run, top_k)[:T]
        d_weights = d_weights.view(combine_weights.shape).to(combine_weights.dtype)
    dW_down = dW_gate_up = dA = None
    if need_down:
        args = (weighted_hidden, grad_run, routing.sorted_pair_ids, offsets, ones)
        args += (True, False, False)
        dW_down = run_kernel(
            moe_weight_grad,
            args,
            WEIGHT_GRAD_CONFIGS[A.dtype],
            index_dtype(weighted_hidden, W_down),
        )
    if need_gate_up:
        args = (A_run, d_gate_up, routing.sorted_pair_ids, offsets, ones, False, True, False)
        dW_gate_up = run_kernel(
            moe_weight_grad, args, WEIGHT_GRAD_CONFIGS[A.dtype], index_dtype(A_run, W_gate_up)
        )
    if need_A:
        W_gate_up_t = W_gate_up.transpose(1, 2)  # [E, 2I, K]
        one_per_row = torch.ones(num_pairs, 1, device=A.device)
        dA_args = routing.kernel_args(d_gate_up, W_gate_up_t, one_per_row)
        rows = run_kernel(
            moe_matmul_flat, dA_args, flat_config, index_dtype(d_gate_up, W_gate_up_t)
        )
        dA = sum_over_experts(rows.view(T_run, top_k, K))[:T]
    return dA, dW_gate_up, dW_down, d_weights


class MoEExpertsFunction(torch.autograd.Function):
    """``moe_experts`` with a backward (``moe_experts_backward``), what it runs when an input
    requires grad; it saves references to its inputs and the forward's [P, 2I] gate and up."""

    @staticmethod
    def forward(ctx, A, W_gate_up, W_down, expert_ids, combine_weights, activation, configs, check):
        args = (A, W_gate_up, W_down, expert_ids, combine_weights, activation, configs, check)
        out, gate_up = moe_experts_forward(*args, keep_gate_up=True)
        ctx.save_for_backward(A, W_gate_up, W_down, expert_ids, combine_weights, gate_up)
        ctx.activation = activation
        return out

    @staticmethod
    def backward(ctx, grad_out):
        A, W_gate_up, W_down, expert_ids, combine_weights, gate_up = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[i] for i in (0, 1, 2, 4))
        dA, dW_gate_up, dW_down, d_weights = moe_experts_backward(
            grad_out,
            A,
            W_gate_up,
            W_down,
            expert_ids,
            combine_weights,
            gate_up,
            ctx.activation,
            needs,
        )
        return dA, dW_gate_up, dW_down, None, d_weights, None, None, None


# ---------------------------------------------------------------------------------------------
# transformers: the layer as an experts backend
# ---------------------------------------------------------------------------------------------

TRANSFORMERS_EXPERTS = "helion"  # the name register_transformers_experts registers


def transformers_activation(experts: torch.nn.Module) -> str:
    """The entry of ``ACTIVATIONS`` that a transformers experts module's ``act_fn`` computes;
    NotImplementedError naming ``act_fn`` for any other."""
    from transformers import activations

    act = experts.act_fn
    if isinstance(act, activations.SiLUActivation | torch.nn.SiLU):
        return "silu"
    tanh_gelus = (
        activations.GELUTanh,
        activations.FastGELUActivation,
        activations.NewGELUActivation,
    )
    if isinstance(act, tanh_gelus) or (
        isinstance(act, torch.nn.GELU) and act.approximate == "tanh"
    ):
        return "gelu_tanh"
    raise NotImplementedError(
        f"{type(experts).__name__}.act_fn is {type(act).__name__}; the {TRANSFORMERS_EXPERTS!r} "
        f"experts backend computes {ACTIVATIONS} (SiLU, and GELU's tanh approximation)"
    )


def check_transformers_experts(experts: torch.nn.Module) -> None:
    """Raise NotImplementedError, naming the flag, for an experts module whose layout or
    features ``moe_experts`` does not compute: biases, interleaved gate/up rows (gpt-oss), no
    gate, or its own ``_apply_gate``."""
    from transformers.integrations import moe

    name = type(experts).__name__
    for flag, needed in (("has_bias", False), ("has_gate", True), ("is_concatenated", True)):
        if getattr(experts, flag) != needed:
            raise NotImplementedError(
                f"{name} has {flag}={getattr(experts, flag)}; the {TRANSFORMERS_EXPERTS!r} "
                f"experts backend needs {flag}={needed}"
            )
    if type(experts)._apply_gate is not moe._default_apply_gate:
        raise NotImplementedError(
            f"{name} overrides _apply_gate; the {TRANSFORMERS_EXPERTS!r} experts backend "
            "computes the default act_fn(gate) * up only"
        )


def transformers_experts_forward(
    self: torch.nn.Module,  # a transformers experts module (@use_experts_implementation)
    hidden_states: torch.Tensor,  # [T, H]
    top_k_index: torch.Tensor,  # [T, k] integer
    top_k_weights: torch.Tensor,  # [T, k]
    expert_id_check: str = "device",  # as for moe_matmul
) -> torch.Tensor:  # [T, H]
    """transformers' experts interface, computed by ``moe_experts`` on the module's weights
    read in place: ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I] (or their
    transposes when ``is_transposed``)."""
    check_transformers_experts(self)
    activation = transformers_activation(self)
    gate_up, down = self.gate_up_proj, self.down_proj
    if not self.is_transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    try:
        return moe_experts(
            hidden_states,
            gate_up,
            down,
            top_k_index,
            top_k_weights,
            activation=activation,
            expert_id_check=expert_id_check,
        )
    except (TypeError, ValueError) as error:
        raise type(error)(
            f"{error} (in {type(self).__name__}: A is hidden_states, W_gate_up gate_up_proj, "
            "W_down down_proj, expert_ids top_k_index, combine_weights top_k_weights)"
        ) from error


def register_transformers_experts() -> str:
    """Register ``transformers_experts_forward`` in transformers' ``ExpertsInterface`` as
    ``TRANSFORMERS_EXPERTS``, so that ``model.set_experts_implementation("helion")`` (or
    ``from_pretrained(..., experts_implementation="helion")``) runs every MoE block of a model
    on the course's kernels. Returns the name."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(TRANSFORMERS_EXPERTS, transformers_experts_forward)
    return TRANSFORMERS_EXPERTS


# Families of tiny transformers models for tests and notebooks: 2 layers, hidden size 64,
# 4-8 experts, top-2 (DeepSeek-V3's first layer is a dense MLP, as in the real model).
TINY_TRANSFORMERS_MODELS = ("Mixtral", "Qwen3-MoE", "DeepSeek-V3")


def tiny_transformers_model(
    name: str, dtype: torch.dtype = torch.float32, seed: int = 0
) -> torch.nn.Module:  # a transformers PreTrainedModel, in eval mode, on DEVICE
    """A randomly initialised, tiny ``MixtralForCausalLM``, ``Qwen3MoeForCausalLM`` or
    ``DeepseekV3ForCausalLM`` (``TINY_TRANSFORMERS_MODELS``), built from its config: nothing is
    downloaded."""
    import transformers

    common = dict(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_experts_per_tok=2,
    )
    if name == "Mixtral":
        config = transformers.MixtralConfig(intermediate_size=96, num_local_experts=4, **common)
        model_class = transformers.MixtralForCausalLM
    elif name == "Qwen3-MoE":
        config = transformers.Qwen3MoeConfig(
            moe_intermediate_size=48, intermediate_size=96, num_experts=8, head_dim=16, **common
        )
        model_class = transformers.Qwen3MoeForCausalLM
    elif name == "DeepSeek-V3":
        config = transformers.DeepseekV3Config(
            moe_intermediate_size=48,
            intermediate_size=96,
            n_routed_experts=8,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            **common,
        )
        model_class = transformers.DeepseekV3ForCausalLM
    else:
        raise ValueError(f"name must be one of {TINY_TRANSFORMERS_MODELS}, got {name!r}")
    torch.manual_seed(seed)
    return model_class(config).to(DEVICE, dtype).eval()


def count_moe_blocks(model: torch.nn.Module) -> int:
    """How many experts modules (those holding ``gate_up_proj``) a model has."""
    return sum(hasattr(module, "gate_up_proj") for module in model.modules())


# ---------------------------------------------------------------------------------------------
# Expert parallelism: the experts sharded over the processes of a torch.distributed group
# ---------------------------------------------------------------------------------------------

# Collectives give up after this long, so a rank that never arrives fails the others.
EXPERT_PARALLEL_TIMEOUT = datetime.timedelta(seconds=120)
# NVLink multicast stays off in every process (the GPU machines' rule; harmless elsewhere).
NCCL_ENVIRONMENT = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
EXPERT_PARALLEL_PHASES = ("counts", "dispatch", "experts", "combine")


def expert_parallel_backend(device: torch.device) -> str:
    """The torch.distributed backend for tensors on ``device``: NCCL for CUDA, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def pairs_by_rank(
    expert_ids: torch.Tensor,  # [T, k] global expert ids
    experts_per_rank: int,
    world_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([P] pair order, [world] int64 pairs per rank)
    """The dispatch plan: the (token, expert) pairs, numbered ``t * k + j``, in the order they
    are sent (grouped by the rank that holds their expert, in pair order within a rank), and
    how many go to each rank."""
    pair_ranks = expert_ids.flatten().long() // experts_per_rank
    order = torch.argsort(pair_ranks, stable=True)
    return order, torch.bincount(pair_ranks, minlength=world_size)


def _as_bytes(rows: torch.Tensor) -> torch.Tensor:  # [R, C] -> [R, C * itemsize] uint8
    width = rows.shape[1] * rows.element_size()
    return rows.contiguous().view(torch.uint8).view(rows.shape[0], width)


def _input_problem(
    A: torch.Tensor,
    W_gate_up: torch.Tensor,
    W_down: torch.Tensor,
    expert_ids: torch.Tensor,
    combine_weights: torch.Tensor | None,
    num_experts: int,
    world_size: int,
) -> str | None:
    """What is wrong with one rank's input to ``moe_experts_expert_parallel`` (None if
    nothing): found before any collective, so that every rank can be told."""
    if not isinstance(num_experts, int) or num_experts <= 0 or num_experts % world_size:
        return (
            f"num_experts={num_experts!r} must be a positive multiple of the world size "
            f"{world_size}, so that each rank holds the same number of experts"
        )
    try:
        validate_moe_inputs(A, W_gate_up, expert_ids, combine_weights, weight_name="W_gate_up")
        validate_down_weights(W_gate_up, W_down)
    except (TypeError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    if W_gate_up.shape[0] != num_experts // world_size:
        return (
            f"W_gate_up holds {W_gate_up.shape[0]} experts, but num_experts={num_experts} over "
            f"{world_size} ranks is {num_experts // world_size} per rank"
        )
    if expert_ids.numel():
        lowest, highest = torch.stack(torch.aminmax(expert_ids.flatten().long())).tolist()
        if lowest < 0 or highest >= num_experts:
            bad = lowest if lowest < 0 else highest
            return f"expert_ids must lie in [0, num_experts={num_experts}), found {bad}"
    return None


def moe_experts_expert_parallel(
    A: torch.Tensor,  # [T, K] this rank's tokens
    W_gate_up: torch.Tensor,  # [E / world, K, 2I] this rank's experts (either layout)
    W_down: torch.Tensor,  # [E / world, I, N]
    expert_ids: torch.Tensor,  # [T, k] global expert ids in [0, num_experts)
    combine_weights: torch.Tensor | None = None,  # [T, k]
    *,
    num_experts: int,
    group: torch.distributed.ProcessGroup | None = None,
    activation: str = "silu",
    stats: dict[str, object] | None = None,
) -> torch.Tensor:  # [T, N], A's dtype
    """``moe_experts`` with the experts sharded over the ranks of ``group``: rank r holds
    experts ``r * E/world ... (r + 1) * E/world - 1``, and every rank brings its own tokens.

    1. **counts:** each rank sorts its (token, expert) pairs by the rank that holds the expert
       and tells every rank how many it will send (one ``all_to_all_single`` of [world, 2]
       int64: the count and a flag that says whether this rank's input was valid).
    2. **dispatch:** one ``all_to_all_single`` moves the pairs' token rows, each with its local
       expert id and combine weight packed behind it as bytes.
    3. **experts:** each rank runs ``moe_experts`` (top-1: one pair per row) on what it got.
    4. **combine:** the reverse ``all_to_all_single`` brings each pair's weighted output back;
       each token's k outputs are summed in a fixed order (``sum_over_experts``), so the
       result is the same on every run and matches ``moe_experts`` within its tolerance.

    Bad input on any rank (expert ids out of range, num_experts not a multiple of the world
    size, weights of the wrong shape...) raises a ValueError on every rank, naming the rank,
    instead of leaving the others waiting. The split sizes of an ``all_to_all_single`` are
    Python lists, so each call reads the counts on the host: it waits for the GPU once. With
    ``stats`` (a dict), the pairs and bytes sent and received and each phase's seconds are
    written into it; on a GPU the phases are then synchronised to be timed.
    """
    dist = torch.distributed
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    device = A.device
    clock = {"start": time.perf_counter()}

    def phase_done(name: str) -> None:
        if stats is not None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            clock[name] = time.perf_counter()

    problem = _input_problem(A, W_gate_up, W_down, expert_ids, combine_weights, num_experts, world)
    if problem is None:
        experts_per_rank = num_experts // world
        ids = as_top_k(expert_ids)
        T, top_k = ids.shape
        order, send_counts = pairs_by_rank(ids, experts_per_rank, world)
    else:
        send_counts = torch.zeros(world, dtype=torch.long, device=device)
    header = torch.stack([send_counts, torch.full_like(send_counts, problem is not None)], 1)
    received = torch.empty_like(header)
    dist.all_to_all_single(received, header.contiguous(), group=group)
    bad_ranks = received[:, 1].nonzero().flatten().tolist()
    if bad_ranks:
        problems = [None] * world
        dist.all_gather_object(problems, problem, group=group)
        details = "; ".join(f"rank {r}: {problems[r]}" for r in bad_ranks)
        raise ValueError(
            f"moe_experts_expert_parallel got bad input on rank(s) {bad_ranks}: {details}"
        )
    send, recv = send_counts.tolist(), received[:, 0].tolist()
    phase_done("counts")

    weights = pair_weights(expert_ids, combine_weights).flatten()[order]
    local_ids = (ids.flatten()[order] % experts_per_rank).to(torch.int32)
    meta = torch.stack([local_ids, weights.view(torch.int32)], 1)  # [P, 2] int32
    outgoing = torch.cat([_as_bytes(A[order // top_k]), _as_bytes(meta)], 1)
    incoming = outgoing.new_empty(sum(recv), outgoing.shape[1])
    dist.all_to_all_single(incoming, outgoing, recv, send, group=group)
    row_bytes = A.shape[1] * A.element_size()
    rows = incoming[:, :row_bytes].contiguous().view(A.dtype)
    meta = incoming[:, row_bytes:].contiguous().view(torch.int32)
    phase_done("dispatch")

    outputs = moe_experts(
        rows, W_gate_up, W_down, meta[:, 0], meta[:, 1].view(torch.float32), activation=activation
    )  # [received pairs, N], each weighted
    phase_done("experts")

    N = W_down.shape[2]
    returned = outgoing.new_empty(sum(send), N * A.element_size())
    dist.all_to_all_single(returned, _as_bytes(outputs), send, recv, group=group)
    pair_outputs = torch.empty(T * top_k, N, dtype=A.dtype, device=device)
    pair_outputs[order] = returned.view(A.dtype)
    out = sum_over_experts(pair_outputs.view(T, top_k, N))
    phase_done("combine")
    if stats is not None:
        stats.update(
            rank=rank,
            pairs_sent=send,
            pairs_received=recv,
            dispatch_bytes_sent=sum(send[r] for r in range(world) if r != rank) * outgoing.shape[1],
            combine_bytes_sent=sum(recv[r] for r in range(world) if r != rank) * returned.shape[1],
            seconds={
                name: clock[name] - clock[previous]
                for previous, name in zip(
                    ("start", *EXPERT_PARALLEL_PHASES[:-1]), EXPERT_PARALLEL_PHASES, strict=True
                )
            },
        )
    return out


def _expert_parallel_process(
    rank: int,
    world_size: int,
    init_file: Path,
    worker: Callable[..., object],
    args: tuple[object, ...],
    out_dir: Path,
) -> None:
    """One rank of ``run_expert_parallel``: join the group, run the worker, save its result
    (or its traceback) under ``out_dir``, leave the group."""
    import traceback

    try:
        device = torch.device("cuda", rank) if ON_GPU else torch.device("cpu")
        if ON_GPU:
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(
            expert_parallel_backend(device),
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=EXPERT_PARALLEL_TIMEOUT,
        )
        torch.save(worker(rank, world_size, device, *args), out_dir / f"{rank}.pt")
    except BaseException:
        (out_dir / f"{rank}.err").write_text(traceback.format_exc())
        raise SystemExit(1) from None
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_expert_parallel(
    world_size: int,
    worker: Callable[..., object],  # a module-level function: worker(rank, world, device, *args)
    *args: object,
    on_gpus: bool = False,
    timeout_s: float = 300.0,
) -> list[object]:  # the workers' results, by rank
    """Run ``worker`` in ``world_size`` new processes, one rank each of a torch.distributed
    group, and return what each returned.

    With ``on_gpus``, rank r runs on GPU r over NCCL (at most one rank per GPU). Otherwise the
    processes see no GPU (``CUDA_VISIBLE_DEVICES=""``), so the kernels run in Triton's CPU
    interpreter and the group uses gloo: the same code on a laptop, in CI and on a GPU machine.
    Every process runs with ``NCCL_ENVIRONMENT``. The processes are started with "spawn" and
    ended here: joined until ``timeout_s``, then killed by their pids. Raises RuntimeError
    with each failed rank's traceback, or TimeoutError naming the ranks that did not finish.
    """
    if on_gpus and world_size > torch.cuda.device_count():
        raise ValueError(
            f"world_size={world_size} with on_gpus needs {world_size} GPUs, this machine has "
            f"{torch.cuda.device_count()}"
        )
    context = torch.multiprocessing.get_context("spawn")
    child_environment = {**NCCL_ENVIRONMENT}
    if not on_gpus:
        child_environment.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    saved = {name: os.environ.get(name) for name in child_environment}
    with tempfile.TemporaryDirectory() as directory:
        out_dir = Path(directory)
        processes = [
            context.Process(
                target=_expert_parallel_process,
                args=(rank, world_size, out_dir / "init", worker, args, out_dir),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        os.environ.update(child_environment)  # the children read it at start
        try:
            for process in processes:
                process.start()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        deadline = time.monotonic() + timeout_s
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        killed = [rank for rank, process in enumerate(processes) if process.is_alive()]
        for rank in killed:
            processes[rank].kill()
            processes[rank].join()
        errors = {
            rank: (out_dir / f"{rank}.err").read_text()
            for rank in range(world_size)
            if (out_dir / f"{rank}.err").exists()
        }
        if errors:
            raise RuntimeError(
                "\n".join(
                    f"rank {rank} failed:\n{text.strip().splitlines()[-1]}"
                    for rank, text in errors.items()
                )
            )
        if killed:
            raise TimeoutError(f"ranks {killed} did not finish within {timeout_s} s; killed")
        lost = [rank for rank in range(world_size) if not (out_dir / f"{rank}.pt").exists()]
        if lost:
            codes = [processes[rank].exitcode for rank in lost]
            raise RuntimeError(
                f"ranks {lost} exited with codes {codes} before reporting (see their stderr; a "
                "script that starts them needs an `if __name__ == '__main__':` guard)"
            )
        return [
            torch.load(out_dir / f"{rank}.pt", weights_only=False) for rank in range(world_size)
        ]


@dataclasses.dataclass(frozen=True)
class ExpertParallelCase:
    """A layer and a routing that every rank rebuilds from the same seed, so that each can take
    its share: rank r holds experts ``r * E / world ...`` and the r-th slice of the tokens."""

    T: int  # tokens over all ranks
    H: int
    I: int  # noqa: E741
    E: int
    top_k: int
    routing: str = "uniform"  # "uniform", "zipf" (skew 1.5), or "first half": the experts
    # [0, E / 2) only, so that the ranks holding the others receive nothing
    dtype: torch.dtype = torch.float32
    seed: int = 0
    bad_id_rank: int | None = None  # this rank routes its first pair to expert E (bad input)
    warm_up: bool = False  # call the layer once before the call that is timed (compiles it)

    def inputs(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """A [T, H], W_gate_up [E, H, 2I], W_down [E, I, H], expert_ids and weights [T, k]."""
        g = torch.Generator().manual_seed(self.seed)
        A = torch.randn(self.T, self.H, generator=g)
        W_gate_up = torch.randn(self.E, self.H, 2 * self.I, generator=g) / self.H**0.5
        W_down = torch.randn(self.E, self.I, self.H, generator=g) / self.I**0.5
        experts = self.E // 2 if self.routing == "first half" else self.E
        skew = 1.5 if self.routing == "zipf" else 0.0
        ids = route_zipf_top_k(self.T, experts, skew, self.top_k, seed=self.seed, device="cpu")
        weights = torch.softmax(torch.randn(self.T, self.top_k, generator=g), dim=1)
        tensors = (A, W_gate_up, W_down, ids, weights)
        return tuple(
            t.to(device, self.dtype) if t.is_floating_point() else t.to(device) for t in tensors
        )


def expert_parallel_worker(
    rank: int, world_size: int, device: torch.device, case: ExpertParallelCase
) -> dict[str, object]:
    """One rank's run of ``case`` through ``moe_experts_expert_parallel``: its tokens' output
    and the layer's stats (for ``run_expert_parallel``)."""
    A, W_gate_up, W_down, ids, weights = case.inputs(device)
    tokens = torch.tensor_split(torch.arange(case.T), world_size)[rank]
    experts = slice(rank * case.E // world_size, (rank + 1) * case.E // world_size)
    ids = ids[tokens]
    if rank == case.bad_id_rank:
        ids[0, 0] = case.E
    args = (A[tokens], W_gate_up[experts], W_down[experts], ids, weights[tokens])
    if case.warm_up:
        moe_experts_expert_parallel(*args, num_experts=case.E)
    stats = {}
    out = moe_experts_expert_parallel(*args, num_experts=case.E, stats=stats)
    return {"tokens": tokens, "output": out.cpu(), "stats": stats}


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------

# Relative tolerance per dtype of the inputs and the output; the absolute tolerance is the same
# number times the RMS of the reference, because the error of a K-term dot product scales with
# the size of the dot products, not with the one element that happens to be near zero.
# - float16 / bfloat16: the kernels accumulate in fp32 and round once to the output dtype, a
#   relative error of at most 2**-11 (fp16) or 2**-8 (bf16); the tolerance is 4x that.
# - float32 on a GPU: tl.dot of fp32 operands runs on tensor cores in tf32, which keeps 10
#   mantissa bits of each operand, so each product is off by up to about 2**-10 relative.
#   Measured on an H200 at K = 2048 (notebook 03): mean error 6e-4, max 4.6e-3 of the RMS.
#   The tolerance, 2**-7 (7.8e-3), is 8x the per-product bound.
# - float32 in the interpreter: true fp32 products; errors near 1e-6 of the RMS at K = 128.
#   The tolerance, 2**-14 (6.1e-5), still catches a result that went through bf16 or tf32.
# - top-k: each pair's weighted output is rounded to the output dtype, then a token's k pairs are
#   summed in fp32 and rounded again, so an element is off by up to u * (sum_j |w_j c_j| + |C|)
#   <= 2u * sum_j |w_j c_j|, with u the dtype's rounding bound and c_j the pair outputs. That
#   bound follows the magnitudes of the terms, not their sum, which can cancel: the relative
#   part of the tolerance is taken of sum_j |w_j c_j| (for top-1 that is |C| itself), and 4u
#   leaves twice the bound.
TOLERANCES = {
    torch.float16: 4 * 2.0**-11,
    torch.bfloat16: 4 * 2.0**-8,
    torch.float32: 2.0**-7 if ON_GPU else 2.0**-14,
}


def assert_moe_close(
    actual: torch.Tensor,  # [T, N]
    A: torch.Tensor,  # [T, K]
    W: torch.Tensor,  # [E, K, N]
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None = None,  # expert_ids' shape
    rows: torch.Tensor | None = None,  # [R] token indices: check only these rows
) -> float:
    """Raise AssertionError unless ``actual`` matches the float64 reference within the dtype's
    tolerance ``tol`` (``TOLERANCES``); return the largest error relative to the reference's RMS.

    An element passes when ``|actual - reference| <= tol * magnitude + tol * RMS(reference)``,
    where ``magnitude`` is the sum of the absolute values of the k weighted expert outputs the
    element adds up (``|reference|`` itself for top-1): the error of a rounded sum follows the
    size of its terms. ``rows`` checks a sample of the tokens (the reference then computes only
    those), for shapes where the whole reference would take too long.
    """
    if rows is not None:
        actual, A, expert_ids = actual[rows], A[rows], expert_ids[rows]
        combine_weights = None if combine_weights is None else combine_weights[rows]
    ids = as_top_k(expert_ids)
    weights = None if combine_weights is None else as_top_k(combine_weights)
    terms = [  # each token's j-th weighted expert output, in float64
        moe_matmul_reference_fp64(A, W, ids[:, j], None if weights is None else weights[:, j])
        for j in range(ids.shape[1])
    ]
    return assert_sum_close(actual, terms, A.dtype)


def assert_experts_close(
    actual: torch.Tensor,  # [T, N]
    A: torch.Tensor,  # [T, K]
    W_gate_up: torch.Tensor,  # [E, K, 2I]
    W_down: torch.Tensor,  # [E, I, N]
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None = None,  # expert_ids' shape
    activation: str = "silu",
    rows: torch.Tensor | None = None,  # [R] token indices: check only these rows
) -> float:
    """``assert_moe_close`` for ``moe_experts``: the same criterion, against
    ``moe_experts_reference_fp64``'s weighted output of each token's j-th expert."""
    if rows is not None:
        actual, A, expert_ids = actual[rows], A[rows], expert_ids[rows]
        combine_weights = None if combine_weights is None else combine_weights[rows]
    ids = as_top_k(expert_ids)
    weights = torch.ones(ids.shape) if combine_weights is None else as_top_k(combine_weights)
    terms = [
        moe_experts_reference_fp64(A, W_gate_up, W_down, ids[:, j], weights[:, j], activation)
        for j in range(ids.shape[1])
    ]
    return assert_sum_close(actual, terms, A.dtype)


def assert_sum_close(
    actual: torch.Tensor,  # [T, N]
    terms: list[torch.Tensor],  # k tensors [T, N] float64 whose sum is the reference
    dtype: torch.dtype,  # the inputs' dtype, which sets the tolerance
) -> float:
    """The criterion of ``assert_moe_close``, for a reference given as the k terms it sums."""
    expected = sum(terms)
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    if actual.dtype != dtype:
        raise AssertionError(f"dtype {actual.dtype}, expected {dtype}")
    if expected.numel() == 0:
        return 0.0
    tol = TOLERANCES[dtype]
    scale = expected.pow(2).mean().sqrt().item() or 1.0
    error = (actual.double() - expected).abs()
    allowed = tol * sum(term.abs() for term in terms) + tol * scale
    if not (error <= allowed).all():  # also catches NaN
        bad = ~(error <= allowed)
        worst = torch.argmax(torch.where(bad, error - allowed, -1.0)).item()
        row, column = divmod(worst, expected.shape[1])
        raise AssertionError(
            f"{int(bad.sum())} of {error.numel()} elements outside the {dtype} tolerance, "
            f"the worst at [{row}, {column}]\n"
            f"{actual[row, column].item():.6g} against the reference's "
            f"{expected[row, column].item():.6g}: allowed difference "
            f"{allowed[row, column].item():.3g} (reference RMS {scale:.3g})"
        )
    return (error.max() / scale).item()


def assert_grad_close(
    actual: torch.Tensor | None,
    expected: torch.Tensor,  # float64, from autograd through a float64 reference
    dtype: torch.dtype,  # the inputs' dtype, which sets the tolerance
    name: str,  # which gradient, for the message
) -> float:
    """Raise AssertionError unless a gradient matches its float64 reference elementwise within
    ``tol * |expected| + tol * RMS(expected)``, ``tol = TOLERANCES[dtype]``: the forward's
    criterion, with the element's own size standing for the size of its terms. Returns the
    largest error over the RMS."""
    if actual is None:
        raise AssertionError(f"{name}: no gradient")
    if actual.shape != expected.shape:
        raise AssertionError(
            f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
        )
    tol = TOLERANCES[dtype]
    scale = expected.pow(2).mean().sqrt().item() if expected.numel() else 0.0
    scale = scale or 1.0
    error = (actual.detach().double() - expected).abs()
    bad = ~(error <= tol * expected.abs() + tol * scale)
    if bad.any():
        worst = torch.argmax(torch.where(bad, error, -1.0)).item()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {error.numel()} elements outside the {dtype} "
            f"tolerance; the worst, flat index {worst}, is off by {error.flatten()[worst]:.3g} "
            f"(reference RMS {scale:.3g})"
        )
    return (error.max() / scale).item() if error.numel() else 0.0


@dataclasses.dataclass(frozen=True)
class MoECase:
    """One randomized correctness case: inputs, a routing and a kernel config."""

    A: torch.Tensor  # [T, K]
    W: torch.Tensor  # [E, K, N]
    expert_ids: torch.Tensor  # [T]
    config: helion.Config


def random_moe_case(case: int) -> MoECase:
    """A small random case, the same on every machine for a given ``case`` number.

    Shapes include T = 1, E = 1 and K, N that are not multiples of 16; routings are uniform,
    Zipf-skewed (which leaves experts empty) or all tokens on one expert; dtypes are float32,
    float16 and bfloat16; token tiles are smaller or larger than the experts.
    """
    rng = random.Random(case)
    T = rng.choice([1, 2, 7, 33, 100])
    K = rng.choice([8, 16, 20, 48])
    N = rng.choice([8, 16, 24, 40])
    E = rng.choice([1, 2, 3, 5, 8])
    routing = rng.choice(["uniform", "zipf", "one expert"])
    if routing == "uniform":
        expert_ids = route_uniform(T, E, seed=case)
    elif routing == "zipf":
        expert_ids = route_zipf(T, E, rng.choice([0.8, 1.5, 3.0]), seed=case)
    else:
        expert_ids = torch.full((T,), E - 1, device=DEVICE)
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
    block_sizes = [rng.choice([16, 32, 64]), rng.choice([16, 32]), rng.choice([16, 32])]
    g = _cpu_generator(case)
    return MoECase(
        A=torch.randn(T, K, generator=g).to(DEVICE, dtype),
        W=torch.randn(E, K, N, generator=g).to(DEVICE, dtype),
        expert_ids=expert_ids,
        config=helion.Config(block_sizes=block_sizes, num_warps=4, num_stages=1),
    )


def seed_store_race_rows(
    sort: ExpertSort,
    block_t: int,
) -> torch.Tensor:  # [R] int64, original token indices
    """Rows the seed kernel's racing store can lose, for a token tile of ``block_t`` rows.

    In an expert's first token tile, lanes past its token count are pointed at its first token
    and write back the old value in the same store in which lane 0 writes the new one. Lanes
    at or past ``max_tokens_per_expert`` store nothing (Helion's own tile mask), so this
    happens when the expert has at least one token but fewer than both ``block_t`` and the
    largest expert. (Later tiles are safe: their masked-off lanes write back the value the
    first tile already stored.)
    """
    counts = sort.expert_token_counts
    short = (counts > 0) & (counts < min(block_t, sort.max_tokens_per_expert))
    first_sorted_position = sort.expert_token_offsets[:-1][short]
    return sort.sorted_to_orig_token_idx[first_sorted_position].long()


# ---------------------------------------------------------------------------------------------
# Benchmarks (GPU only: the interpreter's timings say nothing about a GPU)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MoEShape:
    """A layer shape: T tokens of K features through E experts of [K, N] each."""

    name: str
    T: int
    K: int
    N: int
    E: int


@dataclasses.dataclass(frozen=True)
class MoEModel:
    """The routed experts of a public MoE model: E experts of hidden size H and intermediate
    size I, k experts per token. Each expert runs two GEMMs: gate_up (H -> 2I, the gate and up
    projections side by side) and down (I -> H)."""

    name: str
    H: int
    I: int  # noqa: E741 (the models' own name for it)
    E: int
    top_k: int

    def gemm(self, which: str, T: int) -> MoEShape:
        """The shape of its ``which`` ("gate_up" or "down") GEMM for T tokens."""
        K, N = (self.H, 2 * self.I) if which == "gate_up" else (self.I, self.H)
        return MoEShape(f"{self.name} {which}", T=T, K=K, N=N, E=self.E)


MOE_MODELS = (
    MoEModel("Mixtral-8x7B", H=4096, I=14336, E=8, top_k=2),
    MoEModel("DeepSeek-V3", H=7168, I=2048, E=256, top_k=8),
    MoEModel("Qwen3-30B-A3B", H=2048, I=768, E=128, top_k=8),
    MoEModel("Qwen3-235B-A22B", H=4096, I=1536, E=128, top_k=8),
    MoEModel("gpt-oss-120b", H=2880, I=2880, E=128, top_k=4),
    MoEModel("Llama-4-Maverick", H=5120, I=8192, E=128, top_k=1),
)
GEMMS = ("gate_up", "down")
MIXTRAL_LIKE = MoEShape("Mixtral-like", T=8192, K=4096, N=14336, E=8)
FINE_GRAINED = MoEShape("fine-grained", T=16384, K=2048, N=1408, E=64)
DECODE_TO_PREFILL_TOKENS = [1, 2, 4, 8, 16, 32, 64, 256, 1024, 4096, 16384]
ZIPF_SKEWS = [0.0, 0.4, 0.8, 1.2, 1.6, 2.0]
# The seed kernel with Helion's 16x16x16 default takes seconds per call at prefill sizes; the
# sweeps time it only up to this many tokens (the prefill bars time it at full size).
SEED_DEFAULT_MAX_TOKENS = 1024
# Hand-picked bf16 config that the seed kernel is also timed with (moe_matmul's default).
HAND_PICKED_CONFIG = DEFAULT_CONFIGS[torch.bfloat16]


def time_ms(fn: Callable[[], object], slow_ms: float = 40.0) -> float:
    """Median time of one call of ``fn`` on the GPU, in milliseconds.

    ``triton.testing.do_bench`` (CUDA events, L2 flushed before each call, warm-up first, 200
    ms of repetitions: at least 5) for calls under ``slow_ms``. A slower call (the untuned seed
    kernel takes seconds) is timed as the median of three calls, each between CUDA events,
    after one warm-up.
    """
    fn()  # compile and warm up
    torch.cuda.synchronize()

    def one_call_ms() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    first = one_call_ms()
    if first > slow_ms:
        return sorted([first, one_call_ms(), one_call_ms()])[1]
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def host_and_gpu_us(fn: Callable[[], object], calls: int = 20) -> tuple[float, float]:
    """Microseconds per call of ``fn`` on the host (issuing it) and on the GPU (running it).

    The GPU first sleeps long enough for the host to queue all ``calls`` calls behind the
    sleep, so the events around them time the GPU's work alone, without the gaps a slower host
    would leave; the host's clock times the issuing. A call that waits for the GPU (a host
    synchronisation) waits out the sleep too, which the host time then shows. The inputs stay
    the same from call to call, so data that fits in L2 stays there.
    """
    fn()  # compile and warm up
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    guess_us = (time.perf_counter() - start) * 1e6
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(2 * calls * guess_us * 2000) + 1_000_000)  # about 2 GHz cycles
    begin.record()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host_us = (time.perf_counter() - start) * 1e6 / calls
    end.record()
    end.synchronize()
    return host_us, begin.elapsed_time(end) * 1e3 / calls


def machine_info() -> dict[str, object]:
    """The card, its SM count and the versions, recorded with every benchmark result."""
    properties = torch.cuda.get_device_properties(0)
    return {
        "date": datetime.date.today().isoformat(),
        "card": properties.name,
        "sms": properties.multi_processor_count,
        "torch": torch.__version__,
        "triton": importlib.metadata.version("triton"),
        "helion": importlib.metadata.version("helion"),
        "python": platform.python_version(),
    }


def copy_bandwidth_gbps(size_bytes: int = 2**32) -> float:
    """Memory roof: a device-to-device copy of ``size_bytes``, counting bytes read + written."""
    source = torch.empty(size_bytes, dtype=torch.uint8, device=DEVICE).random_()
    target = torch.empty_like(source)
    return 2 * size_bytes / time_ms(lambda: target.copy_(source)) / 1e6


def benchmark_candidates(
    A: torch.Tensor,  # [T, K]
    W: torch.Tensor,  # [E, K, N]
    expert_ids: torch.Tensor,  # [T]
) -> dict[str, Callable[[], torch.Tensor]]:
    """What notebook 05 times, each as a call with its preparation (sorting, compiling) done.

    "core" and "kernel" entries take pre-sorted inputs; "pipeline" entries include the sort.
    """
    sort = sort_tokens_by_expert(expert_ids, W.shape[0])
    args = sort.kernel_args(A, W)
    rows = sort.sorted_to_orig_token_idx.long()
    A_sorted, group_ends = A[rows], sort.expert_token_offsets[1:]
    seed_default = moe_matmul_ogs.bind(args).compile_config(HELION_DEFAULT_CONFIG)
    seed_hand_picked = moe_matmul_ogs.bind(args).compile_config(HAND_PICKED_CONFIG)
    masked_store = moe_matmul_ogs_masked_store.bind(args).compile_config(HAND_PICKED_CONFIG)
    return {
        "dense matmul, same FLOPs": lambda: A @ W[0],
        "loop reference": lambda: moe_matmul_loop_reference(A, W, expert_ids),
        "grouped_mm core": lambda: torch._grouped_mm(A_sorted, W, offs=group_ends),
        "grouped_mm pipeline": lambda: moe_matmul_grouped_mm(A, W, expert_ids),
        "seed kernel, Helion default config": lambda: seed_default(*args),
        "seed kernel, hand-picked config": lambda: seed_hand_picked(*args),
        "masked-store kernel, hand-picked config": lambda: masked_store(*args),
        "moe_matmul (validate + sort + masked store)": lambda: moe_matmul(
            A, W, expert_ids, implementation="masked_store"
        ),
    }


# Candidates whose results are checked against the float64 reference before they are timed.
# Not checked: the dense matmul computes something else, grouped_mm core returns its rows in
# sorted order (the pipeline entry checks the same call after the scatter), and the seed
# kernel races on experts smaller than its token tile.
CHECKED_CANDIDATES = (
    "loop reference",
    "grouped_mm pipeline",
    "masked-store kernel, hand-picked config",
    "moe_matmul (validate + sort + masked store)",
)


def benchmark_inputs(
    shape: MoEShape, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:  # ([T, K], [E, K, N]) bf16
    """Random bf16 activations and weights of ``shape``, scaled so outputs have unit variance."""
    g = _cpu_generator(seed)
    A = torch.randn(shape.T, shape.K, generator=g).to(DEVICE, torch.bfloat16)
    W = (torch.randn(shape.E, shape.K, shape.N, generator=g) / math.sqrt(shape.K)).to(
        DEVICE, torch.bfloat16
    )
    return A, W


def benchmark_routing(shape: MoEShape, skew: float) -> torch.Tensor:  # [T]
    """The routing every benchmark of ``shape`` uses: Zipf ``skew`` (0 = uniform), seed 1."""
    return route_zipf(shape.T, shape.E, skew, seed=1)


def benchmark_point(
    shape: MoEShape,
    expert_ids: torch.Tensor,  # [T]
    *,
    sweep: str,
    skew: float,
    skip: tuple[str, ...] = (),
    seed: int = 0,
) -> list[dict[str, object]]:
    """Check, then time every candidate at one shape and routing; one result row each."""
    A, W = benchmark_inputs(shape, seed)
    load = expert_load(expert_ids, shape.E)
    max_tokens_per_expert, active_experts = int(load.max()), int((load > 0).sum())
    flops = 2 * shape.T * shape.K * shape.N
    rows = []
    for name, fn in benchmark_candidates(A, W, expert_ids).items():
        if name in skip:
            continue
        if name in CHECKED_CANDIDATES:
            assert_moe_close(fn(), A, W, expert_ids)
        # fewest bytes: read A and the weight matrices in use once (the dense matmul uses one),
        # write C once
        weight_matrices = 1 if name == "dense matmul, same FLOPs" else active_experts
        moved = 2 * (shape.T * shape.K + weight_matrices * shape.K * shape.N + shape.T * shape.N)
        ms = time_ms(fn)
        rows.append(
            {
                "sweep": sweep,
                "shape": shape.name,
                "T": shape.T,
                "K": shape.K,
                "N": shape.N,
                "E": shape.E,
                "skew": skew,
                "max_tokens_per_expert": max_tokens_per_expert,
                "active_experts": active_experts,
                "implementation": name,
                "ms": ms,
                "tflops": flops / ms / 1e9,
                "gbps": moved / ms / 1e6,
                "flops": flops,
                "bytes": moved,
            }
        )
    return rows


def run_benchmarks() -> pd.DataFrame:
    """The whole study of notebook 05, on this GPU, in bf16: prefill bars at both shapes,
    a token sweep at the Mixtral-like shape, a skew sweep at both shapes, and the copy roof.
    """
    points = [("prefill", shape, shape.T, 0.0) for shape in (MIXTRAL_LIKE, FINE_GRAINED)]
    points += [("tokens", MIXTRAL_LIKE, T, 0.0) for T in DECODE_TO_PREFILL_TOKENS]
    for shape in (MIXTRAL_LIKE, FINE_GRAINED):
        points += [("skew", shape, shape.T, skew) for skew in ZIPF_SKEWS]
    seed_default = "seed kernel, Helion default config"
    rows = []
    for sweep, shape, T, skew in tqdm(points, desc="benchmark points"):
        shape = dataclasses.replace(shape, T=T)
        slow = sweep == "skew" or (sweep == "tokens" and T > SEED_DEFAULT_MAX_TOKENS)
        rows += benchmark_point(
            shape,
            benchmark_routing(shape, skew),
            sweep=sweep,
            skew=skew,
            skip=(seed_default,) if slow else (),
        )
    results = pd.DataFrame(rows)
    results["copy_gbps"] = copy_bandwidth_gbps()
    for key, value in machine_info().items():
        results[key] = value
    return results


DECODE_TOKENS = [1, 2, 4, 8, 16, 32, 64]


def flat_candidates(
    A: torch.Tensor,  # [T, K]
    W: torch.Tensor,  # [E, K, N]
    expert_ids: torch.Tensor,  # [T] or [T, k]
    config: helion.Config,
    combine_weights: torch.Tensor | None = None,  # expert_ids' shape
) -> dict[str, Callable[[], torch.Tensor]]:
    """What notebooks 06 and 07 time: the flat kernel (routing pre-aligned; on a GPU also with
    a persistent grid), its metadata alone (both versions), metadata and kernel together,
    ``moe_matmul`` with ``config`` (the flat path) and with its defaults ("auto": the per-pair
    kernel for a few pairs; on a GPU also replayed from a CUDA graph, as is the grouped_mm
    pipeline), and the baselines.
    With top-k routing the kernel entries include the sum over each token's k experts, and
    ``grouped_mm core`` multiplies the pairs' rows, pre-sorted. A one-token batch reaches the
    flat kernel and its metadata as two copies of the token, as ``moe_matmul`` runs it
    (``one_token_as_two``); every other entry gets the one token."""
    E, T = W.shape[0], A.shape[0]
    top_k = as_top_k(expert_ids).shape[1]
    sort = sort_tokens_by_expert(expert_ids.flatten(), E)
    A_sorted = A[sort.sorted_to_orig_token_idx.long() // top_k]
    block_t, kernel_config = split_token_block(config)
    flat_inputs = (A, expert_ids, combine_weights)
    if T == 1:
        flat_inputs = one_token_as_two(*flat_inputs)
    flat_A, flat_ids, flat_weights = flat_inputs
    args = flat_kernel_args(flat_A, W, flat_ids, flat_weights, block_t)
    flat = moe_matmul_flat.bind(args).compile_config(kernel_config)

    def metadata_and_kernel() -> torch.Tensor:
        metadata = flat_kernel_args(flat_A, W, flat_ids, flat_weights, block_t)
        return sum_over_experts(flat(*metadata))[:T]

    candidates = {
        "dense matmul, same FLOPs": lambda: A @ W[0],
        "grouped_mm core": lambda: torch._grouped_mm(
            A_sorted, W, offs=sort.expert_token_offsets[1:]
        ),
        "grouped_mm pipeline": lambda: moe_matmul_grouped_mm(A, W, expert_ids, combine_weights),
        "flat metadata (torch ops reference)": lambda: align_to_blocks_reference(
            flat_ids, E, block_t
        ),
        "flat metadata (Helion counting sort)": lambda: align_to_blocks(flat_ids, E, block_t),
        "flat kernel": lambda: sum_over_experts(flat(*args))[:T],
        "flat metadata + kernel": metadata_and_kernel,
        "moe_matmul (validate + align + flat kernel)": lambda: moe_matmul(
            A, W, expert_ids, combine_weights, config=config
        ),
        "moe_matmul, auto": lambda: moe_matmul(A, W, expert_ids, combine_weights),
    }
    if ON_GPU:
        # Helion sizes a persistent grid by the GPU's SM count
        persistent = helion.Config(**{**kernel_config.config, "pid_type": "persistent_interleaved"})
        persistent_flat = moe_matmul_flat.bind(args).compile_config(persistent)
        candidates["flat kernel, persistent"] = lambda: sum_over_experts(persistent_flat(*args))[:T]
        candidates["grouped_mm pipeline, CUDA graph"] = cuda_graph_replay(
            candidates["grouped_mm pipeline"]
        )
        candidates["moe_matmul, CUDA graph"] = cuda_graph_replay(candidates["moe_matmul, auto"])
    return candidates


def cuda_graph_replay(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``fn`` captured once in a CUDA graph (after a warm-up call on a side stream, as PyTorch
    asks); the returned function replays it, launching all of ``fn``'s kernels at the cost of
    one launch, and returns the graph's output tensor. The graph keeps ``fn``'s inputs: it
    reruns the same computation on whatever those tensors hold when it is replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def run_flat_benchmarks() -> pd.DataFrame:
    """Notebook 06's study, on this GPU, in bf16: the flat kernel and its baselines at both
    prefill shapes (uniform and Zipf 1.2 routing) and at decode sizes of the Mixtral-like
    shape. Every candidate with a [T, N] result is checked against the reference first."""
    points = [
        ("prefill", shape, shape.T, skew)
        for shape in (MIXTRAL_LIKE, FINE_GRAINED)
        for skew in (0.0, 1.2)
    ]
    points += [("decode", MIXTRAL_LIKE, T, 0.0) for T in DECODE_TOKENS]
    rows = []
    for sweep, shape, T, skew in tqdm(points, desc="benchmark points"):
        shape = dataclasses.replace(shape, T=T)
        A, W = benchmark_inputs(shape)
        expert_ids = benchmark_routing(shape, skew)
        load = expert_load(expert_ids, shape.E)
        active_experts = int((load > 0).sum())
        config = default_config("flat", A.dtype, T, shape.K, shape.N, shape.E)
        for name, fn in flat_candidates(A, W, expert_ids, config).items():
            if sweep == "decode" and name.startswith(("dense", "flat kernel, persistent")):
                continue
            if not name.startswith(("dense", "grouped_mm core", "flat metadata (")):
                assert_moe_close(fn(), A, W, expert_ids)
            ms = time_ms(fn)
            rows.append(
                {
                    "sweep": sweep,
                    "shape": shape.name,
                    "T": T,
                    "K": shape.K,
                    "N": shape.N,
                    "E": shape.E,
                    "skew": skew,
                    "active_experts": active_experts,
                    "max_tokens_per_expert": int(load.max()),
                    "implementation": name,
                    "config": json.dumps(dict(config)),
                    "ms": ms,
                    "tflops": 2 * T * shape.K * shape.N / ms / 1e9,
                    # the weights the active experts must read, the floor of a decode step
                    "weight_gbps": 2 * active_experts * shape.K * shape.N / ms / 1e6,
                }
            )
    results = pd.DataFrame(rows)
    results["copy_gbps"] = copy_bandwidth_gbps()
    for key, value in machine_info().items():
        results[key] = value
    return results


# The model table (notebooks 05 and 06): each MOE_MODELS GEMM at decode and prefill token
# counts, with uniform and Zipf-skewed top-k routing, through moe_matmul and grouped_mm.
MODEL_TABLE_TOKENS = (1, 8, 64, 4096, 16384)
MODEL_TABLE_SKEWS = (0.0, 1.2)
MODEL_TABLE_DECODE_MAX_TOKENS = 64  # up to here the CUDA-graph candidates are timed too
MODEL_TABLE_CANDIDATES = [
    "moe_matmul",
    "grouped_mm core",
    "grouped_mm pipeline",
    "moe_matmul, CUDA graph",
    "grouped_mm pipeline, CUDA graph",
]
MODEL_TABLE_CHECKED_ROWS = 32  # tokens per point checked against the float64 reference
MODEL_TABLE_PATH = Path(__file__).parent / "notebooks" / "results" / "model_table.csv"


# Notebook 06 checks FLAT_CONFIGS and flat_token_block (fitted to Mixtral-8x7B and DeepSeek-V3)
# at GEMMs of the other models: the rule's config against a small search around it.
CONFIG_RULE_CHECK_GEMMS = (
    ("Qwen3-30B-A3B", "gate_up"),
    ("Qwen3-235B-A22B", "down"),
    ("gpt-oss-120b", "gate_up"),
    ("gpt-oss-120b", "down"),
    ("Llama-4-Maverick", "gate_up"),
)
CONFIG_RULE_CHECK_TOKENS = (64, 512, 4096)
CONFIG_SEARCH = [  # besides FLAT_CONFIGS: [token block, N tile, K tile], warps, stages
    ([128, 128, 64], 4, 3),
    ([64, 128, 64], 4, 3),
    ([32, 256, 64], 8, 3),
    ([16, 256, 128], 8, 3),
    ([16, 64, 256], 4, 3),
]
CONFIG_RULE_CHECK_PATH = Path(__file__).parent / "notebooks" / "results" / "config_rule_check.csv"


def run_config_rule_check(
    gemms: tuple[tuple[str, str], ...] = CONFIG_RULE_CHECK_GEMMS,
    tokens: tuple[int, ...] = CONFIG_RULE_CHECK_TOKENS,
    models: tuple[MoEModel, ...] = MOE_MODELS,
) -> pd.DataFrame:
    """The flat kernel alone (routing pre-aligned, uniform top-k routing as in the model
    table) at every config of the search, at each of ``gemms`` ((model name, GEMM) pairs of
    ``models``) and ``tokens``; one row per config, ``is_rule`` marking the one
    ``default_config`` picks."""
    search = list(FLAT_CONFIGS[torch.bfloat16].values())
    search += [
        helion.Config(block_sizes=tiles, num_warps=warps, num_stages=stages)
        for tiles, warps, stages in CONFIG_SEARCH
    ]
    by_name = {model.name: model for model in models}
    rows = []
    for name, which in tqdm(gemms, desc="GEMMs"):
        model = by_name[name]
        W = model_weights(model, which)
        E, K, N = W.shape
        for T in tokens:
            A = torch.randn(T, K, device=DEVICE, dtype=torch.bfloat16)
            expert_ids, weights = model_routing(T, E, model.top_k, 0.0)
            rule = default_config("flat", A.dtype, expert_ids.numel(), K, N, E)
            index_dtype = kernel_index_dtype(A, W, expert_ids.numel())
            for config in search if rule in search else [*search, rule]:
                block_t, kernel_config = split_token_block(config)
                args = flat_kernel_args(A, W, expert_ids, weights, block_t)
                run = functools.partial(
                    run_kernel, moe_matmul_flat, args, kernel_config, index_dtype
                )
                rows.append(
                    {
                        "model": name,
                        "gemm": which,
                        "T": T,
                        "pairs_per_expert": expert_ids.numel() / E,
                        "config": json.dumps(dict(config)),
                        "is_rule": config == rule,
                        "ms": time_ms(run),
                    }
                )
        del W
        torch.cuda.empty_cache()
    results = pd.DataFrame(rows)
    for key, value in machine_info().items():
        results[key] = value
    return results


def config_rule_against_best(results: pd.DataFrame) -> pd.DataFrame:
    """One row per point of ``run_config_rule_check``'s results: the rule's config and time,
    the fastest config of the search and its time, and ``rule_over_best`` (1.0 when the rule
    picked the fastest)."""
    rows = []
    for (name, which, T), point in results.groupby(["model", "gemm", "T"], sort=False):
        rule = point[point["is_rule"]].iloc[0]
        best = point.loc[point["ms"].idxmin()]
        rows.append(
            {
                "model": name,
                "gemm": which,
                "T": T,
                "pairs_per_expert": rule["pairs_per_expert"],
                "rule": json.loads(rule["config"])["block_sizes"],
                "rule_ms": rule["ms"],
                "best": json.loads(best["config"])["block_sizes"],
                "best_ms": best["ms"],
                "rule_over_best": rule["ms"] / best["ms"],
            }
        )
    return pd.DataFrame(rows)


def model_weights(model: MoEModel, which: str, seed: int = 0) -> torch.Tensor:  # [E, K, N]
    """Random bf16 weights of ``model``'s ``which`` GEMM, drawn on the device (DeepSeek-V3's
    gate_up weights are 7.5e9 elements), scaled so outputs have unit variance."""
    shape = model.gemm(which, 1)
    generator = torch.Generator(DEVICE).manual_seed(seed)
    W = torch.randn(
        shape.E, shape.K, shape.N, generator=generator, device=DEVICE, dtype=torch.bfloat16
    )
    return W.mul_(1 / math.sqrt(shape.K))


def model_routing(
    num_tokens: int, num_experts: int, top_k: int, skew: float, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:  # ([T, k] int64, [T, k] float32)
    """The model table's routing: k distinct experts per token, Zipf-skewed by ``skew``
    (``route_zipf_top_k``; 0 = uniform), and random combine weights that sum to one."""
    expert_ids = route_zipf_top_k(num_tokens, num_experts, skew, top_k, seed=seed)
    logits = torch.randn(num_tokens, top_k, generator=_cpu_generator(seed))
    return expert_ids, torch.softmax(logits, dim=1).to(DEVICE)


@dataclasses.dataclass(frozen=True)
class BlockStats:
    """How token blocks of ``block_t`` rows hold a routing's per-expert loads."""

    blocks: int  # token blocks in use, each one program per N tile
    padding_rows: int  # rows of those blocks that hold no pair
    wasted_work: float  # padding rows over all rows: the share of the tiles' work thrown away
    weight_reads: float  # blocks per active expert: how often each one's weights are read


def block_stats(load: torch.Tensor, block_t: int) -> BlockStats:  # load: [E] pairs per expert
    """``BlockStats`` of per-expert loads in blocks of ``block_t`` rows."""
    blocks = -(-load // block_t)
    rows = int(blocks.sum()) * block_t
    return BlockStats(
        blocks=int(blocks.sum()),
        padding_rows=rows - int(load.sum()),
        wasted_work=(rows - int(load.sum())) / rows if rows else 0.0,
        weight_reads=int(blocks.sum()) / max(1, int((load > 0).sum())),
    )


def flat_grid_stats(
    expert_ids: torch.Tensor,  # [T, k]
    num_experts: int,
    N: int,
    config: helion.Config,
) -> dict[str, float]:
    """How the flat kernel's grid covers a routing at ``config``: the token block, the share
    of its rows that are padding, how often each active expert's weights are read (its blocks),
    and the programs with work in units of the GPU's SMs (waves)."""
    block_t, kernel_config = split_token_block(config)
    stats = block_stats(expert_load(expert_ids, num_experts), block_t)
    programs = stats.blocks * -(-N // kernel_config["block_sizes"][0])
    sms = torch.cuda.get_device_properties(0).multi_processor_count if ON_GPU else 1
    return {
        "block_t": block_t,
        "padding": stats.wasted_work,
        "weight_reads": stats.weight_reads,
        "waves": programs / sms,
    }


def dense_matmul_tflops(size: int = 8192) -> float:
    """Compute roof: a dense bf16 ``size``-cubed matmul on this GPU."""
    a = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
    return 2 * size**3 / time_ms(lambda: a @ b) / 1e9


def model_table_point(
    model: MoEModel,
    which: str,
    W: torch.Tensor,  # [E, K, N]
    T: int,
    skew: float,
) -> list[dict[str, object]]:
    """Check ``moe_matmul`` on sampled rows, then time it and the grouped_mm baselines at one
    GEMM, token count and routing; one result row per candidate, with the point's grid stats,
    the metadata's GPU time and ``moe_matmul``'s host and GPU time per eager call."""
    E, K, N = W.shape
    A = torch.randn(T, K, generator=torch.Generator(DEVICE).manual_seed(T), device=DEVICE)
    A = A.to(torch.bfloat16)
    expert_ids, weights = model_routing(T, E, model.top_k, skew)
    rows = torch.randperm(T, generator=_cpu_generator(T))[:MODEL_TABLE_CHECKED_ROWS].to(DEVICE)
    assert_moe_close(moe_matmul(A, W, expert_ids, weights), A, W, expert_ids, weights, rows)
    pairs = expert_ids.numel()
    config = default_config("flat", A.dtype, pairs, K, N, E)
    sort = sort_tokens_by_expert(expert_ids.flatten(), E)
    A_sorted = A[sort.sorted_to_orig_token_idx.long() // model.top_k]
    candidates = {
        "moe_matmul": lambda: moe_matmul(A, W, expert_ids, weights),
        "grouped_mm core": lambda: torch._grouped_mm(
            A_sorted, W, offs=sort.expert_token_offsets[1:]
        ),
        "grouped_mm pipeline": lambda: moe_matmul_grouped_mm(A, W, expert_ids, weights),
    }
    if T <= MODEL_TABLE_DECODE_MAX_TOKENS:
        candidates["moe_matmul, CUDA graph"] = cuda_graph_replay(candidates["moe_matmul"])
        candidates["grouped_mm pipeline, CUDA graph"] = cuda_graph_replay(
            candidates["grouped_mm pipeline"]
        )
    flat_ids = one_token_as_two(expert_ids)[0] if T == 1 else expert_ids
    align = functools.partial(align_to_blocks, flat_ids, E, split_token_block(config)[0])
    _, metadata_us = host_and_gpu_us(cuda_graph_replay(align))
    host_us, gpu_us = host_and_gpu_us(candidates["moe_matmul"])
    active = int(expert_ids.unique().numel())
    point = {
        "model": model.name,
        "gemm": which,
        "T": T,
        "K": K,
        "N": N,
        "E": E,
        "top_k": model.top_k,
        "skew": skew,
        "active_experts": active,
        "path": choose_implementation(pairs, E, None),
        "config": json.dumps(dict(config)),
        **flat_grid_stats(expert_ids, E, N, config),
        "metadata_us": metadata_us,
        "moe_matmul_host_us": host_us,
        "moe_matmul_gpu_us": gpu_us,
        "flops": 2 * pairs * K * N,
        "bytes": 2 * (active * K * N + T * K + T * N),
        "weight_bytes": 2 * active * K * N,
    }
    return [{**point, "implementation": name, "ms": time_ms(fn)} for name, fn in candidates.items()]


def run_model_table(
    models: tuple[MoEModel, ...] = MOE_MODELS,
    tokens: tuple[int, ...] = MODEL_TABLE_TOKENS,
) -> pd.DataFrame:
    """The model table on this GPU, in bf16: every point of ``model_table_point``, and each
    row's roofline fraction, the time the roofline allows (the work at the dense-matmul rate,
    or the fewest bytes at the copy rate, whichever is longer) over the time measured."""
    dense_tflops, copy_gbps = dense_matmul_tflops(), copy_bandwidth_gbps()
    rows = []
    for model in tqdm(models, desc="models"):
        for which in GEMMS:
            W = model_weights(model, which)
            for T in tokens:
                for skew in MODEL_TABLE_SKEWS:
                    rows += model_table_point(model, which, W, T, skew)
            del W
            torch.cuda.empty_cache()
    results = pd.DataFrame(rows)
    results["dense_tflops"], results["copy_gbps"] = dense_tflops, copy_gbps
    roofline_ms = np.maximum(
        results["flops"] / dense_tflops / 1e9, results["bytes"] / copy_gbps / 1e6
    )
    results["roofline_fraction"] = roofline_ms / results["ms"]
    results["tflops"] = results["flops"] / results["ms"] / 1e9
    results["weight_gbps"] = results["weight_bytes"] / results["ms"] / 1e6
    for key, value in machine_info().items():
        results[key] = value
    return results


# The layer table (notebook 09): one MoE layer's experts at each MOE_MODELS size, through
# transformers' experts interface, with every built-in backend and torch._grouped_mm as peers.
LAYER_TABLE_TOKENS = (1, 8, 64, 4096, 16384)
LAYER_TABLE_PATH = Path(__file__).parent / "notebooks" / "results" / "layer_table.csv"
LAYER_DECODE_PATH = Path(__file__).parent / "notebooks" / "results" / "layer_decode.csv"
TRANSFORMERS_BACKENDS = ("eager", "batched_mm", "grouped_mm")
# batched_mm gathers every pair's weights ([P, 2I, H] and [P, H, I]); past this many bytes of
# them it is not run (DeepSeek-V3 at 64 tokens would gather 45 GB).
BATCHED_MM_MAX_BYTES = 24 * 2**30
LAYER_TABLE_CHECKED_ROWS = 8  # tokens per point checked against the float64 reference


def transformers_experts_module(model: MoEModel, seed: int = 0) -> torch.nn.Module:
    """transformers' experts module for ``model``'s sizes: a ``MixtralExperts`` (gate_up_proj
    [E, 2I, H], down_proj [E, H, I], SiLU, the layout of Mixtral, Qwen3-MoE and DeepSeek-V3),
    with random bf16 weights drawn on the device and scaled to keep unit variance."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = MixtralConfig(
        hidden_size=model.H,
        intermediate_size=model.I,
        num_local_experts=model.E,
        num_experts_per_tok=model.top_k,
    )
    with torch.device("meta"):
        experts = MixtralExperts(config)
    generator = torch.Generator(DEVICE).manual_seed(seed)
    for name, fan_in in (("gate_up_proj", model.H), ("down_proj", model.I)):
        shape = getattr(experts, name).shape
        weights = torch.randn(shape, generator=generator, device=DEVICE, dtype=torch.bfloat16)
        setattr(experts, name, torch.nn.Parameter(weights.mul_(fan_in**-0.5), requires_grad=False))
    return experts


def with_experts_backend(experts: torch.nn.Module, implementation: str) -> torch.nn.Module:
    """A shallow copy of a transformers experts module (the same weights) whose forward runs
    the experts implementation ``implementation``, as ``set_experts_implementation`` sets it."""
    clone = copy.copy(experts)
    clone.config = copy.copy(experts.config)
    clone.config._experts_implementation = implementation
    return clone


def unfused_experts(
    A: torch.Tensor,  # [T, K]
    W_gate_up: torch.Tensor,  # [E, K, 2I]
    W_down: torch.Tensor,  # [E, I, N]
    expert_ids: torch.Tensor,  # [T, k]
    combine_weights: torch.Tensor,  # [T, k]
) -> torch.Tensor:  # [T, N]
    """``moe_experts`` without the fused epilogue, to measure what the fusion saves: the flat
    kernel writes each pair's [2I] gate_up row, PyTorch computes silu(gate) * up from it, and
    the flat kernel runs the down GEMM. Same routing, same configs."""
    if A.shape[0] == 1:  # as moe_experts runs one token (one_token_as_two)
        A, expert_ids, combine_weights = one_token_as_two(A, expert_ids, combine_weights)
        return unfused_experts(A, W_gate_up, W_down, expert_ids, combine_weights)[:1]
    T, top_k = expert_ids.shape
    E, I, N = W_down.shape  # noqa: E741
    block_t = flat_token_block(expert_ids.numel(), E)
    routing = align_to_blocks(expert_ids, E, block_t)
    ones = torch.ones(T, top_k, device=A.device)
    _, kernel_config = split_token_block(FLAT_CONFIGS[A.dtype][block_t])
    index_dtype = kernel_index_dtype(A, W_gate_up, T * top_k)
    gate_up_args = routing.kernel_args(A, W_gate_up, ones)
    gate_up = run_kernel(moe_matmul_flat, gate_up_args, kernel_config, index_dtype)
    gate_up = gate_up.view(T * top_k, 2 * I)
    hidden = torch.nn.functional.silu(gate_up[:, :I]) * gate_up[:, I:]
    weights = pair_weights(expert_ids, combine_weights).view(-1, 1)
    down_args = routing.kernel_args(hidden, W_down, weights)
    down = run_kernel(moe_matmul_flat, down_args, kernel_config, index_dtype)
    return sum_over_experts(down.view(T, top_k, N))


def pairs_sorted_by_expert(
    expert_ids: torch.Tensor,  # [T, k]
    num_experts: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([P] int64 token of each sorted pair, [E] int32 ends)
    """For grouped_mm core: each pair's token, pairs sorted by expert, and where each expert's
    rows end (``torch._grouped_mm``'s ``offs``)."""
    sort = sort_tokens_by_expert(expert_ids.flatten(), num_experts)
    tokens = sort.sorted_to_orig_token_idx.long() // expert_ids.shape[1]
    return tokens, sort.expert_token_offsets[1:]


def grouped_mm_experts_core(
    A_sorted: torch.Tensor,  # [P, K] rows already sorted by expert
    W_gate_up: torch.Tensor,  # [E, K, 2I]
    W_down: torch.Tensor,  # [E, I, N]
    offsets: torch.Tensor,  # [E] int32 end of each expert's rows
) -> torch.Tensor:  # [P, N] each sorted pair's output, unweighted
    """The layer's experts by ``torch._grouped_mm`` alone: gate_up, SiLU, down, on rows sorted
    for free (no gather, scatter or combine), the bound a pipeline around it can approach."""
    I = W_down.shape[1]  # noqa: E741
    projected = torch._grouped_mm(A_sorted, W_gate_up, offs=offsets)
    hidden = torch.nn.functional.silu(projected[:, :I]) * projected[:, I:]
    return torch._grouped_mm(hidden, W_down, offs=offsets)


def layer_table_point(
    model: MoEModel,
    experts: torch.nn.Module,  # transformers_experts_module(model)
    weights_kn: tuple[torch.Tensor, torch.Tensor],  # its weights stored [E, K, N]
    T: int,
) -> list[dict[str, object]]:
    """Check the "helion" backend on sampled rows, then time every candidate at one token
    count, uniform top-k routing; one result row per candidate (``ms`` is NaN, with the
    reason in ``note``, where a candidate cannot run)."""
    A = torch.randn(T, model.H, generator=torch.Generator(DEVICE).manual_seed(T), device=DEVICE)
    A = A.to(torch.bfloat16)
    expert_ids, weights = model_routing(T, model.E, model.top_k, 0.0)
    gate_up, down = experts.gate_up_proj.transpose(1, 2), experts.down_proj.transpose(1, 2)
    backends = {
        name: with_experts_backend(experts, name) for name in ("helion", *TRANSFORMERS_BACKENDS)
    }
    rows = torch.randperm(T, generator=_cpu_generator(T))[:LAYER_TABLE_CHECKED_ROWS].to(DEVICE)
    out = backends["helion"](A, expert_ids, weights)
    assert_experts_close(out, A, gate_up, down, expert_ids, weights, rows=rows)
    token_of_sorted_pair, offsets = pairs_sorted_by_expert(expert_ids, model.E)
    grouped_mm_core = functools.partial(
        grouped_mm_experts_core, A[token_of_sorted_pair], gate_up, down, offsets
    )
    candidates = {
        name: functools.partial(backend, A, expert_ids, weights)
        for name, backend in backends.items()
    }
    candidates["grouped_mm core"] = grouped_mm_core
    candidates["helion, [E, K, N] weights"] = functools.partial(
        moe_experts, A, *weights_kn, expert_ids, weights
    )
    candidates["helion, unfused"] = functools.partial(
        unfused_experts, A, gate_up, down, expert_ids, weights
    )
    pairs = expert_ids.numel()
    notes = {}
    if pairs * 3 * model.H * model.I * 2 > BATCHED_MM_MAX_BYTES:
        notes["batched_mm"] = "not run: would gather each pair's weights"
    if T <= MODEL_TABLE_DECODE_MAX_TOKENS:
        for name in ("helion", "grouped_mm", "batched_mm"):
            graphed = f"{name}, CUDA graph"
            if name in notes:
                notes[graphed] = notes[name]
                continue
            try:
                candidates[graphed] = cuda_graph_replay(candidates[name])
            except RuntimeError as error:  # a backend that cannot be captured
                notes[graphed] = f"capture failed: {str(error).splitlines()[0][:120]}"
    host_us, gpu_us = host_and_gpu_us(candidates["helion"])
    grouped_host_us, grouped_gpu_us = host_and_gpu_us(candidates["grouped_mm"])
    active = int(expert_ids.unique().numel())
    point = {
        "model": model.name,
        "T": T,
        "H": model.H,
        "I": model.I,
        "E": model.E,
        "top_k": model.top_k,
        "active_experts": active,
        "block_t": flat_token_block(pairs, model.E),
        "helion_path": layer_path(pairs, gate_up, down),  # eager; graphs run flat
        "helion_host_us": host_us,
        "helion_gpu_us": gpu_us,
        "grouped_mm_host_us": grouped_host_us,
        "grouped_mm_gpu_us": grouped_gpu_us,
        "flops": 6 * pairs * model.H * model.I,
        "weight_bytes": 2 * 3 * active * model.H * model.I,
        "bytes": 2 * (3 * active * model.H * model.I + 2 * T * model.H),
        "fusion_bytes_saved": 2 * 4 * pairs * model.I,
    }
    results = []
    for name in dict.fromkeys([*candidates, *notes]):
        if name in notes:
            results.append({**point, "implementation": name, "ms": math.nan, "note": notes[name]})
            continue
        with torch.no_grad():
            ms = time_ms(candidates[name])
        results.append({**point, "implementation": name, "ms": ms, "note": ""})
    return results


def with_layer_machine_info(results: pd.DataFrame) -> pd.DataFrame:
    """``results`` with the card and versions (``machine_info``) and transformers' version in
    every row, as the layer's tables record them."""
    return results.assign(**machine_info(), transformers=importlib.metadata.version("transformers"))


def run_layer_table(
    models: tuple[MoEModel, ...] = MOE_MODELS,
    tokens: tuple[int, ...] = LAYER_TABLE_TOKENS,
    path: Path | None = None,
) -> pd.DataFrame:
    """The layer table on this GPU, in bf16: every ``layer_table_point``, with each row's
    roofline fraction (as in ``run_model_table``). With ``path``, the rows so far are written
    there after every model, so a run cut short keeps what it measured."""
    register_transformers_experts()
    dense_tflops, copy_gbps = dense_matmul_tflops(), copy_bandwidth_gbps()
    rows = []
    for model in tqdm(models, desc="models"):
        experts = transformers_experts_module(model)
        weights_kn = tuple(
            w.transpose(1, 2).contiguous() for w in (experts.gate_up_proj, experts.down_proj)
        )
        for T in tokens:
            rows += layer_table_point(model, experts, weights_kn, T)
        del experts, weights_kn
        torch.cuda.empty_cache()
        results = pd.DataFrame(rows)
        results["dense_tflops"], results["copy_gbps"] = dense_tflops, copy_gbps
        roofline_ms = np.maximum(
            results["flops"] / dense_tflops / 1e9, results["bytes"] / copy_gbps / 1e6
        )
        results["roofline_fraction"] = roofline_ms / results["ms"]
        results["tflops"] = results["flops"] / results["ms"] / 1e9
        results = with_layer_machine_info(results)
        if path is not None:
            results.to_csv(path, index=False)
    return results


BACKWARD_TABLE_TOKENS = (8192, 16384)
BACKWARD_TABLE_PATH = Path(__file__).parent / "notebooks" / "results" / "backward_table.csv"
# GPU time per kernel of one forward + backward (probes/speed_probe.py backward_parts)
BACKWARD_PARTS_PATH = Path(__file__).parent / "notebooks" / "results" / "backward_parts.csv"
BACKWARD_CANDIDATES = ("helion", "grouped_mm", "grouped_mm core")


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (Frobenius norms), summed in float64 over slices of
    the first dimension, so that no float64 copy of a large gradient exists at once."""
    rows = max(1, 2**26 * expected.shape[0] // max(1, expected.numel()))
    squares = torch.zeros(2, dtype=torch.float64, device=expected.device)
    for a, e in zip(actual.split(rows), expected.split(rows), strict=True):
        e = e.double()
        squares += torch.stack([(a.double() - e).pow(2).sum(), e.pow(2).sum()])
    difference, norm = squares.tolist()
    return math.sqrt(difference / norm) if norm else math.sqrt(difference)


def backward_table_point(
    model: MoEModel,
    experts: torch.nn.Module,  # transformers_experts_module(model), weights requiring grad
    T: int,
) -> list[dict[str, object]]:
    """Time the layer's forward and forward + backward at T tokens of uniform top-k routing:
    the "helion" backend, transformers' "grouped_mm" (sort, gather, ``torch._grouped_mm``,
    scatter, with torch's autograd) and grouped_mm core (pre-sorted rows, the two grouped GEMMs
    and the activation only, with torch's autograd). Every backward computes the gradients of
    the activations, both weights and (where there are any) the combine weights.

    First the "helion" forward is checked on sampled rows against the float64 reference, and
    each of its gradients against grouped_mm's: their relative difference (Frobenius norms,
    in the ``*_difference`` columns) must stay within the bf16 tolerance. One row per
    candidate and phase.
    """
    generator = torch.Generator(DEVICE).manual_seed(T)
    A = torch.randn(T, model.H, generator=generator, device=DEVICE).to(torch.bfloat16)
    expert_ids, weights = model_routing(T, model.E, model.top_k, 0.0)
    grad = torch.randn(T, model.H, generator=generator, device=DEVICE).to(torch.bfloat16)
    params = (experts.gate_up_proj, experts.down_proj)
    A, weights = A.requires_grad_(), weights.requires_grad_()
    backends = {name: with_experts_backend(experts, name) for name in BACKWARD_CANDIDATES[:2]}
    rows = torch.randperm(T, generator=_cpu_generator(T))[:LAYER_TABLE_CHECKED_ROWS].to(DEVICE)
    gate_up, down = (w.detach().transpose(1, 2) for w in params)
    with torch.no_grad():
        out = backends["helion"](A, expert_ids, weights)
    assert_experts_close(out, A.detach(), gate_up, down, expert_ids, weights.detach(), rows=rows)

    def forward_backward(backend: torch.nn.Module) -> tuple[torch.Tensor, ...]:
        out = backend(A, expert_ids, weights)
        return torch.autograd.grad(out, (A, *params, weights), grad)

    helion_grads = forward_backward(backends["helion"])
    grouped_grads = forward_backward(backends["grouped_mm"])
    names = ("dA", "dW_gate_up", "dW_down", "d_weights")
    differences = {
        f"{name}_difference": relative_difference(h, g)
        for name, h, g in zip(names, helion_grads, grouped_grads, strict=True)
    }
    del helion_grads, grouped_grads
    for name, difference in differences.items():
        if not difference <= TOLERANCES[torch.bfloat16]:  # also catches NaN
            raise AssertionError(
                f"{model.name} T={T}: {name} {difference:.3g} from grouped_mm's gradient, "
                f"over the bf16 tolerance {TOLERANCES[torch.bfloat16]:.3g}"
            )
    token_of_sorted_pair, offsets = pairs_sorted_by_expert(expert_ids, model.E)
    A_sorted = A.detach()[token_of_sorted_pair].requires_grad_()
    grad_sorted = grad[token_of_sorted_pair]
    grouped_mm_core = functools.partial(
        grouped_mm_experts_core,
        A_sorted,
        *(w.transpose(1, 2) for w in params),  # the parameters themselves, so grads reach them
        offsets,
    )

    candidates = {
        "forward": {
            **{name: functools.partial(b, A, expert_ids, weights) for name, b in backends.items()},
            "grouped_mm core": grouped_mm_core,
        },
        "forward + backward": {
            **{name: functools.partial(forward_backward, b) for name, b in backends.items()},
            "grouped_mm core": lambda: torch.autograd.grad(
                grouped_mm_core(), (A_sorted, *params), grad_sorted
            ),
        },
    }
    pairs = expert_ids.numel()
    point = {
        "model": model.name,
        "T": T,
        "H": model.H,
        "I": model.I,
        "E": model.E,
        "top_k": model.top_k,
        "block_t": flat_token_block(pairs, model.E),
        "forward_flops": 6 * pairs * model.H * model.I,
        **differences,
    }
    results = []
    for phase, timed in candidates.items():
        for name, fn in timed.items():
            with torch.set_grad_enabled(phase != "forward"):
                ms = time_ms(fn)
            results.append({**point, "implementation": name, "phase": phase, "ms": ms})
    return results


def run_backward_table(
    models: tuple[MoEModel, ...] = MOE_MODELS,
    tokens: tuple[int, ...] = BACKWARD_TABLE_TOKENS,
    path: Path | None = None,
) -> pd.DataFrame:
    """The backward table on this GPU, in bf16: every ``backward_table_point``. With ``path``,
    the rows so far are written there after every point, so a run cut short keeps what it
    measured."""
    register_transformers_experts()
    rows = []
    results = pd.DataFrame()
    for model in tqdm(models, desc="models"):
        experts = transformers_experts_module(model)
        for param in (experts.gate_up_proj, experts.down_proj):
            param.requires_grad_()
        for T in tokens:
            rows += backward_table_point(model, experts, T)
            results = with_layer_machine_info(pd.DataFrame(rows))
            if path is not None:
                results.to_csv(path, index=False)
        del experts
        torch.cuda.empty_cache()
    return results


# Notebook 08: the hand-picked kernel configs (N and K tiles; the token block is 128) that a
# restricted search times, and the time budget of the full autotuner, per shape.
HAND_PICKED_FLAT_KERNEL_CONFIGS = [
    helion.Config(block_sizes=[256, 64], num_warps=8, num_stages=3),
    helion.Config(block_sizes=[256, 64], num_warps=8, num_stages=3, l2_groupings=[8]),
    helion.Config(block_sizes=[256, 64], num_warps=8, num_stages=3, l2_groupings=[16]),
    helion.Config(block_sizes=[256, 64], num_warps=8, num_stages=4),
    helion.Config(block_sizes=[128, 64], num_warps=8, num_stages=3),
    helion.Config(block_sizes=[128, 64], num_warps=4, num_stages=4),
    helion.Config(block_sizes=[128, 128], num_warps=8, num_stages=3),
]
AUTOTUNE_BLOCK_T = 128
AUTOTUNE_BUDGET_SECONDS = 90


def tune_flat_kernel(
    args: tuple[torch.Tensor, ...],
    configs: list[helion.Config] | None,
    budget_seconds: int,
    log_base: Path,
) -> tuple[helion.Config, float]:
    """Autotune the flat kernel on ``args``: over ``configs`` only, or, when None, Helion's full
    search bounded by ``budget_seconds``. Benchmarks run in this process (the GPU test machine
    needs it), and the search is logged to ``log_base.csv``. Returns the best kernel config
    and the seconds the search took."""
    tuner = helion.kernel(
        moe_matmul_flat.fn,
        static_shapes=False,
        key=sizes_of_one,
        configs=configs or [],
        autotune_budget_seconds=budget_seconds,
        autotune_benchmark_subprocess=False,
        autotune_log=str(log_base),
        autotune_progress_bar=False,
    )
    start = time.perf_counter()
    best = tuner.autotune(args, force=configs is None)
    return best, time.perf_counter() - start


def run_autotuning() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Notebook 08's study, on this GPU, in bf16 at both prefill shapes (uniform routing):
    Helion's default config, the best of ``HAND_PICKED_FLAT_KERNEL_CONFIGS``, and the full
    autotuner with ``AUTOTUNE_BUDGET_SECONDS``; each winner re-timed with ``time_ms``. The
    fastest is saved with ``save_tuned_config`` for ``moe_matmul``. Returns the summary (one
    row per shape and method) and the autotuner's trace (one row per config it tried)."""
    summary, traces = [], []
    for shape in (MIXTRAL_LIKE, FINE_GRAINED):
        A, W = benchmark_inputs(shape)
        expert_ids = benchmark_routing(shape, 0.0)
        args = flat_kernel_args(A, W, expert_ids, None, AUTOTUNE_BLOCK_T)
        flops = 2 * shape.T * shape.K * shape.N
        default = moe_matmul_flat.bind(args).config_spec.default_config()
        with tempfile.TemporaryDirectory() as log_dir:
            log_base = Path(log_dir) / "search"
            listed, listed_seconds = tune_flat_kernel(
                args, HAND_PICKED_FLAT_KERNEL_CONFIGS, AUTOTUNE_BUDGET_SECONDS, log_base
            )
            log_base.with_suffix(".csv").unlink(missing_ok=True)  # keep the full search's
            tuned, tuned_seconds = tune_flat_kernel(args, None, AUTOTUNE_BUDGET_SECONDS, log_base)
            trace = pd.read_csv(log_base.with_suffix(".csv"))
        trace["shape"] = shape.name
        trace["tflops"] = flops / trace["perf_ms"] / 1e9
        traces.append(trace)
        for method, config, seconds in (
            ("Helion default config", default, 0.0),
            (f"best of {len(HAND_PICKED_FLAT_KERNEL_CONFIGS)} hand-picked", listed, listed_seconds),
            (f"autotuner, {AUTOTUNE_BUDGET_SECONDS} s budget", tuned, tuned_seconds),
        ):
            kernel = moe_matmul_flat.bind(args).compile_config(config)
            assert_moe_close(sum_over_experts(kernel(*args)), A, W, expert_ids)
            ms = time_ms(functools.partial(kernel, *args))
            summary.append(
                {
                    "shape": shape.name,
                    "T": shape.T,
                    "K": shape.K,
                    "N": shape.N,
                    "E": shape.E,
                    "method": method,
                    "tuning_seconds": seconds,
                    "ms": ms,
                    "tflops": flops / ms / 1e9,
                    "config": json.dumps(
                        {**dict(config), "block_sizes": [AUTOTUNE_BLOCK_T, *config["block_sizes"]]}
                    ),
                }
            )
        best = min(summary[-3:], key=lambda row: row["ms"])
        key = tuned_config_key(A.dtype, shape.T, shape.K, shape.N, shape.E)
        save_tuned_config(key, helion.Config(**json.loads(best["config"])))
    summary = pd.DataFrame(summary)
    for key, value in machine_info().items():
        summary[key] = value
    return summary, pd.concat(traces, ignore_index=True)


# ---------------------------------------------------------------------------------------------
# Plots (each returns its figure; end a notebook cell with plt.show())
# ---------------------------------------------------------------------------------------------


def plot_expert_load(
    loads: dict[str, torch.Tensor],  # label -> [E] tokens (or pairs) per expert
    title: str,
    columns: int = 3,
    unit: str = "tokens",
) -> plt.Figure:
    """One bar chart of ``unit`` per expert for each routing, the mean load dashed. Each panel
    has its own y axis: the loads of skewed routings would flatten the even ones."""
    rows = math.ceil(len(loads) / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(max(3.6 * columns, 7.0), 2.7 * rows + 0.3), squeeze=False
    )
    for ax, (label, load) in zip(axes.flat, loads.items(), strict=False):
        load = load.cpu()
        ax.bar(range(len(load)), load.numpy(), color="tab:blue", label=unit)
        ax.axhline(load.double().mean(), color="black", linestyle="--", label="mean")
        stats = load_stats(load)
        ax.set_title(f"{label}: max/mean {stats.max_over_mean:.2f}", fontsize=10)
        ax.set_xlabel("expert")
        ax.set_ylabel(unit)
    for ax in axes.flat[len(loads) :]:
        ax.set_visible(False)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(
    x: list[float],
    curves: dict[str, list[float]],  # label -> one y per x
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = True,
    logy: bool = False,
) -> plt.Figure:
    """Line plot of several labelled curves over a shared x axis, each with its own marker and
    line style, so curves that coincide stay visible."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for i, (label, y) in enumerate(curves.items()):
        marker, linestyle = "osD^v<>P*X"[i % 10], ("-", "--", "-.", ":")[i % 4]
        ax.plot(x, y, marker=marker, linestyle=linestyle, label=label, markerfacecolor="none")
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def explore_routing(
    num_experts: int = 64, num_tokens: int = 4096, skew: float = 1.2, top_k: int = 2
) -> LoadStats:
    """Route ``num_tokens`` tokens to ``top_k`` of ``num_experts`` experts with a Zipf skew
    (``route_zipf_top_k``, seed 0), draw the per-expert load and return its statistics: what
    the routing explorer (``routing_explorer``) shows for each setting of its sliders."""
    ids = route_zipf_top_k(num_tokens, num_experts, skew, top_k, device=torch.device("cpu"))
    load = expert_load(ids, num_experts)
    stats = load_stats(load)
    title = (
        f"T = {num_tokens}, E = {num_experts}, Zipf {skew:g}, top-{top_k}: "
        f"CV {stats.coefficient_of_variation:.2f}, {stats.empty_experts} experts empty"
    )
    label = f"{num_tokens * top_k} pairs"
    fig = plot_expert_load({label: load}, title, columns=1, unit="pairs")
    plt.show()
    plt.close(fig)
    return stats


def routing_explorer() -> object:  # ipywidgets.interactive
    """Sliders for E, T, skew and top-k that redraw ``explore_routing`` (first render: its
    defaults). The widget's ``result`` is the ``LoadStats`` of the routing on display."""
    import ipywidgets

    experts = ipywidgets.IntSlider(64, 2, 256, description="E")
    top_k = ipywidgets.IntSlider(2, 1, 8, description="top-k")
    ipywidgets.dlink((experts, "value"), (top_k, "max"), lambda E: min(8, E))  # k <= E
    return ipywidgets.interactive(
        explore_routing,
        num_experts=experts,
        num_tokens=ipywidgets.IntSlider(4096, 1, 16384, description="T"),
        skew=ipywidgets.FloatSlider(1.2, min=0.0, max=2.0, step=0.1, description="skew"),
        top_k=top_k,
    )


def explore_token_blocks(
    pairs_per_expert: int = 40, block_t: int = 32, num_experts: int = 16
) -> BlockStats:
    """Draw ``num_experts`` experts' loads (uniform routing, on average ``pairs_per_expert``
    pairs each, seed 0) cut into token blocks of ``block_t`` rows: each expert's pairs, its
    padding rows and its block boundaries. Returns the ``BlockStats``; what the token-block
    explorer (``token_block_explorer``) shows for each setting of its controls."""
    ids = route_zipf(pairs_per_expert * num_experts, num_experts, 0.0, seed=0, device="cpu")
    load = expert_load(ids, num_experts)
    stats = block_stats(load, block_t)
    padded = -(-load // block_t) * block_t
    experts = np.arange(num_experts)
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.bar(experts, load.numpy(), color="C0", label="rows with a pair")
    ax.bar(experts, (padded - load).numpy(), bottom=load.numpy(), color="C3", alpha=0.4,
           label="padding rows")  # fmt: skip
    for boundary in range(block_t, int(padded.max()) + 1, block_t):
        ax.axhline(boundary, color="black", linewidth=0.5, alpha=0.4)
    ax.set_xlabel("expert (horizontal lines: token block boundaries)")
    ax.set_ylabel("rows")
    ax.set_title(
        f"{pairs_per_expert} pairs per expert on average, {block_t}-row blocks: "
        f"{stats.blocks} blocks, {100 * stats.wasted_work:.0f}% of their rows padding, "
        f"weights read {stats.weight_reads:.2f}x\n(mh.flat_token_block picks "
        f"{flat_token_block(int(load.sum()), num_experts)} rows here)",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    plt.show()
    plt.close(fig)
    return stats


def token_block_explorer() -> object:  # ipywidgets.interactive
    """A slider for the pairs per expert and a choice of token block that redraw
    ``explore_token_blocks`` (first render: its defaults); ``result`` is the ``BlockStats``."""
    import ipywidgets

    return ipywidgets.interactive(
        explore_token_blocks,
        pairs_per_expert=ipywidgets.IntSlider(40, 1, 512, description="pairs/expert"),
        block_t=ipywidgets.SelectionSlider(
            options=[16, 32, 64, 128], value=32, description="block_t"
        ),
        num_experts=ipywidgets.fixed(16),
    )


BENCHMARKS_PATH = Path(__file__).parent / "notebooks" / "results" / "benchmarks.csv"


def explore_benchmarks(shape: str = MIXTRAL_LIKE.name) -> pd.Series:
    """Draw notebook 05's skew sweep (``plot_sweep``) for one of its shapes from the committed
    ``benchmarks.csv`` and return that shape's prefill TFLOP/s by implementation: what the
    shape picker (``benchmarks_explorer``) shows."""
    results = pd.read_csv(BENCHMARKS_PATH)
    one_shape = results[results["shape"] == shape]
    fig = plot_sweep(one_shape, "skew", "skew", "Zipf skew", logx=False)
    plt.show()
    plt.close(fig)
    prefill = one_shape[one_shape["sweep"] == "prefill"]
    return prefill.set_index("implementation")["tflops"]


def benchmarks_explorer() -> object:  # ipywidgets.interactive
    """A drop-down of notebook 05's two shapes that redraws ``explore_benchmarks``."""
    import ipywidgets

    names = [MIXTRAL_LIKE.name, FINE_GRAINED.name]
    return ipywidgets.interactive(
        explore_benchmarks, shape=ipywidgets.Dropdown(options=names, description="shape")
    )


def explore_model_table(model: str = MOE_MODELS[0].name) -> pd.DataFrame:
    """Draw one model's rows of the committed model table (``plot_model_table``) and return
    its ``model_table_limits`` rows: what the model picker (``model_table_explorer``) shows."""
    results = pd.read_csv(MODEL_TABLE_PATH)
    fig = plot_model_table(results, model)
    plt.show()
    plt.close(fig)
    return model_table_limits(results).loc[model]


def model_table_explorer() -> object:  # ipywidgets.interactive
    """A drop-down of the table's models that redraws ``explore_model_table``."""
    import ipywidgets

    names = [model.name for model in MOE_MODELS]
    return ipywidgets.interactive(
        explore_model_table, model=ipywidgets.Dropdown(options=names, description="model")
    )


def plot_permutation(
    expert_ids: torch.Tensor,  # [T]
    sort: ExpertSort,
) -> plt.Figure:
    """Tokens coloured by expert in their original order (top) and sorted by expert (bottom),
    a line from each token's original position to its sorted position."""
    expert_ids = expert_ids.cpu()
    sorted_to_orig = sort.sorted_to_orig_token_idx.cpu().long()
    T, E = len(expert_ids), len(sort.expert_token_counts)
    colors = plt.get_cmap("tab10" if E <= 10 else "tab20")(np.arange(E) % 20)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * T), 2.8))
    for s, t in enumerate(sorted_to_orig.tolist()):
        ax.plot([t, s], [1, 0], color=colors[expert_ids[t]], alpha=0.6, linewidth=1)
    for row, ids in ((1, expert_ids), (0, expert_ids[sorted_to_orig])):
        ax.scatter(range(T), [row] * T, c=colors[ids], s=160, marker="s", zorder=3)
        for position, e in enumerate(ids.tolist()):
            ax.text(position, row, str(e), ha="center", va="center", fontsize=7, zorder=4)
    ax.set_yticks([0, 1], ["sorted position s", "original token t"])
    ax.set_xlabel("position (number in the square: its expert)")
    ax.set_ylim(-0.4, 1.4)
    ax.set_title("Sorting tokens by expert: sorted_to_orig_token_idx[s] = t")
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    return fig


def plot_error_histograms(
    errors: dict[str, torch.Tensor],  # label -> errors relative to the reference's RMS
    title: str,
) -> plt.Figure:
    """Histograms, on a log axis, of elementwise errors against the float64 reference."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    all_errors = torch.cat([e.flatten().double().cpu() for e in errors.values()])
    low = max(all_errors[all_errors > 0].min().item(), 1e-12)
    bins = np.logspace(np.log10(low), np.log10(all_errors.max().item() * 1.5), 60)
    curves: list[tuple[list[str], torch.Tensor]] = []  # identical errors share one curve
    for label, err in errors.items():
        same = [c for c in curves if torch.equal(c[1], err)]
        if same:
            same[0][0].append(label)
        else:
            curves.append(([label], err))
    for labels, err in curves:
        clamped = err.flatten().double().cpu().clamp(min=low)
        label = labels[0] if len(labels) == 1 else ", ".join(labels) + " (identical)"
        ax.hist(clamped, bins=bins, histtype="step", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("|result - float64 reference| / RMS(reference)")
    ax.set_ylabel("elements")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_row_errors(
    row_errors: dict[str, torch.Tensor],  # label -> [T] largest error of each row
    race_rows: torch.Tensor,  # rows the racing store can lose
    title: str,
) -> plt.Figure:
    """Largest error of each output row, per kernel, on a shared log axis, with the rows at
    risk of the race shaded."""
    fig, axes = plt.subplots(
        len(row_errors), 1, figsize=(7, 1.9 * len(row_errors)), sharex=True, sharey=True
    )
    for ax, (label, err) in zip(np.atleast_1d(axes), row_errors.items(), strict=True):
        err = err.double().cpu()
        ax.bar(range(len(err)), err, color="tab:red", label="row error")
        for row in race_rows.tolist():
            ax.axvspan(row - 0.5, row + 0.5, color="tab:orange", alpha=0.3)
        ax.set_yscale("log")
        ax.set_ylabel("max |error|")
        ax.set_title(label, fontsize=10)
    ax.axvspan(0, 0, color="tab:orange", alpha=0.3, label="row at risk of the race")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_xlabel("output row (original token index)")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _card_title(results: pd.DataFrame, title: str) -> str:
    first = results.iloc[0]
    return f"{title}\n{first['card']}, bf16, {first['date']}"


def _legend_below(fig: plt.Figure, ax: plt.Axes) -> None:
    """The legend of ``ax``'s lines under the figure's panels, where it covers no data."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=3, fontsize=8)


def _implementation_colors(results: pd.DataFrame) -> dict[str, str]:
    """One colour per implementation, the same in every figure of a results table."""
    return {name: f"C{i}" for i, name in enumerate(results["implementation"].unique())}


def plot_prefill_bars(results: pd.DataFrame) -> plt.Figure:
    """TFLOP/s of every implementation at the two prefill shapes (log axis)."""
    prefill = results[results["sweep"] == "prefill"]
    shapes = list(dict.fromkeys(prefill["shape"]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(12, 3.8), sharey=True)
    colors = _implementation_colors(results)
    for ax, shape in zip(np.atleast_1d(axes), shapes, strict=True):
        rows = prefill[prefill["shape"] == shape]
        first = rows.iloc[0]
        ax.barh(rows["implementation"], rows["tflops"], color=rows["implementation"].map(colors))
        for y, value in enumerate(rows["tflops"]):
            ax.text(value * 1.1, y, f"{value:.3g}", va="center", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlim(right=rows["tflops"].max() * 6)
        ax.set_xlabel("TFLOP/s (2 T K N / time)")
        ax.set_title(f"{shape}: T={first['T']} K={first['K']} N={first['N']} E={first['E']}")
    np.atleast_1d(axes)[0].invert_yaxis()
    fig.suptitle(_card_title(results, "Prefill throughput, uniform routing"))
    fig.tight_layout()
    return fig


def plot_sweep(
    results: pd.DataFrame,
    sweep: str,
    x: str,
    xlabel: str,
    *,
    logx: bool,
) -> plt.Figure:
    """TFLOP/s and GB/s of every implementation along one sweep, one panel pair per shape."""
    rows = results[results["sweep"] == sweep]
    shapes = list(dict.fromkeys(rows["shape"]))
    fig, axes = plt.subplots(
        len(shapes), 2, figsize=(12, 3.8 * len(shapes)), squeeze=False, sharex=True
    )
    colors = _implementation_colors(results)
    for (ax_flops, ax_bytes), shape in zip(axes, shapes, strict=True):
        for name, line in rows[rows["shape"] == shape].groupby("implementation", sort=False):
            # dashed: the entry point, which can coincide with the kernel it runs
            style = "--" if name.startswith("moe_matmul") else "-"
            for ax, y in ((ax_flops, "tflops"), (ax_bytes, "gbps")):
                ax.plot(line[x], line[y], style, marker="o", color=colors[name], label=name)
        ax_bytes.axhline(
            results["copy_gbps"].iloc[0], color="black", linestyle="--", label="copy bandwidth"
        )
        for ax, ylabel in ((ax_flops, "TFLOP/s"), (ax_bytes, "GB/s of the fewest bytes")):
            ax.set_yscale("log")
            if logx:
                ax.set_xscale("log", base=2)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(shape, fontsize=10)
            ax.grid(alpha=0.3)
    fig.suptitle(_card_title(results, f"Throughput against {xlabel}"))
    fig.tight_layout()
    _legend_below(fig, axes[0, 1])
    return fig


def dense_roof_tflops(results: pd.DataFrame) -> float:
    """Compute roof of a results table: its best dense matmul, in TFLOP/s."""
    return results.loc[results["implementation"].str.startswith("dense"), "tflops"].max()


def plot_roofline(results: pd.DataFrame) -> plt.Figure:
    """Arithmetic intensity against TFLOP/s for the token sweep, under the measured roofs: the
    copy bandwidth (sloped) and the best dense matmul (flat)."""
    rows = results[results["sweep"] == "tokens"]
    dense_roof = dense_roof_tflops(results)
    copy_tbps = results["copy_gbps"].iloc[0] / 1e3
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    intensity = np.logspace(-0.5, 4, 200)
    ax.plot(intensity, np.minimum(dense_roof, intensity * copy_tbps), color="black", label="roof")
    colors = _implementation_colors(results)
    for name, group in rows.groupby("implementation", sort=False):
        intensity_of_call = group["flops"] / group["bytes"]
        ax.scatter(intensity_of_call, group["tflops"], s=18, color=colors[name], label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per byte of the fewest bytes)")
    ax.set_ylabel("TFLOP/s")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    ax.set_title(
        _card_title(
            results,
            f"Roofline, Mixtral-like token sweep "
            f"(roofs {copy_tbps:.2f} TB/s, {dense_roof:.0f} TFLOP/s)",
        ),
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def plot_time_against_load(results: pd.DataFrame) -> plt.Figure:
    """Time of each implementation against the largest expert's token count (skew sweep)."""
    rows = results[results["sweep"] == "skew"]
    shapes = list(dict.fromkeys(rows["shape"]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(12, 4), squeeze=False)
    colors = _implementation_colors(results)
    for ax, shape in zip(axes[0], shapes, strict=True):
        for name, line in rows[rows["shape"] == shape].groupby("implementation", sort=False):
            ax.plot(
                line["max_tokens_per_expert"],
                line["ms"],
                marker="o",
                color=colors[name],
                label=name,
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens of the busiest expert (Zipf skew 0 to 2)")
        ax.set_ylabel("time (ms)")
        ax.set_title(shape, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(_card_title(results, "Time against the busiest expert's load"))
    fig.tight_layout()
    _legend_below(fig, axes[0, 0])
    return fig


def plot_flat_prefill(results: pd.DataFrame) -> plt.Figure:
    """Notebook 06: TFLOP/s of the flat kernel and its baselines at both prefill shapes, with
    uniform and Zipf 1.2 routing side by side (linear axis)."""
    prefill = results[
        (results["sweep"] == "prefill")
        & ~results["implementation"].str.startswith("flat metadata (")
    ]
    shapes = list(dict.fromkeys(prefill["shape"]))
    names = list(dict.fromkeys(prefill["implementation"]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(12, 4.2), sharey=True)
    for ax, shape in zip(np.atleast_1d(axes), shapes, strict=True):
        rows = prefill[prefill["shape"] == shape]
        y = np.arange(len(names))
        for offset, (skew, label) in zip(
            (-0.2, 0.2), ((0.0, "uniform"), (1.2, "Zipf 1.2")), strict=True
        ):
            values = rows[rows["skew"] == skew].set_index("implementation")["tflops"]
            values = values.reindex(names)
            ax.barh(y + offset, values, height=0.4, label=label)
            for yi, value in zip(y + offset, values, strict=True):
                if not np.isnan(value):
                    ax.text(value + 5, yi, f"{value:.0f}", va="center", fontsize=7)
        ax.set_yticks(y, names)
        first = rows.iloc[0]
        ax.set_xlabel("TFLOP/s (2 T K N / time)")
        ax.set_xlim(right=rows["tflops"].max() * 1.15)
        ax.set_title(f"{shape}: T={first['T']} K={first['K']} N={first['N']} E={first['E']}")
    np.atleast_1d(axes)[0].invert_yaxis()
    fig.suptitle(_card_title(results, "Flat schedule at prefill"))
    fig.tight_layout()
    _legend_below(fig, np.atleast_1d(axes)[0])
    return fig


def plot_decode_bandwidth(results: pd.DataFrame) -> plt.Figure:
    """Notebook 06: rate of reading the active experts' weights from 1 to 64 tokens, against the
    measured copy bandwidth and a 60% line."""
    decode = results[results["sweep"] == "decode"]
    copy = decode["copy_gbps"].iloc[0]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rows in decode.groupby("implementation", sort=False):
        if name.startswith("flat metadata ("):
            continue
        ax.plot(rows["T"], rows["weight_gbps"], marker="o", label=name)
    ax.axhline(copy, color="k", linestyle="--", label=f"copy bandwidth {copy:.0f} GB/s")
    ax.axhline(0.6 * copy, color="grey", linestyle=":", label="60% of copy")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens T (Mixtral-like shape, uniform top-1 routing)")
    ax.set_ylabel("GB/s of active-expert weights read")
    ax.set_title(_card_title(results, "Decode: weight bandwidth"))
    fig.tight_layout()
    _legend_below(fig, ax)
    return fig


def model_table_limits(results: pd.DataFrame) -> pd.DataFrame:
    """One row per point of the model table: ``moe_matmul``'s roofline fraction, its speed
    against grouped_mm core and pipeline (eager, and in CUDA graphs at decode), its weight
    bandwidth in a graph as a fraction of the copy rate, and what limits it, read from the
    measurements in this order:

    - "host": an eager call takes longer to issue than the GPU takes to run it;
    - "metadata": on the flat path, the routing metadata takes over 5% of the call's GPU time
      (the per-pair path has none);
    - "roofline": at 0.85 of the roofline or more;
    - "weight re-reads": memory-bound (the roofline is the bytes), and the active experts'
      weights are read more than 1.2 times on average (several token blocks per expert);
    - "weight streaming": memory-bound otherwise, so the weights stream in below the copy
      rate;
    - "waves": compute-bound with fewer than two waves of programs on the SMs;
    - "padding": compute-bound with over 20% of the token blocks' rows padding;
    - "tile efficiency": compute-bound otherwise, so the kernel's tiles run below the dense
      rate.
    """
    key = ["model", "gemm", "T", "skew"]
    ms = results.pivot_table(index=key, columns="implementation", values="ms")
    ms = ms.reindex(columns=MODEL_TABLE_CANDIDATES)  # graphs: NaN at prefill, never timed
    points = results[results["implementation"] == "moe_matmul"].set_index(key)
    memory_bound = points["bytes"] / points["copy_gbps"] / 1e6 > (
        points["flops"] / points["dense_tflops"] / 1e9
    )
    limit = pd.Series(index=points.index, dtype=object)
    limit[:] = np.select(
        [
            points["moe_matmul_host_us"] > points["moe_matmul_gpu_us"],
            (points["path"] == "flat")
            & (points["metadata_us"] > 0.05 * points["moe_matmul_gpu_us"]),
            points["roofline_fraction"] >= 0.85,
            memory_bound & (points["weight_reads"] > 1.2),
            memory_bound,
            points["waves"] < 2,
            points["padding"] > 0.2,
        ],
        ["host", "metadata", "roofline", "weight re-reads", "weight streaming", "waves", "padding"],
        "tile efficiency",
    )
    graph_ms = ms["moe_matmul, CUDA graph"]
    summary = pd.DataFrame(
        {
            "roofline": points["roofline_fraction"],
            "vs core": ms["grouped_mm core"] / ms["moe_matmul"],
            "vs pipeline": ms["grouped_mm pipeline"] / ms["moe_matmul"],
            "graph vs pipeline graph": ms["grouped_mm pipeline, CUDA graph"] / graph_ms,
            "graph copy": points["weight_bytes"] / graph_ms / 1e6 / points["copy_gbps"],
            "path": points["path"],
            "block_t": points["block_t"],
            "padding": points["padding"],
            "weight reads": points["weight_reads"],
            "waves": points["waves"],
            "metadata us": points["metadata_us"],
            "host us": points["moe_matmul_host_us"],
            "gpu us": points["moe_matmul_gpu_us"],
            "limit": limit,
        }
    )
    order = {name: i for i, name in enumerate(results["model"].unique())}
    return summary.sort_index(
        key=lambda index: index.map(order) if index.name == "model" else index
    )


def plot_model_table(results: pd.DataFrame, model: str) -> plt.Figure:
    """One model's two expert GEMMs: each candidate's roofline fraction against the tokens,
    uniform routing solid, Zipf-skewed dashed (``moe_matmul`` only)."""
    rows = results[results["model"] == model]
    colors = _implementation_colors(results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, which in zip(axes, GEMMS, strict=True):
        gemm = rows[rows["gemm"] == which]
        for name, by_name in gemm.groupby("implementation", sort=False):
            for skew, line in by_name.groupby("skew"):
                if skew and name != "moe_matmul":
                    continue
                label = f"{name}, Zipf {skew}" if skew else name
                style = "--" if skew else "-"
                ax.plot(
                    line["T"],
                    line["roofline_fraction"],
                    style,
                    marker="o",
                    color=colors[name],
                    label=label,
                )
        first = gemm.iloc[0]
        ax.set_title(f"{which}: {first['K']} -> {first['N']}, E={first['E']}, top-{first['top_k']}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens T")
        ax.axhline(0.85, color="grey", linestyle=":", label="0.85 of the roofline")
    axes[0].set_ylabel("fraction of the roofline")
    axes[0].set_ylim(0, 1.05)
    fig.suptitle(_card_title(results, model))
    fig.tight_layout()
    _legend_below(fig, axes[1])
    return fig


LAYER_PLOT_CANDIDATES = ("helion", "helion, CUDA graph", *TRANSFORMERS_BACKENDS, "grouped_mm core")


def plot_layer_table(results: pd.DataFrame) -> plt.Figure:
    """The layer table, one panel per model: each backend's time per layer call against the
    tokens (log-log), the "helion" backend solid and its CUDA-graph replays dashed."""
    colors = _implementation_colors(results)
    models = list(dict.fromkeys(results["model"]))
    fig, axes = plt.subplots(2, -(-len(models) // 2), figsize=(13, 7.5))
    for ax, model in zip(axes.flat, models, strict=False):
        rows = results[(results["model"] == model) & results["ms"].notna()]
        for name in LAYER_PLOT_CANDIDATES:
            line = rows[rows["implementation"] == name]
            style = "--" if "graph" in name else "-"
            ax.plot(line["T"], line["ms"], style, marker="o", color=colors[name], label=name)
        first = rows.iloc[0]
        ax.set_title(
            f"{model}: H={first['H']}, I={first['I']}, E={first['E']}, top-{first['top_k']}",
            fontsize=9,
        )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens T")
        ax.set_ylabel("ms per layer call")
    fig.suptitle(_card_title(results, "MoE layer experts (gate_up, SiLU, down, combine)"))
    fig.tight_layout()
    _legend_below(fig, axes.flat[0])
    return fig


def layer_table_targets(results: pd.DataFrame) -> pd.DataFrame:
    """Per model and token count: the "helion" backend's speed-up over transformers'
    grouped_mm and over the fastest transformers backend, eager and in CUDA graphs (NaN where
    none was captured), its roofline fraction, and its host and GPU time per eager call."""
    times = results.pivot_table(
        index=["model", "T"], columns="implementation", values="ms", sort=False
    )
    helion = results[results["implementation"] == "helion"].set_index(["model", "T"])
    graphs = [f"{name}, CUDA graph" for name in TRANSFORMERS_BACKENDS]
    graphs = [name for name in graphs if name in times]
    return pd.DataFrame(
        {
            "vs grouped_mm": times["grouped_mm"] / times["helion"],
            "vs fastest backend": times[list(TRANSFORMERS_BACKENDS)].min(axis=1) / times["helion"],
            "graph vs fastest graphed": times[graphs].min(axis=1) / times["helion, CUDA graph"],
            "roofline fraction": helion["roofline_fraction"],
            "host us": helion["helion_host_us"],
            "GPU us": helion["helion_gpu_us"],
        }
    ).round(2)


def backward_times(results: pd.DataFrame) -> pd.DataFrame:
    """The backward table as ms per (model, T) row and (phase, implementation) column, with the
    backward alone (forward + backward minus forward) as a third phase."""
    times = results.pivot_table(
        index=["model", "T"], columns=["phase", "implementation"], values="ms", sort=False
    )
    backward = times["forward + backward"] - times["forward"]
    backward.columns = pd.MultiIndex.from_product([["backward"], backward.columns])
    return pd.concat([times, backward], axis=1)


def plot_backward_table(results: pd.DataFrame) -> plt.Figure:
    """One panel per token count: per model, each candidate's forward and backward stacked,
    as a fraction of transformers' grouped_mm forward + backward (its bar is 1)."""
    times = backward_times(results)
    token_counts = list(dict.fromkeys(results["T"]))
    fig, axes = plt.subplots(1, len(token_counts), figsize=(13, 4.5), sharey=True, squeeze=False)
    axes = axes[0]
    width = 0.8 / len(BACKWARD_CANDIDATES)
    for ax, T in zip(axes, token_counts, strict=True):
        rows = times.xs(T, level="T")
        scale = rows[("forward + backward", "grouped_mm")]
        x = np.arange(len(rows))
        for i, name in enumerate(BACKWARD_CANDIDATES):
            forward = rows[("forward", name)] / scale
            backward = rows[("backward", name)] / scale
            offset = x + (i - (len(BACKWARD_CANDIDATES) - 1) / 2) * width
            ax.bar(offset, forward, width, color=f"C{i}", label=f"{name}: forward")
            ax.bar(
                offset,
                backward,
                width,
                bottom=forward,
                color=f"C{i}",
                alpha=0.45,
                hatch="//",
                label=f"{name}: backward",
            )
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xticks(x, rows.index, rotation=20, fontsize=8)
        ax.set_title(f"T = {T} tokens", fontsize=10)
    axes[0].set_ylabel("time / grouped_mm's forward + backward")
    fig.suptitle(_card_title(results, "MoE layer experts, forward + backward"))
    fig.tight_layout()
    _legend_below(fig, axes[0])
    return fig


def backward_table_targets(results: pd.DataFrame) -> pd.DataFrame:
    """Per model and token count: the "helion" layer's forward + backward ("fwd+bwd") speed-up
    over transformers' grouped_mm and over grouped_mm core ("core"), and the same for each
    phase alone ("fwd", "bwd")."""
    times = backward_times(results)
    columns = {}
    phases = {"forward + backward": "fwd+bwd", "forward": "fwd", "backward": "bwd"}
    peers = {"grouped_mm": "grouped_mm", "grouped_mm core": "core"}
    for phase, short in phases.items():
        for peer, short_peer in peers.items():
            columns[f"{short} vs {short_peer}"] = times[(phase, peer)] / times[(phase, "helion")]
    return pd.DataFrame(columns).round(2)


def plot_expert_parallel_load(runs: dict[str, list[dict[str, object]]]) -> plt.Figure:
    """Per rank, for each routing of ``runs`` (routing -> the ranks' ``expert_parallel_worker``
    results): the pairs it received, i.e. its experts' load, and the bytes it sent to other
    ranks (dispatch and combine)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / len(runs)
    for i, (routing, results) in enumerate(runs.items()):
        ranks = np.arange(len(results)) + i * width
        stats = [result["stats"] for result in results]
        axes[0].bar(ranks, [sum(s["pairs_received"]) for s in stats], width, label=routing)
        sent = [(s["dispatch_bytes_sent"] + s["combine_bytes_sent"]) / 1e3 for s in stats]
        axes[1].bar(ranks, sent, width, label=routing)
    for ax, label in zip(
        axes, ("pairs received (its experts' load)", "kB sent to other ranks"), strict=True
    ):
        ax.set_xticks(
            np.arange(len(results)) + 0.4 - width / 2, [f"rank {r}" for r in range(len(results))]
        )
        ax.set_ylabel(label)
    axes[0].set_title("load per rank")
    axes[1].set_title("traffic per rank (dispatch + combine)")
    fig.tight_layout()
    _legend_below(fig, axes[0])
    return fig


def plot_expert_parallel_time(results: list[dict[str, object]], title: str) -> plt.Figure:
    """Per rank, the seconds of each phase of one ``moe_experts_expert_parallel`` call
    (stacked): the three collectives' phases and the local experts."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    bottom = np.zeros(len(results))
    for phase in EXPERT_PARALLEL_PHASES:
        ms = np.array([result["stats"]["seconds"][phase] * 1e3 for result in results])
        ax.bar([f"rank {r}" for r in range(len(results))], ms, bottom=bottom, label=phase)
        bottom += ms
    ax.set_ylabel("ms")
    ax.set_title(title)
    fig.tight_layout()
    _legend_below(fig, ax)
    return fig


def plot_gradients(
    grads: dict[str, torch.Tensor],  # name -> a 2-D gradient (or a [E, K, N] one, drawn per expert)
) -> plt.Figure:
    """Each gradient as a heat map with its values written in, one panel per matrix."""
    panels = []
    for name, grad in grads.items():
        grad = grad.detach().cpu().float()
        if grad.dim() == 3:
            panels += [(f"{name}[{e}]", grad[e]) for e in range(grad.shape[0])]
        else:
            panels.append((name, grad if grad.dim() == 2 else grad[:, None]))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3))
    for ax, (name, grad) in zip(np.atleast_1d(axes), panels, strict=True):
        limit = grad.abs().max().item() or 1.0
        ax.imshow(grad, cmap="RdBu", vmin=-limit, vmax=limit)
        for (i, j), value in np.ndenumerate(grad.numpy()):
            ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=7)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks(range(grad.shape[0]))
    fig.tight_layout()
    return fig


def plot_top_k_cost(results: pd.DataFrame, T: int = 16384) -> plt.Figure:
    """Notebook 07: at ``T`` tokens (uniform routing), the time of the grouped_mm pipeline and
    of ``moe_matmul`` over grouped_mm core's, for each model's two GEMMs, ordered by top-k."""
    rows = results[(results["T"] == T) & (results["skew"] == 0)]
    ms = rows.pivot_table(index=["top_k", "model", "gemm"], columns="implementation", values="ms")
    ms = ms.sort_index(level=["top_k", "model"], sort_remaining=False)
    labels = [f"{model} {gemm}\n(top-{k})" for k, model, gemm in ms.index]
    x = np.arange(len(ms))
    colors = _implementation_colors(results)
    fig, ax = plt.subplots(figsize=(12, 4))
    for offset, name in ((-0.2, "grouped_mm pipeline"), (0.2, "moe_matmul")):
        ratio = ms[name] / ms["grouped_mm core"]
        ax.bar(x + offset, ratio, width=0.4, color=colors[name], label=name)
    ax.axhline(1.0, color="black", linewidth=1, label="grouped_mm core (pre-sorted pairs)")
    ax.set_xticks(x, labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("time / grouped_mm core's time")
    ax.set_title(_card_title(results, f"Top-k at prefill, T = {T}, uniform routing"))
    fig.tight_layout()
    _legend_below(fig, ax)
    return fig


def plot_autotune_trace(summary: pd.DataFrame, trace: pd.DataFrame) -> plt.Figure:
    """Notebook 08: TFLOP/s of every config the autotuner tried against the seconds since its
    search began, the best so far, and the hand-picked and default configs as lines."""
    shapes = list(dict.fromkeys(summary["shape"]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(12, 4), sharey=False)
    for ax, shape in zip(np.atleast_1d(axes), shapes, strict=True):
        tried = trace[(trace["shape"] == shape) & (trace["status"] == "ok")]
        seconds = tried["timestamp_s"]  # since the search began
        ax.scatter(seconds, tried["tflops"], s=8, alpha=0.5, label="a config it timed")
        ax.step(seconds, tried["tflops"].cummax(), where="post", color="C1", label="best so far")
        rows = summary[summary["shape"] == shape]
        for (_, row), style in zip(rows.iterrows(), ("--", ":", "-."), strict=True):
            ax.axhline(
                row["tflops"],
                color="k",
                linestyle=style,
                linewidth=1,
                label=(f"{row['method']}: {row['tflops']:.0f}"),
            )
        ax.set_xlabel("seconds since the search began")
        ax.set_xlim(left=0)
        ax.set_ylabel("TFLOP/s")
        ax.set_title(shape)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.3), ncol=2)
    fig.suptitle(_card_title(summary, "What autotuning finds, and when"))
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------
# Command line: python moe_helpers.py
# ---------------------------------------------------------------------------------------------


def main() -> None:
    """Check the default implementation on random cases; on a GPU, print a short benchmark."""
    cases = 8
    for n in range(cases):
        case = random_moe_case(n)
        assert_moe_close(
            moe_matmul(case.A, case.W, case.expert_ids), case.A, case.W, case.expert_ids
        )
    print(f"check: moe_matmul matches the float64 reference on {cases} random cases")
    if not ON_GPU:
        print(
            "benchmark: skipped, no CUDA GPU here; Triton's interpreter times NumPy, not a GPU. "
            "notebooks/05_performance.ipynb plots the committed GPU results."
        )
        return
    info = machine_info()
    print(f"benchmark on {info['card']} ({info['sms']} SMs), bf16, uniform routing (seed 1):")
    print(f"{'shape':13s} {'implementation':42s} {'ms':>8s} {'TFLOP/s':>8s}")
    for shape in (MIXTRAL_LIKE, FINE_GRAINED):
        rows = benchmark_point(
            shape,
            benchmark_routing(shape, skew=0.0),
            sweep="prefill",
            skew=0.0,
            skip=("loop reference", "seed kernel, Helion default config"),
        )
        for row in rows:
            name, ms, tflops = row["implementation"], row["ms"], row["tflops"]
            print(f"{shape.name:13s} {name:42s} {ms:8.3f} {tflops:8.1f}")


if __name__ == "__main__":
    main()
