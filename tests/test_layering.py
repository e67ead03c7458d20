"""The dependency direction of DESIGN.md: the math core imports only jax/numpy (no Flax, optax,
Orbax), and the networks import nothing of the core."""

import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxdiff")
CORE = ["processes.py", "schedules.py", "parameterization.py", "losses.py", "guidance.py", "variance.py",
        "samplers"]
CORE_MODULES = {"jaxdiff.processes", "jaxdiff.schedules", "jaxdiff.parameterization", "jaxdiff.losses",
                "jaxdiff.samplers", "jaxdiff.guidance", "jaxdiff.variance"}
STDLIB_OK = {"__future__", "dataclasses", "functools", "math", "typing", "collections", "itertools"}


def _files(entry):
    path = os.path.join(PKG, entry)
    if os.path.isdir(path):
        return [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".py")]
    return [path]


def _imports(path):
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


@pytest.mark.parametrize("path", [p for e in CORE for p in _files(e)], ids=os.path.basename)
def test_math_core_imports_only_jax_and_numpy(path):
    for mod in _imports(path):
        top = mod.split(".")[0]
        if top == "jaxdiff":
            assert any(mod == m or mod.startswith(m + ".") for m in CORE_MODULES), f"{path} imports {mod}"
        else:
            assert top in {"jax", "numpy"} | STDLIB_OK, f"{path} imports {mod}"


LEAF_MODULES = {"jaxdiff.compile_options"}  # import only jax and the standard library (tested below)


@pytest.mark.parametrize("path", _files("nets"), ids=os.path.basename)
def test_nets_import_nothing_of_the_core(path):
    for mod in _imports(path):
        if mod.startswith("jaxdiff"):
            assert mod.startswith("jaxdiff.nets") or mod in LEAF_MODULES, f"{path} imports {mod}"
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            assert node.level <= 1, f"{path}: relative import out of jaxdiff.nets ({'.' * node.level}{node.module or ''})"


@pytest.mark.parametrize("mod", sorted(LEAF_MODULES))
def test_leaf_modules_import_only_jax_and_the_standard_library(mod):
    path = os.path.join(PKG, *mod.split(".")[1:]) + ".py"
    for imported in _imports(path):
        assert imported.split(".")[0] in {"jax", "jaxlib"} | STDLIB_OK | {"os", "warnings", "contextlib", "contextvars"}, \
            f"{path} imports {imported}"
