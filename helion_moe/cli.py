"""``python moe_helpers.py``: check ``moe_matmul`` on random cases and, on a GPU, print a short
benchmark table of both prefill shapes.
"""

from __future__ import annotations

from .benchmarks.per_expert import benchmark_point
from .benchmarks.shapes import FINE_GRAINED, MIXTRAL_LIKE, benchmark_routing
from .benchmarks.timing import machine_info
from .checks import assert_moe_close, random_moe_case
from .matmul import moe_matmul
from .mode import ON_GPU

__all__ = ["main"]


def main() -> None:
    """Check the default implementation on random cases; on a GPU, print a short benchmark.

    Taught in notebook 00.
    """
    cases = 8
    for n in range(cases):
        case = random_moe_case(n)
        assert_moe_close(
            moe_matmul(case.A, case.W, case.expert_ids), case.A, case.W, case.expert_ids
        )
    print(f"check: moe_matmul matches the float64 reference on {cases} random cases")
    if not ON_GPU:
        print(
            "benchmark: skipped, no CUDA GPU here; Triton's interpreter times NumPy, not a GPU. "
            "notebooks/05_performance.ipynb plots the committed GPU results."
        )
        return
    info = machine_info()
    print(f"benchmark on {info['card']} ({info['sms']} SMs), bf16, uniform routing (seed 1):")
    print(f"{'shape':13s} {'implementation':42s} {'ms':>8s} {'TFLOP/s':>8s}")
    for shape in (MIXTRAL_LIKE, FINE_GRAINED):
        rows = benchmark_point(
            shape,
            benchmark_routing(shape, skew=0.0),
            sweep="prefill",
            skew=0.0,
            skip=("loop reference", "seed kernel, Helion default config"),
        )
        for row in rows:
            name, ms, tflops = row["implementation"], row["ms"], row["tflops"]
            print(f"{shape.name:13s} {name:42s} {ms:8.3f} {tflops:8.1f}")
