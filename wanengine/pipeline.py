"""The image-to-video denoising pipeline of `spec/pipeline.md`, as plain functions.

It knows nothing about loading or devices beyond the tensors it is handed: the engine
passes an expert provider (which may swap experts between host and device), a guidance
strategy (batched CFG, sequential CFG, or the CFG-parallel one from `wanengine.parallel`)
and a sampler.

Guidance off: a step whose expert's guide scale is exactly 1.0 runs the conditional branch
only (`uncond + 1 * (cond - uncond) = cond`), one DiT forward instead of two; when no step
needs the unconditional branch the negative prompt is not encoded at all
(`needs_unconditional`). The loop counts the DiT forwards it ran (`ForwardCount`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Protocol, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .constants import defaults
from .errors import NumericalError

HIGH, LOW = "high_noise_model", "low_noise_model"


def boundary_timestep() -> float:
    """Timesteps >= this use the high-noise expert (0.9 * 1000 = 900)."""
    d = defaults()
    return d["boundary"] * d["num_train_timesteps"]


Timestep = Union[int, float]  # int for UniPC / DPM++, float for flow Euler (never truncated)


def expert_for(t: Timestep) -> str:
    return HIGH if t >= boundary_timestep() else LOW


def seq_len_for(latent_shape: Sequence[int], sp_size: int = 1) -> int:
    """DiT tokens of a `[C, F', h, w]` latent, rounded up to a multiple of the sequence-parallel degree."""
    _, frames, lat_h, lat_w = latent_shape
    tokens = frames * (lat_h // 2) * (lat_w // 2)
    return int(math.ceil(tokens / sp_size) * sp_size)


def conditioning_video(image: torch.Tensor, height: int, width: int, frame_num: int) -> torch.Tensor:
    """`[3, H0, W0]` in [-1, 1] -> `[3, F, h, w]`: bicubic resize (float32, align_corners=False,
    no antialias, not clamped) as frame 0, then F-1 zero frames."""
    resized = F.interpolate(image[None].float(), size=(height, width), mode="bicubic", align_corners=False)[0]
    video = torch.zeros(3, frame_num, height, width, dtype=torch.float32, device=image.device)
    video[:, 0] = resized
    return video


def first_frame_mask(frames: int, lat_h: int, lat_w: int, device: torch.device) -> torch.Tensor:
    """`[4, F', lat_h, lat_w]`: ones at latent frame 0 (the given image), zeros elsewhere."""
    mask = torch.zeros(4, frames, lat_h, lat_w, dtype=torch.float32, device=device)
    mask[:, 0] = 1.0
    return mask


def initial_noise(seed: int, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """Gaussian noise from a generator on the run device seeded with `seed` (bit-exact with the
    reference on CPU for the same seed)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float32, generator=generator, device=device)


class Expert(Protocol):
    def __call__(self, x: torch.Tensor, t: torch.Tensor, context, y: torch.Tensor, seq_len: int) -> torch.Tensor: ...


class Guidance(Protocol):
    """Computes the guided flow `uncond + g * (cond - uncond)` for one step."""

    def __call__(self, expert: Expert, latent: torch.Tensor, t: int, contexts: Tuple[torch.Tensor, torch.Tensor],
                 y: torch.Tensor, seq_len: int, scale: float) -> torch.Tensor: ...


def _timestep(t: Timestep, batch: int, device: torch.device) -> torch.Tensor:
    """Timesteps stay on the host: the expert's sinusoidal embedding is computed there in
    float64, so a device tensor would only cost a device->host sync every forward. An integer
    timestep is exact in float32; Euler's float timesteps are float32 values already."""
    return torch.full((batch,), t, dtype=torch.float32)


GUIDANCE_OFF = 1.0  # uncond + 1.0 * (cond - uncond) = cond: one forward


def guidance_off(scale: float) -> bool:
    """True when the guide scale makes the unconditional branch irrelevant (exactly 1.0)."""
    return scale == GUIDANCE_OFF


def step_scales(timesteps: Sequence[Timestep], guide_scale: Tuple[float, float]) -> List[float]:
    """The guide scale of every step: (low_noise, high_noise) by the expert of each timestep."""
    return [guide_scale[1] if expert_for(t) == HIGH else guide_scale[0] for t in timesteps]


def needs_unconditional(timesteps: Sequence[Timestep], guide_scale: Tuple[float, float]) -> bool:
    """Whether any step runs the unconditional branch (else the negative prompt is not encoded)."""
    return not all(guidance_off(s) for s in step_scales(timesteps, guide_scale))


def runs_unconditional(opts) -> bool:
    """Whether generating with `opts` (`GenerationOptions`) runs the unconditional branch on any
    step -- what CFG parallel needs -- from the sampler's timesteps (built only when a guide
    scale is 1.0: otherwise every step runs it)."""
    if not any(guidance_off(scale) for scale in opts.guidance):
        return True
    from .schedulers import make_sampler

    timesteps = make_sampler(opts.solver, opts.steps, opts.shift, step_list=opts.denoising_steps).timesteps
    return needs_unconditional(timesteps.tolist(), opts.guidance)


