"""Progress over the denoising steps, with the active expert and the ETA.

On a terminal it is a tqdm bar. Anywhere else (a log file, a pipe, torchrun's collected
output) a bar's carriage returns make an unreadable line, so it prints plain lines instead:
the first and the last step, and one every `LINE_INTERVAL_S` seconds in between.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

from tqdm import tqdm

from .pipeline import StepInfo

_SHORT = {"high_noise_model": "high-noise", "low_noise_model": "low-noise"}
LINE_INTERVAL_S = 5.0


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 100 else f"{seconds / 60:.1f} min"


class StepProgress:
    """Context manager for the step display; a no-op when disabled (library use, --quiet)."""

    def __init__(self, total: int, enabled: bool = True, stream: Optional[TextIO] = None) -> None:
        self.total = total
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self._bar: Optional[tqdm] = None
        self._start = 0.0
        self._last_line = 0.0

    def __enter__(self) -> "StepProgress":
        self._start = self._last_line = time.perf_counter()
        if self.enabled and self._is_terminal():
            self._bar = tqdm(total=self.total, desc="denoise", unit="step", file=self.stream, dynamic_ncols=True,
                             bar_format="{desc} {bar} {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}] {postfix}")
        return self

    def _is_terminal(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def update(self, info: StepInfo) -> None:
        expert = _SHORT.get(info.expert, info.expert)
        if self._bar is not None:
            self._bar.set_postfix_str(f"t={info.timestep} expert={expert}", refresh=False)
            self._bar.update(1)
            return
        if not self.enabled:
            return
        now, done = time.perf_counter(), info.index + 1
        if done not in (1, self.total) and now - self._last_line < LINE_INTERVAL_S:
            return
        elapsed = now - self._start
        eta = elapsed / done * (self.total - done)
        self.stream.write(f"wanengine: denoise {done}/{self.total} (t={info.timestep}, {expert}) "
                          f"{_duration(elapsed)}, ETA {_duration(eta)}\n")
        self.stream.flush()
        self._last_line = now

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
