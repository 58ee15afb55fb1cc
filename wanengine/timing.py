"""Stage timing: wall-clock seconds per pipeline stage, printed as a table at the end of a run."""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Dict, Iterator, Optional

from .stage_log import StageLog


class StageTimer:
    """Accumulates seconds per named stage. `sync` (e.g. torch.cuda.synchronize) is called at
    stage boundaries so asynchronous device work is charged to the stage that queued it.
    `log`, when given, prints a progress line for each stage (see `wanengine.stage_log`)."""

    def __init__(self, sync: Optional[Callable[[], None]] = None, log: Optional[StageLog] = None) -> None:
        self.seconds: Dict[str, float] = {}
        self._sync = sync
        self.log = log if log is not None else StageLog(enabled=False)

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "", nbytes: Optional[float] = None,
              announce: bool = True) -> Iterator[None]:
        """Time the block as stage `name`; `detail` and `nbytes` (for a throughput) go into its
        progress line; `announce=False` for stages that show their own progress."""
        if announce:
            self.log.start(name, detail)
        start = time.perf_counter()
        failed = True
        try:
            yield
            failed = False
        finally:
            if self._sync is not None and not failed:
                self._sync()
            seconds = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds
            if announce:
                self.log.end(name, seconds, nbytes, failed=failed)

    def add(self, name: str, seconds: float, first: bool = False) -> None:
        """Charge `seconds` measured elsewhere to stage `name` (`first`: as the first row, for a
        stage that ran before this timer existed)."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        if first:
            self.seconds = {name: self.seconds.pop(name), **self.seconds}

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def table(self, wall: Optional[float] = None) -> str:
        """A small aligned table: stage, seconds, share of the total. With `wall` (the seconds
        the whole run took), time outside every stage is an `other` row and the total is `wall`."""
        rows = dict(self.seconds)
        if wall is not None and wall > self.total:
            rows["other"] = wall - self.total
        total = sum(rows.values())
        width = max([len("stage"), *map(len, rows)])
        lines = [f"{'stage':<{width}}  {'seconds':>9}  {'share':>6}", f"{'-' * width}  {'-' * 9}  {'-' * 6}"]
        for name, secs in rows.items():
            lines.append(f"{name:<{width}}  {secs:>9.2f}  {100 * secs / (total or 1.0):>5.1f}%")
        lines.append(f"{'total':<{width}}  {total:>9.2f}  {100.0:>5.1f}%")
        return "\n".join(lines)
