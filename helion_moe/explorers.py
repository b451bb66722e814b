"""The interactive explorers (ipywidgets): each widget only supplies the arguments of an
``explore_*`` function, which draws with ``helion_moe.plots`` and returns what it shows; its
first render is the function's defaults, so a reader without a live kernel still sees a figure.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from .benchmarks.model_table import MODEL_TABLE_PATH, BlockStats, block_stats, model_table_limits
from .benchmarks.per_expert import BENCHMARKS_PATH
from .benchmarks.shapes import FINE_GRAINED, MIXTRAL_LIKE, MOE_MODELS
from .configs import flat_token_block
from .plots.lessons import plot_expert_load
from .plots.results import plot_model_table, plot_sweep
from .routing import LoadStats, expert_load, load_stats, route_zipf, route_zipf_top_k

__all__ = [
    "benchmarks_explorer",
    "explore_benchmarks",
    "explore_model_table",
    "explore_routing",
    "explore_token_blocks",
    "model_table_explorer",
    "routing_explorer",
    "token_block_explorer",
]


def explore_routing(
    num_experts: int = 64, num_tokens: int = 4096, skew: float = 1.2, top_k: int = 2
) -> LoadStats:
    """Route ``num_tokens`` tokens to ``top_k`` of ``num_experts`` experts with a Zipf skew
    (``route_zipf_top_k``, seed 0), draw the per-expert load and return its statistics: what
    the routing explorer (``routing_explorer``) shows for each setting of its sliders.

    Taught in notebook 01.
    """
    ids = route_zipf_top_k(num_tokens, num_experts, skew, top_k, device=torch.device("cpu"))
    load = expert_load(ids, num_experts)
    stats = load_stats(load)
    title = (
        f"T = {num_tokens}, E = {num_experts}, Zipf {skew:g}, top-{top_k}: "
        f"CV {stats.coefficient_of_variation:.2f}, {stats.empty_experts} experts empty"
    )
    label = f"{num_tokens * top_k} pairs"
    fig = plot_expert_load({label: load}, title, columns=1, unit="pairs")
    plt.show()
    plt.close(fig)
    return stats


def routing_explorer() -> object:  # ipywidgets.interactive
    """Sliders for E, T, skew and top-k that redraw ``explore_routing`` (first render: its
    defaults). The widget's ``result`` is the ``LoadStats`` of the routing on display.

    Taught in notebook 01.
    """
    import ipywidgets

    experts = ipywidgets.IntSlider(64, 2, 256, description="E")
    top_k = ipywidgets.IntSlider(2, 1, 8, description="top-k")
    ipywidgets.dlink((experts, "value"), (top_k, "max"), lambda E: min(8, E))  # k <= E
    return ipywidgets.interactive(
        explore_routing,
        num_experts=experts,
        num_tokens=ipywidgets.IntSlider(4096, 1, 16384, description="T"),
        skew=ipywidgets.FloatSlider(1.2, min=0.0, max=2.0, step=0.1, description="skew"),
        top_k=top_k,
    )


def explore_token_blocks(
    pairs_per_expert: int = 40, block_t: int = 32, num_experts: int = 16
) -> BlockStats:
    """Draw ``num_experts`` experts' loads (uniform routing, on average ``pairs_per_expert``
    pairs each, seed 0) cut into token blocks of ``block_t`` rows: each expert's pairs, its
    padding rows and its block boundaries. Returns the ``BlockStats``; what the token-block
    explorer (``token_block_explorer``) shows for each setting of its controls.

    Taught in notebook 06.
    """
    ids = route_zipf(pairs_per_expert * num_experts, num_experts, 0.0, seed=0, device="cpu")
    load = expert_load(ids, num_experts)
    stats = block_stats(load, block_t)
    padded = -(-load // block_t) * block_t
    experts = np.arange(num_experts)
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.bar(experts, load.numpy(), color="C0", label="rows with a pair")
    ax.bar(experts, (padded - load).numpy(), bottom=load.numpy(), color="C3", alpha=0.4,
           label="padding rows")  # fmt: skip
    for boundary in range(block_t, int(padded.max()) + 1, block_t):
        ax.axhline(boundary, color="black", linewidth=0.5, alpha=0.4)
    ax.set_xlabel("expert (horizontal lines: token block boundaries)")
    ax.set_ylabel("rows")
    ax.set_title(
        f"{pairs_per_expert} pairs per expert on average, {block_t}-row blocks: "
        f"{stats.blocks} blocks, {100 * stats.wasted_work:.0f}% of their rows padding, "
        f"weights read {stats.weight_reads:.2f}x\n(mh.flat_token_block picks "
        f"{flat_token_block(int(load.sum()), num_experts)} rows here)",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    plt.show()
    plt.close(fig)
    return stats


def token_block_explorer() -> object:  # ipywidgets.interactive
    """A slider for the pairs per expert and a choice of token block that redraw
    ``explore_token_blocks`` (first render: its defaults); ``result`` is the ``BlockStats``.

    Taught in notebook 06.
    """
    import ipywidgets

    return ipywidgets.interactive(
        explore_token_blocks,
        pairs_per_expert=ipywidgets.IntSlider(40, 1, 512, description="pairs/expert"),
        block_t=ipywidgets.SelectionSlider(
            options=[16, 32, 64, 128], value=32, description="block_t"
        ),
        num_experts=ipywidgets.fixed(16),
    )


def explore_benchmarks(shape: str = MIXTRAL_LIKE.name) -> pd.Series:
    """Draw notebook 05's skew sweep (``plot_sweep``) for one of its shapes from the committed
    ``benchmarks.csv`` and return that shape's prefill TFLOP/s by implementation: what the
    shape picker (``benchmarks_explorer``) shows.

    Taught in notebook 05.
    """
    results = pd.read_csv(BENCHMARKS_PATH)
    one_shape = results[results["shape"] == shape]
    fig = plot_sweep(one_shape, "skew", "skew", "Zipf skew", logx=False)
    plt.show()
    plt.close(fig)
    prefill = one_shape[one_shape["sweep"] == "prefill"]
    return prefill.set_index("implementation")["tflops"]


def benchmarks_explorer() -> object:  # ipywidgets.interactive
    """A drop-down of notebook 05's two shapes that redraws ``explore_benchmarks``.

    Taught in notebook 05.
    """
    import ipywidgets

    names = [MIXTRAL_LIKE.name, FINE_GRAINED.name]
    return ipywidgets.interactive(
        explore_benchmarks, shape=ipywidgets.Dropdown(options=names, description="shape")
    )


def explore_model_table(model: str = MOE_MODELS[0].name) -> pd.DataFrame:
    """Draw one model's rows of the committed model table (``plot_model_table``) and return
    its ``model_table_limits`` rows: what the model picker (``model_table_explorer``) shows.

    Taught in notebook 14.
    """
    results = pd.read_csv(MODEL_TABLE_PATH)
    fig = plot_model_table(results, model)
    plt.show()
    plt.close(fig)
    return model_table_limits(results).loc[model]


def model_table_explorer() -> object:  # ipywidgets.interactive
    """A drop-down of the table's models that redraws ``explore_model_table``.

    Taught in notebook 14.
    """
    import ipywidgets

    names = [model.name for model in MOE_MODELS]
    return ipywidgets.interactive(
        explore_model_table, model=ipywidgets.Dropdown(options=names, description="model")
    )
