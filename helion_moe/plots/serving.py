"""The figures of notebook 16 (serving), from the tables ``benchmarks.serving`` writes: tokens
per second of a compiled decode step with each experts backend, the host-versus-GPU timeline of
one eager layer call, and eager decode calls with and without the replay.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .results import _card_title, _legend_below, implementation_color

__all__ = ["plot_call_timeline", "plot_decode_replay", "plot_generate_table"]


def plot_generate_table(results: pd.DataFrame) -> plt.Figure:
    """Tokens per second of each experts backend at every (model, batch) of the generate
    table, one bar each, in the backends' colours, with the GPU's busy share of the step
    (``gpu_ms_per_step / step_ms``) written over each bar; a backend that did not run has no
    bar, and its reason is in the table's ``note``.

    Taught in notebook 16.
    """
    keys = zip(results["model"], results["layers"], results["batch"], strict=True)
    points = list(dict.fromkeys(keys))
    backends = list(dict.fromkeys(results["backend"]))
    width = 0.8 / len(backends)
    fig, ax = plt.subplots(figsize=(11, 4))
    for i, backend in enumerate(backends):
        rows = results[results["backend"] == backend].set_index(["model", "layers", "batch"])
        rows = rows.reindex(points)
        x = np.arange(len(points)) + (i - (len(backends) - 1) / 2) * width
        bars = ax.bar(x, rows["tokens_per_s"], width, color=implementation_color(backend))
        bars.set_label(backend)
        busy = rows["gpu_ms_per_step"] / rows["step_ms"]
        for bar, share in zip(bars, busy, strict=True):
            if np.isfinite(share) and np.isfinite(bar.get_height()):
                ax.annotate(
                    f"{share:.0%}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    labels = [f"{model}\n{layers} layers, batch {batch}" for model, layers, batch in points]
    ax.set_xticks(np.arange(len(points)), labels, fontsize=8)
    ax.set_ylabel("tokens per second")
    title = "Compiled static-cache decode (numbers: the GPU's busy share of a step)"
    ax.set_title(_card_title(results, title), fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_call_timeline(timeline: pd.DataFrame) -> plt.Figure:
    """One panel per ``call`` of ``run_call_timeline``'s table: the host's top-level ops and
    the GPU's kernels as bars against the microseconds since the call's first event, host
    above, GPU below, on one shared time axis.

    Taught in notebook 16.
    """
    calls = list(dict.fromkeys(timeline["call"]))
    fig, axes = plt.subplots(len(calls), 1, figsize=(11, 1.6 + 1.3 * len(calls)), sharex=True)
    lanes = {"host": (1, "tab:gray"), "GPU": (0, "tab:blue")}
    for ax, call in zip(np.atleast_1d(axes), calls, strict=True):
        events = timeline[timeline["call"] == call]
        for lane, (y, color) in lanes.items():
            rows = events[events["lane"] == lane]
            spans = list(zip(rows["start_us"], rows["end_us"] - rows["start_us"], strict=True))
            ax.broken_barh(spans, (y - 0.35, 0.7), facecolors=color, edgecolor="white")
        end = events.groupby("lane")["end_us"].max()
        ends = ", ".join(f"{lane} ends at {end[lane]:.0f} us" for lane in lanes if lane in end)
        ax.set_yticks([1, 0], ["host", "GPU"])
        ax.set_title(f"{call}: {ends}", fontsize=9)
    np.atleast_1d(axes)[-1].set_xlabel("microseconds since the call's first event")
    first = timeline.iloc[0]
    title = f"One eager layer call, {first['model']}, T = {first['T']}"
    fig.suptitle(_card_title(timeline, title), fontsize=10)
    fig.tight_layout()
    return fig


def plot_decode_replay(results: pd.DataFrame) -> plt.Figure:
    """One panel per token count of ``run_decode_replay_table``'s table: each call's GPU time
    per call at every model, one bar each in the calls' colours (log scale), with its host time
    per call as a black tick; calls made back to back run at the larger of the two. A call
    that did not run has no bar.

    Taught in notebook 16.
    """
    tokens = list(dict.fromkeys(results["T"]))
    models = list(dict.fromkeys(results["model"]))
    calls = list(dict.fromkeys(results["call"]))
    width = 0.8 / len(calls)
    fig, axes = plt.subplots(1, len(tokens), figsize=(4.2 * len(tokens), 4.2), sharey=True)
    for ax, T in zip(np.atleast_1d(axes), tokens, strict=True):
        for i, call in enumerate(calls):
            rows = results[(results["T"] == T) & (results["call"] == call)].set_index("model")
            rows = rows.reindex(models)
            x = np.arange(len(models)) + (i - (len(calls) - 1) / 2) * width
            ax.bar(x, rows["gpu_us"], width, color=implementation_color(call), label=call)
            host_label = "host time per call" if i == 0 else "_nolegend_"
            ax.scatter(x, rows["host_us"], marker="_", color="black", s=40, label=host_label)
        ax.set_xticks(np.arange(len(models)), models, rotation=60, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_title(f"T = {T}", fontsize=9)
    np.atleast_1d(axes)[0].set_ylabel("GPU time per call (us)")
    title = "Eager decode calls of one MoE layer: GPU time (bars) and host time (ticks)"
    fig.suptitle(_card_title(results, title), fontsize=10)
    fig.tight_layout()
    _legend_below(fig, np.atleast_1d(axes)[0])
    return fig
