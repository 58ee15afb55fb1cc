"""Stage timing: wall-clock seconds per pipeline stage, printed as a table at the end of a run."""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Dict, Iterator, Optional


class StageTimer:
    """Accumulates seconds per named stage. `sync` (e.g. torch.cuda.synchronize) is called at
    stage boundaries so asynchronous device work is charged to the stage that queued it."""

    def __init__(self, sync: Optional[Callable[[], None]] = None) -> None:
        self.seconds: Dict[str, float] = {}
        self._sync = sync

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync is not None:
                self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def table(self) -> str:
        """A small aligned table: stage, seconds, share of the total."""
        width = max([len("stage"), *map(len, self.seconds)])
        total = self.total or 1.0
        lines = [f"{'stage':<{width}}  {'seconds':>9}  {'share':>6}", f"{'-' * width}  {'-' * 9}  {'-' * 6}"]
        for name, secs in self.seconds.items():
            lines.append(f"{name:<{width}}  {secs:>9.2f}  {100 * secs / total:>5.1f}%")
        lines.append(f"{'total':<{width}}  {self.total:>9.2f}  {100.0:>5.1f}%")
        return "\n".join(lines)
