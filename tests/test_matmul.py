"""moe_matmul's flat and per-pair paths: random cases, the path rule, top-k, sizes past int32."""

import moe_helpers as mh
from helion_moe import launch

import helion
import pytest
import torch


@pytest.mark.parametrize("case", range(24))
def test_flat_kernel_matches_the_reference_on_random_cases(case):
    c = mh.random_moe_case(case)
    out = mh.moe_matmul(c.A, c.W, c.expert_ids, implementation="flat", config=c.config)
    mh.assert_moe_close(out, c.A, c.W, c.expert_ids)


@pytest.mark.parametrize("case", range(12))
def test_per_pair_kernel_matches_the_reference_on_random_cases(case):
    c = mh.random_moe_case(case)
    config = helion.Config(**{**c.config.config, "block_sizes": [1, *c.config["block_sizes"][1:]]})
    out = mh.moe_matmul(c.A, c.W, c.expert_ids, implementation="per_pair", config=config)
    mh.assert_moe_close(out, c.A, c.W, c.expert_ids)


def test_auto_runs_the_per_pair_kernel_for_a_few_pairs_and_the_flat_one_otherwise():
    for E in (1, 8, 128, 256):
        few = mh.per_pair_max_pairs(E)
        assert few >= mh.PER_PAIR_MAX_PAIRS
        assert mh.choose_implementation(few, E, None) == "per_pair"
        assert mh.choose_implementation(few + 1, E, None) == "flat"
    assert mh.per_pair_max_pairs(256) == 256 // mh.PER_PAIR_EXPERTS_PER_PAIR
    one_pair_tiles = helion.Config(block_sizes=[1, 32, 32], num_warps=4, num_stages=1)
    assert mh.choose_implementation(1000, 8, one_pair_tiles) == "per_pair"
    assert mh.choose_implementation(1, 8, mh.FLAT_CONFIGS[torch.bfloat16][16]) == "flat"


def test_per_pair_refuses_a_config_with_a_token_block():
    A = torch.randn(2, 16).to(mh.DEVICE)
    W = torch.randn(3, 16, 24).to(mh.DEVICE)
    config = helion.Config(block_sizes=[16, 16, 16], num_warps=4, num_stages=1)
    with pytest.raises(ValueError, match=r"token block \(block_sizes\[0\]\) must be 1"):
        mh.moe_matmul(
            A, W, torch.tensor([0, 2], device=mh.DEVICE), implementation="per_pair", config=config
        )


@pytest.mark.parametrize(
    "T, E, k, dtype",
    [
        (50, 8, 2, torch.bfloat16),
        (33, 16, 8, torch.float16),
        (1, 4, 2, torch.float32),
        (20, 3, 3, torch.bfloat16),  # every token goes to every expert
        (64, 8, 1, torch.float32),
    ],
)
@pytest.mark.parametrize("token_block", [16, 1])  # 1: the per-pair kernel
def test_top_k_with_combine_weights_matches_the_reference_and_is_deterministic(
    T, E, k, dtype, token_block
):
    g = torch.Generator().manual_seed(T + E + k)
    K, N = 24, 40
    A = torch.randn(T, K, generator=g).to(mh.DEVICE, dtype)
    W = torch.randn(E, K, N, generator=g).to(mh.DEVICE, dtype)
    expert_ids, weights = mh.route_top_k(mh.gating_logits(A, E, seed=k), k)
    config = helion.Config(block_sizes=[token_block, 32, 16], num_warps=4, num_stages=1)
    first = mh.moe_matmul(A, W, expert_ids, weights, config=config)
    mh.assert_moe_close(first, A, W, expert_ids, weights)
    assert torch.equal(first, mh.moe_matmul(A, W, expert_ids, weights, config=config))


def test_top_1_combine_weights_scale_each_row():
    A = torch.randn(10, 16).to(mh.DEVICE)
    W = torch.randn(3, 16, 24).to(mh.DEVICE)
    expert_ids = torch.arange(10, device=mh.DEVICE) % 3
    weights = torch.linspace(-1, 2, 10, device=mh.DEVICE)
    out = mh.moe_matmul(A, W, expert_ids, weights)
    mh.assert_moe_close(out, A, W, expert_ids, weights)
    mh.assert_moe_close(out / weights[:, None], A, W, expert_ids)


def test_a_kernel_compiled_for_one_expert_is_not_reused_for_eight():
    # Helion 1.4 compiles sizes of 1 in as constants but leaves them out of its cache key;
    # mh.sizes_of_one puts them back. Without it the second call skips experts 1..7.
    config = helion.Config(block_sizes=[16, 16, 16], num_warps=4, num_stages=1)
    A = torch.randn(24, 16).to(mh.DEVICE)
    for E in (1, 8):
        W = torch.randn(E, 16, 16).to(mh.DEVICE)
        expert_ids = torch.arange(24, device=mh.DEVICE) % E
        mh.assert_moe_close(mh.moe_matmul(A, W, expert_ids, config=config), A, W, expert_ids)


def test_weights_with_offsets_past_int32_run_with_int64_indexing():
    # W is a view whose last expert starts past 2**31 elements while it holds fewer than 2**31
    # (so Helion's own check, by element count, would keep int32). Its storage is 4.3 GB of
    # bfloat16 that is allocated but never touched, except for the experts the tokens use:
    # on the CPU the untouched pages are never mapped in, so the case costs little memory.
    E, K, N, row_stride = 256, 2048, 4088, 4104
    storage = torch.empty(E * K * row_stride, dtype=torch.bfloat16, device=mh.DEVICE)
    W = storage.view(E, K, row_stride)[:, :, :N]
    assert W.numel() < 2**31 < launch._largest_offset(W)
    expert_ids = torch.tensor([[255, 0], [3, 254]], device=mh.DEVICE)
    g = torch.Generator().manual_seed(0)
    for e in expert_ids.flatten().tolist():
        W[e].copy_(torch.randn(K, N, generator=g) / K**0.5)
    A = torch.randn(2, K, generator=g).to(mh.DEVICE, torch.bfloat16)
    weights = torch.rand(2, 2, generator=g).to(mh.DEVICE)
    assert mh.kernel_index_dtype(A, W, expert_ids.numel()) == torch.int64
    flat = helion.Config(block_sizes=[16, 256, 128], num_warps=4, num_stages=1)
    for implementation, config in (("per_pair", None), ("flat", flat)):
        out = mh.moe_matmul(A, W, expert_ids, weights, implementation=implementation, config=config)
        mh.assert_moe_close(out, A, W, expert_ids, weights)
