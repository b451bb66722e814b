"""GPU probe: the FP8 experts at DeepSeek-V3, Kimi-K2 and Qwen3-235B-A22B sizes. ``layer``:
``moe_experts_fp8`` (ungrouped and in L2 groups of 4 token blocks) against ``moe_experts`` in bf16
on the same weights at prefill, all with whole tails and pointer loads; ``layer_tails``: both
layers with their default configs and with whole tails (``half_tails`` off,
``mh.flat_half_tails`` patched); ``tma``: the FP8 layer with W's tiles loaded through pointers
or tensor descriptors in each kernel; ``prefill_configs``: deeper pipelines or 64-row token
blocks; ``gemm``:
``moe_matmul_fp8`` at each expert GEMM against ``torch._scaled_grouped_mm`` (rowwise scales, rows
pre-sorted by expert and pre-quantized: the core alone) and ``torch._grouped_mm`` in bf16;
``decode``: the FP8 layer in a CUDA graph at 1-64 tokens against the copy rate of the active
experts' e4m3 bytes; ``decode_parts``: where that graph's time goes at one token, kernel by kernel
(``mh.call_timeline`` of one replay); ``decode_configs``: that graph at 1 and 8 tokens with variants
of the 16-row e4m3 configs (a gate_up GEMM split along K, measured slower everywhere, is in
NOTES.md); ``decode_swapped``: that graph at 1, 8 and 64 tokens with the kernels' dot
operands swapped (``fp8_swapped_kernels.py``); ``hidden``: how far the fused gate_up kernel's
hidden lies from float64's before its e4m3 rounding, in units of its group's amax (what
``mh.FP8_HIDDEN_SLACK`` assumes).

    python probes/fp8_probe.py SECTION [SECTION ...]
    (hidden, layer, layer_tails, tma, prefill_configs, prefill_expert_groups, gemm, decode,
    decode_parts, decode_configs, decode_swapped)

Timings are medians of ``triton.testing.do_bench`` (``mh.time_ms``); every peer is timed in the
same run on the same card. Weights are random (std 0.02), routing uniform top-k.
"""

import moe_helpers as mh
from helion_moe import fp8 as fp8_module
from helion_moe import layer as layer_module

import contextlib
import functools
from unittest import mock

import expert_group_kernels as groups
import fp8_swapped_kernels as swapped
import torch
from probe_common import SWIGLU, chosen, record, run_sections, with_options

# name, H, I, E, top_k
MODELS = [
    ("DeepSeek-V3", 7168, 2048, 256, 8),
    ("Kimi-K2", 7168, 2048, 384, 8),
    ("Qwen3-235B-A22B", 4096, 1536, 128, 8),
]


def experts(H, I, E, seed=0):  # noqa: E741
    """Random bf16 experts in transformers' layout seen as [E, K, N] views, and their FP8
    quantization (e4m3, 128 x 128 block scales)."""
    g = torch.Generator(device=mh.DEVICE).manual_seed(seed)
    gate_up = 0.02 * torch.randn(E, 2 * I, H, generator=g, device=mh.DEVICE, dtype=torch.bfloat16)
    down = 0.02 * torch.randn(E, H, I, generator=g, device=mh.DEVICE, dtype=torch.bfloat16)
    bf16 = gate_up.transpose(1, 2), down.transpose(1, 2)
    fp8 = (*mh.quantize_weights_fp8(bf16[0]), *mh.quantize_weights_fp8(bf16[1]))
    return bf16, fp8


def routing(T, E, k, H, seed=0):
    g = torch.Generator(device=mh.DEVICE).manual_seed(seed)
    A = torch.randn(T, H, generator=g, device=mh.DEVICE, dtype=torch.bfloat16)
    ids = torch.rand(T, E, generator=g, device=mh.DEVICE).topk(k, dim=1).indices
    weights = torch.softmax(torch.randn(T, k, generator=g, device=mh.DEVICE), dim=1)
    return A, ids, weights


