"""What the CLI says about a step cache: the preflight check of a mag table against the run's
step count (before any weight is read) and the line printed under the stage table.
No torch import."""
from __future__ import annotations

from typing import Any, Dict

from .table import load_table


def check_cache_table(cfg: Any, steps: int) -> None:
    """With `--step-cache mag`: the table must load and be recorded for `steps` steps (ConfigError)."""
    if cfg.step_cache == "mag" and cfg.cache_table:
        load_table(cfg.cache_table).check_steps(steps)


def cache_summary(report: Dict[str, Any]) -> str:
    """`step cache (first-block, threshold 0.1): 12 of 40 steps skipped (30.0%): 3, 5, ...` (1-based)."""
    skipped = report["skipped_steps"]
    listed = ", ".join(str(s + 1) for s in skipped)
    return (f"step cache ({report['policy']}, threshold {report['threshold']:g}): {len(skipped)} of "
            f"{report['steps']} steps skipped ({100 * report['skipped_fraction']:.1f}%)"
            + (f": steps {listed}" if skipped else ""))
