"""GPU probe of other kernels and schedules for the backward's two largest parts, none of
them adopted: the weight gradient in shorter steps, under other schedules and stores, on rows
in slot order, with warp specialization, against torch._grouped_mm; and where the fused dh
kernel (backward_probe.moe_down_backward) spent its epilogue time: what NOTES.md quotes,
re-runnable on a GPU.

    python probes/backward_kernels_probe.py SECTION [SECTION ...]   (sections: see SECTIONS below)

Each section prints a table; every row names what it measured. Timings: ``mh.time_ms`` (median
of triton.testing.do_bench) and ``mh.host_and_gpu_us``; every baseline in the same run.
probe_common.run_sections runs the sections and writes $OUT/probe_<sections>.json.
"""

import moe_helpers as mh

import functools
import os

import helion
import helion.language as hl
import torch
from backward_probe import WEIGHT_GRAD_POINTS, moe_down_backward
from probe_common import SWIGLU, record, run_sections

WEIGHT_GRAD_SLOT_CANDIDATES = [([128, 256], 8, 2), ([128, 256], 8, 3), ([128, 256], 8, 4)]


def weight_grad_slots():
    """moe_weight_grad with each 128-slot block of the routing walked as 2 or 4 shorter steps
    (sorted_pair_ids viewed as [blocks * 2, 64] or [blocks * 4, 32], the offsets scaled to
    match: no new metadata), both unweighted gradients, at WEIGHT_GRAD_POINTS."""
    models = {m.name: m for m in mh.MOE_MODELS}
    for name, T in WEIGHT_GRAD_POINTS:
        model = models[name]
        ids, weights = mh.model_routing(T, model.E, model.top_k, 0.0)
        P = ids.numel()
        routing = mh.align_to_blocks(ids, model.E, 128)
        offsets = routing.expert_block_offsets(model.E)
        tokens = torch.randn(T, model.H, device="cuda", dtype=torch.bfloat16)
        gate_up = torch.randn(P, 2 * model.I, device="cuda", dtype=torch.bfloat16)
        hidden = torch.randn(P, model.I, device="cuda", dtype=torch.bfloat16)
        gemms = {
            "gate_up": ((tokens, gate_up, False, True, False), model.H, 2 * model.I),
            "down": ((hidden, tokens, True, False, False), model.I, model.H),
        }
        for which, ((A, grad, *flags), K, N) in gemms.items():
            index_dtype = mh.kernel_index_dtype(A, torch.empty(model.E, K, N, device="meta"), P)
            for slots in (128, 64, 32):
                split = 128 // slots
                pair_ids = routing.sorted_pair_ids.view(-1, slots)
                args = (A, grad, pair_ids, offsets * split, weights, *flags)
                for tiles, warps, stages in WEIGHT_GRAD_SLOT_CANDIDATES:
                    config = helion.Config(block_sizes=tiles, num_warps=warps, num_stages=stages)
                    row = dict(model=name, T=T, gemm=which, slots=slots, warps=warps, stages=stages)
                    try:
                        ms = mh.time_ms(
                            functools.partial(
                                mh.run_kernel, mh.moe_weight_grad, args, config, index_dtype
                            )
                        )
                    except Exception as error:
                        record("weight_grad_slots", **row, error=repr(error)[:300])
                        continue
                    tflops = round(2 * P * K * N / ms / 1e9, 1)
                    record("weight_grad_slots", **row, us=round(ms * 1e3, 1), tflops=tflops)
        del tokens, gate_up, hidden, gemms
        torch.cuda.empty_cache()


@helion.kernel(static_shapes=False, key=mh.sizes_of_one)
def weight_grad_slot_order(
    A_slots: torch.Tensor,  # [num_blocks, block_t, K] the rows in slot order, zeros in padding
    grad_slots: torch.Tensor,  # [num_blocks, block_t, N] likewise
    expert_block_offsets: torch.Tensor,  # [E + 1] int32
) -> torch.Tensor:  # [E, K, N]
    """mh.moe_weight_grad (unweighted) on rows already laid out in the aligned routing's slot
    order: every load is a whole block of consecutive rows, so it can be a TMA load."""
    K = hl.specialize(A_slots.shape[2])
    N = hl.specialize(grad_slots.shape[2])
    hl.specialize(A_slots.shape[1])
    E = expert_block_offsets.shape[0] - 1
    dW = torch.empty(E, K, N, dtype=A_slots.dtype, device=A_slots.device)
    for tile_k, tile_n, tile_e in hl.tile([K, N, E], block_size=[None, None, 1]):
        first = expert_block_offsets[tile_e.begin]
        last = expert_block_offsets[tile_e.begin + 1]
        acc = hl.zeros([tile_k, tile_n], dtype=torch.float32)
        for tile_b in hl.tile(first, last, block_size=1):
            a_block = A_slots[tile_b.begin, :, tile_k]
            acc = torch.addmm(acc, a_block.T, grad_slots[tile_b.begin, :, tile_n])
        dW[tile_e.begin, tile_k, tile_n] = acc.to(dW.dtype)
    return dW