def fp8_configs_grouped(T, E, k, group):
    """The e4m3 configs the FP8 layer picks at this routing, their token blocks launched in L2
    groups of ``group`` (1: the default program order, ungrouped), W loaded through pointers."""
    configs = mh.flat_layer_configs(torch.float8_e4m3fn, T * k, E)
    options = {"l2_groupings": [group], "indexing": "pointer"}
    return tuple(with_options(c, options) for c in configs)


@contextlib.contextmanager
def whole_tails():
    """Both layers' flat kernels with ``half_tails`` off (``flat_half_tails`` patched)."""
    with contextlib.ExitStack() as patches:
        for module in (fp8_module, layer_module):
            patches.enter_context(mock.patch.object(module, "flat_half_tails", lambda _: False))
        yield


@whole_tails()
def fp8_layer():
    """What L2 groups alone do: the FP8 layer in the default program order and in L2 groups of 4
    token blocks, both with pointer loads, against the bf16 layer with its default configs, all
    with whole tails, on the same weights, T = 4096 and 16384; 8 rows of each FP8 output checked
    against the float64 reference on the same e4m3 numbers."""
    for name, H, I, E, k in MODELS:  # noqa: E741
        bf16, fp8 = experts(H, I, E)
        for T in (4096, 16384):
            A, ids, w = routing(T, E, k, H)
            fp8_calls = {
                variant: functools.partial(
                    mh.moe_experts_fp8, A, *fp8, ids, w, configs=fp8_configs_grouped(T, E, k, g)
                )
                for variant, g in (("fp8", 1), ("fp8, l2 groups of 4", 4))
            }
            for call in fp8_calls.values():
                mh.assert_experts_fp8_close(call()[:8], A[:8], *fp8, ids[:8], w[:8])
            flops = 2 * T * k * 3 * H * I
            times = {variant: mh.time_ms(call) for variant, call in fp8_calls.items()}
            times["bf16"] = mh.time_ms(functools.partial(mh.moe_experts, A, *bf16, ids, w))
            for variant, ms in times.items():
                tflops = round(flops / ms / 1e9, 1)
                record("layer", model=name, T=T, variant=variant, ms=round(ms, 3), tflops=tflops)
        del bf16, fp8
        torch.cuda.empty_cache()


def fp8_layer_tails():
    """The FP8 layer and the bf16 layer on the same weights, T = 4096 and 16384, each with its
    default configs and with its flat kernels' ``half_tails`` off; 8 rows of each FP8 output
    checked against the float64 reference on the same e4m3 numbers. $FP8_MODELS picks models
    (one per process fits Kimi-K2's two copies on an 80 GB card)."""
    names = chosen("FP8_MODELS", [model[0] for model in MODELS])
    for name, H, I, E, k in (model for model in MODELS if model[0] in names):  # noqa: E741
        bf16, fp8 = experts(H, I, E)
        for T in (4096, 16384):
            A, ids, w = routing(T, E, k, H)
            calls = {
                "fp8": functools.partial(mh.moe_experts_fp8, A, *fp8, ids, w),
                "bf16": functools.partial(mh.moe_experts, A, *bf16, ids, w),
            }
            mh.assert_experts_fp8_close(calls["fp8"]()[:8], A[:8], *fp8, ids[:8], w[:8])
            flops = 2 * T * k * 3 * H * I
            for tails in ("half tails", "whole tails"):
                with whole_tails() if tails == "whole tails" else contextlib.nullcontext():
                    for variant, call in calls.items():
                        ms = mh.time_ms(call)
                        row = dict(model=name, T=T, variant=f"{variant}, {tails}", ms=round(ms, 3))
                        record("layer_tails", **row, tflops=round(flops / ms / 1e9, 1))
        del bf16, fp8
        torch.cuda.empty_cache()


