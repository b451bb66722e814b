"""GPU probe: ``moe_experts`` at gpt-oss-120b's sizes with each of gpt-oss's features (biases,
the clamped activation, interleaved gate and up columns) alone and together.

    python probes/gpt_oss_probe.py

Each row is printed as JSON: the token count, the variant and its median time
(``mh.time_ms``), every variant timed in the same run on the same card (printed first).
"""

import moe_helpers as mh

import functools
import json

import torch


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
            print(json.dumps({"T": T, "variant": name, "us": round(ms * 1e3, 1)}), flush=True)


if __name__ == "__main__":
    print(json.dumps(mh.machine_info()))
    gpt_oss_features()
