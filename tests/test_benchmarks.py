"""The benchmark harness: its committed results and its command line."""

import moe_helpers as mh
from helion_moe import layer, matmul
from helion_moe.benchmarks import fp8_table, layer_table, timing

import json
import subprocess
import sys
from pathlib import Path

import helion
import pandas as pd
import pytest
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


MODEL_TABLE_IMPLEMENTATIONS = {
    "moe_matmul",
    "grouped_mm core",
    "grouped_mm pipeline",
    "moe_matmul, CUDA graph",
    "grouped_mm pipeline, CUDA graph",
}


def test_committed_model_table_covers_every_model_gemm_size_and_routing():
    results = pd.read_csv(mh.MODEL_TABLE_PATH)
    for column in ("card", "date", "torch", "triton", "helion", "sms"):
        assert results[column].notna().all() and results[column].nunique() == 1, column
    # the roofs are measured with each model's points (run_model_table, one model per call)
    roofs = results.groupby("model")[["dense_tflops", "copy_gbps"]].nunique()
    assert (roofs == 1).all().all() and results[["dense_tflops", "copy_gbps"]].notna().all().all()
    points = set(zip(results["model"], results["gemm"], results["T"], results["skew"], strict=True))
    assert points == {
        (model.name, which, T, skew)
        for model in mh.MOE_MODELS
        for which in mh.GEMMS
        for T in mh.MODEL_TABLE_TOKENS
        for skew in mh.MODEL_TABLE_SKEWS
    }
    assert set(results["implementation"]) == MODEL_TABLE_IMPLEMENTATIONS
    graphs = results["implementation"].str.endswith("CUDA graph")
    assert (results.loc[graphs, "T"] <= mh.MODEL_TABLE_DECODE_MAX_TOKENS).all()
    # the shapes are the models' GEMMs, and the rates follow from the work and the time
    models = {model.name: model for model in mh.MOE_MODELS}
    for (name, which), rows in results.groupby(["model", "gemm"]):
        shape = models[name].gemm(which, 1)
        assert set(rows["K"]) == {shape.K} and set(rows["N"]) == {shape.N}, (name, which)
        assert set(rows["top_k"]) == {models[name].top_k}
    T, K, N, k = (results[c] for c in ("T", "K", "N", "top_k"))
    assert (results["flops"] == 2 * T * k * K * N).all()
    assert (results["bytes"] == 2 * (results["active_experts"] * K * N + T * K + T * N)).all()
    roofline_ms = pd.concat(
        [
            results["flops"] / results["dense_tflops"] / 1e9,
            results["bytes"] / results["copy_gbps"] / 1e6,
        ],
        axis=1,
    ).max(axis=1)
    assert ((results["roofline_fraction"] - roofline_ms / results["ms"]).abs() < 1e-9).all()
    limits = mh.model_table_limits(results)
    assert len(limits) == len(points)
    known = {"host", "metadata", "roofline", "weight re-reads", "weight streaming"}
    assert set(limits["limit"]) <= known | {"waves", "padding", "tile efficiency"}


def test_model_table_limits_reads_each_limit_from_its_measurements():
    point = {
        "model": "m", "gemm": "gate_up", "skew": 0.0, "ms": 1.0, "path": "flat", "block_t": 128,
        "flops": 1e9, "bytes": 1e3, "dense_tflops": 1.0, "copy_gbps": 1.0, "weight_bytes": 1e3,
        "roofline_fraction": 0.5, "padding": 0.0, "weight_reads": 1.0, "waves": 10.0,
        "metadata_us": 1.0, "moe_matmul_host_us": 10.0, "moe_matmul_gpu_us": 1000.0,
    }  # fmt: skip
    cases = {
        "host": {"moe_matmul_host_us": 2000.0},
        "metadata": {"metadata_us": 60.0},
        "roofline": {"roofline_fraction": 0.9},
        "weight re-reads": {"bytes": 1e9, "weight_reads": 1.5},
        "weight streaming": {"bytes": 1e9},
        "waves": {"waves": 1.5},
        "padding": {"padding": 0.3},
        "tile efficiency": {},
    }
    rows = []
    for T, (limit, change) in enumerate(cases.items()):
        for name in ("moe_matmul", "grouped_mm core", "grouped_mm pipeline"):
            rows.append({**point, **change, "T": T, "implementation": name, "expected": limit})
    results = pd.DataFrame(rows)
    limits = mh.model_table_limits(results)
    assert list(limits["limit"]) == list(cases)
    # the per-pair path builds no metadata, so its metadata time is never the limit
    per_pair = results[results["expected"] == "metadata"].assign(path="per_pair")
    assert list(mh.model_table_limits(per_pair)["limit"]) == ["tile efficiency"]
    # a call replayed from a graph of the flat path runs the metadata inside it
    replayed = results[results["expected"] == "metadata"].assign(path="flat, replayed")
    assert list(mh.model_table_limits(replayed)["limit"]) == ["metadata"]


