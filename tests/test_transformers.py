"""The layer as a transformers experts backend, in tiny randomly initialised models."""

import moe_helpers as mh
from helion_moe import transformers_backend

import pytest
import torch
import transformers

mh.register_transformers_experts()

# bf16 logits on the GPU differ from "eager" by the bf16 rounding of the intermediate (both
# round it, at different places); float32 on the CPU only by the order of the additions.
LOGIT_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def tiny_model(name: str, dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    """A 2-layer model of the given family, hidden size 64, 4-8 experts, top-2, random."""
    return mh.tiny_transformers_model(name, dtype=dtype, seed=0)


@pytest.mark.parametrize("name", mh.TINY_TRANSFORMERS_MODELS)
def test_helion_logits_match_eager(name, monkeypatch):
    dtype = torch.bfloat16 if mh.ON_GPU else torch.float32
    model = tiny_model(name, dtype)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 9), device=mh.DEVICE)
    calls = []  # one per MoE block that reached the layer (replayed from a graph or not)
    forward = transformers_backend.moe_experts
    monkeypatch.setattr(
        transformers_backend, "moe_experts", lambda *a, **k: calls.append(1) or forward(*a, **k)
    )
    with torch.no_grad():
        model.set_experts_implementation("eager")
        expected = model(input_ids).logits
        assert not calls
        model.set_experts_implementation("helion")
        actual = model(input_ids).logits
    assert len(calls) == mh.count_moe_blocks(model) > 0, "not every MoE block ran on helion"
    scale = expected.float().pow(2).mean().sqrt()
    error = (actual.float() - expected.float()).abs().max() / scale
    assert error < LOGIT_TOLERANCE[dtype], f"logits differ by {error:.3g} x RMS"


def test_experts_outside_transformers_interface_are_not_counted_and_not_quantized():
    # Llama4TextExperts holds gate_up_proj but keeps its own forward (no experts interface)
    config = transformers.Llama4TextConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, intermediate_size=48, intermediate_size_mlp=96,
        num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1,
    )  # fmt: skip
    model = transformers.Llama4ForCausalLM(config)
    assert mh.count_moe_blocks(model) == 0
    with pytest.raises(NotImplementedError, match=r"Llama4TextExperts\) does not run through"):
        mh.quantize_experts_fp8(model)


@pytest.mark.parametrize("name", mh.TINY_TRANSFORMERS_MODELS)
def test_greedy_generation_gives_eager_tokens(name):
    model = tiny_model(name)
    prompt = torch.randint(0, model.config.vocab_size, (1, 5), device=mh.DEVICE)
    tokens = {}
    for implementation in ("eager", "helion"):
        model.set_experts_implementation(implementation)
        tokens[implementation] = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert tokens["helion"].shape == (1, 13)
    assert torch.equal(tokens["helion"], tokens["eager"])


def _experts(name: str = "Mixtral") -> torch.nn.Module:
    model = tiny_model(name)
    model.set_experts_implementation("helion")
    return next(m for m in model.modules() if hasattr(m, "gate_up_proj"))


def _routing(experts, T=3):
    hidden = torch.randn(T, experts.hidden_dim, device=mh.DEVICE)
    top_k_index = torch.tensor([[0, 1], [2, 3], [1, 0]][:T], device=mh.DEVICE)
    return hidden, top_k_index, torch.full((T, 2), 0.5, device=mh.DEVICE)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (
            {"top_k_index": [[0, 9], [2, 3], [1, 0]]},
            ValueError,
            "expert_ids must lie in.*top_k_index",
        ),
        ({"top_k_index": [[0.0, 1.0]] * 3}, TypeError, "expert_ids.*top_k_index"),
        ({"hidden_states": "half"}, TypeError, "A has torch.float16.*hidden_states"),
        ({"hidden_states": "meta"}, ValueError, "A is on meta.*hidden_states"),
        ({"top_k_weights": "int"}, TypeError, "combine_weights.*top_k_weights"),
    ],
)
def test_the_backend_names_bad_input(change, error, match):
    experts = _experts()
    hidden, top_k_index, top_k_weights = _routing(experts)
    if "top_k_index" in change:
        top_k_index = torch.tensor(change["top_k_index"], device=mh.DEVICE)
    if change.get("hidden_states") == "half":
        hidden = hidden.half()
    if change.get("hidden_states") == "meta":
        hidden = hidden.to("meta")
    if "top_k_weights" in change:
        top_k_weights = top_k_weights.int()
    with torch.no_grad(), pytest.raises(error, match=match):
        # "host": a bad id raises a ValueError on a GPU too (not a device-side assertion)
        mh.transformers_experts_forward(
            experts, hidden, top_k_index, top_k_weights, expert_id_check="host"
        )


@pytest.mark.parametrize("flag, value", [("has_gate", False), ("is_concatenated", False)])
def test_unsupported_layouts_raise_not_implemented_naming_the_flag(flag, value):
    experts = _experts()
    setattr(experts, flag, value)
    with torch.no_grad(), pytest.raises(NotImplementedError, match=f"{flag}={value}"):
        experts(*_routing(experts))


def test_unsupported_activation_and_gate_raise_not_implemented():
    experts = _experts()
    experts.act_fn = torch.nn.ReLU()
    with torch.no_grad(), pytest.raises(NotImplementedError, match="act_fn is ReLU"):
        experts(*_routing(experts))
    experts = _experts()

    def own_gate(self, gate_up):  # a gate that neither transformers' default nor gpt-oss's is
        return gate_up.chunk(2, dim=-1)[1]

    experts.__class__ = type("OwnGateExperts", (type(experts),), {"_apply_gate": own_gate})
    with torch.no_grad(), pytest.raises(NotImplementedError, match=r"_apply_gate is .*own_gate"):
        experts(*_routing(experts))