TMA_VARIANTS = {  # variant: (gate_up options, down options) on the 128-row configs
    "pointers": ({"indexing": "pointer"}, {"indexing": "pointer"}),
    "tensor descriptors in gate_up": ({"indexing": "tensor_descriptor"}, {"indexing": "pointer"}),
    "tensor descriptors in down": ({"indexing": "pointer"}, {"indexing": "tensor_descriptor"}),
    "tensor descriptors in both": (
        {"indexing": "tensor_descriptor"},
        {"indexing": "tensor_descriptor"},
    ),
}
BLOCK_64 = {"block_sizes": [64, 128, 128]}  # 64-row token blocks (both kernels share one)
PREFILL_CONFIG_VARIANTS = {  # the same, other options
    "default": ({}, {}),
    "gate_up 4 stages": ({"num_stages": 4}, {}),
    "down 4 stages": ({}, {"num_stages": 4}),
    "64-row blocks": (BLOCK_64, BLOCK_64),
    "64-row blocks, 4 warps, 4 stages": (
        {**BLOCK_64, "num_warps": 4, "num_stages": 4},
        {**BLOCK_64, "num_warps": 4, "num_stages": 4},
    ),
}


def fp8_prefill_variants(section, variants):
    """The FP8 layer at prefill, T = 4096 and 16384, with each of ``variants`` applied to its
    128-row configs; 8 rows of each output checked against the float64 reference. The bf16
    copy is dropped once quantized, so Kimi-K2 fits an 80 GB card; $FP8_MODELS picks models."""
    names = chosen("FP8_MODELS", [model[0] for model in MODELS])
    for name, H, I, E, k in (model for model in MODELS if model[0] in names):  # noqa: E741
        fp8 = experts(H, I, E)[1]
        torch.cuda.empty_cache()
        for T in (4096, 16384):
            A, ids, w = routing(T, E, k, H)
            configs = mh.flat_layer_configs(torch.float8_e4m3fn, T * k, E)
            for variant, options in variants.items():
                chosen_configs = tuple(
                    with_options(c, o) for c, o in zip(configs, options, strict=True)
                )
                call = functools.partial(
                    mh.moe_experts_fp8, A, *fp8, ids, w, configs=chosen_configs
                )
                mh.assert_experts_fp8_close(call()[:8], A[:8], *fp8, ids[:8], w[:8])
                ms = mh.time_ms(call)
                flops = 2 * T * k * 3 * H * I
                row = dict(model=name, T=T, variant=variant, ms=round(ms, 3))
                record(section, **row, tflops=round(flops / ms / 1e9, 1))
        del fp8
        torch.cuda.empty_cache()


def fp8_tma():
    """The FP8 layer with each kernel loading W's tiles through pointers or tensor descriptors
    (TMA)."""
    fp8_prefill_variants("tma", TMA_VARIANTS)


def fp8_prefill_configs():
    """The FP8 layer with deeper pipelines in either kernel, or 64-row token blocks."""
    fp8_prefill_variants("prefill_configs", PREFILL_CONFIG_VARIANTS)


EXPERT_GROUP_VARIANTS = {  # name: the context the FP8 layer runs in
    "as it runs": contextlib.nullcontext,
    "expert groups": functools.partial(groups.expert_groups, fp8_module),
    "expert groups of at most 8 blocks": functools.partial(groups.expert_groups, fp8_module, 8),
    "as it runs again": contextlib.nullcontext,
}


def fp8_prefill_expert_groups():
    """The FP8 layer as it runs, with each expert's blocks as one L2 group or groups of at most 8
    (``expert_group_kernels.py``, runs of single blocks), and as it runs again, T = 4096 and
    16384; every output equal to the first bit for bit, which is checked against float64 on
    8 rows. $FP8_MODELS picks models."""
    names = chosen("FP8_MODELS", [model[0] for model in MODELS])
    for name, H, I, E, k in (model for model in MODELS if model[0] in names):  # noqa: E741
        fp8 = experts(H, I, E)[1]
        torch.cuda.empty_cache()
        for T in (4096, 16384):
            A, ids, w = routing(T, E, k, H)
            call = functools.partial(mh.moe_experts_fp8, A, *fp8, ids, w)
            reference = call()
            mh.assert_experts_fp8_close(reference[:8], A[:8], *fp8, ids[:8], w[:8])
            for variant, context in EXPERT_GROUP_VARIANTS.items():
                with context():
                    if not torch.equal(call(), reference):
                        raise AssertionError(f"{name}, T = {T}: {variant} changed a row")
                    ms = mh.time_ms(call)
                flops = 2 * T * k * 3 * H * I
                row = dict(model=name, T=T, variant=variant, ms=round(ms, 3))
                record("prefill_expert_groups", **row, tflops=round(flops / ms / 1e9, 1))
        del fp8
        torch.cuda.empty_cache()


