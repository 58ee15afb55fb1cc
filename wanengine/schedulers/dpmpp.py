"""Flow-matching DPM-Solver++ sampler (order 2, midpoint, `final_sigmas_type = zero`).

First order at the first and the last step, second order (midpoint) in between. The sample
update runs in float32 (the sample and model output are upcast) and the result is cast back
to the sample's dtype. As in UniPC, the scalar coefficients are float32 tensor math done
once at construction and kept as Python floats, so `step()` is pure tensor arithmetic on
the sample's device.

With sigma_0 = 1 the first step has lambda_0 = -inf, so h = +inf and the step is
`sigma_1 * x + alpha_1 * m_0` (IEEE arithmetic); the second step's `r0 = inf` then makes
its difference term exactly 0. The last step has sigma = 0 and returns its data estimate.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

import torch

from wanengine.schedulers.schedule import (
    StepCursor,
    alpha_of,
    as_float,
    dpmpp_schedule,
    lambda_of,
)


@dataclass(frozen=True)
class _StepCoefficients:
    """x' = ratio * x - c * m_k  [ - (0.5 * c) * (inv_r0 * (m_k - m_{k-1}))  for order 2 ]
    with ratio = sigma_{k+1} / sigma_k, c = alpha_{k+1} * (exp(-h) - 1), inv_r0 = 1 / r0
    (the reference multiplies by the float32 reciprocal; dividing by r0 differs by an ulp)."""

    order: int
    ratio: float
    c: float
    inv_r0: float = 1.0


def _step_coefficients(sigmas: torch.Tensor, k: int, order: int) -> _StepCoefficients:
    sigma_t, sigma_s0 = sigmas[k + 1], sigmas[k]
    lambda_t, lambda_s0 = lambda_of(sigma_t), lambda_of(sigma_s0)
    h = lambda_t - lambda_s0
    c = alpha_of(sigma_t) * (torch.exp(-h) - 1.0)
    ratio = sigma_t / sigma_s0
    if order == 1:
        return _StepCoefficients(order=1, ratio=as_float(ratio), c=as_float(c))
    h0 = lambda_s0 - lambda_of(sigmas[k - 1])
    r0 = h0 / h  # +inf at step 1 when sigma_0 = 1 (lambda_0 = -inf): the difference term vanishes
    return _StepCoefficients(order=2, ratio=as_float(ratio), c=as_float(c), inv_r0=as_float(1.0 / r0))


class FlowDPMPPSampler:
    """DPM-Solver++(2M) for flow-matching models.

    Attributes: `timesteps` int64 `[S]`, `sigmas` float32 `[S + 1]` (first 1.0, last 0).
    Call `step(v, t, x)` once per timestep, in order; `reset()` starts another video.
    """

    def __init__(self, steps: int, shift: float, device: Optional[Union[str, torch.device]] = None) -> None:
        schedule = dpmpp_schedule(steps, shift)
        self.num_steps = schedule.num_steps
        self.timesteps = schedule.timesteps.to(device) if device is not None else schedule.timesteps
        self.sigmas = schedule.sigmas.to(device) if device is not None else schedule.sigmas
        sigmas = schedule.sigmas
        self._sigma_values: List[float] = [as_float(s) for s in sigmas]
        S = self.num_steps
        self._coefficients = [
            _step_coefficients(sigmas, k, 1 if (k == 0 or k == S - 1) else 2) for k in range(S)
        ]
        self._cursor = StepCursor(schedule.timesteps)
        self.reset()

    def reset(self) -> None:
        """Forget all state so the same schedule can sample another video."""
        self._cursor.reset()
        self._previous: Optional[torch.Tensor] = None  # float32 data estimate of the last step

    @property
    def step_index(self) -> int:
        """Number of steps taken so far (index of the next step)."""
        return self._cursor.index

    def step(self, v: torch.Tensor, t: Union[int, torch.Tensor, None], x: torch.Tensor) -> torch.Tensor:
        """Advance `x` from sigmas[k] to sigmas[k+1] given the model flow `v` at timestep
        `t` (= timesteps[k]). Computes in float32; returns x's dtype."""
        k = self._cursor.advance(t)
        out_dtype = x.dtype
        x32 = x.to(torch.float32)
        m = x32 - self._sigma_values[k] * v.to(torch.float32)  # data estimate x0, float32
        c = self._coefficients[k]
        x_next = c.ratio * x32 - c.c * m
        if c.order == 2:
            d1 = c.inv_r0 * (m - self._previous)
            x_next = x_next - (0.5 * c.c) * d1
        self._previous = m
        return x_next.to(out_dtype)
