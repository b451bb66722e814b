"""The FP8 table (notebook 13): the FP8 layer (``moe_experts_fp8``) against the bf16 layer
(``moe_experts``) on the same random weights, at the expert sizes of the models that ship FP8
experts, and against ``torch._scaled_grouped_mm`` on rows already sorted and quantized.
"""

from __future__ import annotations

import functools
import math

import pandas as pd
import torch

from ..checks import assert_experts_fp8_close
from ..configs import RESULTS_DIR
from ..fp8 import moe_experts_fp8, quantize_weights_fp8
from ..kernels.fp8 import E4M3_MAX, FP8_DTYPE, SMALLEST_AMAX
from ..layer import moe_experts
from ..mode import DEVICE
from . import timing
from .layer_table import (
    LAYER_TABLE_CHECKED_ROWS,
    pairs_sorted_by_expert,
    transformers_experts_module,
)
from .shapes import MOE_MODELS, MoEModel, model_routing

__all__ = [
    "FP8_TABLE_DECODE_MAX_TOKENS",
    "FP8_TABLE_MODELS",
    "FP8_TABLE_PATH",
    "FP8_TABLE_TOKENS",
    "fp8_table_point",
    "quantize_rowwise_fp8",
    "run_fp8_table",
    "scaled_grouped_mm_experts_core",
]

# DeepSeek-V3 and Kimi-K2 ship e4m3 experts with 128 x 128 block scales; Qwen3-235B-A22B has an
# FP8 checkpoint of the same format. Kimi-K2 is DeepSeek-V3's shape with 384 experts.
FP8_TABLE_MODELS = (
    *(model for model in MOE_MODELS if model.name in ("DeepSeek-V3", "Qwen3-235B-A22B")),
    MoEModel("Kimi-K2", H=7168, I=2048, E=384, top_k=8),
)
FP8_TABLE_TOKENS = (1, 8, 64, 4096, 16384)
FP8_TABLE_PATH = RESULTS_DIR / "fp8_table.csv"
# Up to this many tokens a point is decode: both layers are replayed in CUDA graphs (no host
# time) and the FP8 layer is set against the copy rate of its active experts' e4m3 bytes.
FP8_TABLE_DECODE_MAX_TOKENS = 64


def quantize_rowwise_fp8(
    x: torch.Tensor,  # [R, C] activations or [E, R, C] weights, floating point
) -> tuple[torch.Tensor, torch.Tensor]:  # x's shape in e4m3; its shape but the last, float32
    """One scale per row, the row's largest magnitude over 448: the rowwise scaling of
    ``torch._scaled_grouped_mm`` (per token of A, per output column of each expert's W).
    Weights go 16 experts at a time, so no float32 copy of all of them exists.

    Taught in notebook 13.
    """
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    scales = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    slices = (t.split(16) if x.dim() == 3 else (t,) for t in (x, q, scales))
    for part, q_part, scales_part in zip(*slices, strict=True):
        values = part.float()
        scales_part.copy_(values.abs().amax(dim=-1).clamp(min=SMALLEST_AMAX) / E4M3_MAX)
        q_part.copy_((values / scales_part[..., None]).clamp(-E4M3_MAX, E4M3_MAX))
    return q, scales


def scaled_grouped_mm_experts_core(
    A_q: torch.Tensor,  # [P, K] e4m3 rows already sorted by expert
    A_scales: torch.Tensor,  # [P] float32
    gate_up: tuple[torch.Tensor, torch.Tensor],  # [E, 2I, K] e4m3, [E, 2I] float32 (rowwise)
    down: tuple[torch.Tensor, torch.Tensor],  # [E, N, I] e4m3, [E, N] float32
    offsets: torch.Tensor,  # [E] int32 end of each expert's rows
) -> torch.Tensor:  # [P, N] bf16 each sorted pair's output, unweighted
    """The FP8 experts by ``torch._scaled_grouped_mm`` with rowwise scales: gate_up, SiLU(gate)
    * up in bf16, the hidden quantized per row, down; no gather, scatter or combine.

    Its scales differ from the checkpoints': one per row of A over all of K and one per output
    column of each expert's W, so they multiply each output once, after the K loop, where a
    block scale changes every 128 values of K and enters the loop.

    Taught in notebook 13 (``run_fp8_table`` times it).
    """
    W_gate_up, gate_up_scales = gate_up
    W_down, down_scales = down

    def gemm(rows, row_scales, W, W_scales):
        return torch._scaled_grouped_mm(
            rows, W.transpose(1, 2), row_scales, W_scales, offs=offsets, out_dtype=torch.bfloat16
        )

    projected = gemm(A_q, A_scales, W_gate_up, gate_up_scales)
    gate, up = projected.chunk(2, dim=1)
    hidden_q, hidden_scales = quantize_rowwise_fp8(torch.nn.functional.silu(gate) * up)
    return gemm(hidden_q, hidden_scales, W_down, down_scales)