def test_model_table_point_checks_and_times_every_candidate(monkeypatch):
    # the harness on the CPU, with the GPU timers replaced by a fixed time: which candidates
    # it runs, that moe_matmul's result is checked, and the grid statistics of the routing
    monkeypatch.setattr(timing, "time_ms", lambda fn: (fn(), 2.0)[1])
    monkeypatch.setattr(timing, "host_and_gpu_us", lambda fn, calls=20: (fn(), (30.0, 40.0))[1])
    monkeypatch.setattr(timing, "cuda_graph_replay", lambda fn: fn)
    model = mh.MoEModel("tiny", H=32, I=16, E=4, top_k=2)
    W = mh.model_weights(model, "down")
    rows = mh.model_table_point(model, "down", W, T=8, skew=1.2)
    assert {row["implementation"] for row in rows} == MODEL_TABLE_IMPLEMENTATIONS
    row = rows[0]
    assert (row["K"], row["N"], row["E"], row["flops"]) == (16, 32, 4, 2 * 8 * 2 * 16 * 32)
    assert row["block_t"] == mh.flat_token_block(16, 4) == 16
    assert 0 <= row["padding"] < 1 and row["weight_reads"] >= 1
    assert (row["moe_matmul_host_us"], row["moe_matmul_gpu_us"]) == (30.0, 40.0)
    # 16 pairs: a GPU replays the flat path from a graph; one launch at a time, as a CPU runs
    # it, they are too many for the per-pair kernel
    assert row["path"] == ("flat, replayed" if mh.ON_GPU else "flat")
    with mh.decode_replay(False):
        assert mh.eager_path(torch.zeros(1, W.shape[1], device=mh.DEVICE), W, 2) == "per_pair"
    wrong = torch.zeros(8, 32, dtype=torch.bfloat16, device=mh.DEVICE)
    # a wrong combine (launched one by one: on a GPU a replayed call would reuse the graph the
    # first run captured on the same weights)
    monkeypatch.setattr(matmul, "sum_over_experts", lambda pair_outputs, **kwargs: wrong)
    with pytest.raises(AssertionError), mh.decode_replay(False):
        mh.model_table_point(model, "down", W, T=8, skew=1.2)


