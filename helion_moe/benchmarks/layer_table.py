"""The layer table (notebooks 10 and 15): the "helion" experts backend against transformers' own
backends and ``torch._grouped_mm`` at public models' sizes, eager and in CUDA graphs.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.metadata
import math
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from ..checks import assert_experts_close
from ..configs import FLAT_CONFIGS, RESULTS_DIR, flat_token_block, layer_path, split_token_block
from ..decode_graphs import host_paced
from ..kernels.activations import GatedActivation, as_gated_activation
from ..kernels.flat import moe_matmul_flat
from ..launch import kernel_index_dtype, run_kernel
from ..layer import _down_bias_share, moe_experts
from ..matmul import one_token_as_two, pair_weights, sum_over_experts
from ..metadata import align_to_blocks
from ..mode import DEVICE
from ..references import gated_product_reference
from ..routing import cpu_generator
from ..sorting import sort_tokens_by_expert
from ..transformers_backend import register_transformers_experts, transformers_layer_arguments
from . import timing
from .model_table import MODEL_TABLE_DECODE_MAX_TOKENS
from .shapes import MOE_MODELS, MoEModel, model_routing

__all__ = [
    "BATCHED_MM_MAX_BYTES",
    "LAYER_DECODE_PATH",
    "LAYER_TABLE_CHECKED_ROWS",
    "LAYER_TABLE_MODELS",
    "LAYER_TABLE_PATH",
    "LAYER_TABLE_TOKENS",
    "TRANSFORMERS_BACKENDS",
    "gated_hidden",
    "grouped_mm_experts_core",
    "layer_table_point",
    "layer_table_speedups",
    "pairs_sorted_by_expert",
    "run_layer_table",
    "transformers_experts_module",
    "unfused_experts",
    "with_experts_backend",
    "with_layer_machine_info",
]

# The layer table (notebooks 10 and 15): one MoE layer's experts at each MOE_MODELS size, through
# transformers' experts interface, with every built-in backend and torch._grouped_mm as peers.
LAYER_TABLE_TOKENS = (1, 8, 64, 4096, 16384)


LAYER_TABLE_PATH = RESULTS_DIR / "layer_table.csv"


LAYER_DECODE_PATH = RESULTS_DIR / "layer_decode.csv"


TRANSFORMERS_BACKENDS = ("eager", "batched_mm", "grouped_mm")


# batched_mm gathers every pair's weights ([P, 2I, H] and [P, H, I]); past this many bytes of
# them it is not run (DeepSeek-V3 at 64 tokens would gather 45 GB).
BATCHED_MM_MAX_BYTES = 24 * 2**30


LAYER_TABLE_CHECKED_ROWS = 8  # tokens per point checked against the float64 reference


# The layer table's models past MOE_MODELS' six sizes: gpt-oss-120b's own experts
# (GptOssExperts: a bias on each GEMM, interleaved gate and up columns, the clamped gate) in
# place of a MixtralExperts of its sizes, and Qwen3-Next-80B-A3B's 512 experts, top-10.
LAYER_TABLE_MODELS = (
    *(
        dataclasses.replace(model, experts_class="GptOssExperts")
        if model.name == "gpt-oss-120b"
        else model
        for model in MOE_MODELS
    ),
    MoEModel("Qwen3-Next-80B-A3B", H=2048, I=512, E=512, top_k=10),
)


def transformers_experts_module(model: MoEModel, seed: int = 0) -> torch.nn.Module:
    """transformers' experts module of ``model.experts_class`` at ``model``'s sizes, with random
    bf16 weights drawn on the device, scaled to keep unit variance, and biases of std 0.02: a
    ``MixtralExperts`` (gate_up_proj [E, 2I, H], down_proj [E, H, I], SiLU, the layout of
    Mixtral, Qwen3-MoE and DeepSeek-V3) or a ``GptOssExperts`` (gate_up_proj [E, H, 2I] with
    interleaved gate and up columns, down_proj [E, I, H], a bias on each, the clamped gate).

    Taught in notebook 10.
    """
    from transformers import GptOssConfig, MixtralConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config_class, module_class = {
        "MixtralExperts": (MixtralConfig, MixtralExperts),
        "GptOssExperts": (GptOssConfig, GptOssExperts),
    }[model.experts_class]
    config = config_class(
        hidden_size=model.H,
        intermediate_size=model.I,
        num_local_experts=model.E,
        num_experts_per_tok=model.top_k,
    )
    with torch.device("meta"):
        experts = module_class(config)
    generator = torch.Generator(DEVICE).manual_seed(seed)
    fan_in = {"gate_up_proj": model.H, "down_proj": model.I}
    for name, parameter in list(experts.named_parameters()):
        values = torch.randn(
            parameter.shape, generator=generator, device=DEVICE, dtype=torch.bfloat16
        )
        values.mul_(0.02 if name.endswith("_bias") else fan_in[name] ** -0.5)
        setattr(experts, name, torch.nn.Parameter(values, requires_grad=False))
    return experts


def with_experts_backend(experts: torch.nn.Module, implementation: str) -> torch.nn.Module:
    """A shallow copy of a transformers experts module (the same weights) whose forward runs
    the experts implementation ``implementation``, as ``set_experts_implementation`` sets it.

    Taught in notebook 10.
    """
    clone = copy.copy(experts)
    clone.config = copy.copy(experts.config)
    clone.config._experts_implementation = implementation
    return clone


def unfused_experts(
    A: torch.Tensor,  # [T, K]
    W_gate_up: torch.Tensor,  # [E, K, 2I]
    W_down: torch.Tensor,  # [E, I, N]
    expert_ids: torch.Tensor,  # [T, k]
    combine_weights: torch.Tensor,  # [T, k]
    **layer_options: object,  # activation, interleaved, gate_up_bias, down_bias: as moe_experts
) -> torch.Tensor:  # [T, N]
    """``moe_experts`` without the fused epilogue, to measure what the fusion saves: the flat
    kernel writes each pair's [2I] gate_up row, PyTorch adds its bias and computes the gate
    from it (``gated_hidden``), and the flat kernel runs the down GEMM. Same routing, same
    configs.

    Taught in notebook 10.
    """
    if A.shape[0] == 1:  # as moe_experts runs one token (one_token_as_two)
        A, expert_ids, combine_weights = one_token_as_two(A, expert_ids, combine_weights)
        out = unfused_experts(A, W_gate_up, W_down, expert_ids, combine_weights, **layer_options)
        return out[:1]
    T, top_k = expert_ids.shape
    E, I, N = W_down.shape  # noqa: E741
    block_t = flat_token_block(expert_ids.numel(), E)
    routing = align_to_blocks(expert_ids, E, block_t)
    ones = torch.ones(T, top_k, device=A.device)
    _, kernel_config = split_token_block(FLAT_CONFIGS[A.dtype][block_t])
    index_dtype = kernel_index_dtype(A, W_gate_up, T * top_k)
    gate_up_args = routing.kernel_args(A, W_gate_up, ones)
    gate_up = run_kernel(moe_matmul_flat, gate_up_args, kernel_config, index_dtype)
    hidden = gated_hidden(gate_up.view(T * top_k, 2 * I), expert_ids.flatten(), **layer_options)
    weights = pair_weights(expert_ids, combine_weights).view(-1, 1)
    down_args = routing.kernel_args(hidden, W_down, weights)
    down = run_kernel(moe_matmul_flat, down_args, kernel_config, index_dtype)
    plus = _down_bias_share(expert_ids, combine_weights, layer_options.get("down_bias"))
    return sum_over_experts(down.view(T, top_k, N), plus)


def gated_hidden(
    projected: torch.Tensor,  # [R, 2I] rows of A @ W_gate_up
    row_experts: torch.Tensor | None,  # [R] the expert of each row, read for gate_up_bias
    activation: str | GatedActivation = "silu",
    interleaved: bool = False,
    gate_up_bias: torch.Tensor | None = None,  # [E, 2I]
    down_bias: torch.Tensor | None = None,  # read by the caller, after the down GEMM
) -> torch.Tensor:  # [R, I]
    """The gated activation of gate_up rows in PyTorch ops, for the layer table's peers: each
    row's expert's bias added, gate and up split (concatenated or interleaved), and plain SiLU
    as ``silu(gate) * up`` (two ops), any other gate as ``gated_product_reference``.

    Taught in notebook 10.
    """
    if gate_up_bias is not None:
        projected = projected + gate_up_bias[row_experts]
    I = projected.shape[1] // 2  # noqa: E741
    if interleaved:
        gate, up = projected[:, ::2], projected[:, 1::2]
    else:
        gate, up = projected[:, :I], projected[:, I:]
    if as_gated_activation(activation) == GatedActivation():
        return torch.nn.functional.silu(gate) * up
    return gated_product_reference(activation, gate, up)


def pairs_sorted_by_expert(
    expert_ids: torch.Tensor,  # [T, k]
    num_experts: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([P] int64 token of each sorted pair, [E] int32 ends)
    """For grouped_mm core: each pair's token, pairs sorted by expert, and where each expert's
    rows end (``torch._grouped_mm``'s ``offs``).

    Taught in notebook 10.
    """
    sort = sort_tokens_by_expert(expert_ids.flatten(), num_experts)
    tokens = sort.sorted_to_orig_token_idx.long() // expert_ids.shape[1]
    return tokens, sort.expert_token_offsets[1:]


def grouped_mm_experts_core(
    A_sorted: torch.Tensor,  # [P, K] rows already sorted by expert
    W_gate_up: torch.Tensor,  # [E, K, 2I]
    W_down: torch.Tensor,  # [E, I, N]
    offsets: torch.Tensor,  # [E] int32 end of each expert's rows
    row_experts: torch.Tensor | None = None,  # [P] the expert of each row, read for biases
    **layer_options: object,  # activation, interleaved, gate_up_bias, down_bias: as moe_experts
) -> torch.Tensor:  # [P, N] each sorted pair's output, unweighted
    """The layer's experts by ``torch._grouped_mm`` alone: gate_up, the gate (``gated_hidden``),
    down, and each GEMM's bias if any, on rows sorted for free (no gather, scatter or combine),
    the bound a pipeline around it can approach.

    Taught in notebook 10.
    """
    projected = torch._grouped_mm(A_sorted, W_gate_up, offs=offsets)
    hidden = gated_hidden(projected, row_experts, **layer_options)
    out = torch._grouped_mm(hidden, W_down, offs=offsets)
    down_bias = layer_options.get("down_bias")
    return out if down_bias is None else out + down_bias[row_experts]


def layer_table_point(
    model: MoEModel,
    experts: torch.nn.Module,  # transformers_experts_module(model)
    weights_kn: tuple[torch.Tensor, torch.Tensor] | None,  # its weights stored [E, K, N], or
    # None when the module stores them so (the "helion" row reads them in place)
    T: int,
) -> list[dict[str, object]]:
    """Check the "helion" backend on sampled rows, then time every candidate at one token
    count, uniform top-k routing; one result row per candidate (``ms`` is NaN, with the
    reason in ``note``, where a candidate cannot run).

    Taught in notebook 10.
    """
    A = torch.randn(T, model.H, generator=torch.Generator(DEVICE).manual_seed(T), device=DEVICE)
    A = A.to(torch.bfloat16)
    expert_ids, weights = model_routing(T, model.E, model.top_k, 0.0)
    gate_up, down, layer_options = transformers_layer_arguments(experts)
    backends = {
        name: with_experts_backend(experts, name) for name in ("helion", *TRANSFORMERS_BACKENDS)
    }
    rows = torch.randperm(T, generator=cpu_generator(T))[:LAYER_TABLE_CHECKED_ROWS].to(DEVICE)
    out = backends["helion"](A, expert_ids, weights)
    assert_experts_close(out, A, gate_up, down, expert_ids, weights, rows=rows, **layer_options)
    token_of_sorted_pair, offsets = pairs_sorted_by_expert(expert_ids, model.E)
    row_experts = expert_ids.flatten().sort().values  # the expert of each sorted row
    grouped_mm_core = functools.partial(
        grouped_mm_experts_core,
        A[token_of_sorted_pair],
        gate_up,
        down,
        offsets,
        row_experts,
        **layer_options,
    )
    candidates = {
        name: functools.partial(backend, A, expert_ids, weights)
        for name, backend in backends.items()
    }
    candidates["grouped_mm core"] = grouped_mm_core
    notes = {}
    if weights_kn is None:
        notes["helion, [E, K, N] weights"] = "not run: the module stores them so (helion's row)"
    else:
        candidates["helion, [E, K, N] weights"] = functools.partial(
            moe_experts, A, *weights_kn, expert_ids, weights, **layer_options
        )
    candidates["helion, unfused"] = functools.partial(
        unfused_experts, A, gate_up, down, expert_ids, weights, **layer_options
    )
    pairs = expert_ids.numel()
    if pairs * 3 * model.H * model.I * 2 > BATCHED_MM_MAX_BYTES:
        notes["batched_mm"] = "not run: would gather each pair's weights"
    if T <= MODEL_TABLE_DECODE_MAX_TOKENS:
        for name in ("helion", "grouped_mm", "batched_mm"):
            graphed = f"{name}, CUDA graph"
            if name in notes:
                notes[graphed] = notes[name]
                continue
            try:
                candidates[graphed] = timing.cuda_graph_replay(candidates[name])
            except RuntimeError as error:  # a backend that cannot be captured
                notes[graphed] = f"capture failed: {str(error).splitlines()[0][:120]}"
    host_us, gpu_us = timing.host_and_gpu_us(candidates["helion"])
    grouped_host_us, grouped_gpu_us = timing.host_and_gpu_us(candidates["grouped_mm"])
    active = int(expert_ids.unique().numel())
    point = {
        "model": model.name,
        "T": T,
        "H": model.H,
        "I": model.I,
        "E": model.E,
        "top_k": model.top_k,
        "active_experts": active,
        "block_t": flat_token_block(pairs, model.E),
        # the module's eager call (its id check: "sentinels"): flat from a CUDA graph where the
        # host would pace it, else the per-pair or flat kernels one by one (graphs run flat)
        "helion_path": "flat, replayed"
        if host_paced(A, down, "sentinels")
        else layer_path(pairs, gate_up, down),
        "helion_host_us": host_us,
        "helion_gpu_us": gpu_us,
        "grouped_mm_host_us": grouped_host_us,
        "grouped_mm_gpu_us": grouped_gpu_us,
        "flops": 6 * pairs * model.H * model.I,
        "weight_bytes": 2 * 3 * active * model.H * model.I,
        "bytes": 2 * (3 * active * model.H * model.I + 2 * T * model.H),
        "fusion_bytes_saved": 2 * 4 * pairs * model.I,
    }
    results = []
    for name in dict.fromkeys([*candidates, *notes]):
        if name in notes:
            results.append({**point, "implementation": name, "ms": math.nan, "note": notes[name]})
            continue
        try:
            with torch.no_grad():
                ms, note = timing.time_ms(candidates[name]), ""
        except torch.OutOfMemoryError:  # batched_mm's per-pair weight copies, on a smaller card
            torch.cuda.empty_cache()
            ms, note = math.nan, "out of memory"
        results.append({**point, "implementation": name, "ms": ms, "note": note})
    return results


def with_layer_machine_info(results: pd.DataFrame) -> pd.DataFrame:
    """``results`` with the card and versions (``timing.machine_info``) and transformers' version in
    every row, as the layer's tables record them.

    Taught in notebook 10.
    """
    return results.assign(
        **timing.machine_info(), transformers=importlib.metadata.version("transformers")
    )


def run_layer_table(
    models: tuple[MoEModel, ...] = MOE_MODELS,
    tokens: tuple[int, ...] = LAYER_TABLE_TOKENS,
    path: Path | None = None,
) -> pd.DataFrame:
    """The layer table on this GPU, in bf16: every ``layer_table_point``, with each row's
    roofline fraction (as in ``run_model_table``). With ``path``, the rows so far are written
    there after every model, so a run cut short keeps what it measured.

    Taught in notebook 10.
    """
    register_transformers_experts()
    dense_tflops, copy_gbps = timing.dense_matmul_tflops(), timing.copy_bandwidth_gbps()
    rows = []
    for model in tqdm(models, desc="models"):
        experts = transformers_experts_module(model)
        weights_kn = None
        if not experts.is_transposed:  # stored [E, N, K]: the [E, K, N] copies, for one row
            weights_kn = tuple(
                w.transpose(1, 2).contiguous() for w in (experts.gate_up_proj, experts.down_proj)
            )
        for T in tokens:
            rows += layer_table_point(model, experts, weights_kn, T)
        del experts, weights_kn
        torch.cuda.empty_cache()
        results = pd.DataFrame(rows)
        results["dense_tflops"], results["copy_gbps"] = dense_tflops, copy_gbps
        results["roofline_fraction"] = timing.roofline(results)["ms"] / results["ms"]
        results["tflops"] = results["flops"] / results["ms"] / 1e9
        results = with_layer_machine_info(results)
        if path is not None:
            results.to_csv(path, index=False)
    return results


def layer_table_speedups(results: pd.DataFrame) -> pd.DataFrame:
    """Per model and token count: the "helion" backend's speed-up over transformers'
    grouped_mm and over the fastest transformers backend, eager and in CUDA graphs (NaN where
    none was captured), its roofline fraction, and its host and GPU time per eager call.

    Taught in notebook 15.
    """
    times = results.pivot_table(
        index=["model", "T"], columns="implementation", values="ms", sort=False
    )
    helion = results[results["implementation"] == "helion"].set_index(["model", "T"])
    graphs = [f"{name}, CUDA graph" for name in TRANSFORMERS_BACKENDS]
    graphs = [name for name in graphs if name in times]
    return pd.DataFrame(
        {
            "vs grouped_mm": times["grouped_mm"] / times["helion"],
            "vs fastest backend": times[list(TRANSFORMERS_BACKENDS)].min(axis=1) / times["helion"],
            "graph vs fastest graphed": times[graphs].min(axis=1) / times["helion, CUDA graph"],
            "roofline fraction": helion["roofline_fraction"],
            "host us": helion["helion_host_us"],
            "GPU us": helion["helion_gpu_us"],
        }
    ).round(2)
