"""The MoE layer's experts (moe_experts): fused gate_up, down, combine, in both weight layouts."""

import moe_helpers as mh
from helion_moe import configs as configs_module
from helion_moe import layer

import itertools
import random

import helion
import pytest
import torch


def random_layer_case(case: int):
    """A small random layer, the same on every machine for a given ``case``: T = 1 and E = 1
    among the sizes, K, I and N not multiples of 16, Zipf routings that leave experts empty,
    top-1 to top-3, three dtypes, both layouts."""
    rng = random.Random(case)
    T = rng.choice([1, 2, 9, 40])
    K, I, N = (rng.choice(sizes) for sizes in ([8, 20, 48], [8, 24, 40], [16, 20, 48]))  # noqa: E741
    E = rng.choice([1, 3, 5, 8])
    top_k = rng.choice([k for k in (1, 2, 3) if k <= E])
    ids = mh.route_zipf_top_k(T, E, rng.choice([0.0, 1.5]), top_k, seed=case)
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
    g = torch.Generator().manual_seed(case)
    A = torch.randn(T, K, generator=g).to(mh.DEVICE, dtype)
    W_gate_up = (torch.randn(E, K, 2 * I, generator=g) / K**0.5).to(mh.DEVICE, dtype)
    W_down = (torch.randn(E, I, N, generator=g) / I**0.5).to(mh.DEVICE, dtype)
    if rng.random() < 0.5:  # transformers' layout: [E, N, K] storage, seen as [E, K, N]
        W_gate_up = W_gate_up.transpose(1, 2).contiguous().transpose(1, 2)
        W_down = W_down.transpose(1, 2).contiguous().transpose(1, 2)
    weights = torch.rand(T, top_k, generator=g).to(mh.DEVICE)
    return A, W_gate_up, W_down, ids.to(mh.DEVICE), weights, rng.choice(mh.ACTIVATIONS)


@pytest.mark.parametrize("case", range(16))
def test_moe_experts_matches_the_float64_reference_on_random_cases(case):
    A, W_gate_up, W_down, ids, weights, activation = random_layer_case(case)
    inputs = [t.clone() for t in (A, W_gate_up, W_down, ids, weights)]
    out = mh.moe_experts(A, W_gate_up, W_down, ids, weights, activation=activation)
    mh.assert_experts_close(out, A, W_gate_up, W_down, ids, weights, activation)
    for before, after in zip(inputs, (A, W_gate_up, W_down, ids, weights), strict=True):
        assert torch.equal(before, after), "moe_experts modified an input"


def test_random_layer_cases_cover_both_layouts_and_both_activations():
    cases = [random_layer_case(case) for case in range(16)]
    assert {c[1].is_contiguous() for c in cases} == {True, False}
    assert {c[5] for c in cases} == set(mh.ACTIVATIONS)
    assert {c[0].shape[0] for c in cases} >= {1}
    assert {c[1].shape[0] for c in cases} >= {1}


def test_both_layouts_give_the_same_bits_and_are_read_without_a_copy():
    A, W_gate_up, W_down, ids, weights, _ = random_layer_case(3)
    nk_gate_up = W_gate_up.transpose(1, 2).contiguous()  # transformers' gate_up_proj
    nk_down = W_down.transpose(1, 2).contiguous()
    stored, nk_layout = mh.expert_weights_in_place(nk_gate_up.transpose(1, 2))
    assert nk_layout and stored.data_ptr() == nk_gate_up.data_ptr()
    args = (A, W_gate_up.contiguous(), W_down.contiguous(), ids, weights)
    expected = mh.moe_experts(*args)
    actual = mh.moe_experts(A, nk_gate_up.transpose(1, 2), nk_down.transpose(1, 2), ids, weights)
    assert torch.equal(expected, actual)


def test_moe_matmul_reads_the_nn_linear_layout_in_place():
    A = torch.randn(9, 24, device=mh.DEVICE)
    W_nk = torch.randn(3, 40, 24, device=mh.DEVICE)  # [E, N, K]
    ids = mh.route_uniform(9, 3, seed=1)
    for implementation in ("flat", "per_pair"):
        out = mh.moe_matmul(A, W_nk.transpose(1, 2), ids, implementation=implementation)
        mh.assert_moe_close(out, A, W_nk.transpose(1, 2), ids)


