"""The interactive explorers: their controls change what they show."""

import moe_helpers as mh

import pytest
import torch


def test_zipf_top_k_routing_draws_k_distinct_experts_per_token():
    ids = mh.route_zipf_top_k(500, 16, 1.2, 4, seed=3)
    assert ids.shape == (500, 4) and ids.dtype == torch.int64
    assert ((ids >= 0) & (ids < 16)).all()
    assert (ids.sort(dim=1).values.diff(dim=1) > 0).all(), "experts repeat within a token"
    load = mh.expert_load(ids, 16)
    assert load[0] > load[15], "expert 0 is the most popular under skew"
    with pytest.raises(ValueError, match=r"top_k must be in \[1, E=16\]"):
        mh.route_zipf_top_k(5, 16, 1.2, 17)


def test_the_routing_explorer_redraws_for_its_controls():
    explorer = mh.routing_explorer()
    controls = {c.description: c for c in explorer.children if getattr(c, "description", "")}
    assert set(controls) == {"E", "T", "skew", "top-k"}
    assert explorer.result == mh.explore_routing()  # the first render is the default
    skewed = explorer.result
    controls["skew"].value = 0.0
    assert explorer.result.max_over_mean < skewed.max_over_mean / 4
    controls["T"].value = 16  # 32 pairs over 64 experts: most experts get none
    assert explorer.result.empty_experts > 32
    controls["top-k"].value = 8  # 128 pairs
    assert explorer.result.empty_experts < 32
    controls["E"].value = 4  # top-k can no longer exceed E
    assert controls["top-k"].max == 4 and controls["top-k"].value == 4
    assert explorer.result.empty_experts == 0
