"""What the studies time: the course's two prefill shapes (notebook 05), six public models'
expert GEMMs (notebook 08 onwards), and their random inputs and routings.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..mode import DEVICE
from ..routing import cpu_generator, route_zipf, route_zipf_top_k

__all__ = [
    "FINE_GRAINED",
    "GEMMS",
    "MIXTRAL_LIKE",
    "MOE_MODELS",
    "MoEModel",
    "MoEShape",
    "benchmark_inputs",
    "benchmark_routing",
    "model_routing",
    "model_weights",
]


@dataclasses.dataclass(frozen=True)
class MoEShape:
    """A layer shape: T tokens of K features through E experts of [K, N] each.

    Taught in notebook 05.
    """

    name: str
    T: int
    K: int
    N: int
    E: int


@dataclasses.dataclass(frozen=True)
class MoEModel:
    """The routed experts of a public MoE model: E experts of hidden size H and intermediate
    size I, k experts per token. Each expert runs two GEMMs: gate_up (H -> 2I, the gate and up
    projections side by side) and down (I -> H).

    Taught in notebook 14.
    """

    name: str
    H: int
    I: int  # noqa: E741 (the models' own name for it)
    E: int
    top_k: int
    # the transformers experts module the layer table builds (notebook 10): "MixtralExperts"
    # (concatenated gate and up, SiLU, no biases) or "GptOssExperts" (gpt-oss's own)
    experts_class: str = "MixtralExperts"

    def gemm(self, which: str, T: int) -> MoEShape:
        """The shape of its ``which`` ("gate_up" or "down") GEMM for T tokens."""
        K, N = (self.H, 2 * self.I) if which == "gate_up" else (self.I, self.H)
        return MoEShape(f"{self.name} {which}", T=T, K=K, N=N, E=self.E)


MOE_MODELS = (
    MoEModel("Mixtral-8x7B", H=4096, I=14336, E=8, top_k=2),
    MoEModel("DeepSeek-V3", H=7168, I=2048, E=256, top_k=8),
    MoEModel("Qwen3-30B-A3B", H=2048, I=768, E=128, top_k=8),
    MoEModel("Qwen3-235B-A22B", H=4096, I=1536, E=128, top_k=8),
    MoEModel("gpt-oss-120b", H=2880, I=2880, E=128, top_k=4),
    MoEModel("Llama-4-Maverick", H=5120, I=8192, E=128, top_k=1),
)


GEMMS = ("gate_up", "down")


MIXTRAL_LIKE = MoEShape("Mixtral-like", T=8192, K=4096, N=14336, E=8)


FINE_GRAINED = MoEShape("fine-grained", T=16384, K=2048, N=1408, E=64)


def benchmark_inputs(
    shape: MoEShape, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:  # ([T, K], [E, K, N]) bf16
    """Random bf16 activations and weights of ``shape``, scaled so outputs have unit variance.

    Taught in notebook 05.
    """
    g = cpu_generator(seed)
    A = torch.randn(shape.T, shape.K, generator=g).to(DEVICE, torch.bfloat16)
    W = (torch.randn(shape.E, shape.K, shape.N, generator=g) / math.sqrt(shape.K)).to(
        DEVICE, torch.bfloat16
    )
    return A, W


def benchmark_routing(shape: MoEShape, skew: float) -> torch.Tensor:  # [T]
    """The routing every benchmark of ``shape`` uses: Zipf ``skew`` (0 = uniform), seed 1.

    Taught in notebook 05.
    """
    return route_zipf(shape.T, shape.E, skew, seed=1)


def model_weights(model: MoEModel, which: str, seed: int = 0) -> torch.Tensor:  # [E, K, N]
    """Random bf16 weights of ``model``'s ``which`` GEMM, drawn on the device (DeepSeek-V3's
    gate_up weights are 7.5e9 elements), scaled so outputs have unit variance.

    Taught in notebook 14.
    """
    shape = model.gemm(which, 1)
    generator = torch.Generator(DEVICE).manual_seed(seed)
    W = torch.randn(
        shape.E, shape.K, shape.N, generator=generator, device=DEVICE, dtype=torch.bfloat16
    )
    return W.mul_(1 / math.sqrt(shape.K))


def model_routing(
    num_tokens: int, num_experts: int, top_k: int, skew: float, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:  # ([T, k] int64, [T, k] float32)
    """The model table's routing: k distinct experts per token, Zipf-skewed by ``skew``
    (``route_zipf_top_k``; 0 = uniform), and random combine weights that sum to one.

    Taught in notebook 14.
    """
    expert_ids = route_zipf_top_k(num_tokens, num_experts, skew, top_k, seed=seed)
    logits = torch.randn(num_tokens, top_k, generator=cpu_generator(seed))
    return expert_ids, torch.softmax(logits, dim=1).to(DEVICE)
