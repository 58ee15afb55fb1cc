"""Shifted flow-matching sigma schedules and the per-step bookkeeping both samplers share.

The schedule is computed exactly the way the reference does it so the integer timesteps
(which the DiT sees) match bit for bit:

    sig       = linspace(start, 0, S + 1)[:-1]          float64, numpy's linspace formula
    sig       = shift * sig / (1 + (shift - 1) * sig)   float64
    timesteps = int64(sig * 1000)                       truncation, not rounding
    sigmas    = float32(append(sig, 0.0))               length S + 1, last one exactly 0

UniPC starts at `start = float32(0.999)` (the top of the 1000-step training grid), DPM++
at `start = 1.0`. The solver coefficients are float32 scalar tensor math on these float32
sigmas (`alpha = 1 - sigma`, `lambda = log(alpha) - log(sigma)`; `lambda(0) = +inf`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Union

import torch

from wanengine.errors import ConfigError

NUM_TRAIN_TIMESTEPS = 1000


class SamplerStateError(RuntimeError):
    """A sampler was stepped out of order, with the wrong timestep, or past its last step."""


def unipc_sigma_max() -> float:
    """Top of the training grid `1 - linspace(1, 1/1000, 1000)` reversed, rounded to float32
    (0.9990000128746033): the reference keeps its training sigmas in float32."""
    return float(torch.tensor(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS, dtype=torch.float32))


def _numpy_linspace(start: float, stop: float, num: int) -> List[float]:
    """`numpy.linspace(start, stop, num)` bit for bit in float64 (`i * step + start`, last
    element set to `stop`). torch.linspace uses a different formula whose last-bit
    differences could flip a truncated integer timestep."""
    if num == 1:
        return [start]
    step = (stop - start) / (num - 1)
    values = [i * step + start for i in range(num)]
    values[-1] = stop
    return values


def _validate(steps: int, shift: float) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"sampling steps must be a positive integer, got {steps!r}")
    if not isinstance(shift, (int, float)) or isinstance(shift, bool) or not math.isfinite(shift) or shift <= 0:
        raise ConfigError(f"sample shift must be a positive finite number, got {shift!r}")


@dataclass(frozen=True)
class FlowSchedule:
    """Integer model timesteps `[S]` (int64) and solver sigmas `[S + 1]` (float32, last 0)."""

    timesteps: torch.Tensor
    sigmas: torch.Tensor

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())


def shifted_schedule(steps: int, shift: float, *, start: float) -> FlowSchedule:
    """The shifted schedule starting at sigma `start` (see module docstring). CPU tensors."""
    _validate(steps, shift)
    shift = float(shift)
    sig = _numpy_linspace(float(start), 0.0, steps + 1)[:-1]
    # Same evaluation order as the reference: (shift * sig) / (1 + (shift - 1) * sig).
    sig = [shift * s / (1.0 + (shift - 1.0) * s) for s in sig]
    timesteps = torch.tensor([int(s * NUM_TRAIN_TIMESTEPS) for s in sig], dtype=torch.int64)
    sigmas = torch.tensor(sig + [0.0], dtype=torch.float64).to(torch.float32)
    return FlowSchedule(timesteps=timesteps, sigmas=sigmas)


def unipc_schedule(steps: int, shift: float) -> FlowSchedule:
    return shifted_schedule(steps, shift, start=unipc_sigma_max())


def dpmpp_schedule(steps: int, shift: float) -> FlowSchedule:
    return shifted_schedule(steps, shift, start=1.0)


# ---- float32 scalar schedule math (0-d tensors on CPU; only used at construction) ----

def alpha_of(sigma: torch.Tensor) -> torch.Tensor:
    """`alpha = 1 - sigma` (flow matching: x_sigma = alpha * x0 + sigma * noise)."""
    return 1.0 - sigma


def lambda_of(sigma: torch.Tensor) -> torch.Tensor:
    """Half log-SNR `log(alpha) - log(sigma)`; IEEE gives +inf at sigma 0, -inf at sigma 1."""
    return torch.log(alpha_of(sigma)) - torch.log(sigma)


def as_float(x: torch.Tensor) -> float:
    """A float32 0-d tensor as a Python float (exact: every float32 is a double). Multiplying
    a tensor by it computes the same as multiplying by the float32 tensor (torch casts
    Python scalars to the op's float32 compute type)."""
    return float(x)


class StepCursor:
    """Tracks which step a sampler is on and rejects out-of-order use.

    `advance(t)` returns the 0-based index of the step being taken. `t` is checked against
    the expected timestep when it is a Python number or a CPU tensor; a device tensor is
    not read back (that would synchronise the host), only counted.
    """

    def __init__(self, timesteps: torch.Tensor) -> None:
        # Python ints for the integer samplers, floats for Euler's float timesteps.
        self._expected: List[Union[int, float]] = timesteps.cpu().tolist()
        self.index = 0

    def reset(self) -> None:
        self.index = 0

    def advance(self, t: Optional[Union[int, float, torch.Tensor]]) -> int:
        k = self.index
        total = len(self._expected)
        if k >= total:
            raise SamplerStateError(
                f"sampler already took all {total} steps; build a new one (or reset()) for the next video")
        if t is not None:
            value: Optional[float]
            if isinstance(t, torch.Tensor):
                value = float(t.reshape(-1)[0]) if (t.device.type == "cpu" and t.numel() >= 1) else None
            else:
                value = float(t)
            if value is not None and value != self._expected[k]:
                raise SamplerStateError(
                    f"sampler step {k} expects timestep {self._expected[k]}, got {value:g} "
                    f"(steps must be taken in order, once each)")
        self.index = k + 1
        return k
