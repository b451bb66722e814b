"""The kernel exercises' checkers accept the notebooks' answers and reject their templates.

The kernels are read from the notebooks themselves, so a template that already passes (an
exercise with nothing to do) or an answer that no longer does fails here.
"""

import moe_helpers as mh

import ast
import json
import linecache
from pathlib import Path

import helion
import helion.language as hl
import pytest
import torch

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

# checker -> (notebook, the template kernel's name); the answer is "<name>_answer"
EXERCISES = {
    "check_weighted_seed_kernel": ("04_masked_tiled_kernel", "weighted_masked_store"),
    "check_per_expert_bias_kernel": ("07_flat_kernel", "flat_with_bias"),
    "check_interleaved_gate_up_kernel": ("10_moe_layer", "gate_up_interleaved"),
    "check_weight_grad_nk_kernel": ("11_backward", "weight_grad_nk"),
    "check_rowwise_fp8_kernel": ("13_fp8_experts", "flat_rowwise_fp8"),
}


def notebook_kernel(notebook: str, name: str):
    """The kernel ``name`` defined in a code cell of the notebook, with that cell's imports and
    the notebook's usual names (the cell's other statements, such as a call to the checker, are
    not run)."""
    cells = json.loads((NOTEBOOKS / f"{notebook}.ipynb").read_text())["cells"]
    for cell in cells:
        source = "".join(cell["source"])
        if cell["cell_type"] == "code" and f"def {name}(" in source:
            tree = ast.parse(source)
            kept = (ast.Import, ast.ImportFrom, ast.FunctionDef)
            tree.body = [node for node in tree.body if isinstance(node, kept)]
            kept_source = ast.unparse(tree)
            # Helion reads a kernel's source through linecache, as it does for notebook cells
            filename = f"<{notebook} {name}>"
            lines = kept_source.splitlines(keepends=True)
            linecache.cache[filename] = (len(kept_source), None, lines, filename)
            namespace = {"helion": helion, "hl": hl, "mh": mh, "torch": torch}
            exec(compile(kept_source, filename, "exec"), namespace)
            return namespace[name]
    raise LookupError(f"{notebook} defines no kernel {name}")


@pytest.mark.parametrize("checker", EXERCISES)
def test_checker_accepts_the_answer_and_rejects_the_template(checker):
    notebook, name = EXERCISES[checker]
    check = getattr(mh, checker)
    check(notebook_kernel(notebook, f"{name}_answer"))
    with pytest.raises(AssertionError, match=f"{checker}: wrong at T="):
        check(notebook_kernel(notebook, name))
