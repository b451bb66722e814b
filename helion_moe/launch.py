"""What every kernel launch shares: how a Helion kernel is declared, keyed and run with an
explicit config, the type of its offsets, the weights as it reads them, and its generated code.

A kernel run without a config would autotune on its first call (minutes, and a GPU), so the
course always passes one (notebooks 04 and 09).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable

import helion
import torch

__all__ = [
    "INT32_MAX",
    "MAX_LAUNCHERS",
    "expert_weights_in_place",
    "kernel_index_dtype",
    "kernel_with_config",
    "run_kernel",
    "sizes_of_one",
    "triton_code",
]


def sizes_of_one(*args: object) -> tuple[object, ...]:
    """Extra cache key for a Helion kernel: which dimensions of its tensor arguments are 1, and
    the values of its other arguments (the ``hl.constexpr`` ones, such as the weights' layout).

    With ``static_shapes=False``, Helion 1.4 may compile a size of 1 in as a constant (the flat
    kernel compiled for E = 1 compares expert ids with 1) but leaves it out of its cache key, so
    a kernel first compiled for E = 1 would be reused, wrongly, for E = 8. Keying on the sizes
    of 1 compiles one kernel per pattern of them.

    Taught in notebook 02.
    """
    return tuple(
        tuple(size == 1 for size in arg.shape) if isinstance(arg, torch.Tensor) else arg
        for arg in args
    )


def run_kernel(
    kernel: helion.Kernel,
    args: tuple[torch.Tensor, ...],
    config: helion.Config,
    index_dtype: torch.dtype = torch.int32,
) -> torch.Tensor:
    """Run a Helion kernel with an explicit config (compiled once per config, then cached).

    Without a config Helion would autotune on the first call, which needs a GPU and minutes.
    ``index_dtype`` is the type of the kernel's element offsets (``kernel_index_dtype``).

    A call whose arguments have the key of an earlier call (``_arguments_key``: same dtypes,
    shapes, strides, devices and constants) goes straight to the function Helion compiled
    then, past Helion's per-call dispatch, which rebuilds its full key from the arguments
    whenever one of them is a tuple (the gated kernels' activation). The last
    ``MAX_LAUNCHERS`` keys are kept; ``kernel_with_config.cache_clear()`` makes every kernel
    compile again.

    Taught in notebook 04.
    """
    declared = kernel_with_config(kernel, config, index_dtype)
    key = (declared, _arguments_key(args))
    launcher = _LAUNCHERS.get(key)
    if launcher is None:
        launcher = _LAUNCHERS[key] = _compiled_launcher(declared, args, config)
        if len(_LAUNCHERS) > MAX_LAUNCHERS:
            _LAUNCHERS.popitem(last=False)  # the least recently used
    else:
        _LAUNCHERS.move_to_end(key)
    return launcher(*args)


def _arguments_key(args: tuple[object, ...]) -> tuple[object, ...]:
    """What a compiled kernel may depend on in its arguments (tensors, and constants: numbers,
    strings, None or tuples of them): each tensor's dtype, shape, strides and device, and
    each constant's type and value (True == 1, but a kernel may compile differently for
    them). Helion's own key is coarser (past ``sizes_of_one``, sizes are not in it), and
    Triton specializes on the tensors' addresses (their alignment) at every launch, so
    arguments with one key can share one compiled function."""
    return tuple(
        (arg.dtype, arg.shape, arg.stride(), arg.device)
        if isinstance(arg, torch.Tensor)
        else (type(arg), arg)
        for arg in args
    )


# Compiled functions by (kernel, arguments' key), about one per token count a model has seen:
# past this many, the least recently used goes.
MAX_LAUNCHERS = 4096
_LAUNCHERS: collections.OrderedDict[tuple, Callable[..., torch.Tensor]] = collections.OrderedDict()


def _compiled_launcher(
    kernel: helion.Kernel, args: tuple[object, ...], config: helion.Config
) -> Callable[..., torch.Tensor]:
    """The Python function Helion generates for ``kernel`` at ``config`` and arguments like
    ``args``, which allocates the outputs and launches the Triton kernel; compiled here.

    The tensors are bound detached: Helion, compiling a kernel for new arguments, also reads
    an argument's ``.grad`` and fails on it (a weight after a training step, for example).
    Later calls pass them as they are: the function only reads their storage and allocates
    fresh outputs."""
    args = tuple(arg.detach() if isinstance(arg, torch.Tensor) else arg for arg in args)
    return kernel.bind(args).compile_config(config)


@functools.cache
def kernel_with_config(
    kernel: helion.Kernel, config: helion.Config, index_dtype: torch.dtype = torch.int32
) -> helion.Kernel:
    """``kernel`` declared again with ``config`` as its only config and ``index_dtype`` as
    its offsets' type, once per config; ``key=sizes_of_one`` as for the flat kernel, which
    all kernels need.

    Taught in notebook 07.
    """
    settings = dataclasses.replace(kernel.settings, index_dtype=index_dtype)
    return helion.kernel(kernel.fn, config=config, settings=settings, key=sizes_of_one)


def triton_code(
    kernel: helion.Kernel, args: tuple[torch.Tensor, ...], config: helion.Config
) -> str:
    """The Triton code Helion generates for ``kernel`` at ``config``, without its
    ``# src[...]`` comments that repeat the Helion source line by line.

    Taught in notebook 04.
    """
    code = kernel.bind(args).to_triton_code(config)
    return "\n".join(line for line in code.splitlines() if not line.lstrip().startswith("# src["))


def expert_weights_in_place(
    W: torch.Tensor,  # [E, K, N]: a contiguous tensor, or a transposed view of an [E, N, K] one
) -> tuple[torch.Tensor, bool]:  # (the tensor the kernels read, whether it is [E, N, K])
    """The expert weights as the flat and per-pair kernels read them, without a copy.

    The course writes expert weights [E, K, N], inputs by outputs; nn.Linear and transformers
    store them [E, N, K], outputs by inputs, and ``W_nk.transpose(1, 2)`` is that tensor as an
    [E, K, N] view. The kernels take both: they read [E, N, K] storage through the flag
    ``nk_layout``. Weights in any other layout (a slice with gaps, say) are copied once to
    [E, K, N], as ``torch.reshape`` would.

    Taught in notebook 10.
    """
    as_nk = W.transpose(1, 2)
    if as_nk.is_contiguous() and not W.is_contiguous():
        return as_nk, True
    return W.contiguous(), False


INT32_MAX = torch.iinfo(torch.int32).max


def _largest_offset(tensor: torch.Tensor) -> int:
    """Largest element offset a kernel computes into ``tensor``: sum of (size - 1) * stride."""
    if tensor.numel() == 0:
        return 0
    return sum(
        (size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
    )


def kernel_index_dtype(
    A: torch.Tensor,  # [T, K]
    W: torch.Tensor,  # [E, K, N]
    num_pairs: int,
) -> torch.dtype:
    """The type of a kernel's element offsets: int32 while every offset into A, W and the
    [P, N] output fits it (cheaper address arithmetic), else int64.

    Helion picks int64 by itself only for an input of more than 2**31 - 1 elements (and refuses
    int32 for one, although an input of exactly 2**31 elements has every offset in int32's
    range); the output is allocated inside the kernel and a view's strides can reach past its
    element count, so the largest offset is computed here. DeepSeek-V3's experts' gate_up
    weights, [256, 7168, 4096], have 7.5e9 elements.

    Taught in notebook 07.
    """
    largest = max(_largest_offset(A), _largest_offset(W), num_pairs * W.shape[2] - 1)
    too_large_for_helion = max(A.numel(), W.numel()) > INT32_MAX
    return torch.int64 if largest > INT32_MAX or too_large_for_helion else torch.int32
