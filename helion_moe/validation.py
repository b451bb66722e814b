"""Validation at the public entry points: clear errors that name the argument, and the check
that every expert id lies in [0, E) without making the host wait for the GPU (notebook 06).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .metadata import check_integer_ids
from .mode import DEVICE

__all__ = [
    "EXPERT_ID_CHECKS",
    "SUPPORTED_DTYPES",
    "UNPLACED_PAIRS_MESSAGE",
    "check_expert_id_check",
    "check_expert_id_range",
    "check_output_grad",
    "needs_grad",
    "runs_through_op",
    "start_expert_id_check",
    "validate_biases",
    "validate_down_weights",
    "validate_moe_inputs",
    "zero_sentinel_pairs",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def validate_moe_inputs(
    A: torch.Tensor,  # [T, K]
    W: torch.Tensor,  # [E, K, N]
    expert_ids: torch.Tensor,  # [T] or [T, k]
    combine_weights: torch.Tensor | None = None,  # expert_ids' shape
    weight_name: str = "W",  # what the caller calls W (moe_experts: "W_gate_up")
    weight_dtype: torch.dtype | None = None,  # W's dtype when it is not A's (FP8 weights)
) -> None:
    """Raise a clear error, naming the argument, for inputs the kernels cannot take.

    Raises:
        TypeError: An argument is not a tensor, a dtype is unsupported or A and W differ, or
            expert_ids is not integer, or combine_weights is not floating point.
        ValueError: A shape, device or size is out of range. (The values of expert_ids are
            checked on the device by ``start_expert_id_check``.)

    Taught in notebook 06.
    """
    named = {"A": A, weight_name: W, "expert_ids": expert_ids}
    if combine_weights is not None:
        named["combine_weights"] = combine_weights
    for name, value in named.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if A.dim() != 2:
        raise ValueError(f"A must be 2-D [T, K], got shape {tuple(A.shape)}")
    if W.dim() != 3:
        raise ValueError(f"{weight_name} must be 3-D [E, K, N], got shape {tuple(W.shape)}")
    T, K = A.shape
    E, K_w, _ = W.shape
    if K_w != K:
        raise ValueError(f"A is [T, K] with K={K} but {weight_name} is [E, K, N] with K={K_w}")
    if E == 0:
        raise ValueError(f"{weight_name} has no experts (E = 0)")
    if A.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"A has dtype {A.dtype}; supported: {SUPPORTED_DTYPES}")
    if weight_dtype is None and W.dtype != A.dtype:
        raise TypeError(f"{weight_name} has dtype {W.dtype} but A has {A.dtype}; they must match")
    if weight_dtype is not None and W.dtype != weight_dtype:
        raise TypeError(f"{weight_name} has dtype {W.dtype}; it must be {weight_dtype}")
    check_integer_ids(expert_ids)
    if expert_ids.dim() not in (1, 2) or expert_ids.shape[0] != T:
        raise ValueError(
            f"expert_ids must have shape [T] or [T, k] with T={T}, got {tuple(expert_ids.shape)}"
        )
    top_k = expert_ids.shape[1] if expert_ids.dim() == 2 else 1
    if not 1 <= top_k <= E:
        raise ValueError(f"expert_ids is [T, k] with k={top_k}; k must be in [1, E={E}]")
    if combine_weights is not None:
        if not combine_weights.dtype.is_floating_point:
            raise TypeError(
                f"combine_weights must be a floating-point tensor, got {combine_weights.dtype}"
            )
        if combine_weights.shape != expert_ids.shape:
            raise ValueError(
                f"combine_weights must have expert_ids' shape {tuple(expert_ids.shape)}, "
                f"got {tuple(combine_weights.shape)}"
            )
    for name, tensor in named.items():
        if tensor.device.type != DEVICE.type:
            raise ValueError(
                f"{name} is on {tensor.device} but the kernels run on {DEVICE.type} here"
            )
    if len({tensor.device for tensor in named.values()}) != 1:
        devices = ", ".join(f"{name} on {tensor.device}" for name, tensor in named.items())
        raise ValueError(f"{', '.join(named)} must be on one device, got {devices}")


def validate_down_weights(
    W_gate_up: torch.Tensor,  # [E, K, 2I], validated by validate_moe_inputs
    W_down: torch.Tensor,  # [E, I, N]
) -> None:
    """Raise a clear error, naming the argument, unless ``W_down`` is the down projection that
    goes with ``W_gate_up``: [E, I, N] for a gate_up of [E, K, 2I], same dtype and device.

    Taught in notebook 10.
    """
    E, _, N2 = W_gate_up.shape
    if not isinstance(W_down, torch.Tensor):
        raise TypeError(f"W_down must be a torch.Tensor, got {type(W_down).__name__}")
    if N2 % 2:
        raise ValueError(
            f"W_gate_up is [E, K, 2I] with gate columns then up columns, so its last size must "
            f"be even, got {N2}"
        )
    if W_down.dim() != 3 or W_down.shape[:2] != (E, N2 // 2):
        raise ValueError(
            f"W_down must be [E, I, N] = [{E}, {N2 // 2}, N] for W_gate_up of shape "
            f"{tuple(W_gate_up.shape)}, got {tuple(W_down.shape)}"
        )
    if W_down.dtype != W_gate_up.dtype:
        raise TypeError(f"W_down has dtype {W_down.dtype} but W_gate_up has {W_gate_up.dtype}")
    if W_down.device != W_gate_up.device:
        raise ValueError(f"W_down is on {W_down.device} but W_gate_up is on {W_gate_up.device}")


def validate_biases(
    gate_up_bias: torch.Tensor | None,  # [E, 2I]
    down_bias: torch.Tensor | None,  # [E, N]
    W_gate_up: torch.Tensor,  # [E, K, 2I], validated
    W_down: torch.Tensor,  # [E, I, N], validated
) -> None:
    """Raise a clear error, naming the argument, unless each bias given is a floating-point
    [E, 2I] (``gate_up_bias``) or [E, N] (``down_bias``) tensor on the weights' device.

    Taught in notebook 10.
    """
    E, _, N2 = W_gate_up.shape
    for name, bias, shape in (
        ("gate_up_bias", gate_up_bias, (E, N2)),
        ("down_bias", down_bias, (E, W_down.shape[2])),
    ):
        if bias is None:
            continue
        if not isinstance(bias, torch.Tensor) or not bias.dtype.is_floating_point:
            raise TypeError(
                f"{name} must be a floating-point torch.Tensor, got "
                f"{getattr(bias, 'dtype', type(bias).__name__)}"
            )
        if tuple(bias.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)}, got {list(bias.shape)}")
        if bias.device != W_gate_up.device:
            raise ValueError(f"{name} is on {bias.device} but W_gate_up is on {W_gate_up.device}")


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an op on ``tensors`` here: grad mode is on and one of them
    requires grad.

    Taught in notebook 11.
    """
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def runs_through_op(*tensors: torch.Tensor | None) -> bool:
    """Whether a public entry point calls its custom op (``helion_moe::...``) rather than the
    op's body: when autograd records the call (``needs_grad``), or when something other than
    plain eager execution sees it (torch.compile or export tracing, ``torch.jit.trace``, a
    dispatch mode such as FakeTensorMode, a functorch transform, a tensor subclass). A
    ``TorchFunctionMode`` (``torch.set_default_device`` installs one) does not count: it sees
    the body's torch calls instead of the op, with the same result. A plain eager call without
    autograd runs the body directly and skips the dispatcher's work around it (autograd's
    wrapper, the redispatch, the outputs' aliasing check): host time that a one-token decode
    step pays once per layer.

    Taught in notebook 10.
    """
    return (
        needs_grad(*tensors)
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._are_functorch_transforms_active()
        or any(t is not None and type(t) not in _PLAIN_TENSORS for t in tensors)
    )


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def check_expert_id_range(
    expert_ids: torch.Tensor,  # [T] or [T, k] integer, validated by validate_moe_inputs
    num_experts: int,
) -> None:
    """Raise a ValueError naming an expert id outside [0, E). Reads the ids' range on the
    host, so the host waits for the GPU: the per-expert kernels run it first; the flat path
    runs it only once its own check has found a pair that it could not place.

    Taught in notebook 06.
    """
    lowest, highest = torch.stack(torch.aminmax(expert_ids.flatten().long())).tolist()
    if lowest < 0 or highest >= num_experts:
        bad = lowest if lowest < 0 else highest
        raise ValueError(f"expert_ids must lie in [0, E={num_experts}), found {bad}")


