"""The package behind ``moe_helpers``: the facade, each module's exports and imports, the mode."""

import helion_moe
import moe_helpers as mh

import ast
import importlib
import inspect
import json
import pkgutil
import re
from pathlib import Path

import helion

ROOT = Path(__file__).resolve().parents[1]
MODULES = {
    info.name: importlib.import_module(info.name)
    for info in pkgutil.walk_packages(helion_moe.__path__, "helion_moe.")
    if not info.ispkg
}
# The steps of the data's path, in order, as the package's docstring draws them
PATH = re.search(r"\n\n((?:    .*\n)+)", helion_moe.__doc__).group(1).replace("->", " ").split()
ON_TOP = {"benchmarks", "plots", "explorers", "cli"}  # the library below never imports these


def _step(module_name: str) -> str:
    """The step of the data's path that a module belongs to: its first name in the package."""
    return module_name.split(".")[1]


def _relative_file(module) -> str:
    return Path(module.__file__).relative_to(ROOT).as_posix()


def _names_the_course_uses() -> dict[str, set[str]]:
    """Every name the notebooks' code cells, the tests and the probes read from ``mh``, by file."""
    uses = {}
    for path in sorted(ROOT.glob("notebooks/*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        uses[path.name] = set(re.findall(r"\bmh\.(\w+)", code))
    for path in sorted([*ROOT.glob("tests/*.py"), *ROOT.glob("probes/*.py")]):
        uses[path.name] = set(re.findall(r"\bmh\.(\w+)", path.read_text()))
    return uses


def test_every_name_the_notebooks_tests_and_probes_use_resolves():
    uses = _names_the_course_uses()
    speed_probes = ("probe_common.py", "metadata_probe.py", "matmul_probe.py", "layer_probe.py")
    speed_probes += ("backward_probe.py", "backward_kernels_probe.py")
    assert all(uses[file] for file in speed_probes)  # each file there, each reading mh
    probe_names = set().union(*(uses[file] for file in speed_probes))
    assert len(uses["07_flat_kernel.ipynb"]) > 15 and len(probe_names) > 20
    missing = {file: sorted(n for n in names if not hasattr(mh, n)) for file, names in uses.items()}
    assert not any(missing.values()), {file: names for file, names in missing.items() if names}


def test_each_module_exports_exactly_its_public_definitions():
    for name, module in MODULES.items():
        assert hasattr(module, "__all__"), f"{name} has no __all__"
        tree = ast.parse(Path(module.__file__).read_text())
        defined = set()
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                defined.add(node.name)
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                defined |= {t.id for t in targets if isinstance(t, ast.Name)}
        public = {n for n in defined if not n.startswith("_")} - {"__all__"}
        assert set(module.__all__) == public, name


def test_the_facade_reexports_every_module_and_maps_each_name_to_its_file():
    files = {}  # file -> names, as the facade's docstring lists them
    for line in mh.__doc__.splitlines():
        if line.startswith("helion_moe/"):
            file, names = line.split(": ", 1)
            files[file] = names
        elif line.startswith("    ") and files:
            files[file] += " " + line.strip()
    mapped = {file: {n.strip() for n in names.split(",")} for file, names in files.items()}
    exported = {_relative_file(m): set(m.__all__) for m in MODULES.values() if m.__all__}
    assert mapped == exported
    owners = {}
    for module in MODULES.values():
        for name in module.__all__:
            assert name not in owners, f"{name} is exported by {owners.get(name)} and {module}"
            owners[name] = module.__name__
            assert getattr(mh, name) is getattr(module, name), name
    public = {n for n in dir(mh) if not n.startswith("_")}
    assert public == set(owners), public ^ set(owners)  # nothing else: no np, pd, json...
    assert len(Path(mh.__file__).read_text().splitlines()) < 160  # a map, not code


def _imports(module) -> set[str]:
    """The package's modules that ``module`` imports, read from its source."""
    tree = ast.parse(Path(module.__file__).read_text())
    package = module.__name__.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            for alias in node.names:
                child = f"{target}.{alias.name}"
                found.add(child if child in MODULES else target)
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names = (
                [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            )
            found |= {n for n in names if n and n.startswith("helion_moe")}
    return found


def test_imports_go_one_way_down_the_datas_path():
    assert set(PATH) == {_step(name) for name in MODULES}, PATH
    rank = {step: i for i, step in enumerate(PATH)}
    graph = {name: _imports(module) for name, module in MODULES.items()}
    assert graph["helion_moe.layer"] >= {"helion_moe.matmul", "helion_moe.kernels.flat"}
    for name, targets in graph.items():
        assert targets <= set(MODULES), (name, targets - set(MODULES))
        for target in targets:
            if _step(target) != _step(name):
                assert rank[_step(target)] < rank[_step(name)], f"{name} imports {target}"
        if _step(name) not in ON_TOP:
            assert not {_step(t) for t in targets} & ON_TOP, name
    # no cycle inside a step either (kernels/, benchmarks/, plots/): a topological order exists
    done: set[str] = set()
    while len(done) < len(graph):
        ready = [name for name in graph if name not in done and graph[name] <= done]
        assert ready, f"a cycle among {sorted(set(graph) - done)}"
        done |= set(ready)


NOTEBOOKS = {path.name[:2] for path in ROOT.glob("notebooks/*.ipynb")}


def test_every_public_function_names_the_notebook_that_teaches_it():
    for name, module in MODULES.items():
        for export in module.__all__:
            obj = getattr(module, export)
            fn = obj.fn if isinstance(obj, helion.Kernel) else obj
            if not (inspect.isfunction(fn) or inspect.isclass(fn)):
                continue  # a constant
            # a function that a notebook prints whole carries its pointer in a comment above it
            text = (fn.__doc__ or "") + (inspect.getcomments(fn) or "")
            pointers = re.findall(r"[Tt]aught in notebook (\d\d)", text)
            assert pointers, f"{name}.{export} names no notebook"
            assert set(pointers) <= NOTEBOOKS, (export, pointers)
