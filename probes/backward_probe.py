"""GPU probe of the layer's backward: the configs of the weight gradient, of the gated
activation's backward and of the fused dh kernel the layer ran before (moe_down_backward,
here), each sweep's best installed for the sections after it (so run a sweep before
backward_table or backward_parts in the same call to time the layer with it), the weight
gradient's row layouts at the installed config, the backward table and its kernel breakdown,
and the training step with the fused dh kernel: what NOTES.md quotes, re-runnable on a GPU.

    python probes/backward_probe.py SECTION [SECTION ...]   (sections: see SECTIONS below)

Each section prints a table; every row names what it measured. Timings: ``mh.time_ms`` (median
of triton.testing.do_bench) and ``mh.host_and_gpu_us``; every baseline in the same run.
probe_common.run_sections runs the sections and writes $OUT/probe_<sections>.json.
"""

import moe_helpers as mh
from helion_moe import layer as layer_module

import contextlib
import functools
import json
import os
from pathlib import Path
from unittest import mock

import helion
import helion.language as hl
import pandas as pd
import torch
from probe_common import ROWS, SWIGLU, record, run_sections

WEIGHT_GRAD_CANDIDATES = [  # [K tile, N tile], warps, stages
    ([128, 128], 8, 3),
    ([128, 128], 4, 4),
    ([128, 256], 8, 2),
    ([128, 256], 8, 3),
    ([128, 256], 8, 4),
    ([256, 128], 8, 2),
    ([256, 128], 8, 3),
    ([64, 256], 4, 3),
]
WEIGHT_GRAD_POINTS = [("Mixtral-8x7B", 8192), ("DeepSeek-V3", 8192), ("Qwen3-30B-A3B", 16384)]


def weight_grad_configs():
    """The weight-gradient kernel alone (routing pre-aligned) at WEIGHT_GRAD_CANDIDATES, for
    both of the layer's weight gradients, unweighted as the layer runs them: dW_gate_up = sum
    A^T d(gate, up) (rows of A by token, of d(gate, up) by pair) and dW_down = sum (w h)^T grad
    (w h by pair, grad by token).
    The candidate with the least time over all points becomes mh.WEIGHT_GRAD_CONFIGS[bf16] for
    the sections after this one."""
    models = {m.name: m for m in mh.MOE_MODELS}
    total_us = {}
    for name, T in WEIGHT_GRAD_POINTS:
        model = models[name]
        ids, weights = mh.model_routing(T, model.E, model.top_k, 0.0)
        P = ids.numel()
        block_t = mh.flat_token_block(P, model.E)
        routing = mh.align_to_blocks(ids, model.E, block_t)
        offsets = routing.expert_block_offsets(model.E)
        tokens = torch.randn(T, model.H, device="cuda", dtype=torch.bfloat16)
        by_pair = {
            "gate_up": torch.randn(P, 2 * model.I, device="cuda", dtype=torch.bfloat16),
            "down": torch.randn(P, model.I, device="cuda", dtype=torch.bfloat16),
        }
        gemms = {  # (A, grad_out, a_by_pair, grad_by_pair, weighted), K, N
            "gate_up": ((tokens, by_pair["gate_up"], False, True, False), model.H, 2 * model.I),
            "down": ((by_pair["down"], tokens, True, False, False), model.I, model.H),
        }
        for which, ((A, grad, *flags), K, N) in gemms.items():
            args = (A, grad, routing.sorted_pair_ids, offsets, weights, *flags)
            dW = torch.empty(model.E, K, N, device="meta")
            index_dtype = mh.kernel_index_dtype(A, dW, P)
            for tiles, warps, stages in WEIGHT_GRAD_CANDIDATES:
                config = helion.Config(block_sizes=tiles, num_warps=warps, num_stages=stages)
                row = dict(model=name, T=T, gemm=which, block_t=block_t, tiles=tiles)
                try:
                    ms = mh.time_ms(
                        functools.partial(
                            mh.run_kernel, mh.moe_weight_grad, args, config, index_dtype
                        )
                    )
                except Exception as error:
                    record("weight_grad_configs", **row, error=repr(error)[:300])
                    continue
                key = (tuple(tiles), warps, stages)
                total_us[key] = total_us.get(key, 0.0) + ms * 1e3
                record(
                    "weight_grad_configs",
                    **row,
                    warps=warps,
                    stages=stages,
                    us=round(ms * 1e3, 1),
                    tflops=round(2 * P * K * N / ms / 1e9, 1),
                )
        del tokens, by_pair, gemms, args
        torch.cuda.empty_cache()
    (tiles, warps, stages), us = min(total_us.items(), key=lambda item: item[1])
    best = helion.Config(block_sizes=list(tiles), num_warps=warps, num_stages=stages)
    mh.WEIGHT_GRAD_CONFIGS[torch.bfloat16] = best
    record("weight_grad_configs", best=repr(best), total_us=round(us, 1))


