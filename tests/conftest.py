"""Shared pytest fixtures. Datasets are read from ../shared/data (never committed); override with SELFEMO_DATA_DIR."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("SELFEMO_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.fail(f"raw datasets not found at {DATA_DIR}; set SELFEMO_DATA_DIR")
    return DATA_DIR


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


# `make test-fast` (-m "not slow"): the end-to-end runs of the real verl trainer take minutes each.
# So are the recipe dry runs and CLI start-ups (8-25 s each: they compose verl's config in a fresh process).
SLOW_FILES = {"test_cpu_e2e_on_cpu.py", "test_rounds_cpu_e2e_on_cpu.py"}
SLOW_NAME_PARTS = ("dry_run", "entrypoint", "smollm2", "local_model_is_measured", "round_loop_chains")


# The vLLM lane (tests/vllm_lane/) runs in .venv-vllm (`make test-vllm`); the main lane deselects it.
VLLM_LANE = REPO / "tests" / "vllm_lane"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: an end-to-end run (minutes); `make test-fast` skips it")
    config.addinivalue_line("markers", "vllm: the vLLM lane, run in .venv-vllm by `make test-vllm`")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.is_relative_to(VLLM_LANE):
            item.add_marker(pytest.mark.vllm)
        if item.path.name in SLOW_FILES or any(part in item.name for part in SLOW_NAME_PARTS):
            item.add_marker(pytest.mark.slow)


# Facts of verl's platform layer with and without VERL_PLATFORM=cpu (tests/test_cpu_platform_on_cpu.py,
# tests/test_cpu_verl_private_on_cpu.py): process-wide state, so each is gathered once in a fresh subprocess.
_PROBE = textwrap.dedent("""
    import json, os, torch
    facts = {"wrapped_before": getattr(torch.distributed.init_process_group, "_selfemo_gloo_fix", False)}
    from verl.utils import device as d
    facts.update(device=d.get_device_name(), backend=d.get_nccl_backend(), resource=d.get_resource_name(),
                 wrapped=getattr(torch.distributed.init_process_group, "_selfemo_gloo_fix", False))
    if facts["device"] == "cpu":
        facts["device_id"] = str(d.get_device_id())
        m = d.get_torch_device()
        facts.update(dev_name=m.get_device_name(), mem=list(m.mem_get_info()), alloc=m.memory_allocated(),
                     rng=bool(torch.equal(m.get_rng_state(), torch.get_rng_state())), avail=m.is_available())
        m.empty_cache(); m.synchronize(); m.ipc_collect(); m.set_per_process_memory_fraction(0.5)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PROBE_PORT"], RANK="0", WORLD_SIZE="1")
        from verl.utils.distributed import initialize_global_process_group_ray
        initialize_global_process_group_ray()
        t = torch.ones(3); torch.distributed.all_reduce(t)
        facts.update(pg_backend=str(torch.distributed.get_backend()), all_reduce=t.tolist())
        torch.distributed.destroy_process_group()
        from verl.workers.engine.base import EngineRegistry
        import verl.workers.engine.fsdp  # registers the FSDP engines
        try:
            facts["engine_plain"] = EngineRegistry.get_engine_cls("language_model", "fsdp2").__name__
        except ValueError as e:
            facts["engine_plain"] = "ValueError"
        os.environ["VERL_ENGINE_DEVICE"] = "cuda"
        facts["engine_env"] = EngineRegistry.get_engine_cls("language_model", "fsdp2").__name__
    print("FACTS=" + json.dumps(facts))
""")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_probe(platform: str | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "VERL_ENGINE_DEVICE")}
    env.update(PROBE_PORT=str(_free_port()), VERL_LOGGING_LEVEL="ERROR")
    if platform:
        env["VERL_PLATFORM"] = platform
    return subprocess.Popen([sys.executable, "-c", _PROBE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _probe_facts(proc: subprocess.Popen) -> dict:
    stdout, stderr = proc.communicate(timeout=300)
    lines = [line for line in stdout.splitlines() if line.startswith("FACTS=")]
    assert proc.returncode == 0 and lines, stderr[-3000:]
    return json.loads(lines[-1][len("FACTS="):])


@pytest.fixture(scope="session")
def _platform_probes() -> dict:
    """Both probes at once (two interpreters importing verl: ~7 s each, in parallel on two cores)."""
    procs = {platform: _start_probe(platform) for platform in ("cpu", None)}
    return {platform: _probe_facts(proc) for platform, proc in procs.items()}


@pytest.fixture(scope="session")
def cpu_facts(_platform_probes):
    return _platform_probes["cpu"]


@pytest.fixture(scope="session")
def default_facts(_platform_probes):
    return _platform_probes[None]