def test_the_fused_kernel_applies_the_activation_to_the_gate_half_only():
    # With the up half's weights zero the output is zero whatever the activation does, and
    # with the gate half's zero it is act(0) * up = 0: only a swap of the halves passes both.
    A = torch.randn(4, 16, device=mh.DEVICE)
    W_gate_up = torch.randn(2, 16, 32, device=mh.DEVICE)
    W_down = torch.randn(2, 16, 8, device=mh.DEVICE)
    ids = torch.tensor([0, 1, 0, 1], device=mh.DEVICE)
    W_up_zero = W_gate_up.clone()
    W_up_zero[:, :, 16:] = 0
    assert mh.moe_experts(A, W_up_zero, W_down, ids).abs().max() == 0
    out = mh.moe_experts(A, W_gate_up, W_down, ids)
    mh.assert_experts_close(out, A, W_gate_up, W_down, ids)


def test_moe_experts_is_deterministic_and_weighs_each_pair():
    A, W_gate_up, W_down, ids, weights, activation = random_layer_case(5)
    first = mh.moe_experts(A, W_gate_up, W_down, ids, weights, activation=activation)
    again = mh.moe_experts(A, W_gate_up, W_down, ids, weights, activation=activation)
    assert torch.equal(first, again)
    doubled = mh.moe_experts(A, W_gate_up, W_down, ids, 2 * weights, activation=activation)
    torch.testing.assert_close(doubled.float(), 2 * first.float(), rtol=1e-2, atol=1e-2)


def test_moe_experts_takes_explicit_configs_and_refuses_mismatched_token_blocks():
    A, W_gate_up, W_down, ids, weights, _ = random_layer_case(1)
    small = helion.Config(block_sizes=[16, 16, 16], num_warps=4, num_stages=1)
    out = mh.moe_experts(A, W_gate_up, W_down, ids, weights, configs=(small, small))
    mh.assert_experts_close(out, A, W_gate_up, W_down, ids, weights)
    large = helion.Config(block_sizes=[32, 16, 16], num_warps=4, num_stages=1)
    with pytest.raises(ValueError, match="share their token block"):
        mh.moe_experts(A, W_gate_up, W_down, ids, weights, configs=(small, large))
    with pytest.raises(TypeError, match="configs must be None or a"):
        mh.moe_experts(A, W_gate_up, W_down, ids, weights, configs=small)


def test_the_prefill_configs_launch_in_l2_groups_of_whole_expert_runs(monkeypatch):
    # 600 pairs over 3 experts in token blocks of 128 rows, each expert's run padded to a group
    # of 4 blocks (these experts are small: the padding's threshold lowered to 0), with 2 N
    # tiles in each GEMM and ragged edges (I = 200, H = 300)
    monkeypatch.setattr(configs_module, "RUN_PADDING_MIN_EXPERT_BYTES", 0)
    T, H, I, E, k = 300, 300, 200, 3, 2  # noqa: E741
    g = torch.Generator().manual_seed(5)
    A = torch.randn(T, H, generator=g).to(mh.DEVICE, torch.bfloat16)
    W_gate_up = (torch.randn(E, H, 2 * I, generator=g) / H**0.5).to(mh.DEVICE, torch.bfloat16)
    W_down = (torch.randn(E, I, H, generator=g) / I**0.5).to(mh.DEVICE, torch.bfloat16)
    ids, weights = mh.route_top_k(mh.gating_logits(A.float(), E, seed=5), k)
    block_t, gate_up_config, down_config = mh.layer_configs(None, torch.bfloat16, T * k, E)
    assert block_t == 128 and mh.flat_run_blocks(W_gate_up, gate_up_config, down_config) == 4
    out = mh.moe_experts(A, W_gate_up, W_down, ids, weights)
    mh.assert_experts_close(out, A, W_gate_up, W_down, ids, weights)
    # the same pairs in the same blocks, in other places: the same bits as ungrouped
    configs = mh.flat_layer_configs(torch.bfloat16, T * k, E)
    ungrouped = tuple(helion.Config(**{**c.config, "l2_groupings": [1]}) for c in configs)
    assert mh.flat_run_blocks(W_gate_up, *ungrouped) == 1
    assert torch.equal(out, mh.moe_experts(A, W_gate_up, W_down, ids, weights, configs=ungrouped))


def test_runs_are_padded_to_whole_l2_groups_for_large_experts_only():
    configs = mh.flat_layer_configs(torch.bfloat16, 4096 * 8, 128)  # groups of 4 blocks
    gate_up = {  # one expert's gate_up weights: [H, 2I]
        "Qwen3-Next-80B-A3B": (2048, 1024),  # 4.2 MB in bf16
        "Qwen3-30B-A3B": (2048, 1536),  # 6.3 MB
        "Qwen3-235B-A22B": (4096, 3072),  # 25.2 MB; 12.6 in e4m3
        "DeepSeek-V3": (7168, 4096),  # 58.7 MB; 29.4 in e4m3
    }
    runs = {
        (name, dtype): mh.flat_run_blocks(
            torch.empty(2, *shape, dtype=dtype, device="meta"), *configs
        )
        for name, shape in gate_up.items()
        for dtype in (torch.bfloat16, torch.float8_e4m3fn)
    }
    assert {key for key, run_blocks in runs.items() if run_blocks == 4} == {
        ("Qwen3-235B-A22B", torch.bfloat16),
        ("Qwen3-235B-A22B", torch.float8_e4m3fn),
        ("DeepSeek-V3", torch.bfloat16),
        ("DeepSeek-V3", torch.float8_e4m3fn),
    }
    assert set(runs.values()) == {1, 4}


