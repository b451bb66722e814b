"""``moe_experts``, the experts of an MoE layer (gated MLPs), and its backward (notebooks 10 and
11): the fused gate_up kernel and the flat down GEMM on one routing, or the two per-pair kernels
for a few pairs whose weights are small; five Helion launches for the gradients. Both
directions are custom ops (``helion_moe::moe_experts`` and its registered backward), as for
``moe_matmul``.
"""

from __future__ import annotations

import helion
import torch

from .configs import (
    ACTIVATION_BACKWARD_CONFIG,
    FLAT_CONFIGS,
    PER_PAIR_CONFIGS,
    WEIGHT_GRAD_CONFIGS,
    configs_as_text,
    configs_from_text,
    flat_half_tails,
    flat_layer_configs,
    flat_run_blocks,
    flat_token_block,
    layer_configs,
    layer_path,
    split_token_block,
)
from .decode_graphs import host_paced, replayed_call
from .kernels.activations import (
    GatedActivation,
    activation_as_text,
    activation_from_text,
    as_gated_activation,
)
from .kernels.backward import gated_activation_backward, moe_weight_grad
from .kernels.flat import moe_gate_up_flat, moe_matmul_flat
from .kernels.per_pair import moe_gate_up_per_pair, moe_matmul_per_pair
from .launch import INT32_MAX, expert_weights_in_place, kernel_index_dtype, run_kernel
from .matmul import (
    backward_routing_inputs,
    one_token_as_two,
    output_without_products,
    pair_weights,
    sum_over_experts,
)
from .metadata import BlockAlignedRouting, align_to_blocks, comparable_expert_ids
from .routing import as_top_k
from .validation import (
    check_expert_id_check,
    check_output_grad,
    needs_grad,
    runs_through_op,
    start_expert_id_check,
    validate_biases,
    validate_down_weights,
    validate_moe_inputs,
    zero_sentinel_pairs,
)

__all__ = [
    "down_input_backward",
    "expert_sums",
    "flat_layer_gemms",
    "moe_experts",
    "moe_experts_backward",
    "moe_experts_backward_op",
    "moe_experts_forward",
    "moe_experts_op",
    "moe_experts_per_pair",
    "token_expert_weights",
]