EXPERT_ID_CHECKS = ("device", "host", "sentinels")


def check_expert_id_check(expert_id_check: str) -> None:
    """A ValueError naming ``expert_id_check`` unless it is one of ``EXPERT_ID_CHECKS``.

    Taught in notebook 06.
    """
    if expert_id_check not in EXPERT_ID_CHECKS:
        raise ValueError(
            f"expert_id_check must be one of {EXPERT_ID_CHECKS}, got {expert_id_check!r}"
        )


# What a failed device-side check says (in the CUDA error's device log).
UNPLACED_PAIRS_MESSAGE = "moe_matmul: expert_ids holds an id outside [0, E)"


def start_expert_id_check(
    all_placed: torch.Tensor,  # 1 element, nonzero when every pair was placed
    expert_ids: torch.Tensor,  # [T] or [T, k] integer, validated by validate_moe_inputs
    num_experts: int,
    mode: str,
) -> Callable[[], None]:
    """Check that the kernels placed every pair, which they do unless an expert id lies
    outside [0, E). The kernels skip such a pair, so nothing reads outside a tensor; the
    check makes sure the caller never takes the result as valid.

    - ``"device"`` (the default): on a GPU a device-side assertion, as PyTorch's own indexing
      makes; nothing waits, and a bad id fails the next CUDA call with "device-side assert
      triggered", after which the process must restart. It is also the check a CUDA graph
      replays.
    - ``"host"``: the flag is copied to pinned host memory behind a CUDA event; the returned
      function, called once the caller has issued its work, waits for that event only and
      raises a ValueError naming the bad id. The process lives on, but every call waits for its
      metadata, so the host can no longer run ahead of the GPU.

    - ``"sentinels"``: no check. An id outside [0, E) marks a pair that another rank computes
      (transformers' expert parallelism gives it the id E and a weight of zero); the kernels
      skip it and the sum over each token's pairs leaves it out (``sum_over_experts``), or the
      per-pair kernel stores a zero row, and its weight's gradient is zeroed
      (``zero_sentinel_pairs``): it contributes zero to the output and to every gradient.

    On the CPU "device" and "host" raise the ValueError at once: the host holds the flag
    already. The returned function finishes the check (it does nothing unless the mode is
    "host" on a GPU).

    Taught in notebook 06.
    """
    if mode == "sentinels":
        return lambda: None
    if not all_placed.is_cuda:
        if not bool(all_placed):
            check_expert_id_range(expert_ids, num_experts)
        return lambda: None
    if mode == "device":
        torch._assert_async(all_placed, UNPLACED_PAIRS_MESSAGE)
        return lambda: None
    if torch.cuda.is_current_stream_capturing():
        raise ValueError(
            "expert_id_check='host' waits for the GPU, which a CUDA graph being captured "
            "cannot; use expert_id_check='device'"
        )
    on_host = torch.empty(all_placed.shape, dtype=all_placed.dtype, pin_memory=True)
    on_host.copy_(all_placed, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(all_placed.device))  # the stream of the copy

    def finish() -> None:
        copied.synchronize()
        if not bool(on_host):
            check_expert_id_range(expert_ids, num_experts)
            raise RuntimeError("the metadata left pairs out although every expert id is valid")

    return finish