def half_tail_case(nk_layout: bool):
    """300 pairs over 4 experts in 128-row blocks: expert 0's 200 fill one block and 72 rows of
    the next, experts 1 and 2 (40 and 60 pairs) less than half of one block, expert 3 none."""
    T, K, I, N, E = 150, 24, 20, 16, 4  # noqa: E741
    g = torch.Generator().manual_seed(7)
    experts = torch.tensor([0] * 200 + [1] * 40 + [2] * 60)
    ids = experts[torch.randperm(2 * T, generator=g)].view(T, 2).to(mh.DEVICE)
    A = torch.randn(T, K, generator=g).to(mh.DEVICE)
    W_gate_up = (torch.randn(E, K, 2 * I, generator=g) / K**0.5).to(mh.DEVICE)
    W_down = (torch.randn(E, I, N, generator=g) / I**0.5).to(mh.DEVICE)
    if nk_layout:
        W_gate_up = W_gate_up.transpose(1, 2).contiguous().transpose(1, 2)
        W_down = W_down.transpose(1, 2).contiguous().transpose(1, 2)
    biases = (torch.randn(E, 2 * I, generator=g), torch.randn(E, N, generator=g))
    weights = torch.rand(T, 2, generator=g).to(mh.DEVICE)
    return A, W_gate_up, W_down, ids, weights, *(b.to(mh.DEVICE) for b in biases)


@pytest.mark.parametrize("nk_layout, interleaved", [(False, False), (True, False), (False, True)])
def test_half_height_tails_give_the_same_bits_as_full_blocks(nk_layout, interleaved, monkeypatch):
    A, W_gate_up, W_down, ids, weights, gate_up_bias, down_bias = half_tail_case(nk_layout)
    routing = mh.align_to_blocks(ids, 4, 128)
    used = routing.block_expert_ids < 4
    tails = (routing.sorted_pair_ids[:, 64] >= ids.numel()) & used
    assert int(tails.sum()) == 2 and int(used.sum()) == 4 and mh.flat_half_tails(128)
    configs = (mh.GATE_UP_CONFIGS[torch.float32][128], mh.FLAT_CONFIGS[torch.float32][128])
    extras = dict(gate_up_bias=gate_up_bias, down_bias=down_bias, interleaved=interleaved)
    grad = torch.randn(A.shape[0], W_down.shape[2], device=mh.DEVICE)
    runs = []
    for flag in (False, True):
        monkeypatch.setattr(layer, "flat_half_tails", lambda *_, f=flag: f)
        A_run = A.clone().requires_grad_()  # the forward also stores gate and up
        out = mh.moe_experts(A_run, W_gate_up, W_down, ids, weights, configs=configs, **extras)
        out.backward(grad)
        runs.append((out.detach(), A_run.grad))
    mh.assert_experts_close(runs[1][0], A, W_gate_up, W_down, ids, weights, **extras)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_half_tails_compile_a_second_half_height_product_into_both_kernels():
    A, W_gate_up, _, ids, weights, _, _ = half_tail_case(False)
    routing = mh.align_to_blocks(ids, 4, 128)
    down_args = routing.kernel_args(A, W_gate_up, weights)
    gate_up_args = (A, W_gate_up, routing.sorted_pair_ids, routing.block_expert_ids)
    gate_up_args += (A.new_empty(0, 2, 20), A.new_empty(0), 2, False, False, False)
    gate_up_args += (tuple(mh.as_gated_activation("silu")), False)
    slab_args = (*gate_up_args[:8], True, *gate_up_args[9:])  # interleaved [E, K, 2I]
    kernels = ((mh.moe_matmul_flat, down_args, 1, 2), (mh.moe_gate_up_flat, gate_up_args, 2, 4))
    kernels += ((mh.moe_gate_up_flat, slab_args, 1, 1),)  # one product, no half-height twin
    config = mh.split_token_block(mh.FLAT_CONFIGS[torch.float32][128])[1]
    for kernel, args, *dots in kernels:
        for flag in (False, True):
            code = mh.triton_code(kernel, (*args, flag), config)
            assert code.count("tl.dot(") == dots[flag], (kernel.fn.__name__, flag)
            half = "64 * sorted_pair_ids_stride_1" in code  # reads the second half's first id
            assert half == (flag and dots[1] > dots[0])


