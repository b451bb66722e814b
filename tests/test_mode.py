"""The mode: the CPU interpreter set up before Triton loads, whichever module comes first, and
its patches."""

import moe_helpers as mh

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(mh.ON_GPU, reason="the patch exists only for the CPU interpreter")
def test_interpreter_bf16_dot_multiplies_numbers_and_casts_round_to_nearest_even():
    import triton
    import triton.language as tl

    @triton.jit
    def dot_kernel(a_ptr, b_ptr, c_ptr, c_bf16_ptr, n: tl.constexpr):
        offs = tl.arange(0, n)
        a = tl.load(a_ptr + offs[:, None] * n + offs[None, :])
        b = tl.load(b_ptr + offs[:, None] * n + offs[None, :])
        c = tl.dot(a, b)
        tl.store(c_ptr + offs[:, None] * n + offs[None, :], c)
        tl.store(c_bf16_ptr + offs[:, None] * n + offs[None, :], c.to(tl.bfloat16))

    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=g).bfloat16()
    b = torch.randn(16, 16, generator=g).bfloat16()
    c = torch.empty(16, 16)
    c_bf16 = torch.empty(16, 16, dtype=torch.bfloat16)
    dot_kernel[(1,)](a, b, c, c_bf16, 16)
    torch.testing.assert_close(c, a.float() @ b.float())
    assert torch.equal(c_bf16, c.bfloat16())  # PyTorch rounds to nearest even


def _fresh_python(script: str, **environment: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**env, **environment},
    )


@pytest.mark.skipif(mh.ON_GPU, reason="the patch exists only for the CPU interpreter")
def test_interpreter_e4m3_casts_round_to_nearest_even_and_saturate():
    import triton
    import triton.language as tl

    @triton.jit
    def cast_kernel(x_ptr, q_ptr, back_ptr, n: tl.constexpr):
        offs = tl.arange(0, n)
        q = tl.load(x_ptr + offs).to(tl.float8e4nv)
        tl.store(q_ptr + offs, q)
        tl.store(back_ptr + offs, q.to(tl.float32))

    x = torch.tensor([124.3, 127.9, 464.0, 500.0, -1000.0, 0.0175, 1.0625, 3e-3] * 2)
    q = torch.empty(16, dtype=torch.float8_e4m3fn)
    back = torch.empty(16)
    cast_kernel[(1,)](x, q, back, 16)
    expected = x.clamp(-448, 448).to(torch.float8_e4m3fn)  # 124.3 -> 128, 464 -> 448
    assert torch.equal(q.view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(back, expected.float())


@pytest.mark.skipif(mh.ON_GPU, reason="the interpreter is the CPU's mode")
def test_importing_any_module_directly_sets_the_mode_before_triton_loads():
    # the metadata kernels sum with tl.sum, which runs in the interpreter only if Triton was
    # loaded after TRITON_INTERPRET=1
    script = (
        "import helion_moe.metadata as metadata, os, torch\n"
        "ids = torch.tensor([2, 0, 2, 1, 0])\n"
        "routing = metadata.align_to_blocks(ids, 3, 16)\n"
        "expected = metadata.align_to_blocks_reference(ids, 3, 16)\n"
        "assert torch.equal(routing.sorted_pair_ids, expected.sorted_pair_ids)\n"
        "print(os.environ['TRITON_INTERPRET'])\n"
    )
    done = _fresh_python(script)
    assert done.returncode == 0 and done.stdout.strip() == "1", done.stderr[-2000:]


@pytest.mark.skipif(mh.ON_GPU, reason="the interpreter is the CPU's mode")
@pytest.mark.parametrize("module", ["moe_helpers", "helion_moe.kernels.flat"])
def test_triton_imported_first_is_refused_with_a_clear_error(module):
    done = _fresh_python(f"import triton\nimport {module}\n")
    assert done.returncode != 0
    assert "ImportError: Triton was imported before moe_helpers" in done.stderr, done.stderr
