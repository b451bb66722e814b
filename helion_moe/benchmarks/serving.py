"""Serving (notebook 16): the layer where models run. transformers' ``generate()`` with a static
cache, whose decode step transformers compiles and runs from CUDA graphs, one experts backend at
a time, on models built from public configs with a few decoder layers and random weights; the
host-versus-GPU timeline of one eager layer call; and eager decode calls with their kernels
launched one by one or replayed from a CUDA graph.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from ..configs import RESULTS_DIR
from ..decode_graphs import decode_replay
from ..kernels.activations import activation_as_text
from ..layer import moe_experts, moe_experts_op
from ..mode import DEVICE
from ..transformers_backend import register_transformers_experts, transformers_layer_arguments
from . import timing
from .layer_table import (
    LAYER_TABLE_MODELS,
    transformers_experts_module,
    with_experts_backend,
    with_layer_machine_info,
)
from .shapes import MOE_MODELS, MoEModel, model_routing

__all__ = [
    "CALL_TIMELINE_PATH",
    "DECODE_REPLAY_BACKENDS",
    "DECODE_REPLAY_PATH",
    "DECODE_REPLAY_TOKENS",
    "GENERATE_TABLE_BACKENDS",
    "GENERATE_TABLE_BATCHES",
    "GENERATE_TABLE_PATH",
    "SERVED_MODELS",
    "call_timeline",
    "decode_step_gpu_ms",
    "decode_step_ms",
    "run_call_timeline",
    "run_decode_replay_table",
    "run_generate_table",
    "served_model",
]

GENERATE_TABLE_PATH = RESULTS_DIR / "generate_table.csv"
CALL_TIMELINE_PATH = RESULTS_DIR / "call_timeline.csv"
DECODE_REPLAY_PATH = RESULTS_DIR / "decode_replay.csv"
DECODE_REPLAY_TOKENS = (1, 8, 64)
DECODE_REPLAY_BACKENDS = ("batched_mm", "grouped_mm")
GENERATE_TABLE_BACKENDS = ("helion", "grouped_mm", "batched_mm")
GENERATE_TABLE_BATCHES = (1, 8)
# Decoder layers per model: as many as an 80 GB card holds beside the vocabulary and
# batched_mm's per-pair weight copies (the experts' weights are 1.2 GB a layer at
# Qwen3-30B-A3B, 2.8 GB at Mixtral-8x7B, 22.5 GB at DeepSeek-V3).
SERVED_MODELS = (("Qwen3-30B-A3B", 12), ("Mixtral-8x7B", 8), ("DeepSeek-V3", 2))
_PROMPT_TOKENS = 16
_TIMELINE_MODEL = next(m for m in MOE_MODELS if m.name == "Qwen3-30B-A3B")
# Greedy, so every backend decodes the same way; the static cache holds the prompt and every
# token of the longest generate().
_GENERATE_OPTIONS = dict(do_sample=False, cache_implementation="static", pad_token_id=0)


def served_model(name: str, layers: int) -> torch.nn.Module:  # a transformers model on DEVICE
    """The transformers model of ``name`` (a name of ``SERVED_MODELS``) with its public
    config's sizes, ``layers`` decoder layers, each with an MoE block, and random bf16 weights,
    in eval mode, with the "helion" experts backend registered.

    Taught in notebook 16.
    """
    import transformers

    names = [served for served, _ in SERVED_MODELS]
    if name not in names:
        raise ValueError(f"name must be one of {names}, got {name!r}")
    model = next(m for m in MOE_MODELS if m.name == name)
    common = dict(hidden_size=model.H, num_experts_per_tok=model.top_k, num_hidden_layers=layers)
    common |= dict(max_position_embeddings=4096)
    if name == "Qwen3-30B-A3B":
        config = transformers.Qwen3MoeConfig(
            moe_intermediate_size=model.I,
            num_experts=model.E,
            intermediate_size=6144,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            vocab_size=151936,
            **common,
        )
    elif name == "Mixtral-8x7B":
        config = transformers.MixtralConfig(
            intermediate_size=model.I,
            num_local_experts=model.E,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=32000,
            **common,
        )
    else:  # DeepSeek-V3
        config = transformers.DeepseekV3Config(
            moe_intermediate_size=model.I,
            n_routed_experts=model.E,
            intermediate_size=18432,
            n_shared_experts=1,
            n_group=8,
            topk_group=4,
            first_k_dense_replace=0,  # every decoder layer an MoE block
            vocab_size=129280,
            **common,
        )
    register_transformers_experts()
    torch.manual_seed(0)
    with torch.device(DEVICE):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


@torch.no_grad()
def decode_step_ms(
    model: torch.nn.Module,  # a transformers causal LM with MoE blocks
    prompt: torch.Tensor,  # [batch, prompt tokens] token ids
    backend: str,  # an experts implementation: "helion", "grouped_mm", ...
    steps: int = 64,
    repeats: int = 3,
) -> tuple[float, torch.Tensor]:  # ms per step, [batch, prompt + steps + 8] token ids
    """Milliseconds per decode step of ``model`` with the experts ``backend``, as
    ``generate()`` with a static cache runs it (compiled, from CUDA graphs, on a GPU): the wall
    time of a ``generate()`` of ``steps + 8`` new tokens less that of one of 8, over ``steps``,
    so the prefill and the first steps cancel; the median of ``repeats``, after a call that
    compiles. Returns the longer call's tokens too.

    Taught in notebook 16.
    """
    model.set_experts_implementation(backend)
    torch._dynamo.reset()
    options = _generate_options(prompt, steps)
    model.generate(prompt, max_new_tokens=steps + 8, **options)  # compiles
    times = []
    for _ in range(repeats):
        seconds = []
        for new_tokens in (8, steps + 8):
            _synchronize()
            start = time.perf_counter()
            tokens = model.generate(prompt, max_new_tokens=new_tokens, **options)
            _synchronize()
            seconds.append(time.perf_counter() - start)
        times.append((seconds[1] - seconds[0]) / steps * 1e3)
    return sorted(times)[len(times) // 2], tokens


@torch.no_grad()
def decode_step_gpu_ms(
    model: torch.nn.Module, prompt: torch.Tensor, backend: str, steps: int = 64
) -> float:  # ms of GPU kernels per step (NaN without a GPU)
    """The GPU's busy time per decode step of ``decode_step_ms``'s calls: the kernels that
    torch.profiler records in a ``generate()`` of ``steps + 8`` new tokens less those of one of
    8, over ``steps``. Against ``decode_step_ms`` it says whether the GPU or the host sets the
    step's pace. Run after ``decode_step_ms`` with the same backend (compiled already).

    Taught in notebook 16.
    """
    if DEVICE.type != "cuda":
        return float("nan")
    model.set_experts_implementation(backend)
    options = _generate_options(prompt, steps)
    busy_us = []
    for new_tokens in (8, steps + 8):
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as profile:
            model.generate(prompt, max_new_tokens=new_tokens, **options)
            torch.cuda.synchronize()
        cuda = torch.autograd.DeviceType.CUDA
        busy_us.append(
            sum(e.self_device_time_total for e in profile.key_averages() if e.device_type == cuda)
        )
    return (busy_us[1] - busy_us[0]) / steps / 1e3


def run_generate_table(
    models: tuple[tuple[str, int], ...] = SERVED_MODELS,
    batches: tuple[int, ...] = GENERATE_TABLE_BATCHES,
    path: Path | None = GENERATE_TABLE_PATH,
    build: Callable[[str, int], torch.nn.Module] = served_model,
    steps: int = 64,
    backends: tuple[str, ...] = GENERATE_TABLE_BACKENDS,
) -> pd.DataFrame:
    """For each (model name, decoder layers) of ``models`` (``build`` makes the model) and
    batch size: every experts implementation of ``backends`` in turn, in one process,
    ``decode_step_ms`` (and tokens per second) and ``decode_step_gpu_ms``, and the share of its
    new tokens equal to the first backend's (random weights give near-flat logits, so bf16
    rounding may send greedy decoding apart). A backend that runs out of memory keeps its row,
    NaN, with the reason. Written to ``path`` (None: not written) with the card and versions.

    Taught in notebook 16.
    """
    register_transformers_experts()
    rows = []
    for name, layers in models:
        model = build(name, layers)
        generator = torch.Generator().manual_seed(0)
        for batch in batches:
            shape = (batch, _PROMPT_TOKENS)
            prompt = torch.randint(0, model.config.vocab_size, shape, generator=generator)
            first_tokens = None
            for backend in backends:
                row = dict(model=name, layers=layers, batch=batch, backend=backend)
                try:
                    ms, tokens = decode_step_ms(model, prompt.to(DEVICE), backend, steps)
                    gpu_ms = decode_step_gpu_ms(model, prompt.to(DEVICE), backend, steps)
                except torch.OutOfMemoryError as error:  # batched_mm copies weights per pair
                    _empty_cache()
                    rows.append(row | dict(step_ms=float("nan"), note=str(error)[:120]))
                    continue
                new = tokens[:, _PROMPT_TOKENS:].cpu()
                first_tokens = new if first_tokens is None else first_tokens
                same = (new == first_tokens).float().mean().item()
                speed = dict(step_ms=ms, tokens_per_s=batch / ms * 1e3, gpu_ms_per_step=gpu_ms)
                rows.append(row | speed | dict(same_tokens_as_first=same, note=""))
        del model
        _empty_cache()
    results = with_layer_machine_info(pd.DataFrame(rows))
    if path is not None:
        results.to_csv(path, index=False)
    return results


def call_timeline(call: Callable[[], object]) -> pd.DataFrame:
    """torch.profiler's events of one warm call of ``call``: each top-level host op (launches,
    allocations, the Python around them as gaps) and each GPU kernel, with its start and end in
    microseconds from the call's first event and its lane, "host" or "GPU". The profiler
    records the fourth of four calls: its own start-up falls in the first three.

    Taught in notebook 16.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if DEVICE.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(wait=1, warmup=2, active=1)
    with torch.profiler.profile(activities=activities, schedule=schedule) as profile:
        for _ in range(4):
            call()
            _synchronize()
            profile.step()

    def top_level(event) -> bool:  # a host event directly under the profiler's step
        parent = event.cpu_parent
        return parent is None or parent.name.startswith("ProfilerStep")

    cuda = torch.autograd.DeviceType.CUDA
    rows = [
        {
            "name": e.name,
            "lane": "GPU" if e.device_type == cuda else "host",
            "start_us": e.time_range.start,
            "end_us": e.time_range.end,
        }
        for e in profile.events()
        if not e.name.startswith("ProfilerStep")  # the step's own span, on both lanes
        and (e.device_type == cuda or (top_level(e) and "Synchronize" not in e.name))
    ]
    timeline = pd.DataFrame(rows)
    first = timeline["start_us"].min()
    return timeline.assign(start_us=timeline["start_us"] - first, end_us=timeline["end_us"] - first)


