"""The package's shape: every module imports, imports never run in a cycle or back up the data flow, no module
imports another's private name, and no function outgrows a screen."""

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tnlit"

# The stages of the data flow, lowest first (docs/design.md): a module may import from its own stage or a lower one.
STAGES = [
    {"tnlit.types", "tnlit.atomic", "tnlit.checksums", "tnlit.markdown", "tnlit.provenance"},
    {"tnlit.formats"},
    {"tnlit.layers"},
    {"tnlit.tensorize", "tnlit.inference"},
    {"tnlit.slices", "tnlit.data", "tnlit.models", "tnlit.distributed", "tnlit.evaluate"},
    {"tnlit.activations"},
    {"tnlit.methods"},
    {"tnlit.analysis", "tnlit.pipeline", "tnlit.export"},
    {"tnlit.commands"},
    {"tnlit.cli", "tnlit"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def stage(module: str) -> int:
    for i, group in enumerate(STAGES):
        if any(module == g or (g != "tnlit" and module.startswith(g + ".")) for g in group):
            return i
    raise AssertionError(f"{module} belongs to no stage of STAGES: add it where it belongs in the data flow")


def imports(module: str) -> dict[str, list[str]]:
    """The tnlit modules ``module`` imports (anywhere in it, functions included), with the names it takes."""
    tree = ast.parse(MODULES[module].read_text())
    found: dict[str, list[str]] = {}
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("tnlit"):
                    found.setdefault(alias.name, [])
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package up
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            if not base.startswith("tnlit"):
                continue
            for alias in node.names:
                target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                found.setdefault(target, []).append(alias.name)
    return {t: names for t, names in found.items() if t != module}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module):
    importlib.import_module(module)


def test_imports_form_no_cycle_and_never_run_back_up_the_data_flow():
    # A module imported as tnlit.a.b runs tnlit.a's __init__ first: that is an import too.
    graph = {m: {t for t in imports(m) if t != "tnlit"} for m in MODULES}
    upward = [f"{m} -> {t}" for m, ts in graph.items() for t in ts if stage(t) > stage(m)]
    assert not upward, f"imports against the data flow: {upward}"
    done, on_path = set(), []

    def visit(m: str) -> None:
        if m in on_path:
            pytest.fail("import cycle: " + " -> ".join([*on_path[on_path.index(m) :], m]))
        if m in done:
            return
        on_path.append(m)
        for t in sorted(graph[m]):
            visit(t)
        on_path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


def test_no_module_imports_a_private_name_of_another():
    private = [
        f"{m} takes {name} from {t}"
        for m in MODULES
        for t, names in imports(m).items()
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not private, private


def test_no_function_is_longer_than_80_lines():
    long = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
                if node.end_lineno - start + 1 > 80:
                    long.append(f"{module}.{node.name}: {node.end_lineno - start + 1} lines")
    assert not long, long


def test_importing_tnlit_changes_no_global_state():
    # In a fresh process (this one has imported everything already): a logging filter on Lightning and
    # jsonargparse's docstring settings are the two that tnlit used to change at import.
    import os
    import subprocess
    import sys

    code = """
import logging, jsonargparse._optionals as o, pkgutil, importlib, tnlit
def state():
    return (len(logging.getLogger("lightning.pytorch.utilities.rank_zero").filters), dict(o._docstring_parse_options))
before = state()
for m in pkgutil.walk_packages(tnlit.__path__, "tnlit."):
    importlib.import_module(m.name)
assert state() == before, (before, state())
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
