"""Routing: assignments are in range, seeded, and follow the distribution asked for."""

import moe_helpers as mh

import pytest
import torch


@pytest.mark.parametrize(
    "route",
    [
        lambda T, E, seed: mh.route_uniform(T, E, seed=seed),
        lambda T, E, seed: mh.route_zipf(T, E, 1.2, seed=seed),
    ],
    ids=["uniform", "zipf"],
)
def test_top1_routing_is_in_range_and_reproducible(route):
    ids = route(1000, 8, 3)
    assert ids.shape == (1000,) and ids.dtype == torch.int64
    assert ids.min() >= 0 and ids.max() < 8
    assert torch.equal(ids, route(1000, 8, 3))
    assert not torch.equal(ids, route(1000, 8, 4))
    assert int(mh.expert_load(ids, 8).sum()) == 1000


def _assert_frequencies_match(ids: torch.Tensor, probs: torch.Tensor) -> None:
    """Each expert's count lies within 5 binomial standard deviations of T * p."""
    T = ids.numel()
    counts = mh.expert_load(ids, probs.numel()).double().cpu()
    expected = T * probs
    sigma = (T * probs * (1 - probs)).sqrt()
    assert ((counts - expected).abs() <= 5 * sigma + 1).all(), (counts, expected)


def test_uniform_routing_is_uniform():
    _assert_frequencies_match(mh.route_uniform(20000, 16), torch.full((16,), 1 / 16).double())


@pytest.mark.parametrize("skew", [0.0, 0.5, 1.2, 2.0])
def test_zipf_routing_follows_the_zipf_law(skew):
    probs = mh.zipf_probabilities(16, skew)
    assert torch.isclose(probs.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert (probs[:-1] >= probs[1:]).all()
    _assert_frequencies_match(mh.route_zipf(20000, 16, skew, seed=1), probs)


def test_more_skew_means_more_imbalance():
    imbalance = [
        mh.load_stats(mh.expert_load(mh.route_zipf(8192, 8, skew), 8)).max_over_mean
        for skew in (0.0, 0.6, 1.2, 2.0)
    ]
    assert imbalance == sorted(imbalance) and imbalance[0] < 1.1 < imbalance[-1]


def test_gating_routes_each_token_to_its_largest_logit():
    A = torch.randn(300, 32, generator=torch.Generator().manual_seed(0))
    logits = mh.gating_logits(A, 8, seed=5)
    assert logits.shape == (300, 8)
    assert torch.equal(logits, mh.gating_logits(A, 8, seed=5))
    ids, weights = mh.route_top_k(logits, 1)
    assert torch.equal(ids[:, 0], logits.argmax(dim=1))
    assert torch.equal(weights, torch.ones(300, 1))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_top_k_picks_the_k_best_experts_with_normalised_weights(k):
    logits = torch.randn(200, 8, generator=torch.Generator().manual_seed(k))
    ids, weights = mh.route_top_k(logits, k)
    assert ids.shape == weights.shape == (200, k)
    # the chosen experts are distinct, and each beats every expert left out
    assert (ids.sort(dim=1).values.diff(dim=1) > 0).all()
    chosen = logits.gather(1, ids)
    left_out = logits.scatter(1, ids, float("-inf"))
    assert (chosen.min(dim=1).values >= left_out.max(dim=1).values).all()
    # weights are the softmax probabilities renormalised over the chosen experts
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(200))
    probs = torch.softmax(logits, dim=1).gather(1, ids)
    torch.testing.assert_close(weights, probs / probs.sum(dim=1, keepdim=True))
    assert (weights[:, :-1] >= weights[:, 1:]).all()


@pytest.mark.parametrize("k", [0, 9])
def test_top_k_rejects_k_out_of_range(k):
    with pytest.raises(ValueError, match="k must be in"):
        mh.route_top_k(torch.zeros(4, 8), k)


def test_load_stats():
    stats = mh.load_stats(torch.tensor([6, 2, 0, 0]))
    assert stats.max_over_mean == 3.0
    assert stats.empty_experts == 2
    assert stats.coefficient_of_variation == pytest.approx(((4**2 + 0 + 2 * 2**2) / 4) ** 0.5 / 2)


def test_load_stats_refuses_a_load_without_tokens():
    with pytest.raises(ValueError, match="at least one token"):
        mh.load_stats(torch.zeros(4, dtype=torch.int64))


def test_routing_zero_tokens_gives_an_empty_assignment():
    for ids in (mh.route_uniform(0, 4), mh.route_zipf(0, 4, 1.2)):
        assert ids.shape == (0,) and ids.dtype == torch.int64


def test_zipf_top_k_routing_draws_k_distinct_experts_per_token():
    ids = mh.route_zipf_top_k(500, 16, 1.2, 4, seed=3)
    assert ids.shape == (500, 4) and ids.dtype == torch.int64
    assert ((ids >= 0) & (ids < 16)).all()
    assert (ids.sort(dim=1).values.diff(dim=1) > 0).all(), "experts repeat within a token"
    load = mh.expert_load(ids, 16)
    assert load[0] > load[15], "expert 0 is the most popular under skew"
    with pytest.raises(ValueError, match=r"top_k must be in \[1, E=16\]"):
        mh.route_zipf_top_k(5, 16, 1.2, 17)
