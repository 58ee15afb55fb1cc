"""Samplers against the reference schedules and trajectories (golden scheduler.safetensors).

Each golden case runs the solver from `x0` with the synthetic flow
`v_i = sin(x * (1 + 0.1 i)) + 0.3 x` at step i and stores every intermediate sample.
float32 on CPU must match every step to <= 1e-5 relative (golden README); the current
implementation is in fact bit-exact.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict

import pytest
import torch

from helpers import rel_err
from wanengine.errors import ConfigError
from wanengine.schedulers import (
    FlowDPMPPSampler,
    FlowUniPCSampler,
    SamplerStateError,
    make_sampler,
)
from wanengine.schedulers.schedule import unipc_sigma_max

CASES = [(40, 5.0), (6, 5.0), (4, 1.0), (1, 5.0), (13, 3.0)]
SOLVERS = ["unipc", "dpm++"]
ALL_CASES = [(solver, steps, shift) for solver in SOLVERS for steps, shift in CASES]


def _case_id(case) -> str:
    solver, steps, shift = case
    return f"{solver}-{steps}-{shift}"


@pytest.fixture(scope="module")
def scheduler_golden(golden: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(golden / "scheduler.safetensors"))


def synthetic_flow(x: torch.Tensor, i: int) -> torch.Tensor:
    """meta.json `scheduler_model_output`: sin(sample * (1 + 0.1 i)) + 0.3 sample."""
    return torch.sin(x * (1 + 0.1 * i)) + 0.3 * x


@pytest.mark.parametrize("case", ALL_CASES, ids=_case_id)
def test_schedule_matches_reference(case, scheduler_golden) -> None:
    solver, steps, shift = case
    prefix = f"{solver}_{steps}_{shift}_"
    sampler = make_sampler(solver, steps, shift)
    assert sampler.timesteps.dtype == torch.int64
    assert torch.equal(sampler.timesteps, scheduler_golden[prefix + "timesteps"])
    assert sampler.sigmas.dtype == torch.float32 and sampler.sigmas.shape == (steps + 1,)
    assert float(sampler.sigmas[-1]) == 0.0
    assert float((sampler.sigmas - scheduler_golden[prefix + "sigmas"]).abs().max()) <= 1e-6


@pytest.mark.parametrize("case", ALL_CASES, ids=_case_id)
def test_trajectory_matches_reference(case, scheduler_golden) -> None:
    solver, steps, shift = case
    prefix = f"{solver}_{steps}_{shift}_"
    sampler = make_sampler(solver, steps, shift)
    trajectory = scheduler_golden[prefix + "traj"]  # [S, 1, 16, 2, 3, 4]
    x = scheduler_golden[prefix + "x0"].clone()
    errors = []
    for i, t in enumerate(sampler.timesteps):
        x = sampler.step(synthetic_flow(x, i), t, x)
        assert x.dtype == torch.float32
        errors.append(rel_err(x, trajectory[i]))
    assert max(errors) <= 1e-5, f"per-step relative errors {errors}"


def test_schedule_details_from_spec() -> None:
    # float32(0.999) is UniPC's first sigma; DPM++ starts at exactly 1.0 (timestep 1000).
    assert unipc_sigma_max() == 0.9990000128746033
    assert make_sampler("unipc", 40, 5.0).timesteps[:3].tolist() == [999, 994, 989]
    dpm = make_sampler("dpm++", 40, 5.0)
    assert int(dpm.timesteps[0]) == 1000 and float(dpm.sigmas[0]) == 1.0
    # Truncation, not rounding: shift 1, 4 steps -> sigmas 0.999, 0.74925, 0.4995, 0.24975.
    assert make_sampler("unipc", 4, 1.0).timesteps.tolist() == [999, 749, 499, 249]


@pytest.mark.parametrize("solver", SOLVERS)
def test_last_step_returns_data_estimate(solver) -> None:
    """sigma = 0 at the end: lambda = +inf and the update must return x - sigma_k v exactly."""
    torch.manual_seed(0)
    sampler = make_sampler(solver, 3, 5.0)
    x = torch.randn(2, 5)
    for i, t in enumerate(sampler.timesteps):
        v = torch.randn(2, 5)
        x_in = x
        x = sampler.step(v, t, x)
        assert torch.isfinite(x).all()
    assert torch.equal(x, x_in - float(sampler.sigmas[-2]) * v)


def test_factory_names_and_errors() -> None:
    assert isinstance(make_sampler("unipc", 4, 5.0), FlowUniPCSampler)
    assert isinstance(make_sampler("dpm++", 4, 5.0), FlowDPMPPSampler)
    assert isinstance(make_sampler("dpmpp", 4, 5.0), FlowDPMPPSampler)
    with pytest.raises(ConfigError, match="heun"):
        make_sampler("heun", 4, 5.0)
    with pytest.raises(ConfigError, match="steps"):
        make_sampler("unipc", 0, 5.0)
    with pytest.raises(ConfigError, match="shift"):
        make_sampler("dpm++", 4, -1.0)
    with pytest.raises(ConfigError, match="shift"):
        make_sampler("unipc", 4, float("nan"))


@pytest.mark.parametrize("solver", SOLVERS)
def test_step_order_is_enforced_and_reset_reuses(solver) -> None:
    sampler = make_sampler(solver, 3, 5.0)
    x0 = torch.linspace(-1, 1, 12).reshape(3, 4)

    def run() -> torch.Tensor:
        x = x0
        for i, t in enumerate(sampler.timesteps):
            x = sampler.step(synthetic_flow(x, i), t, x)
        return x

    first = run()
    assert sampler.step_index == 3
    with pytest.raises(SamplerStateError, match="all 3 steps"):
        sampler.step(x0, sampler.timesteps[-1], x0)
    sampler.reset()
    assert torch.equal(run(), first)
    # A fresh sampler given the second timestep first refuses it (and accepts plain ints).
    fresh = make_sampler(solver, 3, 5.0)
    with pytest.raises(SamplerStateError, match="expects timestep"):
        fresh.step(x0, int(fresh.timesteps[1]), x0)
    fresh.step(x0, int(fresh.timesteps[0]), x0)
    assert fresh.step_index == 1


# bf16/fp16 samples: the model output v_i is taken from the float32 reference trajectory so
# the comparison measures the sampler's own rounding, not the synthetic model's sensitivity
# (sin(4.9 x) at step 39 amplifies any input error ~5x per step). Honest bound: rounding
# accumulates like a random walk of about 2.5 units of roundoff per step
# (bf16 eps 2^-8 -> 1e-2 * sqrt(S); fp16 eps 2^-11 -> 1.5e-3 * sqrt(S)). Observed worst:
# bf16 3.5e-2 (UniPC 40 steps, bound 6.3e-2), fp16 5.9e-3 (bound 9.5e-3).
LOW_PRECISION_SCALE = {torch.bfloat16: 1e-2, torch.float16: 1.5e-3}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", ALL_CASES, ids=_case_id)
def test_low_precision_sample_stays_close(case, dtype, scheduler_golden) -> None:
    solver, steps, shift = case
    prefix = f"{solver}_{steps}_{shift}_"
    sampler = make_sampler(solver, steps, shift)
    trajectory = scheduler_golden[prefix + "traj"]
    reference_x = scheduler_golden[prefix + "x0"]
    x = reference_x.to(dtype)
    bound = LOW_PRECISION_SCALE[dtype] * math.sqrt(steps)
    for i, t in enumerate(sampler.timesteps):
        x = sampler.step(synthetic_flow(reference_x, i).to(dtype), t, x)
        assert x.dtype == dtype
        err = rel_err(x, trajectory[i])
        assert err <= bound, f"step {i}: {err:.3e} > {bound:.3e}"
        reference_x = trajectory[i]


def test_dpmpp_updates_in_float32_and_casts_back() -> None:
    torch.manual_seed(1)
    x32 = torch.randn(4, 8)
    vs = [torch.randn(4, 8) for _ in range(3)]
    low, full = make_sampler("dpm++", 3, 5.0), make_sampler("dpm++", 3, 5.0)
    x_low, x_full = x32.to(torch.bfloat16), x32.to(torch.bfloat16).float()
    for i, t in enumerate(low.timesteps):
        x_low = low.step(vs[i].to(torch.bfloat16), t, x_low)
        x_full = full.step(vs[i].to(torch.bfloat16).float(), t, x_full).to(torch.bfloat16).float()
        # Same float32 arithmetic on the same inputs, one rounding to bf16 at the end.
        assert x_low.dtype == torch.bfloat16 and torch.equal(x_low.float(), x_full)


def test_unipc_casts_model_output_to_sample_dtype() -> None:
    sampler = make_sampler("unipc", 2, 5.0)
    x = torch.ones(3, dtype=torch.bfloat16)
    out = sampler.step(torch.ones(3, dtype=torch.float32), sampler.timesteps[0], x)
    assert out.dtype == torch.bfloat16