def run_call_timeline(
    model: MoEModel = _TIMELINE_MODEL,
    T: int = 1,
    path: Path | None = CALL_TIMELINE_PATH,
) -> pd.DataFrame:
    """``call_timeline`` of one eager layer call at ``T`` tokens of ``model`` (random weights
    in transformers' layout), a ``call`` column naming each: ``moe_experts`` launching its
    kernels one by one (``decode_replay(False)``), the same call replayed from a CUDA graph as
    eager inference runs it at decode sizes (``host_paced``; on the CPU it launches as the
    first does), and the call through its custom op ``helion_moe::moe_experts``, as autograd
    or torch.compile see it. Written to ``path`` (None: not written) with the card and
    versions.

    Taught in notebook 16.
    """
    experts = transformers_experts_module(model)
    gate_up, down, options = transformers_layer_arguments(experts)
    A = torch.randn(T, model.H, device=DEVICE).to(torch.bfloat16)
    ids, weights = model_routing(T, model.E, model.top_k, 0.0)
    biases = options.get("gate_up_bias"), options.get("down_bias")
    gate = activation_as_text(options["activation"]), options["interleaved"]
    op_args = (A, gate_up, down, ids, weights, *biases, *gate, None, "device", False)
    layer_args = (A, gate_up, down, ids, weights)

    def one_by_one() -> torch.Tensor:
        with decode_replay(False):
            return moe_experts(*layer_args, **options)

    calls = {
        "kernels launched one by one": one_by_one,
        "replayed from a CUDA graph": lambda: moe_experts(*layer_args, **options),
        "through the custom op": lambda: moe_experts_op(*op_args),
    }
    timelines = [call_timeline(call).assign(call=label) for label, call in calls.items()]
    results = pd.concat(timelines).assign(model=model.name, T=T)
    results = with_layer_machine_info(results)
    if path is not None:
        results.to_csv(path, index=False)
    return results


