"""FP8 experts: e4m3 quantization, moe_matmul_fp8 and moe_experts_fp8 against float64 references
on the values their e4m3 numbers stand for, bad input, the custom ops under torch.compile and
torch.export, and transformers' FP8Experts on the "helion" backend."""

import helion_moe.fp8
import moe_helpers as mh

import helion
import pytest
import torch
import transformers
from transformers.integrations import finegrained_fp8

mh.register_transformers_experts()


def fp8_case(seed: int, T: int, K: int, I: int, N: int, E: int, top_k: int, nk: bool):  # noqa: E741
    """A small random layer in bf16 and its FP8 weights: A [T, K], (W_gate_up, gate_up_scales,
    W_down, down_scales) with e4m3 weights [E, K, 2I] and [E, I, N] (with ``nk``, transposed
    views of [E, N, K] storage, as transformers stores them), ids, weights, and the unquantized
    weights."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(T, K, generator=g).to(mh.DEVICE, torch.bfloat16)
    W_gate_up = (torch.randn(E, 2 * I, K, generator=g) / K**0.5).to(mh.DEVICE, torch.bfloat16)
    W_down = (torch.randn(E, N, I, generator=g) / I**0.5).to(mh.DEVICE, torch.bfloat16)
    W_gate_up, W_down = W_gate_up.transpose(1, 2), W_down.transpose(1, 2)
    if not nk:
        W_gate_up, W_down = W_gate_up.contiguous(), W_down.contiguous()
    quantized = (*mh.quantize_weights_fp8(W_gate_up), *mh.quantize_weights_fp8(W_down))
    ids = mh.route_zipf_top_k(T, E, 1.2, top_k, seed=seed).to(mh.DEVICE)
    weights = torch.rand(T, top_k, generator=g).to(mh.DEVICE)
    return A, quantized, ids, weights, (W_gate_up, W_down)


CASES = [  # T, K, I, N, E, top_k, nk: one token, sizes not multiples of 128, E = 1, top-1 to 3
    (1, 256, 128, 256, 4, 2, True),
    (9, 200, 96, 136, 5, 3, False),
    (40, 384, 192, 128, 8, 2, True),
    (33, 128, 256, 72, 1, 1, False),
]


@pytest.mark.parametrize("T, K", [(1, 64), (7, 200), (70, 256)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_rows_fp8_matches_the_reference(T, K, dtype):
    g = torch.Generator().manual_seed(T)
    A = (torch.randn(T, K, generator=g) * torch.logspace(-3, 3, K)).to(mh.DEVICE, dtype)
    A[0, :] = 0  # a zero row: scales stay positive, values zero
    before = A.clone()
    q, scales = mh.quantize_activations_fp8(A)
    q_ref, scales_ref = mh.quantize_blocks_fp8(A, 1)
    assert torch.equal(A, before), "quantize_activations_fp8 modified its input"
    assert q.dtype == torch.float8_e4m3fn and scales.shape == (T, -(-K // 128))
    assert torch.equal(scales, scales_ref)
    assert (scales > 0).all() and (q[0].float() == 0).all()
    steps = (q.float() - q_ref.float()).abs() / q_ref.float().abs().clamp(min=2**-9)
    if mh.ON_GPU:  # Triton's float32 division is within 2 ulp, not correctly rounded
        assert (steps <= 2**-3).all() and (steps > 0).float().mean() <= 1e-3
    else:
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("nk", [True, False])
def test_quantized_weights_are_within_half_a_step_in_the_weights_layout(nk):
    W = torch.randn(3, 200, 136, device=mh.DEVICE) * torch.logspace(-2, 2, 136, device=mh.DEVICE)
    W[1] = 0
    if nk:
        W = W.transpose(1, 2).contiguous().transpose(1, 2)
    q, scales = mh.quantize_weights_fp8(W)
    assert q.shape == W.shape and q.stride() == W.stride() and scales.shape == (3, 2, 2)
    assert scales.transpose(1, 2).is_contiguous() == nk
    values = mh.dequantize_fp8(q, scales)
    step = values.abs() * 2**-4 + mh.dequantize_fp8(torch.ones_like(q), scales) * 2**-10
    assert ((values - W).abs() <= step).all()  # half an e4m3 step (or of a subnormal's)
    assert (values[1] == 0).all()


@pytest.mark.parametrize("case", CASES)
def test_moe_matmul_fp8_matches_the_reference(case):
    A, (W, W_scales, _, _), ids, weights, _ = fp8_case(0, *case)
    out = mh.moe_matmul_fp8(A, W, W_scales, ids, weights)
    assert out.dtype == A.dtype
    mh.assert_moe_fp8_close(out, A, W, W_scales, ids, weights)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", mh.GPT_OSS_ACTIVATION])
def test_moe_experts_fp8_matches_the_reference(case, activation):
    A, weights_fp8, ids, weights, (W_gate_up, W_down) = fp8_case(1, *case)
    inputs = [t.clone() for t in (A, *weights_fp8, ids, weights)]
    out = mh.moe_experts_fp8(A, *weights_fp8, ids, weights, activation=activation)
    mh.assert_experts_fp8_close(out, A, *weights_fp8, ids, weights, activation)
    for before, after in zip(inputs, (A, *weights_fp8, ids, weights), strict=True):
        assert torch.equal(before.float(), after.float()), "moe_experts_fp8 modified an input"
    # against the unquantized layer: e4m3's 3 mantissa bits, a few percent of the RMS
    exact = mh.moe_experts_reference_fp64(A, W_gate_up, W_down, ids, weights, activation)
    error = (out.double() - exact).pow(2).mean().sqrt() / exact.pow(2).mean().sqrt()
    assert 0.01 < error < 0.1, f"FP8 layer off the unquantized one by {error:.3g} x RMS"


@pytest.mark.parametrize("nk, I", [(True, 128), (False, 192)])
def test_fp8_half_height_tails_give_the_same_bits_as_full_blocks(nk, I, monkeypatch):  # noqa: E741
    # 300 pairs over 4 experts in 128-row blocks, Zipf-routed: some experts' last block is at
    # most half full; I = 192 puts up's N tiles across two scale blocks
    A, weights_fp8, ids, weights, _ = fp8_case(3, 150, 128, I, 128, 4, 2, nk)
    routing = mh.align_to_blocks(ids, 4, 128)
    tails = (routing.sorted_pair_ids[:, 64] >= ids.numel()) & (routing.block_expert_ids < 4)
    assert mh.flat_half_tails(mh.fp8_configs(None, 300, 4)[0]) and int(tails.sum()) > 0
    outs = []
    for flag in (False, True):
        monkeypatch.setattr(helion_moe.fp8, "flat_half_tails", lambda _, f=flag: f)
        outs.append(mh.moe_experts_fp8(A, *weights_fp8, ids, weights))
    mh.assert_experts_fp8_close(outs[1], A, *weights_fp8, ids, weights)
    assert torch.equal(outs[0], outs[1])
    A_q, A_scales = mh.quantize_activations_fp8(A)
    W, W_scales = weights_fp8[2:]  # the down GEMM's kernel, on A's rows: a half branch or not
    stored, nk_layout = mh.expert_weights_in_place(W)
    scales = (W_scales.transpose(1, 2) if nk_layout else W_scales).contiguous()
    args = (A_q, A_scales, stored, scales, routing.sorted_pair_ids, routing.block_expert_ids)
    args += (weights, nk_layout)
    config = mh.fp8_configs(None, 300, 4)[2]
    for flag, dots in ((False, 1), (True, 2)):
        code = mh.triton_code(mh.moe_matmul_flat_fp8, (*args, flag), config)
        assert code.count("tl.dot(") == dots


def test_prefill_configs_load_gate_up_weights_through_tensor_descriptors(monkeypatch):
    # 300 pairs over 3 experts take the 128-row e4m3 configs: the gate_up kernel reads W's tiles
    # through tensor descriptors (TMA), the down kernel through pointers (configs.py says why)
    A, weights_fp8, ids, weights, _ = fp8_case(4, 150, 256, 128, 128, 3, 2, True)
    assert mh.fp8_configs(None, ids.numel(), 3)[0] == 128
    launched, run_kernel = {}, helion_moe.fp8.run_kernel

    def spy(kernel, args, config, index_dtype=torch.int32):
        launched[kernel.name] = (args, config)
        return run_kernel(kernel, args, config, index_dtype)

    monkeypatch.setattr(helion_moe.fp8, "run_kernel", spy)
    out = mh.moe_experts_fp8(A, *weights_fp8, ids, weights)
    mh.assert_experts_fp8_close(out, A, *weights_fp8, ids, weights)
    for kernel, through_descriptors in (
        (mh.moe_gate_up_flat_fp8, True),
        (mh.moe_matmul_flat_fp8, False),
    ):
        code = mh.triton_code(kernel, *launched[kernel.name])
        assert ("make_tensor_descriptor" in code) == through_descriptors, kernel.name


def test_the_fp8_layer_matches_with_float32_activations_and_given_configs():
    A, weights_fp8, ids, weights, _ = fp8_case(2, 24, 256, 128, 128, 4, 2, True)
    configs = (
        helion.Config(block_sizes=[16, 128, 64], num_warps=4, num_stages=2),
        helion.Config(block_sizes=[16, 64, 32], num_warps=4, num_stages=2),
    )
    out = mh.moe_experts_fp8(A.float(), *weights_fp8, ids, weights, configs=configs)
    assert out.dtype == torch.float32
    mh.assert_experts_fp8_close(out, A.float(), *weights_fp8, ids, weights)


def test_sentinel_pairs_add_nothing_and_bad_ids_raise():
    A, weights_fp8, ids, weights, _ = fp8_case(3, 12, 128, 128, 128, 4, 2, False)
    E = weights_fp8[0].shape[0]
    sentinels = ids.clone()
    sentinels[::3, 1] = E  # another rank's pairs under expert parallelism
    out = mh.moe_experts_fp8(A, *weights_fp8, sentinels, weights, expert_id_check="sentinels")
    kept = weights.masked_fill(sentinels >= E, 0)
    mh.assert_experts_fp8_close(out, A, *weights_fp8, ids, kept)
    matmul = mh.moe_matmul_fp8(A, *weights_fp8[:2], sentinels, weights, expert_id_check="sentinels")
    mh.assert_moe_fp8_close(matmul, A, *weights_fp8[:2], ids, kept)
    if not mh.ON_GPU:  # on a GPU, a device-side assertion (tests/test_gpu.py for bf16)
        with pytest.raises(ValueError, match="must lie in"):
            mh.moe_experts_fp8(A, *weights_fp8, sentinels, weights)


def test_no_tokens_and_no_inner_size_give_empty_and_zero_outputs():
    A, weights_fp8, ids, weights, _ = fp8_case(6, 4, 128, 128, 128, 4, 2, True)
    assert mh.moe_experts_fp8(A[:0], *weights_fp8, ids[:0], weights[:0]).shape == (0, 128)
    assert mh.moe_matmul_fp8(A[:0], *weights_fp8[:2], ids[:0], weights[:0]).shape == (0, 256)
    W_empty, scales_empty = mh.quantize_weights_fp8(torch.zeros(4, 0, 256, device=mh.DEVICE))
    assert scales_empty.shape == (4, 0, 2)
    out = mh.moe_experts_fp8(A[:, :0], W_empty, scales_empty, *weights_fp8[2:], ids, weights)
    assert out.shape == (4, 128) and not out.any()
    W_narrow, scales_narrow = mh.quantize_weights_fp8(torch.zeros(4, 128, 0, device=mh.DEVICE))
    assert mh.moe_matmul_fp8(A, W_narrow, scales_narrow, ids, weights).shape == (4, 0)
    out = mh.moe_experts_fp8(A, *weights_fp8[:2], W_narrow, scales_narrow, ids, weights)
    assert out.shape == (4, 0)


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # NumPy's, in the interpreter's max
def test_a_nan_in_a_token_makes_its_row_nan_and_no_other():
    # an e4m3 NaN reaches the dot as NaN, as on a GPU (mode._patch_interpreter_float8)
    A, weights_fp8, ids, weights, _ = fp8_case(7, 5, 256, 128, 128, 4, 2, False)
    A[2, 7] = float("nan")
    for out in (
        mh.moe_matmul_fp8(A, *weights_fp8[:2], ids, weights),
        mh.moe_experts_fp8(A, *weights_fp8, ids, weights),
    ):
        assert out[2].isnan().all() and not out[[0, 1, 3, 4]].isnan().any()


def test_dequantize_refuses_scales_of_other_blocks():
    q, scales = mh.quantize_weights_fp8(torch.randn(2, 200, 136, device=mh.DEVICE))
    for bad in (scales.repeat_interleave(2, 1), scales[0], scales[:, :1]):
        with pytest.raises(ValueError, match=r"scales must have shape \[\.\.\., R or ceil"):
            mh.dequantize_fp8(q, bad)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ("bf16 weights", TypeError, "W_gate_up has dtype torch.bfloat16; it must be"),
        ("64-blocks", ValueError, r"gate_up_scales must have shape \[4, 1, 2\]"),
        ("float16 scales", TypeError, "down_scales must be float32"),
        ("K tile 256", ValueError, "configs' K tiles"),
        ("N tile 64", ValueError, "gate_up config's N tile"),
        ("down N tile 256", ValueError, r"configs' N tiles \(block_sizes\[1\]\) must divide 128"),
        ("per-pair configs", ValueError, "FP8 runs flat kernels"),
        ("integer A", TypeError, "A has dtype"),
    ],
)
def test_bad_input_gets_an_error_naming_the_argument(change, error, match):
    A, (W_gate_up, gate_up_scales, W_down, down_scales), ids, weights, _ = fp8_case(
        4, 4, 128, 128, 128, 4, 2, True
    )
    configs = None
    if change == "bf16 weights":
        W_gate_up = W_gate_up.to(torch.bfloat16)
    elif change == "64-blocks":
        gate_up_scales = gate_up_scales.repeat_interleave(2, 1).repeat_interleave(2, 2)
    elif change == "float16 scales":
        down_scales = down_scales.half()
    elif change == "integer A":
        A = A.long()
    else:
        tiles = {"K tile 256": [16, 128, 256], "N tile 64": [16, 64, 128]}.get(change)
        tiles = tiles or [1 if change == "per-pair configs" else 16, 128, 128]
        down = [tiles[0], 256 if change == "down N tile 256" else 128, 64]
        configs = (helion.Config(block_sizes=tiles), helion.Config(block_sizes=down))
    with pytest.raises(error, match=match):
        args = (A, W_gate_up, gate_up_scales, W_down, down_scales, ids, weights)
        mh.moe_experts_fp8(*args, configs=configs)


def test_the_fp8_ops_pass_opcheck_and_compile_without_a_graph_break():
    A, weights_fp8, ids, weights, _ = fp8_case(5, 6, 128, 128, 128, 4, 2, True)
    # all of opcheck's tests but test_schema, which multiplies every input tensor: PyTorch has
    # no float8 multiplication on the CPU
    tests = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(
        torch.ops.helion_moe.moe_experts_fp8.default,
        (A, *weights_fp8, ids, weights, "silu", None, "device"),
        test_utils=tests,
    )
    torch.library.opcheck(
        torch.ops.helion_moe.moe_matmul_fp8.default,
        (A, *weights_fp8[:2], ids, weights, None, "device"),
        test_utils=tests,
    )

    def layer(*args):
        return mh.moe_experts_fp8(*args, activation=mh.GPT_OSS_ACTIVATION)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    expected = layer(A, *weights_fp8, ids, weights)
    assert torch.equal(compiled(A, *weights_fp8, ids, weights), expected)


def test_the_fp8_layer_exported_with_a_dynamic_token_count_runs_other_counts_as_eager_does():
    weights_fp8 = fp8_case(5, 6, 128, 128, 128, 4, 2, True)[1]

    class Experts(torch.nn.Module):
        def forward(self, A, ids, weights):
            return mh.moe_experts_fp8(A, *weights_fp8, ids, weights)

    def inputs(T):
        A, _, ids, weights, _ = fp8_case(T, T, 128, 128, 128, 4, 2, True)
        return A, ids, weights

    tokens = torch.export.Dim("tokens")
    exported = torch.export.export(Experts(), inputs(6), dynamic_shapes=({0: tokens},) * 3)
    for T in (1, 3, 17):
        assert torch.equal(exported.module()(*inputs(T)), Experts()(*inputs(T))), T


def test_eager_inference_runs_the_fp8_ops_bodies(monkeypatch):
    # as for moe_experts (tests/test_compile.py): the op's output, without the op's dispatch
    A, weights_fp8, ids, weights, _ = fp8_case(6, 5, 128, 128, 128, 4, 2, True)
    layer_args = (A, *weights_fp8, ids, weights)
    layer = torch.ops.helion_moe.moe_experts_fp8(*layer_args, "silu", None, "device")
    matmul_args = (A, *weights_fp8[:2], ids, weights)
    matmul = torch.ops.helion_moe.moe_matmul_fp8(*matmul_args, None, "device")

    def refuse(*args):
        raise AssertionError("plain eager inference called the custom op")

    monkeypatch.setattr(helion_moe.fp8, "moe_experts_fp8_op", refuse)
    monkeypatch.setattr(helion_moe.fp8, "moe_matmul_fp8_op", refuse)
    assert torch.equal(mh.moe_experts_fp8(*layer_args), layer)
    assert torch.equal(mh.moe_matmul_fp8(*matmul_args), matmul)


def fp8_linear_float64(input, weight, weight_scale_inv, *args, **kwargs):
    """transformers' fine-grained FP8 linear, in float64: the input quantized per token and 128
    columns ("dynamic" activation scales), the weight dequantized block by block. Its own
    kernels come from the Hugging Face Hub (``kernels-community/finegrained-fp8``) or DeepGEMM,
    neither of which this course installs."""
    x = mh.dequantize_fp8(*mh.quantize_blocks_fp8(input, 1)).double()
    w = mh.dequantize_fp8(weight, weight_scale_inv).double()
    return (x @ w.T).to(input.dtype)


@pytest.mark.parametrize("name", ["Mixtral", "Qwen3-MoE"])
def test_transformers_fp8_experts_give_their_own_forward_on_helion(name, monkeypatch):
    model = mh.quantize_experts_fp8(mh.tiny_transformers_model(name, torch.float32))
    experts = [m for m in model.modules() if isinstance(m, finegrained_fp8.FP8Experts)]
    assert len(experts) == mh.count_moe_blocks(model) > 0
    assert experts[0].gate_up_proj.dtype == torch.float8_e4m3fn
    monkeypatch.setattr(finegrained_fp8, "fp8_linear", fp8_linear_float64)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 9), device=mh.DEVICE)
    with torch.no_grad():
        model.set_experts_implementation("eager")
        expected = model(input_ids).logits
        model.set_experts_implementation("helion")
        actual = model(input_ids).logits
    error = (actual - expected).abs().max() / expected.pow(2).mean().sqrt()
    # the kernels round each pair's row to bf16: the bf16 bound of tests/test_transformers.py
    assert error < 3e-2, f"logits differ by {error:.3g} x RMS"
    experts[0].block_size = (64, 64)
    with pytest.raises(NotImplementedError, match="block_size"), torch.no_grad():
        model(input_ids)


def test_compiled_static_cache_generate_with_fp8_experts_gives_the_eager_tokens():
    model = mh.quantize_experts_fp8(mh.tiny_transformers_model("Qwen3-MoE"))
    model.set_experts_implementation("helion")
    input_ids = torch.randint(0, model.config.vocab_size, (1, 6), device=mh.DEVICE)
    options = dict(max_new_tokens=5, do_sample=False, cache_implementation="static", pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(input_ids, disable_compile=True, **options)
    compile_config = transformers.CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
    compile_config._compile_all_devices = True  # transformers compiles on GPUs only otherwise
    torch._dynamo.reset()
    with torch.no_grad():
        tokens = model.generate(input_ids, compile_config=compile_config, **options)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    assert torch.equal(tokens, expected)