def moe_experts(
    A: torch.Tensor,  # [T, K]
    W_gate_up: torch.Tensor,  # [E, K, 2I]: gate columns, then up columns
    W_down: torch.Tensor,  # [E, I, N]
    expert_ids: torch.Tensor,  # [T] or [T, k] integer, values in [0, E)
    combine_weights: torch.Tensor | None = None,  # expert_ids' shape
    *,
    activation: str | GatedActivation = "silu",
    gate_up_bias: torch.Tensor | None = None,  # [E, 2I], in W_gate_up's column order
    down_bias: torch.Tensor | None = None,  # [E, N]
    interleaved: bool = False,
    configs: tuple[helion.Config, helion.Config] | None = None,
    expert_id_check: str = "device",
) -> torch.Tensor:  # [T, N], A's dtype
    """The experts of an MoE layer, gated MLPs: row t of the result is
    ``sum_j combine_weights[t, j] * down_e(act(A[t] @ gate_e) * (A[t] @ up_e))`` with
    ``e = expert_ids[t, j]``, the sum over j in a fixed order (with biases, each GEMM adds its
    expert's: ``A[t] @ gate_e + b_gate_e`` and so on).

    The routing metadata is built once (``align_to_blocks``) and read by both GEMMs: the fused
    gate_up kernel (``moe_gate_up_flat``) writes the [P, I] activations of the P pairs, and the
    flat kernel multiplies them by the down weights, one pair per row, weighting each row by its
    combine weight; each token's k rows are then summed in float32 (``sum_over_experts``).

    Args:
        A: Token activations (hidden states).
        W_gate_up: Each expert's gate and up projections side by side, inputs by outputs. The
            transformers layout, ``gate_up_proj`` [E, 2I, K], is read in place as
            ``gate_up_proj.transpose(1, 2)`` (``expert_weights_in_place``).
        W_down: Each expert's down projection; ``down_proj.transpose(1, 2)`` likewise.
        expert_ids, combine_weights, expert_id_check: as for ``moe_matmul``.
        activation: The gate's activation, one of ``ACTIVATIONS``, or a ``GatedActivation``
            that also clamps, scales or shifts (gpt-oss's: ``GPT_OSS_ACTIVATION``).
        gate_up_bias, down_bias: Each expert's biases of the two GEMMs, or None. The gate_up
            bias is added before the activation, in the gate_up kernel's epilogue; the down
            bias's share of each token, sum_j w_tj b_e, is one small GEMM
            (``token_expert_weights``).
        interleaved: W_gate_up's (and gate_up_bias's) gate and up columns alternate, gate
            ``[..., ::2]`` and up ``[..., 1::2]``, as gpt-oss stores them; read in place.
        configs: (gate_up, down) Helion configs of [tokens, N, K] tiles with one token block;
            a token block of 1 runs the per-pair kernels (``moe_experts_per_pair``). When None,
            ``layer_path`` chooses: outside CUDA graph capture, a few pairs whose weights come
            to at most ``LAYER_PER_PAIR_MAX_BYTES`` run per pair, and ``layer_configs`` picks
            the flat kernels' configs for the others. An eager inference call on a GPU of at
            most ``REPLAY_MAX_TOKENS`` tokens (``host_paced``) runs the flat kernels from a
            CUDA graph captured for its shapes (``replayed_call``).

    Returns:
        A new tensor; the inputs are not modified. When an input requires grad, the forward
        also keeps each pair's gate and up for the backward (``moe_experts_forward``), and
        autograd's backward runs ``moe_experts_backward`` (through ``moe_experts_backward_op``).

    Raises:
        TypeError, ValueError: for input the kernels cannot take, naming the argument.

    Taught in notebook 10.
    """
    activation = as_gated_activation(activation)
    check_expert_id_check(expert_id_check)
    validate_moe_inputs(A, W_gate_up, expert_ids, combine_weights, weight_name="W_gate_up")
    expert_ids = comparable_expert_ids(expert_ids)
    validate_down_weights(W_gate_up, W_down)
    validate_biases(gate_up_bias, down_bias, W_gate_up, W_down)
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {type(interleaved).__name__}")
    has_bias = gate_up_bias is not None or down_bias is not None
    if has_bias and 0 in (A.shape[1], W_down.shape[1]):
        raise ValueError("with biases, K (A's last size) and I (W_down's second) must be > 0")
    if configs is not None:  # raises, naming configs, before they become the op's text
        layer_configs(configs, A.dtype, expert_ids.numel(), W_gate_up.shape[0])
    args = (A, W_gate_up, W_down, expert_ids, combine_weights, gate_up_bias, down_bias)
    if not runs_through_op(*args):  # plain eager inference: the op's body, without dispatch
        extras = (gate_up_bias, down_bias, interleaved)
        if configs is None and host_paced(A, W_down, expert_id_check):
            return _replayed_forward(
                A,
                W_gate_up,
                W_down,
                expert_ids,
                combine_weights,
                activation,
                expert_id_check,
                extras,
            )
        args = (A, W_gate_up, W_down, expert_ids, combine_weights, activation, configs)
        return moe_experts_forward(*args, expert_id_check, False, *extras)[0]
    options = (activation_as_text(activation), interleaved, configs_as_text(configs))
    keep_gate_up = needs_grad(*args[:3], combine_weights, gate_up_bias, down_bias)
    return moe_experts_op(*args, *options, expert_id_check, keep_gate_up)[0]