PER_PAIR = (mh.PER_PAIR_CONFIGS[torch.float32], mh.PER_PAIR_CONFIGS[torch.float32])


@pytest.mark.parametrize("case", [2, 7, 12])
def test_the_per_pair_layer_matches_the_float64_reference(case):
    A, W_gate_up, W_down, ids, weights, activation = random_layer_case(case)
    out = mh.moe_experts(
        A, W_gate_up, W_down, ids, weights, activation=activation, configs=PER_PAIR
    )
    mh.assert_experts_close(out, A, W_gate_up, W_down, ids, weights, activation)


def test_a_handful_of_pairs_runs_per_pair_and_more_run_flat(monkeypatch):
    calls = []
    per_pair = mh.moe_experts_per_pair
    monkeypatch.setattr(layer, "moe_experts_per_pair", lambda *a: calls.append(1) or per_pair(*a))
    monkeypatch.setattr(layer, "host_paced", lambda *a: False)  # no graph replay: the path itself
    g = torch.Generator().manual_seed(0)
    W_gate_up = torch.randn(8, 16, 32, generator=g).to(mh.DEVICE)
    W_down = torch.randn(8, 16, 16, generator=g).to(mh.DEVICE)
    most = mh.LAYER_PER_PAIR_MAX_PAIRS[mh.DEVICE.type]
    for T, expected in ((most // 2, 1), (most // 2 + 1, 0)):  # top-2: the bound, then 2 more
        A = torch.randn(T, 16, generator=g).to(mh.DEVICE)
        ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(T)]).to(mh.DEVICE)
        weights = torch.ones(T, 2, device=mh.DEVICE)
        calls.clear()
        out = mh.moe_experts(A, W_gate_up, W_down, ids, weights)
        mh.assert_experts_close(out, A, W_gate_up, W_down, ids, weights)
        assert len(calls) == expected, T


def test_the_layer_runs_per_pair_up_to_a_byte_bound():
    # one expert: [16, 32] + [16, 16] float32 = 3072 bytes
    W_gate_up = torch.empty(8, 16, 32, device="meta")
    W_down = torch.empty(8, 16, 16, device="meta")
    expert_bytes = 3072
    most = min(
        mh.LAYER_PER_PAIR_MAX_PAIRS[mh.DEVICE.type], mh.LAYER_PER_PAIR_MAX_BYTES // expert_bytes
    )
    assert mh.layer_path(most, W_gate_up, W_down) == "per_pair"
    assert mh.layer_path(most + 1, W_gate_up, W_down) == "flat"
    big_gate_up = torch.empty(8, 4096, 2 * 14336, dtype=torch.bfloat16, device="meta")
    big_down = torch.empty(8, 14336, 4096, dtype=torch.bfloat16, device="meta")  # 352 MB each
    assert mh.layer_path(3, big_gate_up, big_down) == "per_pair"
    assert mh.layer_path(4, big_gate_up, big_down) == "flat"


def test_the_per_pair_layer_names_a_bad_expert_id_and_refuses_a_mixed_config():
    A, W_gate_up, W_down, ids, weights, _ = random_layer_case(2)
    bad = ids.clone()
    bad.view(-1)[0] = W_down.shape[0]
    with pytest.raises(ValueError, match="expert_ids"):
        mh.moe_experts(A, W_gate_up, W_down, bad, weights, configs=PER_PAIR, expert_id_check="host")
    flat = helion.Config(block_sizes=[16, 16, 16], num_warps=4, num_stages=1)
    with pytest.raises(ValueError, match="share their token block"):
        mh.moe_experts(A, W_gate_up, W_down, ids, weights, configs=(PER_PAIR[0], flat))