def run_decode_replay_table(
    models: tuple[MoEModel, ...] = LAYER_TABLE_MODELS,
    tokens: tuple[int, ...] = DECODE_REPLAY_TOKENS,
    backends: tuple[str, ...] = DECODE_REPLAY_BACKENDS,
    rounds: int = 3,
    path: Path | None = DECODE_REPLAY_PATH,
) -> pd.DataFrame:
    """Eager decode calls of each model's experts module (``transformers_experts_module``, bf16,
    uniform top-k routing) at each of ``tokens``: "helion" as eager inference runs it (replayed
    from a CUDA graph), "helion, kernels one by one" (``decode_replay(False)``) and each of
    transformers' ``backends``, interleaved over ``rounds`` rounds. Each row holds the medians
    of the host's and the GPU's microseconds per call (``host_and_gpu_us``); calls made back to
    back, as a decode loop makes them, run at the larger of the two. The two "helion" outputs
    are checked against each other; a backend that runs out of memory has no row at that
    point. Written to ``path`` (None: not written) with the card and versions.

    Taught in notebook 16.
    """
    register_transformers_experts()
    rows = []
    for model in models:
        experts = transformers_experts_module(model)
        helion = with_experts_backend(experts, "helion")
        calls = {"helion": (helion, True), "helion, kernels one by one": (helion, False)}
        calls |= {b: (with_experts_backend(experts, b), True) for b in backends}
        for T in tokens:
            generator = torch.Generator(DEVICE).manual_seed(T)
            A = torch.randn(T, model.H, generator=generator, device=DEVICE).to(torch.bfloat16)
            ids, weights = model_routing(T, model.E, model.top_k, 0.0)
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in calls}
            for _ in range(rounds):
                for name, (module, replay) in calls.items():
                    if name not in times:
                        continue
                    call = functools.partial(module, A, ids, weights)
                    try:
                        with decode_replay(replay):
                            times[name].append(timing.host_and_gpu_us(call))
                    except torch.OutOfMemoryError:  # batched_mm copies weights per pair
                        del times[name]
                        _empty_cache()
            with decode_replay(False):
                one_by_one = helion(A, ids, weights)
            torch.testing.assert_close(helion(A, ids, weights), one_by_one, rtol=2e-2, atol=2e-2)
            for name, measured in times.items():
                host, gpu = (statistics.median(m[i] for m in measured) for i in range(2))
                rows.append(dict(model=model.name, T=T, call=name, host_us=host, gpu_us=gpu))
        del experts, helion, calls
        _empty_cache()
    results = with_layer_machine_info(pd.DataFrame(rows))
    if path is not None:
        results.to_csv(path, index=False)
    return results


def _generate_options(prompt: torch.Tensor, steps: int) -> dict[str, object]:
    """``generate()``'s options for a static cache that holds the prompt and ``steps + 8`` new
    tokens, the longest call of ``decode_step_ms`` and ``decode_step_gpu_ms``."""
    return dict(_GENERATE_OPTIONS, max_cache_len=prompt.shape[1] + steps + 8)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
