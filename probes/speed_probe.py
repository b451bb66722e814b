"""GPU probe for moe_matmul's general speed: what NOTES.md quotes, re-runnable on a GPU.

    python probes/speed_probe.py SECTION [SECTION ...]   (sections: see SECTIONS below)

Each section prints a table; every row names what it measured. Timings: ``mh.time_ms`` (median
of triton.testing.do_bench) and ``mh.host_and_gpu_us``; every baseline in the same run.
"""

import moe_helpers as mh
from helion_moe import metadata as metadata_module

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import helion
import helion.language as hl
import pandas as pd
import torch
import triton.testing

ROWS = []

SWIGLU = tuple(mh.GatedActivation())  # the gated kernels' compile-time activation


def record(section, **row):
    ROWS.append({"section": section, **row})
    print(section, json.dumps(row), flush=True)


def inputs(shape, top_k, skew=0.0, seed=0):
    A, W = mh.benchmark_inputs(shape, seed)
    logits = mh.gating_logits(A, shape.E, seed=seed)
    if skew:  # Zipf-skewed preference on top of the gate's logits
        logits = logits + skew * torch.log(mh.zipf_probabilities(shape.E, 1.0)).to(logits)
    expert_ids, weights = mh.route_top_k(logits, top_k)
    return A, W, expert_ids, weights


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


def decode():
    for model in mh.MOE_MODELS:
        for T in (1, 4, 16, 64):
            shape = model.gemm("gate_up", T)
            A, W, ids, w = inputs(shape, model.top_k, seed=T)
            active = int(ids.unique().numel())
            weight_bytes = 2 * active * shape.K * shape.N
            calls = {
                "auto": functools.partial(mh.moe_matmul, A, W, ids, w),
                "per_pair": functools.partial(
                    mh.moe_matmul, A, W, ids, w, implementation="per_pair"
                ),
                "flat": functools.partial(mh.moe_matmul, A, W, ids, w, implementation="flat"),
                "grouped_mm pipeline": functools.partial(mh.moe_matmul_grouped_mm, A, W, ids, w),
            }
            for name, fn in calls.items():
                mh.assert_moe_close(fn(), A, W, ids, w)
                host, gpu = mh.host_and_gpu_us(fn)
                ms = mh.time_ms(fn)
                record(
                    "decode",
                    model=model.name,
                    T=T,
                    impl=name,
                    host_us=round(host, 1),
                    gpu_us=round(gpu, 1),
                    do_bench_us=round(ms * 1e3, 1),
                    gbps=round(weight_bytes / ms / 1e6),
                )
            graphs = {
                "per_pair graph": calls["per_pair"],
                "flat graph": calls["flat"],
                "grouped_mm pipeline graph": calls["grouped_mm pipeline"],
            }
            for name, fn in graphs.items():
                replay = mh.cuda_graph_replay(fn)
                ms = mh.time_ms(replay)
                record(
                    "decode",
                    model=model.name,
                    T=T,
                    impl=name,
                    do_bench_us=round(ms * 1e3, 1),
                    gbps=round(weight_bytes / ms / 1e6),
                    copy_fraction=None,
                )
        torch.cuda.empty_cache()


