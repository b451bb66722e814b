"""GPU probe for moe_matmul's general speed, one expert GEMM at a time: decode and prefill
against the grouped_mm pipeline, host time, the per-pair tiles, the index dtype, the weights'
layout, the flat kernel's config sweep and rule check, the model table: what NOTES.md quotes,
re-runnable on a GPU.

    python probes/matmul_probe.py SECTION [SECTION ...]   (sections: see SECTIONS below)

Each section prints a table; every row names what it measured. Timings: ``mh.time_ms`` (median
of triton.testing.do_bench) and ``mh.host_and_gpu_us``; every baseline in the same run.
probe_common.run_sections runs the sections and writes $OUT/probe_<sections>.json.
"""

import moe_helpers as mh
from helion_moe import matmul as matmul_module

import contextlib
import functools
import json
import os
from unittest import mock

import helion
import pandas as pd
import torch
import triton.testing
from probe_common import chosen, chosen_tokens, inputs, record, run_sections


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
    """Host and GPU time of one eager call at prefill, each GEMM of the first three models (or
    the layer table's models named in $MATMUL_MODELS) at T = 4096 (or $MATMUL_TOKENS)."""
    known = [m.name for m in mh.LAYER_TABLE_MODELS]
    names = chosen("MATMUL_MODELS", known) if "MATMUL_MODELS" in os.environ else known[:3]
    models = [m for m in mh.LAYER_TABLE_MODELS if m.name in names]
    for model in models:
        for which in mh.GEMMS:
            for T in chosen_tokens("MATMUL_TOKENS", "4096"):
                shape = model.gemm(which, T)
                A, W, ids, w = inputs(shape, model.top_k)
                for name, fn in {
                    "moe_matmul": functools.partial(mh.moe_matmul, A, W, ids, w),
                    "grouped_mm pipeline": functools.partial(
                        mh.moe_matmul_grouped_mm, A, W, ids, w
                    ),
                }.items():
                    host, gpu = mh.host_and_gpu_us(fn)
                    record(
                        "prefill_host",
                        shape=shape.name,
                        T=T,
                        impl=name,
                        host_us=round(host, 1),
                        gpu_us=round(gpu, 1),
                        host_below_gpu=bool(host < gpu),
                    )
                del A, W
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


def model_table():
    """mh.run_model_table one model at a time, the CSV rewritten after each (under $OUT)."""
    done = []
    for model in mh.MOE_MODELS:
        done.append(mh.run_model_table((model,)))
        pd.concat(done).to_csv(f"{os.environ.get('OUT', '.')}/model_table.csv", index=False)
        print(f"model_table: {model.name} done", flush=True)


def rule_check():
    """mh.run_config_rule_check, one GEMM at a time, saved after each (a call that runs out of
    time keeps the GEMMs done) where notebook 14 reads it and under $OUT."""
    done = []
    for gemm in mh.CONFIG_RULE_CHECK_GEMMS:
        done.append(mh.run_config_rule_check(gemms=(gemm,)))
        results = pd.concat(done)
        results.to_csv(mh.CONFIG_RULE_CHECK_PATH, index=False)
        results.to_csv(f"{os.environ.get('OUT', '.')}/config_rule_check.csv", index=False)
        print(mh.config_rule_against_best(done[-1]).to_string(), flush=True)


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


def run_padding():
    """moe_matmul at notebook 09's two shapes with the configs tuned on an H200 (L2 groups of 16
    and 32) and with the flat rule's, each expert's run of blocks padded to a whole L2 group (as
    moe_matmul lays it out) and not padded (``flat_run_blocks`` patched to 1): what the padding
    costs or gains with large groups. Both layouts give the same bits."""
    tuned = mh.load_tuned_configs()
    for shape in (mh.MIXTRAL_LIKE, mh.FINE_GRAINED):
        A, W = mh.benchmark_inputs(shape)
        ids = mh.benchmark_routing(shape, 0.0)
        key = mh.tuned_config_key(A.dtype, shape.T, shape.K, shape.N, shape.E, card="NVIDIA H200")
        rule = mh.FLAT_CONFIGS[A.dtype][mh.flat_token_block(shape.T, shape.E)]
        for name, config in (("tuned on an H200", tuned[key]), ("flat rule", rule)):
            call = functools.partial(mh.moe_matmul, A, W, ids, config=config)
            padded = call()
            for layout in ("runs padded to whole groups", "runs of single blocks"):
                patch = mock.patch.object(matmul_module, "flat_run_blocks", lambda *_: 1)
                with patch if layout == "runs of single blocks" else contextlib.nullcontext():
                    if not torch.equal(call(), padded):
                        raise AssertionError(f"{shape.name}: {layout} changed the output")
                    ms = mh.time_ms(call)
                flops = 2 * shape.T * shape.K * shape.N
                row = dict(shape=shape.name, config=name, layout=layout, ms=round(ms, 4))
                record("run_padding", **row, tflops=round(flops / ms / 1e9, 1))


SECTIONS = {
    "decode": decode,
    "int64": int64_cost,
    "prefill_host": prefill_host,
    "per_pair": per_pair,
    "host_parts": host_parts,
    "config_sweep": config_sweep,
    "model_table": model_table,
    "rule_check": rule_check,
    "layout_cost": layout_cost,
    "run_padding": run_padding,
}


if __name__ == "__main__":
    run_sections(SECTIONS)