@helion.kernel(static_shapes=False, key=mh.sizes_of_one)
def weight_grad_expert_groups(
    A: torch.Tensor,  # [T, K] (or [P, K] if a_by_pair), as mh.moe_weight_grad takes it
    grad_out: torch.Tensor,  # [T, N] (or [P, N] if grad_by_pair)
    sorted_pair_ids: torch.Tensor,  # [num_blocks, block_t] the pairs aligned to blocks
    block_expert_ids: torch.Tensor,  # [num_blocks] the expert of each block
    expert_block_offsets: torch.Tensor,  # [E + 1] int32 first block of each expert
    combine_weights: torch.Tensor,  # [T, k] (its shape gives k; the sum is unweighted)
    a_by_pair: hl.constexpr,
    grad_by_pair: hl.constexpr,
) -> torch.Tensor:  # [E, K, N]
    """mh.moe_weight_grad (unweighted) with each program summing its (K tile, N tile) for a
    tile of G consecutive experts (the config's third block size) in one loop over all their
    blocks: at an expert's last block it stores the tile and starts again from zero, so the
    loads of the next expert's first blocks are in flight (pipelined) while it stores, where
    the layer's kernel ends its program after one expert's few blocks. Experts without
    blocks get zeros afterwards."""
    K = hl.specialize(A.shape[1])
    N = hl.specialize(grad_out.shape[1])
    T, top_k = combine_weights.shape
    top_k = hl.specialize(top_k)
    E = expert_block_offsets.shape[0] - 1
    hl.specialize(sorted_pair_ids.shape[1])
    num_pairs = T * top_k
    dW = torch.empty(E, K, N, dtype=A.dtype, device=A.device)
    dW_rows = dW.view(E * K, N)
    for tile_k, tile_n, tile_g in hl.tile([K, N, E]):
        acc = hl.zeros([tile_k, tile_n], dtype=torch.float32)
        first = expert_block_offsets[tile_g.begin]
        for tile_b in hl.tile(first, expert_block_offsets[tile_g.end], block_size=1):
            pairs = sorted_pair_ids[tile_b.begin, :]
            valid = pairs < num_pairs
            safe_pairs = torch.where(valid, pairs, 0)
            a_rows = safe_pairs // top_k
            if a_by_pair:
                a_rows = safe_pairs
            grad_rows = safe_pairs // top_k
            if grad_by_pair:
                grad_rows = safe_pairs
            a_block = hl.load(A, [a_rows, tile_k], extra_mask=valid[:, None])
            grad = hl.load(grad_out, [grad_rows, tile_n], extra_mask=valid[:, None])
            acc = torch.addmm(acc, a_block.T, grad)
            e = block_expert_ids[tile_b.begin]
            if tile_b.begin + 1 == expert_block_offsets[e + 1]:  # e's last block
                dW_rows[e * K + tile_k.index, tile_n] = acc.to(dW.dtype)
                acc = hl.zeros([tile_k, tile_n], dtype=torch.float32)
        for tile_e in hl.tile(tile_g.begin, tile_g.end, block_size=1):
            if expert_block_offsets[tile_e.begin] == expert_block_offsets[tile_e.begin + 1]:
                dW[tile_e.begin, tile_k, tile_n] = hl.zeros([tile_k, tile_n], dtype=dW.dtype)
    return dW


def _weight_grad_config(tiles=(128, 256), warps=8, stages=2, **options):
    return helion.Config(block_sizes=list(tiles), num_warps=warps, num_stages=stages, **options)