def fp8_table_point(
    model: MoEModel,
    bf16: tuple[torch.Tensor, torch.Tensor],  # [E, K, N] views of transformers' layout
    fp8: tuple[torch.Tensor, ...],  # quantize_weights_fp8 of each: W_gate_up, scales, W_down, ...
    T: int,
    copy_gbps: float,
) -> dict[str, object]:
    """Check the FP8 layer on sampled rows against the float64 reference on its e4m3 numbers,
    then time it and the bf16 layer at one token count, uniform top-k routing: eagerly at
    prefill, in CUDA graphs at decode, where ``fp8_of_copy`` is the copy rate's share.

    Taught in notebook 13 (``run_fp8_table`` runs it).
    """
    A, expert_ids, weights = _point_inputs(model, T)
    fp8_call = functools.partial(moe_experts_fp8, A, *fp8, expert_ids, weights)
    bf16_call = functools.partial(moe_experts, A, *bf16, expert_ids, weights)
    rows = slice(0, LAYER_TABLE_CHECKED_ROWS)
    sample = (A[rows], *fp8, expert_ids[rows], weights[rows])
    assert_experts_fp8_close(fp8_call()[rows], *sample)
    decode = T <= FP8_TABLE_DECODE_MAX_TOKENS
    if decode:
        fp8_call, bf16_call = (
            timing.cuda_graph_replay(fp8_call),
            timing.cuda_graph_replay(bf16_call),
        )
    fp8_ms, bf16_ms = timing.time_ms(fp8_call), timing.time_ms(bf16_call)
    flops = 2 * T * model.top_k * 3 * model.H * model.I
    active = int(expert_ids.unique().numel())
    weight_bytes = active * 3 * model.H * model.I  # one byte per e4m3 value
    return {
        "model": model.name,
        "T": T,
        "fp8_ms": fp8_ms,
        "bf16_ms": bf16_ms,
        "fp8_speedup": bf16_ms / fp8_ms,
        "fp8_tflops": flops / fp8_ms / 1e9,
        "active_experts": active,
        "fp8_of_copy": weight_bytes / (fp8_ms * 1e-3) / (copy_gbps * 1e9) if decode else math.nan,
        "scaled_grouped_mm_core_ms": math.nan,
        "note": "",
    }


def _point_inputs(
    model: MoEModel, T: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # [T, H] bf16, [T, k], [T, k]
    """One point's tokens (seeded by T) and its uniform top-k routing, the same at every call."""
    A = torch.randn(T, model.H, generator=torch.Generator(DEVICE).manual_seed(T), device=DEVICE)
    expert_ids, weights = model_routing(T, model.E, model.top_k, 0.0)
    return A.to(torch.bfloat16), expert_ids, weights


def _random_experts(model: MoEModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 gate_up and down weights of the layer table's experts module at ``model``'s
    sizes (``transformers_experts_module``: [E, 2I, H] and [E, H, I]), seen as [E, K, N]."""
    experts = transformers_experts_module(model)
    return experts.gate_up_proj.transpose(1, 2), experts.down_proj.transpose(1, 2)


def run_fp8_table(
    models: tuple[MoEModel, ...] = FP8_TABLE_MODELS,
    tokens: tuple[int, ...] = FP8_TABLE_TOKENS,
    path: str | None = FP8_TABLE_PATH,
) -> pd.DataFrame:
    """``fp8_table_point`` at every model and token count, one row each, with the copy rate,
    the card and the versions, written to ``path`` (None: not written). At prefill,
    ``scaled_grouped_mm_core_ms`` times ``scaled_grouped_mm_experts_core`` at the same routing
    (NaN, with the reason in ``note``, where the installed torch cannot run it); its rowwise
    weights replace the block-scaled ones in memory (Kimi-K2's bf16 experts are 34 GB).

    Taught in notebook 13.
    """
    copy_gbps = timing.copy_bandwidth_gbps()
    rows = []
    for model in models:
        bf16 = _random_experts(model)
        fp8 = (*quantize_weights_fp8(bf16[0]), *quantize_weights_fp8(bf16[1]))
        points = [fp8_table_point(model, bf16, fp8, T, copy_gbps) for T in tokens]
        del fp8
        gate_up, down = (quantize_rowwise_fp8(W.transpose(1, 2)) for W in bf16)  # [E, N, K]
        del bf16
        for row in points:
            if row["T"] > FP8_TABLE_DECODE_MAX_TOKENS:
                try:
                    row["scaled_grouped_mm_core_ms"] = _scaled_core_ms(
                        model, gate_up, down, row["T"]
                    )
                except RuntimeError as error:  # NotImplementedError on the CPU, out of memory
                    row["note"] = f"torch._scaled_grouped_mm not run: {error}"[:200]
        rows += points
        del gate_up, down
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    results = pd.DataFrame(rows).assign(copy_gbps=copy_gbps, **timing.machine_info())
    if path is not None:
        results.to_csv(path, index=False)
    return results


def _scaled_core_ms(
    model: MoEModel,
    gate_up: tuple[torch.Tensor, torch.Tensor],  # quantize_rowwise_fp8 of [E, 2I, H]
    down: tuple[torch.Tensor, torch.Tensor],  # of [E, H, I]
    T: int,
) -> float:
    """``scaled_grouped_mm_experts_core``'s time at ``fp8_table_point``'s tokens and routing."""
    A, expert_ids, _ = _point_inputs(model, T)
    tokens, offsets = pairs_sorted_by_expert(expert_ids, model.E)
    A_q, A_scales = quantize_rowwise_fp8(A[tokens])
    core = functools.partial(scaled_grouped_mm_experts_core, A_q, A_scales, gate_up, down, offsets)
    return timing.time_ms(core)