@pytest.mark.parametrize("num_pairs", [100_000, 150_000])
def test_the_dh_step_takes_64_bit_offsets_where_its_tensors_need_them(num_pairs, monkeypatch):
    # Mixtral-8x7B's down weights (I = 14336 > N = 4096), on meta tensors: the dh GEMM's [P, I]
    # output passes int32's range at 150,000 pairs, the pass's [P, 2, I] already at 100,000
    launched = []

    def run_kernel(kernel, args, config, index_dtype=torch.int32):
        launched.append((kernel, index_dtype))
        return torch.empty(num_pairs, 14336, dtype=torch.bfloat16, device="meta")

    monkeypatch.setattr(layer, "run_kernel", run_kernel)
    routing = layer.BlockAlignedRouting(
        torch.empty(num_pairs // 128 + 8, 128, dtype=torch.int32, device="meta"),
        torch.empty(num_pairs // 128 + 8, dtype=torch.int32, device="meta"),
        torch.ones(1, dtype=torch.int32, device="meta"),
    )
    layer.down_input_backward(
        torch.empty(num_pairs // 2, 4096, dtype=torch.bfloat16, device="meta"),
        torch.empty(8, 14336, 4096, dtype=torch.bfloat16, device="meta"),
        torch.empty(num_pairs, 2, 14336, dtype=torch.bfloat16, device="meta"),
        routing,
        torch.empty(num_pairs // 2, 2, device="meta"),
        mh.GatedActivation(),
    )
    gemm = torch.int64 if num_pairs * 14336 > mh.INT32_MAX else torch.int32
    assert launched == [
        (mh.moe_matmul_flat, gemm),
        (mh.gated_activation_backward, torch.int64),
    ]


def test_the_backward_of_a_per_pair_forward_runs_the_flat_kernels():
    A, W_gate_up, W_down, ids, weights, activation = random_layer_case(2)
    grads = []
    for configs in (PER_PAIR, None):
        leaves = [t.float().clone().requires_grad_() for t in (A, W_gate_up, W_down, weights)]
        out = mh.moe_experts(
            leaves[0], leaves[1], leaves[2], ids, leaves[3], activation=activation, configs=configs
        )
        out.sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for per_pair, flat in zip(*grads, strict=True):
        assert torch.equal(per_pair, flat)


def test_moe_experts_empty_and_degenerate_sizes():
    W_gate_up, W_down = (
        torch.randn(2, 8, 16, device=mh.DEVICE),
        torch.randn(2, 8, 12, device=mh.DEVICE),
    )
    empty = mh.moe_experts(
        torch.randn(0, 8, device=mh.DEVICE),
        W_gate_up,
        W_down,
        torch.zeros(0, dtype=torch.long, device=mh.DEVICE),
    )
    assert empty.shape == (0, 12)
    no_hidden = mh.moe_experts(
        torch.randn(3, 8, device=mh.DEVICE),
        torch.randn(2, 8, 0, device=mh.DEVICE),
        torch.randn(2, 0, 12, device=mh.DEVICE),
        torch.tensor([0, 1, 1], device=mh.DEVICE),
    )
    assert no_hidden.shape == (3, 12) and no_hidden.abs().max() == 0
    A = torch.randn(3, 8, device=mh.DEVICE, requires_grad=True)
    W_down_empty = torch.randn(2, 8, 0, device=mh.DEVICE, requires_grad=True)
    no_output = mh.moe_experts(A, W_gate_up, W_down_empty, torch.tensor([0, 1, 1]).to(mh.DEVICE))
    assert no_output.shape == (3, 0)
    no_output.sum().backward()  # every gradient zero, or empty
    assert not A.grad.any() and W_down_empty.grad.shape == (2, 8, 0)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (
            {"W_down": torch.randn(2, 7, 12, device=mh.DEVICE)},
            ValueError,
            r"W_down must be \[E, I, N\]",
        ),
        (
            {"W_down": torch.randn(3, 8, 12, device=mh.DEVICE)},
            ValueError,
            r"W_down must be \[E, I, N\]",
        ),
        ({"W_down": torch.randn(2, 8, 12, device=mh.DEVICE).half()}, TypeError, "W_down has dtype"),
        ({"W_down": "weights"}, TypeError, "W_down must be a torch.Tensor"),
        ({"W_gate_up": torch.randn(2, 8, 15, device=mh.DEVICE)}, ValueError, "must be even"),
        ({"activation": "relu"}, ValueError, "activation must be one of"),
        (
            {"expert_ids": torch.tensor([0, 2, 1], device=mh.DEVICE)},
            ValueError,
            "expert_ids must lie in",
        ),
        ({"expert_ids": torch.tensor([0.0, 1.0, 1.0], device=mh.DEVICE)}, TypeError, "expert_ids"),
        ({"A": torch.randn(3, 8, device="meta")}, ValueError, "A is on meta"),
    ],
)
def test_moe_experts_names_the_bad_argument(change, error, match):
    args = {
        "A": torch.randn(3, 8, device=mh.DEVICE),
        "W_gate_up": torch.randn(2, 8, 16, device=mh.DEVICE),
        "W_down": torch.randn(2, 8, 12, device=mh.DEVICE),
        "expert_ids": torch.tensor([0, 1, 1], device=mh.DEVICE),
        "activation": "silu",
    }
    args.update(change)
    with pytest.raises(error, match=match):  # "host": a bad id raises on a GPU too
        mh.moe_experts(**args, expert_id_check="host")


def test_weights_that_require_grad_go_through_the_backward():
    W_down = torch.randn(2, 8, 12, requires_grad=True, device=mh.DEVICE)
    args = (torch.randn(3, 8, device=mh.DEVICE), torch.randn(2, 8, 16, device=mh.DEVICE))
    ids = torch.tensor([0, 1, 1], device=mh.DEVICE)
    assert mh.moe_experts(*args, W_down, ids).grad_fn is not None
    with torch.no_grad():
        assert not mh.moe_experts(*args, W_down, ids).requires_grad


def test_the_unfused_baseline_computes_the_same_layer():
    A, W_gate_up, W_down, ids, weights, _ = random_layer_case(6)
    ids, weights = mh.as_top_k(ids), mh.as_top_k(weights)
    out = mh.unfused_experts(A, W_gate_up, W_down, ids, weights)
    mh.assert_experts_close(out, A, W_gate_up, W_down, ids, weights)


# gpt-oss's, a clamped SwiGLU, and a clamped and shifted GELU: gate and up values of about
# 5 x RMS reach past each limit, so every clamp both holds and lets values through
GATED = [
    mh.GPT_OSS_ACTIVATION,
    mh.GatedActivation("silu", limit=2.0),
    mh.GatedActivation("gelu_tanh", limit=1.5, up_shift=0.5),
]


FLAT = (mh.GATE_UP_CONFIGS[torch.float32][16], mh.FLAT_CONFIGS[torch.float32][16])


def gated_case(seed: int, dtype: torch.dtype = torch.float32):
    """A layer whose gate and up values spread past the activations' limits."""
    T, K, I, N, E, top_k = 11, 16, 24, 20, 5, 2  # noqa: E741
    g = torch.Generator().manual_seed(seed)
    A = (5 * torch.randn(T, K, generator=g)).to(mh.DEVICE, dtype)
    W_gate_up = (torch.randn(E, K, 2 * I, generator=g) / K**0.5).to(mh.DEVICE, dtype)
    W_down = (torch.randn(E, I, N, generator=g) / I**0.5).to(mh.DEVICE, dtype)
    ids = mh.route_zipf_top_k(T, E, 1.0, top_k, seed=seed).to(mh.DEVICE)
    weights = torch.rand(T, top_k, generator=g).to(mh.DEVICE)
    return A, W_gate_up, W_down, ids, weights


@pytest.mark.parametrize("activation", GATED, ids=lambda a: f"{a.name}-{a.limit}")
@pytest.mark.parametrize("path", ["flat", "per_pair"])
def test_clamped_scaled_and_shifted_activations_match_the_float64_reference(activation, path):
    A, W_gate_up, W_down, ids, weights = gated_case(7)
    gate = torch.einsum("tk,tkn->tn", A, W_gate_up[ids[:, 0]])[:, : W_down.shape[1]]
    assert (gate > activation.limit).any() and (gate < activation.limit).any()
    configs = PER_PAIR if path == "per_pair" else FLAT
    out = mh.moe_experts(*gated_case(7), activation=activation, configs=configs)
    mh.assert_experts_close(out, A, W_gate_up, W_down, ids, weights, activation)
    plain = mh.moe_experts(A, W_gate_up, W_down, ids, weights, configs=configs)
    assert not torch.allclose(out, plain, rtol=0.1), "the clamp, scale or shift did nothing"


@pytest.mark.parametrize(
    "activation, message",
    [
        ("relu", "activation must be one of"),
        (mh.GatedActivation("swish"), "activation must be one of"),
        (mh.GatedActivation("gelu_tanh", alpha=1.702), "alpha scales SiLU's sigmoid only"),
        (mh.GatedActivation("silu", limit=0.0), "limit > 0"),
        (mh.GatedActivation("silu", up_shift=float("nan")), "finite"),
        (("silu", 1.702, 7.0, 1.0), "activation must be one of"),
    ],
)
def test_a_bad_activation_is_refused_naming_it(activation, message):
    with pytest.raises(ValueError, match=message):
        mh.moe_experts(*gated_case(0), activation=activation)


def seed_far_from_limits(activation: mh.GatedActivation) -> int:
    """A seed of ``gated_case`` whose gate and up values all lie at least 0.3% of the limit away
    from it: where a GPU's tf32 dot rounds a value across the limit, the clamp's gradient jumps.
    """
    for seed in range(100):
        A, W_gate_up, W_down, ids, _ = gated_case(seed)
        if activation.limit == float("inf"):
            return seed
        I = W_down.shape[1]  # noqa: E741
        projected = torch.einsum("tk,tjkn->tjn", A.double(), W_gate_up.double()[ids])
        values = torch.cat([projected[..., :I], projected[..., I:].abs()])
        if ((values - activation.limit).abs() > 0.003 * activation.limit).all():
            return seed
    raise AssertionError(f"no seed keeps every gate and up away from {activation.limit}")


# A clamp's derivative jumps at the limit: where bf16 rounds a gate onto the limit, its
# gradient flips against float64's. So bf16 runs the scale and shift without a clamp.
@pytest.mark.parametrize(
    "activation, dtype",
    [(a, torch.float32) for a in GATED]
    + [(mh.GatedActivation("silu", alpha=1.702, up_shift=1.0), torch.bfloat16)],
    ids=str,
)
def test_gradients_through_gated_activations_match_float64_autograd(activation, dtype):
    A, W_gate_up, W_down, ids, weights = gated_case(seed_far_from_limits(activation), dtype)
    grad = torch.randn(A.shape[0], W_down.shape[2], generator=torch.Generator().manual_seed(3))
    grad = grad.to(mh.DEVICE, dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (A, W_gate_up, W_down, weights)]
    out = mh.moe_experts(*leaves[:3], ids, leaves[3], activation=activation, configs=FLAT)
    out.backward(grad)
    reference = [t.detach().double().requires_grad_() for t in (A, W_gate_up, W_down, weights)]
    expected = mh.moe_experts_gather_reference(*reference[:3], ids, reference[3], activation)
    expected.backward(grad.double())
    names = ("dA", "dW_gate_up", "dW_down", "d combine_weights")
    for name, leaf, ref in zip(names, leaves, reference, strict=True):
        mh.assert_grad_close(leaf.grad, ref.grad, dtype, name)


def test_bf16_layer_gradients_pass_their_tolerance_and_a_wrong_pair_does_not():
    # 64 tokens, top-1 of 8 experts: an element of the kernels' bf16 gradients here lies outside
    # the forward's 4 rounding units, inside the gradients' 16 (GRADIENT_TOLERANCES' comment)
    T, K, I, N, E = 64, 100, 40, 40, 8  # noqa: E741
    g = torch.Generator().manual_seed(5)
    ids = torch.stack([torch.randperm(E, generator=g)[:1] for _ in range(T)]).to(mh.DEVICE)
    A = torch.randn(T, K, generator=g)
    W_gate_up, W_down = (
        torch.randn(E, K, 2 * I, generator=g) / K**0.5,
        torch.randn(E, I, N, generator=g) / 7,
    )
    weights = torch.rand(T, 1, generator=g)
    grad = torch.randn(T, N, generator=g).to(mh.DEVICE, torch.bfloat16)
    inputs = [t.to(mh.DEVICE, torch.bfloat16) for t in (A, W_gate_up, W_down)]
    leaves = [t.requires_grad_() for t in (*inputs, weights.to(mh.DEVICE))]
    mh.moe_experts(*leaves[:3], ids, leaves[3]).backward(grad)
    reference = [t.detach().double().requires_grad_() for t in leaves]
    expected = mh.moe_experts_gather_reference(*reference[:3], ids, reference[3])
    expected.backward(grad.double())
    names = ("dA", "dW_gate_up", "dW_down", "d combine_weights")
    past_forward_tolerance = False
    for name, leaf, ref in zip(names, leaves, reference, strict=True):
        mh.assert_grad_close(leaf.grad, ref.grad, torch.bfloat16, name)
        bound = mh.TOLERANCES[torch.bfloat16] * (ref.grad.abs() + ref.grad.pow(2).mean().sqrt())
        past_forward_tolerance |= bool(((leaf.grad.double() - ref.grad).abs() > bound).any())
    assert past_forward_tolerance, "every gradient within the forward's tolerance: a weaker case"
    wrong = leaves[0].grad.clone()
    wrong[9] = 0  # a token whose pairs were dropped from the backward
    with pytest.raises(AssertionError, match=r"dA: .* outside the torch\.bfloat16 tolerance"):
        mh.assert_grad_close(wrong, reference[0].grad, torch.bfloat16, "dA")


def biased_case(seed: int, nk_layout: bool, dtype: torch.dtype = torch.float32):
    """``gated_case`` with random biases of both GEMMs, weights in either layout."""
    A, W_gate_up, W_down, ids, weights = gated_case(seed, dtype)
    E, _, N2 = W_gate_up.shape
    g = torch.Generator().manual_seed(seed + 50)
    gate_up_bias = torch.randn(E, N2, generator=g).to(mh.DEVICE, dtype)
    down_bias = torch.randn(E, W_down.shape[2], generator=g).to(mh.DEVICE, dtype)
    if nk_layout:  # stored [E, N, K] as transformers does, seen as [E, K, N]
        W_gate_up = W_gate_up.transpose(1, 2).contiguous().transpose(1, 2)
        W_down = W_down.transpose(1, 2).contiguous().transpose(1, 2)
    return A, W_gate_up, W_down, ids, weights, gate_up_bias, down_bias


BIASED_CASES = [
    (path, nk_layout, interleaved, "both")
    for path in ("flat", "per_pair")
    for nk_layout in (False, True)
    for interleaved in (False, True)
] + [("flat", False, False, "gate_up"), ("flat", False, False, "down")]


def test_token_expert_weights_sum_each_tokens_weights_by_expert_and_skip_sentinels():
    ids = torch.tensor([[0, 2, 2], [-1, 1, 3], [5, 3, 0]], device=mh.DEVICE)  # E = 4: -1, 5 out
    weights = torch.tensor([[0.5, 0.25, 0.125], [9.0, 1.0, 2.0], [7.0, 3.0, 4.0]])
    R = mh.token_expert_weights(ids, weights.to(mh.DEVICE), 4)
    expected = torch.zeros(3, 4)
    for t, j in itertools.product(range(3), range(3)):
        if 0 <= ids[t, j] < 4:
            expected[t, ids[t, j]] += weights[t, j]
    assert torch.equal(R.cpu(), expected) and R.dtype == torch.float32


@pytest.mark.parametrize("path, nk_layout, interleaved, which", BIASED_CASES, ids=str)
def test_biases_and_interleaved_columns_match_the_float64_reference(
    path, nk_layout, interleaved, which
):
    A, W_gate_up, W_down, ids, weights, gate_up_bias, down_bias = biased_case(1, nk_layout)
    gate_up_bias = None if which == "down" else gate_up_bias
    down_bias = None if which == "gate_up" else down_bias
    inputs = [t.clone() for t in (A, W_gate_up, W_down, ids, weights)]
    extras = dict(gate_up_bias=gate_up_bias, down_bias=down_bias, interleaved=interleaved)
    configs = PER_PAIR if path == "per_pair" else FLAT
    activation = mh.GPT_OSS_ACTIVATION
    out = mh.moe_experts(
        A, W_gate_up, W_down, ids, weights, activation=activation, configs=configs, **extras
    )
    mh.assert_experts_close(out, A, W_gate_up, W_down, ids, weights, activation, **extras)
    for before, after in zip(inputs, (A, W_gate_up, W_down, ids, weights), strict=True):
        assert torch.equal(before, after), "moe_experts modified an input"
    if interleaved:  # the same experts with their columns regrouped give the same output
        regrouped = mh.concatenated_gate_up(W_gate_up, gate_up_bias, True)
        extras.update(gate_up_bias=regrouped[1], interleaved=False)
        same = mh.moe_experts(
            A, regrouped[0], W_down, ids, weights, activation=activation, configs=configs, **extras
        )
        torch.testing.assert_close(out, same, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nk_layout", [False, True], ids=["KN", "NK"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["concatenated", "interleaved"])
def test_gradients_with_biases_and_interleaved_columns_match_float64(nk_layout, interleaved):
    case = biased_case(2, nk_layout)
    A, W_gate_up, W_down, ids, weights, gate_up_bias, down_bias = case
    grad = torch.randn(A.shape[0], W_down.shape[2], generator=torch.Generator().manual_seed(2))
    grad = grad.to(mh.DEVICE)
    floats = (A, W_gate_up, W_down, weights, gate_up_bias, down_bias)
    leaves = [t.detach().clone().requires_grad_() for t in floats]
    activation = mh.GPT_OSS_ACTIVATION
    out = mh.moe_experts(
        *leaves[:3],
        ids,
        leaves[3],
        activation=activation,
        gate_up_bias=leaves[4],
        down_bias=leaves[5],
        interleaved=interleaved,
        configs=FLAT,
    )
    out.backward(grad)
    reference = [t.detach().double().requires_grad_() for t in floats]
    expected = mh.moe_experts_gather_reference(
        *reference[:3], ids, reference[3], activation, *reference[4:], interleaved
    )
    expected.backward(grad.double())
    names = ("dA", "dW_gate_up", "dW_down", "d combine_weights", "d gate_up_bias", "d down_bias")
    for name, leaf, ref in zip(names, leaves, reference, strict=True):
        mh.assert_grad_close(leaf.grad, ref.grad, torch.float32, name)


@pytest.mark.parametrize(
    "name, bad, error, message",
    [
        ("gate_up_bias", torch.zeros(5, 47), ValueError, r"gate_up_bias must be \[5, 48\]"),
        ("down_bias", torch.zeros(5, 20, dtype=torch.int32), TypeError, "down_bias must be a"),
        ("down_bias", [0.0] * 20, TypeError, "down_bias must be a floating-point"),
        ("interleaved", 1, TypeError, "interleaved must be a bool"),
    ],
)
def test_bad_biases_are_refused_naming_them(name, bad, error, message):
    bad = bad.to(mh.DEVICE) if isinstance(bad, torch.Tensor) else bad
    with pytest.raises(error, match=message):
        mh.moe_experts(*gated_case(0), **{name: bad})
