"""Timing on the GPU and the roofs (notebooks 05, 07 and 14): the median of
``triton.testing.do_bench``, host and GPU time per call, CUDA-graph replays, the copy and dense
matmul roofs measured in the same run, and the roofline they set.

The harnesses call these through the module (``timing.time_ms``), so that a test on the CPU can
replace them in one place.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
import triton.testing

from ..mode import DEVICE

__all__ = [
    "copy_bandwidth_gbps",
    "cuda_graph_replay",
    "dense_matmul_tflops",
    "host_and_gpu_us",
    "machine_info",
    "roofline",
    "time_ms",
]


def time_ms(fn: Callable[[], object], slow_ms: float = 40.0) -> float:
    """Median time of one call of ``fn`` on the GPU, in milliseconds.

    ``triton.testing.do_bench`` (CUDA events, L2 flushed before each call, warm-up first, 200
    ms of repetitions: at least 5) for calls under ``slow_ms``. A slower call (the untuned seed
    kernel takes seconds) is timed as the median of three calls, each between CUDA events,
    after one warm-up.

    Taught in notebook 05.
    """
    fn()  # compile and warm up
    torch.cuda.synchronize()

    def one_call_ms() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    first = one_call_ms()
    if first > slow_ms:
        return sorted([first, one_call_ms(), one_call_ms()])[1]
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def host_and_gpu_us(
    fn: Callable[[], object], calls: int = 20, repeats: int = 5
) -> tuple[float, float]:
    """Microseconds per call of ``fn`` on the host (issuing it) and on the GPU (running it).

    The GPU first sleeps long enough for the host to queue all ``calls`` calls behind the
    sleep, so the events around them time the GPU's work alone, without the gaps a slower host
    would leave; the host's clock times the issuing. A call that waits for the GPU (a host
    synchronisation) waits out the sleep too, which the host time then shows. The inputs stay
    the same from call to call, so data that fits in L2 stays there. Each is the median over
    ``repeats`` such batches, so that one pause of the host (another process, a garbage
    collection) does not set it.

    Taught in notebook 14.
    """
    fn()  # compile and warm up
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    guess_us = (time.perf_counter() - start) * 1e6
    host, gpu = [], []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(2 * calls * guess_us * 2000) + 1_000_000)  # about 2 GHz cycles
        begin.record()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        host.append((time.perf_counter() - start) * 1e6 / calls)
        end.record()
        end.synchronize()
        gpu.append(begin.elapsed_time(end) * 1e3 / calls)
    return float(np.median(host)), float(np.median(gpu))


def cuda_graph_replay(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``fn`` captured once in a CUDA graph (after a warm-up call on a side stream, as PyTorch
    asks); the returned function replays it, launching all of ``fn``'s kernels at the cost of
    one launch, and returns the graph's output tensor. The graph keeps ``fn``'s inputs: it
    reruns the same computation on whatever those tensors hold when it is replayed.

    Taught in notebook 07.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def machine_info() -> dict[str, object]:
    """The card, its SM count and the versions, recorded with every benchmark result (on a
    machine without a GPU the card is "CPU" and its SMs 0: the interpreter's numbers).

    Taught in notebook 05.
    """
    card, sms = "CPU", 0
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        card, sms = properties.name, properties.multi_processor_count
    return {
        "date": datetime.date.today().isoformat(),
        "card": card,
        "sms": sms,
        "torch": torch.__version__,
        "triton": importlib.metadata.version("triton"),
        "helion": importlib.metadata.version("helion"),
        "python": platform.python_version(),
    }


def copy_bandwidth_gbps(size_bytes: int = 2**32) -> float:
    """Memory roof: a device-to-device copy of ``size_bytes``, counting bytes read + written.

    Taught in notebook 05.
    """
    source = torch.empty(size_bytes, dtype=torch.uint8, device=DEVICE).random_()
    target = torch.empty_like(source)
    return 2 * size_bytes / time_ms(lambda: target.copy_(source)) / 1e6


def dense_matmul_tflops(size: int = 8192) -> float:
    """Compute roof: a dense bf16 ``size``-cubed matmul on this GPU.

    Taught in notebook 14.
    """
    a = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
    return 2 * size**3 / time_ms(lambda: a @ b) / 1e9


def roofline(
    results: pd.DataFrame,  # rows with flops, bytes, and the roofs of their run
) -> pd.DataFrame:  # columns ms, memory_bound; the rows' index
    """The least time each row's work can take on the roofs measured in its run
    (``dense_tflops``, ``copy_gbps``): its flops at the dense-matmul rate or its fewest bytes at
    the copy rate, whichever takes longer (``ms``), and whether that is the bytes
    (``memory_bound``).

    Taught in notebook 14.
    """
    compute_ms = results["flops"] / results["dense_tflops"] / 1e9
    memory_ms = results["bytes"] / results["copy_gbps"] / 1e6
    return pd.DataFrame(
        {"ms": np.maximum(compute_ms, memory_ms), "memory_bound": memory_ms > compute_ms}
    )
