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
