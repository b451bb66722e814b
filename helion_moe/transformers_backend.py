"""The layer as a transformers experts backend, ``"helion"`` (notebook 10): one function of
transformers' ``ExpertsInterface`` that reads a module's weights in place in their stored layout,
refusing the experts it does not compute, one of its ``FP8ExpertsInterface`` for fine-grained FP8
experts (notebook 13), and the tiny models the course checks them on.
"""

from __future__ import annotations

import functools
import math

import torch

from .fp8 import moe_experts_fp8, quantize_weights_fp8
from .kernels.activations import ACTIVATIONS, GatedActivation
from .layer import moe_experts
from .mode import DEVICE

__all__ = [
    "TINY_TRANSFORMERS_MODELS",
    "TRANSFORMERS_EXPERTS",
    "count_moe_blocks",
    "quantize_experts_fp8",
    "register_transformers_experts",
    "tiny_transformers_model",
    "transformers_activation",
    "transformers_experts_forward",
    "transformers_fp8_experts_forward",
    "transformers_gate",
    "transformers_layer_arguments",
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
_FP8_GATE = ("transformers.integrations.finegrained_fp8", "_apply_gate")


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
    if kind == _FP8_GATE and experts.is_concatenated:  # FP8Experts: gpt-oss's, clamped or plain
        if experts.swiglu_alpha is not None:
            limit = math.inf if experts.swiglu_limit is None else experts.swiglu_limit
            return GatedActivation("silu", experts.swiglu_alpha, limit, up_shift=1.0), False
        limit = math.inf if experts.limit is None else experts.limit
        return GatedActivation(transformers_activation(experts), limit=limit), False
    raise NotImplementedError(
        f"{name}'s _apply_gate is {gate.__module__}.{gate.__name__} with is_concatenated="
        f"{experts.is_concatenated}; the {TRANSFORMERS_EXPERTS!r} experts backend computes "
        "transformers' default gate on concatenated gate and up, gpt-oss's on interleaved, "
        "and fine-grained FP8's on concatenated"
    )


def transformers_layer_arguments(
    experts: torch.nn.Module,  # a transformers experts module (@use_experts_implementation)
) -> tuple[torch.Tensor, torch.Tensor, dict[str, object]]:  # [E, K, 2I], [E, I, N], options
    """A transformers experts module's weights as ``moe_experts`` reads them, in place
    (``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I] seen transposed, or as stored when
    ``is_transposed``), and its keyword arguments: the gate (``transformers_gate``), whether
    gate and up columns are interleaved, and the biases when ``has_bias``.

    Taught in notebook 10.
    """
    activation, interleaved = transformers_gate(experts)
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if not experts.is_transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    options = {"activation": activation, "interleaved": interleaved}
    if experts.has_bias:
        options |= {"gate_up_bias": experts.gate_up_proj_bias, "down_bias": experts.down_proj_bias}
    return gate_up, down, options


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
    gate_up, down, layer_options = transformers_layer_arguments(self)
    try:
        return moe_experts(
            hidden_states,
            gate_up,
            down,
            top_k_index,
            top_k_weights,
            **layer_options,
            expert_id_check=expert_id_check,
        )
    except (TypeError, ValueError) as error:
        raise type(error)(
            f"{error} (in {type(self).__name__}: A is hidden_states, W_gate_up gate_up_proj, "
            "W_down down_proj, expert_ids top_k_index, combine_weights top_k_weights, "
            "gate_up_bias gate_up_proj_bias, down_bias down_proj_bias)"
        ) from error


def transformers_fp8_experts_forward(
    self: torch.nn.Module,  # transformers' FP8Experts (fine-grained FP8)
    hidden_states: torch.Tensor,  # [T, H]
    top_k_index: torch.Tensor,  # [T, k] integer
    top_k_weights: torch.Tensor,  # [T, k]
    expert_id_check: str = "sentinels",  # as for moe_matmul
) -> torch.Tensor:  # [T, H]
    """transformers' FP8 experts interface, computed by ``moe_experts_fp8`` on the module's e4m3
    weights and float32 ``*_scale_inv`` block scales read in place (``gate_up_proj`` [E, 2I, H]
    with ``gate_up_proj_scale_inv`` [E, 2I / 128, H / 128], ``down_proj`` [E, H, I] likewise),
    the activations quantized per token and 128 columns as transformers' "dynamic" scheme does.
    Sentinel ids as for ``transformers_experts_forward``. NotImplementedError, naming the
    setting, for blocks other than 128 x 128, static activation scales or scales other than
    float32 (UE8M0), which the kernels do not take.

    Taught in notebook 13.
    """
    activation, _ = transformers_gate(self)
    name = type(self).__name__
    unsupported = {
        "block_size": (tuple(self.block_size or ()), (128, 128)),
        "activation_scheme": (self.activation_scheme, "dynamic"),
        "the scales' dtype": (self.down_proj_scale_inv.dtype, torch.float32),
    }
    for setting, (value, supported) in unsupported.items():
        if value != supported:
            raise NotImplementedError(
                f"{name} has {setting} {value!r}; the {TRANSFORMERS_EXPERTS!r} FP8 experts "
                f"backend computes {supported!r}"
            )
    weights = (self.gate_up_proj, self.gate_up_proj_scale_inv, self.down_proj)
    weights += (self.down_proj_scale_inv,)
    if not self.is_transposed:
        weights = tuple(w.transpose(1, 2) for w in weights)
    try:
        return moe_experts_fp8(
            hidden_states,
            *weights,
            top_k_index,
            top_k_weights,
            activation=activation,
            expert_id_check=expert_id_check,
        )
    except (TypeError, ValueError) as error:
        raise type(error)(
            f"{error} (in {name}: A is hidden_states, W_gate_up gate_up_proj, gate_up_scales "
            "gate_up_proj_scale_inv, W_down down_proj, down_scales down_proj_scale_inv, "
            "expert_ids top_k_index, combine_weights top_k_weights)"
        ) from error


@functools.cache
def _fp8_experts_class() -> type[torch.nn.Module]:
    """transformers' FP8Experts, dispatching on ``FP8ExpertsInterface`` as its quantizer sets
    it up (``replace_with_fp8_linear``): decorated once."""
    from transformers.integrations import finegrained_fp8
    from transformers.integrations.moe import use_experts_implementation

    return use_experts_implementation(
        experts_class=finegrained_fp8.FP8Experts,
        experts_interface=finegrained_fp8.ALL_FP8_EXPERTS_FUNCTIONS,
    )


def quantize_experts_fp8(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with each experts module (concatenated gate and up, no biases) replaced by
    transformers' ``FP8Experts`` holding its weights quantized as a fine-grained FP8 checkpoint
    holds them (``quantize_weights_fp8``: e4m3, float32 scales per 128 x 128 block), in place.
    Only the experts change: attention and the router keep their dtype. Experts that do not
    run through transformers' experts interface (Llama-4's) get a NotImplementedError.

    Taught in notebook 13.
    """
    fp8_experts = _fp8_experts_class()
    for name, experts in list(model.named_modules()):
        weights = getattr(experts, "gate_up_proj", None)
        if not isinstance(weights, torch.nn.Parameter) or isinstance(experts, fp8_experts):
            continue  # not experts, or already FP8
        if not _dispatches_experts(experts):
            raise NotImplementedError(
                f"{name} ({type(experts).__name__}) does not run through transformers' experts "
                "interface, so FP8Experts could not take its place"
            )
        if experts.has_bias or not experts.is_concatenated or experts.is_transposed:
            raise NotImplementedError(
                f"{name} ({type(experts).__name__}) has biases, interleaved or transposed "
                "weights; FP8Experts takes concatenated [E, out, in] weights without biases"
            )
        config = getattr(experts, "config", model.config.get_text_config())
        with torch.device("meta"):
            replacement = fp8_experts(config, block_size=(128, 128))
        for weight in ("gate_up_proj", "down_proj"):
            q, scales = quantize_weights_fp8(getattr(experts, weight).detach())
            setattr(replacement, weight, torch.nn.Parameter(q, requires_grad=False))
            setattr(replacement, f"{weight}_scale_inv", torch.nn.Parameter(scales, False))
        replacement.act_fn = experts.act_fn
        model.set_submodule(name, replacement)
    return model


def register_transformers_experts() -> str:
    """Register ``transformers_experts_forward`` in transformers' ``ExpertsInterface`` (and
    ``transformers_fp8_experts_forward`` in its ``FP8ExpertsInterface``) as
    ``TRANSFORMERS_EXPERTS``, so that ``model.set_experts_implementation("helion")`` (or
    ``from_pretrained(..., experts_implementation="helion")``) runs every MoE block of a model
    on the course's kernels. Returns the name.

    Taught in notebook 10.
    """
    from transformers.integrations.finegrained_fp8 import FP8ExpertsInterface
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(TRANSFORMERS_EXPERTS, transformers_experts_forward)
    FP8ExpertsInterface.register(TRANSFORMERS_EXPERTS, transformers_fp8_experts_forward)
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
    """How many experts modules of a model run through transformers' experts interface, so on
    the course's kernels once the model's experts implementation is "helion": those holding
    ``gate_up_proj`` that ``use_experts_implementation`` set up (it gives them ``has_gate``).
    Experts classes that transformers does not so decorate (Llama-4's ``Llama4TextExperts``,
    LongCat-Flash's, Step3p7's) keep their own forward whatever the implementation, and are not
    counted; nor is a dense MLP with an ``nn.Linear`` named ``gate_up_proj``.

    Taught in notebook 10.
    """
    return sum(_dispatches_experts(module) for module in model.modules())


def _dispatches_experts(module: torch.nn.Module) -> bool:
    return isinstance(getattr(module, "gate_up_proj", None), torch.nn.Parameter) and hasattr(
        module, "has_gate"
    )
