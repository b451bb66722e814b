"""GPU probe of the layer at prefill, end to end against grouped_mm's core in the same run: the
schedule of its two flat kernels (Helion config options the course's tables do not set, each on
top of the configs ``mh.layer_configs`` picks, through ``mh.moe_experts``), and what its combine
kernel gains (through the transformers module, as a model calls it).

    python probes/prefill_probe.py SECTION [SECTION ...]
    (schedules, combine, drift, aligned, half_tails, held_out, expert_groups)

``schedules``: at each of ``mh.LAYER_TABLE_MODELS``' sizes (or those named in $PREFILL_MODELS) and
T = 4096 and 16384 (or $PREFILL_TOKENS), uniform top-k routing, bf16 weights in transformers'
layout read in place ("nk"), and with $PREFILL_LAYOUTS=nk,kn also copied to [E, K, N] ("kn", the
layer table's "helion, [E, K, N] weights"): the default configs, then each variant (or those named
in $PREFILL_VARIANTS) applied to both kernels ("A/B": A to the gate_up kernel, B to the down one):
``l2_groupings=[1]`` ("ungrouped": consecutive programs take consecutive token blocks of one N
tile) or more (groups of token blocks walk the N tiles together, so their rows of A can stay in L2),
``pid_type`` persistent (one program per SM walking the work), ``loop_orders`` (N tiles of one
block together), ``indexing="tensor_descriptor"`` (TMA loads where the index is affine, the
weights), deeper pipelines, and the K loop warp-specialized (producer and consumer warps; Helion
offers it only where Triton can) or unrolled. Rows that differ from float64 on 8 sampled tokens
raise.

``combine``: at the same models and token counts, the layer as a model calls it (the
transformers module on the "helion" backend, the layer table's "helion" row) with its combine
kernel ``sum_pair_rows`` and with the torch ops it replaced (``torch_combine``), beside grouped_mm
core: the combine kernel's gain end to end, every peer in the same run.

``drift``: grouped_mm core and the layer (grouped and ungrouped) timed in turn for several rounds
at two 16384-token points, each timing with the card's SM clock, temperature and power: whether
the core's time, which differed by up to 1.28x between processes, follows the card's state.

``aligned``: the layer at the same models and token counts with each expert's run of token blocks
padded to whole L2 groups of 4 (what ``mh.moe_experts`` does), so that no group of programs holds
two experts' blocks, against runs of single blocks and ungrouped, beside grouped_mm core.

``half_tails``: the layer with its flat kernels' ``half_tails`` flag (a block whose second half
holds no pair runs at half height) forced off, on, then off again, beside grouped_mm core, with
the blocks that hold pairs and those at most half full. $PREFILL_TOKENS defaults to
4096,8192,16384 here.

``held_out``: the layer as a model calls it (the transformers module on the "helion" backend, the
layer table's "helion" row) beside grouped_mm core, at the routed experts of ``HELD_OUT_MODELS``,
models no table of the course times (60 experts, top-6, sizes between the table's), T = 4096 and
16384 (or $PREFILL_TOKENS); 8 rows checked against float64.

``expert_groups``: the layer with both flat kernels replaced by those of
``expert_group_kernels.py`` (each expert's blocks one L2 group, or groups of at most 8 of them;
no run padding), between two runs
of the layer as it is, beside grouped_mm core, at the same models and token counts; the outputs
must equal the layer's bit for bit.
"""

import moe_helpers as mh
from helion_moe import layer as layer_module

import contextlib
import functools
import itertools
import os
import subprocess
from unittest import mock

import expert_group_kernels as groups
import torch
from probe_common import chosen, chosen_tokens, record, run_sections, with_options

VARIANTS = {  # name -> config entries added to (or replacing) a kernel's config
    "default": {},
    "ungrouped": {"l2_groupings": [1]},
    "persistent blocked": {"pid_type": "persistent_blocked"},
    "persistent interleaved": {"pid_type": "persistent_interleaved"},
    "l2 groups of 2": {"l2_groupings": [2]},
    "l2 groups of 4": {"l2_groupings": [4]},
    "l2 groups of 8": {"l2_groupings": [8]},
    "l2 groups of 16": {"l2_groupings": [16]},
    "N tiles first": {"loop_orders": [[1, 0]], "l2_groupings": [1]},  # the loop order alone
    "tensor descriptors": {"indexing": "tensor_descriptor"},
    "4 stages": {"num_stages": 4},
    "persistent + l2 groups of 8": {"pid_type": "persistent_interleaved", "l2_groupings": [8]},
    "K loop warp-specialized": {"range_warp_specializes": [True]},
    "K loop unrolled twice": {"range_unroll_factors": [2]},
}


