"""Shared pytest fixtures. Datasets are read from ../shared/data (never committed); override with SELFEMO_DATA_DIR."""

import os
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


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: an end-to-end run (minutes); `make test-fast` skips it")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_FILES or any(part in item.name for part in SLOW_NAME_PARTS):
            item.add_marker(pytest.mark.slow)
