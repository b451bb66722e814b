"""Notebook 07's studies of the flat schedule: the kernel, its metadata, ``moe_matmul`` and the
grouped_mm baselines at the course's shapes (also top-k, notebook 08), and the config rule
checked at GEMMs it was not fitted to.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable

import helion
import pandas as pd
import torch
from tqdm import tqdm

from ..checks import assert_moe_close
from ..configs import FLAT_CONFIGS, RESULTS_DIR, default_config, split_token_block
from ..decode_graphs import REPLAY_MAX_TOKENS, decode_replay
from ..kernels.flat import moe_matmul_flat
from ..launch import kernel_index_dtype, run_kernel
from ..matmul import flat_kernel_args, moe_matmul, one_token_as_two, sum_over_experts
from ..metadata import align_to_blocks, align_to_blocks_reference
from ..mode import DEVICE, ON_GPU
from ..references import moe_matmul_grouped_mm
from ..routing import as_top_k, expert_load
from ..sorting import sort_tokens_by_expert
from . import timing
from .shapes import (
    FINE_GRAINED,
    MIXTRAL_LIKE,
    MOE_MODELS,
    MoEModel,
    benchmark_inputs,
    benchmark_routing,
    model_routing,
    model_weights,
)

__all__ = [
    "CONFIG_RULE_CHECK_GEMMS",
    "CONFIG_RULE_CHECK_PATH",
    "CONFIG_RULE_CHECK_TOKENS",
    "CONFIG_SEARCH",
    "DECODE_TOKENS",
    "config_rule_against_best",
    "flat_candidates",
    "run_config_rule_check",
    "run_flat_benchmarks",
]

DECODE_TOKENS = [1, 2, 4, 8, 16, 32, 64]


def flat_candidates(
    A: torch.Tensor,  # [T, K]
    W: torch.Tensor,  # [E, K, N]
    expert_ids: torch.Tensor,  # [T] or [T, k]
    config: helion.Config,
    combine_weights: torch.Tensor | None = None,  # expert_ids' shape
) -> dict[str, Callable[[], torch.Tensor]]:
    """What notebooks 07 and 08 time: the flat kernel (routing pre-aligned; on a GPU also with
    a persistent grid), its metadata alone (both versions), metadata and kernel together,
    ``moe_matmul`` with ``config`` (the flat path) and with its defaults ("auto"; on a GPU a
    decode-sized call replays the flat kernel from a graph of its own, so there "auto" is also
    timed inside ``decode_replay(False)``: the per-pair kernel for a few pairs), on a GPU also
    captured in a CUDA graph of the caller's (as is the grouped_mm pipeline), and the baselines.
    With top-k routing the kernel entries include the sum over each token's k experts, and
    ``grouped_mm core`` multiplies the pairs' rows, pre-sorted. A one-token batch reaches the
    flat kernel and its metadata as two copies of the token, as ``moe_matmul`` runs it
    (``one_token_as_two``); every other entry gets the one token.

    Taught in notebook 07.
    """
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
        candidates["grouped_mm pipeline, CUDA graph"] = timing.cuda_graph_replay(
            candidates["grouped_mm pipeline"]
        )
        candidates["moe_matmul, CUDA graph"] = timing.cuda_graph_replay(
            candidates["moe_matmul, auto"]
        )
    if ON_GPU and T <= REPLAY_MAX_TOKENS:

        def auto_launched_one_by_one() -> torch.Tensor:
            with decode_replay(False):
                return moe_matmul(A, W, expert_ids, combine_weights)

        candidates["moe_matmul, kernels one by one"] = auto_launched_one_by_one
    return candidates


def run_flat_benchmarks() -> pd.DataFrame:
    """Notebook 07's study, on this GPU, in bf16: the flat kernel and its baselines at both
    prefill shapes (uniform and Zipf 1.2 routing) and at decode sizes of the Mixtral-like
    shape. Every candidate with a [T, N] result is checked against the reference first.

    Taught in notebook 07.
    """
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
            ms = timing.time_ms(fn)
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
    results["copy_gbps"] = timing.copy_bandwidth_gbps()
    for key, value in timing.machine_info().items():
        results[key] = value
    return results


# Notebook 14 checks FLAT_CONFIGS and flat_token_block (fitted to Mixtral-8x7B and DeepSeek-V3)
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


CONFIG_RULE_CHECK_PATH = RESULTS_DIR / "config_rule_check.csv"


def run_config_rule_check(
    gemms: tuple[tuple[str, str], ...] = CONFIG_RULE_CHECK_GEMMS,
    tokens: tuple[int, ...] = CONFIG_RULE_CHECK_TOKENS,
    models: tuple[MoEModel, ...] = MOE_MODELS,
) -> pd.DataFrame:
    """The flat kernel alone (routing pre-aligned, uniform top-k routing as in the model
    table) at every config of the search, at each of ``gemms`` ((model name, GEMM) pairs of
    ``models``) and ``tokens``; one row per config, ``is_rule`` marking the one
    ``default_config`` picks.

    Taught in notebook 14.
    """
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
                        "ms": timing.time_ms(run),
                    }
                )
        del W
        torch.cuda.empty_cache()
    results = pd.DataFrame(rows)
    for key, value in timing.machine_info().items():
        results[key] = value
    return results


def config_rule_against_best(results: pd.DataFrame) -> pd.DataFrame:
    """One row per point of ``run_config_rule_check``'s results: the rule's config and time,
    the fastest config of the search and its time, and ``rule_over_best`` (1.0 when the rule
    picked the fastest).

    Taught in notebook 14.
    """
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
