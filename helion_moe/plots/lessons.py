"""Figures of what a lesson computes on the spot: routings and loads (notebook 01), the sort's
permutation (02), error histograms (03), the race's rows (04), gradients (10). Each returns
its figure; a notebook cell ends with ``plt.show()``.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Patch

from ..routing import load_stats
from ..sorting import ExpertSort

__all__ = [
    "plot_curves",
    "plot_error_histograms",
    "plot_expert_load",
    "plot_gradients",
    "plot_permutation",
    "plot_row_errors",
]


def plot_expert_load(
    loads: dict[str, torch.Tensor],  # label -> [E] tokens (or pairs) per expert
    title: str,
    columns: int = 3,
    unit: str = "tokens",
) -> plt.Figure:
    """One bar chart of ``unit`` per expert for each routing, the mean load dashed. Each panel
    has its own y axis: the loads of skewed routings would flatten the even ones.

    Taught in notebook 01.
    """
    rows = math.ceil(len(loads) / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(max(3.6 * columns, 7.0), 2.7 * rows + 0.3), squeeze=False
    )
    for ax, (label, load) in zip(axes.flat, loads.items(), strict=False):
        load = load.cpu()
        ax.bar(range(len(load)), load.numpy(), color="tab:blue", label=unit)
        ax.axhline(load.double().mean(), color="black", linestyle="--", label="mean")
        stats = load_stats(load)
        ax.set_title(f"{label}: max/mean {stats.max_over_mean:.2f}", fontsize=10)
        ax.set_xlabel("expert")
        ax.set_ylabel(unit)
    for ax in axes.flat[len(loads) :]:
        ax.set_visible(False)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(
    x: list[float],
    curves: dict[str, list[float]],  # label -> one y per x
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = True,
    logy: bool = False,
    styles: dict[str, dict[str, object]] | None = None,  # label -> matplotlib line options
) -> plt.Figure:
    """Line plot of several labelled curves over a shared x axis, each with its own marker and
    line style, so curves that coincide stay visible; ``styles`` overrides them per label (for
    example one colour for the curves of one T).

    Taught in notebook 01.
    """
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for i, (label, y) in enumerate(curves.items()):
        style = dict(marker="osD^v<>P*X"[i % 10], linestyle=("-", "--", "-.", ":")[i % 4])
        style |= (styles or {}).get(label, {})
        ax.plot(x, y, label=label, markerfacecolor="none", **style)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_permutation(
    expert_ids: torch.Tensor,  # [T]
    sort: ExpertSort,
) -> plt.Figure:
    """Tokens coloured by expert in their original order (top) and sorted by expert (bottom),
    a line from each token's original position to its sorted position.

    Taught in notebook 02.
    """
    expert_ids = expert_ids.cpu()
    sorted_to_orig = sort.sorted_to_orig_token_idx.cpu().long()
    T, E = len(expert_ids), len(sort.expert_token_counts)
    colors = plt.get_cmap("tab10" if E <= 10 else "tab20")(np.arange(E) % 20)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * T), 2.8))
    for s, t in enumerate(sorted_to_orig.tolist()):
        ax.plot([t, s], [1, 0], color=colors[expert_ids[t]], alpha=0.6, linewidth=1)
    for row, ids in ((1, expert_ids), (0, expert_ids[sorted_to_orig])):
        ax.scatter(range(T), [row] * T, c=colors[ids], s=160, marker="s", zorder=3)
        for position, e in enumerate(ids.tolist()):
            ax.text(position, row, str(e), ha="center", va="center", fontsize=7, zorder=4)
    ax.set_yticks([0, 1], ["sorted position s", "original token t"])
    ax.set_xlabel("position (number in the square: its expert)")
    ax.set_ylim(-0.4, 1.4)
    ax.set_title("Sorting tokens by expert: sorted_to_orig_token_idx[s] = t")
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    return fig


def plot_error_histograms(
    errors: dict[str, torch.Tensor],  # label -> errors relative to the reference's RMS
    title: str,
    floor: str | None = None,
) -> plt.Figure:
    """Histograms, on a log axis, of elementwise errors against the float64 reference.
    ``floor`` names the errors drawn as a shaded area beneath the others (the rounding floor),
    so that a curve lying on it stays visible. Each label keeps one colour (its place in
    ``errors``) across figures; identical errors share one curve, in its first label's colour.

    Taught in notebook 03.
    """
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    all_errors = torch.cat([e.flatten().double().cpu() for e in errors.values()])
    low = max(all_errors[all_errors > 0].min().item(), 1e-12)
    bins = np.logspace(np.log10(low), np.log10(all_errors.max().item() * 1.5), 60)
    curves: list[tuple[list[str], torch.Tensor]] = []  # identical errors share one curve
    for label, err in errors.items():
        same = [c for c in curves if torch.equal(c[1], err)]
        if same:
            same[0][0].append(label)
        else:
            curves.append(([label], err))
    for labels, err in curves:
        clamped = err.flatten().double().cpu().clamp(min=low)
        label = labels[0] if len(labels) == 1 else ", ".join(labels) + " (identical)"
        if floor in labels:
            ax.hist(clamped, bins=bins, histtype="stepfilled", color="0.8", label=label, zorder=1)
        else:
            color = f"C{list(errors).index(labels[0])}"
            step = dict(histtype="step", linewidth=1.5, color=color, zorder=2)
            ax.hist(clamped, bins=bins, label=label, **step)
    ax.set_xscale("log")
    ax.set_xlabel("|result - float64 reference| / RMS(reference)")
    ax.set_ylabel("elements")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_row_errors(
    row_errors: dict[str, torch.Tensor],  # label -> [T] largest error of each row
    race_rows: torch.Tensor,  # rows the racing store can lose
    title: str,
) -> plt.Figure:
    """Largest error of each output row, per kernel, on a shared log axis, with the rows at
    risk of the race shaded.

    Taught in notebook 04.
    """
    fig, axes = plt.subplots(
        len(row_errors), 1, figsize=(7, 1.9 * len(row_errors)), sharex=True, sharey=True
    )
    for ax, (label, err) in zip(np.atleast_1d(axes), row_errors.items(), strict=True):
        err = err.double().cpu()
        ax.bar(range(len(err)), err, color="tab:red", label="row error")
        for row in race_rows.tolist():
            ax.axvspan(row - 0.5, row + 0.5, color="tab:orange", alpha=0.3)
        ax.set_yscale("log")
        ax.set_ylabel("max |error|")
        ax.set_title(label, fontsize=10)
    ax.set_xlabel("output row (original token index)")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    at_risk = Patch(color="tab:orange", alpha=0.3, label="row at risk of the race")
    handles = [*ax.get_legend_handles_labels()[0], at_risk]
    fig.legend(handles=handles, loc="lower center", ncols=2, fontsize=8)  # off the bars
    return fig


def plot_gradients(
    grads: dict[str, torch.Tensor],  # name -> a 2-D gradient (or a [E, K, N] one, drawn per expert)
) -> plt.Figure:
    """Each gradient as a heat map with its values written in, one panel per matrix.

    Taught in notebook 11.
    """
    panels = []
    for name, grad in grads.items():
        grad = grad.detach().cpu().float()
        if grad.dim() == 3:
            panels += [(f"{name}[{e}]", grad[e]) for e in range(grad.shape[0])]
        else:
            panels.append((name, grad if grad.dim() == 2 else grad[:, None]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    for ax, (name, grad) in zip(np.atleast_1d(axes), panels, strict=True):
        limit = grad.abs().max().item() or 1.0
        image = ax.imshow(grad, cmap="RdBu", vmin=-limit, vmax=limit)
        for (i, j), value in np.ndenumerate(grad.numpy()):
            dark = abs(value) > 0.6 * limit  # white text on the darkest cells
            ax.text(
                j,
                i,
                f"{value:.3g}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if dark else "black",
            )
        ax.set_title(name)
        ax.set_xticks(range(grad.shape[1]))
        ax.set_yticks(range(grad.shape[0]))
        ax.set_xlabel("column")
        ax.set_ylabel("row")
        fig.colorbar(image, ax=ax, shrink=0.7)
    fig.tight_layout()
    return fig
