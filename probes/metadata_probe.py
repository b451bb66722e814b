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
    chunk_experts = torch.empty(num_chunks, chunk, dtype=torch.int32, device="cuda")
    count_args = (ids, counts, chunk_experts)
    config = metadata_module.METADATA_CONFIG
    mh.run_kernel(mh.count_experts_per_chunk, count_args, config)
    place_args = (
        ids,
        chunk_experts,
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
    moe_experts (bf16, transformers' layout, uniform top-k) at 65,536 pairs (65,540 at
    Qwen3-Next's top-10), each timed by ``mh.host_and_gpu_us`` (the GPU's time without the
    host's gaps)."""
    for name, E, H, I, k, T in (  # noqa: E741
        ("Qwen3-Next", 512, 2048, 512, 10, 6554),
        ("Qwen3-Next's experts, top-8", 512, 2048, 512, 8, 8192),  # exactly 65,536 pairs
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


def reconcile():
    """Why the metadata's GPU time at 512 experts differs between ``many_experts`` (top-10 ids
    [T, k], called eagerly) and ``many_experts_chunks`` (uniform ids [P], graph replays): both
    ids and both ways of timing at 65,540 pairs, and the layer's GPU time, in one run."""
    T, E, k = 6554, 512, 10
    topk_ids, _ = mh.model_routing(T, E, k, 0.0)
    uniform = torch.randint(E, (T * k,), device="cuda")
    block_t = mh.flat_token_block(T * k, E)
    for name, ids in (("top-10 [T, k]", topk_ids), ("uniform [P]", uniform)):
        call = functools.partial(mh.align_to_blocks, ids, E, block_t)
        eager_host, eager_gpu = mh.host_and_gpu_us(call)
        _, replay_gpu = mh.host_and_gpu_us(mh.cuda_graph_replay(call))
        ms = mh.time_ms(call)
        record(
            "reconcile",
            ids=name,
            eager_gpu_us=round(eager_gpu, 1),
            eager_host_us=round(eager_host, 1),
            replay_gpu_us=round(replay_gpu, 1),
            do_bench_us=round(ms * 1e3, 1),
        )
    g = torch.Generator("cuda").manual_seed(0)
    A = torch.randn(T, 2048, generator=g, device="cuda").to(torch.bfloat16)
    gate_up = (torch.randn(E, 1024, 2048, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
    down = (torch.randn(E, 2048, 512, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
    _, weights = mh.model_routing(T, E, k, 0.0)
    layer = functools.partial(
        mh.moe_experts, A, gate_up.transpose(1, 2), down.transpose(1, 2), topk_ids, weights
    )
    host, gpu = mh.host_and_gpu_us(layer)
    row = dict(eager_gpu_us=round(gpu, 1), eager_host_us=round(host, 1))
    record("reconcile", ids="layer, top-10", **row)


@helion.kernel(config=metadata_module.METADATA_CONFIG, static_shapes=False, key=mh.sizes_of_one)
def count_experts_tail_split(
    pair_experts: torch.Tensor,  # [P]
    chunk_counts: torch.Tensor,  # [num_chunks, E] int32, written
    chunk_experts: torch.Tensor,  # [num_chunks, C] int32, written: expert or -1
) -> None:
    """``count_experts_per_chunk`` with its loads masked against P // 16 * 16, a bound Triton
    knows to be a multiple of 16 (so it can vectorize the loads), and the last P % 16 pairs
    loaded apart, only in the chunk that holds them."""
    (P,) = pair_experts.shape
    num_chunks, E = chunk_counts.shape
    E = hl.specialize(E)
    C = hl.specialize(chunk_experts.size(1))
    step = min(mh.METADATA_STEP, C, mh.METADATA_TILE // helion.next_power_of_2(E))
    whole = P // 16 * 16
    for tile_c, tile_e in hl.tile([num_chunks, E], block_size=[1, helion.next_power_of_2(E)]):
        counts = hl.zeros([tile_e], dtype=torch.int32)
        for tile_s in hl.tile(C, block_size=step):
            pair = tile_c.begin * C + tile_s.index
            experts = hl.load(pair_experts, [pair], extra_mask=pair < whole)
            if tile_c.begin * C + C > whole:
                tail = (pair >= whole) & (pair < P)
                experts = torch.where(tail, hl.load(pair_experts, [pair], extra_mask=tail), experts)
            valid = (pair < P) & (experts >= 0) & (experts < E)
            expert = torch.where(valid, experts, -1).to(torch.int32)
            chunk_experts[tile_c.begin, tile_s] = expert
            hits = expert[:, None] == tile_e.index[None, :]
            counts = counts + hits.sum(0, dtype=torch.int32)
        chunk_counts[tile_c.begin, tile_e] = counts


def tail_split():
    """``align_to_blocks`` with its count kernel as it is and with the loads split at
    P // 16 * 16 (``count_experts_tail_split``), at P divisible by 16 and not, 8 to 512
    experts: equal to the reference, GPU time from graph replays, best of two rounds."""
    cases = [(65536, 512), (65540, 512), (65535, 512), (65540, 384), (65540, 256)]
    cases += [(131070, 256), (32770, 128), (8194, 8), (512, 128), (65, 64)]
    kernels = (
        ("current", metadata_module.count_experts_per_chunk),
        ("tail split", count_experts_tail_split),
    )
    for P, E in cases:
        block_t = mh.flat_token_block(P, E)
        ids = torch.randint(E, (P,), device="cuda")
        reference = mh.align_to_blocks_reference(ids, E, block_t)
        for name, kernel in kernels:
            with mock.patch.object(metadata_module, "count_experts_per_chunk", kernel):
                call = functools.partial(mh.align_to_blocks, ids, E, block_t)
                routing = call()
                assert torch.equal(routing.sorted_pair_ids, reference.sorted_pair_ids)
                assert torch.equal(routing.block_expert_ids, reference.block_expert_ids)
                replay = mh.cuda_graph_replay(call)
                gpu = min(mh.host_and_gpu_us(replay)[1] for _ in range(2))
            record("tail_split", P=P, E=E, block_t=block_t, variant=name, gpu_us=round(gpu, 1))


SECTIONS = {
    "many_experts": many_experts,
    "assert": assert_message,
    "metadata": metadata,
    "metadata_variants": metadata_variants,
    "metadata_parts": metadata_parts,
    "many_experts_chunks": many_experts_chunks,
    "reconcile": reconcile,
    "tail_split": tail_split,
}


if __name__ == "__main__":
    run_sections(SECTIONS)