def test_gpt_oss_experts_run_with_their_biases_interleaved_columns_and_gate():
    model = tiny_model("gpt-oss")
    experts = next(m for m in model.modules() if hasattr(m, "gate_up_proj"))
    assert experts.has_bias and not experts.is_concatenated and experts.is_transposed
    assert experts.gate_up_proj_bias.abs().min() > 0, "the biases would not be tested"
    activation, interleaved = mh.transformers_gate(experts)
    assert interleaved and activation == mh.GatedActivation("silu", 1.702, 7.0, 1.0)
    g = torch.Generator().manual_seed(0)
    hidden = 60 * torch.randn(5, model.config.hidden_size, generator=g).to(mh.DEVICE)
    top_k_index = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2], [2, 0]], device=mh.DEVICE)
    top_k_weights = torch.rand(5, 2, generator=g).to(mh.DEVICE)
    with torch.no_grad():  # gate and up values on both sides of the clamp's limit of 7
        gate_up = torch.einsum("th,thn->tn", hidden, experts.gate_up_proj[top_k_index[:, 0]])
        assert (gate_up.abs() > experts.limit).any() and (gate_up.abs() < experts.limit).any()
        results = {}
        for backend in ("eager", "helion"):
            model.set_experts_implementation(backend)
            results[backend] = experts(hidden, top_k_index, top_k_weights)
    scale = results["eager"].pow(2).mean().sqrt()
    error = (results["helion"] - results["eager"]).abs().max() / scale
    assert error < mh.TOLERANCES[torch.float32], f"differs from eager by {error:.3g} x RMS"


def test_transposed_weights_are_read_in_place():
    experts = _experts()
    hidden, top_k_index, top_k_weights = _routing(experts)
    with torch.no_grad():
        expected = mh.transformers_experts_forward(experts, hidden, top_k_index, top_k_weights)
        experts.gate_up_proj = torch.nn.Parameter(experts.gate_up_proj.transpose(1, 2).contiguous())
        experts.down_proj = torch.nn.Parameter(experts.down_proj.transpose(1, 2).contiguous())
        experts.is_transposed = True
        actual = mh.transformers_experts_forward(experts, hidden, top_k_index, top_k_weights)
    # the same weights, so the same result up to float32 rounding: on a GPU the per-pair
    # kernels' sums over K run in an order that depends on the layout
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_sentinel_pairs_count_as_in_transformers_grouped_mm_forward_and_backward():
    # Under transformers' expert parallelism a pair of another rank's expert has the id E and
    # a weight of zero; its backends skip it. So does "helion", by default.
    model = tiny_model("Qwen3-MoE")
    experts = next(m for m in model.modules() if hasattr(m, "gate_up_proj"))
    E = experts.num_experts
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(9, experts.hidden_dim, generator=g).to(mh.DEVICE)
    top_k_index = torch.randint(0, E, (9, 2), generator=g).to(mh.DEVICE)
    top_k_index[torch.tensor([0, 3, 5]), torch.tensor([0, 1, 0])] = E
    top_k_index[7] = E
    weights = torch.rand(9, 2, generator=g).to(mh.DEVICE).masked_fill(top_k_index == E, 0)
    results = {}
    for backend in ("grouped_mm", "helion"):
        model.set_experts_implementation(backend)
        leaves = [t.clone().requires_grad_() for t in (hidden, weights)]
        experts.zero_grad()
        out = experts(leaves[0], top_k_index, leaves[1])
        out.backward(torch.linspace(-1, 1, out.numel(), device=mh.DEVICE).view(out.shape))
        grads = [leaf.grad for leaf in leaves] + [experts.gate_up_proj.grad, experts.down_proj.grad]
        results[backend] = [out.detach(), *grads]
    names = ("output", "d hidden", "d weights", "d gate_up_proj", "d down_proj")
    for name, ours, theirs in zip(names, results["helion"], results["grouped_mm"], strict=True):
        scale = theirs.float().pow(2).mean().sqrt().clamp(min=1e-6)
        # On the CPU both backends compute float32 exactly alike. On a GPU they round it
        # differently (measured: up to 3.4% of the RMS), while a sentinel pair counted as a real
        # one would add a whole pair's share, of the order of the RMS itself.
        bound = 0.1 if mh.ON_GPU else 1e-4
        assert (ours - theirs).abs().max() / scale < bound, name


@pytest.mark.parametrize("num_experts, top_k", [(384, 8), (512, 10)])  # Kimi-K2, Qwen3-Next
def test_a_model_with_hundreds_of_experts_gives_eager_logits_and_tokens(num_experts, top_k):
    config = transformers.Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(config).to(mh.DEVICE).eval()
    prompt = torch.randint(0, config.vocab_size, (1, 40), device=mh.DEVICE)  # 40 k pairs: flat
    logits, tokens = {}, {}
    for implementation in ("eager", "helion"):
        model.set_experts_implementation(implementation)
        with torch.no_grad():
            logits[implementation] = model(prompt).logits
        tokens[implementation] = model.generate(prompt[:, :5], max_new_tokens=6, do_sample=False)
    scale = logits["eager"].pow(2).mean().sqrt()
    error = (logits["helion"] - logits["eager"]).abs().max() / scale
    assert error < mh.TOLERANCES[torch.float32], f"logits differ by {error:.3g} x RMS"
    assert torch.equal(tokens["helion"], tokens["eager"])
