"""Notebook 09's study: Helion's default config, a hand-picked list and the autotuner under a
time budget, at both prefill shapes; the winner is saved for ``moe_matmul``.
"""

from __future__ import annotations

import functools
import json
import tempfile
import time
from pathlib import Path

import helion
import pandas as pd
import torch

from ..checks import assert_moe_close
from ..configs import save_tuned_config, tuned_config_key
from ..kernels.flat import moe_matmul_flat
from ..launch import sizes_of_one
from ..matmul import flat_kernel_args, sum_over_experts
from . import timing
from .shapes import FINE_GRAINED, MIXTRAL_LIKE, benchmark_inputs, benchmark_routing

__all__ = [
    "AUTOTUNE_BLOCK_T",
    "AUTOTUNE_BUDGET_SECONDS",
    "HAND_PICKED_FLAT_KERNEL_CONFIGS",
    "run_autotuning",
    "tune_flat_kernel",
]

# Notebook 09: the hand-picked kernel configs (N and K tiles; the token block is 128) that a
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


# Taught in notebook 09, which prints this source.
def tune_flat_kernel(
    args: tuple[torch.Tensor, ...],
    configs: list[helion.Config] | None,
    budget_seconds: int,
    log_base: Path,
) -> tuple[helion.Config, float]:
    """Autotune the flat kernel on ``args``: over ``configs`` only, or, when None, Helion's full
    search bounded by ``budget_seconds``. Benchmarks run in this process, and the search is
    logged to ``log_base.csv``. Returns the best kernel config and the seconds the search
    took."""
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
    """Notebook 09's study, on this GPU, in bf16 at both prefill shapes (uniform routing):
    Helion's default config, the best of ``HAND_PICKED_FLAT_KERNEL_CONFIGS``, and the full
    autotuner with ``AUTOTUNE_BUDGET_SECONDS``; each winner re-timed with ``timing.time_ms``. The
    fastest is saved with ``save_tuned_config`` for ``moe_matmul``. Returns the summary (one
    row per shape and method) and the autotuner's trace (one row per config it tried).

    Taught in notebook 09.
    """
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
            ms = timing.time_ms(functools.partial(kernel, *args))
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
    for key, value in timing.machine_info().items():
        summary[key] = value
    return summary, pd.concat(traces, ignore_index=True)
