"""House-style wiring: core modules never import verl/ray; their docstring examples hold."""

import doctest
import importlib
import subprocess
import sys

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


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_module_imports_without_verl_or_ray(module):
    code = (
        "import sys; sys.modules['verl'] = None; sys.modules['ray'] = None\n"
        f"import {module}\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('verl', 'ray') and sys.modules[m] is not None]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("module", CORE_MODULES)
def test_docstring_examples_hold(module):
    failures, tried = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert tried > 0, f"{module} has no >>> example"
    assert failures == 0
