"""Shared fixtures: the golden reference data (skipped with a clear reason when absent)."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import golden_dir


@pytest.fixture(scope="session")
def golden() -> Path:
    path = golden_dir()
    if not (path / "meta.json").is_file():
        pytest.skip(f"golden reference data not found at {path} (set WANENGINE_GOLDEN to its folder)")
    return path


@pytest.fixture(scope="session")
def golden_ckpt(golden: Path) -> Path:
    return golden / "ckpt"
