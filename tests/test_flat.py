"""The flat block-aligned kernel: its routing metadata, top-k, and its configs."""

import moe_helpers as mh
from helion_moe import configs, launch, metadata

import helion
import pytest
import torch


@pytest.mark.parametrize(
    "expert_ids, num_experts, block_t",
    [
        (mh.route_uniform(100, 6, seed=2), 6, 16),
        (mh.route_zipf(257, 16, 1.5, seed=3), 16, 32),  # some experts empty
        (torch.zeros(5, dtype=torch.int64, device=mh.DEVICE), 1, 16),
        (torch.tensor([3], device=mh.DEVICE), 4, 64),
        (mh.route_top_k(torch.randn(40, 8).to(mh.DEVICE), 3)[0], 8, 16),  # [T, k] routing
    ],
)
def test_aligned_routing_puts_every_pair_once_in_a_block_of_its_expert(
    expert_ids, num_experts, block_t
):
    routing = mh.align_to_blocks(expert_ids, num_experts, block_t)
    pair_experts = expert_ids.flatten().long()
    P = pair_experts.numel()
    num_blocks = mh.max_blocks(P, num_experts, block_t)
    assert routing.sorted_pair_ids.shape == (num_blocks, block_t)
    assert routing.block_expert_ids.shape == (num_blocks,)
    assert routing.sorted_pair_ids.dtype == routing.block_expert_ids.dtype == torch.int32
    slots = routing.sorted_pair_ids.long()
    valid = slots < P
    assert ((slots == P) | valid).all(), "padding is P, nothing else"
    assert torch.equal(slots[valid].sort().values, torch.arange(P, device=slots.device))
    block_experts = routing.block_expert_ids.long()
    # each pair sits in a block of its own expert, in token order inside the expert
    row_of_slot = torch.arange(num_blocks, device=slots.device)[:, None].expand_as(slots)
    assert torch.equal(block_experts[row_of_slot[valid]], pair_experts[slots[valid]])
    for e in range(num_experts):
        pairs = slots[valid & (block_experts[:, None] == e)]
        assert torch.equal(pairs, pairs.sort().values)
    # blocks in use come first, each holds a pair, and only unused blocks have expert E
    load = mh.expert_load(expert_ids, num_experts)
    used = int(((load + block_t - 1) // block_t).sum())
    assert (block_experts[:used] < num_experts).all() and (
        block_experts[used:] == num_experts
    ).all()
    assert valid[:used].any(dim=1).all() and not valid[used:].any()
    assert torch.equal(block_experts[:used], block_experts[:used].sort().values)


def _assert_metadata_kernels_match_the_reference(expert_ids, num_experts, block_t):
    routing = mh.align_to_blocks(expert_ids, num_experts, block_t)
    reference = mh.align_to_blocks_reference(expert_ids, num_experts, block_t)
    assert torch.equal(routing.sorted_pair_ids, reference.sorted_pair_ids)
    assert torch.equal(routing.block_expert_ids, reference.block_expert_ids)
    assert routing.all_placed.tolist() == reference.all_placed.tolist() == [1]


@pytest.mark.parametrize(
    "num_pairs, num_experts, block_t, skew",
    [
        (1, 1, 16, 0.0),
        (2, 8, 16, 0.0),
        (128, 5, 16, 0.0),  # exactly one chunk of the count and place kernels
        (129, 5, 32, 2.0),  # a second chunk of one pair
        (1000, 64, 16, 1.2),  # many chunks, experts left empty
        (700, 130, 64, 0.0),  # more experts than one expert tile of the count kernel
        (3000, 3, 128, 0.4),  # more chunks than one tile of place_pairs' loop over chunks
        (600, 256, 16, 1.0),  # MAX_METADATA_EXPERTS
    ],
)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_metadata_kernels_sort_as_the_torch_reference_does(
    num_pairs, num_experts, block_t, skew, dtype
):
    expert_ids = mh.route_zipf(num_pairs, num_experts, skew, seed=num_pairs).to(dtype)
    _assert_metadata_kernels_match_the_reference(expert_ids, num_experts, block_t)


@pytest.mark.parametrize(
    "num_pairs, num_experts, block_t",
    [(3000, 3, 128), (5000, 256, 16), (20000, 40, 64)],
)
def test_metadata_kernels_sort_right_with_the_gpus_chunks(
    num_pairs, num_experts, block_t, monkeypatch
):
    # On a GPU the chunks aim at METADATA_PROGRAMS = 256 programs, so they are smaller: here
    # one block per chunk (3000 pairs in blocks of 128), and many chunks of a few steps.
    monkeypatch.setattr(metadata, "METADATA_PROGRAMS", 256)
    expert_ids = mh.route_zipf(num_pairs, num_experts, 1.0, seed=num_experts)
    _assert_metadata_kernels_match_the_reference(expert_ids, num_experts, block_t)


def test_metadata_chunks_are_powers_of_two_holding_whole_blocks():
    for num_slots in (16, 1000, 10**6):
        for block_t in (16, 128):
            chunk = mh.metadata_chunk(num_slots, block_t)
            assert chunk & (chunk - 1) == 0 and chunk % block_t == 0
            assert mh.METADATA_STEP <= chunk <= max(block_t, mh.MAX_METADATA_CHUNK)
            assert mh.num_metadata_chunks(num_slots, chunk) * chunk >= num_slots


def test_metadata_kernels_sort_top_k_routing_as_the_torch_reference_does():
    expert_ids, _ = mh.route_top_k(torch.randn(300, 16).to(mh.DEVICE), 4)  # [T, k]
    _assert_metadata_kernels_match_the_reference(expert_ids, 16, 32)


def test_metadata_kernels_leave_out_expert_ids_out_of_range():
    # 2**32 + 1 and 2**31 would read as 1 and as negative in int32
    expert_ids = torch.tensor([0, 3, -1, 1, 2**32 + 1, 2, 1, 2**31, 7], device=mh.DEVICE)
    valid = (expert_ids >= 0) & (expert_ids < 3)
    num_pairs, num_valid = expert_ids.numel(), int(valid.sum())
    routing = mh.align_to_blocks(expert_ids, 3, 16)
    # renumber the placed pairs 0, 1, 2... as the reference numbers the valid ones, and padding
    renumbered = torch.full((num_pairs + 1,), num_valid, device=mh.DEVICE)
    renumbered[:num_pairs][valid] = torch.arange(num_valid, device=mh.DEVICE)
    placed = renumbered[routing.sorted_pair_ids.long()]
    reference = mh.align_to_blocks_reference(expert_ids[valid], 3, 16)
    assert torch.equal(placed, reference.sorted_pair_ids.long())
    assert torch.equal(routing.block_expert_ids, reference.block_expert_ids)
    assert routing.all_placed.tolist() == [0]


@pytest.mark.parametrize(
    "expert_ids, num_experts, error, message",
    [
        (torch.zeros(4), 3, TypeError, "expert_ids must be an integer tensor"),
        (torch.zeros(4, dtype=torch.int64), 0, ValueError, "num_experts .* is 0"),
        (torch.zeros(4, dtype=torch.int64), 257, ValueError, "takes 1 to 256 experts"),
    ],
)
def test_metadata_refuses_what_its_kernels_cannot_take(expert_ids, num_experts, error, message):
    with pytest.raises(error, match=message):
        mh.align_to_blocks(expert_ids.to(mh.DEVICE), num_experts, 16)


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


def test_the_token_block_is_twice_the_average_pairs_per_expert():
    # (pairs, experts) -> block: 16 rows at most 8 pairs per expert, then doubling, up to 128
    cases = {(8, 256): 16, (64, 8): 16, (65, 8): 32, (128, 8): 32, (4096, 128): 64}
    cases |= {(4097, 128): 128, (32768, 256): 128, (1, 1): 16, (10**6, 8): 128}
    for (pairs, experts), block_t in cases.items():
        assert mh.flat_token_block(pairs, experts) == block_t, (pairs, experts)


def test_default_configs_follow_the_pairs_per_expert():
    for dtype in mh.SUPPORTED_DTYPES:
        for pairs, block_t in ((8, 16), (128, 32), (256, 64), (8 * 64, 128)):
            config = mh.default_config("flat", dtype, num_pairs=pairs, K=64, N=64, E=8)
            assert config == mh.FLAT_CONFIGS[dtype][block_t]
            assert config["block_sizes"][0] == block_t
        assert mh.default_config("masked_store", dtype, 8, 64, 64, 8) == mh.DEFAULT_CONFIGS[dtype]


def test_tuned_configs_are_saved_and_then_preferred(tmp_path, monkeypatch):
    monkeypatch.setattr(configs, "TUNED_CONFIGS_PATH", tmp_path / "tuned.json")
    tuned = helion.Config(block_sizes=[32, 64, 32], num_warps=4, num_stages=2)
    mh.save_tuned_config(mh.tuned_config_key(torch.bfloat16, 512, 64, 64, 8), tuned)
    assert mh.default_config("flat", torch.bfloat16, 512, 64, 64, 8) == tuned
    other = mh.default_config("flat", torch.bfloat16, 1024, 64, 64, 8)
    assert other == mh.FLAT_CONFIGS[torch.bfloat16][128]


def test_committed_tuned_configs_are_valid_flat_configs():
    for key, config in mh.load_tuned_configs().items():
        block_t, kernel_config = mh.split_token_block(config)
        assert block_t >= 16 and len(kernel_config["block_sizes"]) == 2, key


def test_flat_candidates_compute_the_moe_matmul():
    A = torch.randn(48, 32).to(mh.DEVICE, torch.bfloat16)
    W = torch.randn(4, 32, 48).to(mh.DEVICE, torch.bfloat16)
    expert_ids = mh.route_zipf(48, 4, 1.2, seed=0)
    config = helion.Config(block_sizes=[16, 16, 16], num_warps=4, num_stages=1)
    for name, fn in mh.flat_candidates(A, W, expert_ids, config).items():
        if name.startswith(("flat kernel", "flat metadata +", "moe_matmul", "grouped_mm p")):
            mh.assert_moe_close(fn(), A, W, expert_ids)


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
