"""The model table (notebooks 08 and 14): ``moe_matmul`` against grouped_mm at six public models'
expert GEMMs, decode to prefill, uniform and skewed, with the grid statistics that say what
limits each point.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import helion
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ..checks import assert_moe_close
from ..configs import (
    RESULTS_DIR,
    choose_implementation,
    default_config,
    flat_run_blocks,
    split_token_block,
)
from ..matmul import moe_matmul, one_token_as_two, replays_eager_call
from ..metadata import align_to_blocks
from ..mode import DEVICE, ON_GPU
from ..references import moe_matmul_grouped_mm
from ..routing import cpu_generator, expert_load
from ..sorting import sort_tokens_by_expert
from . import timing
from .shapes import GEMMS, MOE_MODELS, MoEModel, model_routing, model_weights

__all__ = [
    "MODEL_TABLE_CANDIDATES",
    "MODEL_TABLE_CHECKED_ROWS",
    "MODEL_TABLE_DECODE_MAX_TOKENS",
    "MODEL_TABLE_PATH",
    "MODEL_TABLE_SKEWS",
    "MODEL_TABLE_TOKENS",
    "BlockStats",
    "block_stats",
    "eager_path",
    "flat_grid_stats",
    "model_table_limits",
    "model_table_point",
    "run_model_table",
]

# The model table (notebooks 08 and 14): each MOE_MODELS GEMM at decode and prefill token
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


MODEL_TABLE_PATH = RESULTS_DIR / "model_table.csv"


@dataclasses.dataclass(frozen=True)
class BlockStats:
    """How token blocks of ``block_t`` rows hold a routing's per-expert loads.

    Taught in notebook 06.
    """

    blocks: int  # token blocks in use, each one program per N tile
    padding_rows: int  # rows of those blocks that hold no pair
    wasted_work: float  # padding rows over all rows: the share of the tiles' work thrown away
    weight_reads: float  # blocks per active expert: how often each one's weights are read


def block_stats(load: torch.Tensor, block_t: int) -> BlockStats:  # load: [E] pairs per expert
    """``BlockStats`` of per-expert loads in blocks of ``block_t`` rows.

    Taught in notebook 06.
    """
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
    and the programs with work in units of the GPU's SMs (waves).

    Taught in notebook 14.
    """
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


def eager_path(A: torch.Tensor, W: torch.Tensor, num_pairs: int) -> str:
    """Which kernels an eager ``moe_matmul`` call with its defaults runs: "flat, replayed"
    where it is replayed from a CUDA graph of the flat path (``replays_eager_call``), else the
    kernel ``choose_implementation`` picks, "per_pair" or "flat".

    Taught in notebook 14.
    """
    if replays_eager_call(A, W, "auto", None, "device"):
        return "flat, replayed"
    return choose_implementation(num_pairs, W.shape[0], None)


def model_table_point(
    model: MoEModel,
    which: str,
    W: torch.Tensor,  # [E, K, N]
    T: int,
    skew: float,
) -> list[dict[str, object]]:
    """Check ``moe_matmul`` on sampled rows, then time it and the grouped_mm baselines at one
    GEMM, token count and routing; one result row per candidate, with the point's grid stats,
    the metadata's GPU time and ``moe_matmul``'s host and GPU time per eager call.

    Taught in notebook 14.
    """
    E, K, N = W.shape
    A = torch.randn(T, K, generator=torch.Generator(DEVICE).manual_seed(T), device=DEVICE)
    A = A.to(torch.bfloat16)
    expert_ids, weights = model_routing(T, E, model.top_k, skew)
    rows = torch.randperm(T, generator=cpu_generator(T))[:MODEL_TABLE_CHECKED_ROWS].to(DEVICE)
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
        candidates["moe_matmul, CUDA graph"] = timing.cuda_graph_replay(candidates["moe_matmul"])
        candidates["grouped_mm pipeline, CUDA graph"] = timing.cuda_graph_replay(
            candidates["grouped_mm pipeline"]
        )
    flat_ids = one_token_as_two(expert_ids)[0] if T == 1 else expert_ids
    block_t, kernel_config = split_token_block(config)  # the layout moe_matmul aligns to
    align = functools.partial(
        align_to_blocks, flat_ids, E, block_t, flat_run_blocks(W, kernel_config)
    )
    _, metadata_us = timing.host_and_gpu_us(timing.cuda_graph_replay(align))
    host_us, gpu_us = timing.host_and_gpu_us(candidates["moe_matmul"])
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
        "path": eager_path(A, W, pairs),
        "config": json.dumps(dict(config)),
        **flat_grid_stats(expert_ids, E, N, config),
        "metadata_us": metadata_us,
        "moe_matmul_host_us": host_us,
        "moe_matmul_gpu_us": gpu_us,
        "flops": 2 * pairs * K * N,
        "bytes": 2 * (active * K * N + T * K + T * N),
        "weight_bytes": 2 * active * K * N,
    }
    return [
        {**point, "implementation": name, "ms": timing.time_ms(fn)}
        for name, fn in candidates.items()
    ]


def run_model_table(
    models: tuple[MoEModel, ...] = MOE_MODELS,
    tokens: tuple[int, ...] = MODEL_TABLE_TOKENS,
) -> pd.DataFrame:
    """The model table on this GPU, in bf16: every point of ``model_table_point``, and each
    row's roofline fraction, the time the roofline allows (the work at the dense-matmul rate,
    or the fewest bytes at the copy rate, whichever is longer) over the time measured.

    Taught in notebook 14.
    """
    dense_tflops, copy_gbps = timing.dense_matmul_tflops(), timing.copy_bandwidth_gbps()
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
    results["roofline_fraction"] = timing.roofline(results)["ms"] / results["ms"]
    results["tflops"] = results["flops"] / results["ms"] / 1e9
    results["weight_gbps"] = results["weight_bytes"] / results["ms"] / 1e6
    for key, value in timing.machine_info().items():
        results[key] = value
    return results


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

    Taught in notebook 14.
    """
    key = ["model", "gemm", "T", "skew"]
    ms = results.pivot_table(index=key, columns="implementation", values="ms")
    ms = ms.reindex(columns=MODEL_TABLE_CANDIDATES)  # graphs: NaN at prefill, never timed
    points = results[results["implementation"] == "moe_matmul"].set_index(key)
    memory_bound = timing.roofline(points)["memory_bound"]
    limit = pd.Series(index=points.index, dtype=object)
    limit[:] = np.select(
        [
            points["moe_matmul_host_us"] > points["moe_matmul_gpu_us"],
            points["path"].str.startswith("flat")
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