def chosen_variants() -> list[str]:
    """$PREFILL_VARIANTS (comma-separated; every one of ``VARIANTS`` when unset)."""
    return os.environ.get("PREFILL_VARIANTS", ",".join(VARIANTS)).split(",")


def variant_options(name: str) -> tuple[dict, dict]:
    """The config entries of a variant for the gate_up and the down kernel: "NAME" applies
    ``VARIANTS[NAME]`` to both, "GATE_UP_NAME/DOWN_NAME" one to each."""
    parts = name.split("/")
    unknown = [part for part in parts if part not in VARIANTS]
    if unknown or len(parts) > 2:
        raise ValueError(f"$PREFILL_VARIANTS names {name!r}; known: {list(VARIANTS)}")
    return VARIANTS[parts[0]], VARIANTS[parts[-1]]


def chosen_models(
    default: list[str] | None = None, models: tuple[mh.MoEModel, ...] = mh.LAYER_TABLE_MODELS
) -> list[mh.MoEModel]:
    """The ``models`` (the layer table's) named in $PREFILL_MODELS, else ``default``, else all."""
    every = [m.name for m in models]
    names = chosen("PREFILL_MODELS", every) if "PREFILL_MODELS" in os.environ else default or every
    return [m for m in models if m.name in names]


def core_call(model, A, ids, gate_up, down, layer_options):
    """grouped_mm core on the point's rows pre-sorted by expert, ready to call."""
    sorted_tokens, offsets = mh.pairs_sorted_by_expert(ids, model.E)
    row_experts = ids.flatten().sort().values  # the expert of each sorted row
    return functools.partial(
        mh.grouped_mm_experts_core,
        A[sorted_tokens],
        gate_up,
        down,
        offsets,
        row_experts,
        **layer_options,
    )


def prefill_point(section, model, T, gate_up, down, layer_options):
    """A point's input, uniform top-k routing and flops, with grouped_mm core timed (and
    recorded) on its rows pre-sorted by expert."""
    g = torch.Generator(mh.DEVICE).manual_seed(T)
    A = torch.randn(T, model.H, generator=g, device=mh.DEVICE).to(torch.bfloat16)
    ids, weights = mh.model_routing(T, model.E, model.top_k, 0.0)
    core_ms = mh.time_ms(core_call(model, A, ids, gate_up, down, layer_options))
    flops = 6 * ids.numel() * model.H * model.I
    row = dict(model=model.name, T=T, ms=round(core_ms, 3), tflops=round(flops / core_ms / 1e9, 1))
    record(section, variant="grouped_mm core", **row)
    return A, ids, weights, core_ms, flops


def schedules():
    layouts = os.environ.get("PREFILL_LAYOUTS", "nk").split(",")
    variants = {name: variant_options(name) for name in chosen_variants()}
    for model, layout in itertools.product(chosen_models(), layouts):
        experts = mh.transformers_experts_module(model)
        gate_up, down, layer_options = mh.transformers_layer_arguments(experts)  # gpt-oss's too
        if layout == "kn":
            gate_up, down = gate_up.contiguous(), down.contiguous()
        for T in chosen_tokens("PREFILL_TOKENS", "4096,16384"):
            A, ids, weights, core_ms, flops = prefill_point(
                "schedules", model, T, gate_up, down, layer_options
            )
            base = mh.flat_layer_configs(torch.bfloat16, ids.numel(), model.E)
            rows = torch.arange(8, device=mh.DEVICE)
            for name, options in variants.items():
                configs = tuple(with_options(c, o) for c, o in zip(base, options, strict=True))
                call = functools.partial(
                    mh.moe_experts, A, gate_up, down, ids, weights, configs=configs, **layer_options
                )
                try:
                    out = call()
                    mh.assert_experts_close(
                        out, A, gate_up, down, ids, weights, rows=rows, **layer_options
                    )
                    ms = mh.time_ms(call)
                except Exception as error:  # an option this kernel or card does not take
                    record(
                        "schedules",
                        model=model.name,
                        T=T,
                        variant=name,
                        layout=layout,
                        error=repr(error)[:300],
                    )
                    continue
                record(
                    "schedules",
                    model=model.name,
                    T=T,
                    variant=name,
                    layout=layout,
                    ms=round(ms, 3),
                    tflops=round(flops / ms / 1e9, 1),
                    of_core=round(core_ms / ms, 3),
                )
        del experts
        torch.cuda.empty_cache()


