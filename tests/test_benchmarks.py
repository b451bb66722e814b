"""The benchmark harness: its committed results and its command line."""

import moe_helpers as mh

import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]


IMPLEMENTATIONS = [
    "dense matmul, same FLOPs",
    "loop reference",
    "grouped_mm core",
    "grouped_mm pipeline",
    "seed kernel, Helion default config",
    "seed kernel, hand-picked config",
    "masked-store kernel, hand-picked config",
    "moe_matmul (validate + sort + masked store)",
]


def test_benchmark_candidates_are_the_study_s_implementations():
    A = torch.randn(16, 16).to(mh.DEVICE, torch.bfloat16)
    W = torch.randn(2, 16, 16).to(mh.DEVICE, torch.bfloat16)
    assert list(mh.benchmark_candidates(A, W, mh.route_uniform(16, 2))) == IMPLEMENTATIONS


def test_committed_results_cover_the_study_and_name_their_card():
    results = pd.read_csv(ROOT / "notebooks" / "results" / "benchmarks.csv")
    for column in ("card", "date", "torch", "triton", "helion", "sms", "copy_gbps"):
        assert results[column].notna().all() and results[column].nunique() == 1, column
    assert set(results["sweep"]) == {"prefill", "tokens", "skew"}
    assert set(results["shape"]) == {mh.MIXTRAL_LIKE.name, mh.FINE_GRAINED.name}
    tokens = results[results["sweep"] == "tokens"]
    assert sorted(set(tokens["T"])) == mh.DECODE_TO_PREFILL_TOKENS
    assert sorted(set(results.loc[results["sweep"] == "skew", "skew"])) == mh.ZIPF_SKEWS
    for _, rows in results[results["sweep"] == "prefill"].groupby("shape"):
        assert list(rows["implementation"]) == IMPLEMENTATIONS
    # the work is counted from the shape, and the rates from the work and the time
    T, K, N, E = (results[c] for c in ("T", "K", "N", "E"))
    assert (results["flops"] == 2 * T * K * N).all()
    dense = results["implementation"].str.startswith("dense")
    weights = results["active_experts"].where(~dense, 1) * K * N
    assert (results["bytes"] == 2 * (T * K + weights + T * N)).all()
    assert ((results["tflops"] - results["flops"] / results["ms"] / 1e9).abs() < 1e-6).all()
    assert ((results["gbps"] - results["bytes"] / results["ms"] / 1e6).abs() < 1e-6).all()
    assert (results["active_experts"] <= E).all()


def test_command_line_checks_and_says_what_it_skipped():
    done = subprocess.run(
        [sys.executable, "moe_helpers.py"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert "check: moe_matmul matches the float64 reference on 8 random cases" in done.stdout
    if mh.ON_GPU:
        assert "TFLOP/s" in done.stdout and mh.FINE_GRAINED.name in done.stdout
    else:
        assert "benchmark: skipped, no CUDA GPU here" in done.stdout


def test_committed_flat_schedule_results_cover_notebook_06_and_name_their_card():
    results = pd.read_csv(ROOT / "notebooks" / "results" / "flat_schedule.csv")
    for column in ("card", "date", "torch", "triton", "helion", "sms", "copy_gbps"):
        assert results[column].notna().all() and results[column].nunique() == 1, column
    prefill = results[results["sweep"] == "prefill"]
    assert set(zip(prefill["shape"], prefill["skew"], strict=True)) == {
        (shape.name, skew) for shape in (mh.MIXTRAL_LIKE, mh.FINE_GRAINED) for skew in (0.0, 1.2)
    }
    decode = results[results["sweep"] == "decode"]
    assert sorted(set(decode["T"])) == mh.DECODE_TOKENS
    assert set(results["sweep"]) == {"prefill", "decode"}
    # rates from the shape, the active experts and the time
    T, K, N, ms = (results[c] for c in ("T", "K", "N", "ms"))
    assert ((results["tflops"] - 2 * T * K * N / ms / 1e9).abs() < 1e-6).all()
    weights = 2 * results["active_experts"] * K * N
    assert ((results["weight_gbps"] - weights / ms / 1e6).abs() < 1e-6).all()
