"""Eager decode at the cost of a few launches: a ``moe_experts`` or ``moe_matmul`` call that the
host would pace (decode-sized: at most ``REPLAY_MAX_TOKENS`` tokens), captured in a CUDA graph the
first time its shapes come and replayed after, so that one call costs the host three input
copies, a replay and an output copy, whatever the layer launches.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator

import torch

from .configs import capturing_cuda_graph

__all__ = [
    "MAX_DECODE_GRAPHS",
    "REPLAY_MAX_TOKENS",
    "decode_replay",
    "host_paced",
    "replay_enabled",
    "replayed_call",
]

# Graphs kept, the least recently used dropped past this: a model's MoE layers times the batch
# sizes its decode steps take (48 layers x 5 sizes of moe_experts calls; a model that calls
# moe_matmul for both GEMMs of a layer needs two graphs per layer and size).
MAX_DECODE_GRAPHS = 256

# The largest decode batch replayed: a call of more tokens runs as it is (at prefill sizes the
# GPU's time exceeds the host's, and each new token count would capture a graph of its own).
REPLAY_MAX_TOKENS = 64

_REPLAY = [True]  # whether decode-sized eager calls are replayed (``decode_replay``)
_GRAPHS: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()
_POOL: list = []  # one memory pool that every graph shares (they replay one at a time)


@contextlib.contextmanager
def decode_replay(enabled: bool) -> Iterator[None]:
    """Within the block, decode-sized eager calls of ``moe_experts`` and ``moe_matmul`` are
    replayed from CUDA graphs (``enabled``, the default outside any block) or launch their
    kernels one by one.

    Taught in notebook 16.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    before = _REPLAY[0]
    _REPLAY[0] = enabled
    try:
        yield
    finally:
        _REPLAY[0] = before


def replay_enabled() -> bool:
    """Whether decode-sized eager calls are replayed here (``decode_replay``).

    Taught in notebook 16.
    """
    return _REPLAY[0]


def host_paced(A: torch.Tensor, W: torch.Tensor, expert_id_check: str) -> bool:
    """Whether an eager call of ``moe_experts`` or ``moe_matmul`` on a GPU (input ``A``, the
    weights ``W`` it reads last, [E, K, N]) is decode-sized (at most ``REPLAY_MAX_TOKENS``
    tokens), where the host's launches set its pace, and can be replayed from a CUDA graph: not
    while one is captured, not with the "host" id check, which waits, and not inside
    ``decode_replay(False)``.

    Taught in notebook 16.
    """
    if not A.is_cuda or expert_id_check == "host" or 0 in A.shape or 0 in W.shape[1:]:
        return False
    few_tokens = A.shape[0] <= REPLAY_MAX_TOKENS
    return few_tokens and replay_enabled() and not capturing_cuda_graph()


def replayed_call(
    fn: Callable[..., torch.Tensor],  # fn(*inputs) -> a new tensor
    inputs: tuple[torch.Tensor | None, ...],  # copied into the graph's own tensors at each call
    fixed: tuple[torch.Tensor | None, ...],  # tensors fn reads in place (weights): their address
    options: tuple,  # everything else fn depends on, hashable
) -> torch.Tensor:
    """``fn(*inputs)``, replayed from a CUDA graph captured at the first call with the same key:
    the inputs' shapes, strides and dtypes, the fixed tensors' addresses and layouts (a graph
    reads them where they were), ``options`` and whether inference mode is on. The inputs are
    copied into the graph's own tensors, and the result is a copy of the graph's output, which
    the next replay overwrites. A fixed tensor changed in place is read as it is then.

    Taught in notebook 16.
    """

    def layout(t: torch.Tensor | None) -> tuple | None:
        return None if t is None else (t.shape, t.stride(), t.dtype, t.device)

    key = (
        tuple(layout(t) for t in inputs),
        tuple(None if t is None else (t.data_ptr(), *layout(t)) for t in fixed),
        options,
        torch.is_inference_mode_enabled(),  # a graph's own inputs are inference tensors then
    )
    entry = _GRAPHS.get(key)
    if entry is None:
        entry = _GRAPHS[key] = _capture(fn, inputs)
        if len(_GRAPHS) > MAX_DECODE_GRAPHS:
            _GRAPHS.popitem(last=False)
    else:
        _GRAPHS.move_to_end(key)
    graph, static, output = entry
    for own, given in zip(static, inputs, strict=True):
        if given is not None:
            own.copy_(given)
    graph.replay()
    return output.clone()


def _capture(
    fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor | None, ...]
) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor | None, ...], torch.Tensor]:
    """The graph of ``fn`` on copies of ``inputs``, after a warm-up call on a side stream (which
    compiles the kernels outside the capture, as PyTorch asks), with those copies and its
    output."""
    static = tuple(None if t is None else t.clone() for t in inputs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    if not _POOL:
        _POOL.append(torch.cuda.graph_pool_handle())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=_POOL[0]):
        output = fn(*static)
    return graph, static, output
