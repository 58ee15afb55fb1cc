"""Flow-matching samplers: UniPC (default) and DPM-Solver++.

Plain objects with `timesteps` (int64 `[S]`), `sigmas` (float32 `[S + 1]`) and
`step(v, t, x) -> x_next`; no model knowledge. `make_sampler` builds one by name.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from wanengine.errors import ConfigError
from wanengine.schedulers.dpmpp import FlowDPMPPSampler
from wanengine.schedulers.schedule import (
    NUM_TRAIN_TIMESTEPS,
    FlowSchedule,
    SamplerStateError,
    dpmpp_schedule,
    unipc_schedule,
)
from wanengine.schedulers.unipc import FlowUniPCSampler

Sampler = Union[FlowUniPCSampler, FlowDPMPPSampler]

_SAMPLERS = {"unipc": FlowUniPCSampler, "dpm++": FlowDPMPPSampler, "dpmpp": FlowDPMPPSampler}


def make_sampler(name: str, steps: int, shift: float,
                 device: Optional[Union[str, torch.device]] = None) -> Sampler:
    """A fresh sampler `name` ("unipc", "dpm++" or "dpmpp") for `steps` steps with `shift`.
    Raises ConfigError for an unknown name or invalid steps/shift."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _SAMPLERS:
        raise ConfigError(f"unknown sample solver {name!r} (choose 'unipc' or 'dpm++')")
    return _SAMPLERS[key](steps, shift, device=device)


__all__ = [
    "FlowDPMPPSampler",
    "FlowSchedule",
    "FlowUniPCSampler",
    "NUM_TRAIN_TIMESTEPS",
    "Sampler",
    "SamplerStateError",
    "dpmpp_schedule",
    "make_sampler",
    "unipc_schedule",
]