def conditional_only(expert: Expert, latent: torch.Tensor, t: Timestep, contexts: Sequence[Optional[torch.Tensor]],
                     y: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The conditional prediction alone: the guided flow at scale 1.0, one forward."""
    return expert(latent[None], _timestep(t, 1, latent.device), [contexts[0]], y[None], seq_len)[0]


def batched_cfg(expert: Expert, latent: torch.Tensor, t: Timestep, contexts: Tuple[torch.Tensor, torch.Tensor],
                y: torch.Tensor, seq_len: int, scale: float) -> torch.Tensor:
    """Both branches as one batch of 2: the expert's weights are read once per step."""
    if guidance_off(scale):
        return conditional_only(expert, latent, t, contexts, y, seq_len)
    out = expert(torch.stack([latent, latent]), _timestep(t, 2, latent.device), list(contexts),
                 torch.stack([y, y]), seq_len)
    cond, uncond = out[0], out[1]
    return uncond + scale * (cond - uncond)


def sequential_cfg(expert: Expert, latent: torch.Tensor, t: Timestep, contexts: Tuple[torch.Tensor, torch.Tensor],
                   y: torch.Tensor, seq_len: int, scale: float) -> torch.Tensor:
    """The two branches one after the other (half the activation memory of `batched_cfg`)."""
    if guidance_off(scale):
        return conditional_only(expert, latent, t, contexts, y, seq_len)
    timestep = _timestep(t, 1, latent.device)
    cond = expert(latent[None], timestep, [contexts[0]], y[None], seq_len)[0]
    uncond = expert(latent[None], timestep, [contexts[1]], y[None], seq_len)[0]
    return uncond + scale * (cond - uncond)


PREFETCH_STEPS = 2  # an expert switch is announced this many steps ahead


def next_expert_within(timesteps: Sequence[Timestep], index: int, steps: int) -> Optional[str]:
    """The expert that takes over within the `steps` steps after step `index`, if it is not
    the one step `index` uses; else None."""
    current = expert_for(timesteps[index])
    for t in timesteps[index + 1:index + 1 + max(steps, 0)]:
        if expert_for(t) != current:
            return expert_for(t)
    return None


@dataclass
class StepInfo:
    """What `on_step(info, latent)` is told after each denoising step.

    index: the step just finished, from 0; timestep: its sampler timestep (999 ... 0); expert:
    the expert that ran it ("high_noise_model" or "low_noise_model"); num_steps: the steps of
    the whole run (so `index + 1` of `num_steps` are done)."""

    index: int
    timestep: Timestep
    expert: str
    num_steps: int = 0


@dataclass
class ForwardCount:
    """DiT forwards the loop ran on this process: one per latent row an expert evaluated (a
    batched-CFG call counts 2), so a 40-step guided video costs 80 and a 4-step unguided one 4."""

    forwards: int = 0

    def counted(self, expert: Expert) -> Expert:
        def run(x: torch.Tensor, t: torch.Tensor, context, y: torch.Tensor, seq_len: int) -> torch.Tensor:
            self.forwards += x.shape[0] if x.dim() == 5 else 1
            return expert(x, t, context, y, seq_len)

        return run


def denoise(
    *,
    get_expert: Callable[[str], Expert],
    sampler,
    latent: torch.Tensor,
    y: torch.Tensor,
    contexts: Tuple[torch.Tensor, torch.Tensor],
    seq_len: int,
    guide_scale: Tuple[float, float],
    guidance: Guidance = batched_cfg,
    on_step: Optional[Callable[[StepInfo, torch.Tensor], None]] = None,
    prefetch: Optional[Callable[[str], object]] = None,
    prefetch_steps: int = PREFETCH_STEPS,
    count: Optional[ForwardCount] = None,
) -> torch.Tensor:
    """Run the sampler from `latent` (noise) to the final latent.

    `guide_scale` is (low_noise, high_noise). Every latent is checked for NaN/Inf; on the CPU
    right away, on an accelerator through per-step flags read once at the end, so the loop
    never waits on the device except to read the (host-side) timesteps.

    `prefetch(name)`, when given, is called at each of the `prefetch_steps` steps that precede
    a switch to expert `name` (the timesteps are known up front), after the current expert is
    in place and has run at least one step (so the device's activation peak is known), and
    before the step's work is queued: an expert provider can start moving `name` in while the
    current expert still computes.

    `count`, when given, is incremented by every DiT forward the guidance runs.
    """
    # Python ints for UniPC / DPM++ (int64 timesteps), floats for Euler: no truncation here.
    timesteps: List[Timestep] = sampler.timesteps.tolist()
    nonfinite = torch.zeros(len(timesteps), dtype=torch.bool, device=latent.device)
    immediate = latent.device.type == "cpu"
    previous = None
    for index, t in enumerate(timesteps):
        name = expert_for(t)
        expert = get_expert(name)
        upcoming = next_expert_within(timesteps, index, prefetch_steps)
        if prefetch is not None and upcoming is not None and name == previous:
            prefetch(upcoming)
        previous = name
        scale = guide_scale[1] if name == HIGH else guide_scale[0]
        if count is not None:
            expert = count.counted(expert)
        with torch.no_grad():
            flow = guidance(expert, latent, t, contexts, y, seq_len, scale)
            latent = sampler.step(flow, t, latent)
        nonfinite[index] = ~torch.isfinite(latent).all()
        info = StepInfo(index, t, name, len(timesteps))
        if immediate and bool(nonfinite[index]):
            _raise_nonfinite(info, len(timesteps))
        if on_step is not None:
            on_step(info, latent)
    if not immediate and bool(nonfinite.any()):
        first = int(nonfinite.nonzero()[0, 0])
        _raise_nonfinite(StepInfo(first, timesteps[first], expert_for(timesteps[first]), len(timesteps)),
                         len(timesteps))
    return latent


def _raise_nonfinite(info: StepInfo, steps: int) -> None:
    raise NumericalError(
        f"non-finite values (NaN/Inf) in the latent after step {info.index + 1}/{steps} "
        f"(timestep {info.timestep}, expert {info.expert})")  # the engine adds the dtype's hint (numerics.hinted)
