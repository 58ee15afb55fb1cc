"""Helpers shared by the tests (importable as `helpers` because tests/ is on sys.path)."""
from __future__ import annotations

import os
import subprocess
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


def run_cli(args, cwd) -> subprocess.CompletedProcess:
    """`python cli.py ARGS` as a real process outside any torchrun job (rank variables dropped)."""
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, str(REPO_ROOT / "cli.py"), *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=env)


def assert_one_line_usage_error(result, words) -> None:
    """Exit 2, exactly one non-empty stderr line holding every word, and no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for word in words:
        assert word in lines[0], lines[0]
