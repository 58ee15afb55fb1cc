"""A progress bar over denoising steps that shows the active expert and the ETA."""
from __future__ import annotations

import sys
from typing import Optional

from tqdm import tqdm

from .pipeline import StepInfo

_SHORT = {"high_noise_model": "high-noise", "low_noise_model": "low-noise"}


class StepProgress:
    """Context manager wrapping a tqdm bar; a no-op when disabled (library use, --quiet)."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total = total
        self.enabled = enabled
        self._bar: Optional[tqdm] = None

    def __enter__(self) -> "StepProgress":
        if self.enabled:
            self._bar = tqdm(total=self.total, desc="denoise", unit="step", file=sys.stderr, dynamic_ncols=True,
                             bar_format="{desc} {bar} {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}] {postfix}")
        return self

    def update(self, info: StepInfo) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(f"t={info.timestep:g} expert={_SHORT.get(info.expert, info.expert)}", refresh=False)
            self._bar.update(1)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
