"""The mode: kernels compiled for a CUDA GPU, or run by Triton's CPU interpreter (notebook 00).

On a machine without CUDA this module sets ``TRITON_INTERPRET=1`` before Triton is imported, so
every kernel of the course runs on a laptop, slowly and at small sizes, and it mends three gaps
of the interpreter (bfloat16 arithmetic, rounding to e4m3, loop bounds under NumPy 2.4). The
package imports it first (``helion_moe/__init__.py``), so importing any of its modules, directly
or through ``moe_helpers``, sets the mode before Triton loads. ``ON_GPU`` tells notebooks which
mode they are in; ``DEVICE`` is where their tensors go.
"""

from __future__ import annotations

import os
import sys

import torch

__all__ = ["DEVICE", "ON_GPU"]

ON_GPU: bool = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

# Before Triton loads: its library functions written in Triton (tl.sum, tl.cdiv...) run in the
# interpreter only if the variable is set when they are defined, at Triton's import.
if not ON_GPU:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise ImportError(
            "Triton was imported before moe_helpers (or a helion_moe module) on a machine "
            "without a GPU, so its CPU interpreter cannot run reductions; import moe_helpers "
            "first, or set TRITON_INTERPRET=1 before starting Python"
        )
    os.environ["TRITON_INTERPRET"] = "1"


def _patch_interpreter_bfloat16() -> None:
    """Make Triton's CPU interpreter handle bfloat16 as a GPU does.

    The interpreter stores bfloat16 tensors as raw ``uint16`` and has two defects with them
    (seen in Triton 3.9): ``tl.dot`` hands the raw bit patterns to ``np.matmul``, returning
    values near 1e10 (triton-lang/triton#11584), and a cast to bfloat16 truncates the mantissa
    where a GPU rounds to nearest even, doubling the rounding error. Both conversions are done
    here by PyTorch, whose bfloat16 conversions are exact (widening) and round to nearest even.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    def bits_to_float32(bits: np.ndarray) -> np.ndarray:
        return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()

    def float_to_bits(values: np.ndarray) -> np.ndarray:
        as_bf16 = torch.from_numpy(np.array(values)).to(torch.bfloat16)
        return as_bf16.view(torch.int16).numpy().view(np.uint16)

    def widen(operand: interpreter.TensorHandle) -> interpreter.TensorHandle:
        if operand.dtype != tl.bfloat16:
            return operand
        return interpreter.TensorHandle(bits_to_float32(operand.data), tl.float32)

    create_dot = interpreter.InterpreterBuilder.create_dot

    def create_dot_bf16(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    cast_impl = interpreter.InterpreterBuilder.cast_impl

    def cast_impl_bf16(self, src, dst_type):
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar in (tl.float32, tl.float64):
            return interpreter.TensorHandle(float_to_bits(src.data), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    interpreter.InterpreterBuilder.create_dot = create_dot_bf16
    interpreter.InterpreterBuilder.cast_impl = cast_impl_bf16


def _patch_interpreter_float8() -> None:
    """Make Triton's CPU interpreter round to e4m3 as a GPU does.

    The interpreter narrows a float to ``float8e4nv`` (PyTorch's ``float8_e4m3fn``) by cutting
    the mantissa's low bits, and a mantissa that rounds up into the next power of two comes out
    halved (seen in Triton 3.9: 124.3 became 64 where a GPU gives 128). A GPU rounds to nearest
    even and saturates at +-448 (``cvt.rn.satfinite``); here PyTorch does the rounding, after
    the same clamp. Widening e4m3 is exact in the interpreter but for NaN, whose code it reads
    as 480; here PyTorch widens e4m3 in ``tl.dot`` and in casts to float32 (the kernels' two
    uses), NaN included, so a NaN in the activations reaches the output as on a GPU.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    def e4m3_as_float32(operand: interpreter.TensorHandle) -> interpreter.TensorHandle:
        if operand.dtype.scalar != tl.float8e4nv:
            return operand
        values = torch.from_numpy(operand.data.view(np.uint8)).view(torch.float8_e4m3fn)
        return interpreter.TensorHandle(values.float().numpy(), tl.float32)

    create_dot = interpreter.InterpreterBuilder.create_dot

    def create_dot_e4m3(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = e4m3_as_float32(a), e4m3_as_float32(b)
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_fp_to_fp = interpreter.InterpreterBuilder.create_fp_to_fp

    def create_fp_to_fp_e4m3(self, src, dst_type, rounding_mode):
        source = src.dtype.scalar
        if source == tl.float8e4nv and dst_type.scalar == tl.float32:
            return e4m3_as_float32(src)
        if dst_type.scalar != tl.float8e4nv or source not in (tl.float32, tl.float16, tl.bfloat16):
            return create_fp_to_fp(self, src, dst_type, rounding_mode)
        if source == tl.bfloat16:  # held as raw uint16 bits
            values = torch.from_numpy(src.data.view(np.int16)).view(torch.bfloat16).float()
        else:
            values = torch.from_numpy(np.asarray(src.data, dtype=np.float32))
        as_e4m3 = values.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        return interpreter.TensorHandle(as_e4m3, tl.float8e4nv)

    interpreter.InterpreterBuilder.create_fp_to_fp = create_fp_to_fp_e4m3
    interpreter.InterpreterBuilder.create_dot = create_dot_e4m3


def _patch_interpreter_loop_bounds() -> None:
    """Let Triton's CPU interpreter run loops whose bound is a kernel argument.

    The interpreter holds a scalar as a one-element array and turns it into a Python int for
    ``range`` with ``int(array)``. NumPy 2.4 refuses that for arrays of one dimension
    ("only 0-dimensional arrays can be converted to Python scalars"); Triton 3.9 converts
    ``array.squeeze()`` instead, Triton 3.6 (the GPU machine's, whose CPU worlds in notebook 12
    use the interpreter) does not. This applies Triton 3.9's conversion to any version.
    """
    from triton.runtime import interpreter

    patch_lang_tensor = interpreter._patch_lang_tensor

    def patch_lang_tensor_squeezed(tensor, scope):
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor_squeezed


if not ON_GPU:
    _patch_interpreter_bfloat16()
    _patch_interpreter_float8()
    _patch_interpreter_loop_bounds()
