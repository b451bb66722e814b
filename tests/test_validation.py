"""moe_matmul refuses bad input with an error that names the argument."""

import moe_helpers as mh

import helion
import pytest
import torch

T, K, N, E = 6, 16, 8, 3


def _good(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(T, K, generator=g).to(mh.DEVICE, dtype)
    W = torch.randn(E, K, N, generator=g).to(mh.DEVICE, dtype)
    ids = torch.tensor([0, 2, 1, 1, 0, 2], device=mh.DEVICE)
    return A, W, ids


def _swap(index, value):
    args = list(_good())
    args[index] = value
    return args


@pytest.mark.parametrize(
    "args, error, message",
    [
        (_swap(0, torch.randn(T, K, 1)), ValueError, "A must be 2-D"),
        (_swap(1, torch.randn(K, N)), ValueError, "W must be 3-D"),
        (_swap(1, torch.randn(E, K + 1, N)), ValueError, "K=16 but W .* K=17"),
        (_swap(1, torch.randn(0, K, N)), ValueError, r"W has no experts \(E = 0\)"),
        (
            [*_good(torch.float64)[:2], _good()[2]],
            TypeError,
            "A has dtype torch.float64; supported",
        ),
        (_swap(0, torch.ones(T, K, dtype=torch.int32)), TypeError, "A has dtype torch.int32"),
        (_swap(1, torch.randn(E, K, N).half()), TypeError, "W has dtype torch.float16 but A"),
        (_swap(2, torch.zeros(T)), TypeError, "expert_ids must be an integer tensor"),
        (_swap(2, torch.zeros(T, dtype=torch.bool)), TypeError, "expert_ids must be an integer"),
        (
            _swap(2, torch.zeros(T, 1, 1, dtype=torch.int64)),
            ValueError,
            r"expert_ids must have shape \[T\] or \[T, k\]",
        ),
        (_swap(2, torch.zeros(T, E + 1, dtype=torch.int64)), ValueError, r"k=4; k must be in"),
        (_swap(2, torch.zeros(T, 0, dtype=torch.int64)), ValueError, r"k=0; k must be in"),
        (
            _swap(2, torch.zeros(T + 1, dtype=torch.int64)),
            ValueError,
            r"expert_ids must have shape",
        ),
    ],
)
def test_bad_input_raises_a_clear_error(args, error, message):
    args = [a.to(mh.DEVICE) if a.device.type != mh.DEVICE.type else a for a in args]
    with pytest.raises(error, match=message):
        mh.moe_matmul(*args)


# On a GPU the default check is a device-side assertion, which would end this process's CUDA
# context: tests/test_gpu.py runs that one in a subprocess.
# "sentinels" takes such an id for another rank's pair (the next test).
ID_CHECKS = ["host"] if mh.ON_GPU else ["device", "host"]


@pytest.mark.parametrize("expert_id_check", ID_CHECKS)
@pytest.mark.parametrize("implementation", sorted(mh.IMPLEMENTATIONS))
@pytest.mark.parametrize("bad", [3, -1, 2**32 + 1])  # 2**32 + 1 would read as 1 in int32
def test_an_expert_id_out_of_range_is_refused_by_every_implementation(
    implementation, bad, expert_id_check
):
    A, W, ids = _good()
    ids = ids.clone()
    ids[4] = bad
    with pytest.raises(ValueError, match=rf"expert_ids must lie in \[0, E=3\), found {bad}"):
        mh.moe_matmul(A, W, ids, implementation=implementation, expert_id_check=expert_id_check)


@pytest.mark.parametrize("implementation", ["flat", "per_pair"])
@pytest.mark.parametrize("bad", [3, -1, 2**32 + 1])
def test_with_sentinels_an_id_outside_the_experts_adds_a_zero_row(implementation, bad):
    A, W, ids = _good()
    ids = ids.clone()
    ids[4] = bad
    out = mh.moe_matmul(A, W, ids, implementation=implementation, expert_id_check="sentinels")
    expected = torch.einsum("tk,tkn->tn", A, W[_good()[2]])
    expected[4] = 0
    torch.testing.assert_close(out, expected, rtol=mh.TOLERANCES[torch.float32], atol=1e-4)
    assert not out[4].any()


def test_an_unknown_expert_id_check_is_refused():
    with pytest.raises(ValueError, match="expert_id_check must be one of"):
        mh.moe_matmul(*_good(), expert_id_check="later")


def test_more_experts_than_the_flat_metadata_takes_are_refused():
    A, _, ids = _good()
    W = torch.randn(mh.MAX_METADATA_EXPERTS + 1, K, N, device=mh.DEVICE)
    with pytest.raises(ValueError, match=r"num_experts \(E, W's first dimension\) is 1025"):
        mh.moe_matmul(A, W, ids, implementation="flat")


def test_inputs_on_the_wrong_device_are_refused():
    A, W, ids = _good()
    other = torch.device("meta")
    for index, name in enumerate(("A", "W", "expert_ids")):
        args = [A, W, ids]
        args[index] = args[index].to(other)
        with pytest.raises(ValueError, match=f"{name} is on meta"):
            mh.moe_matmul(*args)


@pytest.mark.parametrize("index, name", [(0, "A"), (1, "W"), (2, "expert_ids")])
def test_arguments_that_are_not_tensors_are_refused_by_name(index, name):
    args = list(_good())
    args[index] = args[index].cpu().numpy()
    with pytest.raises(TypeError, match=rf"{name} must be a torch\.Tensor, got ndarray"):
        mh.moe_matmul(*args)
    args[index] = args[index].tolist()
    with pytest.raises(TypeError, match=rf"{name} must be a torch\.Tensor, got list"):
        mh.moe_matmul(*args)
    with pytest.raises(TypeError, match=r"combine_weights must be a torch\.Tensor, got list"):
        mh.moe_matmul(*_good(), [1.0] * T)


@pytest.mark.parametrize(
    "config, error, message",
    [
        ({"block_sizes": [16, 16, 16]}, TypeError, "config must be a helion.Config .* got dict"),
        ([16, 16, 16], TypeError, "config must be a helion.Config .* got list"),
        (helion.Config(num_warps=4), ValueError, "config's block_sizes must be three .* None"),
        (helion.Config(block_sizes=[16, 16]), ValueError, r"three tiles .* \[16, 16\]"),
        (helion.Config(block_sizes=[16, 0, 16]), ValueError, "each a power of two"),
        (helion.Config(block_sizes=[16, 24, 16]), ValueError, r"power of two, got \[16, 24, 16\]"),
        (helion.Config(block_sizes=[1, 3, 16]), ValueError, "each a power of two"),
        (helion.Config(block_sizes=[16, True, 16]), ValueError, "each a power of two"),
    ],
)
def test_malformed_configs_are_refused_by_name(config, error, message):
    with pytest.raises(error, match=message):
        mh.moe_matmul(*_good(), config=config)


@pytest.mark.parametrize("implementation", sorted(mh.IMPLEMENTATIONS))
@pytest.mark.parametrize("K_out, N_out", [(0, N), (K, 0)])
def test_no_features_give_zeros_and_still_check_the_ids(implementation, K_out, N_out):
    A = torch.randn(T, K_out, device=mh.DEVICE)
    W = torch.randn(E, K_out, N_out, device=mh.DEVICE)
    ids = _good()[2]
    out = mh.moe_matmul(A, W, ids, implementation=implementation)
    assert out.shape == (T, N_out) and out.dtype == A.dtype and not out.any()
    with pytest.raises(ValueError, match=r"expert_ids must lie in \[0, E=3\), found 3"):
        mh.moe_matmul(A, W, torch.full_like(ids, 3), implementation=implementation)


def test_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="implementation must be 'auto' or one of"):
        mh.moe_matmul(*_good(), implementation="fastest")