def _replayed_forward(
    A: torch.Tensor,  # [T, K] on a GPU
    W_gate_up: torch.Tensor,  # [E, K, 2I], either layout
    W_down: torch.Tensor,  # [E, I, N], either layout
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None,  # expert_ids' shape
    activation: GatedActivation,
    expert_id_check: str,
    extras: tuple[torch.Tensor | None, torch.Tensor | None, bool],  # biases, interleaved
) -> torch.Tensor:  # [T, N]
    """``moe_experts_forward`` from a CUDA graph (``replayed_call``) with the flat kernels'
    configs, which a graph's single launch favours over the per-pair kernels."""
    configs = flat_layer_configs(A.dtype, expert_ids.numel(), W_gate_up.shape[0])
    options = (tuple(activation), expert_id_check, extras[2])

    def forward(
        A: torch.Tensor, expert_ids: torch.Tensor, combine_weights: torch.Tensor | None
    ) -> torch.Tensor:
        args = (A, W_gate_up, W_down, expert_ids, combine_weights, activation, configs)
        return moe_experts_forward(*args, expert_id_check, False, *extras)[0]

    inputs = (A, expert_ids, combine_weights)
    return replayed_call(forward, inputs, (W_gate_up, W_down, *extras[:2]), options)


def moe_experts_forward(
    A: torch.Tensor,  # [T, K]
    W_gate_up: torch.Tensor,  # [E, K, 2I], either layout
    W_down: torch.Tensor,  # [E, I, N], either layout
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None,  # expert_ids' shape
    activation: GatedActivation,
    configs: tuple[helion.Config, helion.Config] | None,
    expert_id_check: str,
    keep_gate_up: bool,  # also return each pair's gate and up, which the backward reads
    gate_up_bias: torch.Tensor | None = None,  # [E, 2I]
    down_bias: torch.Tensor | None = None,  # [E, N]
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # [T, N]; [T * k, 2, I] or None
    """``moe_experts`` on checked inputs: the output, and with ``keep_gate_up`` the [P, 2I]
    gate and up of the P pairs, in pair order, which the gate_up kernel stores beside its
    output (None where no kernel runs: no token, K or I).

    Taught in notebook 10.
    """
    T, K = A.shape
    E, I, N = W_down.shape  # noqa: E741
    no_products = K == 0 or I == 0  # act(0) * 0 = 0 for every pair
    out = output_without_products(A, N, expert_ids, E, no_products, expert_id_check)
    if out is not None:
        return out, None
    num_pairs = expert_ids.numel()
    if configs is None and layer_path(num_pairs, W_gate_up, W_down) == "per_pair":
        configs = PER_PAIR_CONFIGS[A.dtype], PER_PAIR_CONFIGS[A.dtype]
    block_t, gate_up_config, down_config = layer_configs(configs, A.dtype, num_pairs, E)
    extras = (gate_up_bias, down_bias, interleaved)
    if block_t == 1:
        configs = gate_up_config, down_config
        args = (A, W_gate_up, W_down, expert_ids, combine_weights, activation, configs)
        return moe_experts_per_pair(*args, expert_id_check, keep_gate_up, *extras)
    if T == 1:  # the flat rule then picks its token block for the doubled pairs
        A, expert_ids, combine_weights = one_token_as_two(A, expert_ids, combine_weights)
        num_pairs = expert_ids.numel()
        block_t, gate_up_config, down_config = layer_configs(configs, A.dtype, num_pairs, E)
    top_k = as_top_k(expert_ids).shape[1]
    run_blocks = flat_run_blocks(W_gate_up, gate_up_config, down_config)
    routing = align_to_blocks(expert_ids, E, block_t, run_blocks)
    finish_check = start_expert_id_check(routing.all_placed, expert_ids, E, expert_id_check)
    # a sentinel pair's gate and up stay unwritten: zero, so that the op's output is defined
    allocate = A.new_zeros if expert_id_check == "sentinels" else A.new_empty
    gate_up = allocate(num_pairs if keep_gate_up else 0, 2, I)
    weights = pair_weights(expert_ids, combine_weights).view(num_pairs, 1)
    args = (A, W_gate_up, W_down, routing, top_k, weights, activation)
    configs = gate_up_config, down_config
    pair_outputs = flat_layer_gemms(*args, configs, gate_up, gate_up_bias, interleaved)
    pair_outputs = pair_outputs.view(-1, top_k, N)
    skip = (expert_ids, E) if expert_id_check == "sentinels" else None
    plus = _down_bias_share(expert_ids, combine_weights, down_bias)
    out = sum_over_experts(pair_outputs, plus, skip_outside=skip)
    finish_check()
    return out[:T], gate_up[: T * top_k] if keep_gate_up else None


def flat_layer_gemms(
    A: torch.Tensor,  # [T, K]
    W_gate_up: torch.Tensor,  # [E, K, 2I], either layout
    W_down: torch.Tensor,  # [E, I, N], either layout
    routing: BlockAlignedRouting,  # the pairs' token blocks
    top_k: int,  # pair p is token p // top_k
    weights: torch.Tensor,  # [P, 1] float32, each pair's combine weight
    activation: GatedActivation,
    configs: tuple[helion.Config, helion.Config],  # (gate_up, down), token block split off
    gate_up: torch.Tensor,  # [P, 2, I] written with each pair's gate and up, or [0, 2, I]
    gate_up_bias: torch.Tensor | None = None,  # [E, 2I]
    interleaved: bool = False,
) -> torch.Tensor:  # [P, 1, N] each pair's weighted output
    """The layer's two flat GEMMs on a routing: the fused gate_up kernel (its hidden, [P, I]),
    then the flat kernel on the hidden, one pair per row; both with half-height tails where
    ``flat_half_tails`` says so.

    Taught in notebook 10.
    """
    num_pairs = weights.shape[0]
    half_tails = flat_half_tails(routing.sorted_pair_ids.shape[1])
    stored, nk_layout = expert_weights_in_place(W_gate_up)
    bias = A.new_empty(0) if gate_up_bias is None else gate_up_bias
    gate_up_args = (A, stored, routing.sorted_pair_ids, routing.block_expert_ids, gate_up, bias)
    gate_up_args += (top_k, nk_layout, interleaved, gate_up_bias is not None)
    gate_up_args += (tuple(activation), gate_up.shape[0] > 0, half_tails)
    index_dtype = kernel_index_dtype(A, W_gate_up, num_pairs)
    hidden = run_kernel(moe_gate_up_flat, gate_up_args, configs[0], index_dtype)  # [P, I]
    down_args = (*routing.kernel_args(hidden, W_down, weights), half_tails)  # a pair per row
    index_dtype = kernel_index_dtype(hidden, W_down, num_pairs)
    return run_kernel(moe_matmul_flat, down_args, configs[1], index_dtype)


def moe_experts_per_pair(
    A: torch.Tensor,  # [T, K]
    W_gate_up: torch.Tensor,  # [E, K, 2I], either layout
    W_down: torch.Tensor,  # [E, I, N], either layout
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None,
    activation: GatedActivation,
    configs: tuple[helion.Config, helion.Config],  # (gate_up, down), token block split off
    expert_id_check: str,
    keep_gate_up: bool,
    gate_up_bias: torch.Tensor | None = None,  # [E, 2I]
    down_bias: torch.Tensor | None = None,  # [E, N]
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # as moe_experts_forward's
    """``moe_experts_forward`` for a handful of pairs, in two launches and no routing metadata:
    ``moe_gate_up_per_pair`` writes each pair's [I] activations, and ``moe_matmul_per_pair``
    multiplies them by the pair's down weights (one pair per row, so top-1 over the [P, I]
    rows) and weights them; each token's k rows are then summed as in the flat path.

    Taught in notebook 10.
    """
    T = A.shape[0]
    E, I, N = W_down.shape  # noqa: E741
    gate_up_config, down_config = configs
    pair_experts = as_top_k(expert_ids).contiguous()  # the kernels read it as [T * k]
    num_pairs = pair_experts.numel()
    placed = torch.empty(num_pairs, dtype=torch.int32, device=A.device)
    stored, nk_layout = expert_weights_in_place(W_gate_up)
    # a sentinel pair's gate and up stay unwritten: zero, so that the op's output is defined
    allocate = A.new_zeros if expert_id_check == "sentinels" else A.new_empty
    gate_up = allocate(num_pairs if keep_gate_up else 0, 2, I)
    bias = A.new_empty(0) if gate_up_bias is None else gate_up_bias
    args = (A, stored, pair_experts, placed, gate_up, bias, nk_layout, interleaved)
    args += (gate_up_bias is not None, tuple(activation), keep_gate_up)
    index_dtype = kernel_index_dtype(A, W_gate_up, num_pairs)
    hidden = run_kernel(moe_gate_up_per_pair, args, gate_up_config, index_dtype)  # [P, I]
    finish_check = start_expert_id_check(placed.all(), expert_ids, E, expert_id_check)
    weights = pair_weights(expert_ids, combine_weights).view(num_pairs, 1)
    stored, nk_layout = expert_weights_in_place(W_down)
    down_placed = torch.empty_like(placed)  # the same flags again
    args = (hidden, stored, pair_experts.view(num_pairs, 1), weights, down_placed, nk_layout)
    index_dtype = kernel_index_dtype(hidden, W_down, num_pairs)
    pair_outputs = run_kernel(moe_matmul_per_pair, args, down_config, index_dtype)
    pair_outputs = pair_outputs.view(T, -1, N)  # a sentinel pair's row is zero already
    out = sum_over_experts(pair_outputs, _down_bias_share(expert_ids, combine_weights, down_bias))
    finish_check()
    return out, gate_up if keep_gate_up else None


def token_expert_weights(
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None,  # expert_ids' shape
    num_experts: int,
) -> torch.Tensor:  # [T, E] float32
    """Each token's combine weights by expert, R[t, e] = sum_j w_tj [e_tj = e]; a pair whose id
    lies outside [0, E) (a sentinel) adds nothing. The down bias's share of the output is then
    R @ down_bias, and its gradient R^T @ grad: GEMMs, in a fixed order.

    Taught in notebook 10.
    """
    ids, weights = as_top_k(expert_ids).long(), pair_weights(expert_ids, combine_weights)
    # columns 1..E of a [T, E + 2] sum, ids outside [0, E) sent to column 0 or E + 1: four
    # launches on a GPU (masking the ids and the weights instead would take eight)
    columns = ids.clamp(-1, num_experts) + 1
    R = torch.zeros(ids.shape[0], num_experts + 2, device=ids.device)
    return R.scatter_add_(1, columns, weights)[:, 1 : num_experts + 1]


def _down_bias_share(
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None,  # expert_ids' shape
    down_bias: torch.Tensor | None,  # [E, N]
) -> torch.Tensor | None:  # [T, N] float32: sum_j w_tj down_bias[e_tj]; None without a bias
    if down_bias is None:
        return None
    R = token_expert_weights(expert_ids, combine_weights, down_bias.shape[0])
    return R @ down_bias.float()


def expert_sums(
    rows: torch.Tensor,  # [P, C] one row per pair
    expert_ids: torch.Tensor,  # [T, k], P = T * k
    num_experts: int,
) -> torch.Tensor:  # [E, C] float32
    """Each expert's sum of its pairs' rows (sentinels add nothing), as a GEMM of the pairs'
    one-hot expert matrix: a fixed order, unlike ``index_add_``'s atomic adds. The gate_up
    bias's gradient.

    Taught in notebook 11.
    """
    ids = expert_ids.reshape(-1).long()
    inside = (ids >= 0) & (ids < num_experts)
    one_hot = torch.nn.functional.one_hot(ids.where(inside, 0), num_experts) * inside[:, None]
    return (one_hot.T.to(rows.dtype) @ rows).float()


def moe_experts_backward(
    grad_out: torch.Tensor,  # [T, N]
    A: torch.Tensor,  # [T, K]
    W_gate_up: torch.Tensor,  # [E, K, 2I], either layout
    W_down: torch.Tensor,  # [E, I, N], either layout
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None,  # expert_ids' shape
    gate_up: torch.Tensor | None,  # [T * k, 2, I] the forward's (moe_experts_forward's)
    activation: GatedActivation,
    needs: tuple[bool, ...],  # which of A, W_gate_up, W_down, weights, the 2 biases need one
    sentinels: bool = False,  # ids outside [0, E) are another rank's pairs (zero_sentinel_pairs)
    gate_up_bias: torch.Tensor | None = None,  # [E, 2I]
    down_bias: torch.Tensor | None = None,  # [E, N]
    interleaved: bool = False,
) -> tuple[torch.Tensor | None, ...]:  # dA, dW_gate_up, dW_down, d weights, d biases
    """The layer's gradients, in five Helion launches over routing aligned anew (the flat
    rule's token block, whatever the forward ran: the saved gate and up are in pair order):

    1. ``down_input_backward``: grad_h = grad @ W_down^T (the flat kernel, W_down read in
       place), then ``gated_activation_backward`` applies the pair's weight and the
       activation's derivative to the forward's gate and up: d(gate, up) [P, 2I], w * h [P, I]
       with h = act(gate) * up, and per-tile shares of <grad_h_p, h_p>, the combine weights'
       gradient;
    2. dW_down[e] = sum_p (w_p h_p)^T grad[t_p] and 3. dW_gate_up[e] = sum_p A[t_p]^T d(gate,
       up)_p, both ``moe_weight_grad`` unweighted;
    4. dA = the sum over each token's pairs of d(gate, up)_p @ W_gate_up^T, the flat kernel.

    With biases, d gate_up_bias[e] sums e's rows of d(gate, up) (``expert_sums``), d down_bias
    = R^T grad (``token_expert_weights``), and each pair's weight gets <grad, down_bias[e]>.
    With ``interleaved`` weights, d(gate, up) is put in their column order first.

    Saved by the forward: references to its inputs, and the [P, 2I] gate and up (the one
    tensor the derivative needs that the inputs cannot give without repeating the first GEMM).

    Taught in notebook 11.
    """
    T, K = A.shape
    E, I, N = W_down.shape  # noqa: E741
    check_output_grad(grad_out, (T, N), "moe_experts'")
    need_A, need_gate_up, need_down, need_weights, need_gate_up_bias, need_down_bias = needs
    need_weights = need_weights and combine_weights is not None
    need_gate_up_bias = need_gate_up_bias and gate_up_bias is not None
    need_down_bias = need_down_bias and down_bias is not None
    if T == 0 or K == 0 or I == 0 or N == 0:  # every gradient zero (or empty)
        inputs = (A, W_gate_up, W_down, combine_weights, gate_up_bias, down_bias)
        flags = (need_A, need_gate_up, need_down, need_weights, need_gate_up_bias, need_down_bias)
        return tuple(
            x.new_zeros(x.shape) if need else None for x, need in zip(inputs, flags, strict=True)
        )
    grad_run, A_run, ids, weights = backward_routing_inputs(
        grad_out, A, expert_ids, combine_weights
    )
    if T == 1:  # backward_routing_inputs runs one token as two; the second one's rows again
        gate_up = gate_up.repeat(2, 1, 1)
    T_run, top_k = ids.shape
    num_pairs = ids.numel()
    block_t = flat_token_block(num_pairs, E)
    _, flat_config = split_token_block(FLAT_CONFIGS[A.dtype][block_t])
    routing = align_to_blocks(ids, E, block_t)
    half_tails = flat_half_tails(block_t)  # for the dA GEMM, as in the forward's kernels
    offsets = routing.expert_block_offsets(E)
    ones = torch.ones_like(weights)

    def index_dtype(*tensors: torch.Tensor) -> torch.dtype:
        return kernel_index_dtype(tensors[0], tensors[1], num_pairs)

    d_gate_up, weighted_hidden, d_weight_parts = down_input_backward(
        grad_run, W_down, gate_up, routing, weights, activation
    )
    if interleaved:  # [gate | up] columns as W_gate_up holds them: gate 2n, up 2n + 1
        d_gate_up = d_gate_up.view(num_pairs, 2, I).transpose(1, 2).reshape(num_pairs, 2 * I)
    d_weights = d_gate_up_bias = d_down_bias = None
    if need_weights:
        d_weights = d_weight_parts.sum(-1).view(T_run, top_k)
        if down_bias is not None:  # <grad_t, down_bias[e]> of each pair
            by_expert = grad_run.float() @ down_bias.float().T  # [T, E]
            d_weights = d_weights + by_expert.gather(1, ids.long().clamp(0, E - 1))
        if sentinels:
            d_weights = zero_sentinel_pairs(d_weights, ids, E)
        d_weights = d_weights[:T]
        d_weights = d_weights.view(combine_weights.shape).to(combine_weights.dtype)
    if need_gate_up_bias:
        d_gate_up_bias = expert_sums(d_gate_up, ids, E).to(gate_up_bias.dtype)
    if need_down_bias:
        R = token_expert_weights(ids, weights, E)
        d_down_bias = (R.T @ grad_run.float()).to(down_bias.dtype)
    dW_down = dW_gate_up = dA = None
    if need_down:
        args = (weighted_hidden, grad_run, routing.sorted_pair_ids, offsets, ones)
        args += (True, False, False)
        dW_down = run_kernel(
            moe_weight_grad,
            args,
            WEIGHT_GRAD_CONFIGS[A.dtype],
            index_dtype(weighted_hidden, W_down),
        )
    if need_gate_up:
        args = (A_run, d_gate_up, routing.sorted_pair_ids, offsets, ones, False, True, False)
        dW_gate_up = run_kernel(
            moe_weight_grad, args, WEIGHT_GRAD_CONFIGS[A.dtype], index_dtype(A_run, W_gate_up)
        )
    if need_A:
        W_gate_up_t = W_gate_up.transpose(1, 2)  # [E, 2I, K]
        one_per_row = torch.ones(num_pairs, 1, device=A.device)
        dA_args = (*routing.kernel_args(d_gate_up, W_gate_up_t, one_per_row), half_tails)
        rows = run_kernel(
            moe_matmul_flat, dA_args, flat_config, index_dtype(d_gate_up, W_gate_up_t)
        )
        rows = rows.view(T_run, top_k, K)
        dA = sum_over_experts(rows, skip_outside=(ids, E) if sentinels else None)[:T]
    return dA, dW_gate_up, dW_down, d_weights, d_gate_up_bias, d_down_bias


def down_input_backward(
    grad_out: torch.Tensor,  # [T, N] the layer's output gradient
    W_down: torch.Tensor,  # [E, I, N], either layout
    gate_up: torch.Tensor,  # [T * k, 2, I] the forward's gate and up
    routing: BlockAlignedRouting,  # the pairs aligned to the flat rule's token block
    combine_weights: torch.Tensor,  # [T, k] float32
    activation: GatedActivation,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # as gated_activation_backward's
    """Step 1 of ``moe_experts_backward``: each pair's grad_h = grad_out[t] W_down^T, unweighted,
    by the flat kernel on W_down^T (read in place) with the forward's tiles and half tails,
    then ``gated_activation_backward`` over grad_h and the forward's gate and up.

    Taught in notebook 11.
    """
    num_pairs = combine_weights.numel()
    block_t = routing.sorted_pair_ids.shape[1]
    _, flat_config = split_token_block(FLAT_CONFIGS[grad_out.dtype][block_t])
    W_down_t = W_down.transpose(1, 2)  # [E, N, I]: the GEMM's weights, its output [P, I]
    args = routing.kernel_args(grad_out, W_down_t, torch.ones_like(combine_weights))
    args += (flat_half_tails(block_t),)
    index_dtype = kernel_index_dtype(grad_out, W_down_t, num_pairs)
    grad_h = run_kernel(moe_matmul_flat, args, flat_config, index_dtype).view(num_pairs, -1)
    args = (grad_h, gate_up, combine_weights, tuple(activation))
    index_dtype = torch.int64 if gate_up.numel() > INT32_MAX else torch.int32  # [P, 2, I]
    return run_kernel(gated_activation_backward, args, ACTIVATION_BACKWARD_CONFIG, index_dtype)


# The custom ops, as for moe_matmul. Taught in notebook 10.
@torch.library.custom_op("helion_moe::moe_experts", mutates_args=())
def moe_experts_op(
    A: torch.Tensor,
    W_gate_up: torch.Tensor,
    W_down: torch.Tensor,
    expert_ids: torch.Tensor,
    combine_weights: torch.Tensor | None,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    activation: str,  # activation_as_text of a GatedActivation
    interleaved: bool,
    configs: str | None,  # configs_as_text of (gate_up config, down config)
    expert_id_check: str,
    keep_gate_up: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``moe_experts_forward`` as the custom op ``helion_moe::moe_experts``: the output, and
    the pairs' [T * k, 2, I] gate and up (empty unless ``keep_gate_up``)."""
    args = (A, W_gate_up, W_down, expert_ids, combine_weights, activation_from_text(activation))
    options = (configs_from_text(configs), expert_id_check, keep_gate_up)
    out, gate_up = moe_experts_forward(*args, *options, gate_up_bias, down_bias, interleaved)
    if gate_up is None:  # no kernel ran: every gate and up is zero
        gate_up = A.new_zeros(_gate_up_shape(A, W_down, expert_ids, keep_gate_up))
    return out, gate_up


def _gate_up_shape(A, W_down, expert_ids, keep_gate_up) -> tuple[int, int, int]:
    return (expert_ids.numel() if keep_gate_up else 0, 2, W_down.shape[1])


@moe_experts_op.register_fake
def _moe_experts_shapes(A, W_gate_up, W_down, expert_ids, combine_weights, *options):
    keep_gate_up = options[-1]
    out = A.new_empty(A.shape[0], W_down.shape[2])
    return out, A.new_empty(_gate_up_shape(A, W_down, expert_ids, keep_gate_up))


@torch.library.custom_op("helion_moe::moe_experts_backward", mutates_args=())
def moe_experts_backward_op(
    grad_out: torch.Tensor,
    A: torch.Tensor,
    W_gate_up: torch.Tensor,
    W_down: torch.Tensor,
    expert_ids: torch.Tensor,
    combine_weights: torch.Tensor | None,
    gate_up_bias: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    gate_up: torch.Tensor,
    activation: str,  # activation_as_text of a GatedActivation
    interleaved: bool,
    needs: list[bool],  # of A, W_gate_up, W_down, combine_weights, gate_up_bias, down_bias
    sentinels: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``moe_experts_backward`` as the custom op ``helion_moe::moe_experts_backward``: the six
    gradients, an empty tensor for each one not asked for.

    Taught in notebook 10.
    """
    args = (grad_out, A, W_gate_up, W_down, expert_ids, combine_weights, gate_up)
    options = (activation_from_text(activation), tuple(needs), sentinels)
    grads = moe_experts_backward(*args, *options, gate_up_bias, down_bias, interleaved)
    return tuple(A.new_empty(0) if grad is None else grad for grad in grads)


@moe_experts_backward_op.register_fake
def _moe_experts_backward_shapes(grad_out, A, W_gate_up, W_down, ids, combine_weights, *rest):
    gate_up_bias, down_bias, needs = rest[0], rest[1], rest[-2]
    inputs = (A, W_gate_up, W_down, combine_weights, gate_up_bias, down_bias)
    return tuple(
        A.new_empty(0) if x is None or not need else x.new_empty(x.shape)
        for x, need in zip(inputs, needs, strict=True)
    )


def _save_moe_experts_inputs(ctx, inputs, output):
    A, W_gate_up, W_down, expert_ids, combine_weights, gate_up_bias, down_bias = inputs[:7]
    activation, interleaved, _, check, _ = inputs[7:]
    tensors = (A, W_gate_up, W_down, expert_ids, combine_weights, gate_up_bias, down_bias)
    ctx.save_for_backward(*tensors, output[1])
    ctx.activation, ctx.interleaved = activation, interleaved
    ctx.sentinels = check == "sentinels"


def _moe_experts_grads(ctx, grad_out, _grad_gate_up):
    A, W_gate_up, W_down, expert_ids, combine_weights, *biases, gate_up = ctx.saved_tensors
    needs = [ctx.needs_input_grad[i] for i in (0, 1, 2, 4, 5, 6)]
    args = (grad_out, A, W_gate_up, W_down, expert_ids, combine_weights, *biases, gate_up)
    grads = moe_experts_backward_op(*args, ctx.activation, ctx.interleaved, needs, ctx.sentinels)
    dA, dW_gate_up, dW_down, d_weights, d_gate_up_bias, d_down_bias = (
        g if n else None for g, n in zip(grads, needs, strict=True)
    )
    return (dA, dW_gate_up, dW_down, None, d_weights, d_gate_up_bias, d_down_bias) + (None,) * 5


moe_experts_op.register_autograd(_moe_experts_grads, setup_context=_save_moe_experts_inputs)
