"""GPU probe of the routing metadata (align_to_blocks' count and place kernels, their
warps, step and programs) and of the device-side id check's message: what NOTES.md quotes,
re-runnable on a GPU.

    python probes/metadata_probe.py SECTION [SECTION ...]   (sections: see SECTIONS below)

Each section prints a table; every row names what it measured. Timings: ``mh.time_ms`` (median
of triton.testing.do_bench) and ``mh.host_and_gpu_us``; every baseline in the same run.
probe_common.run_sections runs the sections and writes $OUT/probe_<sections>.json.
"""

import moe_helpers as mh
from helion_moe import metadata as metadata_module

import functools
import itertools
import subprocess
import sys
from unittest import mock

import helion
import helion.language as hl
import torch
from probe_common import record, run_sections


def assert_message():
    script = (
        "import torch\n"
        "torch._assert_async(torch.zeros(1, dtype=torch.int32, device='cuda'), 'MARKER ids')\n"
        "torch.cuda.synchronize()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    out = result.stdout + result.stderr
    record("assert", marker_in_output="MARKER" in out, tail=out[-600:])


def metadata():
    for P, E, block_t in [
        (8, 128, 16),
        (64, 128, 16),
        (512, 256, 16),
        (512, 128, 16),
        (8192, 8, 128),
        (16384, 64, 128),
        (32768, 128, 64),
        (65536, 256, 128),
        (65536, 128, 128),
        (131072, 256, 128),
    ]:
        ids = torch.randint(E, (P,), device="cuda")
        for programs in (128, 256, 512, "torch ops"):
            align = mh.align_to_blocks_reference if programs == "torch ops" else mh.align_to_blocks
            aimed_at = 256 if programs == "torch ops" else programs
            call = functools.partial(align, ids, E, block_t)
            with mock.patch.object(metadata_module, "METADATA_PROGRAMS", aimed_at):
                _, gpu = mh.host_and_gpu_us(mh.cuda_graph_replay(call))
                host, _ = mh.host_and_gpu_us(call)
            record(
                "metadata",
                P=P,
                E=E,
                block_t=block_t,
                programs=programs,
                gpu_us=round(gpu, 1),
                host_us=round(host, 1),
            )


def metadata_variants():
    """Warps and step of the metadata kernels at prefill sizes; each part alone. The step is
    the kernels' compile-time constant, so each variant is patched into the module that owns
    it for its runs, and the kernels compile again."""
    for warps, step in ((4, 64), (8, 64), (4, 32), (8, 32), (16, 64)):
        config = helion.Config(num_warps=warps, num_stages=1)
        with mock.patch.multiple(metadata_module, METADATA_CONFIG=config, METADATA_STEP=step):
            mh.kernel_with_config.cache_clear()
            for P, E, block_t in ((512, 256, 16), (32768, 128, 64), (65536, 256, 128)):
                ids = torch.randint(E, (P,), device="cuda")
                call = functools.partial(mh.align_to_blocks, ids, E, block_t)
                routing = call()
                reference = mh.align_to_blocks_reference(ids, E, block_t)
                assert torch.equal(routing.sorted_pair_ids, reference.sorted_pair_ids)
                _, gpu = mh.host_and_gpu_us(mh.cuda_graph_replay(call))
                record(
                    "metadata_variants",
                    warps=warps,
                    step=step,
                    P=P,
                    E=E,
                    block_t=block_t,
                    gpu_us=round(gpu, 1),
                )
    mh.kernel_with_config.cache_clear()


def metadata_parts():
    """GPU time of the two metadata kernels apart, and of align_to_blocks, from graph replays."""
    for P, E, block_t in [
        (8, 128, 16),
        (64, 128, 16),
        (512, 128, 16),
        (512, 256, 16),
        (16384, 64, 128),
        (32768, 128, 64),
        (32768, 128, 128),
        (65536, 256, 128),
        (131072, 256, 128),
    ]:
        _time_parts("metadata_parts", P, E, block_t)


def many_experts_chunks():
    """The metadata past 256 experts with more or fewer chunks (``METADATA_PROGRAMS``), smaller
    [step, E] tiles (``METADATA_TILE``) and more warps per program (``METADATA_CONFIG``): every
    place program reads all chunks' counts (chunks x E each, chunks**2 x E in all) and walks its
    own pairs with a [step, E] one-hot (slots x E in all), so more chunks spread the walk over
    more programs but add reads of the counts. Each variant is patched into the module that
    owns it for its runs, and the kernels compile again."""
    for programs, tile, warps in itertools.product((1024, 512, 256), (64 * 256, 32 * 256), (4, 8)):
        config = helion.Config(num_warps=warps, num_stages=1)
        patches = dict(METADATA_PROGRAMS=programs, METADATA_TILE=tile, METADATA_CONFIG=config)
        with mock.patch.multiple(metadata_module, **patches):
            mh.kernel_with_config.cache_clear()
            for E in (256, 512, 1024):
                P = 65536
                row = dict(METADATA_PROGRAMS=programs, METADATA_TILE=tile, warps=warps)
                _time_parts("many_experts_chunks", P, E, mh.flat_token_block(P, E), **row)
    mh.kernel_with_config.cache_clear()


def _time_parts(section, P, E, block_t, **row):
    """Check align_to_blocks against its reference at P pairs (uniform random ids), then
    record the GPU time (graph replays) and host time of the count kernel, the place kernel
    and the whole call."""
    ids = torch.randint(E, (P,), device="cuda")
    routing = mh.align_to_blocks(ids, E, block_t)
    reference = mh.align_to_blocks_reference(ids, E, block_t)
    assert torch.equal(routing.sorted_pair_ids, reference.sorted_pair_ids)
    assert torch.equal(routing.block_expert_ids, reference.block_expert_ids)
    num_slots = mh.max_blocks(P, E, block_t) * block_t
    chunk = metadata_module.metadata_chunk(num_slots, block_t, E)
    num_chunks = mh.num_metadata_chunks(num_slots, chunk)
    counts = torch.empty(num_chunks, E, dtype=torch.int32, device="cuda")
    count_args = (ids, counts, torch.empty(chunk, device="cuda"))
    config = metadata_module.METADATA_CONFIG
    mh.run_kernel(mh.count_experts_per_chunk, count_args, config)
    place_args = (
        ids,
        counts,
        torch.empty(num_chunks, chunk // block_t, dtype=torch.int32, device="cuda"),
        torch.empty(num_chunks, chunk, dtype=torch.int32, device="cuda"),
        torch.empty(1, dtype=torch.int32, device="cuda"),
    )
    parts = {
        "count": functools.partial(mh.run_kernel, mh.count_experts_per_chunk, count_args, config),
        "place": functools.partial(mh.run_kernel, mh.place_pairs, place_args, config),
        "align_to_blocks": functools.partial(mh.align_to_blocks, ids, E, block_t),
    }
    for name, fn in parts.items():
        _, gpu = mh.host_and_gpu_us(mh.cuda_graph_replay(fn))
        host, _ = mh.host_and_gpu_us(fn)
        record(
            section,
            **row,
            P=P,
            E=E,
            block_t=block_t,
            chunk=chunk,
            chunks=num_chunks,
            part=name,
            gpu_us=round(gpu, 1),
            host_us=round(host, 1),
        )


def many_experts():
    """The metadata's share of the layer's GPU time past 256 experts: align_to_blocks and
    moe_experts (bf16, transformers' layout, uniform top-k) at 65,536 pairs, each timed by
    ``mh.host_and_gpu_us`` (the GPU's time without the host's gaps)."""
    for name, E, H, I, k, T in (  # noqa: E741
        ("Qwen3-Next", 512, 2048, 512, 10, 6554),
        ("Kimi-K2", 384, 7168, 2048, 8, 8192),
        ("1024 experts", 1024, 2048, 512, 8, 8192),
    ):
        g = torch.Generator("cuda").manual_seed(0)
        A = torch.randn(T, H, generator=g, device="cuda").to(torch.bfloat16)
        weights_of = functools.partial(
            torch.randn, generator=g, device="cuda", dtype=torch.bfloat16
        )  # made in bf16: Kimi-K2's experts are 34 GB
        gate_up, down = weights_of(E, 2 * I, H).mul_(0.02), weights_of(E, H, I).mul_(0.02)
        ids, weights = mh.model_routing(T, E, k, 0.0)
        block_t = mh.flat_token_block(ids.numel(), E)
        metadata_host, metadata_gpu = mh.host_and_gpu_us(
            functools.partial(mh.align_to_blocks, ids, E, block_t)
        )
        layer = functools.partial(
            mh.moe_experts, A, gate_up.transpose(1, 2), down.transpose(1, 2), ids, weights
        )
        layer_host, layer_gpu = mh.host_and_gpu_us(layer)
        record(
            "many_experts",
            model=name,
            E=E,
            T=T,
            pairs=ids.numel(),
            block_t=block_t,
            metadata_gpu_us=round(metadata_gpu, 1),
            metadata_host_us=round(metadata_host, 1),
            layer_gpu_us=round(layer_gpu, 1),
            layer_host_us=round(layer_host, 1),
            metadata_share=round(metadata_gpu / layer_gpu, 4),
        )
        del gate_up, down
        torch.cuda.empty_cache()


# A variant of the place kernel for many experts (issue 30): the counts' prefix over chunks is
# computed once, by torch ops between the two kernels, so that a place program reads one row of
# chunk starts instead of every chunk's counts, and many small chunks cost no more reads. Its
# blocks and walk repeat place_pairs' on purpose, for the measurement: if it is faster, its
# prefix replaces place_pairs' in helion_moe/metadata.py and this copy goes.
@helion.kernel(config=metadata_module.METADATA_CONFIG, static_shapes=False, key=mh.sizes_of_one)
def place_pairs_prefixed(
    pair_experts: torch.Tensor,  # [P] integer expert of each pair
    chunk_starts: torch.Tensor,  # [num_chunks, E] int32: the first slot of chunk c's pairs of e
    run_ends: torch.Tensor,  # [E] int32: the end of each expert's padded run
    pairs_ends: torch.Tensor,  # [E] int32: each run's start plus its expert's pairs
    block_expert_ids: torch.Tensor,  # [num_chunks, C // block_t] int32, written: expert or E
    sorted_pair_ids: torch.Tensor,  # [num_chunks, C] int32, written: pair or P (padding)
) -> None:
    """``mh.place_pairs`` with the chunk starts, run ends and pairs' ends given."""
    (P,) = pair_experts.shape
    num_chunks, E = chunk_starts.shape
    E = hl.specialize(E)
    C = hl.specialize(sorted_pair_ids.size(1))
    blocks_per_chunk = hl.specialize(block_expert_ids.size(1))
    block_t = C // blocks_per_chunk
    slots_flat = sorted_pair_ids.view(num_chunks * C)
    slots_by_block = sorted_pair_ids.view(num_chunks, blocks_per_chunk, block_t)
    step = min(
        metadata_module.METADATA_STEP, C, metadata_module.METADATA_TILE // helion.next_power_of_2(E)
    )
    for tile_c, tile_e, tile_b in hl.tile(
        [num_chunks, E, blocks_per_chunk],
        block_size=[1, helion.next_power_of_2(E), blocks_per_chunk],
    ):
        c = tile_c.begin
        block_start = (c * blocks_per_chunk + tile_b.index) * block_t
        is_expert = tile_e.index < E
        ended = (run_ends[tile_e][None, :] <= block_start[:, None]) & is_expert[None, :]
        block_expert = ended.sum(1, dtype=torch.int32)
        block_expert_ids[c, tile_b] = block_expert
        owner = (tile_e.index[None, :] == block_expert[:, None]).to(torch.int32)
        pairs_end = (pairs_ends[tile_e][None, :] * owner).sum(1, dtype=torch.int32)
        for tile_j in hl.tile(block_t, block_size=block_t):
            slot = (c * blocks_per_chunk + tile_b.index[:, None]) * block_t + tile_j.index[None, :]
            padding = slot >= pairs_end[:, None]
            fill = hl.full([tile_b, tile_j], P, torch.int32)
            hl.store(slots_by_block, [c, tile_b, tile_j], fill, extra_mask=padding)
        next_slot = chunk_starts[c, tile_e]
        for tile_s in hl.tile(C, block_size=step):
            pair = c * C + tile_s.index
            in_range = pair < P
            experts = hl.load(pair_experts, [pair], extra_mask=in_range)
            valid = in_range & (experts >= 0) & (experts < E)
            expert = torch.where(valid, experts, -1).to(torch.int32)
            of_expert = (expert[:, None] == tile_e.index[None, :]).to(torch.int32)
            same_expert_before = (expert[:, None] == expert[None, :]) & (
                tile_s.index[None, :] < tile_s.index[:, None]
            )
            rank = same_expert_before.sum(1, dtype=torch.int32)
            slot = (next_slot[None, :] * of_expert).sum(1, dtype=torch.int32) + rank
            hl.store(slots_flat, [slot], pair.to(torch.int32), extra_mask=valid)
            next_slot = next_slot + of_expert.sum(0, dtype=torch.int32)


def align_prefixed(ids, E, block_t, programs):
    """``mh.align_to_blocks`` (its sorted pair ids and block experts) with
    ``place_pairs_prefixed``, chunks aimed at ``programs``."""
    pair_experts = ids.flatten()
    num_slots = mh.max_blocks(pair_experts.numel(), E, block_t) * block_t
    with mock.patch.object(metadata_module, "METADATA_PROGRAMS", programs):
        chunk = metadata_module.metadata_chunk(num_slots, block_t, E)
    num_chunks = mh.num_metadata_chunks(num_slots, chunk)
    config, device = metadata_module.METADATA_CONFIG, pair_experts.device
    counts = torch.empty(num_chunks, E, dtype=torch.int32, device=device)
    count_args = (pair_experts, counts, torch.empty(chunk, device=device))
    mh.run_kernel(mh.count_experts_per_chunk, count_args, config)
    totals = counts.sum(0, dtype=torch.int32)
    padded = (totals + block_t - 1) // block_t * block_t
    run_ends = padded.cumsum(0, dtype=torch.int32)
    starts = run_ends - padded
    chunk_starts = starts + counts.cumsum(0, dtype=torch.int32) - counts
    blocks = torch.empty(num_chunks, chunk // block_t, dtype=torch.int32, device=device)
    slots = torch.empty(num_chunks, chunk, dtype=torch.int32, device=device)
    args = (pair_experts, chunk_starts, run_ends, starts + totals, blocks, slots)
    mh.run_kernel(place_pairs_prefixed, args, config)
    num_blocks = num_slots // block_t
    return slots.view(-1)[:num_slots].view(num_blocks, block_t), blocks.view(-1)[:num_blocks]


def prefix_once():
    """``align_prefixed`` against ``mh.align_to_blocks`` (both checked against the reference) at
    65,536 uniform pairs over 256, 512 and 1024 experts, with chunks aimed at 256 to 2048
    programs: GPU time from graph replays, host time as called."""
    for E in (256, 512, 1024):
        P = 65536
        block_t = mh.flat_token_block(P, E)
        ids = torch.randint(E, (P,), device=mh.DEVICE)
        reference = mh.align_to_blocks_reference(ids, E, block_t)

        def default(ids=ids, E=E, block_t=block_t):
            routing = mh.align_to_blocks(ids, E, block_t)
            return routing.sorted_pair_ids, routing.block_expert_ids

        calls = {"align_to_blocks": default}
        for programs in (256, 512, 1024, 2048):
            calls[f"prefixed, {programs}"] = functools.partial(
                align_prefixed, ids, E, block_t, programs
            )
        for name, call in calls.items():
            sorted_ids, blocks = call()
            assert torch.equal(sorted_ids, reference.sorted_pair_ids), name
            assert torch.equal(blocks, reference.block_expert_ids), name
            _, gpu = mh.host_and_gpu_us(mh.cuda_graph_replay(lambda c=call: c()[0]))
            host, _ = mh.host_and_gpu_us(call)
            row = dict(E=E, P=P, variant=name)
            record("prefix_once", **row, gpu_us=round(gpu, 1), host_us=round(host, 1))


SECTIONS = {
    "many_experts": many_experts,
    "assert": assert_message,
    "metadata": metadata,
    "metadata_variants": metadata_variants,
    "metadata_parts": metadata_parts,
    "many_experts_chunks": many_experts_chunks,
    "prefix_once": prefix_once,
}


if __name__ == "__main__":
    run_sections(SECTIONS)
