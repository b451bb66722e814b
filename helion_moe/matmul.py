"""``moe_matmul``, the course's MoE matmul, and its backward (notebooks 07, 08, 10 and 11).

It validates its inputs and calls the custom op ``helion_moe::moe_matmul`` (or, for plain eager
inference, the op's body: ``runs_through_op``), which picks the per-pair or the flat path (or
runs the seed's per-expert kernels on request), builds the routing metadata, launches the
kernel and sums each token's k weighted expert outputs. The op's registered backward, the op
``helion_moe::moe_matmul_backward``, runs the backward kernels, so torch.compile traces a
call, forward and backward, without a graph break.
"""

from __future__ import annotations

import helion
import torch

from .configs import (
    COMBINE_CONFIG,
    FLAT_CONFIGS,
    WEIGHT_GRAD_CONFIGS,
    check_config,
    choose_implementation,
    configs_as_text,
    configs_from_text,
    default_config,
    flat_run_blocks,
    split_token_block,
)
from .decode_graphs import host_paced, replayed_call
from .kernels.backward import moe_matmul_input_backward, moe_weight_grad
from .kernels.combine import sum_pair_rows
from .kernels.flat import moe_matmul_flat
from .kernels.per_pair import moe_matmul_per_pair
from .kernels.seed import moe_matmul_ogs, moe_matmul_ogs_masked_store
from .launch import INT32_MAX, expert_weights_in_place, kernel_index_dtype, run_kernel
from .metadata import MAX_METADATA_EXPERTS, align_to_blocks, comparable_expert_ids
from .routing import as_top_k
from .sorting import sort_tokens_by_expert
from .validation import (
    check_expert_id_check,
    check_expert_id_range,
    check_output_grad,
    needs_grad,
    runs_through_op,
    start_expert_id_check,
    validate_moe_inputs,
    zero_sentinel_pairs,
)

__all__ = [
    "IMPLEMENTATIONS",
    "PER_EXPERT_IMPLEMENTATIONS",
    "backward_routing_inputs",
    "flat_kernel_args",
    "moe_matmul",
    "moe_matmul_backward",
    "moe_matmul_backward_op",
    "moe_matmul_forward",
    "moe_matmul_op",
    "one_token_as_two",
    "output_without_products",
    "pair_weights",
    "replays_eager_call",
    "sum_over_experts",
]

IMPLEMENTATIONS = {
    "seed": moe_matmul_ogs,
    "masked_store": moe_matmul_ogs_masked_store,
    "flat": moe_matmul_flat,
    "per_pair": moe_matmul_per_pair,
}


PER_EXPERT_IMPLEMENTATIONS = ("seed", "masked_store")


def pair_weights(
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None,  # expert_ids' shape, or None for weights of one
) -> torch.Tensor:  # [T, k] float32, contiguous
    """The flat kernel's combine weights: one per (token, expert) pair, in float32.

    Taught in notebook 08.
    """
    if combine_weights is None:
        return torch.ones(as_top_k(expert_ids).shape, device=expert_ids.device)
    return as_top_k(combine_weights).float().contiguous()


def flat_kernel_args(
    A: torch.Tensor,  # [T, K]
    W: torch.Tensor,  # [E, K, N]
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None,  # expert_ids' shape, or None for weights of one
    block_t: int,
) -> tuple[torch.Tensor, ...]:
    """The five arguments of ``moe_matmul_flat``: routing aligned to ``block_t``-pair blocks.

    Taught in notebook 07.
    """
    routing = align_to_blocks(expert_ids, W.shape[0], block_t)
    return routing.kernel_args(A, W, pair_weights(expert_ids, combine_weights))