def fp8_gemm():
    """Each expert GEMM: ``moe_matmul_fp8`` end to end (quantizing A, the metadata, the sum
    over k) against ``torch._scaled_grouped_mm`` with rowwise scales and ``torch._grouped_mm``
    in bf16, both on rows already sorted by expert (and, for FP8, already quantized)."""
    for name, H, I, E, k in MODELS:  # noqa: E741
        bf16, fp8 = experts(H, I, E)
        gemms = {"gate_up": (bf16[0], fp8[:2], H, 2 * I), "down": (bf16[1], fp8[2:], I, H)}
        for T in (4096, 16384):
            for gemm, (W, (W_q, W_s), K, N) in gemms.items():
                A, ids, w = routing(T, E, k, K)
                flops = 2 * T * k * K * N
                ours = functools.partial(mh.moe_matmul_fp8, A, W_q, W_s, ids, w)
                order = ids.flatten().argsort()
                counts = torch.bincount(ids.flatten(), minlength=E)
                offsets = counts.cumsum(0).to(torch.int32)
                rows = A[order // k]
                rows_q, rows_s = mh.quantize_rowwise_fp8(rows)
                W_nk = W.transpose(1, 2)  # [E, N, K] storage
                Wr_q, Wr_s = mh.quantize_rowwise_fp8(W_nk)
                scaled = functools.partial(
                    torch._scaled_grouped_mm,
                    rows_q,
                    Wr_q.transpose(1, 2),
                    rows_s,
                    Wr_s,
                    offs=offsets,
                    out_dtype=torch.bfloat16,
                )
                grouped = functools.partial(torch._grouped_mm, rows, W, offs=offsets)
                for variant, call in (
                    ("moe_matmul_fp8", ours),
                    ("scaled_grouped_mm core", scaled),
                    ("grouped_mm core bf16", grouped),
                ):
                    try:
                        ms = mh.time_ms(call)
                    except Exception as error:  # a peer the installed torch refuses
                        record(
                            "gemm",
                            model=name,
                            gemm=gemm,
                            T=T,
                            variant=variant,
                            error=repr(error)[:300],
                        )
                        continue
                    record(
                        "gemm",
                        model=name,
                        gemm=gemm,
                        T=T,
                        variant=variant,
                        ms=round(ms, 3),
                        tflops=round(flops / ms / 1e9, 1),
                    )
                # this GEMM's quantized copies go before the next GEMM's are made
                del ours, scaled, grouped, call, rows, rows_q, rows_s, Wr_q, Wr_s
                torch.cuda.empty_cache()
        del bf16, fp8
        torch.cuda.empty_cache()


def fp8_decode():
    """The FP8 layer in a CUDA graph at T = 1, 8, 64 against the copy rate of the e4m3 bytes of
    the experts its pairs touch (and the bf16 layer in a CUDA graph)."""
    copy_gbps = mh.copy_bandwidth_gbps()
    record("decode", copy_gbps=round(copy_gbps, 1))
    for name, H, I, E, k in MODELS:  # noqa: E741
        bf16, fp8 = experts(H, I, E)
        for T in (1, 8, 64):
            A, ids, w = routing(T, E, k, H)
            active = ids.unique().numel()
            fp8_bytes = active * 3 * H * I
            for variant, call in (
                ("fp8", functools.partial(mh.moe_experts_fp8, A, *fp8, ids, w)),
                ("bf16", functools.partial(mh.moe_experts, A, *bf16, ids, w)),
            ):
                ms = mh.time_ms(mh.cuda_graph_replay(call))
                row = dict(
                    model=name, T=T, variant=variant, active_experts=active, us=round(ms * 1e3, 1)
                )
                if variant == "fp8":
                    row["of_copy_rate"] = round(fp8_bytes / ms / 1e6 / copy_gbps, 3)
                record("decode", **row)
        del bf16, fp8
        torch.cuda.empty_cache()


def fp8_decode_parts():
    """The FP8 layer's CUDA graph at one token, kernel by kernel: each GPU kernel of one replay
    (``mh.call_timeline``), its duration and the gap before it, against the time copying the
    active experts' e4m3 weights takes at the copy rate."""
    copy_gbps = mh.copy_bandwidth_gbps()
    for name, H, I, E, k in MODELS:  # noqa: E741
        fp8 = experts(H, I, E)[1]  # the bf16 weights freed at once
        A, ids, w = routing(1, E, k, H)
        replay = mh.cuda_graph_replay(functools.partial(mh.moe_experts_fp8, A, *fp8, ids, w))
        kernels = mh.call_timeline(replay).query("lane == 'GPU'").sort_values("start_us")
        copy_us = ids.unique().numel() * 3 * H * I / copy_gbps / 1e3
        record("decode_parts", model=name, copy_us=round(copy_us, 1))
        previous_end = kernels["start_us"].iloc[0]
        for kernel in kernels.itertuples():
            record(
                "decode_parts",
                model=name,
                kernel=kernel.name[:60],
                us=round(kernel.end_us - kernel.start_us, 1),
                gap_before_us=round(kernel.start_us - previous_end, 1),
            )
            previous_end = kernel.end_us
        del fp8
        torch.cuda.empty_cache()


# (name, gate_up entries, down entries) set on the e4m3 16-row configs, the decode token block:
# deeper pipelines and more warps (more bytes in flight per SM), a K tile of 64, down's N tile
# of 64 (twice the programs; gate_up's N tile is the activation's scale group, 128), the K loop
# (the second of the kernels' two loops, after the grid's) unrolled twice or pipelined by its
# own tl.range(num_stages=...) annotation, which makes Triton pipeline every load in it, and
# the weight tiles' loads marked evict-first (read once: gate_up's loads 4 and 5, down's load
# 2, in the order the kernels' Triton code issues them), and W's tiles loaded through tensor
# descriptors (TMA; the prefill's 128-row gate_up entry loads them so).
EVICT_WEIGHTS = (
    {"load_eviction_policies": ["", "", "", "", "first", "first", "", ""]},
    {"load_eviction_policies": ["", "", "first", "", "", "", ""]},
)
DECODE_VARIANTS = [
    ("default", {}, {}),
    ("6 stages", {"num_stages": 6}, {"num_stages": 6}),
    ("K loop unrolled 2x", {"range_unroll_factors": [0, 2]}, {"range_unroll_factors": [0, 2]}),
    ("K loop pipelined by tl.range", {"range_num_stages": [0, 4]}, {"range_num_stages": [0, 4]}),
    ("weights evict first", *EVICT_WEIGHTS),
    (
        "6 stages, weights evict first",
        {**EVICT_WEIGHTS[0], "num_stages": 6},
        {**EVICT_WEIGHTS[1], "num_stages": 6},
    ),
    ("8 warps", {"num_warps": 8}, {"num_warps": 8}),
    ("tensor descriptors", *({"indexing": "tensor_descriptor"},) * 2),
    ("tensor descriptors, 6 stages", *({"indexing": "tensor_descriptor", "num_stages": 6},) * 2),
    ("K tile 64", {"block_sizes": [16, 128, 64]}, {"block_sizes": [16, 128, 64]}),
    ("down N tile 64", {}, {"block_sizes": [16, 64, 128]}),
    (
        "down N tile 64, 6 stages",
        {"num_stages": 6},
        {"block_sizes": [16, 64, 128], "num_stages": 6},
    ),
]


def record_decode_graph(section, call, inputs, copy_gbps, **row):
    """``call``, the FP8 layer on ``inputs`` (A, its four FP8 weight tensors, ids, weights),
    checked against float64, then its CUDA graph timed and recorded with the rate at which it
    reads the active experts' e4m3 bytes, over the copy rate."""
    _, W_gate_up, _, W_down, _, ids, _ = inputs
    mh.assert_experts_fp8_close(call(), *inputs)
    ms = mh.time_ms(mh.cuda_graph_replay(call))
    fp8_bytes = ids.unique().numel() * (W_gate_up[0].numel() + W_down[0].numel())
    of_copy = round(fp8_bytes / ms / 1e6 / copy_gbps, 3)
    record(section, **row, us=round(ms * 1e3, 1), of_copy_rate=of_copy)


def fp8_decode_configs():
    """The FP8 layer in a CUDA graph at T = 1 and 8 with each of ``DECODE_VARIANTS`` on its
    16-row e4m3 configs, against the copy rate of the active experts' e4m3 bytes (issue 32's
    0.85 at one token); every row of each output checked against float64."""
    copy_gbps = mh.copy_bandwidth_gbps()
    for name, H, I, E, k in MODELS:  # noqa: E741
        fp8 = experts(H, I, E)[1]  # the bf16 weights freed at once
        for T in (1, 8):
            A, ids, w = routing(T, E, k, H)
            base = mh.flat_layer_configs(torch.float8_e4m3fn, ids.numel(), E)
            assert base[0]["block_sizes"][0] == 16  # the token block DECODE_VARIANTS set
            for variant, gate_up_options, down_options in DECODE_VARIANTS:
                configs = tuple(
                    with_options(c, o)
                    for c, o in zip(base, (gate_up_options, down_options), strict=True)
                )
                call = functools.partial(mh.moe_experts_fp8, A, *fp8, ids, w, configs=configs)
                row = dict(model=name, T=T, variant=variant)
                record_decode_graph("decode_configs", call, (A, *fp8, ids, w), copy_gbps, **row)
        del fp8
        torch.cuda.empty_cache()


# The probe's kernels in the place of the package's, by the name helion_moe/fp8.py calls them.
SWAPPED_KERNELS = {
    "moe_gate_up_flat_fp8": swapped.moe_gate_up_flat_fp8_swapped,
    "moe_matmul_flat_fp8": swapped.moe_matmul_flat_fp8_swapped,
}
GATE_UP, DOWN = SWAPPED_KERNELS
# (name, the kernels swapped, options on both configs)
SWAPPED_VARIANTS = [
    ("default", (), {}),
    ("swapped both", (GATE_UP, DOWN), {}),
    ("swapped gate_up", (GATE_UP,), {}),
    ("swapped down", (DOWN,), {}),
    ("swapped both, 6 stages", (GATE_UP, DOWN), {"num_stages": 6}),
    ("swapped both, tensor descriptors", (GATE_UP, DOWN), {"indexing": "tensor_descriptor"}),
]


def fp8_decode_swapped():
    """The FP8 layer in a CUDA graph at T = 1, 8 and 64 (16-row blocks at all three) with each
    of ``SWAPPED_VARIANTS``, against the copy rate of the active experts' e4m3 bytes; every
    output checked against float64 first."""
    copy_gbps = mh.copy_bandwidth_gbps()
    for name, H, I, E, k in MODELS:  # noqa: E741
        fp8 = experts(H, I, E)[1]
        for T in (1, 8, 64):
            A, ids, w = routing(T, E, k, H)
            base = mh.flat_layer_configs(torch.float8_e4m3fn, max(2, T) * k, E)
            assert base[0]["block_sizes"][0] == 16 and I % mh.FP8_GROUP == 0
            for variant, swaps, options in SWAPPED_VARIANTS:
                configs = tuple(with_options(c, options) for c in base)
                call = functools.partial(mh.moe_experts_fp8, A, *fp8, ids, w, configs=configs)
                with contextlib.ExitStack() as patches:
                    for kernel in swaps:
                        patches.enter_context(
                            mock.patch.object(fp8_module, kernel, SWAPPED_KERNELS[kernel])
                        )
                    row = dict(model=name, T=T, variant=variant)
                    record_decode_graph("decode_swapped", call, (A, *fp8, ids, w), copy_gbps, **row)
        del fp8
        torch.cuda.empty_cache()


# The hidden's sizes beside the models': tests/test_fp8.py's one-expert case, whose K of 128 is
# one e4m3 dot per value (name, H, I, E, top_k, T), with SwiGLU and gpt-oss's activation.
HIDDEN_CASES = [
    *((*model, 8, SWIGLU) for model in MODELS),
    ("K = 128", 128, 256, 1, 1, 256, SWIGLU),
    ("K = 128, gpt-oss activation", 128, 256, 1, 1, 256, tuple(mh.GPT_OSS_ACTIVATION)),
]


def fp8_hidden():
    """The fused gate_up kernel's e4m3 hidden against float64's rounding of the same values,
    for the pairs of ``HIDDEN_CASES``: how many values the kernel rounded the other way, and
    the slack that ``mh.e4m3_rounding_ambiguity`` needs to cover them all (the largest distance
    of such a value's float64 quotient from the midpoint it crossed, over 448), against
    ``mh.FP8_HIDDEN_SLACK``; and the largest relative difference of the scales."""
    for name, H, I, E, k, T, activation in HIDDEN_CASES:  # noqa: E741
        _, (W_gate_up, gate_up_scales, _, _) = experts(H, I, E)
        A, ids, _ = routing(T, E, k, H)
        A_q, A_scales = mh.quantize_activations_fp8(A)
        aligned = mh.align_to_blocks(ids, E, 16)
        stored, nk_layout = mh.expert_weights_in_place(W_gate_up)
        scales = gate_up_scales.transpose(1, 2).contiguous()
        args = (A_q, A_scales, stored, scales, aligned.sorted_pair_ids, aligned.block_expert_ids)
        _, config = mh.split_token_block(mh.GATE_UP_CONFIGS[mh.FP8_DTYPE][16])
        index_dtype = mh.kernel_index_dtype(A, W_gate_up, ids.numel())
        hidden, hidden_scales = mh.run_kernel(
            mh.moe_gate_up_flat_fp8,
            (*args, k, nk_layout, activation, I % 128 == 0),
            config,
            index_dtype,
        )
        A_values = mh.dequantize_fp8(A_q, A_scales).double()
        needed, flips, scale_error = 0.0, 0, 0.0
        for p, e in enumerate(ids.flatten().tolist()):
            gate_up = A_values[p // k] @ mh.dequantize_fp8(W_gate_up[e], gate_up_scales[e]).double()
            exact = mh.gated_product_reference(
                mh.GatedActivation(*activation), gate_up[:I], gate_up[I:]
            )
            q, _ = mh.quantize_blocks_fp8(exact[None].float(), 1)
            s_exact = exact.view(-1, 128).abs().amax(1) / mh.E4M3_MAX
            scale_error = max(
                scale_error, ((hidden_scales[p] - s_exact) / s_exact).abs().max().item()
            )
            other = hidden[p].float() != q[0].float()
            if other.any():
                quotients = (exact.view(-1, 128) / s_exact[:, None]).flatten()[other]
                for slack in (2.0**-n for n in range(24, 4, -1)):
                    if (mh.e4m3_rounding_ambiguity(quotients, slack) > 0).all():
                        needed = max(needed, slack)
                        break
                else:
                    needed = float("inf")
                flips += int(other.sum())
        record(
            "hidden",
            model=name,
            values=ids.numel() * I,
            rounded_otherwise=flips,
            slack_needed=needed,
            slack_assumed=mh.FP8_HIDDEN_SLACK,
            largest_scale_error=scale_error,
        )
        del W_gate_up, gate_up_scales
        torch.cuda.empty_cache()


SECTIONS = {
    "hidden": fp8_hidden,
    "layer": fp8_layer,
    "layer_tails": fp8_layer_tails,
    "tma": fp8_tma,
    "prefill_configs": fp8_prefill_configs,
    "prefill_expert_groups": fp8_prefill_expert_groups,
    "gemm": fp8_gemm,
    "decode": fp8_decode,
    "decode_parts": fp8_decode_parts,
    "decode_configs": fp8_decode_configs,
    "decode_swapped": fp8_decode_swapped,
}

if __name__ == "__main__":
    run_sections(SECTIONS)
