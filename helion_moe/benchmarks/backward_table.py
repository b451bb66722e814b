"""The backward table (notebooks 11 and 15): the layer's forward and forward + backward against
transformers' grouped_mm and grouped_mm core, with every gradient checked first.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from ..checks import TOLERANCES, assert_experts_close
from ..configs import RESULTS_DIR, flat_token_block
from ..mode import DEVICE, ON_GPU
from ..routing import cpu_generator
from ..transformers_backend import register_transformers_experts
from . import timing
from .layer_table import (
    LAYER_TABLE_CHECKED_ROWS,
    grouped_mm_experts_core,
    pairs_sorted_by_expert,
    transformers_experts_module,
    with_experts_backend,
    with_layer_machine_info,
)
from .shapes import MOE_MODELS, MoEModel, model_routing

__all__ = [
    "BACKWARD_CANDIDATES",
    "BACKWARD_PARTS_PATH",
    "BACKWARD_TABLE_MEMORY_SHARE",
    "BACKWARD_TABLE_MODELS",
    "BACKWARD_TABLE_PATH",
    "BACKWARD_TABLE_TOKENS",
    "backward_table_fits",
    "backward_table_point",
    "backward_table_speedups",
    "backward_times",
    "relative_difference",
    "run_backward_table",
]

BACKWARD_TABLE_TOKENS = (8192, 16384)


# MOE_MODELS' six sizes, each in a MixtralExperts (gpt-oss-120b's too: its own experts' biases
# and clamped gate are differentiated in notebook 11's section 5, not timed here).
BACKWARD_TABLE_MODELS = MOE_MODELS


BACKWARD_TABLE_PATH = RESULTS_DIR / "backward_table.csv"


# GPU time per kernel of one forward + backward (probes/backward_probe.py backward_parts)
BACKWARD_PARTS_PATH = RESULTS_DIR / "backward_parts.csv"


BACKWARD_CANDIDATES = ("helion", "grouped_mm", "grouped_mm core")


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (Frobenius norms), summed in float64 over slices of
    the first dimension, so that no float64 copy of a large gradient exists at once.

    Taught in notebook 11.
    """
    rows = max(1, 2**26 * expected.shape[0] // max(1, expected.numel()))
    squares = torch.zeros(2, dtype=torch.float64, device=expected.device)
    for a, e in zip(actual.split(rows), expected.split(rows), strict=True):
        e = e.double()
        squares += torch.stack([(a.double() - e).pow(2).sum(), e.pow(2).sum()])
    difference, norm = squares.tolist()
    return math.sqrt(difference / norm) if norm else math.sqrt(difference)


def backward_table_point(
    model: MoEModel,
    experts: torch.nn.Module,  # transformers_experts_module(model), weights requiring grad
    T: int,
) -> list[dict[str, object]]:
    """Time the layer's forward and forward + backward at T tokens of uniform top-k routing:
    the "helion" backend, transformers' "grouped_mm" (sort, gather, ``torch._grouped_mm``,
    scatter, with torch's autograd) and grouped_mm core (pre-sorted rows, the two grouped GEMMs
    and the activation only, with torch's autograd). Every backward computes the gradients of
    the activations, both weights and (where there are any) the combine weights.

    First the "helion" forward is checked on sampled rows against the float64 reference, and
    each of its gradients against grouped_mm's: their relative difference (Frobenius norms,
    in the ``*_difference`` columns) must stay within the bf16 tolerance. One row per
    candidate and phase.

    Taught in notebook 11.
    """
    generator = torch.Generator(DEVICE).manual_seed(T)
    A = torch.randn(T, model.H, generator=generator, device=DEVICE).to(torch.bfloat16)
    expert_ids, weights = model_routing(T, model.E, model.top_k, 0.0)
    grad = torch.randn(T, model.H, generator=generator, device=DEVICE).to(torch.bfloat16)
    params = (experts.gate_up_proj, experts.down_proj)
    A, weights = A.requires_grad_(), weights.requires_grad_()
    backends = {name: with_experts_backend(experts, name) for name in BACKWARD_CANDIDATES[:2]}
    rows = torch.randperm(T, generator=cpu_generator(T))[:LAYER_TABLE_CHECKED_ROWS].to(DEVICE)
    gate_up, down = (w.detach().transpose(1, 2) for w in params)
    with torch.no_grad():
        out = backends["helion"](A, expert_ids, weights)
    assert_experts_close(out, A.detach(), gate_up, down, expert_ids, weights.detach(), rows=rows)

    def forward_backward(backend: torch.nn.Module) -> tuple[torch.Tensor, ...]:
        out = backend(A, expert_ids, weights)
        return torch.autograd.grad(out, (A, *params, weights), grad)

    helion_grads = forward_backward(backends["helion"])
    grouped_grads = forward_backward(backends["grouped_mm"])
    names = ("dA", "dW_gate_up", "dW_down", "d_weights")
    differences = {
        f"{name}_difference": relative_difference(h, g)
        for name, h, g in zip(names, helion_grads, grouped_grads, strict=True)
    }
    del helion_grads, grouped_grads
    for name, difference in differences.items():
        if not difference <= TOLERANCES[torch.bfloat16]:  # also catches NaN
            raise AssertionError(
                f"{model.name} T={T}: {name} {difference:.3g} from grouped_mm's gradient, "
                f"over the bf16 tolerance {TOLERANCES[torch.bfloat16]:.3g}"
            )
    token_of_sorted_pair, offsets = pairs_sorted_by_expert(expert_ids, model.E)
    A_sorted = A.detach()[token_of_sorted_pair].requires_grad_()
    grad_sorted = grad[token_of_sorted_pair]
    grouped_mm_core = functools.partial(
        grouped_mm_experts_core,
        A_sorted,
        *(w.transpose(1, 2) for w in params),  # the parameters themselves, so grads reach them
        offsets,
    )

    candidates = {
        "forward": {
            **{name: functools.partial(b, A, expert_ids, weights) for name, b in backends.items()},
            "grouped_mm core": grouped_mm_core,
        },
        "forward + backward": {
            **{name: functools.partial(forward_backward, b) for name, b in backends.items()},
            "grouped_mm core": lambda: torch.autograd.grad(
                grouped_mm_core(), (A_sorted, *params), grad_sorted
            ),
        },
    }
    pairs = expert_ids.numel()
    point = {
        "model": model.name,
        "T": T,
        "H": model.H,
        "I": model.I,
        "E": model.E,
        "top_k": model.top_k,
        "block_t": flat_token_block(pairs, model.E),
        "forward_flops": 6 * pairs * model.H * model.I,
        **differences,
    }
    results = []
    for phase, timed in candidates.items():
        for name, fn in timed.items():
            with torch.set_grad_enabled(phase != "forward"):
                ms = timing.time_ms(fn)
            results.append({**point, "implementation": name, "phase": phase, "ms": ms})
    return results


# A training step holds a model's bf16 expert weights and their gradients at once, beside the
# activations and every peer's own tensors. DeepSeek-V3's (45 GB) ran on an 80 GB H100;
# Llama-4-Maverick's (64 GB) ran out of its memory.
BACKWARD_TABLE_MEMORY_SHARE = 0.7


def backward_table_fits(model: MoEModel, memory_bytes: int) -> bool:
    """Whether ``model``'s bf16 expert weights and their gradients, 2 x 2 bytes for each of the
    3 E H I weights, take at most ``BACKWARD_TABLE_MEMORY_SHARE`` of ``memory_bytes``: the
    models ``run_backward_table`` times on a card with that much memory.

    Taught in notebook 11.
    """
    return BACKWARD_TABLE_MEMORY_SHARE * memory_bytes >= 12 * model.E * model.H * model.I


def run_backward_table(
    models: tuple[MoEModel, ...] = BACKWARD_TABLE_MODELS,
    tokens: tuple[int, ...] = BACKWARD_TABLE_TOKENS,
    path: Path | None = None,
) -> pd.DataFrame:
    """The backward table on this GPU, in bf16: every ``backward_table_point`` of the models
    that ``backward_table_fits`` this card's memory (it prints the others). With ``path``, the
    rows so far are written there after every point, so a run cut short keeps what it measured.

    Taught in notebook 11.
    """
    register_transformers_experts()
    too_large = []
    if ON_GPU:  # on the CPU every model runs (the tests' sizes are tiny)
        memory = torch.cuda.get_device_properties(DEVICE).total_memory
        too_large = [model.name for model in models if not backward_table_fits(model, memory)]
        if too_large:
            print(f"not timed, too large for this card's {memory / 2**30:.0f} GiB: {too_large}")
    rows = []
    results = pd.DataFrame()
    for model in tqdm([m for m in models if m.name not in too_large], desc="models"):
        experts = transformers_experts_module(model)
        for param in (experts.gate_up_proj, experts.down_proj):
            param.requires_grad_()
        for T in tokens:
            rows += backward_table_point(model, experts, T)
            results = with_layer_machine_info(pd.DataFrame(rows))
            if path is not None:
                results.to_csv(path, index=False)
        del experts
        torch.cuda.empty_cache()
    return results


def backward_times(results: pd.DataFrame) -> pd.DataFrame:
    """The backward table as ms per (model, T) row and (phase, implementation) column, with the
    backward alone (forward + backward minus forward) as a third phase.

    Taught in notebook 15.
    """
    times = results.pivot_table(
        index=["model", "T"], columns=["phase", "implementation"], values="ms", sort=False
    )
    backward = times["forward + backward"] - times["forward"]
    backward.columns = pd.MultiIndex.from_product([["backward"], backward.columns])
    return pd.concat([times, backward], axis=1)


def backward_table_speedups(results: pd.DataFrame) -> pd.DataFrame:
    """Per model and token count: the "helion" layer's forward + backward ("fwd+bwd") speed-up
    over transformers' grouped_mm ("gmm") and over grouped_mm core ("core"), and the same for
    each phase alone ("fwd", "bwd"): columns "fwd+bwd/gmm", ..., "bwd/core".

    Taught in notebook 11 (and read in 15).
    """
    times = backward_times(results)
    columns = {}
    phases = {"forward + backward": "fwd+bwd", "forward": "fwd", "backward": "bwd"}
    peers = {"grouped_mm": "gmm", "grouped_mm core": "core"}
    for phase, short in phases.items():
        for peer, short_peer in peers.items():
            columns[f"{short}/{short_peer}"] = times[(phase, peer)] / times[(phase, "helion")]
    return pd.DataFrame(columns).round(2)
