"""The code of the MoE course, one module per step of the data's path.

    mode -> routing -> sorting -> launch -> metadata -> kernels -> configs -> validation
    -> decode_graphs -> matmul -> layer -> fp8 -> references -> checks -> exercises
    -> transformers_backend -> expert_parallel -> benchmarks -> plots -> explorers -> cli

The entry points are ``matmul`` and ``layer``, and ``fp8`` for FP8 expert weights;
``transformers_backend`` and ``expert_parallel`` carry the layer into other libraries. Each module
imports only from the modules before it; benchmarks, plots and explorers sit on top of the library,
and nothing in the library imports them. ``moe_helpers.py``, beside this folder, re-exports every
module's public names (its ``__all__``) for the notebooks.

Importing this package, or any module in it, first imports ``mode``: on a machine without a
GPU it sets ``TRITON_INTERPRET=1`` before Triton loads, so the kernels run in Triton's CPU
interpreter.
"""

from . import mode  # noqa: F401 (first, always: the mode is set before Triton loads)