def zero_sentinel_pairs(
    pair_rows: torch.Tensor,  # [T, k, ...] one row per (token, expert) pair
    expert_ids: torch.Tensor,  # [T, k] or [T]
    num_experts: int,
) -> torch.Tensor:  # pair_rows with the sentinel pairs' rows zero (a new tensor)
    """With ``expert_id_check="sentinels"``: the flat kernels skip a pair whose expert id lies
    outside [0, E) and leave its rows unwritten, so the backward zeroes its combine weight's
    gradient here; the sum over each token's pairs leaves out its output and input-gradient
    rows itself (``sum_over_experts``). The per-pair kernel ``moe_matmul_per_pair`` stores a
    zero row for such a pair.

    Taught in notebook 12.
    """
    ids = expert_ids.reshape(pair_rows.shape[:2])
    outside = (ids < 0) | (ids >= num_experts)
    return pair_rows.masked_fill(outside.view(*outside.shape, *[1] * (pair_rows.dim() - 2)), 0)


def check_output_grad(
    grad_out: torch.Tensor,  # [T, N] the gradient of a forward's output
    shape: tuple[int, int],  # [T, N]
    name: str,  # the forward's name in the possessive ("moe_matmul's"), for the message
) -> None:
    """Raise a clear error unless ``grad_out`` is a floating-point tensor of ``shape``.

    Taught in notebook 11.
    """
    if not isinstance(grad_out, torch.Tensor) or not grad_out.dtype.is_floating_point:
        raise TypeError(
            f"the gradient of {name} output must be a floating-point tensor, got "
            f"{getattr(grad_out, 'dtype', type(grad_out).__name__)}"
        )
    if grad_out.shape != shape:
        raise ValueError(
            f"the gradient of {name} output must have its shape [T, N] = {list(shape)}, "
            f"got {tuple(grad_out.shape)}"
        )
