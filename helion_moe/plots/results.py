"""Figures of the measured tables (notebooks 05-15), each titled with the card, dtype and date
of its run, one colour per implementation across the course (``IMPLEMENTATION_COLORS``). Each
returns its figure.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..benchmarks.backward_table import BACKWARD_CANDIDATES, backward_times
from ..benchmarks.fp8_table import FP8_TABLE_DECODE_MAX_TOKENS
from ..benchmarks.layer_table import TRANSFORMERS_BACKENDS
from ..benchmarks.per_expert import dense_roof_tflops
from ..benchmarks.shapes import GEMMS
from ..expert_parallel import EXPERT_PARALLEL_PHASES

__all__ = [
    "GRAPH_SUFFIX",
    "IMPLEMENTATION_COLORS",
    "LAYER_PLOT_CANDIDATES",
    "implementation_color",
    "plot_autotune_trace",
    "plot_backward_table",
    "plot_decode_bandwidth",
    "plot_expert_parallel_load",
    "plot_expert_parallel_time",
    "plot_flat_prefill",
    "plot_fp8_table",
    "plot_layer_table",
    "plot_model_table",
    "plot_prefill_bars",
    "plot_roofline",
    "plot_sweep",
    "plot_time_against_load",
    "plot_top_k_cost",
]


def _card_title(results: pd.DataFrame, title: str, dtype: str = "bf16") -> str:
    first = results.iloc[0]
    return f"{title}\n{first['card']}, {dtype}, {first['date']}"


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
