"""Figures of the measured matmul tables (notebooks 05-09 and 14), and the style that every
figure of measurements shares: each titled with the card, dtype and date of its run, one colour
per implementation across the course (``IMPLEMENTATION_COLORS``). Each returns its figure.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..benchmarks.per_expert import dense_roof_tflops
from ..benchmarks.shapes import GEMMS

__all__ = [
    "GRAPH_SUFFIX",
    "IMPLEMENTATION_COLORS",
    "implementation_color",
    "plot_autotune_trace",
    "plot_decode_bandwidth",
    "plot_flat_prefill",
    "plot_model_table",
    "plot_prefill_bars",
    "plot_roofline",
    "plot_sweep",
    "plot_time_against_load",
    "plot_top_k_cost",
]


def _card_title(results: pd.DataFrame, title: str, dtype: str = "bf16") -> str:
    dates = " and ".join(sorted(results["date"].astype(str).unique()))  # one per process's day
    return f"{title}\n{results['card'].iloc[0]}, {dtype}, {dates}"


def _legend_below(fig: plt.Figure, ax: plt.Axes) -> None:
    """The legend of ``ax``'s lines under the figure's panels, where it covers no data."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, 0),
        ncol=3,
        fontsize=8,
        handlelength=3.5,  # long enough to tell dashed from dotted
    )


# One colour per implementation, in every figure of the course: the course's entry points in
# blue, its kernels in reds and purples, PyTorch's grouped GEMM in greens, transformers' other
# backends in browns and greys. A CUDA-graph replay takes its implementation's colour, dashed.
IMPLEMENTATION_COLORS = {
    "dense matmul, same FLOPs": "black",
    "loop reference": "#c49c94",
    "grouped_mm core": "tab:green",
    "grouped_mm pipeline": "tab:olive",
    "grouped_mm": "#8c6d31",
    "batched_mm": "tab:gray",
    "eager": "tab:brown",
    "seed kernel, Helion default config": "#9edae5",
    "seed kernel, hand-picked config": "tab:cyan",
    "masked-store kernel, hand-picked config": "tab:purple",
    "moe_matmul (validate + sort + masked store)": "#c5b0d5",
    "flat metadata (torch ops reference)": "#ffbb78",
    "flat metadata (Helion counting sort)": "#f7b6d2",
    "flat kernel": "tab:red",
    "flat kernel, persistent": "#ff9896",
    "flat metadata + kernel": "tab:orange",
    "moe_matmul (validate + align + flat kernel)": "tab:pink",
    "moe_matmul, auto": "tab:blue",
    "moe_matmul, kernels one by one": "#6baed6",
    "moe_matmul": "tab:blue",
    "helion": "tab:blue",
    "helion, kernels one by one": "#9ecae1",
    "helion, [E, K, N] weights": "#aec7e8",
    "helion, unfused": "#17becf",
    "helion, FP8": "navy",
    "scaled_grouped_mm core, FP8": "#98df8a",
}
GRAPH_SUFFIX = ", CUDA graph"


def implementation_color(name: str) -> str:
    """The colour of implementation ``name`` in every figure (``IMPLEMENTATION_COLORS``; a
    CUDA-graph replay takes its implementation's).

    Taught in notebook 05.
    """
    return IMPLEMENTATION_COLORS[name.removesuffix(GRAPH_SUFFIX)]


def _line_style(name: str) -> str:
    """Dashed for a CUDA-graph replay, solid otherwise."""
    return "--" if name.endswith(GRAPH_SUFFIX) else "-"


def _plot_measured(ax: plt.Axes, x: pd.Series, y: pd.Series, gap: float, **style) -> None:
    """Lines only between measured points: ``x`` is split where it jumps by more than ``gap``
    times (decode sizes, then prefill sizes), and each run is drawn on its own, labelled once."""
    x, y = np.asarray(x), np.asarray(y)
    runs = np.split(np.arange(len(x)), np.flatnonzero(x[1:] > gap * x[:-1]) + 1)
    for i, run in enumerate(runs):
        ax.plot(x[run], y[run], **({**style, "label": "_nolegend_"} if i else style))