def test_offsets_past_int32_select_int64_indexing_without_allocating():
    # Meta tensors have shapes and strides but no storage.
    def index_dtype(T, K, N, E=3, k=1):
        A, W = torch.empty(T, K, device="meta"), torch.empty(E, K, N, device="meta")
        return mh.kernel_index_dtype(A, W, T * k)

    assert index_dtype(8, 16, 16) == torch.int32
    assert index_dtype(2**31 // 16 + 1, 16, 8) == torch.int64  # A
    assert index_dtype(8, 16, 2**31 // (3 * 16) + 1) == torch.int64  # W
    assert index_dtype(2**31 // 4096, 16, 4096) == torch.int32  # the [P, N] output just fits
    assert index_dtype(2**31 // 4096 + 1, 16, 4096) == torch.int64
    assert index_dtype(2**31 // 8192 + 1, 16, 4096, k=2) == torch.int64  # top-k pairs
    # weights of exactly 2**31 elements (1024 experts, H = 2048, I = 512): every offset fits
    # int32, but Helion refuses int32 for an input of more than 2**31 - 1 elements
    assert index_dtype(8, 2048, 1024, E=1024) == torch.int64
    # DeepSeek-V3's routed experts' gate_up weights: [256, 7168, 4096]
    assert index_dtype(4096, 7168, 4096, E=256) == torch.int64
    # a view whose strides reach past 2**31 although it has fewer elements
    view = torch.empty(3, 16, 2**26, device="meta")[:, :, :8]
    assert view.numel() < 2**31
    assert mh.kernel_index_dtype(torch.empty(8, 16), view, 8) == torch.int64


def test_validation_does_not_modify_the_inputs():
    A, W, ids = _good(torch.bfloat16)
    saved = [t.clone() for t in (A, W, ids)]
    mh.moe_matmul(A, W, ids)
    for tensor, before in zip((A, W, ids), saved, strict=True):
        assert torch.equal(tensor, before)


@pytest.mark.parametrize(
    "dtype", [torch.int8, torch.int16, torch.int32, torch.uint8, torch.uint16, torch.uint32]
)
@pytest.mark.parametrize("implementation", ["auto", "flat"])
def test_any_integer_dtype_of_expert_ids_is_accepted(dtype, implementation):
    # the flat kernel's metadata marks unplaced pairs with -1, in int32 whatever the ids' type
    A, W, ids = _good()
    out = mh.moe_matmul(A, W, ids.to(dtype), implementation=implementation)
    mh.assert_moe_close(out, A, W, ids)
    with pytest.raises(ValueError, match=r"expert_ids must lie in \[0, E=3\), found 3"):
        mh.moe_matmul(A, W, torch.full_like(ids, E).to(dtype), implementation=implementation)


def test_int8_ids_are_compared_with_more_experts_than_int8_holds():
    # int8 cannot hold E = 200: the ids are widened before any comparison with E
    A = torch.randn(40, 8, device=mh.DEVICE)
    W = torch.randn(200, 8, 8, device=mh.DEVICE)
    ids = torch.randint(0, 128, (40, 2), generator=torch.Generator().manual_seed(0))
    out = mh.moe_matmul(A, W, ids.to(mh.DEVICE, torch.int8), implementation="flat")
    mh.assert_moe_close(out, A, W, ids.to(mh.DEVICE))


def test_inputs_that_require_grad_go_through_the_backward():
    A, W, ids = _good()
    out = mh.moe_matmul(A.requires_grad_(), W, ids)
    assert out.requires_grad and out.grad_fn is not None
    with torch.no_grad():
        assert not mh.moe_matmul(A, W, ids).requires_grad


def test_bad_combine_weights_are_refused():
    A, W, ids = _good()
    with pytest.raises(TypeError, match="combine_weights must be a floating-point tensor"):
        mh.moe_matmul(A, W, ids, torch.ones(T, dtype=torch.int64, device=mh.DEVICE))
    with pytest.raises(ValueError, match=r"combine_weights must have expert_ids' shape \(6,\)"):
        mh.moe_matmul(A, W, ids, torch.ones(T, 2, device=mh.DEVICE))
    with pytest.raises(ValueError, match="combine_weights is on meta"):
        mh.moe_matmul(A, W, ids, torch.ones(T, device="meta"))


@pytest.mark.parametrize("implementation", ["seed", "masked_store"])
def test_per_expert_kernels_refuse_top_k_and_weights(implementation):
    A, W, ids = _good()
    with pytest.raises(ValueError, match="takes top-1 routing"):
        mh.moe_matmul(A, W, ids[:, None].expand(T, 2), implementation=implementation)
    with pytest.raises(ValueError, match="takes top-1 routing"):
        mh.moe_matmul(A, W, ids, torch.ones(T, device=mh.DEVICE), implementation=implementation)


def test_a_token_block_that_is_not_a_power_of_two_from_16_is_refused():
    config = helion.Config(block_sizes=[24, 16, 16], num_warps=4, num_stages=1)
    with pytest.raises(ValueError, match=r"each a power of two, got \[24, 16, 16\]"):
        mh.moe_matmul(*_good(), config=config)
    config = helion.Config(block_sizes=[8, 16, 16], num_warps=4, num_stages=1)
    with pytest.raises(ValueError, match=r"token block \(block_sizes\[0\]\) must be a power"):
        mh.moe_matmul(*_good(), config=config)