def test_config_rule_check_times_the_whole_search_and_marks_the_rule(monkeypatch):
    monkeypatch.setattr(timing, "time_ms", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setattr(timing, "machine_info", lambda: {"card": "cpu"})
    tiny = mh.MoEModel("tiny", H=64, I=64, E=4, top_k=2)
    results = mh.run_config_rule_check((("tiny", "down"),), (8, 64), (tiny,))
    search = len(mh.FLAT_CONFIGS[torch.bfloat16]) + len(mh.CONFIG_SEARCH)
    assert len(results) == 2 * search
    for T, rows in results.groupby("T"):
        (rule,) = rows.loc[rows["is_rule"], "config"]
        default = mh.default_config("flat", torch.bfloat16, 2 * T, 64, 64, 4)
        assert rule == json.dumps(dict(default)), T


def test_config_rule_against_best_finds_the_fastest_and_the_rules_time():
    configs = [json.dumps({"block_sizes": [b, 64, 64]}) for b in (16, 32, 64)]
    results = pd.DataFrame(
        {
            "model": "tiny",
            "gemm": "down",
            "T": [8] * 3 + [64] * 3,
            "pairs_per_expert": [4.0] * 3 + [32.0] * 3,
            "config": configs * 2,
            "is_rule": [True, False, False, False, True, False],
            "ms": [2.0, 1.0, 3.0, 5.0, 4.0, 6.0],
        }
    )
    summary = mh.config_rule_against_best(results).set_index("T")
    assert summary.loc[8, "best"] == [32, 64, 64] and summary.loc[8, "rule"] == [16, 64, 64]
    assert summary.loc[8, "rule_over_best"] == 2.0
    assert summary.loc[64, "best"] == [32, 64, 64] and summary.loc[64, "rule_over_best"] == 1.0


LAYER_TABLE_DECODE_IMPLEMENTATIONS = {
    "helion",
    *mh.TRANSFORMERS_BACKENDS,
    "grouped_mm core",
    "helion, [E, K, N] weights",
    "helion, unfused",
    "helion, CUDA graph",
    "grouped_mm, CUDA graph",
    "batched_mm, CUDA graph",
}


def test_layer_table_checks_and_times_every_backend(monkeypatch, tmp_path):
    # the harness on the CPU, with the GPU timers replaced by fixed times
    monkeypatch.setattr(timing, "time_ms", lambda fn: (fn(), 2.0)[1])
    monkeypatch.setattr(timing, "host_and_gpu_us", lambda fn, calls=20: (fn(), (30.0, 40.0))[1])
    monkeypatch.setattr(timing, "cuda_graph_replay", lambda fn: fn)
    monkeypatch.setattr(timing, "dense_matmul_tflops", lambda: 100.0)
    monkeypatch.setattr(timing, "copy_bandwidth_gbps", lambda: 1000.0)
    monkeypatch.setattr(timing, "machine_info", lambda: {"card": "cpu"})
    model = mh.MoEModel("tiny", H=32, I=16, E=4, top_k=2)
    path = tmp_path / "layer_table.csv"
    results = mh.run_layer_table((model,), (8, 4096), path=path)
    assert path.exists()
    decode = results[results["T"] == 8]
    assert set(decode["implementation"]) == LAYER_TABLE_DECODE_IMPLEMENTATIONS
    prefill = results[results["T"] == 4096]
    assert "helion, CUDA graph" not in set(prefill["implementation"])
    row = decode.iloc[0]
    assert row["flops"] == 6 * 16 * 32 * 16 and row["fusion_bytes_saved"] == 8 * 16 * 16
    assert (row["helion_host_us"], row["helion_gpu_us"]) == (30.0, 40.0)
    speedups = mh.layer_table_speedups(results)
    assert (speedups["vs grouped_mm"] == 1.0).all()  # every candidate took the same fixed time
    # a skipped candidate keeps its row, with the reason
    monkeypatch.setattr(layer_table, "BATCHED_MM_MAX_BYTES", 0)
    skipped = mh.run_layer_table((model,), (8,))
    batched = skipped[skipped["implementation"] == "batched_mm"].iloc[0]
    assert batched["ms"] != batched["ms"] and "not run" in batched["note"]  # NaN
    # a candidate that runs out of memory keeps its row too, and the others are timed
    monkeypatch.setattr(layer_table, "BATCHED_MM_MAX_BYTES", 2**40)

    def out_of_memory_for_batched_mm(fn):
        module = getattr(fn, "func", None)
        if getattr(getattr(module, "config", None), "_experts_implementation", "") == "batched_mm":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return (fn(), 2.0)[1]

    monkeypatch.setattr(timing, "time_ms", out_of_memory_for_batched_mm)
    rows = mh.run_layer_table((model,), (8,)).set_index("implementation")
    out = rows.index[rows["ms"].isna()]  # the graph replay is the call itself here
    assert set(out) == {"batched_mm", "batched_mm, CUDA graph"}
    assert (rows.loc[out, "note"] == "out of memory").all()
    # a wrong "helion" result fails the check (launched one by one: on a GPU a replayed call
    # may reuse a graph that an earlier run captured on weights at the same addresses)
    wrong = torch.zeros(8, 32, dtype=torch.bfloat16, device=mh.DEVICE)
    monkeypatch.setattr(layer, "moe_experts_forward", lambda *args, **kwargs: (wrong, None))
    with pytest.raises(AssertionError), mh.decode_replay(False):
        mh.run_layer_table((model,), (8,))


class CountingTorchCalls(torch.overrides.TorchFunctionMode):
    """Counts the torch functions and tensor methods called inside it."""

    calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_fp8_table_checks_and_times_both_layers(monkeypatch, tmp_path):
    # the harness with the GPU timers replaced by fixed times; where torch._scaled_grouped_mm
    # cannot run (the CPU, cards before Hopper), its prefill column is NaN with the reason
    monkeypatch.setattr(timing, "time_ms", lambda fn: (fn(), 2.0)[1])
    monkeypatch.setattr(timing, "cuda_graph_replay", lambda fn: fn)
    monkeypatch.setattr(timing, "copy_bandwidth_gbps", lambda: 1000.0)
    monkeypatch.setattr(timing, "machine_info", lambda: {"card": "cpu"})
    model = mh.MoEModel("tiny", H=160, I=128, E=4, top_k=2)
    path = tmp_path / "fp8_table.csv"
    results = mh.run_fp8_table((model,), (8, 80), path=path).set_index("T")
    assert path.exists() and (results["fp8_speedup"] == 1.0).all()
    decode, prefill = results.loc[8], results.loc[80]
    weight_bytes = decode["active_experts"] * 3 * 160 * 128
    assert decode["fp8_of_copy"] == pytest.approx(weight_bytes / 2e-3 / 1e12)
    assert prefill["fp8_of_copy"] != prefill["fp8_of_copy"]  # NaN: prefill is not copy-bound
    core = prefill["scaled_grouped_mm_core_ms"]
    if mh.ON_GPU and torch.cuda.get_device_capability() >= (9, 0):
        assert core == 2.0
    else:
        assert core != core and "_scaled_grouped_mm not run" in prefill["note"]
    # the rowwise quantization maps each row's largest magnitude to 448, weights ([E, N, K], 16
    # experts at a time) and activations ([P, K], all rows at once) alike
    for shape in ((40, 5, 40), (40, 40)):
        W = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        q, scales = mh.quantize_rowwise_fp8(W)
        assert torch.equal(q.float().abs().amax(-1), torch.full(shape[:-1], 448.0))
        torch.testing.assert_close(q.float() * scales[..., None], W, rtol=2**-4, atol=0)
    calls = []
    for rows in (16, 4096):
        with CountingTorchCalls() as counter:
            mh.quantize_rowwise_fp8(torch.randn(rows, 8))
        calls.append(counter.calls)
    assert calls[0] == calls[1], f"activations should be quantized in one pass: {calls} ops"
    # a wrong FP8 result fails the check
    wrong = torch.zeros(8, 160, dtype=torch.bfloat16, device=mh.DEVICE)
    monkeypatch.setattr(fp8_table, "moe_experts_fp8", lambda *args, **kwargs: wrong)
    with pytest.raises(AssertionError):
        mh.run_fp8_table((model,), (8,), path=None)


def test_layer_table_runs_gpt_oss_experts_and_hundreds_of_experts(monkeypatch):
    # the harness on the CPU as above, at a tiny GptOssExperts (biases, interleaved gate and up,
    # the clamped gate: the "helion" row is checked against float64 with them) and 320 experts
    monkeypatch.setattr(timing, "time_ms", lambda fn: (fn(), 2.0)[1])
    monkeypatch.setattr(timing, "host_and_gpu_us", lambda fn, calls=20: (fn(), (30.0, 40.0))[1])
    monkeypatch.setattr(timing, "cuda_graph_replay", lambda fn: fn)
    monkeypatch.setattr(timing, "dense_matmul_tflops", lambda: 100.0)
    monkeypatch.setattr(timing, "copy_bandwidth_gbps", lambda: 1000.0)
    monkeypatch.setattr(timing, "machine_info", lambda: {"card": "cpu"})
    gpt_oss = mh.MoEModel("tiny gpt-oss", H=32, I=16, E=4, top_k=2, experts_class="GptOssExperts")
    many = mh.MoEModel("tiny many experts", H=32, I=16, E=320, top_k=10)
    results = mh.run_layer_table((gpt_oss, many), (8,))
    gpt_rows = results[results["model"] == "tiny gpt-oss"].set_index("implementation")
    assert set(gpt_rows.index) == LAYER_TABLE_DECODE_IMPLEMENTATIONS
    in_place = gpt_rows.loc["helion, [E, K, N] weights"]
    assert in_place["ms"] != in_place["ms"] and "stores them so" in in_place["note"]  # NaN
    many_rows = results[results["model"] == "tiny many experts"]
    assert set(many_rows["implementation"]) == LAYER_TABLE_DECODE_IMPLEMENTATIONS
    assert many_rows["ms"].notna().all()
    assert [m.experts_class for m in mh.LAYER_TABLE_MODELS].count("GptOssExperts") == 1
    assert max(m.E for m in mh.LAYER_TABLE_MODELS) > 256


def test_the_layer_tables_pytorch_peers_compute_gpt_oss_experts():
    # grouped_mm core and the unfused layer against the float64 reference, with biases,
    # interleaved gate and up columns and gpt-oss's clamped gate
    model = mh.MoEModel("tiny gpt-oss", H=32, I=16, E=4, top_k=2, experts_class="GptOssExperts")
    experts = mh.transformers_experts_module(model)
    gate_up, down, options = mh.transformers_layer_arguments(experts)
    assert options["interleaved"] and options["activation"] == mh.GPT_OSS_ACTIVATION
    A = torch.randn(9, 32, generator=torch.Generator().manual_seed(0)).to(mh.DEVICE).bfloat16()
    ids, weights = mh.model_routing(9, 4, 2, 0.0)
    unfused = mh.unfused_experts(A, gate_up, down, ids, weights, **options)
    mh.assert_experts_close(unfused, A, gate_up, down, ids, weights, **options)
    tokens, offsets = mh.pairs_sorted_by_expert(ids, 4)
    pairs = mh.sort_tokens_by_expert(ids.flatten(), 4).sorted_to_orig_token_idx.long()
    rows = mh.grouped_mm_experts_core(
        A[tokens], gate_up, down, offsets, ids.flatten()[pairs], **options
    )
    core = torch.zeros(9, 32, dtype=torch.float32, device=mh.DEVICE)
    core.index_add_(0, tokens, rows.float() * weights.flatten()[pairs, None])
    mh.assert_experts_close(core.bfloat16(), A, gate_up, down, ids, weights, **options)


def test_committed_backward_table_covers_every_model_size_candidate_and_phase():
    results = pd.read_csv(mh.BACKWARD_TABLE_PATH)
    for column in ("card", "date", "torch", "triton", "helion", "transformers"):
        assert results[column].notna().all() and results[column].nunique() == 1, column
    columns = ("model", "T", "implementation", "phase")
    rows = set(zip(*(results[c] for c in columns), strict=True))
    # every model whose training step fits the smallest card the course runs on, an 80 GB H100
    timed = [m for m in mh.BACKWARD_TABLE_MODELS if m.name in set(results["model"])]
    fits = [m for m in mh.BACKWARD_TABLE_MODELS if mh.backward_table_fits(m, 79 * 2**30)]
    assert timed == fits
    assert rows == {
        (model.name, T, name, phase)
        for model in timed
        for T in mh.BACKWARD_TABLE_TOKENS
        for name in mh.BACKWARD_CANDIDATES
        for phase in ("forward", "forward + backward")
    }
    assert len(results) == len(rows) and (results["ms"] > 0).all()
    models = {model.name: model for model in mh.MOE_MODELS}
    pairs = results["T"] * results["model"].map(lambda name: models[name].top_k)
    assert (results["forward_flops"] == 6 * pairs * results["H"] * results["I"]).all()
    differences = [c for c in results.columns if c.endswith("_difference")]
    assert len(differences) == 4
    assert (results[differences] <= mh.TOLERANCES[torch.bfloat16]).all().all()
    times = mh.backward_times(results)
    assert (times["backward"] > 0).all().all()  # the backward costs something everywhere
    speedups = mh.backward_table_speedups(results)
    assert len(speedups) == len(timed) * len(mh.BACKWARD_TABLE_TOKENS)


def test_committed_backward_parts_add_up_to_their_totals():
    parts = pd.read_csv(mh.BACKWARD_PARTS_PATH)
    assert parts["card"].nunique() == 1
    for (model, T), rows in parts.groupby(["model", "T"]):
        total = rows.loc[rows["kernel"] == "all", "us"]
        assert len(total) == 1, (model, T)
        kernels = rows[rows["kernel"] != "all"]
        assert kernels["kernel"].str.contains("_helion_moe_weight_grad").any()
        assert 0 < kernels["us"].sum() <= total.item()


def test_backward_table_checks_the_gradients_and_times_every_candidate(monkeypatch, tmp_path):
    # the harness on the CPU, with the GPU timer replaced by a fixed time
    monkeypatch.setattr(timing, "time_ms", lambda fn: (fn(), 2.0)[1])
    monkeypatch.setattr(timing, "machine_info", lambda: {"card": "cpu"})
    model = mh.MoEModel("tiny", H=32, I=16, E=4, top_k=2)
    path = tmp_path / "backward_table.csv"
    results = mh.run_backward_table((model,), (16,), path=path)
    assert path.exists() and len(pd.read_csv(path)) == len(results) == 6
    assert set(zip(results["implementation"], results["phase"], strict=True)) == {
        (name, phase)
        for name in mh.BACKWARD_CANDIDATES
        for phase in ("forward", "forward + backward")
    }
    differences = results.iloc[0][[c for c in results.columns if c.endswith("_difference")]]
    assert (differences > 0).all() and (differences <= mh.TOLERANCES[torch.bfloat16]).all()
    speedups = mh.backward_table_speedups(results)
    assert (speedups[["fwd+bwd/gmm", "fwd/core"]] == 1.0).all().all()
    # a wrong gradient fails the check against grouped_mm's
    backward = layer.moe_experts_backward

    def wrong_backward(*args, **kwargs):
        return tuple(None if g is None else torch.zeros_like(g) for g in backward(*args, **kwargs))

    monkeypatch.setattr(layer, "moe_experts_backward", wrong_backward)
    with pytest.raises(AssertionError, match="from grouped_mm's gradient"):
        mh.run_backward_table((model,), (16,))


def test_relative_difference_sums_over_slices():
    expected = torch.arange(1.0, 7.0).view(3, 2)
    actual = expected.clone()
    actual[2, 1] += 1.0
    assert mh.relative_difference(actual, expected) == pytest.approx(1 / expected.norm().item())
    assert mh.relative_difference(expected, expected) == 0.0


def test_flat_candidates_compute_the_moe_matmul():
    A = torch.randn(48, 32).to(mh.DEVICE, torch.bfloat16)
    W = torch.randn(4, 32, 48).to(mh.DEVICE, torch.bfloat16)
    expert_ids = mh.route_zipf(48, 4, 1.2, seed=0)
    config = helion.Config(block_sizes=[16, 16, 16], num_warps=4, num_stages=1)
    for name, fn in mh.flat_candidates(A, W, expert_ids, config).items():
        if name.startswith(("flat kernel", "flat metadata +", "moe_matmul", "grouped_mm p")):
            mh.assert_moe_close(fn(), A, W, expert_ids)


def test_block_stats_counts_blocks_padding_and_weight_reads():
    stats = mh.block_stats(torch.tensor([0, 1, 16, 17]), 16)
    assert stats == mh.BlockStats(
        blocks=4, padding_rows=30, wasted_work=30 / 64, weight_reads=4 / 3
    )
    assert mh.block_stats(torch.zeros(3, dtype=torch.int64), 16).wasted_work == 0.0


@pytest.mark.parametrize("experts_class", ["MixtralExperts", "GptOssExperts"])
def test_the_layer_table_experts_module_runs_each_backend(experts_class):
    model = mh.MoEModel("tiny", H=16, I=8, E=4, top_k=2, experts_class=experts_class)
    experts = mh.transformers_experts_module(model)
    mh.register_transformers_experts()
    A = torch.randn(5, 16, device=mh.DEVICE).bfloat16()
    ids, weights = mh.model_routing(5, 4, 2, 0.0)
    expected = mh.with_experts_backend(experts, "eager")(A, ids, weights)
    for name in ("helion", "grouped_mm", "batched_mm"):
        actual = mh.with_experts_backend(experts, name)(A, ids, weights)
        torch.testing.assert_close(actual.float(), expected.float(), rtol=0.05, atol=0.05)
    assert experts.config._experts_implementation != "helion"  # the copies have their own config


@pytest.mark.parametrize(
    "table", ["benchmarks", "flat_schedule", "model_table", "layer_table", "backward_table"]
)
def test_every_committed_implementation_has_its_own_colour(table):
    names = pd.read_csv(ROOT / "notebooks" / "results" / f"{table}.csv")["implementation"].unique()
    colors = {name: mh.implementation_color(name) for name in names}  # KeyError: no colour
    replays = [name for name in names if name.endswith(", CUDA graph")]
    for name in replays:  # a replay is drawn in its implementation's colour, dashed
        assert colors[name] == mh.implementation_color(name.removesuffix(", CUDA graph")), name
    plain = [name for name in names if name not in replays]
    assert len({colors[name] for name in plain}) == len(plain), colors


def test_backward_table_fits_the_models_an_80_gb_card_ran():
    models = {m.name: m for m in mh.MOE_MODELS}
    h100, h200 = 79 * 2**30, 139 * 2**30  # what torch reports for each card's memory, about
    assert mh.backward_table_fits(models["DeepSeek-V3"], h100)  # 45 GB of weights + gradients
    assert not mh.backward_table_fits(models["Llama-4-Maverick"], h100)  # 64 GB: out of memory
    assert all(mh.backward_table_fits(m, h200) for m in mh.BACKWARD_TABLE_MODELS)