def plot_prefill_bars(results: pd.DataFrame) -> plt.Figure:
    """TFLOP/s of every implementation at the two prefill shapes (log axis).

    Taught in notebook 05.
    """
    prefill = results[results["sweep"] == "prefill"]
    shapes = list(dict.fromkeys(prefill["shape"]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(12, 3.8), sharey=True)
    for ax, shape in zip(np.atleast_1d(axes), shapes, strict=True):
        rows = prefill[prefill["shape"] == shape]
        first = rows.iloc[0]
        ax.barh(
            rows["implementation"],
            rows["tflops"],
            color=rows["implementation"].map(implementation_color),
        )
        for y, value in enumerate(rows["tflops"]):
            ax.text(value * 1.1, y, f"{value:.3g}", va="center", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlim(right=rows["tflops"].max() * 6)
        ax.set_xlabel("TFLOP/s (2 T K N / time)")
        ax.set_title(f"{shape}: T={first['T']} K={first['K']} N={first['N']} E={first['E']}")
    np.atleast_1d(axes)[0].invert_yaxis()
    fig.suptitle(_card_title(results, "Prefill throughput, uniform routing"))
    fig.tight_layout()
    return fig


def plot_sweep(
    results: pd.DataFrame,
    sweep: str,
    x: str,
    xlabel: str,
    *,
    logx: bool,
) -> plt.Figure:
    """TFLOP/s and GB/s of every implementation along one sweep, one panel pair per shape.

    Taught in notebook 05.
    """
    rows = results[results["sweep"] == sweep]
    shapes = list(dict.fromkeys(rows["shape"]))
    fig, axes = plt.subplots(
        len(shapes), 2, figsize=(12, 3.8 * len(shapes)), squeeze=False, sharex=True
    )
    for (ax_flops, ax_bytes), shape in zip(axes, shapes, strict=True):
        for name, line in rows[rows["shape"] == shape].groupby("implementation", sort=False):
            # dashed: the entry point, which can coincide with the kernel it runs
            style = "--" if name.startswith("moe_matmul") else "-"
            for ax, y in ((ax_flops, "tflops"), (ax_bytes, "gbps")):
                ax.plot(
                    line[x],
                    line[y],
                    style,
                    marker="o",
                    color=implementation_color(name),
                    label=name,
                )
        ax_bytes.axhline(
            results["copy_gbps"].iloc[0], color="black", linestyle="--", label="copy bandwidth"
        )
        for ax, ylabel in ((ax_flops, "TFLOP/s"), (ax_bytes, "GB/s of the fewest bytes")):
            ax.set_yscale("log")
            if logx:
                ax.set_xscale("log", base=2)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(shape, fontsize=10)
            ax.grid(alpha=0.3)
    fig.suptitle(_card_title(results, f"Throughput against {xlabel}"))
    fig.tight_layout()
    _legend_below(fig, axes[0, 1])
    return fig


def plot_roofline(results: pd.DataFrame) -> plt.Figure:
    """Arithmetic intensity against TFLOP/s for the token sweep, under the measured roofs: the
    copy bandwidth (sloped) and the best dense matmul (flat).

    Taught in notebook 05.
    """
    rows = results[results["sweep"] == "tokens"]
    dense_roof = dense_roof_tflops(results)
    copy_tbps = results["copy_gbps"].iloc[0] / 1e3
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    intensity = np.logspace(-0.5, 4, 200)
    ax.plot(intensity, np.minimum(dense_roof, intensity * copy_tbps), color="black", label="roof")
    for name, group in rows.groupby("implementation", sort=False):
        intensity_of_call = group["flops"] / group["bytes"]
        ax.scatter(
            intensity_of_call, group["tflops"], s=18, color=implementation_color(name), label=name
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per byte of the fewest bytes)")
    ax.set_ylabel("TFLOP/s")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    ax.set_title(
        _card_title(
            results,
            f"Roofline, Mixtral-like token sweep "
            f"(roofs {copy_tbps:.2f} TB/s, {dense_roof:.0f} TFLOP/s)",
        ),
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def plot_time_against_load(results: pd.DataFrame) -> plt.Figure:
    """Time of each implementation against the largest expert's token count (skew sweep).

    Taught in notebook 05.
    """
    rows = results[results["sweep"] == "skew"]
    shapes = list(dict.fromkeys(rows["shape"]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(12, 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        for name, line in rows[rows["shape"] == shape].groupby("implementation", sort=False):
            ax.plot(
                line["max_tokens_per_expert"],
                line["ms"],
                marker="o",
                color=implementation_color(name),
                label=name,
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens of the busiest expert (Zipf skew 0 to 2)")
        ax.set_ylabel("time (ms)")
        ax.set_title(shape, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(_card_title(results, "Time against the busiest expert's load"))
    fig.tight_layout()
    _legend_below(fig, axes[0, 0])
    return fig


def plot_flat_prefill(results: pd.DataFrame) -> plt.Figure:
    """TFLOP/s of the flat kernel and its baselines at both prefill shapes, with
    uniform and Zipf 1.2 routing side by side (linear axis).

    Taught in notebook 07.
    """
    prefill = results[
        (results["sweep"] == "prefill")
        & ~results["implementation"].str.startswith("flat metadata (")
    ]
    shapes = list(dict.fromkeys(prefill["shape"]))
    names = list(dict.fromkeys(prefill["implementation"]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(12, 4.2), sharey=True)
    for ax, shape in zip(np.atleast_1d(axes), shapes, strict=True):
        rows = prefill[prefill["shape"] == shape]
        y = np.arange(len(names))
        for offset, (skew, label) in zip(
            (-0.2, 0.2), ((0.0, "uniform"), (1.2, "Zipf 1.2")), strict=True
        ):
            values = rows[rows["skew"] == skew].set_index("implementation")["tflops"]
            values = values.reindex(names)
            ax.barh(y + offset, values, height=0.4, label=label)
            for yi, value in zip(y + offset, values, strict=True):
                if not np.isnan(value):
                    ax.text(value + 5, yi, f"{value:.0f}", va="center", fontsize=7)
        ax.set_yticks(y, names)
        first = rows.iloc[0]
        ax.set_xlabel("TFLOP/s (2 T K N / time)")
        ax.set_xlim(right=rows["tflops"].max() * 1.15)
        ax.set_title(f"{shape}: T={first['T']} K={first['K']} N={first['N']} E={first['E']}")
    np.atleast_1d(axes)[0].invert_yaxis()
    fig.suptitle(_card_title(results, "Flat schedule at prefill"))
    fig.tight_layout()
    _legend_below(fig, np.atleast_1d(axes)[0])
    return fig


def plot_decode_bandwidth(results: pd.DataFrame) -> plt.Figure:
    """Rate of reading the active experts' weights from 1 to 64 tokens, against the
    measured copy bandwidth and a 60% line.

    Taught in notebook 07.
    """
    decode = results[results["sweep"] == "decode"]
    copy = decode["copy_gbps"].iloc[0]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rows in decode.groupby("implementation", sort=False):
        if name.startswith("flat metadata ("):
            continue
        ax.plot(
            rows["T"],
            rows["weight_gbps"],
            _line_style(name),
            marker="o",
            color=implementation_color(name),
            label=name,
        )
    ax.axhline(copy, color="k", linestyle="--", label=f"copy bandwidth {copy:.0f} GB/s")
    ax.axhline(0.6 * copy, color="grey", linestyle=":", label="60% of copy")
    ax.set_ylim(0, 1.1 * copy)  # the copy line inside the axes, not on their edge
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens T (Mixtral-like shape, uniform top-1 routing)")
    ax.set_ylabel("GB/s of active-expert weights read")
    ax.set_title(_card_title(results, "Decode: weight bandwidth"))
    fig.tight_layout()
    _legend_below(fig, ax)
    return fig


def plot_model_table(results: pd.DataFrame, model: str) -> plt.Figure:
    """One model's two expert GEMMs: each candidate's roofline fraction against the tokens,
    uniform routing solid with circles (CUDA-graph replays dashed with squares), Zipf-skewed
    dotted with triangles (``moe_matmul`` only), lines only between measured token counts.

    Taught in notebook 14.
    """
    rows = results[results["model"] == model]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, which in zip(axes, GEMMS, strict=True):
        gemm = rows[rows["gemm"] == which]
        for name, by_name in gemm.groupby("implementation", sort=False):
            for skew, line in by_name.groupby("skew"):
                if skew and name != "moe_matmul":
                    continue
                _plot_measured(
                    ax,
                    line["T"],
                    line["roofline_fraction"],
                    gap=8,
                    linestyle=":" if skew else _line_style(name),
                    marker="^" if skew else "s" if _line_style(name) == "--" else "o",
                    color=implementation_color(name),
                    label=f"{name}, Zipf {skew}" if skew else name,
                )
        first = gemm.iloc[0]
        ax.set_title(f"{which}: {first['K']} -> {first['N']}, E={first['E']}, top-{first['top_k']}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens T")
        ax.axhline(0.85, color="grey", linestyle=":", label="0.85 of the roofline")
    axes[0].set_ylabel("fraction of the roofline")
    axes[0].set_ylim(0, 1.05)
    fig.suptitle(_card_title(results, model))
    fig.tight_layout()
    _legend_below(fig, axes[1])
    return fig


def plot_top_k_cost(results: pd.DataFrame, T: int = 16384) -> plt.Figure:
    """At ``T`` tokens (uniform routing), the time of the grouped_mm pipeline and
    of ``moe_matmul`` over grouped_mm core's, for each model's two GEMMs, ordered by top-k.

    Taught in notebook 08.
    """
    rows = results[(results["T"] == T) & (results["skew"] == 0)]
    ms = rows.pivot_table(index=["top_k", "model", "gemm"], columns="implementation", values="ms")
    ms = ms.sort_index(level=["top_k", "model"], sort_remaining=False)
    labels = [f"{model} {gemm}\n(top-{k})" for k, model, gemm in ms.index]
    x = np.arange(len(ms))
    fig, ax = plt.subplots(figsize=(12, 4))
    for offset, name in ((-0.2, "grouped_mm pipeline"), (0.2, "moe_matmul")):
        ratio = ms[name] / ms["grouped_mm core"]
        ax.bar(x + offset, ratio, width=0.4, color=implementation_color(name), label=name)
    core = dict(color=implementation_color("grouped_mm core"), linewidth=1.5)
    ax.axhline(1.0, label="grouped_mm core (pre-sorted pairs)", **core)
    ax.set_xticks(x, labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("time / grouped_mm core's time")
    ax.set_title(_card_title(results, f"Top-k at prefill, T = {T}, uniform routing"))
    fig.tight_layout()
    _legend_below(fig, ax)
    return fig


def plot_autotune_trace(summary: pd.DataFrame, trace: pd.DataFrame) -> plt.Figure:
    """TFLOP/s of every config the autotuner tried against the seconds since its
    search began, the best so far, and the hand-picked and default configs as lines.

    Taught in notebook 09.
    """
    shapes = list(dict.fromkeys(summary["shape"]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(12, 4), sharey=False)
    for ax, shape in zip(np.atleast_1d(axes), shapes, strict=True):
        tried = trace[(trace["shape"] == shape) & (trace["status"] == "ok")]
        seconds = tried["timestamp_s"]  # since the search began
        ax.scatter(seconds, tried["tflops"], s=8, alpha=0.5, label="a config it timed")
        ax.step(seconds, tried["tflops"].cummax(), where="post", color="C1", label="best so far")
        rows = summary[summary["shape"] == shape]
        for (_, row), style in zip(rows.iterrows(), ("--", ":", "-."), strict=True):
            ax.axhline(
                row["tflops"],
                color="k",
                linestyle=style,
                linewidth=1,
                label=(f"{row['method']}: {row['tflops']:.0f}"),
            )
        ax.set_xlabel("seconds since the search began")
        ax.set_xlim(left=0)
        ax.set_ylabel("TFLOP/s")
        ax.set_title(shape)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.3), ncol=2)
    fig.suptitle(_card_title(summary, "What autotuning finds, and when"))
    fig.tight_layout()
    return fig