@helion.kernel(static_shapes=False, key=mh.sizes_of_one)
def weight_grad_row_modes(
    A: torch.Tensor,  # [T, K] by token, [P, K] by pair or [num_slots, K] by slot
    grad_out: torch.Tensor,  # [T, N], [P, N] or [num_slots, N]
    sorted_pair_ids: torch.Tensor,  # [num_blocks, block_t]
    expert_block_offsets: torch.Tensor,  # [E + 1] int32
    combine_weights: torch.Tensor,  # [T, k] (only its shape is read)
    a_rows: hl.constexpr,  # "token", "pair" or "slot": what A's rows are
    grad_rows: hl.constexpr,  # likewise for grad_out
) -> torch.Tensor:  # [E, K, N]
    """mh.moe_weight_grad (unweighted) where either operand may be laid out in slot order (row
    b * block_t + j is slot j of block b, zeros in padding): such a load needs no pair id."""
    K = hl.specialize(A.shape[1])
    N = hl.specialize(grad_out.shape[1])
    T, top_k = combine_weights.shape
    top_k = hl.specialize(top_k)
    E = expert_block_offsets.shape[0] - 1
    block_t = hl.specialize(sorted_pair_ids.shape[1])
    num_pairs = T * top_k
    dW = torch.empty(E, K, N, dtype=A.dtype, device=A.device)
    for tile_k, tile_n, tile_e in hl.tile([K, N, E], block_size=[None, None, 1]):
        first = expert_block_offsets[tile_e.begin]
        last = expert_block_offsets[tile_e.begin + 1]
        acc = hl.zeros([tile_k, tile_n], dtype=torch.float32)
        for tile_b in hl.tile(first, last, block_size=1):
            slots = tile_b.begin * block_t + hl.arange(block_t)
            if a_rows == "slot" and grad_rows == "slot":
                a_block = A[slots, tile_k]
                grad = grad_out[slots, tile_n]
            else:
                pairs = sorted_pair_ids[tile_b.begin, :]
                valid = pairs < num_pairs
                safe_pairs = torch.where(valid, pairs, 0)
                if a_rows == "slot":
                    a_block = A[slots, tile_k]
                else:
                    rows = safe_pairs // top_k
                    if a_rows == "pair":
                        rows = safe_pairs
                    a_block = hl.load(A, [rows, tile_k], extra_mask=valid[:, None])
                if grad_rows == "slot":
                    grad = grad_out[slots, tile_n]
                else:
                    rows = safe_pairs // top_k
                    if grad_rows == "pair":
                        rows = safe_pairs
                    grad = hl.load(grad_out, [rows, tile_n], extra_mask=valid[:, None])
            acc = torch.addmm(acc, a_block.T, grad)
        dW[tile_e.begin, tile_k, tile_n] = acc.to(dW.dtype)
    return dW


WEIGHT_GRAD_ROW_MODES = {  # gemm: [(A's rows, grad's rows)], the layer's own first
    "gate_up": [("token", "pair"), ("token", "slot"), ("slot", "slot")],
    "down": [("pair", "token"), ("slot", "token"), ("slot", "slot")],
}


ROW_MODE_LABELS = {  # the layer's layout, one operand in slot order, both in slot order
    "gate_up": {
        ("token", "pair"): "the layer's kernel",
        ("token", "slot"): "by-pair rows in slot order, by-token rows gathered",
        ("slot", "slot"): "rows in slot order",
    },
    "down": {
        ("pair", "token"): "the layer's kernel",
        ("slot", "token"): "by-pair rows in slot order, by-token rows gathered",
        ("slot", "slot"): "rows in slot order",
    },
}


