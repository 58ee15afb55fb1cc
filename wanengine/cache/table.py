"""The mag-cache table: per expert and guidance branch, the magnitude ratio of the DiT blocks'
residual at each step to the residual at the expert's previous step, recorded from a real run
by `wanengine calibrate-cache`.

JSON layout (version 1):

    {"format": "wanengine-mag-cache-table", "version": 1, "steps": 40,
     "ratios": {"high_noise_model": {"cond": [null, 0.991, ...], "uncond": [...]},
                "low_noise_model":  {"cond": [...], "uncond": [...]}},
     "info": {...how it was recorded: solver, shift, size, frames, seed, dtype...}}

Each list has one entry per step: a positive ratio, or null where that expert does not run or
has no previous step (its first step). `ratio(t) = mean over tokens of |r_t| / |r_{t-1}|`,
`|.|` the L2 norm of a token's residual over the model dim. A table is valid for its step
count only (the ratios are per step); loading checks the layout, `check_steps` the count.
No torch import.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from ..errors import InvalidArgument

FORMAT = "wanengine-mag-cache-table"
VERSION = 1
BRANCHES = ("cond", "uncond")  # slot 0 of a step's forward is the conditional branch
EXPERT_NAMES = ("high_noise_model", "low_noise_model")

Ratios = Dict[str, Dict[str, List[Optional[float]]]]


@dataclass(frozen=True)
class MagTable:
    """A loaded (or freshly recorded) table; `source` names it in error messages."""

    steps: int
    ratios: Ratios
    info: Dict[str, Any] = field(default_factory=dict)
    source: str = "mag table"

    def ratio(self, expert: str, slot: int, step: int) -> Optional[float]:
        """The ratio of `expert`'s branch `slot` (0 cond, 1 uncond) at `step`, or None."""
        if slot >= len(BRANCHES) or not 0 <= step < self.steps:
            return None
        return self.ratios.get(expert, {}).get(BRANCHES[slot], [None] * self.steps)[step]

    def check_steps(self, steps: int) -> None:
        if steps != self.steps:
            raise InvalidArgument.for_argument("cache_table", lambda words: (
                f"{self.source}: recorded for {self.steps} steps, but this run has {steps} ({words.name('steps')}); "
                f"record a table for {steps} steps with `wanengine calibrate-cache --sample-steps {steps}`"))

    def to_json(self) -> Dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "steps": self.steps, "ratios": self.ratios, "info": self.info}


def empty_ratios(steps: int) -> Ratios:
    return {expert: {branch: [None] * steps for branch in BRANCHES} for expert in EXPERT_NAMES}


def load_table(path: Union[str, "os.PathLike[str]"]) -> MagTable:
    """Read and check a table file; every problem is one InvalidArgument (`cache_table`) naming the file."""
    source = os.fspath(path)
    where = source
    if not os.path.isfile(source):
        raise InvalidArgument("cache_table", f"{where}: file not found")
    try:
        raw = json.loads(Path(source).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument("cache_table", f"{where}: not a readable JSON file: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise InvalidArgument("cache_table", f"{where}: not a mag-cache table (expected \"format\": \"{FORMAT}\"; "
                          "record one with `wanengine calibrate-cache`)")
    if raw.get("version") != VERSION:
        raise InvalidArgument("cache_table", f"{where}: table version {raw.get('version')!r} is not supported (expected {VERSION})")
    steps = raw.get("steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidArgument("cache_table", f"{where}: \"steps\" must be a positive integer, got {steps!r}")
    ratios = raw.get("ratios")
    if not isinstance(ratios, dict) or set(ratios) != set(EXPERT_NAMES):
        raise InvalidArgument("cache_table", f"{where}: \"ratios\" must have exactly the experts {', '.join(EXPERT_NAMES)}")
    checked: Ratios = {}
    for expert in EXPERT_NAMES:
        branches = ratios[expert]
        if not isinstance(branches, dict) or not set(branches) <= set(BRANCHES) or not branches:
            raise InvalidArgument("cache_table", f"{where}: ratios.{expert} must map {' and/or '.join(BRANCHES)} to lists")
        checked[expert] = {b: _checked_list(branches.get(b), steps, f"{where}: ratios.{expert}.{b}")
                           for b in BRANCHES}
    info = raw.get("info", {})
    return MagTable(steps, checked, info if isinstance(info, dict) else {}, source)


def _checked_list(values: Any, steps: int, where: str) -> List[Optional[float]]:
    if values is None:  # a branch the table does not cover never skips
        return [None] * steps
    if not isinstance(values, list) or len(values) != steps:
        count = len(values) if isinstance(values, list) else type(values).__name__
        raise InvalidArgument("cache_table", f"{where}: must be a list of {steps} entries (one per step), got {count}")
    out: List[Optional[float]] = []
    for index, value in enumerate(values):
        if value is None:
            out.append(None)
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise InvalidArgument("cache_table", f"{where}[{index}]: must be a positive number or null, got {value!r}")
        else:
            out.append(float(value))
    return out


def save_table(table: MagTable, path: Union[str, "os.PathLike[str]"]) -> Path:
    """Write `table` as JSON to `path` atomically (no half-written file on failure)."""
    from ..io.video import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(table.to_json(), indent=1) + "\n", encoding="utf-8")
    return Path(path)


def summarize(table: MagTable) -> Sequence[str]:
    """One line per expert and branch: how many steps have a ratio and their range."""
    lines = []
    for expert in EXPERT_NAMES:
        for branch in BRANCHES:
            values = [v for v in table.ratios[expert][branch] if v is not None]
            if values:
                lines.append(f"{expert} {branch}: {len(values)} ratios, {min(values):.4f} .. {max(values):.4f}")
    return lines
