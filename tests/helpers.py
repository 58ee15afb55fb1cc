"""Helpers shared by the tests (importable as `helpers` because tests/ is on sys.path)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def golden_dir() -> Path:
    """`$WANENGINE_GOLDEN`, else `../shared/golden` beside the repository."""
    return Path(os.environ.get("WANENGINE_GOLDEN", REPO_ROOT.parent / "shared" / "golden"))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b|, the golden README's relative error."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