def weight_grad_row_modes_section():
    """weight_grad_row_modes at [128, 256] w8 s2 (mh.WEIGHT_GRAD_CONFIGS) for each row layout
    of WEIGHT_GRAD_ROW_MODES, both of the layer's weight gradients, kernel alone, each checked
    against the first; $WEIGHT_GRAD_MODELS picks points."""
    names = os.environ.get("WEIGHT_GRAD_MODELS")
    models = {m.name: m for m in mh.MOE_MODELS}
    config = mh.WEIGHT_GRAD_CONFIGS[torch.bfloat16]
    for name, T in WEIGHT_GRAD_POINTS:
        if names is not None and name not in names.split(","):
            continue
        model = models[name]
        ids, weights = mh.model_routing(T, model.E, model.top_k, 0.0)
        P = ids.numel()
        routing = mh.align_to_blocks(ids, model.E, 128)
        offsets = routing.expert_block_offsets(model.E)
        slots = routing.sorted_pair_ids.flatten().long()
        valid = (slots < P)[:, None]
        safe = torch.where(valid[:, 0], slots, 0)
        tensors = {
            "gate_up": (torch.randn(T, model.H), torch.randn(P, 2 * model.I)),
            "down": (torch.randn(P, model.I), torch.randn(T, model.H)),
        }
        for which, (A, grad) in tensors.items():
            A, grad = (x.to("cuda", torch.bfloat16) for x in (A, grad))
            K, N = A.shape[1], grad.shape[1]
            laid_out = {}
            for x in (A, grad):
                rows = safe if x.shape[0] == P else safe // model.top_k
                laid_out[x.shape] = {
                    "token" if x.shape[0] == T else "pair": x,
                    "slot": torch.where(valid, x[rows], 0),
                }
            index_dtype = mh.kernel_index_dtype(A, torch.empty(model.E, K, N, device="meta"), P)
            expected = None
            for a_rows, grad_rows in WEIGHT_GRAD_ROW_MODES[which]:
                args = (
                    laid_out[A.shape][a_rows],
                    laid_out[grad.shape][grad_rows],
                    routing.sorted_pair_ids,
                    offsets,
                    weights,
                    a_rows,
                    grad_rows,
                )
                fn = functools.partial(
                    mh.run_kernel, weight_grad_row_modes, args, config, index_dtype
                )
                row = dict(model=name, T=T, gemm=which, a_rows=a_rows, grad_rows=grad_rows)
                row["schedule"] = ROW_MODE_LABELS[which][a_rows, grad_rows]
                out = fn()
                expected = out if expected is None else expected
                difference = mh.relative_difference(out, expected)
                ms = mh.time_ms(fn)
                record(
                    "weight_grad_row_modes",
                    **row,
                    us=round(ms * 1e3, 1),
                    tflops=round(2 * P * K * N / ms / 1e9, 1),
                    difference=f"{difference:.2e}",
                )
                del out
            del expected, laid_out
        del tensors
        torch.cuda.empty_cache()


