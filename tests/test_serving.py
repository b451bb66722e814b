"""The serving harnesses (``helion_moe.benchmarks.serving``) and their figures, at tiny sizes."""

import moe_helpers as mh
from helion_moe.benchmarks import timing

import matplotlib
import pandas as pd
import pytest
import torch

matplotlib.use("Agg")


def test_the_generate_table_times_each_backend_and_compares_their_tokens():
    def build(name, layers):
        assert layers == 2
        return mh.tiny_transformers_model(name)  # float32: every backend decodes alike

    results = mh.run_generate_table(
        models=(("Mixtral", 2),), batches=(1, 2), path=None, build=build, steps=2,
        backends=("helion", "eager"),
    )  # fmt: skip
    assert len(results) == 4 and set(results["backend"]) == {"helion", "eager"}
    assert (results["same_tokens_as_first"] == 1.0).all()
    # two steps' time on a busy CPU is noise, even of either sign: only its presence is checked
    assert results["step_ms"].notna().all()
    rates = results["batch"] / results["step_ms"] * 1e3
    torch.testing.assert_close(torch.tensor(results["tokens_per_s"]), torch.tensor(rates))
    assert results["card"].notna().all() and "transformers" in results
    if not mh.ON_GPU:
        assert results["gpu_ms_per_step"].isna().all()


def test_served_models_are_the_public_configs_and_other_names_are_refused():
    names = [name for name, _ in mh.SERVED_MODELS]
    assert names == ["Qwen3-30B-A3B", "Mixtral-8x7B", "DeepSeek-V3"]
    with pytest.raises(ValueError, match="name must be one of"):
        mh.served_model("Mixtral", 2)


def test_a_call_timeline_lays_out_the_host_ops_of_the_fourth_call():
    A = torch.randn(64, 64)
    timeline = mh.call_timeline(lambda: (A @ A).relu_())
    assert timeline["start_us"].min() == 0 and (timeline["end_us"] >= timeline["start_us"]).all()
    host = timeline[timeline["lane"] == "host"]
    assert {"aten::matmul", "aten::relu_"} <= set(host["name"])
    assert len(host[host["name"] == "aten::matmul"]) == 1  # one call, not four
    assert not timeline["name"].str.startswith("ProfilerStep").any()  # the step's span is no op


def test_the_layer_call_timeline_records_the_three_calls():
    model = mh.MoEModel("tiny", H=64, I=32, E=8, top_k=2)
    timeline = mh.run_call_timeline(model, T=1, path=None)
    calls = list(dict.fromkeys(timeline["call"]))
    assert calls == [
        "kernels launched one by one",
        "replayed from a CUDA graph",
        "through the custom op",
    ]
    assert mh.replay_enabled()  # the first call's decode_replay(False) ended with it
    op = timeline[timeline["call"] == "through the custom op"]
    assert "helion_moe::moe_experts" in set(op["name"])
    assert (timeline["model"] == "tiny").all() and (timeline["T"] == 1).all()


def test_the_decode_replay_table_times_each_call_with_the_replay_it_names(monkeypatch):
    replayed = []

    def host_and_gpu_us(fn, calls=20):
        replayed.append(mh.replay_enabled())
        fn()
        return 30.0, 40.0

    monkeypatch.setattr(timing, "host_and_gpu_us", host_and_gpu_us)
    model = mh.MoEModel("tiny", H=64, I=32, E=8, top_k=2)
    results = mh.run_decode_replay_table((model,), tokens=(1, 2), rounds=2, path=None)
    calls = ["helion", "helion, kernels one by one", "batched_mm", "grouped_mm"]
    assert list(results["call"]) == calls * 2 and list(results["T"]) == [1] * 4 + [2] * 4
    assert replayed == [True, False, True, True] * 4  # two rounds at each of two points
    assert (results["gpu_us"] == 40.0).all() and (results["host_us"] == 30.0).all()
    assert mh.replay_enabled() and results["card"].notna().all()


def test_the_serving_figures_draw_every_measured_point():
    info = dict(card="a card", date="2026-12-06")
    table = pd.DataFrame(
        [
            dict(model="m", layers=2, batch=1, backend="helion", step_ms=2.0, gpu_ms_per_step=1.0),
            dict(model="m", layers=2, batch=1, backend="batched_mm", step_ms=4.0),
        ]
    ).assign(tokens_per_s=lambda t: t["batch"] / t["step_ms"] * 1e3, **info)
    fig = mh.plot_generate_table(table)
    bars = [p for p in fig.axes[0].patches if p.get_height() > 0]
    assert sorted(b.get_height() for b in bars) == [250.0, 500.0]
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["50%"]  # only where the GPU's time was measured
    timeline = pd.DataFrame(
        [
            dict(call="c", lane="host", name="launch", start_us=0.0, end_us=30.0),
            dict(call="c", lane="GPU", name="kernel", start_us=25.0, end_us=40.0),
        ]
    ).assign(model="m", T=1, **info)
    fig = mh.plot_call_timeline(timeline)
    assert "host ends at 30 us, GPU ends at 40 us" in fig.axes[0].get_title()
