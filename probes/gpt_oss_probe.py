"""GPU probe: gpt-oss-120b's experts. ``features``: ``moe_experts`` with each of gpt-oss's
features (biases, the clamped activation, interleaved gate and up columns) alone and together;
``backends``: transformers' ``GptOssExperts`` with "helion" and with each of transformers' own
experts backends ("grouped_mm", "batched_mm", "eager"), called from Python.

    python probes/gpt_oss_probe.py SECTION [SECTION ...]   (features, backends)

Timings are medians of ``triton.testing.do_bench`` (``mh.time_ms``); every variant and backend
is timed in the same run on the same card.
"""

import moe_helpers as mh

import functools

import torch
import transformers
from probe_common import record, run_sections


def gpt_oss_features():
    """``moe_experts`` at gpt-oss-120b's sizes (bf16, uniform top-4) with each of gpt-oss's
    features alone and all together: which one costs what, and the float64 check of 8 rows."""
    E, H, I, k = 128, 2880, 2880, 4  # noqa: E741
    g = torch.Generator(device="cuda").manual_seed(0)

    def weights(*shape):
        return 0.02 * torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16)

    W_gate_up, W_down, bias_gate_up, bias_down = (
        weights(E, H, 2 * I),
        weights(E, I, H),
        weights(E, 2 * I),
        weights(E, H),
    )
    biases = dict(gate_up_bias=bias_gate_up, down_bias=bias_down)
    variants = {
        "plain": {},
        "biases": biases,
        "activation": dict(activation=mh.GPT_OSS_ACTIVATION),
        "interleaved": dict(interleaved=True),
        "gpt-oss": dict(interleaved=True, activation=mh.GPT_OSS_ACTIVATION, **biases),
    }
    for T in (1, 64, 4096, 16384):
        A = torch.randn(T, H, generator=g, device="cuda", dtype=torch.bfloat16)
        ids = torch.rand(T, E, generator=g, device="cuda").topk(k, dim=1).indices
        w = torch.softmax(torch.randn(T, k, generator=g, device="cuda"), dim=1)
        for name, options in variants.items():
            out = mh.moe_experts(A, W_gate_up, W_down, ids, w, **options)
            checked = {key: v for key, v in options.items() if key != "activation"}
            activation = options.get("activation", "silu")
            rows = torch.arange(min(T, 8), device="cuda")
            mh.assert_experts_close(out, A, W_gate_up, W_down, ids, w, activation, rows, **checked)
            call = functools.partial(mh.moe_experts, A, W_gate_up, W_down, ids, w, **options)
            ms = mh.time_ms(call)
            record("features", T=T, variant=name, us=round(ms * 1e3, 1))


@torch.no_grad()
def gpt_oss_backends():
    """``GptOssExperts`` at gpt-oss-120b's sizes (bf16, uniform top-4, random weights and
    biases) through transformers' experts interface: "helion" against "grouped_mm",
    "batched_mm" (up to 24 GiB of gathered weights) and "eager" (up to T = 4096)."""
    mh.register_transformers_experts()
    config = transformers.GptOssConfig(
        hidden_size=2880, intermediate_size=2880, num_local_experts=128, num_experts_per_tok=4
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        experts = transformers.models.gpt_oss.modeling_gpt_oss.GptOssExperts(config)
    experts = experts.to(torch.bfloat16)
    for parameter in experts.parameters():
        parameter.normal_(std=0.02)
    for T in (1, 8, 64, 4096, 16384):
        hidden = torch.randn(T, 2880, device="cuda", dtype=torch.bfloat16)
        ids = torch.rand(T, 128, device="cuda").topk(4, dim=1).indices
        w = torch.softmax(torch.randn(T, 4, device="cuda"), dim=1).to(torch.bfloat16)
        times, outputs = {}, {}
        for backend in ("helion", "grouped_mm", "batched_mm", "eager"):
            if backend == "batched_mm" and T * 4 * 3 * 2880 * 2880 * 2 > 24 * 2**30:
                continue
            if backend == "eager" and T > 4096:
                continue
            experts.config._experts_implementation = backend
            outputs[backend] = experts(hidden, ids, w)
            times[backend] = mh.time_ms(functools.partial(experts, hidden, ids, w))
        reference = outputs["grouped_mm"].float()
        error = (outputs["helion"].float() - reference).abs().max() / reference.pow(2).mean().sqrt()
        fastest = min(ms for backend, ms in times.items() if backend != "helion")
        us = {backend: round(ms * 1e3, 1) for backend, ms in times.items()}
        speedup = round(fastest / times["helion"], 2)
        record("backends", T=T, us=us, helion_speedup=speedup, error_over_rms=error.item())


SECTIONS = {"features": gpt_oss_features, "backends": gpt_oss_backends}

if __name__ == "__main__":
    run_sections(SECTIONS)
