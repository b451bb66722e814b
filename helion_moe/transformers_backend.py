"""The layer as a transformers experts backend, ``"helion"`` (notebook 10): one function of
transformers' ``ExpertsInterface`` that reads a module's weights in place in their stored layout,
refusing the experts it does not compute, and the tiny models the course checks it on.
"""

from __future__ import annotations

import torch

from .kernels.activations import ACTIVATIONS
from .layer import moe_experts
from .mode import DEVICE

__all__ = [
    "TINY_TRANSFORMERS_MODELS",
    "TRANSFORMERS_EXPERTS",
    "check_transformers_experts",
    "count_moe_blocks",
    "register_transformers_experts",
    "tiny_transformers_model",
    "transformers_activation",
    "transformers_experts_forward",
]

TRANSFORMERS_EXPERTS = "helion"  # the name register_transformers_experts registers


def transformers_activation(experts: torch.nn.Module) -> str:
    """The entry of ``ACTIVATIONS`` that a transformers experts module's ``act_fn`` computes;
    NotImplementedError naming ``act_fn`` for any other.

    Taught in notebook 10.
    """
    from transformers import activations

    act = experts.act_fn
    if isinstance(act, activations.SiLUActivation | torch.nn.SiLU):
        return "silu"
    tanh_gelus = (
        activations.GELUTanh,
        activations.FastGELUActivation,
        activations.NewGELUActivation,
    )
    if isinstance(act, tanh_gelus) or (
        isinstance(act, torch.nn.GELU) and act.approximate == "tanh"
    ):
        return "gelu_tanh"
    raise NotImplementedError(
        f"{type(experts).__name__}.act_fn is {type(act).__name__}; the {TRANSFORMERS_EXPERTS!r} "
        f"experts backend computes {ACTIVATIONS} (SiLU, and GELU's tanh approximation)"
    )


def check_transformers_experts(experts: torch.nn.Module) -> None:
    """Raise NotImplementedError, naming the flag, for an experts module whose layout or
    features ``moe_experts`` does not compute: biases, interleaved gate/up rows (gpt-oss), no
    gate, or its own ``_apply_gate``.

    Taught in notebook 10.
    """
    name = type(experts).__name__
    for flag, needed in (("has_bias", False), ("has_gate", True), ("is_concatenated", True)):
        if getattr(experts, flag) != needed:
            raise NotImplementedError(
                f"{name} has {flag}={getattr(experts, flag)}; the {TRANSFORMERS_EXPERTS!r} "
                f"experts backend needs {flag}={needed}"
            )
    # by name, not by importing transformers.integrations.moe: torch.compile cannot trace an
    # import of transformers' lazily loaded modules
    gate = type(experts)._apply_gate
    if (gate.__module__, gate.__name__) != ("transformers.integrations.moe", "_default_apply_gate"):
        raise NotImplementedError(
            f"{name} overrides _apply_gate; the {TRANSFORMERS_EXPERTS!r} experts backend "
            "computes the default act_fn(gate) * up only"
        )


def transformers_experts_forward(
    self: torch.nn.Module,  # a transformers experts module (@use_experts_implementation)
    hidden_states: torch.Tensor,  # [T, H]
    top_k_index: torch.Tensor,  # [T, k] integer
    top_k_weights: torch.Tensor,  # [T, k]
    expert_id_check: str = "sentinels",  # as for moe_matmul
) -> torch.Tensor:  # [T, H]
    """transformers' experts interface, computed by ``moe_experts`` on the module's weights
    read in place: ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I] (or their
    transposes when ``is_transposed``). As transformers' own backends do, a pair whose expert
    id lies outside [0, E) counts as a sentinel, another rank's pair under expert parallelism,
    and adds zero to the output and to every gradient.

    Taught in notebook 10.
    """
    check_transformers_experts(self)
    activation = transformers_activation(self)
    gate_up, down = self.gate_up_proj, self.down_proj
    if not self.is_transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    try:
        return moe_experts(
            hidden_states,
            gate_up,
            down,
            top_k_index,
            top_k_weights,
            activation=activation,
            expert_id_check=expert_id_check,
        )
    except (TypeError, ValueError) as error:
        raise type(error)(
            f"{error} (in {type(self).__name__}: A is hidden_states, W_gate_up gate_up_proj, "
            "W_down down_proj, expert_ids top_k_index, combine_weights top_k_weights)"
        ) from error


def register_transformers_experts() -> str:
    """Register ``transformers_experts_forward`` in transformers' ``ExpertsInterface`` as
    ``TRANSFORMERS_EXPERTS``, so that ``model.set_experts_implementation("helion")`` (or
    ``from_pretrained(..., experts_implementation="helion")``) runs every MoE block of a model
    on the course's kernels. Returns the name.

    Taught in notebook 10.
    """
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(TRANSFORMERS_EXPERTS, transformers_experts_forward)
    return TRANSFORMERS_EXPERTS


# Families of tiny transformers models for tests and notebooks: 2 layers, hidden size 64,
# 4-8 experts, top-2 (DeepSeek-V3's first layer is a dense MLP, as in the real model).
TINY_TRANSFORMERS_MODELS = ("Mixtral", "Qwen3-MoE", "DeepSeek-V3")


def tiny_transformers_model(
    name: str, dtype: torch.dtype = torch.float32, seed: int = 0
) -> torch.nn.Module:  # a transformers PreTrainedModel, in eval mode, on DEVICE
    """A randomly initialised, tiny ``MixtralForCausalLM``, ``Qwen3MoeForCausalLM`` or
    ``DeepseekV3ForCausalLM`` (``TINY_TRANSFORMERS_MODELS``), built from its config: nothing is
    downloaded.

    Taught in notebook 10.
    """
    import transformers

    common = dict(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_experts_per_tok=2,
    )
    if name == "Mixtral":
        config = transformers.MixtralConfig(intermediate_size=96, num_local_experts=4, **common)
        model_class = transformers.MixtralForCausalLM
    elif name == "Qwen3-MoE":
        config = transformers.Qwen3MoeConfig(
            moe_intermediate_size=48, intermediate_size=96, num_experts=8, head_dim=16, **common
        )
        model_class = transformers.Qwen3MoeForCausalLM
    elif name == "DeepSeek-V3":
        config = transformers.DeepseekV3Config(
            moe_intermediate_size=48,
            intermediate_size=96,
            n_routed_experts=8,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            **{**common, "num_key_value_heads": 4},  # MLA: as many key/value heads as heads
        )
        model_class = transformers.DeepseekV3ForCausalLM
    else:
        raise ValueError(f"name must be one of {TINY_TRANSFORMERS_MODELS}, got {name!r}")
    torch.manual_seed(seed)
    return model_class(config).to(DEVICE, dtype).eval()


def count_moe_blocks(model: torch.nn.Module) -> int:
    """How many experts modules (those holding ``gate_up_proj``) a model has.

    Taught in notebook 10.
    """
    return sum(hasattr(module, "gate_up_proj") for module in model.modules())
