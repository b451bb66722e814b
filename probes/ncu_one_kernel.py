"""Launches for Nsight Compute: each point runs its work twice, so that ncu skips the first
(compiling) launch of each kernel it profiles (``--launch-skip``). Points:

- ``weight_grad``: one moe_weight_grad launch (DeepSeek-V3 gate_up weight gradient, T = 8192);
- ``fp8_decode MODEL``: the FP8 layer (``moe_experts_fp8``) at one token, uniform top-k routing,
  whose two flat kernels stream the active experts' e4m3 weights at 0.71-0.75 of the copy rate
  in a CUDA graph; then ``copy_`` of as many bytes, the copy rate's kernel, under ncu's clocks;
- ``prefill MODEL T``: the bf16 layer (``moe_experts``) at T tokens, uniform top-k routing.

    ncu --kernel-name regex:moe_weight_grad --launch-skip 1 --launch-count 1 \
        python probes/ncu_one_kernel.py weight_grad
    ncu --kernel-name regex:flat_fp8 --launch-skip 2 --launch-count 2 \
        python probes/ncu_one_kernel.py fp8_decode DeepSeek-V3
    ncu --kernel-name regex:elementwise --launch-skip 1 --launch-count 1 \
        python probes/ncu_one_kernel.py fp8_decode_copy DeepSeek-V3
    ncu --kernel-name regex:_flat --launch-skip 2 --launch-count 2 \
        python probes/ncu_one_kernel.py prefill DeepSeek-V3 16384
"""

import moe_helpers as mh

import sys

import fp8_probe
import torch

# H, I, E, top_k of the layer table's models and the FP8 probe's
MODELS = {m.name: (m.H, m.I, m.E, m.top_k) for m in mh.LAYER_TABLE_MODELS}
MODELS |= {name: tuple(sizes) for name, *sizes in fp8_probe.MODELS}  # Kimi-K2 too


def weight_grad():
    H, I, E, k = MODELS["DeepSeek-V3"]  # noqa: E741
    T = 8192
    ids, weights = mh.model_routing(T, E, k, 0.0)
    P = ids.numel()
    routing = mh.align_to_blocks(ids, E, 128)
    tokens = torch.randn(T, H, device=mh.DEVICE, dtype=torch.bfloat16)
    gate_up = torch.randn(P, 2 * I, device=mh.DEVICE, dtype=torch.bfloat16)
    args = (tokens, gate_up, routing.sorted_pair_ids, routing.expert_block_offsets(E), weights)
    index_dtype = mh.kernel_index_dtype(tokens, torch.empty(E, H, 2 * I, device="meta"), P)
    for _ in range(2):
        mh.run_kernel(
            mh.moe_weight_grad,
            (*args, False, True, False),
            mh.WEIGHT_GRAD_CONFIGS[torch.bfloat16],
            index_dtype,
        )


def fp8_decode(name):
    H, I, E, k = MODELS[name]  # noqa: E741
    weights = fp8_probe.experts(H, I, E)[1]  # the bf16 weights freed at once
    A, ids, combine = fp8_probe.routing(1, E, k, H)
    for _ in range(2):
        mh.moe_experts_fp8(A, *weights, ids, combine)


def fp8_decode_copy(name):
    H, I, E, k = MODELS[name]  # noqa: E741
    ids = fp8_probe.routing(1, E, k, H)[1]  # fp8_decode's routing
    active_bytes = ids.unique().numel() * 3 * H * I  # e4m3: a byte a weight
    source = torch.empty(active_bytes, dtype=torch.uint8, device=mh.DEVICE).random_()
    target = torch.empty_like(source)
    for _ in range(2):
        target.copy_(source)


def prefill(name, T):
    H, I, E, k = MODELS[name]  # noqa: E741
    A = torch.randn(int(T), H, device=mh.DEVICE, dtype=torch.bfloat16)
    W_gate_up = 0.02 * torch.randn(E, H, 2 * I, device=mh.DEVICE, dtype=torch.bfloat16)
    W_down = 0.02 * torch.randn(E, I, H, device=mh.DEVICE, dtype=torch.bfloat16)
    ids, combine = mh.model_routing(int(T), E, k, 0.0)
    for _ in range(2):
        mh.moe_experts(A, W_gate_up, W_down, ids, combine)


if __name__ == "__main__":
    point, *arguments = sys.argv[1:]
    {
        "weight_grad": weight_grad,
        "fp8_decode": fp8_decode,
        "fp8_decode_copy": fp8_decode_copy,
        "prefill": prefill,
    }[point](*arguments)
    torch.cuda.synchronize()  # ncu reads the counters of finished launches