# The layer's dh GEMM and the gated activation's backward fused in one kernel, as the layer ran
# them before ``mh.down_input_backward`` split them in two: the same three outputs, grad_h
# kept in float32 registers and never stored.
@helion.kernel(static_shapes=False, key=mh.sizes_of_one)
def moe_down_backward(
    grad_out: torch.Tensor,  # [T, N] the gradient of the layer's output, A's dtype
    W: torch.Tensor,  # [E, I, N] the down weights, or [E, N, I] when nk_layout
    gate_up: torch.Tensor,  # [P, 2, I] the forward's gate and up (moe_gate_up_flat keeps them)
    sorted_pair_ids: torch.Tensor,  # [num_blocks, block_t] the pairs aligned to blocks
    block_expert_ids: torch.Tensor,  # [num_blocks]
    combine_weights: torch.Tensor,  # [T, k] float32 weight w of each pair
    nk_layout: hl.constexpr,  # W is stored [E, N, I], transformers' down_proj
    activation: hl.constexpr,  # a GatedActivation, as a tuple
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The down projection's input gradient with the gated activation's backward in its epilogue.

    The flat schedule over the I columns: each program multiplies its block's rows of the
    output gradient (one per pair, its token's row) by its expert's transposed down weights,
    the gradient of h = act(gate) * up before the pair's weight: grad_h = grad_out[t] W_down^T.
    Its epilogue loads the same tile of the forward's gate and up and applies the weight w and
    the derivative (``gated_product_grads``): with dh = w grad_h, d gate = dh * up * act'(gate)
    and d up = dh * act(gate), for plain SwiGLU.
    Neither grad_h nor dh is ever stored. It returns three tensors:

    - [P, 2I] d(gate, up), side by side, the gradient of the first GEMM's output;
    - [P, I] w * h, the down projection's input as the layer weighted it, so that the down
      weights' gradient is an unweighted ``moe_weight_grad``;
    - [P, I tiles] each I tile's share of <grad_h, h>, the combine weight's gradient, summed
      over the tiles afterwards (a fixed order, unlike atomic adds).
    """
    if nk_layout:
        E, N, I = W.shape  # noqa: E741 (the course's name for the intermediate size)
    else:
        E, I, N = W.shape  # noqa: E741
    I = hl.specialize(I)  # noqa: E741
    N = hl.specialize(N)
    T, top_k = combine_weights.shape
    top_k = hl.specialize(top_k)
    num_blocks, block_t = sorted_pair_ids.shape
    block_t = hl.specialize(block_t)
    num_pairs = T * top_k
    pair_weights = combine_weights.view(num_pairs)
    W_rows = W.reshape(E * N, I) if nk_layout else W.reshape(E * I, N)
    # [P, 2, I] is [P, 2I] with the gate half first; a store at columns I + n of a [P, 2I]
    # tensor miscompiles in Helion 1.4 (it broadcasts the rows into a third dimension)
    d_gate_up = torch.empty(num_pairs, 2, I, dtype=grad_out.dtype, device=grad_out.device)
    weighted_hidden = torch.empty(num_pairs, I, dtype=grad_out.dtype, device=grad_out.device)
    block_n = hl.register_block_size(I)
    d_weight_parts = torch.empty(
        num_pairs, (I + block_n - 1) // block_n, dtype=torch.float32, device=grad_out.device
    )
    for tile_b, tile_n in hl.tile([num_blocks, I], block_size=[1, block_n]):
        e = block_expert_ids[tile_b.begin]
        if e < E:
            pairs = sorted_pair_ids[tile_b.begin, :]
            valid = pairs < num_pairs
            safe_pairs = torch.where(valid, pairs, 0)
            rows = safe_pairs // top_k
            grad_h = hl.zeros([block_t, tile_n], dtype=torch.float32)
            for tile_k in hl.tile(N):
                grad_frag = grad_out[rows, tile_k]
                if nk_layout:
                    W_frag = W_rows[e * N + tile_k.index, tile_n]
                else:
                    W_frag = W_rows[e * I + tile_n.index, tile_k].T
                grad_h = torch.addmm(grad_h, grad_frag, W_frag)
            mask = valid[:, None]
            gate = hl.load(gate_up, [safe_pairs, 0, tile_n], extra_mask=mask).to(torch.float32)
            up = hl.load(gate_up, [safe_pairs, 1, tile_n], extra_mask=mask).to(torch.float32)
            weight = pair_weights[safe_pairs][:, None]
            h, d_gate, d_up = mh.gated_product_grads(gate, up, grad_h * weight, activation)
            dtype = grad_out.dtype
            hl.store(d_gate_up, [safe_pairs, 0, tile_n], d_gate.to(dtype), extra_mask=mask)
            hl.store(d_gate_up, [safe_pairs, 1, tile_n], d_up.to(dtype), extra_mask=mask)
            hl.store(weighted_hidden, [safe_pairs, tile_n], (h * weight).to(dtype), extra_mask=mask)
            part = (grad_h * h).sum(dim=1)
            hl.store(d_weight_parts, [safe_pairs, tile_n.id], part, extra_mask=valid)
    return d_gate_up.view(num_pairs, 2 * I), weighted_hidden, d_weight_parts


# moe_down_backward's configs: block_sizes = [token block, I tile, N tile]; the fused gate_up
# kernel's tiles (without its L2 grouping), except 128 x 128 for 128-row blocks, the least total
# time of seven tilings on an H200 (down_backward_configs).
DOWN_BACKWARD_CONFIGS = {
    dtype: {
        block_t: helion.Config(**{k: v for k, v in c.config.items() if k != "l2_groupings"})
        for block_t, c in mh.GATE_UP_CONFIGS[dtype].items()
    }
    for dtype in (torch.bfloat16, torch.float16, torch.float32)
}
DOWN_BACKWARD_CONFIGS[torch.bfloat16][128] = DOWN_BACKWARD_CONFIGS[torch.float16][128] = (
    helion.Config(block_sizes=[128, 128, 128], num_warps=8, num_stages=3)
)


def fused_down_input_backward(grad_out, W_down, gate_up, routing, combine_weights, activation):
    """mh.down_input_backward's outputs from moe_down_backward, one launch."""
    block_t = routing.sorted_pair_ids.shape[1]
    _, config = mh.split_token_block(DOWN_BACKWARD_CONFIGS[grad_out.dtype][block_t])
    stored, nk_layout = mh.expert_weights_in_place(W_down)
    args = (grad_out, stored, gate_up, routing.sorted_pair_ids, routing.block_expert_ids)
    args += (combine_weights, nk_layout, tuple(activation))
    index_dtype = mh.kernel_index_dtype(grad_out, W_down, combine_weights.numel())
    if gate_up.numel() > mh.INT32_MAX:  # its [P, 2, I] output
        index_dtype = torch.int64
    return mh.run_kernel(moe_down_backward, args, config, index_dtype)


DOWN_BACKWARD_CANDIDATES = [  # [I tile, N tile], warps, stages
    ([128, 64], 8, 4),  # GATE_UP_CONFIGS' 128-row tiles, what the backward runs
    ([128, 64], 8, 3),
    ([128, 128], 8, 3),
    ([64, 128], 4, 3),
    ([64, 64], 4, 4),
    ([256, 64], 8, 3),
    ([128, 32], 8, 4),
]


DOWN_BACKWARD_PERSISTENT = [  # the chosen tiles, persistent, with and without flattening
    ([128, 128], 8, 3),
    ([128, 128], 8, 3, {"pid_type": "persistent_interleaved"}),
    ([128, 128], 8, 3, {"pid_type": "persistent_interleaved", "range_flattens": [True, None]}),
    ([128, 128], 8, 3, {"pid_type": "persistent_blocked", "range_flattens": [True, None]}),
]


DOWN_BACKWARD_OCCUPANCY = [  # register caps for two or more programs per SM
    ([128, 128], 8, 3),
    ([128, 128], 8, 3, {"pid_type": "persistent_interleaved"}),
    (
        [128, 64],
        8,
        3,
        {"pid_type": "persistent_interleaved", "maxnreg": 128, "num_sm_multiplier": 2},
    ),
    (
        [128, 64],
        8,
        2,
        {"pid_type": "persistent_interleaved", "maxnreg": 128, "num_sm_multiplier": 2},
    ),
    (
        [64, 128],
        4,
        3,
        {"pid_type": "persistent_interleaved", "maxnreg": 128, "num_sm_multiplier": 2},
    ),
    (
        [64, 64],
        4,
        3,
        {"pid_type": "persistent_interleaved", "maxnreg": 128, "num_sm_multiplier": 2},
    ),
    (
        [128, 64],
        4,
        3,
        {"pid_type": "persistent_interleaved", "maxnreg": 256, "num_sm_multiplier": 2},
    ),
]


def down_backward_occupancy():
    """down_backward_configs over DOWN_BACKWARD_OCCUPANCY: with registers capped so that two
    or more programs fit on an SM, can one program's epilogue overlap another's K loop?
    (Helion 1.4 takes maxnreg with persistent programs only: two per SM here.)"""
    down_backward_configs(DOWN_BACKWARD_OCCUPANCY)


def down_backward_persistent():
    """down_backward_configs over DOWN_BACKWARD_PERSISTENT: can a persistent program start its
    next tile's loads while it runs the current tile's epilogue (Triton's loop flattening)?"""
    down_backward_configs(DOWN_BACKWARD_PERSISTENT)


def down_backward_configs(candidates=DOWN_BACKWARD_CANDIDATES):
    """The layer's dh kernel with the activation's backward (``moe_down_backward``) alone,
    routing pre-aligned, transformers' [E, H, I] down weights, at the weight gradient's points;
    against the flat kernel's plain dh GEMM (grad @ W_down^T into [P, I], FLAT_CONFIGS), the
    GEMM without the epilogue. The candidate with the least time over the points (all at
    128-row blocks) becomes DOWN_BACKWARD_CONFIGS[bf16][128] for the sections after it."""
    models = {m.name: m for m in mh.MOE_MODELS}
    total_us = {}
    for name, T in WEIGHT_GRAD_POINTS:
        model = models[name]
        ids, weights = mh.model_routing(T, model.E, model.top_k, 0.0)
        P = ids.numel()
        block_t = mh.flat_token_block(P, model.E)
        routing = mh.align_to_blocks(ids, model.E, block_t)
        W = mh.transformers_experts_module(model).down_proj.detach()  # [E, H, I]
        grad = torch.randn(T, model.H, device="cuda", dtype=torch.bfloat16)
        gate_up = torch.randn(P, 2, model.I, device="cuda", dtype=torch.bfloat16)
        args = (grad, W, gate_up, routing.sorted_pair_ids, routing.block_expert_ids, weights)
        args += (True, SWIGLU)
        index_dtype = mh.kernel_index_dtype(grad, W, P)
        flops = 2 * P * model.H * model.I
        for tiles, warps, stages, *options in candidates:
            options = options[0] if options else {}
            config = helion.Config(block_sizes=tiles, num_warps=warps, num_stages=stages, **options)
            row = dict(model=name, T=T, block_t=block_t, tiles=tiles, warps=warps, stages=stages)
            row.update(options)
            try:
                ms = mh.time_ms(
                    functools.partial(mh.run_kernel, moe_down_backward, args, config, index_dtype)
                )
            except Exception as error:
                record("down_backward_configs", **row, error=repr(error)[:300])
                continue
            key = (tuple(tiles), warps, stages, json.dumps(options))
            total_us[key] = total_us.get(key, 0.0) + ms * 1e3
            tflops = round(flops / ms / 1e9, 1)
            record("down_backward_configs", **row, us=round(ms * 1e3, 1), tflops=tflops)
        _, flat_config = mh.split_token_block(mh.FLAT_CONFIGS[torch.bfloat16][block_t])
        ones = torch.ones_like(weights)
        flat_args = routing.kernel_args(grad, W, ones)  # [E, H, I] is [E, K, N] here
        ms = mh.time_ms(
            functools.partial(
                mh.run_kernel, mh.moe_matmul_flat, flat_args, flat_config, index_dtype
            )
        )
        row = dict(model=name, T=T, block_t=block_t, tiles="plain dh GEMM (flat kernel)")
        record(
            "down_backward_configs", **row, us=round(ms * 1e3, 1), tflops=round(flops / ms / 1e9, 1)
        )
        del W, grad, gate_up, args
        torch.cuda.empty_cache()
    (tiles, warps, stages, options), us = min(total_us.items(), key=lambda item: item[1])
    best = helion.Config(
        block_sizes=[128, *tiles], num_warps=warps, num_stages=stages, **json.loads(options)
    )
    DOWN_BACKWARD_CONFIGS[torch.bfloat16][128] = best
    record("down_backward_configs", best=repr(best), total_us=round(us, 1))


ACTIVATION_BACKWARD_CANDIDATES = [  # [I tile, pair rows], warps, stages
    ([16, 256], 4, 1),  # 256 rows of 16 columns: 32-byte pieces of each row
    ([256, 16], 4, 1),
    ([256, 32], 4, 1),
    ([256, 64], 8, 1),
    ([128, 32], 4, 1),
    ([128, 64], 4, 1),
    ([128, 128], 8, 1),
    ([512, 8], 4, 1),  # mh.ACTIVATION_BACKWARD_CONFIG, the least total time on an H100
    ([512, 16], 8, 1),
    ([512, 32], 8, 1),
    ([64, 64], 4, 1),
    ([256, 32], 4, 2),
]
ACTIVATION_BACKWARD_POINTS = [*WEIGHT_GRAD_POINTS, ("gpt-oss-120b", 8192)]


def activation_backward_configs():
    """mh.gated_activation_backward alone (SiLU) at ACTIVATION_BACKWARD_CANDIDATES and
    ACTIVATION_BACKWARD_POINTS, with its rate over the bytes it must move (grad_h, g and u
    read; d(gate, up) and w h written, all bf16) against the card's copy rate. The candidate
    with the least total time becomes mh.ACTIVATION_BACKWARD_CONFIG for the sections after it."""
    copy_gbps = mh.copy_bandwidth_gbps()
    record("activation_backward_configs", copy_gbps=round(copy_gbps))
    models = {m.name: m for m in mh.MOE_MODELS}
    total_us = {}
    for name, T in ACTIVATION_BACKWARD_POINTS:
        model = models[name]
        _, weights = mh.model_routing(T, model.E, model.top_k, 0.0)
        P = weights.numel()
        grad_h = torch.randn(P, model.I, device="cuda", dtype=torch.bfloat16)
        gate_up = torch.randn(P, 2, model.I, device="cuda", dtype=torch.bfloat16)
        args = (grad_h, gate_up, weights, SWIGLU)
        moved = 6 * P * model.I * 2  # bytes: grad_h, g, u read; dg, du, w h written
        for tiles, warps, stages in ACTIVATION_BACKWARD_CANDIDATES:
            config = helion.Config(block_sizes=tiles, num_warps=warps, num_stages=stages)
            row = dict(model=name, T=T, tiles=tiles, warps=warps, stages=stages)
            run = functools.partial(mh.run_kernel, mh.gated_activation_backward, args, config)
            try:
                ms = mh.time_ms(run)
            except Exception as error:
                record("activation_backward_configs", **row, error=repr(error)[:300])
                continue
            key = (tuple(tiles), warps, stages)
            total_us[key] = total_us.get(key, 0.0) + ms * 1e3
            gbps = moved / ms / 1e6
            row.update(us=round(ms * 1e3, 1), gbps=round(gbps), of_copy=round(gbps / copy_gbps, 3))
            record("activation_backward_configs", **row)
        del grad_h, gate_up, args
        torch.cuda.empty_cache()
    (tiles, warps, stages), us = min(total_us.items(), key=lambda item: item[1])
    best = helion.Config(block_sizes=list(tiles), num_warps=warps, num_stages=stages)
    mh.ACTIVATION_BACKWARD_CONFIG = layer_module.ACTIVATION_BACKWARD_CONFIG = best
    record("activation_backward_configs", best=repr(best), total_us=round(us, 1))


def backward_table():
    """mh.run_backward_table for the models named in $BACKWARD_MODELS (comma-separated; all
    when unset), its CSV rewritten under $OUT after each point."""
    names = os.environ.get("BACKWARD_MODELS")
    models = tuple(
        m for m in mh.BACKWARD_TABLE_MODELS if names is None or m.name in names.split(",")
    )
    out = os.environ.get("OUT", ".")
    mh.run_backward_table(models, path=Path(f"{out}/backward_table_{len(models)}.csv"))


BACKWARD_PARTS_POINTS = [("DeepSeek-V3", 8192), ("Mixtral-8x7B", 8192), ("Qwen3-30B-A3B", 16384)]


def training_step(model, T):
    """One "helion" forward + backward of the layer at ``model``'s sizes and ``T`` tokens
    (uniform top-k routing, random bf16 experts, as a transformers module), ready to call: it
    returns the gradients of the input, both weights and the combine weights."""
    experts = mh.transformers_experts_module(model)
    params = (experts.gate_up_proj.requires_grad_(), experts.down_proj.requires_grad_())
    layer = mh.with_experts_backend(experts, "helion")
    A = torch.randn(T, model.H, device=mh.DEVICE, dtype=torch.bfloat16).requires_grad_()
    ids, weights = mh.model_routing(T, model.E, model.top_k, 0.0)
    weights.requires_grad_()
    grad = torch.randn(T, model.H, device=mh.DEVICE, dtype=torch.bfloat16)

    def step():
        return torch.autograd.grad(layer(A, ids, weights), (A, *params, weights), grad)

    return step


def backward_parts():
    """GPU time per kernel of one "helion" forward + backward of the layer (torch.profiler,
    the mean of 3 calls after a warm-up), the largest 12 kernels per point; also written to
    $OUT/backward_parts.csv, the file notebook 15 reads (mh.BACKWARD_PARTS_PATH)."""
    from torch.profiler import ProfilerActivity, profile

    mh.register_transformers_experts()
    models = {m.name: m for m in mh.MOE_MODELS}
    for name, T in BACKWARD_PARTS_POINTS:
        step = training_step(models[name], T)
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
        events.sort(key=lambda e: -e.self_device_time_total)
        total = sum(e.self_device_time_total for e in events) / 3
        record("backward_parts", model=name, T=T, kernel="all", us=round(total, 1))
        for event in events[:12]:
            record(
                "backward_parts",
                model=name,
                T=T,
                kernel=event.key[:80],
                calls=event.count // 3,
                us=round(event.self_device_time_total / 3, 1),
            )
        del step
        torch.cuda.empty_cache()
    parts = pd.DataFrame([row for row in ROWS if row["section"] == "backward_parts"])
    parts = parts.drop(columns="section").assign(**mh.machine_info())
    parts.to_csv(f"{os.environ.get('OUT', '.')}/backward_parts.csv", index=False)


def half_tails_step():
    """One "helion" forward + backward (the step of ``backward_parts``) with the flat kernels'
    ``half_tails`` off, as ``mh.flat_half_tails`` sets it, and off again, at
    BACKWARD_PARTS_POINTS and Qwen3-235B-A22B with 8192 tokens: what half-height tails gain in
    a training step (the forward's two kernels and the backward's dA GEMM)."""
    mh.register_transformers_experts()
    models = {m.name: m for m in mh.LAYER_TABLE_MODELS}
    for name, T in [*BACKWARD_PARTS_POINTS, ("Qwen3-235B-A22B", 8192)]:
        model = models[name]
        step = training_step(model, T)
        block_t = mh.flat_token_block(T * model.top_k, model.E)
        grads = {}
        for variant in ("off", "rule", "off again"):
            flag = mh.flat_half_tails(block_t) if variant == "rule" else False
            with mock.patch.object(layer_module, "flat_half_tails", lambda _, f=flag: f):
                grads[variant] = step()
                ms = mh.time_ms(step)
            record("half_tails_step", model=name, T=T, variant=variant, ms=round(ms, 3))
        for ours, theirs in zip(grads["rule"], grads["off"], strict=True):
            if not torch.equal(ours, theirs):
                raise AssertionError(f"{name}, T = {T}: half tails changed a gradient")
        del step, grads
        torch.cuda.empty_cache()


def fused_dh_table():
    """mh.backward_table_point (the layer, transformers' grouped_mm and grouped_mm core, every
    gradient checked against grouped_mm's) with the layer as it runs, with its dh step fused
    (``fused_down_input_backward``) and as it runs again, at the points of $BACKWARD_POINTS
    (model:T, comma-separated)."""
    mh.register_transformers_experts()
    models = {m.name: m for m in mh.MOE_MODELS}
    default = "Mixtral-8x7B:8192,Qwen3-30B-A3B:16384,gpt-oss-120b:8192,Qwen3-235B-A22B:8192"
    for point in os.environ.get("BACKWARD_POINTS", default).split(","):
        name, T = point.split(":")
        experts = mh.transformers_experts_module(models[name])
        for param in (experts.gate_up_proj, experts.down_proj):
            param.requires_grad_()
        for variant in ("as it runs", "fused dh", "as it runs again"):
            context = contextlib.nullcontext()
            if variant == "fused dh":
                patch = mock.patch.object
                context = patch(layer_module, "down_input_backward", fused_down_input_backward)
            with context:
                rows = mh.backward_table_point(models[name], experts, int(T))
            times = {(r["phase"], r["implementation"]): r["ms"] for r in rows}
            step = times[("forward + backward", "helion")]
            row = dict(model=name, T=int(T), variant=variant, step_ms=round(step, 3))
            for peer in ("grouped_mm", "grouped_mm core"):
                row[f"of {peer}"] = round(times[("forward + backward", peer)] / step, 3)
            row["dA_difference"] = round(rows[0]["dA_difference"], 5)
            row["d_weights_difference"] = round(rows[0]["d_weights_difference"], 5)
            record("fused_dh", **row)
        del experts
        torch.cuda.empty_cache()


SECTIONS = {
    "activation_backward_configs": activation_backward_configs,
    "weight_grad_configs": weight_grad_configs,
    "down_backward_configs": down_backward_configs,
    "down_backward_persistent": down_backward_persistent,
    "down_backward_occupancy": down_backward_occupancy,
    "weight_grad_row_modes": weight_grad_row_modes_section,
    "backward_table": backward_table,
    "backward_parts": backward_parts,
    "half_tails_step": half_tails_step,
    "fused_dh": fused_dh_table,
}


if __name__ == "__main__":
    run_sections(SECTIONS)