def one_token_as_two(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Each [1, ...] tensor as [2, ...], two copies of its row (views; None stays None).

    Helion specializes sizes of 1, and its gather from a dimension of size 1 drops that
    dimension, so the flat kernel runs a one-token batch as two copies of its token: both fit
    in the token block that one token fills anyway, so the second costs nothing.

    Taught in notebook 07.
    """
    return tuple(None if t is None else t.expand(2, *t.shape[1:]) for t in tensors)


def output_without_products(
    A: torch.Tensor,  # [T, K]
    N: int,
    expert_ids: torch.Tensor,  # [T] or [T, k]
    E: int,
    no_products: bool,  # every pair's output is zero: K = 0, or the layer's I = 0
    expert_id_check: str,
) -> torch.Tensor | None:  # [T, N], or None where a kernel must run
    """The output where no kernel needs to run: [0, N] for no tokens, [T, 0] for no output
    columns, zeros where every pair's product is a sum of no terms (the ids of the last two
    still checked, as a kernel would check them).

    Taught in notebook 08.
    """
    if A.shape[0] == 0:
        return A.new_empty(0, N)
    if not no_products and N > 0:
        return None
    if expert_id_check != "sentinels":
        check_expert_id_range(expert_ids, E)
    return A.new_zeros(A.shape[0], N)


# Taught in notebook 08, which prints this docstring.
def sum_over_experts(
    pair_outputs: torch.Tensor,  # [T, k, N]
    plus: torch.Tensor | None = None,  # [T, N] float32, added before the rounding
    skip_outside: tuple[torch.Tensor, int] | None = None,  # (expert_ids [T, k], E)
) -> torch.Tensor:  # [T, N]
    """Each token's k weighted expert outputs summed in float32 and rounded once, in one pass
    (``sum_pair_rows``): the one pass after the kernel. With ``skip_outside``, a pair whose
    expert id lies outside [0, E) adds nothing (``expert_id_check="sentinels"``: the flat
    kernels leave its row unwritten).

    A fixed order of additions, so the result is the same on every run (atomic adds into C
    from the kernel would finish in whatever order the programs do).
    """
    _, top_k, N = pair_outputs.shape
    if plus is None and top_k == 1 and skip_outside is None:
        return pair_outputs[:, 0]
    expert_ids, num_experts = skip_outside or (
        pair_outputs.new_empty(0, top_k, dtype=torch.int32),
        0,
    )
    none = pair_outputs.new_empty(0, N, dtype=torch.float32)
    args = (pair_outputs, expert_ids.reshape(-1, top_k), none if plus is None else plus)
    args += (torch.empty(num_experts, device=pair_outputs.device), skip_outside is not None)
    index_dtype = torch.int64 if pair_outputs.numel() > INT32_MAX else torch.int32  # contiguous
    return run_kernel(sum_pair_rows, (*args, plus is not None), COMBINE_CONFIG, index_dtype)


def moe_matmul(
    A: torch.Tensor,  # [T, K]
    W: torch.Tensor,  # [E, K, N]
    expert_ids: torch.Tensor,  # [T] or [T, k] integer, values in [0, E)
    combine_weights: torch.Tensor | None = None,  # expert_ids' shape
    *,
    implementation: str = "auto",
    config: helion.Config | None = None,
    expert_id_check: str = "device",
) -> torch.Tensor:  # [T, N], A's dtype
    """MoE matmul: row t of the result is ``sum_j combine_weights[t, j] * A[t] @ W[e_tj]``
    where ``e_tj = expert_ids[t, j]`` (top-1: ``expert_ids`` is [T]).

    Args:
        A: Token activations.
        W: One [K, N] weight matrix per expert.
        expert_ids: The expert of each token ([T]) or its k experts ([T, k]).
        combine_weights: The weight of each (token, expert) pair; None weighs each by one.
        implementation: "auto" (``choose_implementation``: "per_pair" for a few pairs launched
            one by one, else "flat") or a key of ``IMPLEMENTATIONS``. The per-expert kernels
            ("seed", "masked_store") take top-1 routing without combine weights; "flat" takes up
            to ``MAX_METADATA_EXPERTS`` experts.
        config: Helion config whose ``block_sizes`` are the tiles of [tokens, N, K] (the
            per-pair kernel's token tile is 1); ``default_config(...)`` when None. An eager
            inference call on a GPU with "auto" and no config, of at most ``REPLAY_MAX_TOKENS``
            tokens, runs the flat kernel from a CUDA graph captured for its shapes
            (``replays_eager_call``).
        expert_id_check: How the flat and per-pair paths check that every expert id lies in
            [0, E) (``start_expert_id_check``): "device" (a device-side assertion; nothing
            waits for the GPU) or "host" (waits for the check, raises ValueError: on the flat
            path for the routing metadata, on the per-pair path for the kernel); or
            "sentinels": a pair whose id lies outside [0, E) belongs to another rank and adds
            zero to the output and to every gradient (transformers' expert parallelism).

    Returns:
        The MoE layer's output, a new tensor; the inputs are not modified. When A, W or
        combine_weights requires grad, the call runs the flat path, and autograd's backward
        runs ``moe_matmul_backward`` (through ``moe_matmul_backward_op``).

    Raises:
        TypeError, ValueError: for input the kernels cannot take, naming the argument
            (``validate_moe_inputs``). An expert id outside [0, E) raises a ValueError naming
            ``expert_ids`` on the CPU, with the per-expert kernels, and with
            ``expert_id_check="host"``; on a GPU with "device" it fails a later CUDA call with
            "device-side assert triggered" (the kernels skip the pair, so they never read
            outside a tensor).

    Taught in notebook 07.
    """
    if implementation != "auto" and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be 'auto' or one of {sorted(IMPLEMENTATIONS)}, "
            f"got {implementation!r}"
        )
    check_expert_id_check(expert_id_check)
    validate_moe_inputs(A, W, expert_ids, combine_weights)
    expert_ids = comparable_expert_ids(expert_ids)
    if config is not None:
        check_config(config)
    if needs_grad(A, W, combine_weights):
        if implementation not in ("auto", "flat"):
            raise ValueError(
                f"implementation {implementation!r} has no backward; with inputs that require "
                "grad, moe_matmul runs 'flat' (implementation='auto' or 'flat')"
            )
        implementation = "flat"
    if implementation in PER_EXPERT_IMPLEMENTATIONS and (
        expert_ids.dim() != 1 or combine_weights is not None
    ):
        raise ValueError(
            f"implementation {implementation!r} takes top-1 routing (expert_ids [T]) without "
            "combine_weights; 'flat' and 'per_pair' take top-k routing and weights"
        )
    if implementation in PER_EXPERT_IMPLEMENTATIONS and expert_id_check == "sentinels":
        raise ValueError(
            f"implementation {implementation!r} indexes with every expert id; "
            "expert_id_check='sentinels' runs 'flat' or 'per_pair'"
        )
    args = (A, W, expert_ids, combine_weights, implementation)
    if not runs_through_op(A, W, expert_ids, combine_weights):  # plain eager inference
        if replays_eager_call(A, W, implementation, config, expert_id_check):
            return _replayed_matmul(A, W, expert_ids, combine_weights, expert_id_check)
        return moe_matmul_forward(*args, config, expert_id_check)
    configs = None if config is None else (config,)
    return moe_matmul_op(*args, configs_as_text(configs), expert_id_check)


def replays_eager_call(
    A: torch.Tensor,  # [T, K]
    W: torch.Tensor,  # [E, K, N]
    implementation: str,
    config: helion.Config | None,
    expert_id_check: str,
) -> bool:
    """Whether an eager inference call of ``moe_matmul`` runs the flat kernel from a CUDA graph
    of its own (``replayed_call``): "auto" with no config, decode-sized on a GPU
    (``host_paced``), and at most ``MAX_METADATA_EXPERTS`` experts, which the flat path's
    metadata takes (past them a few pairs run the per-pair kernel, launched as they come).

    Taught in notebook 07.
    """
    if implementation != "auto" or config is not None or W.shape[0] > MAX_METADATA_EXPERTS:
        return False
    return host_paced(A, W, expert_id_check)


def _replayed_matmul(
    A: torch.Tensor,  # [T, K] on a GPU
    W: torch.Tensor,  # [E, K, N], either layout
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None,  # expert_ids' shape
    expert_id_check: str,
) -> torch.Tensor:  # [T, N]
    """``moe_matmul_forward`` from a CUDA graph (``replayed_call``) with the flat kernel, which a
    graph's single launch favours over the per-pair kernel, and the config it would pick now
    (part of the graph's key, so that a config tuned later gets a graph of its own)."""
    E, K, N = W.shape
    config = default_config("flat", A.dtype, expert_ids.numel(), K, N, E)

    def forward(
        A: torch.Tensor, expert_ids: torch.Tensor, combine_weights: torch.Tensor | None
    ) -> torch.Tensor:
        args = (A, W, expert_ids, combine_weights, "flat", config, expert_id_check)
        return moe_matmul_forward(*args)

    inputs = (A, expert_ids, combine_weights)
    options = ("moe_matmul", expert_id_check, configs_as_text((config,)))
    return replayed_call(forward, inputs, (W,), options)


def moe_matmul_forward(
    A: torch.Tensor,  # [T, K]
    W: torch.Tensor,  # [E, K, N], either layout
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None,  # expert_ids' shape
    implementation: str,  # "auto" or a key of IMPLEMENTATIONS
    config: helion.Config | None,
    expert_id_check: str,
) -> torch.Tensor:  # [T, N]
    """``moe_matmul`` on checked inputs: picks the implementation and its config, builds the
    routing metadata, launches the kernel and sums each token's k rows.

    Taught in notebook 07.
    """
    if implementation == "auto":
        implementation = choose_implementation(expert_ids.numel(), W.shape[0], config)
    T = A.shape[0]
    E, K, N = W.shape
    out = output_without_products(A, N, expert_ids, E, K == 0, expert_id_check)
    if out is not None:
        return out
    if config is None:
        config = default_config(implementation, A.dtype, expert_ids.numel(), K, N, E)
    index_dtype = kernel_index_dtype(A, W, expert_ids.numel())
    if implementation in PER_EXPERT_IMPLEMENTATIONS:
        check_expert_id_range(expert_ids, E)  # the per-expert kernels index with the ids
        args = sort_tokens_by_expert(expert_ids, E).kernel_args(A, W)
        return run_kernel(IMPLEMENTATIONS[implementation], args, config, index_dtype)
    if implementation == "per_pair":
        weights = pair_weights(expert_ids, combine_weights)
        _, kernel_config = split_token_block(config, "per_pair")
        pair_experts = as_top_k(expert_ids).contiguous()  # the kernel reads it as [T * k]
        placed = torch.empty(pair_experts.numel(), dtype=torch.int32, device=A.device)
        stored, nk_layout = expert_weights_in_place(W)
        args = (A, stored, pair_experts, weights, placed, nk_layout)
        pair_outputs = run_kernel(moe_matmul_per_pair, args, kernel_config, index_dtype)
        finish_check = start_expert_id_check(placed.all(), expert_ids, E, expert_id_check)
        out = sum_over_experts(pair_outputs)  # a sentinel pair's row is zero already
    else:
        if T == 1:
            A, expert_ids, combine_weights = one_token_as_two(A, expert_ids, combine_weights)
        weights = pair_weights(expert_ids, combine_weights)
        block_t, kernel_config = split_token_block(config)
        routing = align_to_blocks(expert_ids, E, block_t, flat_run_blocks(W, kernel_config))
        finish_check = start_expert_id_check(routing.all_placed, expert_ids, E, expert_id_check)
        args = routing.kernel_args(A, W, weights)
        pair_outputs = run_kernel(moe_matmul_flat, args, kernel_config, index_dtype)
        skip = (expert_ids, E) if expert_id_check == "sentinels" else None
        out = sum_over_experts(pair_outputs, skip_outside=skip)[:T]
    finish_check()  # "host": waits for the check only, issued before the matmul finishes
    return out


def backward_routing_inputs(
    grad_out: torch.Tensor,  # [T, N], checked by check_output_grad
    A: torch.Tensor,  # [T, K]
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # grad, A, ids, weights
    """What a backward runs its kernels on, as the forward ran them: the gradient in A's dtype,
    [T, k] ids and float32 weights, and a one-token batch as two copies of its token
    (``one_token_as_two``) whose second gradient row is zero, so no weight gradient counts it.

    Taught in notebook 11.
    """
    grad = grad_out.to(A.dtype).contiguous()
    ids, weights = as_top_k(expert_ids), pair_weights(expert_ids, combine_weights)
    if A.shape[0] == 1:
        A, ids, weights = one_token_as_two(A, ids, weights)
        weights = weights.contiguous()
        grad = torch.cat([grad, torch.zeros_like(grad)])
    return grad, A, ids, weights


def moe_matmul_backward(
    grad_out: torch.Tensor,  # [T, N] the gradient of moe_matmul's output
    A: torch.Tensor,  # [T, K]
    W: torch.Tensor,  # [E, K, N], either layout
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None,  # expert_ids' shape
    config: helion.Config | None,  # the forward's (its token block is reused)
    needs: tuple[bool, bool, bool],  # which of A, W, combine_weights need a gradient
    sentinels: bool = False,  # ids outside [0, E) are another rank's pairs (zero_sentinel_pairs)
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:  # dA, dW, dweights
    """The three gradients of ``moe_matmul``, from Helion kernels and the forward's routing:

    - dA[t] = sum_j w_tj grad[t] @ W[e_tj]^T: the flat kernel itself, on W^T read in place
      (``expert_weights_in_place`` sees the transposed view), weights in its epilogue;
    - dW[e] = sum over e's pairs of w_p A[t_p]^T grad[t_p]: ``moe_weight_grad``;
    - dw_tj = <grad[t] @ W[e_tj]^T, A[t]>: when the weights need a gradient,
      ``moe_matmul_input_backward`` runs instead of the flat kernel, the same schedule with a
      dot against A's tile in its epilogue, before the weight is applied.

    The routing is recomputed (one metadata launch pair) rather than saved; nothing else but the
    inputs is kept from the forward.

    Taught in notebook 11.
    """
    T, K = A.shape
    E, _, N = W.shape
    check_output_grad(grad_out, (T, N), "moe_matmul's")
    need_A, need_W, need_weights = needs
    need_weights = need_weights and combine_weights is not None
    if T == 0 or K == 0 or N == 0:
        return (
            A.new_zeros(A.shape) if need_A else None,
            W.new_zeros(W.shape) if need_W else None,
            combine_weights.new_zeros(combine_weights.shape) if need_weights else None,
        )
    grad_run, A_run, ids, weights = backward_routing_inputs(
        grad_out, A, expert_ids, combine_weights
    )
    num_pairs = ids.numel()
    if config is None:
        config = default_config("flat", A.dtype, num_pairs, K, N, E)
    # the forward's token block, up to the largest that FLAT_CONFIGS has tiles for
    block_t = min(split_token_block(config)[0], max(FLAT_CONFIGS[A.dtype]))
    routing = align_to_blocks(ids, E, block_t)
    dA = dW = d_weights = None
    if need_A or need_weights:
        _, kernel_config = split_token_block(FLAT_CONFIGS[A.dtype][block_t])
        W_t = W.transpose(1, 2)  # [E, N, K]: read in place
        index_dtype = kernel_index_dtype(grad_run, W_t, num_pairs)
        if need_weights:  # the same arguments as the flat kernel's for W, and A
            args = (*routing.kernel_args(grad_run, W, weights), A_run)
            rows, d_weight_parts = run_kernel(
                moe_matmul_input_backward, args, kernel_config, index_dtype
            )
            d_weights = d_weight_parts.sum(-1).view(ids.shape)
            if sentinels:
                d_weights = zero_sentinel_pairs(d_weights, ids, E)
            d_weights = d_weights[:T]
            d_weights = d_weights.view(combine_weights.shape).to(combine_weights.dtype)
        else:
            args = routing.kernel_args(grad_run, W_t, weights)
            rows = run_kernel(moe_matmul_flat, args, kernel_config, index_dtype)  # [T, k, K]
        skip = (ids, E) if sentinels else None
        dA = sum_over_experts(rows, skip_outside=skip)[:T] if need_A else None
    if need_W:
        offsets = routing.expert_block_offsets(E)
        weighted = combine_weights is not None
        args = (A_run, grad_run, routing.sorted_pair_ids, offsets, weights, False, False, weighted)
        dW = run_kernel(
            moe_weight_grad, args, WEIGHT_GRAD_CONFIGS[A.dtype], kernel_index_dtype(A, W, num_pairs)
        )
    return dA, dW, d_weights


# The custom ops: torch.compile traces each as one node of its graph, shapes from the fake
# implementation, and autograd runs the backward op. Taught in notebook 10.
@torch.library.custom_op("helion_moe::moe_matmul", mutates_args=())
def moe_matmul_op(
    A: torch.Tensor,
    W: torch.Tensor,
    expert_ids: torch.Tensor,
    combine_weights: torch.Tensor | None,
    implementation: str,
    configs: str | None,  # configs_as_text of (config,)
    expert_id_check: str,
) -> torch.Tensor:
    """``moe_matmul_forward`` as the custom op ``helion_moe::moe_matmul``."""
    config = configs_from_text(configs)
    return moe_matmul_forward(
        A, W, expert_ids, combine_weights, implementation, config and config[0], expert_id_check
    )


@moe_matmul_op.register_fake
def _moe_matmul_shape(A, W, expert_ids, combine_weights, implementation, configs, check):
    return A.new_empty(A.shape[0], W.shape[2])


@torch.library.custom_op("helion_moe::moe_matmul_backward", mutates_args=())
def moe_matmul_backward_op(
    grad_out: torch.Tensor,
    A: torch.Tensor,
    W: torch.Tensor,
    expert_ids: torch.Tensor,
    combine_weights: torch.Tensor | None,
    configs: str | None,
    need_A: bool,
    need_W: bool,
    need_weights: bool,
    sentinels: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``moe_matmul_backward`` as the custom op ``helion_moe::moe_matmul_backward``: dA, dW
    and the combine weights' gradient, an empty tensor for each one not asked for.

    Taught in notebook 10.
    """
    config = configs_from_text(configs)
    needs = (need_A, need_W, need_weights)
    config = config and config[0]
    grads = moe_matmul_backward(
        grad_out, A, W, expert_ids, combine_weights, config, needs, sentinels
    )
    return tuple(A.new_empty(0) if grad is None else grad for grad in grads)


@moe_matmul_backward_op.register_fake
def _moe_matmul_backward_shapes(grad_out, A, W, expert_ids, combine_weights, configs, *flags):
    need_A, need_W, need_weights, _ = flags
    return (
        A.new_empty(A.shape if need_A else 0),
        W.new_empty(W.shape if need_W else 0),
        A.new_empty(0)
        if combine_weights is None or not need_weights
        else combine_weights.new_empty(combine_weights.shape),
    )


def _save_moe_matmul_inputs(ctx, inputs, output):
    A, W, expert_ids, combine_weights, _, configs, expert_id_check = inputs
    ctx.save_for_backward(A, W, expert_ids, combine_weights)
    ctx.configs = configs
    ctx.sentinels = expert_id_check == "sentinels"


def _moe_matmul_grads(ctx, grad_out):
    A, W, expert_ids, combine_weights = ctx.saved_tensors
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3])
    dA, dW, d_weights = moe_matmul_backward_op(
        grad_out, A, W, expert_ids, combine_weights, ctx.configs, *needs, ctx.sentinels
    )
    kept = [grad if need else None for grad, need in zip((dA, dW, d_weights), needs, strict=True)]
    return kept[0], kept[1], None, kept[2], None, None, None


moe_matmul_op.register_autograd(_moe_matmul_grads, setup_context=_save_moe_matmul_inputs)
