"""One moe_weight_grad launch (DeepSeek-V3 gate_up weight gradient, T = 8192) for Nsight
Compute, the second of two (the first compiles):

    ncu --kernel-name regex:moe_weight_grad --launch-skip 1 --launch-count 1 \
        python probes/ncu_one_kernel.py
"""

import moe_helpers as mh

import torch

model = {m.name: m for m in mh.MOE_MODELS}["DeepSeek-V3"]
T = 8192
ids, weights = mh.model_routing(T, model.E, model.top_k, 0.0)
P = ids.numel()
routing = mh.align_to_blocks(ids, model.E, 128)
tokens = torch.randn(T, model.H, device="cuda", dtype=torch.bfloat16)
gate_up = torch.randn(P, 2 * model.I, device="cuda", dtype=torch.bfloat16)
args = (tokens, gate_up, routing.sorted_pair_ids, routing.expert_block_offsets(model.E), weights)
index_dtype = mh.kernel_index_dtype(
    tokens, torch.empty(model.E, model.H, 2 * model.I, device="meta"), P
)
for _ in range(2):
    mh.run_kernel(
        mh.moe_weight_grad,
        (*args, False, True, False),
        mh.WEIGHT_GRAD_CONFIGS[torch.bfloat16],
        index_dtype,
    )
torch.cuda.synchronize()
