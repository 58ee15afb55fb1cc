"""Flow-matching samplers: UniPC (default), DPM-Solver++ and flow Euler (distilled weights).

Plain objects with `timesteps` (`[S]`: int64 for UniPC / DPM++, float32 for Euler),
`sigmas` (float32 `[S + 1]`) and `step(v, t, x) -> x_next`; no model knowledge.
`make_sampler` builds one by name.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from wanengine.errors import ConfigError, InvalidArgument
from wanengine.schedulers.dpmpp import FlowDPMPPSampler
from wanengine.schedulers.euler import FlowEulerSampler, euler_schedule
from wanengine.schedulers.schedule import (
    NUM_TRAIN_TIMESTEPS,
    FlowSchedule,
    SamplerStateError,
    dpmpp_schedule,
    unipc_schedule,
)
from wanengine.schedulers.unipc import FlowUniPCSampler

Sampler = Union[FlowUniPCSampler, FlowDPMPPSampler, FlowEulerSampler]

_SAMPLERS = {"unipc": FlowUniPCSampler, "dpm++": FlowDPMPPSampler, "dpmpp": FlowDPMPPSampler,
             "euler": FlowEulerSampler}


def make_sampler(name: str, steps: Optional[int], shift: float,
                 device: Optional[Union[str, torch.device]] = None,
                 step_list: Optional[Sequence[float]] = None) -> Sampler:
    """A fresh sampler `name` ("unipc", "dpm++"/"dpmpp" or "euler") for `steps` steps with
    `shift`; `step_list` (Euler only) gives the timesteps explicitly, e.g. 1000,750,500,250.
    Raises ConfigError for an unknown name or invalid steps/shift/step list."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _SAMPLERS:
        raise ConfigError(f"unknown sample solver {name!r} (choose 'unipc', 'dpm++' or 'euler')")
    if key == "euler":
        return FlowEulerSampler(steps, shift, device=device, step_list=step_list)
    if step_list is not None:
        raise InvalidArgument("denoising_steps", f"only the euler sampler takes an explicit step list, not {name!r}")
    return _SAMPLERS[key](steps, shift, device=device)


__all__ = [
    "FlowDPMPPSampler",
    "FlowEulerSampler",
    "FlowSchedule",
    "FlowUniPCSampler",
    "NUM_TRAIN_TIMESTEPS",
    "Sampler",
    "SamplerStateError",
    "dpmpp_schedule",
    "euler_schedule",
    "make_sampler",
    "unipc_schedule",
]
