"""Flow-matching UniPC sampler (B(h) = expm1 variant "bh2", order 2, predict-x0,
lower-order final steps, UniC corrector on) -- the default sampler.

Every scalar coefficient depends only on the schedule, so they are all computed once at
construction as float32 scalar tensor math (exactly the reference's arithmetic, including
its float32 `expm1`/`log` and the 2x2 float32 solve of the order-2 corrector) and kept as
Python floats. `step()` is then pure elementwise tensor arithmetic in the sample's dtype
on the sample's device: no host synchronisation, no device transfers.

Per step k (0-based) with model flow `v` and sample `x`:
  m_k = x - sigma_k * v                                    (data estimate)
  x   = corrector(x_last, m_k, history)  if k > 0          (UniC, order of step k-1)
  x_next = predictor(x, history + [m_k])                   (UniP, order min(2, S-k, k+1))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

import torch

from wanengine.schedulers.schedule import (
    StepCursor,
    alpha_of,
    as_float,
    lambda_of,
    unipc_schedule,
)

SOLVER_ORDER = 2


@dataclass(frozen=True)
class _UpdateCoefficients:
    """One UniP/UniC update from sigma_s0 to sigma_t:
        base = ratio * x - c_m0 * m0
        order 1 predictor:   base
        order 2 predictor:   base - c_b * (0.5 * (m1 - m0) / r)
        order 1 corrector:   base - c_b * (rho_new * (m_new - m0))
        order 2 corrector:   base - c_b * (rho_prev * ((m1 - m0) / r) + rho_new * (m_new - m0))
    ratio = sigma_t / sigma_s0, c_m0 = alpha_t * expm1(-h), c_b = alpha_t * B(h)."""

    order: int
    ratio: float
    c_m0: float
    c_b: float
    r: float = 1.0  # (lambda_s1 - lambda_s0) / h, only for order 2
    rho_prev: float = 0.0  # corrector weight of the (m1 - m0) / r difference
    rho_new: float = 0.5  # corrector weight of (m_new - m0)


def _update_coefficients(sigmas: torch.Tensor, s0: int, t: int, order: int, corrector: bool) -> _UpdateCoefficients:
    """float32 scalar math of one update from `sigmas[s0]` to `sigmas[t]` (see module doc)."""
    sigma_t, sigma_s0 = sigmas[t], sigmas[s0]
    alpha_t = alpha_of(sigma_t)
    lambda_t, lambda_s0 = lambda_of(sigma_t), lambda_of(sigma_s0)
    h = lambda_t - lambda_s0  # +inf at the last step (sigma_t = 0): IEEE gives expm1(-inf) = -1
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = torch.expm1(hh)  # "bh2"
    common = dict(
        order=order,
        ratio=as_float(sigma_t / sigma_s0),
        c_m0=as_float(alpha_t * h_phi_1),
        c_b=as_float(alpha_t * b_h),
    )
    if order == 1:
        return _UpdateCoefficients(**common)
    r = (lambda_of(sigmas[s0 - 1]) - lambda_s0) / h
    if not corrector:
        return _UpdateCoefficients(**common, r=as_float(r))
    # Order-2 UniC weights: solve R rho = b with R = [[1, 1], [r, 1]] (powers of rks = [r, 1])
    # and b_i = h_phi_k(i) * i! / B(h); float32 like the reference.
    rks = torch.stack([r, torch.ones((), dtype=torch.float32)])
    R = torch.stack([torch.pow(rks, 0), torch.pow(rks, 1)])
    h_phi_k = h_phi_1 / hh - 1
    b, factorial_i = [], 1
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial_i / b_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial_i
    rho = torch.linalg.solve(R, torch.stack(b))
    return _UpdateCoefficients(**common, r=as_float(r), rho_prev=as_float(rho[0]), rho_new=as_float(rho[1]))


class FlowUniPCSampler:
    """UniPC bh2 / order 2 for flow-matching models.

    Attributes: `timesteps` int64 `[S]` (what the model is evaluated at), `sigmas` float32
    `[S + 1]` (last 0). Call `step(v, t, x)` once per timestep, in order; `reset()` (or a
    new object, which is cheap) starts another video.
    """

    def __init__(self, steps: int, shift: float, device: Optional[Union[str, torch.device]] = None) -> None:
        schedule = unipc_schedule(steps, shift)
        self.num_steps = schedule.num_steps
        self.timesteps = schedule.timesteps.to(device) if device is not None else schedule.timesteps
        self.sigmas = schedule.sigmas.to(device) if device is not None else schedule.sigmas
        sigmas = schedule.sigmas  # CPU float32 for the coefficient math
        self._sigma_values: List[float] = [as_float(s) for s in sigmas]
        S = self.num_steps
        # Lower-order final steps and warm-up: order at step k is min(2, S - k, k + 1).
        self._orders = [min(SOLVER_ORDER, S - k, k + 1) for k in range(S)]
        self._predictor = [_update_coefficients(sigmas, k, k + 1, self._orders[k], corrector=False) for k in range(S)]
        # The corrector at step k refines the update k-1 -> k with the order step k-1 used.
        self._corrector: List[Optional[_UpdateCoefficients]] = [None] + [
            _update_coefficients(sigmas, k - 1, k, self._orders[k - 1], corrector=True) for k in range(1, S)
        ]
        self._cursor = StepCursor(schedule.timesteps)
        self.reset()

    def reset(self) -> None:
        """Forget all state so the same schedule can sample another video."""
        self._cursor.reset()
        self._history: List[torch.Tensor] = []  # data estimates, oldest first, at most 2
        self._last_sample: Optional[torch.Tensor] = None

    @property
    def step_index(self) -> int:
        """Number of steps taken so far (index of the next step)."""
        return self._cursor.index

    def step(self, v: torch.Tensor, t: Union[int, torch.Tensor, None], x: torch.Tensor) -> torch.Tensor:
        """Advance `x` (any shape, any float dtype) from sigmas[k] to sigmas[k+1] given the
        model flow `v` at timestep `t` (= timesteps[k]). Returns the new sample in x's dtype."""
        k = self._cursor.advance(t)
        v = v.to(dtype=x.dtype)
        m_new = x - self._sigma_values[k] * v  # [same as x] data estimate x0
        corrector = self._corrector[k]
        if corrector is not None:
            x = self._update(corrector, self._last_sample, self._history, m_new)
        self._history = (self._history + [m_new])[-SOLVER_ORDER:]
        self._last_sample = x
        return self._update(self._predictor[k], x, self._history, None)

    @staticmethod
    def _update(c: _UpdateCoefficients, x: torch.Tensor, history: List[torch.Tensor],
                m_new: Optional[torch.Tensor]) -> torch.Tensor:
        """UniP (m_new None) or UniC (m_new = the fresh data estimate) update; `history`
        holds the data estimates before m_new, newest last. Operation order mirrors the
        reference so float32 results agree to rounding."""
        m0 = history[-1]
        x_t = c.ratio * x - c.c_m0 * m0
        if m_new is None:  # predictor
            if c.order == 1:
                return x_t
            d1 = (history[-2] - m0) / c.r
            return x_t - c.c_b * (0.5 * d1)
        correction = c.rho_new * (m_new - m0)
        if c.order == 2:
            correction = c.rho_prev * ((history[-2] - m0) / c.r) + correction
        return x_t - c.c_b * correction