def int64_cost():
    shape = mh.FINE_GRAINED
    A, W = mh.benchmark_inputs(shape)
    ids = mh.benchmark_routing(shape, 0.0)
    config = mh.default_config("flat", A.dtype, shape.T, shape.K, shape.N, shape.E)
    block_t, kernel_config = mh.split_token_block(config)
    args = mh.flat_kernel_args(A, W, ids, None, block_t)
    for dtype in (torch.int32, torch.int64, torch.int32, torch.int64):
        ms = mh.time_ms(lambda d=dtype: mh.run_kernel(mh.moe_matmul_flat, args, kernel_config, d))
        record(
            "int64",
            shape=shape.name,
            index_dtype=str(dtype),
            tflops=round(2 * shape.T * shape.K * shape.N / ms / 1e9, 1),
        )
    model = mh.MOE_MODELS[1]  # DeepSeek-V3
    shape = model.gemm("gate_up", 4096)
    A, W, ids, w = inputs(shape, model.top_k)
    rows = torch.arange(0, shape.T, 512, device="cuda")
    mh.assert_moe_close(mh.moe_matmul(A, W, ids, w), A, W, ids, w, rows=rows)
    sort = mh.sort_tokens_by_expert(ids.flatten(), shape.E)
    A_sorted = A[sort.sorted_to_orig_token_idx.long() // model.top_k]
    flops = 2 * shape.T * model.top_k * shape.K * shape.N
    for name, fn in {
        "moe_matmul": lambda: mh.moe_matmul(A, W, ids, w),
        "grouped_mm core": lambda: torch._grouped_mm(
            A_sorted, W, offs=sort.expert_token_offsets[1:]
        ),
        "grouped_mm pipeline": lambda: mh.moe_matmul_grouped_mm(A, W, ids, w),
    }.items():
        ms = mh.time_ms(fn)
        record(
            "int64",
            shape=shape.name,
            T=shape.T,
            impl=name,
            ms=round(ms, 3),
            tflops=round(flops / ms / 1e9, 1),
        )


def prefill_host():
    for model in mh.MOE_MODELS[:3]:
        for which in mh.GEMMS:
            shape = model.gemm(which, 4096)
            A, W, ids, w = inputs(shape, model.top_k)
            for name, fn in {
                "moe_matmul": functools.partial(mh.moe_matmul, A, W, ids, w),
                "grouped_mm pipeline": functools.partial(mh.moe_matmul_grouped_mm, A, W, ids, w),
            }.items():
                host, gpu = mh.host_and_gpu_us(fn)
                record(
                    "prefill_host",
                    shape=shape.name,
                    T=4096,
                    impl=name,
                    host_us=round(host, 1),
                    gpu_us=round(gpu, 1),
                )
        torch.cuda.empty_cache()


def per_pair():
    """The per-pair kernel's tiles, and per-pair against flat, at a few pairs."""
    tiles = [(32, 256, 4), (64, 128, 4), (64, 256, 4), (128, 64, 4), (64, 128, 8), (32, 128, 4)]
    for model in (mh.MOE_MODELS[0], mh.MOE_MODELS[1], mh.MOE_MODELS[2]):
        for T in (1, 2, 4, 8):
            shape = model.gemm("gate_up", T)
            A, W, ids, w = inputs(shape, model.top_k, seed=T)
            weight_bytes = 2 * int(ids.unique().numel()) * shape.K * shape.N
            calls = {"flat": functools.partial(mh.moe_matmul, A, W, ids, w, implementation="flat")}
            for bn, bk, warps in tiles:
                config = helion.Config(block_sizes=[1, bn, bk], num_warps=warps, num_stages=4)
                calls[f"per_pair {bn}x{bk} w{warps}"] = functools.partial(
                    mh.moe_matmul, A, W, ids, w, config=config
                )
            for name, fn in calls.items():
                mh.assert_moe_close(fn(), A, W, ids, w)
                host, gpu = mh.host_and_gpu_us(fn)
                graph_ms = mh.time_ms(mh.cuda_graph_replay(fn))
                record(
                    "per_pair",
                    model=model.name,
                    T=T,
                    impl=name,
                    host_us=round(host, 1),
                    gpu_us=round(gpu, 1),
                    graph_us=round(graph_ms * 1e3, 1),
                    graph_gbps=round(weight_bytes / graph_ms / 1e6),
                )
        torch.cuda.empty_cache()


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


def host_parts():
    """Host microseconds of each step of an eager flat-path call (Qwen3-30B-A3B gate_up, T=4)."""
    model = mh.MOE_MODELS[2]
    shape = model.gemm("gate_up", 4)
    A, W, ids, w = inputs(shape, model.top_k)
    E, K, N = W.shape
    config = mh.default_config("flat", A.dtype, ids.numel(), K, N, E)
    block_t, kernel_config = mh.split_token_block(config)
    routing = mh.align_to_blocks(ids, E, block_t)
    weights = mh.pair_weights(ids, w)
    args = routing.kernel_args(A, W, weights)
    chunk = mh.metadata_chunk(routing.sorted_pair_ids.numel(), block_t, E)
    parts = {
        "validate_moe_inputs": functools.partial(mh.validate_moe_inputs, A, W, ids, w),
        "default_config": functools.partial(mh.default_config, "flat", A.dtype, 32, K, N, E),
        "kernel_index_dtype": functools.partial(mh.kernel_index_dtype, A, W, 32),
        "pair_weights": functools.partial(mh.pair_weights, ids, w),
        "align_to_blocks": functools.partial(mh.align_to_blocks, ids, E, block_t),
        "torch.empty x4": lambda: [torch.empty(chunk, device="cuda") for _ in range(4)],
        "check (device)": functools.partial(
            mh.start_expert_id_check, routing.all_placed, ids, E, "device"
        ),
        "flat kernel (run_kernel)": functools.partial(
            mh.run_kernel, mh.moe_matmul_flat, args, kernel_config
        ),
        "sum_over_experts": functools.partial(
            mh.sum_over_experts, torch.empty(4, 8, N, device="cuda", dtype=A.dtype)
        ),
        "moe_matmul flat": functools.partial(mh.moe_matmul, A, W, ids, w, implementation="flat"),
        "moe_matmul per_pair": functools.partial(
            mh.moe_matmul, A, W, ids, w, implementation="per_pair"
        ),
        "grouped_mm pipeline": functools.partial(mh.moe_matmul_grouped_mm, A, W, ids, w),
        "torch.add (one small op)": functools.partial(torch.add, weights, 1),
    }
    for name, fn in parts.items():
        host, _ = mh.host_and_gpu_us(fn, calls=50)
        record("host_parts", part=name, host_us=round(host, 1))


SWEEP_CONFIGS = [  # block_t, N tile, K tile, warps, stages
    (128, 256, 64, 8, 3),
    (128, 128, 64, 4, 3),
    (128, 128, 64, 8, 3),
    (64, 256, 64, 8, 3),
    (64, 128, 64, 4, 3),
    (64, 128, 128, 4, 3),
    (32, 128, 128, 4, 3),
    (32, 256, 64, 8, 3),
    (16, 128, 256, 4, 3),
    (16, 64, 256, 4, 3),
    (16, 64, 128, 4, 4),
    (32, 64, 256, 4, 3),
    (16, 256, 128, 8, 3),
]
SWEEP_TOKENS = (8, 64, 512, 4096, 16384)


def sweep_gemms():
    """The (model, GEMM) pairs a sweep covers: PROBE_GEMMS=Model:gemm,... picks some."""
    wanted = os.environ.get("PROBE_GEMMS")
    for model in mh.MOE_MODELS:
        for which in mh.GEMMS:
            if wanted and f"{model.name}:{which}" not in wanted.split(","):
                continue
            yield model, which


def config_sweep():
    """Flat-kernel configs at the model table's GEMMs (uniform gate routing), kernel alone on
    pre-aligned routing: the data a config rule is fitted to. PROBE_COMPILE_ONLY=1 only
    compiles them (run several such processes at once to fill Triton's cache first)."""
    compile_only = os.environ.get("PROBE_COMPILE_ONLY") == "1"
    for model, which in sweep_gemms():
        for T in SWEEP_TOKENS[-1:] if compile_only else SWEEP_TOKENS:
            shape = model.gemm(which, T)
            A, W, ids, w = inputs(shape, model.top_k)
            flops = 2 * T * model.top_k * shape.K * shape.N
            weight_bytes = 2 * int(ids.unique().numel()) * shape.K * shape.N
            index_dtype = mh.kernel_index_dtype(A, W, ids.numel())
            configs = {
                "default": mh.default_config(
                    "flat", A.dtype, ids.numel(), shape.K, shape.N, shape.E
                )
            }
            for block_t, bn, bk, warps, stages in SWEEP_CONFIGS:
                configs[f"{block_t}x{bn}x{bk} w{warps} s{stages}"] = helion.Config(
                    block_sizes=[block_t, bn, bk], num_warps=warps, num_stages=stages
                )
            for name, config in configs.items():
                block_t, kernel_config = mh.split_token_block(config)
                args = mh.flat_kernel_args(A, W, ids, w, block_t)
                run = functools.partial(
                    mh.run_kernel, mh.moe_matmul_flat, args, kernel_config, index_dtype
                )
                try:
                    run()
                    if compile_only:
                        continue
                    ms = triton.testing.do_bench(run, warmup=10, rep=60, return_mode="median")
                except Exception as error:  # a config that does not compile or fit
                    record(
                        "config_sweep", shape=shape.name, T=T, config=name, error=repr(error)[:200]
                    )
                    continue
                record(
                    "config_sweep",
                    model=model.name,
                    gemm=which,
                    T=T,
                    pairs=ids.numel(),
                    K=shape.K,
                    N=shape.N,
                    E=shape.E,
                    config=name,
                    config_json=json.dumps(dict(config)),
                    us=round(ms * 1e3, 2),
                    tflops=round(flops / ms / 1e9, 1),
                    weight_gbps=round(weight_bytes / ms / 1e6),
                )
            del A, W
            torch.cuda.empty_cache()


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
        ids = torch.randint(E, (P,), device="cuda")
        routing = mh.align_to_blocks(ids, E, block_t)
        reference = mh.align_to_blocks_reference(ids, E, block_t)
        assert torch.equal(routing.sorted_pair_ids, reference.sorted_pair_ids)
        assert torch.equal(routing.block_expert_ids, reference.block_expert_ids)
        num_slots = mh.max_blocks(P, E, block_t) * block_t
        chunk = mh.metadata_chunk(num_slots, block_t, E)
        num_chunks = mh.num_metadata_chunks(num_slots, chunk)
        counts = torch.empty(num_chunks, E, dtype=torch.int32, device="cuda")
        count_args = (ids, counts, torch.empty(chunk, device="cuda"))
        mh.run_kernel(mh.count_experts_per_chunk, count_args, mh.METADATA_CONFIG)
        place_args = (
            ids,
            counts,
            torch.empty(num_chunks, chunk // block_t, dtype=torch.int32, device="cuda"),
            torch.empty(num_chunks, chunk, dtype=torch.int32, device="cuda"),
            torch.empty(1, dtype=torch.int32, device="cuda"),
        )
        parts = {
            "count": functools.partial(
                mh.run_kernel, mh.count_experts_per_chunk, count_args, mh.METADATA_CONFIG
            ),
            "place": functools.partial(
                mh.run_kernel, mh.place_pairs, place_args, mh.METADATA_CONFIG
            ),
            "align_to_blocks": functools.partial(mh.align_to_blocks, ids, E, block_t),
        }
        for name, fn in parts.items():
            _, gpu = mh.host_and_gpu_us(mh.cuda_graph_replay(fn))
            host, _ = mh.host_and_gpu_us(fn)
            record(
                "metadata_parts",
                P=P,
                E=E,
                block_t=block_t,
                chunk=chunk,
                chunks=num_chunks,
                part=name,
                gpu_us=round(gpu, 1),
                host_us=round(host, 1),
            )


def model_table():
    """mh.run_model_table one model at a time, the CSV rewritten after each (under $OUT)."""
    done = []
    for model in mh.MOE_MODELS:
        done.append(mh.run_model_table((model,)))
        pd.concat(done).to_csv(f"{os.environ.get('OUT', '.')}/model_table.csv", index=False)
        print(f"model_table: {model.name} done", flush=True)


def rule_check():
    """mh.run_config_rule_check, one GEMM at a time, saved after each (a call that runs out of
    time keeps the GEMMs done) where notebook 13 reads it and under $OUT."""
    done = []
    for gemm in mh.CONFIG_RULE_CHECK_GEMMS:
        done.append(mh.run_config_rule_check(gemms=(gemm,)))
        results = pd.concat(done)
        results.to_csv(mh.CONFIG_RULE_CHECK_PATH, index=False)
        results.to_csv(f"{os.environ.get('OUT', '.')}/config_rule_check.csv", index=False)
        print(mh.config_rule_against_best(done[-1]).to_string(), flush=True)


def layer_table():
    """mh.run_layer_table for the models named in $LAYER_MODELS and the token counts in
    $LAYER_TOKENS (comma-separated; all of each when unset), its CSV rewritten under $OUT after
    each model."""
    names = os.environ.get("LAYER_MODELS")
    models = tuple(m for m in mh.MOE_MODELS if names is None or m.name in names.split(","))
    tokens = os.environ.get("LAYER_TOKENS")
    tokens = mh.LAYER_TABLE_TOKENS if tokens is None else tuple(map(int, tokens.split(",")))
    out = os.environ.get("OUT", ".")
    path = Path(f"{out}/layer_table_{len(models)}.csv")
    mh.run_layer_table(models, tokens, path=path)


GATE_UP_CANDIDATES = {  # token block: [N tile, K tile], warps, stages
    16: [([128, 256], 4, 3), ([64, 256], 4, 3), ([128, 128], 4, 4), ([64, 128], 4, 4)],
    32: [([128, 128], 4, 3), ([64, 128], 4, 3), ([128, 64], 4, 4), ([64, 256], 4, 3)],
    64: [([128, 64], 8, 3), ([128, 64], 4, 3), ([64, 128], 4, 3), ([128, 128], 8, 3)],
    128: [
        ([128, 64], 8, 3),
        ([128, 64], 8, 4),
        ([64, 64], 4, 3),
        ([128, 32], 8, 4),
        ([256, 64], 8, 3),
    ],
}
GATE_UP_POINTS = [  # (model, T): the rule's token block at each is in the comment
    ("DeepSeek-V3", 8),  # 16
    ("Qwen3-235B-A22B", 64),  # 16
    ("Mixtral-8x7B", 64),  # 32
    ("gpt-oss-120b", 512),  # 32
    ("Mixtral-8x7B", 128),  # 64
    ("DeepSeek-V3", 1024),  # 64
    ("Mixtral-8x7B", 4096),  # 128
    ("DeepSeek-V3", 4096),  # 128
    ("Qwen3-30B-A3B", 16384),  # 128
]


def gate_up_configs():
    """The fused gate_up kernel alone (routing pre-aligned, transformers' [E, 2I, H] weights)
    at GATE_UP_CANDIDATES, against the flat kernel's unfused gate_up at FLAT_CONFIGS."""
    models = {m.name: m for m in mh.MOE_MODELS}
    for name in dict.fromkeys(n for n, _ in GATE_UP_POINTS):
        model = models[name]
        experts = mh.transformers_experts_module(model)
        W = experts.gate_up_proj  # [E, 2I, H]
        for T in [t for n, t in GATE_UP_POINTS if n == name]:
            A = torch.randn(T, model.H, device="cuda", dtype=torch.bfloat16)
            ids, _ = mh.model_routing(T, model.E, model.top_k, 0.0)
            P = ids.numel()
            block_t = mh.flat_token_block(P, model.E)
            routing = mh.align_to_blocks(ids, model.E, block_t)
            index_dtype = mh.kernel_index_dtype(A, W.transpose(1, 2), P)
            args = (
                A,
                W,
                routing.sorted_pair_ids,
                routing.block_expert_ids,
                A.new_empty(0, 2, model.I),
                model.top_k,
                True,
                SWIGLU,
                False,
            )
            for tiles, warps, stages in GATE_UP_CANDIDATES[block_t]:
                config = helion.Config(block_sizes=tiles, num_warps=warps, num_stages=stages)
                try:
                    ms = mh.time_ms(
                        functools.partial(
                            mh.run_kernel, mh.moe_gate_up_flat, args, config, index_dtype
                        )
                    )
                except Exception as error:
                    record(
                        "gate_up_configs",
                        model=name,
                        T=T,
                        block_t=block_t,
                        tiles=tiles,
                        error=repr(error)[:300],
                    )
                    continue
                record(
                    "gate_up_configs",
                    model=name,
                    T=T,
                    block_t=block_t,
                    tiles=tiles,
                    warps=warps,
                    stages=stages,
                    us=round(ms * 1e3, 1),
                    tflops=round(2 * P * model.H * 2 * model.I / ms / 1e9, 1),
                )
            _, flat_config = mh.split_token_block(mh.FLAT_CONFIGS[torch.bfloat16][block_t])
            flat_args = routing.kernel_args(
                A, W.transpose(1, 2), torch.ones(T, model.top_k, device="cuda")
            )
            ms = mh.time_ms(
                functools.partial(
                    mh.run_kernel, mh.moe_matmul_flat, flat_args, flat_config, index_dtype
                )
            )
            record(
                "gate_up_configs",
                model=name,
                T=T,
                block_t=block_t,
                tiles="unfused flat gate_up [P, 2I]",
                us=round(ms * 1e3, 1),
            )
        del experts, W
        torch.cuda.empty_cache()


def layout_cost():
    """moe_matmul on the same weights stored [E, K, N] and [E, N, K] (read in place)."""
    for name, which, T in [
        ("Mixtral-8x7B", "gate_up", 4096),
        ("DeepSeek-V3", "down", 4096),
        ("Qwen3-30B-A3B", "gate_up", 16384),
        ("DeepSeek-V3", "down", 8),
        ("Mixtral-8x7B", "down", 1),
    ]:
        model = {m.name: m for m in mh.MOE_MODELS}[name]
        W = mh.model_weights(model, which)
        W_nk = W.transpose(1, 2).contiguous().transpose(1, 2)
        A = torch.randn(T, W.shape[1], device="cuda", dtype=torch.bfloat16)
        ids, weights = mh.model_routing(T, model.E, model.top_k, 0.0)
        for layout, weights_view in (("[E, K, N]", W), ("[E, N, K]", W_nk)):
            ms = mh.time_ms(functools.partial(mh.moe_matmul, A, weights_view, ids, weights))
            record("layout_cost", model=name, gemm=which, T=T, layout=layout, us=round(ms * 1e3, 1))
        del W, W_nk
        torch.cuda.empty_cache()


WEIGHT_GRAD_CANDIDATES = [  # [K tile, N tile], warps, stages
    ([128, 128], 8, 3),
    ([128, 128], 4, 4),
    ([128, 256], 8, 2),
    ([128, 256], 8, 3),
    ([128, 256], 8, 4),
    ([256, 128], 8, 2),
    ([256, 128], 8, 3),
    ([64, 256], 4, 3),
]
WEIGHT_GRAD_POINTS = [("Mixtral-8x7B", 8192), ("DeepSeek-V3", 8192), ("Qwen3-30B-A3B", 16384)]


def weight_grad_configs():
    """The weight-gradient kernel alone (routing pre-aligned) at WEIGHT_GRAD_CANDIDATES, for
    both of the layer's weight gradients, unweighted as the layer runs them: dW_gate_up = sum
    A^T d(gate, up) (rows of A by token, of d(gate, up) by pair) and dW_down = sum (w h)^T grad
    (w h by pair, grad by token).
    The candidate with the least time over all points becomes mh.WEIGHT_GRAD_CONFIGS[bf16] for
    the sections after this one."""
    models = {m.name: m for m in mh.MOE_MODELS}
    total_us = {}
    for name, T in WEIGHT_GRAD_POINTS:
        model = models[name]
        ids, weights = mh.model_routing(T, model.E, model.top_k, 0.0)
        P = ids.numel()
        block_t = mh.flat_token_block(P, model.E)
        routing = mh.align_to_blocks(ids, model.E, block_t)
        offsets = routing.expert_block_offsets(model.E)
        tokens = torch.randn(T, model.H, device="cuda", dtype=torch.bfloat16)
        by_pair = {
            "gate_up": torch.randn(P, 2 * model.I, device="cuda", dtype=torch.bfloat16),
            "down": torch.randn(P, model.I, device="cuda", dtype=torch.bfloat16),
        }
        gemms = {  # (A, grad_out, a_by_pair, grad_by_pair, weighted), K, N
            "gate_up": ((tokens, by_pair["gate_up"], False, True, False), model.H, 2 * model.I),
            "down": ((by_pair["down"], tokens, True, False, False), model.I, model.H),
        }
        for which, ((A, grad, *flags), K, N) in gemms.items():
            args = (A, grad, routing.sorted_pair_ids, offsets, weights, *flags)
            dW = torch.empty(model.E, K, N, device="meta")
            index_dtype = mh.kernel_index_dtype(A, dW, P)
            for tiles, warps, stages in WEIGHT_GRAD_CANDIDATES:
                config = helion.Config(block_sizes=tiles, num_warps=warps, num_stages=stages)
                row = dict(model=name, T=T, gemm=which, block_t=block_t, tiles=tiles)
                try:
                    ms = mh.time_ms(
                        functools.partial(
                            mh.run_kernel, mh.moe_weight_grad, args, config, index_dtype
                        )
                    )
                except Exception as error:
                    record("weight_grad_configs", **row, error=repr(error)[:300])
                    continue
                key = (tuple(tiles), warps, stages)
                total_us[key] = total_us.get(key, 0.0) + ms * 1e3
                record(
                    "weight_grad_configs",
                    **row,
                    warps=warps,
                    stages=stages,
                    us=round(ms * 1e3, 1),
                    tflops=round(2 * P * K * N / ms / 1e9, 1),
                )
        del tokens, by_pair, gemms, args
        torch.cuda.empty_cache()
    (tiles, warps, stages), us = min(total_us.items(), key=lambda item: item[1])
    best = helion.Config(block_sizes=list(tiles), num_warps=warps, num_stages=stages)
    mh.WEIGHT_GRAD_CONFIGS[torch.bfloat16] = best
    record("weight_grad_configs", best=repr(best), total_us=round(us, 1))


WEIGHT_GRAD_SLOT_CANDIDATES = [([128, 256], 8, 2), ([128, 256], 8, 3), ([128, 256], 8, 4)]


def weight_grad_slots():
    """moe_weight_grad with each 128-slot block of the routing walked as 2 or 4 shorter steps
    (sorted_pair_ids viewed as [blocks * 2, 64] or [blocks * 4, 32], the offsets scaled to
    match: no new metadata), both unweighted gradients, at WEIGHT_GRAD_POINTS."""
    models = {m.name: m for m in mh.MOE_MODELS}
    for name, T in WEIGHT_GRAD_POINTS:
        model = models[name]
        ids, weights = mh.model_routing(T, model.E, model.top_k, 0.0)
        P = ids.numel()
        routing = mh.align_to_blocks(ids, model.E, 128)
        offsets = routing.expert_block_offsets(model.E)
        tokens = torch.randn(T, model.H, device="cuda", dtype=torch.bfloat16)
        gate_up = torch.randn(P, 2 * model.I, device="cuda", dtype=torch.bfloat16)
        hidden = torch.randn(P, model.I, device="cuda", dtype=torch.bfloat16)
        gemms = {
            "gate_up": ((tokens, gate_up, False, True, False), model.H, 2 * model.I),
            "down": ((hidden, tokens, True, False, False), model.I, model.H),
        }
        for which, ((A, grad, *flags), K, N) in gemms.items():
            index_dtype = mh.kernel_index_dtype(A, torch.empty(model.E, K, N, device="meta"), P)
            for slots in (128, 64, 32):
                split = 128 // slots
                pair_ids = routing.sorted_pair_ids.view(-1, slots)
                args = (A, grad, pair_ids, offsets * split, weights, *flags)
                for tiles, warps, stages in WEIGHT_GRAD_SLOT_CANDIDATES:
                    config = helion.Config(block_sizes=tiles, num_warps=warps, num_stages=stages)
                    row = dict(model=name, T=T, gemm=which, slots=slots, warps=warps, stages=stages)
                    try:
                        ms = mh.time_ms(
                            functools.partial(
                                mh.run_kernel, mh.moe_weight_grad, args, config, index_dtype
                            )
                        )
                    except Exception as error:
                        record("weight_grad_slots", **row, error=repr(error)[:300])
                        continue
                    tflops = round(2 * P * K * N / ms / 1e9, 1)
                    record("weight_grad_slots", **row, us=round(ms * 1e3, 1), tflops=tflops)
        del tokens, gate_up, hidden, gemms
        torch.cuda.empty_cache()


@helion.kernel(static_shapes=False, key=mh.sizes_of_one)
def weight_grad_slot_order(
    A_slots: torch.Tensor,  # [num_blocks, block_t, K] the rows in slot order, zeros in padding
    grad_slots: torch.Tensor,  # [num_blocks, block_t, N] likewise
    expert_block_offsets: torch.Tensor,  # [E + 1] int32
) -> torch.Tensor:  # [E, K, N]
    """mh.moe_weight_grad (unweighted) on rows already laid out in the aligned routing's slot
    order: every load is a whole block of consecutive rows, so it can be a TMA load."""
    K = hl.specialize(A_slots.shape[2])
    N = hl.specialize(grad_slots.shape[2])
    hl.specialize(A_slots.shape[1])
    E = expert_block_offsets.shape[0] - 1
    dW = torch.empty(E, K, N, dtype=A_slots.dtype, device=A_slots.device)
    for tile_k, tile_n, tile_e in hl.tile([K, N, E], block_size=[None, None, 1]):
        first = expert_block_offsets[tile_e.begin]
        last = expert_block_offsets[tile_e.begin + 1]
        acc = hl.zeros([tile_k, tile_n], dtype=torch.float32)
        for tile_b in hl.tile(first, last, block_size=1):
            a_block = A_slots[tile_b.begin, :, tile_k]
            acc = torch.addmm(acc, a_block.T, grad_slots[tile_b.begin, :, tile_n])
        dW[tile_e.begin, tile_k, tile_n] = acc.to(dW.dtype)
    return dW


def _weight_grad_config(tiles=(128, 256), warps=8, stages=2, **options):
    return helion.Config(block_sizes=list(tiles), num_warps=warps, num_stages=stages, **options)


POINTER, TMA = "pointer", "tensor_descriptor"
WEIGHT_GRAD_SCHEDULES = {  # label: (kernel, config); "routed" is mh.moe_weight_grad
    "the layer's kernel": ("routed", _weight_grad_config()),
    "TMA store of dW": ("routed", _weight_grad_config(indexing=[POINTER] * 5 + [TMA])),
    "persistent, loops flattened": (
        "routed",
        _weight_grad_config(pid_type="persistent_interleaved", range_flattens=[True, None]),
    ),
    "128 x 128 tiles, 1 stage": ("routed", _weight_grad_config((128, 128), 8, 1)),
    "rows in slot order": ("slots", _weight_grad_config()),
    "rows in slot order, TMA": ("slots", _weight_grad_config(indexing=[POINTER] * 2 + [TMA] * 3)),
    "rows in slot order, TMA, 3 stages": (
        "slots",
        _weight_grad_config(stages=3, indexing=[POINTER] * 2 + [TMA] * 3),
    ),
    "rows in slot order, TMA, persistent, flattened": (
        "slots",
        _weight_grad_config(
            indexing=[POINTER] * 2 + [TMA] * 3,
            pid_type="persistent_interleaved",
            range_flattens=[True, None],
        ),
    ),
}


def weight_grad_schedules(schedules=WEIGHT_GRAD_SCHEDULES):
    """Both unweighted weight gradients of the layer (as weight_grad_configs builds them) by
    mh.moe_weight_grad's gathered loads under other schedules and stores, by the same sum on
    rows laid out in slot order (weight_grad_slot_order, TMA loads possible), and by
    torch._grouped_mm on rows pre-sorted by expert (CUTLASS, the peer's kernel); kernels alone,
    each checked against the first. $WEIGHT_GRAD_MODELS (comma-separated) picks points."""
    names = os.environ.get("WEIGHT_GRAD_MODELS")
    models = {m.name: m for m in mh.MOE_MODELS}
    for name, T in WEIGHT_GRAD_POINTS:
        if names is not None and name not in names.split(","):
            continue
        model = models[name]
        ids, weights = mh.model_routing(T, model.E, model.top_k, 0.0)
        P = ids.numel()
        routing = mh.align_to_blocks(ids, model.E, 128)
        offsets = routing.expert_block_offsets(model.E)
        slots = routing.sorted_pair_ids.flatten().long()
        valid = slots < P
        safe = torch.where(valid, slots, 0)
        tokens = torch.randn(T, model.H, device="cuda", dtype=torch.bfloat16)
        gate_up = torch.randn(P, 2 * model.I, device="cuda", dtype=torch.bfloat16)
        hidden = torch.randn(P, model.I, device="cuda", dtype=torch.bfloat16)
        sort = mh.sort_tokens_by_expert(ids.flatten(), model.E)
        pair_of_sorted_row = sort.sorted_to_orig_token_idx.long()
        ends = sort.expert_token_offsets[1:]
        gemms = {  # (A, grad, a_by_pair, grad_by_pair), A's and grad's row of each slot, K, N
            "gate_up": ((tokens, gate_up, False, True), (safe // model.top_k, safe), model.H),
            "down": ((hidden, tokens, True, False), (safe, safe // model.top_k), model.I),
        }
        for which, ((A, grad, *flags), (a_rows, grad_rows), K) in gemms.items():
            N = grad.shape[1]
            in_slots = [
                torch.where(valid[:, None], x[r], 0).view(-1, 128, x.shape[1])
                for x, r in ((A, a_rows), (grad, grad_rows))
            ]
            sorted_rows = [
                x[pair_of_sorted_row // model.top_k] if x.shape[0] == T else x[pair_of_sorted_row]
                for x in (A, grad)
            ]
            index_dtype = mh.kernel_index_dtype(A, torch.empty(model.E, K, N, device="meta"), P)
            routed_args = (A, grad, routing.sorted_pair_ids, offsets, weights, *flags, False)
            calls = {
                label: functools.partial(
                    mh.run_kernel,
                    mh.moe_weight_grad if kernel == "routed" else weight_grad_slot_order,
                    routed_args if kernel == "routed" else (*in_slots, offsets),
                    config,
                    index_dtype,
                )
                for label, (kernel, config) in schedules.items()
            }
            calls["torch._grouped_mm on pre-sorted rows"] = functools.partial(
                torch._grouped_mm, sorted_rows[0].t(), sorted_rows[1], offs=ends
            )
            expected = None
            for label, fn in calls.items():
                row = dict(model=name, T=T, gemm=which, schedule=label)
                try:
                    out = fn()
                    if expected is None:
                        expected = out
                    difference = mh.relative_difference(out, expected)
                    ms = mh.time_ms(fn)
                except Exception as error:
                    record("weight_grad_schedules", **row, error=repr(error)[:600])
                    continue
                tflops = round(2 * P * K * N / ms / 1e9, 1)
                record(
                    "weight_grad_schedules",
                    **row,
                    us=round(ms * 1e3, 1),
                    tflops=tflops,
                    difference=f"{difference:.2e}",
                )
                del out
            del expected, in_slots, sorted_rows
        del tokens, gate_up, hidden, gemms
        torch.cuda.empty_cache()


@helion.kernel(static_shapes=False, key=mh.sizes_of_one)
def weight_grad_row_modes(
    A: torch.Tensor,  # [T, K] by token, [P, K] by pair or [num_slots, K] by slot
    grad_out: torch.Tensor,  # [T, N], [P, N] or [num_slots, N]
    sorted_pair_ids: torch.Tensor,  # [num_blocks, block_t]
    expert_block_offsets: torch.Tensor,  # [E + 1] int32
    combine_weights: torch.Tensor,  # [T, k] (only its shape is read)
    a_rows: hl.constexpr,  # "token", "pair" or "slot": what A's rows are
    grad_rows: hl.constexpr,  # likewise for grad_out
) -> torch.Tensor:  # [E, K, N]
    """mh.moe_weight_grad (unweighted) where either operand may be laid out in slot order (row
    b * block_t + j is slot j of block b, zeros in padding): such a load needs no pair id."""
    K = hl.specialize(A.shape[1])
    N = hl.specialize(grad_out.shape[1])
    T, top_k = combine_weights.shape
    top_k = hl.specialize(top_k)
    E = expert_block_offsets.shape[0] - 1
    block_t = hl.specialize(sorted_pair_ids.shape[1])
    num_pairs = T * top_k
    dW = torch.empty(E, K, N, dtype=A.dtype, device=A.device)
    for tile_k, tile_n, tile_e in hl.tile([K, N, E], block_size=[None, None, 1]):
        first = expert_block_offsets[tile_e.begin]
        last = expert_block_offsets[tile_e.begin + 1]
        acc = hl.zeros([tile_k, tile_n], dtype=torch.float32)
        for tile_b in hl.tile(first, last, block_size=1):
            slots = tile_b.begin * block_t + hl.arange(block_t)
            if a_rows == "slot" and grad_rows == "slot":
                a_block = A[slots, tile_k]
                grad = grad_out[slots, tile_n]
            else:
                pairs = sorted_pair_ids[tile_b.begin, :]
                valid = pairs < num_pairs
                safe_pairs = torch.where(valid, pairs, 0)
                if a_rows == "slot":
                    a_block = A[slots, tile_k]
                else:
                    rows = safe_pairs // top_k
                    if a_rows == "pair":
                        rows = safe_pairs
                    a_block = hl.load(A, [rows, tile_k], extra_mask=valid[:, None])
                if grad_rows == "slot":
                    grad = grad_out[slots, tile_n]
                else:
                    rows = safe_pairs // top_k
                    if grad_rows == "pair":
                        rows = safe_pairs
                    grad = hl.load(grad_out, [rows, tile_n], extra_mask=valid[:, None])
            acc = torch.addmm(acc, a_block.T, grad)
        dW[tile_e.begin, tile_k, tile_n] = acc.to(dW.dtype)
    return dW


WEIGHT_GRAD_ROW_MODES = {  # gemm: [(A's rows, grad's rows)], the layer's own first
    "gate_up": [("token", "pair"), ("token", "slot"), ("slot", "slot")],
    "down": [("pair", "token"), ("slot", "token"), ("slot", "slot")],
}


ROW_MODE_LABELS = {  # the layer's layout, one operand in slot order, both in slot order
    "gate_up": {
        ("token", "pair"): "the layer's kernel",
        ("token", "slot"): "by-pair rows in slot order, by-token rows gathered",
        ("slot", "slot"): "rows in slot order",
    },
    "down": {
        ("pair", "token"): "the layer's kernel",
        ("slot", "token"): "by-pair rows in slot order, by-token rows gathered",
        ("slot", "slot"): "rows in slot order",
    },
}


def weight_grad_row_modes_section():
    """weight_grad_row_modes at [128, 256] w8 s2 (mh.WEIGHT_GRAD_CONFIGS) for each row layout
    of WEIGHT_GRAD_ROW_MODES, both of the layer's weight gradients, kernel alone, each checked
    against the first; $WEIGHT_GRAD_MODELS picks points."""
    names = os.environ.get("WEIGHT_GRAD_MODELS")
    models = {m.name: m for m in mh.MOE_MODELS}
    config = mh.WEIGHT_GRAD_CONFIGS[torch.bfloat16]
    for name, T in WEIGHT_GRAD_POINTS:
        if names is not None and name not in names.split(","):
            continue
        model = models[name]
        ids, weights = mh.model_routing(T, model.E, model.top_k, 0.0)
        P = ids.numel()
        routing = mh.align_to_blocks(ids, model.E, 128)
        offsets = routing.expert_block_offsets(model.E)
        slots = routing.sorted_pair_ids.flatten().long()
        valid = (slots < P)[:, None]
        safe = torch.where(valid[:, 0], slots, 0)
        tensors = {
            "gate_up": (torch.randn(T, model.H), torch.randn(P, 2 * model.I)),
            "down": (torch.randn(P, model.I), torch.randn(T, model.H)),
        }
        for which, (A, grad) in tensors.items():
            A, grad = (x.to("cuda", torch.bfloat16) for x in (A, grad))
            K, N = A.shape[1], grad.shape[1]
            laid_out = {}
            for x in (A, grad):
                rows = safe if x.shape[0] == P else safe // model.top_k
                laid_out[x.shape] = {
                    "token" if x.shape[0] == T else "pair": x,
                    "slot": torch.where(valid, x[rows], 0),
                }
            index_dtype = mh.kernel_index_dtype(A, torch.empty(model.E, K, N, device="meta"), P)
            expected = None
            for a_rows, grad_rows in WEIGHT_GRAD_ROW_MODES[which]:
                args = (
                    laid_out[A.shape][a_rows],
                    laid_out[grad.shape][grad_rows],
                    routing.sorted_pair_ids,
                    offsets,
                    weights,
                    a_rows,
                    grad_rows,
                )
                fn = functools.partial(
                    mh.run_kernel, weight_grad_row_modes, args, config, index_dtype
                )
                row = dict(model=name, T=T, gemm=which, a_rows=a_rows, grad_rows=grad_rows)
                row["schedule"] = ROW_MODE_LABELS[which][a_rows, grad_rows]
                out = fn()
                expected = out if expected is None else expected
                difference = mh.relative_difference(out, expected)
                ms = mh.time_ms(fn)
                record(
                    "weight_grad_row_modes",
                    **row,
                    us=round(ms * 1e3, 1),
                    tflops=round(2 * P * K * N / ms / 1e9, 1),
                    difference=f"{difference:.2e}",
                )
                del out
            del expected, laid_out
        del tensors
        torch.cuda.empty_cache()


WEIGHT_GRAD_WARP_SPECIALIZED = {  # name: (kernel, config), warp-specialized inner loop
    "warp-specialized (forced)": (
        "routed",
        _weight_grad_config(range_warp_specializes=[None, True]),
    ),
    "warp-specialized (forced), 4 warps": (
        "routed",
        _weight_grad_config(warps=4, range_warp_specializes=[None, True]),
    ),
    "rows in slot order, warp-specialized": (
        "slots",
        _weight_grad_config(range_warp_specializes=[None, True]),
    ),
    "rows in slot order, TMA, warp-specialized": (
        "slots",
        _weight_grad_config(
            indexing=[POINTER] * 2 + [TMA] * 3, range_warp_specializes=[None, True]
        ),
    ),
}


def weight_grad_warp_specialized():
    """weight_grad_schedules' points with Triton's warp specialization of the inner loop,
    which Helion 1.4 offers on compute capability 10 and newer only: switched on here for the
    H200 (9.0) by replacing helion.language.loops._supports_warp_specialize (a probe only)."""
    import helion.language.loops

    helion.language.loops._supports_warp_specialize = lambda: True
    weight_grad_schedules(
        {"the layer's kernel": ("routed", _weight_grad_config()), **WEIGHT_GRAD_WARP_SPECIALIZED}
    )


DOWN_BACKWARD_CANDIDATES = [  # [I tile, N tile], warps, stages
    ([128, 64], 8, 4),  # GATE_UP_CONFIGS' 128-row tiles, what the backward runs
    ([128, 64], 8, 3),
    ([128, 128], 8, 3),
    ([64, 128], 4, 3),
    ([64, 64], 4, 4),
    ([256, 64], 8, 3),
    ([128, 32], 8, 4),
]


DOWN_BACKWARD_PERSISTENT = [  # the chosen tiles, persistent, with and without flattening
    ([128, 128], 8, 3),
    ([128, 128], 8, 3, {"pid_type": "persistent_interleaved"}),
    ([128, 128], 8, 3, {"pid_type": "persistent_interleaved", "range_flattens": [True, None]}),
    ([128, 128], 8, 3, {"pid_type": "persistent_blocked", "range_flattens": [True, None]}),
]


DOWN_BACKWARD_OCCUPANCY = [  # register caps for two or more programs per SM
    ([128, 128], 8, 3),
    ([128, 128], 8, 3, {"pid_type": "persistent_interleaved"}),
    (
        [128, 64],
        8,
        3,
        {"pid_type": "persistent_interleaved", "maxnreg": 128, "num_sm_multiplier": 2},
    ),
    (
        [128, 64],
        8,
        2,
        {"pid_type": "persistent_interleaved", "maxnreg": 128, "num_sm_multiplier": 2},
    ),
    (
        [64, 128],
        4,
        3,
        {"pid_type": "persistent_interleaved", "maxnreg": 128, "num_sm_multiplier": 2},
    ),
    (
        [64, 64],
        4,
        3,
        {"pid_type": "persistent_interleaved", "maxnreg": 128, "num_sm_multiplier": 2},
    ),
    (
        [128, 64],
        4,
        3,
        {"pid_type": "persistent_interleaved", "maxnreg": 256, "num_sm_multiplier": 2},
    ),
]


def down_backward_occupancy():
    """down_backward_configs over DOWN_BACKWARD_OCCUPANCY: with registers capped so that two
    or more programs fit on an SM, can one program's epilogue overlap another's K loop?
    (Helion 1.4 takes maxnreg with persistent programs only: two per SM here.)"""
    down_backward_configs(DOWN_BACKWARD_OCCUPANCY)


def down_backward_persistent():
    """down_backward_configs over DOWN_BACKWARD_PERSISTENT: can a persistent program start its
    next tile's loads while it runs the current tile's epilogue (Triton's loop flattening)?"""
    down_backward_configs(DOWN_BACKWARD_PERSISTENT)


def down_backward_configs(candidates=DOWN_BACKWARD_CANDIDATES):
    """The layer's dh kernel with the activation's backward (``moe_down_backward``) alone,
    routing pre-aligned, transformers' [E, H, I] down weights, at the weight gradient's points;
    against the flat kernel's plain dh GEMM (grad @ W_down^T into [P, I], FLAT_CONFIGS), the
    GEMM without the epilogue. The candidate with the least time over the points (all at
    128-row blocks) becomes mh.DOWN_BACKWARD_CONFIGS[bf16][128] for the sections after it."""
    models = {m.name: m for m in mh.MOE_MODELS}
    total_us = {}
    for name, T in WEIGHT_GRAD_POINTS:
        model = models[name]
        ids, weights = mh.model_routing(T, model.E, model.top_k, 0.0)
        P = ids.numel()
        block_t = mh.flat_token_block(P, model.E)
        routing = mh.align_to_blocks(ids, model.E, block_t)
        W = mh.transformers_experts_module(model).down_proj.detach()  # [E, H, I]
        grad = torch.randn(T, model.H, device="cuda", dtype=torch.bfloat16)
        gate_up = torch.randn(P, 2, model.I, device="cuda", dtype=torch.bfloat16)
        args = (grad, W, gate_up, routing.sorted_pair_ids, routing.block_expert_ids, weights)
        args += (True, SWIGLU)
        index_dtype = mh.kernel_index_dtype(grad, W, P)
        flops = 2 * P * model.H * model.I
        for tiles, warps, stages, *options in candidates:
            options = options[0] if options else {}
            config = helion.Config(block_sizes=tiles, num_warps=warps, num_stages=stages, **options)
            row = dict(model=name, T=T, block_t=block_t, tiles=tiles, warps=warps, stages=stages)
            row.update(options)
            try:
                ms = mh.time_ms(
                    functools.partial(
                        mh.run_kernel, mh.moe_down_backward, args, config, index_dtype
                    )
                )
            except Exception as error:
                record("down_backward_configs", **row, error=repr(error)[:300])
                continue
            key = (tuple(tiles), warps, stages, json.dumps(options))
            total_us[key] = total_us.get(key, 0.0) + ms * 1e3
            tflops = round(flops / ms / 1e9, 1)
            record("down_backward_configs", **row, us=round(ms * 1e3, 1), tflops=tflops)
        _, flat_config = mh.split_token_block(mh.FLAT_CONFIGS[torch.bfloat16][block_t])
        ones = torch.ones_like(weights)
        flat_args = routing.kernel_args(grad, W, ones)  # [E, H, I] is [E, K, N] here
        ms = mh.time_ms(
            functools.partial(
                mh.run_kernel, mh.moe_matmul_flat, flat_args, flat_config, index_dtype
            )
        )
        row = dict(model=name, T=T, block_t=block_t, tiles="plain dh GEMM (flat kernel)")
        record(
            "down_backward_configs", **row, us=round(ms * 1e3, 1), tflops=round(flops / ms / 1e9, 1)
        )
        del W, grad, gate_up, args
        torch.cuda.empty_cache()
    (tiles, warps, stages, options), us = min(total_us.items(), key=lambda item: item[1])
    best = helion.Config(
        block_sizes=[128, *tiles], num_warps=warps, num_stages=stages, **json.loads(options)
    )
    mh.DOWN_BACKWARD_CONFIGS[torch.bfloat16][128] = best
    record("down_backward_configs", best=repr(best), total_us=round(us, 1))


@helion.kernel(static_shapes=False, key=mh.sizes_of_one)
def down_backward_variant(
    grad_out: torch.Tensor,  # [T, N]
    W: torch.Tensor,  # [E, N, I], transformers' down_proj
    gate_up: torch.Tensor,  # [P, 2, I]
    sorted_pair_ids: torch.Tensor,
    block_expert_ids: torch.Tensor,
    combine_weights: torch.Tensor,  # [T, k] float32
    variant: hl.constexpr,  # "plain", "no_loads", "loads_first", "full"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagnosis of mh.moe_down_backward's time (SiLU, [E, N, I] weights): "plain" stores
    grad_h only; "no_loads" runs the epilogue on gate = up = grad_h; "loads_first" loads gate
    and up before the K loop; "full" is moe_down_backward's epilogue without the weight parts."""
    E, N, I = W.shape  # noqa: E741
    I = hl.specialize(I)  # noqa: E741
    N = hl.specialize(N)
    T, top_k = combine_weights.shape
    top_k = hl.specialize(top_k)
    num_blocks, block_t = sorted_pair_ids.shape
    block_t = hl.specialize(block_t)
    num_pairs = T * top_k
    pair_weights = combine_weights.view(num_pairs)
    W_rows = W.reshape(E * N, I)
    d_gate_up = torch.empty(num_pairs, 2, I, dtype=grad_out.dtype, device=grad_out.device)
    hidden = torch.empty(num_pairs, I, dtype=grad_out.dtype, device=grad_out.device)
    for tile_b, tile_n in hl.tile([num_blocks, I], block_size=[1, None]):
        e = block_expert_ids[tile_b.begin]
        if e < E:
            pairs = sorted_pair_ids[tile_b.begin, :]
            valid = pairs < num_pairs
            safe_pairs = torch.where(valid, pairs, 0)
            rows = safe_pairs // top_k
            mask = valid[:, None]
            if variant == "loads_first":
                gate = hl.load(gate_up, [safe_pairs, 0, tile_n], extra_mask=mask)
                up = hl.load(gate_up, [safe_pairs, 1, tile_n], extra_mask=mask)
            grad_h = hl.zeros([block_t, tile_n], dtype=torch.float32)
            for tile_k in hl.tile(N):
                W_frag = W_rows[e * N + tile_k.index, tile_n]
                grad_h = torch.addmm(grad_h, grad_out[rows, tile_k], W_frag)
            if variant == "plain":
                hl.store(hidden, [safe_pairs, tile_n], grad_h.to(hidden.dtype), extra_mask=mask)
            else:
                if variant == "no_loads":
                    g = grad_h
                    u = grad_h
                elif variant == "loads_first":
                    g = gate.to(torch.float32)
                    u = up.to(torch.float32)
                else:
                    g = hl.load(gate_up, [safe_pairs, 0, tile_n], extra_mask=mask).to(torch.float32)
                    u = hl.load(gate_up, [safe_pairs, 1, tile_n], extra_mask=mask).to(torch.float32)
                sig = torch.sigmoid(g)
                act = g * sig
                slope = sig * (1.0 + g * (1.0 - sig))
                dh = grad_h * pair_weights[safe_pairs][:, None]
                d_gate = (dh * u * slope).to(hidden.dtype)
                hl.store(d_gate_up, [safe_pairs, 0, tile_n], d_gate, extra_mask=mask)
                hl.store(
                    d_gate_up, [safe_pairs, 1, tile_n], (dh * act).to(hidden.dtype), extra_mask=mask
                )
                hl.store(hidden, [safe_pairs, tile_n], (act * u).to(hidden.dtype), extra_mask=mask)
    return d_gate_up, hidden


DOWN_BACKWARD_VARIANT_CONFIGS = [
    ([128, 64], 8, 4),
    ([128, 128], 8, 3),
    ([64, 64], 8, 3),
    ([128, 64], 4, 3),
]


def down_backward_variants():
    """down_backward_variant's four variants at Mixtral-8x7B T = 8192, against
    mh.moe_down_backward, each at DOWN_BACKWARD_VARIANT_CONFIGS."""
    model = {m.name: m for m in mh.MOE_MODELS}["Mixtral-8x7B"]
    T = 8192
    ids, weights = mh.model_routing(T, model.E, model.top_k, 0.0)
    P = ids.numel()
    routing = mh.align_to_blocks(ids, model.E, 128)
    W = mh.transformers_experts_module(model).down_proj.detach()  # [E, H, I]
    grad = torch.randn(T, model.H, device="cuda", dtype=torch.bfloat16)
    gate_up = torch.randn(P, 2, model.I, device="cuda", dtype=torch.bfloat16)
    base = (grad, W, gate_up, routing.sorted_pair_ids, routing.block_expert_ids, weights)
    index_dtype = mh.kernel_index_dtype(grad, W, P)
    flops = 2 * P * model.H * model.I
    runs = {
        v: (down_backward_variant, (*base, v)) for v in ("plain", "no_loads", "loads_first", "full")
    }
    runs["moe_down_backward"] = (mh.moe_down_backward, (*base, True, SWIGLU))
    for name, (kernel, args) in runs.items():
        for tiles, warps, stages in DOWN_BACKWARD_VARIANT_CONFIGS:
            config = helion.Config(block_sizes=tiles, num_warps=warps, num_stages=stages)
            row = dict(variant=name, tiles=tiles, warps=warps, stages=stages)
            try:
                ms = mh.time_ms(functools.partial(mh.run_kernel, kernel, args, config, index_dtype))
            except Exception as error:
                record("down_backward_variants", **row, error=repr(error)[:300])
                continue
            tflops = round(flops / ms / 1e9, 1)
            record("down_backward_variants", **row, us=round(ms * 1e3, 1), tflops=tflops)


def backward_table():
    """mh.run_backward_table for the models named in $BACKWARD_MODELS (comma-separated; all
    when unset), its CSV rewritten under $OUT after each point."""
    names = os.environ.get("BACKWARD_MODELS")
    models = tuple(m for m in mh.MOE_MODELS if names is None or m.name in names.split(","))
    out = os.environ.get("OUT", ".")
    mh.run_backward_table(models, path=Path(f"{out}/backward_table_{len(models)}.csv"))


BACKWARD_PARTS_POINTS = [("DeepSeek-V3", 8192), ("Mixtral-8x7B", 8192), ("Qwen3-30B-A3B", 16384)]


def backward_parts():
    """GPU time per kernel of one "helion" forward + backward of the layer (torch.profiler,
    the mean of 3 calls after a warm-up), the largest 12 kernels per point; also written to
    $OUT/backward_parts.csv, the file notebook 14 reads (mh.BACKWARD_PARTS_PATH)."""
    from torch.profiler import ProfilerActivity, profile

    mh.register_transformers_experts()
    models = {m.name: m for m in mh.MOE_MODELS}
    for name, T in BACKWARD_PARTS_POINTS:
        model = models[name]
        experts = mh.transformers_experts_module(model)
        params = (experts.gate_up_proj.requires_grad_(), experts.down_proj.requires_grad_())
        layer = mh.with_experts_backend(experts, "helion")
        A = torch.randn(T, model.H, device="cuda", dtype=torch.bfloat16).requires_grad_()
        ids, weights = mh.model_routing(T, model.E, model.top_k, 0.0)
        weights.requires_grad_()
        grad = torch.randn(T, model.H, device="cuda", dtype=torch.bfloat16)

        def step(layer=layer, A=A, ids=ids, weights=weights, params=params, grad=grad):
            return torch.autograd.grad(layer(A, ids, weights), (A, *params, weights), grad)

        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
        events.sort(key=lambda e: -e.self_device_time_total)
        total = sum(e.self_device_time_total for e in events) / 3
        record("backward_parts", model=name, T=T, kernel="all", us=round(total, 1))
        for event in events[:12]:
            record(
                "backward_parts",
                model=name,
                T=T,
                kernel=event.key[:80],
                calls=event.count // 3,
                us=round(event.self_device_time_total / 3, 1),
            )
        del experts, params, layer, A
        torch.cuda.empty_cache()
    parts = pd.DataFrame([row for row in ROWS if row["section"] == "backward_parts"])
    parts = parts.drop(columns="section").assign(**mh.machine_info())
    parts.to_csv(f"{os.environ.get('OUT', '.')}/backward_parts.csv", index=False)


def layer_decode():
    """Eager decode through the experts module: "helion" (per pair for a handful of pairs),
    the flat and the per-pair layer forced by their configs, and transformers' backends, at
    1-32 tokens of every model in $LAYER_MODELS (comma-separated; all when unset); written to
    $OUT/layer_decode.csv, the file notebook 14 reads (mh.LAYER_DECODE_PATH)."""
    mh.register_transformers_experts()
    names = os.environ.get("LAYER_MODELS")
    for model in (m for m in mh.MOE_MODELS if names is None or m.name in names.split(",")):
        name = model.name
        experts = mh.transformers_experts_module(model)
        gate_up, down = experts.gate_up_proj.transpose(1, 2), experts.down_proj.transpose(1, 2)
        for T in (1, 2, 4, 8, 16, 32):
            A = torch.randn(T, model.H, device="cuda", dtype=torch.bfloat16)
            ids, weights = mh.model_routing(T, model.E, model.top_k, 0.0)
            block_t = mh.flat_token_block(ids.numel(), model.E)
            flat = (mh.GATE_UP_CONFIGS[A.dtype][block_t], mh.FLAT_CONFIGS[A.dtype][block_t])
            per_pair = (mh.PER_PAIR_CONFIGS[A.dtype], mh.PER_PAIR_CONFIGS[A.dtype])
            path = mh.layer_path(ids.numel(), gate_up, down)
            helion = mh.with_experts_backend(experts, "helion")
            flat_out = mh.moe_experts(A, gate_up, down, ids, weights, configs=flat)
            per_pair_out = mh.moe_experts(A, gate_up, down, ids, weights, configs=per_pair)
            difference = mh.relative_difference(per_pair_out, flat_out)
            candidates = {
                "helion": functools.partial(helion, A, ids, weights),
                "helion, flat": functools.partial(
                    mh.moe_experts, A, gate_up, down, ids, weights, configs=flat
                ),
                "helion, per pair": functools.partial(
                    mh.moe_experts, A, gate_up, down, ids, weights, configs=per_pair
                ),
            }
            for backend in ("grouped_mm", "batched_mm", "eager"):
                module = mh.with_experts_backend(experts, backend)
                candidates[backend] = functools.partial(module, A, ids, weights)
            times = {f"{key} us": round(mh.time_ms(fn) * 1e3, 1) for key, fn in candidates.items()}
            host_gpu = {}
            for key in ("helion", "helion, flat", "helion, per pair"):
                host, gpu = mh.host_and_gpu_us(candidates[key])
                column = key.replace(", ", "_").replace(" ", "_")
                host_gpu |= {f"{column}_host_us": round(host, 1), f"{column}_gpu_us": round(gpu, 1)}
            record(
                "layer_decode",
                model=name,
                T=T,
                helion_path=path,
                per_pair_difference_from_flat=difference,
                **host_gpu,
                **times,
            )
        del experts, gate_up, down
        torch.cuda.empty_cache()
        rows = pd.DataFrame([row for row in ROWS if row["section"] == "layer_decode"])
        rows = mh.with_layer_machine_info(rows.drop(columns="section"))
        rows.to_csv(f"{os.environ.get('OUT', '.')}/layer_decode.csv", index=False)


def layer_host_parts():
    """Host microseconds of each step of an eager decode call of the layer (Qwen3-30B-A3B,
    through the experts module, T = 1 per pair and T = 2 flat), then cProfile's top functions
    of 200 module calls at T = 1."""
    import cProfile
    import pstats

    mh.register_transformers_experts()
    model = next(m for m in mh.MOE_MODELS if m.name == "Qwen3-30B-A3B")
    experts = mh.transformers_experts_module(model)
    gate_up, down = experts.gate_up_proj.transpose(1, 2), experts.down_proj.transpose(1, 2)
    helion_module = mh.with_experts_backend(experts, "helion")
    batched = mh.with_experts_backend(experts, "batched_mm")
    for T in (1, 2):
        A = torch.randn(T, model.H, device="cuda", dtype=torch.bfloat16)
        ids, w = mh.model_routing(T, model.E, model.top_k, 0.0)
        P = ids.numel()
        configs = mh.PER_PAIR_CONFIGS[A.dtype], mh.PER_PAIR_CONFIGS[A.dtype]
        _, gu_config, down_config = mh.layer_configs(configs, A.dtype, P, model.E)
        placed = torch.empty(P, dtype=torch.int32, device="cuda")
        pair_experts = ids.contiguous()
        stored, nk = mh.expert_weights_in_place(gate_up)
        gu_args = (A, stored, pair_experts, placed, A.new_empty(0, 2, model.I), nk, SWIGLU, False)
        hidden = mh.run_kernel(mh.moe_gate_up_per_pair, gu_args, gu_config)
        stored_down, nk_down = mh.expert_weights_in_place(down)
        weights = mh.pair_weights(ids, w).view(P, 1)
        down_args = (hidden, stored_down, pair_experts.view(P, 1), weights, placed, nk_down)
        parts = {
            "module helion": functools.partial(helion_module, A, ids, w),
            "module batched_mm": functools.partial(batched, A, ids, w),
            "moe_experts": functools.partial(mh.moe_experts, A, gate_up, down, ids, w),
            "moe_experts_per_pair": functools.partial(
                mh.moe_experts_per_pair,
                A,
                gate_up,
                down,
                ids,
                w,
                SWIGLU,
                (gu_config, down_config),
                "device",
                False,
            ),
            "validate_moe_inputs": functools.partial(
                mh.validate_moe_inputs, A, gate_up, ids, w, weight_name="W_gate_up"
            ),
            "validate_down_weights": functools.partial(mh.validate_down_weights, gate_up, down),
            "layer_configs": functools.partial(mh.layer_configs, configs, A.dtype, P, model.E),
            "transformers_gate": functools.partial(mh.transformers_gate, experts),
            "gate_up per pair (run_kernel)": functools.partial(
                mh.run_kernel, mh.moe_gate_up_per_pair, gu_args, gu_config
            ),
            "down per pair (run_kernel)": functools.partial(
                mh.run_kernel, mh.moe_matmul_per_pair, down_args, down_config
            ),
            "kernel_with_config lookup": functools.partial(
                mh.kernel_with_config, mh.moe_matmul_per_pair, down_config, torch.int32
            ),
            "expert_weights_in_place": functools.partial(mh.expert_weights_in_place, gate_up),
            "pair_weights": functools.partial(mh.pair_weights, ids, w),
            "check (device)": functools.partial(
                mh.start_expert_id_check, placed.all(), ids, model.E, "device"
            ),
            "placed.all()": placed.all,
            "sum_over_experts": functools.partial(
                mh.sum_over_experts, torch.empty(T, model.top_k, model.H, device="cuda")
            ),
            "torch.empty": functools.partial(torch.empty, P, device="cuda"),
            "torch.add (one small op)": functools.partial(torch.add, weights, 1),
        }
        for name, fn in parts.items():
            host, gpu = mh.host_and_gpu_us(fn, calls=50)
            record("layer_host_parts", T=T, part=name, host_us=round(host, 1), gpu_us=round(gpu, 1))
    A = torch.randn(1, model.H, device="cuda", dtype=torch.bfloat16)
    ids, w = mh.model_routing(1, model.E, model.top_k, 0.0)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(200):
        helion_module(A, ids, w)
    profile.disable()
    torch.cuda.synchronize()
    pstats.Stats(profile).sort_stats("tottime").print_stats(30)
    pstats.Stats(profile).sort_stats("cumulative").print_stats(40)


SECTIONS = {
    "assert": assert_message,
    "metadata": metadata,
    "decode": decode,
    "int64": int64_cost,
    "prefill_host": prefill_host,
    "per_pair": per_pair,
    "metadata_variants": metadata_variants,
    "host_parts": host_parts,
    "config_sweep": config_sweep,
    "metadata_parts": metadata_parts,
    "model_table": model_table,
    "rule_check": rule_check,
    "layer_table": layer_table,
    "gate_up_configs": gate_up_configs,
    "layout_cost": layout_cost,
    "weight_grad_configs": weight_grad_configs,
    "down_backward_configs": down_backward_configs,
    "down_backward_persistent": down_backward_persistent,
    "down_backward_occupancy": down_backward_occupancy,
    "down_backward_variants": down_backward_variants,
    "weight_grad_slots": weight_grad_slots,
    "weight_grad_schedules": weight_grad_schedules,
    "weight_grad_row_modes": weight_grad_row_modes_section,
    "weight_grad_warp_specialized": weight_grad_warp_specialized,
    "backward_table": backward_table,
    "backward_parts": backward_parts,
    "layer_decode": layer_decode,
    "layer_host_parts": layer_host_parts,
}

if __name__ == "__main__":
    info = mh.machine_info()
    print(json.dumps(info))
    for name in sys.argv[1:]:
        start = time.perf_counter()
        try:
            SECTIONS[name]()
        except Exception as error:  # report and go on to the next section
            record(name, error=repr(error)[:2000])
        print(f"== {name}: {time.perf_counter() - start:.0f} s", flush=True)
    if len(sys.argv) > 1 and "OUT" in os.environ:
        path = f"{os.environ['OUT']}/probe_{'_'.join(sys.argv[1:])}.json"
        with open(path, "w") as f:
            json.dump({"machine": info, "rows": ROWS}, f, indent=1)