def torch_combine(
    pair_outputs: torch.Tensor,  # [T, k, N]
    plus: torch.Tensor | None = None,  # [T, N] float32
    skip_outside: tuple[torch.Tensor, int] | None = None,  # (expert_ids, E)
) -> torch.Tensor:  # [T, N]
    """The combine that ``sum_pair_rows`` replaced, in torch ops: the sentinel pairs' rows
    zeroed (a pass over the [T, k, N] pair outputs), then at top-1 without a bias that row, else
    the float32 sum over k, the bias share added, one rounding."""
    if skip_outside is not None:
        pair_outputs = mh.zero_sentinel_pairs(pair_outputs, *skip_outside)
    if plus is None and pair_outputs.shape[1] == 1:
        return pair_outputs[:, 0]
    total = pair_outputs.sum(1, dtype=torch.float32)
    return (total if plus is None else total + plus).to(pair_outputs.dtype)


def combine():
    """The layer as a model calls it (the transformers module on "helion", the layer table's
    row) with its combine kernel and with the torch ops it replaced, beside grouped_mm core,
    all in one run: the step's gain end to end."""
    mh.register_transformers_experts()
    rows = torch.arange(8, device=mh.DEVICE)
    kernel = layer_module.sum_over_experts
    for model in chosen_models():
        experts = mh.transformers_experts_module(model)
        helion_experts = mh.with_experts_backend(experts, "helion")
        gate_up, down, layer_options = mh.transformers_layer_arguments(experts)
        for T in chosen_tokens("PREFILL_TOKENS", "4096,16384"):
            A, ids, weights, core_ms, flops = prefill_point(
                "combine", model, T, gate_up, down, layer_options
            )
            call = functools.partial(helion_experts, A, ids, weights)
            for name, combine_fn in (("sum_pair_rows", kernel), ("torch ops", torch_combine)):
                swap = mock.patch.object(layer_module, "sum_over_experts", combine_fn)
                # launched one by one: a replayed call would reuse the graph of the other combine
                with swap, mh.decode_replay(False):
                    out = call()
                    mh.assert_experts_close(
                        out, A, gate_up, down, ids, weights, rows=rows, **layer_options
                    )
                    ms = mh.time_ms(call)
                record(
                    "combine",
                    model=model.name,
                    T=T,
                    variant=name,
                    ms=round(ms, 3),
                    tflops=round(flops / ms / 1e9, 1),
                    of_core=round(core_ms / ms, 3),
                )
        del experts, helion_experts
        torch.cuda.empty_cache()