POINTER, TMA = "pointer", "tensor_descriptor"
WEIGHT_GRAD_SCHEDULES = {  # label: (kernel, config); "routed" is mh.moe_weight_grad
    "the layer's kernel": ("routed", _weight_grad_config()),
    "TMA store of dW": ("routed", _weight_grad_config(indexing=[POINTER] * 5 + [TMA])),
    "persistent, loops flattened": (
        "routed",
        _weight_grad_config(pid_type="persistent_interleaved", range_flattens=[True, None]),
    ),
    "128 x 128 tiles, 1 stage": ("routed", _weight_grad_config((128, 128), 8, 1)),
    "rows in slot order": ("slots", _weight_grad_config()),
    "rows in slot order, TMA": ("slots", _weight_grad_config(indexing=[POINTER] * 2 + [TMA] * 3)),
    "rows in slot order, TMA, 3 stages": (
        "slots",
        _weight_grad_config(stages=3, indexing=[POINTER] * 2 + [TMA] * 3),
    ),
    "rows in slot order, TMA, persistent, flattened": (
        "slots",
        _weight_grad_config(
            indexing=[POINTER] * 2 + [TMA] * 3,
            pid_type="persistent_interleaved",
            range_flattens=[True, None],
        ),
    ),
}


def weight_grad_schedules(schedules=WEIGHT_GRAD_SCHEDULES):
    """Both unweighted weight gradients of the layer (as weight_grad_configs builds them) by
    mh.moe_weight_grad's gathered loads under other schedules and stores, by the same sum on
    rows laid out in slot order (weight_grad_slot_order, TMA loads possible), and by
    torch._grouped_mm on rows pre-sorted by expert (CUTLASS, the peer's kernel); kernels alone,
    each checked against the first. $WEIGHT_GRAD_MODELS (comma-separated) picks points."""
    names = os.environ.get("WEIGHT_GRAD_MODELS")
    models = {m.name: m for m in mh.MOE_MODELS}
    for name, T in WEIGHT_GRAD_POINTS:
        if names is not None and name not in names.split(","):
            continue
        model = models[name]
        ids, weights = mh.model_routing(T, model.E, model.top_k, 0.0)
        P = ids.numel()
        routing = mh.align_to_blocks(ids, model.E, 128)
        offsets = routing.expert_block_offsets(model.E)
        slots = routing.sorted_pair_ids.flatten().long()
        valid = slots < P
        safe = torch.where(valid, slots, 0)
        tokens = torch.randn(T, model.H, device="cuda", dtype=torch.bfloat16)
        gate_up = torch.randn(P, 2 * model.I, device="cuda", dtype=torch.bfloat16)
        hidden = torch.randn(P, model.I, device="cuda", dtype=torch.bfloat16)
        sort = mh.sort_tokens_by_expert(ids.flatten(), model.E)
        pair_of_sorted_row = sort.sorted_to_orig_token_idx.long()
        ends = sort.expert_token_offsets[1:]
        gemms = {  # (A, grad, a_by_pair, grad_by_pair), A's and grad's row of each slot, K, N
            "gate_up": ((tokens, gate_up, False, True), (safe // model.top_k, safe), model.H),
            "down": ((hidden, tokens, True, False), (safe, safe // model.top_k), model.I),
        }
        for which, ((A, grad, *flags), (a_rows, grad_rows), K) in gemms.items():
            N = grad.shape[1]
            in_slots = [
                torch.where(valid[:, None], x[r], 0).view(-1, 128, x.shape[1])
                for x, r in ((A, a_rows), (grad, grad_rows))
            ]
            sorted_rows = [
                x[pair_of_sorted_row // model.top_k] if x.shape[0] == T else x[pair_of_sorted_row]
                for x in (A, grad)
            ]
            index_dtype = mh.kernel_index_dtype(A, torch.empty(model.E, K, N, device="meta"), P)
            blocks = (routing.sorted_pair_ids, routing.block_expert_ids, offsets)
            kernels = {  # kind: (kernel, its arguments)
                "routed": (
                    mh.moe_weight_grad,
                    (A, grad, routing.sorted_pair_ids, offsets, weights, *flags, False),
                ),
                "slots": (weight_grad_slot_order, (*in_slots, offsets)),
                "groups": (weight_grad_expert_groups, (A, grad, *blocks, weights, *flags)),
            }
            calls = {
                label: functools.partial(mh.run_kernel, *kernels[kind], config, index_dtype)
                for label, (kind, config) in schedules.items()
            }
            calls["torch._grouped_mm on pre-sorted rows"] = functools.partial(
                torch._grouped_mm, sorted_rows[0].t(), sorted_rows[1], offs=ends
            )
            expected = None
            for label, fn in calls.items():
                row = dict(model=name, T=T, gemm=which, schedule=label)
                try:
                    out = fn()
                    if expected is None:
                        expected = out
                    difference = mh.relative_difference(out, expected)
                    ms = mh.time_ms(fn)
                except Exception as error:
                    record("weight_grad_schedules", **row, error=repr(error)[:600])
                    continue
                tflops = round(2 * P * K * N / ms / 1e9, 1)
                record(
                    "weight_grad_schedules",
                    **row,
                    us=round(ms * 1e3, 1),
                    tflops=tflops,
                    difference=f"{difference:.2e}",
                )
                del out
            del expected, in_slots, sorted_rows
        del tokens, gate_up, hidden, gemms
        torch.cuda.empty_cache()


WEIGHT_GRAD_WARP_SPECIALIZED = {  # name: (kernel, config), warp-specialized inner loop
    "warp-specialized (forced)": (
        "routed",
        _weight_grad_config(range_warp_specializes=[None, True]),
    ),
    "warp-specialized (forced), 4 warps": (
        "routed",
        _weight_grad_config(warps=4, range_warp_specializes=[None, True]),
    ),
    "rows in slot order, warp-specialized": (
        "slots",
        _weight_grad_config(range_warp_specializes=[None, True]),
    ),
    "rows in slot order, TMA, warp-specialized": (
        "slots",
        _weight_grad_config(
            indexing=[POINTER] * 2 + [TMA] * 3, range_warp_specializes=[None, True]
        ),
    ),
}


WEIGHT_GRAD_EXPERT_GROUPS = {  # label: (kernel, config); G experts a program: [K, N, G] tiles
    "the layer's kernel": ("routed", _weight_grad_config()),
    **{f"groups of {G}": ("groups", _weight_grad_config((128, 256, G))) for G in (1, 2, 4, 8, 16)},
    "groups of 4, 3 stages": ("groups", _weight_grad_config((128, 256, 4), stages=3)),
    "groups of 8, 3 stages": ("groups", _weight_grad_config((128, 256, 8), stages=3)),
    "groups of 4, 128 x 128 tiles, 3 stages": ("groups", _weight_grad_config((128, 128, 4), 8, 3)),
    "groups of 4, 256 x 128 tiles": ("groups", _weight_grad_config((256, 128, 4))),
}


def weight_grad_expert_groups_section():
    """weight_grad_schedules' points with weight_grad_expert_groups at G = 1 to 16 and a few
    configs, against the layer's kernel and torch._grouped_mm."""
    weight_grad_schedules(WEIGHT_GRAD_EXPERT_GROUPS)


def weight_grad_warp_specialized():
    """weight_grad_schedules' points with Triton's warp specialization of the inner loop,
    which Helion 1.4 offers on compute capability 10 and newer only: switched on here for the
    H200 (9.0) by replacing helion.language.loops._supports_warp_specialize (a probe only)."""
    import helion.language.loops

    helion.language.loops._supports_warp_specialize = lambda: True
    weight_grad_schedules(
        {"the layer's kernel": ("routed", _weight_grad_config()), **WEIGHT_GRAD_WARP_SPECIALIZED}
    )


@helion.kernel(static_shapes=False, key=mh.sizes_of_one)
def down_backward_variant(
    grad_out: torch.Tensor,  # [T, N]
    W: torch.Tensor,  # [E, N, I], transformers' down_proj
    gate_up: torch.Tensor,  # [P, 2, I]
    sorted_pair_ids: torch.Tensor,
    block_expert_ids: torch.Tensor,
    combine_weights: torch.Tensor,  # [T, k] float32
    variant: hl.constexpr,  # "plain", "no_loads", "loads_first", "full"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagnosis of moe_down_backward's time (SiLU, [E, N, I] weights): "plain" stores
    grad_h only; "no_loads" runs the epilogue on gate = up = grad_h; "loads_first" loads gate
    and up before the K loop; "full" is moe_down_backward's epilogue without the weight parts."""
    E, N, I = W.shape  # noqa: E741
    I = hl.specialize(I)  # noqa: E741
    N = hl.specialize(N)
    T, top_k = combine_weights.shape
    top_k = hl.specialize(top_k)
    num_blocks, block_t = sorted_pair_ids.shape
    block_t = hl.specialize(block_t)
    num_pairs = T * top_k
    pair_weights = combine_weights.view(num_pairs)
    W_rows = W.reshape(E * N, I)
    d_gate_up = torch.empty(num_pairs, 2, I, dtype=grad_out.dtype, device=grad_out.device)
    hidden = torch.empty(num_pairs, I, dtype=grad_out.dtype, device=grad_out.device)
    for tile_b, tile_n in hl.tile([num_blocks, I], block_size=[1, None]):
        e = block_expert_ids[tile_b.begin]
        if e < E:
            pairs = sorted_pair_ids[tile_b.begin, :]
            valid = pairs < num_pairs
            safe_pairs = torch.where(valid, pairs, 0)
            rows = safe_pairs // top_k
            mask = valid[:, None]
            if variant == "loads_first":
                gate = hl.load(gate_up, [safe_pairs, 0, tile_n], extra_mask=mask)
                up = hl.load(gate_up, [safe_pairs, 1, tile_n], extra_mask=mask)
            grad_h = hl.zeros([block_t, tile_n], dtype=torch.float32)
            for tile_k in hl.tile(N):
                W_frag = W_rows[e * N + tile_k.index, tile_n]
                grad_h = torch.addmm(grad_h, grad_out[rows, tile_k], W_frag)
            if variant == "plain":
                hl.store(hidden, [safe_pairs, tile_n], grad_h.to(hidden.dtype), extra_mask=mask)
            else:
                if variant == "no_loads":
                    g = grad_h
                    u = grad_h
                elif variant == "loads_first":
                    g = gate.to(torch.float32)
                    u = up.to(torch.float32)
                else:
                    g = hl.load(gate_up, [safe_pairs, 0, tile_n], extra_mask=mask).to(torch.float32)
                    u = hl.load(gate_up, [safe_pairs, 1, tile_n], extra_mask=mask).to(torch.float32)
                sig = torch.sigmoid(g)
                act = g * sig
                slope = sig * (1.0 + g * (1.0 - sig))
                dh = grad_h * pair_weights[safe_pairs][:, None]
                d_gate = (dh * u * slope).to(hidden.dtype)
                hl.store(d_gate_up, [safe_pairs, 0, tile_n], d_gate, extra_mask=mask)
                hl.store(
                    d_gate_up, [safe_pairs, 1, tile_n], (dh * act).to(hidden.dtype), extra_mask=mask
                )
                hl.store(hidden, [safe_pairs, tile_n], (act * u).to(hidden.dtype), extra_mask=mask)
    return d_gate_up, hidden


DOWN_BACKWARD_VARIANT_CONFIGS = [
    ([128, 64], 8, 4),
    ([128, 128], 8, 3),
    ([64, 64], 8, 3),
    ([128, 64], 4, 3),
]


def down_backward_variants():
    """down_backward_variant's four variants at Mixtral-8x7B T = 8192, against
    backward_probe.moe_down_backward, each at DOWN_BACKWARD_VARIANT_CONFIGS."""
    model = {m.name: m for m in mh.MOE_MODELS}["Mixtral-8x7B"]
    T = 8192
    ids, weights = mh.model_routing(T, model.E, model.top_k, 0.0)
    P = ids.numel()
    routing = mh.align_to_blocks(ids, model.E, 128)
    W = mh.transformers_experts_module(model).down_proj.detach()  # [E, H, I]
    grad = torch.randn(T, model.H, device="cuda", dtype=torch.bfloat16)
    gate_up = torch.randn(P, 2, model.I, device="cuda", dtype=torch.bfloat16)
    base = (grad, W, gate_up, routing.sorted_pair_ids, routing.block_expert_ids, weights)
    index_dtype = mh.kernel_index_dtype(grad, W, P)
    flops = 2 * P * model.H * model.I
    runs = {
        v: (down_backward_variant, (*base, v)) for v in ("plain", "no_loads", "loads_first", "full")
    }
    runs["moe_down_backward"] = (moe_down_backward, (*base, True, SWIGLU))
    for name, (kernel, args) in runs.items():
        for tiles, warps, stages in DOWN_BACKWARD_VARIANT_CONFIGS:
            config = helion.Config(block_sizes=tiles, num_warps=warps, num_stages=stages)
            row = dict(variant=name, tiles=tiles, warps=warps, stages=stages)
            try:
                ms = mh.time_ms(functools.partial(mh.run_kernel, kernel, args, config, index_dtype))
            except Exception as error:
                record("down_backward_variants", **row, error=repr(error)[:300])
                continue
            tflops = round(flops / ms / 1e9, 1)
            record("down_backward_variants", **row, us=round(ms * 1e3, 1), tflops=tflops)


SECTIONS = {
    "down_backward_variants": down_backward_variants,
    "weight_grad_slots": weight_grad_slots,
    "weight_grad_schedules": weight_grad_schedules,
    "weight_grad_warp_specialized": weight_grad_warp_specialized,
    "weight_grad_expert_groups": weight_grad_expert_groups_section,
}


if __name__ == "__main__":
    run_sections(SECTIONS)
