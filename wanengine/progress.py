"""Progress over the denoising steps, with the active expert and the ETA, and over the
chunks of a VAE encode / decode.

Steps: on a terminal a tqdm bar. Anywhere else (a log file, a pipe, torchrun's collected
output) a bar's carriage returns make an unreadable line, so it prints plain lines instead:
the first and the last step, and one every `LINE_INTERVAL_S` seconds in between. VAE decode:
a line every `LINE_INTERVAL_S` seconds (`ChunkProgress`) with the frames done and the ETA,
counted by `vae_chunks`, and so for VAE encode.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator, List, Optional, Sequence, TextIO

from tqdm import tqdm

from .pipeline import StepInfo
from .stage_log import StageLog

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
            self._bar.set_postfix_str(f"t={info.timestep:g} expert={expert}", refresh=False)
            self._bar.update(1)
            return
        if not self.enabled:
            return
        now, done = time.perf_counter(), info.index + 1
        if done not in (1, self.total) and now - self._last_line < LINE_INTERVAL_S:
            return
        elapsed = now - self._start
        eta = elapsed / done * (self.total - done)
        self.stream.write(f"wanengine: denoise {done}/{self.total} (t={info.timestep:g}, {expert}) "
                          f"{_duration(elapsed)}, ETA {_duration(eta)}\n")
        self.stream.flush()
        self._last_line = now

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()


def causal_chunk_frames(frame_num: int) -> List[int]:
    """Video frames per VAE chunk of a `frame_num`-frame clip: the first frame alone, then 4 a
    chunk -- for the encoder (input frames) and the decoder (frames out of each latent frame)."""
    return [1] + [4] * ((frame_num - 1) // 4)


class ChunkProgress:
    """`tick()` when each chunk of a long stage starts; from the second chunk on, a line with the
    frames done so far (the chunks before this one), elapsed time and ETA, at most every
    `LINE_INTERVAL_S` seconds -- none for stages shorter than that. `frames_per_chunk` weighs
    the chunks (`causal_chunk_frames`), so the ETA does not count a 1-frame chunk as 4."""

    def __init__(self, name: str, frames_per_chunk: Sequence[int], log: StageLog) -> None:
        self.name, self.frames_per_chunk, self.log = name, list(frames_per_chunk), log
        self.total = sum(self.frames_per_chunk)
        self.started = 0  # chunks begun; all but the current one are done
        self._start = self._last_line = time.perf_counter()

    def tick(self) -> None:
        finished, self.started = self.started, self.started + 1
        now = time.perf_counter()
        if finished == 0 or now - self._last_line < LINE_INTERVAL_S:
            return
        done = sum(self.frames_per_chunk[:finished])
        elapsed = now - self._start
        eta = elapsed / done * (self.total - done)
        self.log.line(f"{self.name} {done}/{self.total} frames, {_duration(elapsed)}, ETA {_duration(eta)}")
        self._last_line = now


@contextlib.contextmanager
def vae_chunks(vae, part: str, progress: ChunkProgress) -> Iterator[None]:
    """Tick `progress` once per chunk the VAE's `part` ("encoder" or "decoder") runs, from
    outside the model: its first conv (`conv1`) runs once per chunk -- one latent frame for the
    decoder (tiled or not), 1 then 4 frames for the encoder. A VAE without that structure (or a
    facade hiding it) simply reports nothing."""
    inner = getattr(vae, "vae", vae)  # parallel.vae_split's facade keeps the VAE as `.vae`
    first = getattr(getattr(inner, part, None), "conv1", None)
    if not progress.log.enabled or first is None or not hasattr(first, "register_forward_pre_hook"):
        yield
        return
    handle = first.register_forward_pre_hook(lambda module, args: progress.tick())
    try:
        yield
    finally:
        handle.remove()
