"""Routing: which expert, or which k experts, each token goes to (notebook 01).

Uniform, Zipf-skewed and gating-network routings, drawn on the CPU from a seed so that they are
the same on every machine, top-k with combine weights, and the load statistics that say how
unevenly a routing spreads its tokens.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .mode import DEVICE

__all__ = [
    "LoadStats",
    "as_top_k",
    "cpu_generator",
    "expert_load",
    "gating_logits",
    "load_stats",
    "route_top_k",
    "route_uniform",
    "route_zipf",
    "route_zipf_top_k",
    "zipf_probabilities",
]


def cpu_generator(seed: int) -> torch.Generator:
    """Random draws are made on the CPU so a seed gives the same routing on every machine.

    Taught in notebook 01.
    """
    return torch.Generator(device="cpu").manual_seed(seed)


def route_uniform(
    num_tokens: int, num_experts: int, *, seed: int = 0, device: torch.device = DEVICE
) -> torch.Tensor:  # [T] int64
    """Top-1 routing where every expert is equally likely for every token.

    Args:
        num_tokens: T, the number of tokens.
        num_experts: E, the number of experts.
        seed: Seed of the CPU generator that draws the assignment.
        device: Where the returned tensor lives.

    Returns:
        Expert id of each token, shape [T], values in [0, E).

    Taught in notebook 01.
    """
    ids = torch.randint(num_experts, (num_tokens,), generator=cpu_generator(seed))
    return ids.to(device)


def zipf_probabilities(num_experts: int, skew: float) -> torch.Tensor:  # [E] float64
    """Probability of each expert under a Zipf law: p_e proportional to (e + 1) ** -skew.

    ``skew = 0`` is uniform; larger skews send more tokens to the first experts.

    Taught in notebook 01.
    """
    weights = torch.arange(1, num_experts + 1, dtype=torch.float64) ** -skew
    return weights / weights.sum()


def route_zipf(
    num_tokens: int,
    num_experts: int,
    skew: float,
    *,
    seed: int = 0,
    device: torch.device = DEVICE,
) -> torch.Tensor:  # [T] int64
    """Top-1 routing with a Zipf-skewed load: expert 0 is the most popular.

    Args:
        num_tokens: T, the number of tokens.
        num_experts: E, the number of experts.
        skew: Zipf exponent (0 = uniform, 1.2 = strongly skewed).
        seed: Seed of the CPU generator that draws the assignment.
        device: Where the returned tensor lives.

    Returns:
        Expert id of each token, shape [T], values in [0, E).

    Taught in notebook 01.
    """
    if num_tokens == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    probs = zipf_probabilities(num_experts, skew)
    ids = torch.multinomial(probs, num_tokens, replacement=True, generator=cpu_generator(seed))
    return ids.to(device)


def route_zipf_top_k(
    num_tokens: int,
    num_experts: int,
    skew: float,
    top_k: int,
    *,
    seed: int = 0,
    device: torch.device = DEVICE,
) -> torch.Tensor:  # [T, k] int64
    """Top-k routing with a Zipf-skewed load: each token draws k distinct experts, expert e with
    probability proportional to (e + 1) ** -skew among those it has not drawn yet.

    Args:
        num_tokens: T, the number of tokens.
        num_experts: E, the number of experts.
        skew: Zipf exponent (0 = uniform).
        top_k: k, the experts of each token (1 <= k <= E).
        seed: Seed of the CPU generator that draws the assignment.
        device: Where the returned tensor lives.

    Returns:
        The experts of each token, shape [T, k], values in [0, E), distinct within a row.

    Taught in notebook 01.
    """
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, E={num_experts}], got {top_k}")
    probs = zipf_probabilities(num_experts, skew).expand(num_tokens, num_experts)
    ids = torch.multinomial(probs, top_k, replacement=False, generator=cpu_generator(seed))
    return ids.to(device)


def gating_logits(
    A: torch.Tensor,  # [T, K]
    num_experts: int,
    *,
    seed: int = 0,
) -> torch.Tensor:  # [T, E] float32
    """Router scores from a small gating network: one linear layer, weights drawn from ``seed``.

    The layer's weight is [K, E] with entries of variance 1/K, the usual initialisation, so
    the logits of unit-variance activations have unit variance. The product is taken in
    float64, so the same activations give the same routing on every machine.

    Taught in notebook 01.
    """
    K = A.shape[1]
    gate = torch.randn(K, num_experts, generator=cpu_generator(seed), dtype=torch.float64)
    return (A.double() @ (gate / math.sqrt(K)).to(A.device)).float()


def route_top_k(
    logits: torch.Tensor,  # [T, E]
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([T, k] int64, [T, k] float32)
    """Top-k routing: each token keeps its k largest logits; softmax over those k gives weights.

    This is the Mixtral recipe. It equals taking the softmax over all experts, keeping the k
    largest probabilities and renormalising them to sum to one. A token's output is the sum
    over its k experts of the expert's output times that combine weight.

    Args:
        logits: Router scores, one row per token.
        k: How many experts each token goes to (1 <= k <= E).

    Returns:
        ``(expert_ids, combine_weights)``, each [T, k], best expert first.

    Taught in notebook 01.
    """
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k must be in [1, E={logits.shape[1]}], got {k}")
    top_logits, expert_ids = torch.topk(logits.float(), k, dim=1)
    return expert_ids, torch.softmax(top_logits, dim=1)


def as_top_k(routing: torch.Tensor) -> torch.Tensor:  # [T] or [T, k] -> [T, k]
    """Top-1 expert ids or combine weights ([T]) as top-k ones with k = 1 ([T, 1], a view).

    Taught in notebook 08.
    """
    return routing[:, None] if routing.dim() == 1 else routing


def expert_load(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:  # [E] int64
    """Number of tokens (or token-expert pairs, for top-k ids) each expert receives.

    Taught in notebook 01.
    """
    return torch.bincount(expert_ids.flatten(), minlength=num_experts)


@dataclasses.dataclass(frozen=True)
class LoadStats:
    """How unevenly tokens spread over experts.

    Taught in notebook 01.
    """

    max_over_mean: float  # 1.0 is perfect balance; the busiest expert sets the pace
    coefficient_of_variation: float  # std / mean of the per-expert loads
    empty_experts: int  # experts that received no token


def load_stats(load: torch.Tensor) -> LoadStats:  # load: [E]
    """Imbalance statistics of a per-expert load (from ``expert_load``).

    Taught in notebook 01.
    """
    load = load.double().cpu()
    if load.sum() == 0:
        raise ValueError("load must count at least one token")
    mean = load.mean().item()
    return LoadStats(
        max_over_mean=load.max().item() / mean,
        coefficient_of_variation=load.std(correction=0).item() / mean,
        empty_experts=int((load == 0).sum()),
    )
