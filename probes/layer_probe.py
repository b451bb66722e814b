"""GPU probe of the MoE layer's forward (gate_up + activation + down): the layer table, the
fused gate_up kernel's configs, eager decode through the experts module against transformers'
backends, and the host time of a decode call: what NOTES.md quotes, re-runnable on a GPU.

    python probes/layer_probe.py SECTION [SECTION ...]   (sections: see SECTIONS below)

Each section prints a table; every row names what it measured. Timings: ``mh.time_ms`` (median
of triton.testing.do_bench) and ``mh.host_and_gpu_us``; every baseline in the same run.
probe_common.run_sections runs the sections and writes $OUT/probe_<sections>.json.
"""

import moe_helpers as mh

import functools
import os
from pathlib import Path

import helion
import pandas as pd
import torch
from probe_common import ROWS, SWIGLU, record, run_sections


def layer_table():
    """mh.run_layer_table for the models of mh.LAYER_TABLE_MODELS named in $LAYER_MODELS and
    the token counts in $LAYER_TOKENS (comma-separated; all of each when unset), its CSV
    rewritten under $OUT after each model."""
    names = os.environ.get("LAYER_MODELS")
    models = tuple(m for m in mh.LAYER_TABLE_MODELS if names is None or m.name in names.split(","))
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
                A.new_empty(0, 2, model.I),  # no gate and up kept
                A.new_empty(0),  # no bias
                model.top_k,
                True,  # nk_layout
                False,  # interleaved
                False,  # has_bias
                SWIGLU,
                False,  # keep_gate_up
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


def layer_decode():
    """Eager decode through the experts module: "helion" (per pair for a handful of pairs),
    the flat and the per-pair layer forced by their configs, and transformers' backends, at
    1-32 tokens of every model in $LAYER_MODELS (comma-separated; all when unset); written to
    $OUT/layer_decode.csv, the file notebook 15 reads (mh.LAYER_DECODE_PATH)."""
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


def decode_host():
    """Host and GPU microseconds of one eager decode call through the experts module, at 1, 2,
    4 and 8 tokens of every model in $LAYER_MODELS (all when unset): "helion" as it runs, the
    same with its custom op's dispatch forced (every call through ``helion_moe::moe_experts``,
    as before eager inference skipped it), and transformers' "batched_mm" and "grouped_mm";
    gpt-oss-120b with its real ``GptOssExperts`` (biases, interleaved, clamped gate). Then, per
    model at one token, torch.profiler's timeline of one "helion" call, with and without the
    op's dispatch, and cProfile's top functions of 200 calls. Written to $OUT/decode_host.csv
    and $OUT/decode_timeline.csv."""
    import helion_moe.layer

    import cProfile
    import pstats

    mh.register_transformers_experts()
    names = os.environ.get("LAYER_MODELS")
    models = [m for m in mh.LAYER_TABLE_MODELS if names is None or m.name in names.split(",")]
    through_op = helion_moe.layer.runs_through_op
    for model in models:
        experts = mh.transformers_experts_module(model)
        modules = {b: mh.with_experts_backend(experts, b) for b in ("batched_mm", "grouped_mm")}
        modules["helion"] = mh.with_experts_backend(experts, "helion")
        for T in (1, 2, 4, 8):
            A = torch.randn(T, model.H, device="cuda", dtype=torch.bfloat16)
            ids, weights = mh.model_routing(T, model.E, model.top_k, 0.0)
            times = {}
            for key, module in modules.items():
                host, gpu = mh.host_and_gpu_us(functools.partial(module, A, ids, weights), 50)
                times |= {f"{key} host us": round(host, 1), f"{key} GPU us": round(gpu, 1)}
            helion_moe.layer.runs_through_op = lambda *tensors: True
            try:
                call = functools.partial(modules["helion"], A, ids, weights)
                host, _ = mh.host_and_gpu_us(call, 50)
            finally:
                helion_moe.layer.runs_through_op = through_op
            times["helion through the op host us"] = round(host, 1)
            record("decode_host", model=model.name, T=T, **times)
        A = torch.randn(1, model.H, device="cuda", dtype=torch.bfloat16)
        ids, weights = mh.model_routing(1, model.E, model.top_k, 0.0)
        for label in ("through the op", "as it runs"):
            helion_moe.layer.runs_through_op = (lambda *t: True) if "op" in label else through_op
            try:
                timeline = mh.call_timeline(functools.partial(modules["helion"], A, ids, weights))
            finally:
                helion_moe.layer.runs_through_op = through_op
            TIMELINES.append(timeline.assign(model=model.name, call=label))
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(200):
            modules["helion"](A, ids, weights)
        profile.disable()
        torch.cuda.synchronize()
        print(model.name, "one token, 200 calls")
        pstats.Stats(profile).sort_stats("tottime").print_stats(20)
        del experts, modules
        torch.cuda.empty_cache()
    out = os.environ.get("OUT", ".")
    rows = pd.DataFrame([row for row in ROWS if row["section"] == "decode_host"])
    mh.with_layer_machine_info(rows.drop(columns="section")).to_csv(f"{out}/decode_host.csv")
    pd.concat(TIMELINES).to_csv(f"{out}/decode_timeline.csv", index=False)


TIMELINES = []


SECTIONS = {
    "layer_table": layer_table,
    "gate_up_configs": gate_up_configs,
    "layer_decode": layer_decode,
    "decode_host": decode_host,
}


if __name__ == "__main__":
    run_sections(SECTIONS)