def gpu_state() -> dict:
    """The card's SM clock (MHz), temperature (C) and power (W) now, from nvidia-smi."""
    query = "--query-gpu=clocks.sm,temperature.gpu,power.draw"
    out = subprocess.run(
        ["nvidia-smi", query, "--format=csv,noheader,nounits"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\n")[0]
    clock, temperature, power = (float(value) for value in out.split(","))
    return dict(sm_mhz=clock, celsius=temperature, watts=power)


def drift():
    """grouped_mm core and the layer (its configs, and ungrouped) timed in turn, round after
    round ($PREFILL_ROUNDS, 5), at DeepSeek-V3 and Mixtral-8x7B (or $PREFILL_MODELS) with 16384
    tokens (or $PREFILL_TOKENS), with the card's clock, temperature and power before each
    timing: whether a peer's time moves with the card's state or with what ran before it."""
    rounds = int(os.environ.get("PREFILL_ROUNDS", "5"))
    for model in chosen_models(["DeepSeek-V3", "Mixtral-8x7B"]):
        experts = mh.transformers_experts_module(model)
        gate_up, down, layer_options = mh.transformers_layer_arguments(experts)
        for T in chosen_tokens("PREFILL_TOKENS", "16384"):
            A, ids, weights, _, flops = prefill_point(
                "drift", model, T, gate_up, down, layer_options
            )
            layer = functools.partial(
                mh.moe_experts, A, gate_up, down, ids, weights, **layer_options
            )
            base = mh.flat_layer_configs(A.dtype, ids.numel(), model.E)
            ungrouped = tuple(with_options(c, VARIANTS["ungrouped"]) for c in base)
            calls = {
                "grouped_mm core": core_call(model, A, ids, gate_up, down, layer_options),
                "layer": layer,
                "layer, ungrouped": functools.partial(layer, configs=ungrouped),
            }
            for round_, (name, call) in itertools.product(range(rounds), calls.items()):
                state = gpu_state()
                ms = mh.time_ms(call)
                row = dict(model=model.name, T=T, round=round_, variant=name, ms=round(ms, 3))
                record("drift", **row, tflops=round(flops / ms / 1e9, 1), **state)
        del experts
        torch.cuda.empty_cache()


def aligned():
    """The layer (``mh.moe_experts``, its default configs) at each model's prefill points with
    each expert's run of token blocks padded to a whole number of L2 groups of 4 (the default,
    ``mh.flat_run_blocks``), against the same configs on runs padded to single blocks (a group
    may then hold two experts' blocks) and ungrouped, beside grouped_mm core. The outputs of
    all three must be equal bit for bit: the same blocks, in other places and order."""
    for model in chosen_models():
        experts = mh.transformers_experts_module(model)
        gate_up, down, options = mh.transformers_layer_arguments(experts)
        for T in chosen_tokens("PREFILL_TOKENS", "4096,16384"):
            A, ids, weights, core_ms, flops = prefill_point(
                "aligned", model, T, gate_up, down, options
            )
            grouped = mh.flat_layer_configs(A.dtype, ids.numel(), model.E)
            ungrouped = tuple(with_options(c, VARIANTS["ungrouped"]) for c in grouped)
            single_blocks = mock.patch.object(layer_module, "flat_run_blocks", lambda *_: 1)
            layer = functools.partial(mh.moe_experts, A, gate_up, down, ids, weights, **options)
            runs = {  # name: (call, the context it runs in)
                "ungrouped": (
                    functools.partial(layer, configs=ungrouped),
                    contextlib.nullcontext(),
                ),
                "l2 groups of 4, runs of single blocks": (layer, single_blocks),
                "l2 groups of 4, runs of whole groups": (layer, contextlib.nullcontext()),
            }
            reference = None
            for name, (call, context) in runs.items():
                with context:
                    out = call()
                    reference = out if reference is None else reference
                    if not torch.equal(out, reference):
                        raise AssertionError(f"{model.name}, T = {T}: {name} changed a row")
                    ms = mh.time_ms(call)
                row = dict(model=model.name, T=T, variant=name, ms=round(ms, 3))
                row |= dict(tflops=round(flops / ms / 1e9, 1), of_core=round(core_ms / ms, 3))
                record("aligned", **row)
        del experts
        torch.cuda.empty_cache()


def half_tails():
    """The layer with the flat kernels' ``half_tails`` flag forced off, on and off again,
    beside grouped_mm core; 8 rows of each output checked against float64."""
    rows = torch.arange(8, device=mh.DEVICE)
    for model in chosen_models():
        experts = mh.transformers_experts_module(model)
        gate_up, down, options = mh.transformers_layer_arguments(experts)
        for T in chosen_tokens("PREFILL_TOKENS", "4096,8192,16384"):
            A, ids, weights, core_ms, flops = prefill_point(
                "half_tails", model, T, gate_up, down, options
            )
            block_t = mh.flat_token_block(ids.numel(), model.E)
            routing = mh.align_to_blocks(ids, model.E, block_t)
            used = routing.block_expert_ids < model.E
            tails = (routing.sorted_pair_ids[:, block_t // 2] >= ids.numel()) & used
            layer = functools.partial(mh.moe_experts, A, gate_up, down, ids, weights, **options)
            for name, flag in (("off", False), ("on", True), ("off again", False)):
                with mock.patch.object(layer_module, "flat_half_tails", lambda *_, f=flag: f):
                    out = layer()
                    mh.assert_experts_close(
                        out, A, gate_up, down, ids, weights, rows=rows, **options
                    )
                    ms = mh.time_ms(layer)
                row = dict(model=model.name, T=T, variant=name, ms=round(ms, 3))
                row |= dict(tflops=round(flops / ms / 1e9, 1), of_core=round(core_ms / ms, 3))
                row |= dict(block_t=block_t, blocks=int(used.sum()), half_blocks=int(tails.sum()))
                record("half_tails", **row)
        del experts
        torch.cuda.empty_cache()


# The routed experts of public models that no table of the course times, from their configs
# (hidden size, expert intermediate size, routed experts, experts per token).
HELD_OUT_MODELS = (
    mh.MoEModel("OLMoE-1B-7B", H=2048, I=1024, E=64, top_k=8),
    mh.MoEModel("Qwen1.5-MoE-A2.7B", H=2048, I=1408, E=60, top_k=4),
    mh.MoEModel("DeepSeek-V2-Lite", H=2048, I=1408, E=64, top_k=6),
    mh.MoEModel("GLM-4.5-Air", H=4096, I=1408, E=128, top_k=8),
    mh.MoEModel("GLM-4.5", H=5120, I=1536, E=160, top_k=8),
    mh.MoEModel("Phi-3.5-MoE", H=4096, I=6400, E=16, top_k=2),
    mh.MoEModel("DBRX", H=6144, I=10752, E=16, top_k=4),
    mh.MoEModel("Mixtral-8x22B", H=6144, I=16384, E=8, top_k=2),
    mh.MoEModel("Snowflake-Arctic", H=7168, I=4864, E=128, top_k=2),
    mh.MoEModel("gpt-oss-20b", H=2880, I=2880, E=32, top_k=4, experts_class="GptOssExperts"),
)


def held_out():
    """The "helion" layer as transformers calls it, beside grouped_mm core, at
    ``HELD_OUT_MODELS`` (or those named in $PREFILL_MODELS)."""
    rows = torch.arange(8, device=mh.DEVICE)
    mh.register_transformers_experts()
    for model in chosen_models(models=HELD_OUT_MODELS):
        experts = mh.transformers_experts_module(model)
        gate_up, down, options = mh.transformers_layer_arguments(experts)
        layer = mh.with_experts_backend(experts, "helion")
        for T in chosen_tokens("PREFILL_TOKENS", "4096,16384"):
            A, ids, weights, core_ms, flops = prefill_point(
                "held_out", model, T, gate_up, down, options
            )
            call = functools.partial(layer, A, ids, weights)
            mh.assert_experts_close(call(), A, gate_up, down, ids, weights, rows=rows, **options)
            ms = mh.time_ms(call)
            row = dict(model=model.name, T=T, variant="helion", ms=round(ms, 3))
            row |= dict(tflops=round(flops / ms / 1e9, 1), of_core=round(core_ms / ms, 3))
            record("held_out", **row, block_t=mh.flat_token_block(ids.numel(), model.E))
        del experts, layer
        torch.cuda.empty_cache()


def expert_groups():
    """The layer as it runs, with the expert-grouped kernels (whole runs, then groups of at most
    8 blocks), and as it runs again, beside grouped_mm core; every output equal to the first bit
    for bit."""
    variants = {  # name: the context it runs in
        "as it runs": contextlib.nullcontext,
        "expert groups": functools.partial(groups.expert_groups, layer_module),
        "expert groups of at most 8 blocks": functools.partial(
            groups.expert_groups, layer_module, 8
        ),
        "as it runs again": contextlib.nullcontext,
    }
    for model in chosen_models():
        experts = mh.transformers_experts_module(model)
        gate_up, down, options = mh.transformers_layer_arguments(experts)
        for T in chosen_tokens("PREFILL_TOKENS", "4096,16384"):
            A, ids, weights, core_ms, flops = prefill_point(
                "expert_groups", model, T, gate_up, down, options
            )
            layer = functools.partial(mh.moe_experts, A, gate_up, down, ids, weights, **options)
            reference = layer()
            for name, context in variants.items():
                with context():
                    if not torch.equal(layer(), reference):
                        raise AssertionError(f"{model.name}, T = {T}: {name} changed a row")
                    ms = mh.time_ms(layer)
                row = dict(model=model.name, T=T, variant=name, ms=round(ms, 3))
                row |= dict(tflops=round(flops / ms / 1e9, 1), of_core=round(core_ms / ms, 3))
                record("expert_groups", **row)
        del experts
        torch.cuda.empty_cache()


SECTIONS = {
    "schedules": schedules,
    "combine": combine,
    "drift": drift,
    "aligned": aligned,
    "half_tails": half_tails,
    "held_out": held_out,
    "expert_groups": expert_groups,
}

if __name__ == "__main__":
    run_sections(SECTIONS)
