"""Flow Euler sampler on a step list: the sampler of step-distilled weights (spec `distill.md`).

    T         = linspace(1000, 0, N + 1)[:-1]  unless an explicit step list is given
                (any strictly decreasing list in (0, 1000]; N = 4: 1000, 750, 500, 250)
    sigma_i   = shifted(sigma_train[1000 - T_i]),  sigma_train[j] = 1 - j / 1000
    shifted   = s * x / (1 + (s - 1) * x)
    t_i       = 1000 * sigma_i, a FLOAT timestep (no truncation, unlike UniPC / DPM++)
    x_{i+1}   = x_i + (sigma_{i+1} - sigma_i) * v_i,   sigma_N = 0

N = 4, s = 5: sigmas 1.0, 0.9375, 0.8333333, 0.625 and timesteps 1000, 937.5, 833.33, 625.

The schedule is float64 scalar math (as the other samplers), then `sigmas` are stored in
float32 (`[N + 1]`, last 0) and `timesteps` are `float32(1000 * sigma)` (`[N]`); the step
coefficient `sigma_{i+1} - sigma_i` is the float32 difference of the stored sigmas, kept as
a Python float so `step()` is one multiply-add in the sample's dtype on its device.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from wanengine.config import check_step_list
from wanengine.errors import InvalidArgument
from wanengine.schedulers.schedule import NUM_TRAIN_TIMESTEPS, FlowSchedule, StepCursor, _numpy_linspace, _validate


def _sigma_train(t: float) -> float:
    """`sigma_train[1000 - t]` of the training grid `linspace(1, 0, 1001)[:-1]` (numpy's formula);
    a step between grid points (an explicit fractional step) interpolates linearly, `t / 1000`."""
    index = NUM_TRAIN_TIMESTEPS - t
    if index == int(index):
        return _numpy_linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1)[int(index)]
    return t / NUM_TRAIN_TIMESTEPS


def euler_schedule(steps: int, shift: float, step_list: Optional[Sequence[float]] = None) -> FlowSchedule:
    """Float timesteps `[N]` (float32) and sigmas `[N + 1]` (float32, last 0); see module doc.
    With `step_list`, N is its length and `steps` must equal it (or be None)."""
    if step_list is not None:
        grid = list(check_step_list(step_list, NUM_TRAIN_TIMESTEPS))
        if steps is not None and steps != len(grid):
            raise InvalidArgument.for_argument("denoising_steps", lambda words: (
                f"gives {len(grid)} steps but {words.name('steps')} is {steps}"))
        steps = len(grid)
    _validate(steps, shift)  # the samplers' shared steps / shift checks
    if step_list is None:
        grid = _numpy_linspace(float(NUM_TRAIN_TIMESTEPS), 0.0, steps + 1)[:-1]
    shift = float(shift)
    train = [_sigma_train(t) for t in grid]
    sig = [shift * x / (1.0 + (shift - 1.0) * x) for x in train]
    sigmas = torch.tensor(sig + [0.0], dtype=torch.float64).to(torch.float32)
    timesteps = (torch.tensor(sig, dtype=torch.float64) * NUM_TRAIN_TIMESTEPS).to(torch.float32)
    return FlowSchedule(timesteps=timesteps, sigmas=sigmas)


class FlowEulerSampler:
    """First-order flow Euler: `x + (sigma_{k+1} - sigma_k) * v`.

    Attributes: `timesteps` float32 `[N]` (the DiT's float timesteps), `sigmas` float32
    `[N + 1]` (last 0). Call `step(v, t, x)` once per timestep, in order; `reset()` starts
    another video. Stateless apart from the step cursor.
    """

    def __init__(self, steps: Optional[int], shift: float, device: Optional[Union[str, torch.device]] = None,
                 step_list: Optional[Sequence[float]] = None) -> None:
        schedule = euler_schedule(steps, shift, step_list)
        self.num_steps = schedule.num_steps
        self.timesteps = schedule.timesteps.to(device) if device is not None else schedule.timesteps
        self.sigmas = schedule.sigmas.to(device) if device is not None else schedule.sigmas
        sigmas = schedule.sigmas
        # float32 difference of the stored sigmas (exact as a Python float)
        self._deltas: List[float] = [float(sigmas[k + 1] - sigmas[k]) for k in range(self.num_steps)]
        self._cursor = StepCursor(schedule.timesteps)

    def reset(self) -> None:
        """Forget the step position so the same schedule can sample another video."""
        self._cursor.reset()

    @property
    def step_index(self) -> int:
        return self._cursor.index

    def step(self, v: torch.Tensor, t: Union[float, torch.Tensor, None], x: torch.Tensor) -> torch.Tensor:
        """Advance `x` from sigmas[k] to sigmas[k+1] with the model flow `v` at `t` (= timesteps[k])."""
        k = self._cursor.advance(t)
        return x + self._deltas[k] * v.to(dtype=x.dtype)
