"""House-style wiring: core modules never import verl/ray, nor each other in a cycle; their docstring examples hold."""

import ast
import doctest
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

CORE_MODULES = [
    "selfemo_verl.labels",
    "selfemo_verl.prompts",
    "selfemo_verl.selfplay",
    "selfemo_verl.rewards",
    "selfemo_verl.advantage",
    "selfemo_verl.model_select",
    "selfemo_verl.gpu_check",
    "selfemo_verl.preflight",
    "selfemo_verl.round_inputs",
    "selfemo_verl.ray_env",
    "selfemo_verl.data.parquet",
    "selfemo_verl.data.erc_data",
    "selfemo_verl.data.erc_download",
    "selfemo_verl.data.prepare",
    "selfemo_verl.data.episode_dump",
    "selfemo_verl.data.flywheel",
    "selfemo_verl.eval.metrics",
    "selfemo_verl.eval.inputs",
    "selfemo_verl.eval.report",
    "selfemo_verl.eval.generate",
    "selfemo_verl.eval.__main__",
    "selfemo_verl.demo_report",
    "selfemo_verl.files",
    "selfemo_verl.plots",
    "selfemo_verl.experiment",
]


BLOCKED_IMPORTS = """
import importlib, sys
sys.modules["verl"] = None; sys.modules["ray"] = None      # importing either now raises ImportError
bad = {}
for module in sys.argv[1:]:
    try:
        importlib.import_module(module)
    except ImportError as err:
        bad[module] = str(err)
loaded = [m for m in sys.modules if m.split(".")[0] in ("verl", "ray") and sys.modules[m] is not None]
assert not bad and not loaded, (bad, loaded)
"""


def test_core_modules_import_without_verl_or_ray():
    # reason: one fresh interpreter for all of them (not one each: 25 start-ups cost ~50 s of `make test-fast`)
    result = subprocess.run([sys.executable, "-c", BLOCKED_IMPORTS, *CORE_MODULES], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_import_check_catches_a_module_that_imports_verl():
    result = subprocess.run([sys.executable, "-c", BLOCKED_IMPORTS, "selfemo_verl.labels", "selfemo_verl.estimator"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "selfemo_verl.estimator" in result.stderr  # reason: an adapter imports verl


@pytest.mark.parametrize("module", CORE_MODULES)
def test_docstring_examples_hold(module):
    failures, tried = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert tried > 0, f"{module} has no >>> example"
    assert failures == 0


PACKAGE = Path(__file__).resolve().parents[1] / "selfemo_verl"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Every selfemo_verl module -> the selfemo_verl modules its source imports, at the top or inside a function."""
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:  # `from pkg import module` names the module
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in paths else node.module
                            for a in node.names}
        graph[name] = {target for target in targets if target in paths and target != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_lazy_import_cycle():
    # reason: evaluate <-> eval_generate was such a cycle (one side imported the other inside a function)
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_core_modules_import_each_other_without_a_cycle():
    # Each core module also imports on its own in a fresh interpreter (test_core_module_imports_without_verl_or_ray);
    # this checks the source, so an import inside a function counts too.
    graph = _import_graph()
    assert set(CORE_MODULES) <= set(graph)  # reason: every listed module exists under that name
    core = {name: graph[name] & set(CORE_MODULES) for name in CORE_MODULES}
    cycle = _cycle(core)
    assert cycle is None, " -> ".join(cycle)
