"""The layer as a transformers experts backend, ``"helion"`` (notebook 10): one function of
transformers' ``ExpertsInterface`` that reads a module's weights in place in their stored layout,
refusing the experts it does not compute, and the tiny models the course checks it on.
"""

from __future__ import annotations

import torch

from .kernels.activations import ACTIVATIONS, GatedActivation
from .layer import moe_experts
from .mode import DEVICE

__all__ = [
    "TINY_TRANSFORMERS_MODELS",
    "TRANSFORMERS_EXPERTS",
    "count_moe_blocks",
    "register_transformers_experts",
    "tiny_transformers_model",
    "transformers_activation",
    "transformers_experts_forward",
    "transformers_gate",
]

TRANSFORMERS_EXPERTS = "helion"  # the name register_transformers_experts registers


# The act_fn classes the backend computes, by (module, name), for the reason given below.
_SILUS = {("torch.nn.modules.activation", "SiLU"), ("transformers.activations", "SiLUActivation")}
_TANH_GELUS = {
    ("transformers.activations", name)
    for name in ("GELUTanh", "FastGELUActivation", "NewGELUActivation")
}


def transformers_activation(experts: torch.nn.Module) -> str:
    """The entry of ``ACTIVATIONS`` that a transformers experts module's ``act_fn`` computes;
    NotImplementedError naming ``act_fn`` for any other.

    Taught in notebook 10.
    """
    act = experts.act_fn
    kind = (type(act).__module__, type(act).__name__)
    if kind in _SILUS:
        return "silu"
    if kind in _TANH_GELUS or (isinstance(act, torch.nn.GELU) and act.approximate == "tanh"):
        return "gelu_tanh"
    raise NotImplementedError(
        f"{type(experts).__name__}.act_fn is {type(act).__name__}; the {TRANSFORMERS_EXPERTS!r} "
        f"experts backend computes {ACTIVATIONS} (SiLU, and GELU's tanh approximation)"
    )


# The _apply_gate functions the backend computes, by (module, name): names, not an import of
# transformers' lazily loaded modules, which torch.compile cannot trace (nor a __qualname__).
_DEFAULT_GATE = ("transformers.integrations.moe", "_default_apply_gate")
_GPT_OSS_GATE = ("transformers.models.gpt_oss.modeling_gpt_oss", "_apply_gate")


def transformers_gate(experts: torch.nn.Module) -> tuple[GatedActivation, bool]:
    """What a transformers experts module's gate computes, as ``moe_experts`` takes it: the
    ``GatedActivation`` and whether gate and up columns are interleaved. transformers' default
    ``_apply_gate`` is act_fn(gate) * up on concatenated halves; gpt-oss's clamps, scales by its
    ``alpha`` and shifts up by 1, on interleaved columns. NotImplementedError, naming what it
    is, for experts without a gate, or with any other ``_apply_gate``.

    Taught in notebook 10.
    """
    name = type(experts).__name__
    if not experts.has_gate:
        raise NotImplementedError(
            f"{name} has has_gate=False; the {TRANSFORMERS_EXPERTS!r} experts backend computes "
            "gated experts only"
        )
    gate = type(experts)._apply_gate
    kind = (gate.__module__, gate.__name__)
    if kind == _DEFAULT_GATE and experts.is_concatenated:
        return GatedActivation(transformers_activation(experts)), False
    if kind == _GPT_OSS_GATE and not experts.is_concatenated:
        return GatedActivation("silu", experts.alpha, experts.limit, up_shift=1.0), True
    raise NotImplementedError(
        f"{name}'s _apply_gate is {gate.__module__}.{gate.__name__} with is_concatenated="
        f"{experts.is_concatenated}; the {TRANSFORMERS_EXPERTS!r} experts backend computes "
        "transformers' default gate on concatenated gate and up, and gpt-oss's on interleaved"
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
    transposes when ``is_transposed``), with their biases when ``has_bias`` and the gate that
    ``transformers_gate`` recognises (gpt-oss's among them). As transformers' own backends do,
    a pair whose expert id lies outside [0, E) counts as a sentinel, another rank's pair under
    expert parallelism, and adds zero to the output and to every gradient.

    Taught in notebook 10.
    """
    activation, interleaved = transformers_gate(self)
    gate_up, down = self.gate_up_proj, self.down_proj
    if not self.is_transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    biases = (self.gate_up_proj_bias, self.down_proj_bias) if self.has_bias else (None, None)
    try:
        return moe_experts(
            hidden_states,
            gate_up,
            down,
            top_k_index,
            top_k_weights,
            activation=activation,
            gate_up_bias=biases[0],
            down_bias=biases[1],
            interleaved=interleaved,
            expert_id_check=expert_id_check,
        )
    except (TypeError, ValueError) as error:
        raise type(error)(
            f"{error} (in {type(self).__name__}: A is hidden_states, W_gate_up gate_up_proj, "
            "W_down down_proj, expert_ids top_k_index, combine_weights top_k_weights, "
            "gate_up_bias gate_up_proj_bias, down_bias down_proj_bias)"
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
# 4-8 experts, top-2 (DeepSeek-V3's first layer is a dense MLP, as in the real model; gpt-oss
# has biases, interleaved gate and up columns and its clamped gate).
TINY_TRANSFORMERS_MODELS = ("Mixtral", "Qwen3-MoE", "DeepSeek-V3", "gpt-oss")


def tiny_transformers_model(
    name: str, dtype: torch.dtype = torch.float32, seed: int = 0
) -> torch.nn.Module:  # a transformers PreTrainedModel, in eval mode, on DEVICE
    """A randomly initialised, tiny ``MixtralForCausalLM``, ``Qwen3MoeForCausalLM``,
    ``DeepseekV3ForCausalLM`` or ``GptOssForCausalLM`` (``TINY_TRANSFORMERS_MODELS``), built
    from its config: nothing is downloaded.

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
    elif name == "gpt-oss":
        rope = dict(transformers.GptOssConfig().rope_parameters)  # YaRN, scaling by 32:
        rope["original_max_position_embeddings"] = common["max_position_embeddings"] // 32
        config = transformers.GptOssConfig(
            intermediate_size=48, num_local_experts=4, head_dim=16, rope_parameters=rope, **common
        )
        model_class = transformers.GptOssForCausalLM
    else:
        raise ValueError(f"name must be one of {TINY_TRANSFORMERS_MODELS}, got {name!r}")
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():  # gpt-oss initialises its experts' biases to zero: make them count
        for module in model.modules():
            for bias in (getattr(module, f"{p}_bias", None) for p in ("gate_up_proj", "down_proj")):
                if bias is not None:
                    bias.normal_(std=config.initializer_range)
    return model.to(DEVICE, dtype).eval()


def count_moe_blocks(model: torch.nn.Module) -> int:
    """How many experts modules (those holding ``gate_up_proj``) a model has.

    Taught in notebook 10.
    """
    return sum(hasattr(module, "gate_up_proj") for module in model.modules())
