"""One progress line per pipeline stage on stderr, so no phase of a run is silent.

A stage prints `wanengine: <stage> <detail> ...` when it starts and completes the line with
its duration (and throughput, for loads) when it ends: `... 5.2 s (2.2 GB/s)`. The denoising
loop has its own bar (steps, ETA) instead. Torch-free.
"""
from __future__ import annotations

import sys
from typing import Optional, TextIO


def human_bytes(nbytes: float) -> str:
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"


class StageLog:
    """Writes the start and the end of each stage; `enabled=False` makes it silent."""

    def __init__(self, enabled: bool = True, stream: Optional[TextIO] = None) -> None:
        self.enabled = enabled
        self._stream = stream
        self._open = False  # a started line awaits its end

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def start(self, name: str, detail: str = "") -> None:
        if not self.enabled:
            return
        self._close_line()
        self.stream.write(f"wanengine: {name}{' ' + detail if detail else ''} ...")
        self.stream.flush()
        self._open = True

    def end(self, name: str, seconds: float, nbytes: Optional[float] = None, failed: bool = False) -> None:
        if not self.enabled:
            return
        rate = f" ({human_bytes(nbytes / seconds)}/s)" if nbytes and seconds > 0 and not failed else ""
        text = f" stopped after {seconds:.2f} s" if failed else f" {seconds:.2f} s{rate}"
        if not self._open:  # something else wrote in between: repeat the stage's name
            text = f"wanengine: {name}:{text}"
        self.stream.write(text + "\n")
        self.stream.flush()
        self._open = False

    def line(self, message: str) -> None:
        """A whole line (e.g. a stage with its own display announcing itself)."""
        if self.enabled:
            self._close_line()
            self.stream.write(f"wanengine: {message}\n")
            self.stream.flush()

    def _close_line(self) -> None:
        if self._open:
            self.stream.write("\n")
            self._open = False
