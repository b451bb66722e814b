"""Notebook 05's study: the seed's per-expert kernels against ``torch._grouped_mm``, a dense
matmul and the copy roof, from decode to prefill and under skew.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pandas as pd
import torch
from tqdm import tqdm

from ..checks import assert_moe_close
from ..configs import DEFAULT_CONFIGS, HELION_DEFAULT_CONFIG, RESULTS_DIR
from ..kernels.seed import moe_matmul_ogs, moe_matmul_ogs_masked_store
from ..matmul import moe_matmul
from ..references import moe_matmul_grouped_mm, moe_matmul_loop_reference
from ..routing import expert_load
from ..sorting import sort_tokens_by_expert
from . import timing
from .shapes import (
    FINE_GRAINED,
    MIXTRAL_LIKE,
    MoEShape,
    benchmark_inputs,
    benchmark_routing,
)

__all__ = [
    "BENCHMARKS_PATH",
    "CHECKED_CANDIDATES",
    "DECODE_TO_PREFILL_TOKENS",
    "HAND_PICKED_CONFIG",
    "SEED_DEFAULT_MAX_TOKENS",
    "ZIPF_SKEWS",
    "benchmark_candidates",
    "benchmark_point",
    "dense_roof_tflops",
    "run_benchmarks",
]

DECODE_TO_PREFILL_TOKENS = [1, 2, 4, 8, 16, 32, 64, 256, 1024, 4096, 16384]


ZIPF_SKEWS = [0.0, 0.4, 0.8, 1.2, 1.6, 2.0]


# The seed kernel with Helion's 16x16x16 default takes seconds per call at prefill sizes; the
# sweeps time it only up to this many tokens (the prefill bars time it at full size).
SEED_DEFAULT_MAX_TOKENS = 1024


# Hand-picked bf16 config that the seed kernel is also timed with (moe_matmul's default).
HAND_PICKED_CONFIG = DEFAULT_CONFIGS[torch.bfloat16]


BENCHMARKS_PATH = RESULTS_DIR / "benchmarks.csv"


def benchmark_candidates(
    A: torch.Tensor,  # [T, K]
    W: torch.Tensor,  # [E, K, N]
    expert_ids: torch.Tensor,  # [T]
) -> dict[str, Callable[[], torch.Tensor]]:
    """What notebook 05 times, each as a call with its preparation (sorting, compiling) done.

    "core" and "kernel" entries take pre-sorted inputs; "pipeline" entries include the sort.

    Taught in notebook 05.
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


def benchmark_point(
    shape: MoEShape,
    expert_ids: torch.Tensor,  # [T]
    *,
    sweep: str,
    skew: float,
    skip: tuple[str, ...] = (),
    seed: int = 0,
) -> list[dict[str, object]]:
    """Check, then time every candidate at one shape and routing; one result row each.

    Taught in notebook 05.
    """
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
        ms = timing.time_ms(fn)
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

    Taught in notebook 05.
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
    results["copy_gbps"] = timing.copy_bandwidth_gbps()
    for key, value in timing.machine_info().items():
        results[key] = value
    return results


def dense_roof_tflops(results: pd.DataFrame) -> float:
    """Compute roof of a results table: its best dense matmul, in TFLOP/s.

    Taught in notebook 05.
    """
    return results.loc[results["implementation"].str.startswith("dense"), "tflops"].max()
