"""Figures of the measured layer tables (notebooks 10-13): the layer against transformers'
backends, its backward, the FP8 layer and the expert-parallel phases, in the style of
``results``. Each returns its figure.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..benchmarks.backward_table import BACKWARD_CANDIDATES, backward_times
from ..benchmarks.fp8_table import FP8_TABLE_DECODE_MAX_TOKENS
from ..benchmarks.layer_table import TRANSFORMERS_BACKENDS
from ..expert_parallel import EXPERT_PARALLEL_PHASES
from .results import _card_title, _legend_below, _line_style, _plot_measured, implementation_color

__all__ = [
    "LAYER_PLOT_CANDIDATES",
    "plot_backward_table",
    "plot_expert_parallel_load",
    "plot_expert_parallel_time",
    "plot_fp8_table",
    "plot_layer_table",
]


LAYER_PLOT_CANDIDATES = (
    "helion",
    "helion, CUDA graph",
    *TRANSFORMERS_BACKENDS,
    "batched_mm, CUDA graph",
    "grouped_mm, CUDA graph",
    "grouped_mm core",
)


def plot_layer_table(results: pd.DataFrame) -> plt.Figure:
    """The layer table, one panel per model: each backend's time per layer call against the
    tokens (log-log), CUDA-graph replays dashed with squares, "eager" with crosses (its brown
    is near grouped_mm's), lines only between measured token counts.

    Taught in notebook 10.
    """
    models = list(dict.fromkeys(results["model"]))
    fig, axes = plt.subplots(2, -(-len(models) // 2), figsize=(13, 7.5))
    for ax, model in zip(axes.flat, models, strict=False):
        rows = results[(results["model"] == model) & results["ms"].notna()]
        for name in LAYER_PLOT_CANDIDATES:
            line = rows[rows["implementation"] == name]
            _plot_measured(
                ax,
                line["T"],
                line["ms"],
                gap=8,
                linestyle=_line_style(name),
                marker="s" if _line_style(name) == "--" else "x" if name == "eager" else "o",
                color=implementation_color(name),
                label=name,
            )
        first = rows.iloc[0]
        ax.set_title(
            f"{model}\nH={first['H']}, I={first['I']}, E={first['E']}, top-{first['top_k']}",
            fontsize=9,
        )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens T")
        ax.set_ylabel("ms per layer call")
    for ax in axes.flat[len(models) :]:  # an odd number of models leaves one panel empty
        ax.set_axis_off()
    fig.suptitle(_card_title(results, "MoE layer experts (gate_up, activation, down, combine)"))
    fig.tight_layout()
    _legend_below(fig, axes.flat[0])
    return fig


def plot_backward_table(results: pd.DataFrame) -> plt.Figure:
    """One panel per token count: per model, each candidate's forward and backward stacked,
    as a fraction of transformers' grouped_mm forward + backward (its bar is 1).

    Taught in notebook 11.
    """
    times = backward_times(results)
    token_counts = list(dict.fromkeys(results["T"]))
    fig, axes = plt.subplots(1, len(token_counts), figsize=(13, 4.5), sharey=True, squeeze=False)
    axes = axes[0]
    width = 0.8 / len(BACKWARD_CANDIDATES)
    for ax, T in zip(axes, token_counts, strict=True):
        rows = times.xs(T, level="T")
        scale = rows[("forward + backward", "grouped_mm")]
        x = np.arange(len(rows))
        for i, name in enumerate(BACKWARD_CANDIDATES):
            forward = rows[("forward", name)] / scale
            backward = rows[("backward", name)] / scale
            offset = x + (i - (len(BACKWARD_CANDIDATES) - 1) / 2) * width
            color = implementation_color(name)
            ax.bar(offset, forward, width, color=color, label=f"{name}: forward")
            ax.bar(
                offset,
                backward,
                width,
                bottom=forward,
                color=color,
                alpha=0.45,
                hatch="//",
                label=f"{name}: backward",
            )
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xticks(x, rows.index, rotation=20, fontsize=8)
        ax.set_title(f"T = {T} tokens", fontsize=10)
    axes[0].set_ylabel("time / grouped_mm's forward + backward")
    fig.suptitle(_card_title(results, "MoE layer experts, forward + backward"))
    fig.tight_layout()
    _legend_below(fig, axes[0])
    return fig


def plot_fp8_table(results: pd.DataFrame) -> plt.Figure:
    """The FP8 table: the FP8 layer's speedup over the bf16 layer at every token count, its
    share of the copy rate at decode (CUDA graphs), and at prefill the time of each layer and of
    ``torch._scaled_grouped_mm``'s core, one colour per model in the first two panels.

    Taught in notebook 13.
    """
    fig, (speedup, copy, prefill) = plt.subplots(1, 3, figsize=(14, 4.6), width_ratios=(1, 1, 1.3))
    decode = results["T"] <= FP8_TABLE_DECODE_MAX_TOKENS
    model_styles = zip(("tab:purple", "tab:olive", "tab:cyan", "tab:brown"), "os^D", strict=True)
    models = results.groupby("model", sort=False)
    for (color, marker), (model, rows) in zip(model_styles, models, strict=False):
        style = dict(color=color, marker=marker, markerfacecolor="none", label=model)
        _plot_measured(speedup, rows["T"], rows["fp8_speedup"], gap=8, **style)
        rows = rows[rows["T"] <= FP8_TABLE_DECODE_MAX_TOKENS]
        copy.plot(rows["T"], rows["fp8_of_copy"], **style)
    speedup.axhline(1, color="grey", linestyle=":")
    speedup.set_ylabel("bf16 layer's time / FP8 layer's time")
    speedup.set_title("FP8 against bf16 (CUDA graphs up to 64 tokens)", fontsize=9)
    copy.set_title("Decode: reading the active experts' weights", fontsize=9)
    prefill.set_title("Prefill", fontsize=9)
    copy.axhline(1, color="k", linestyle="--", label="copy rate")
    copy.set_ylim(0, 1.05)
    copy.set_ylabel("share of the copy rate (active experts' e4m3 bytes)")
    for ax in (speedup, copy):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens T")
    speedup.legend(fontsize=8)  # hollow markers, so models that coincide stay visible
    copy.legend(fontsize=8, loc="lower right")
    bars = (  # label, colour, column
        ("helion, bf16", "helion", "bf16_ms"),
        ("helion, FP8", "helion, FP8", "fp8_ms"),
        ("scaled_grouped_mm core, FP8", "scaled_grouped_mm core, FP8", "scaled_grouped_mm_core_ms"),
    )
    points = results[~decode]
    x = np.arange(len(points))
    for i, (label, name, column) in enumerate(bars):
        color = implementation_color(name)
        prefill.bar(x + (i - 1) * 0.27, points[column], 0.27, color=color, label=label)
    labels = points["model"] + ", T=" + points["T"].astype(str)
    prefill.set_xticks(x, labels, rotation=25, ha="right", fontsize=7)
    prefill.set_ylabel("ms per layer call, eager")
    prefill.legend(fontsize=8)
    fig.suptitle(_card_title(results, "FP8 experts (e4m3, 128 x 128 block scales)", "FP8"))
    fig.tight_layout()
    return fig


def plot_expert_parallel_load(runs: dict[str, list[dict[str, object]]]) -> plt.Figure:
    """Per rank, for each routing of ``runs`` (routing -> the ranks' ``expert_parallel_worker``
    results): the pairs it received, i.e. its experts' load, and the bytes it sent to other
    ranks (dispatch and combine).

    Taught in notebook 12.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / len(runs)
    for i, (routing, results) in enumerate(runs.items()):
        ranks = np.arange(len(results)) + i * width
        stats = [result["stats"] for result in results]
        axes[0].bar(ranks, [sum(s["pairs_received"]) for s in stats], width, label=routing)
        sent = [(s["dispatch_bytes_sent"] + s["combine_bytes_sent"]) / 1e3 for s in stats]
        axes[1].bar(ranks, sent, width, label=routing)
    for ax, label in zip(
        axes, ("pairs received (its experts' load)", "kB sent to other ranks"), strict=True
    ):
        ax.set_xticks(
            np.arange(len(results)) + 0.4 - width / 2, [f"rank {r}" for r in range(len(results))]
        )
        ax.set_ylabel(label)
    axes[0].set_title("load per rank")
    axes[1].set_title("traffic per rank (dispatch + combine)")
    fig.tight_layout()
    _legend_below(fig, axes[0])
    return fig


def plot_expert_parallel_time(results: list[dict[str, object]], title: str) -> plt.Figure:
    """Per rank, the seconds of each phase of one ``moe_experts_expert_parallel`` call
    (stacked): the three collectives' phases and the local experts.

    Taught in notebook 12.
    """
    fig, ax = plt.subplots(figsize=(7, 3.8))
    bottom = np.zeros(len(results))
    for phase in EXPERT_PARALLEL_PHASES:
        ms = np.array([result["stats"]["seconds"][phase] * 1e3 for result in results])
        ax.bar([f"rank {r}" for r in range(len(results))], ms, bottom=bottom, label=phase)
        bottom += ms
    ax.set_ylabel("ms")
    ax.set_title(title)
    fig.tight_layout()
    _legend_below(fig, ax)
    return fig
