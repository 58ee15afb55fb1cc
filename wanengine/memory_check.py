"""The memory preflight: will this run fit, before a single weight is loaded?

The estimate is `wanengine.plan`'s memory model (`make_plan`), fed with the sizes of the
checkpoint actually given (the experts' configs, the UMT5 and VAE tensor shapes from their
files' headers -- no weight data is read), the weight bytes the engine will hold for each
component (`held_weights`: published 8-bit layers at their 8-bit size plus scales, `--quantize`
/ `--quantize-t5` likewise, float32-kept tensors at 4 bytes), the requested frame size,
frames and steps, and the run's layout (offload, T5 on the CPU, parallel degrees). It is
compared with what the run device has free (`torch.cuda/npu.mem_get_info`) or, on the CPU,
with the host memory available (`MemAvailable`, capped by a cgroup limit). On an accelerator
the weights the engine keeps in host memory (with offload both experts' host copies and the
text encoder, with `--t5-cpu` the encoder; times the ranks on this host) are compared with the
host memory as well. A run that does not fit is refused with one line, "memory: this run
needs ~X GB, have Y GB (...); reduce --frame-num/--size or use ..." or "memory: this run keeps
~X GB of weights in host memory ..., have Y GB ..." (exit 2); `--ignore-memory-check` skips
the refusal.

`WANENGINE_MEMORY_GB` overrides the memory the check assumes is available on the run device
(the host, on the CPU) and `WANENGINE_HOST_MEMORY_GB` the host memory beside an accelerator
(for containers whose limits the probes cannot see, and for tests).
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional

from .errors import ConfigError

GB = 1e9
MEMORY_ENV = "WANENGINE_MEMORY_GB"
HOST_MEMORY_ENV = "WANENGINE_HOST_MEMORY_GB"


def host_available_bytes() -> Optional[float]:
    """MemAvailable, capped by the cgroup (v2 or v1) limit minus its usage; None if unknown."""
    available = None
    try:
        with open("/proc/meminfo", "r", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = float(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit_text = Path(limit_file).read_text().strip()
            usage = float(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text.isdigit() and float(limit_text) < 2**60:
            free = max(float(limit_text) - usage, 0.0)
            available = free if available is None else min(available, free)
        break
    return available


def _override_bytes(variable: str) -> Optional[float]:
    """The GB an environment variable sets, in bytes (None when unset)."""
    override = os.environ.get(variable)
    if not override:
        return None
    try:
        value = float(override)
    except ValueError:
        raise ConfigError(f"{variable}: {override!r} is not a number of GB") from None
    if not value > 0:
        raise ConfigError(f"{variable}: must be a positive number of GB, got {override!r}")
    return value * GB


def host_budget_bytes() -> Optional[float]:
    """Host memory available beside an accelerator (`WANENGINE_HOST_MEMORY_GB` if set)."""
    override = _override_bytes(HOST_MEMORY_ENV)
    return override if override is not None else host_available_bytes()


def available_bytes(device) -> Optional[float]:
    """Free memory of `device` (a torch.device) in bytes; the host's for the CPU; None if unknown."""
    override = _override_bytes(MEMORY_ENV)
    if override is not None:
        return override
    if device.type == "cpu":
        return host_available_bytes()
    try:
        import torch

        module = getattr(torch, device.type)
        free, _ = module.mem_get_info(device)
        return float(free)
    except Exception:  # no runtime query on this backend: do not guess
        return None


def checkpoint_sizes(layout, expert_config, t5_model=None) -> Dict[str, dict]:
    """The plan's model sizes (`dit`, `t5`, `vae`) for this checkpoint, from its config and the
    tensor shapes of the memory-mapped UMT5 / VAE files (no weight data is read). `t5_model`:
    the encoder on the meta device (`held_weights.open_t5_on_meta`), if already opened."""
    from .held_weights import open_t5_on_meta
    from .models.vae import open_vae

    if t5_model is None:  # built on the meta device from the file's shapes (8-bit ones too); no data read
        t5_model = open_t5_on_meta(layout.t5, dtype=None)
    t5 = t5_model.cfg
    vae = open_vae(layout.vae)[0].config
    dit = {k: v for k, v in asdict(expert_config).items() if k != "patch_size"}
    return {"dit": dit, "t5": asdict(t5),
            "vae": {**asdict(vae), "dim_mult": list(vae.dim_mult), "temporal_downsample": list(vae.temporal_downsample)}}


def local_ranks(cfg) -> int:
    """Ranks of this job on this host (each holds its own host copies)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", cfg.world_size)) if cfg.distributed else 1


def run_plan(cfg, opts, frame_size, sizes: Dict[str, dict], device, held=None):
    """`plan`'s model of this run (`held`: the `held_weights.HeldWeights` of the checkpoint)."""
    from .plan import make_plan

    on_cpu = device.type == "cpu"
    width, height = frame_size
    return make_plan(size=f"{width}*{height}", frame_num=opts.frame_num, steps=opts.steps, solver=opts.solver,
                     cfg=True, ulysses_size=cfg.ulysses_size, cfg_size=cfg.cfg_size, dit_fsdp=cfg.dit_fsdp,
                     t5_fsdp=cfg.t5_fsdp, t5_cpu=cfg.t5_cpu and not on_cpu,
                     # None: the engine's default (on, but off with --dit-fsdp); on the CPU an
                     # "offloaded" expert is still in host memory
                     offload=False if on_cpu else cfg.offload_model,
                     cfg_batch=cfg.cfg_batch, dtype=cfg.dtype, vae_parallel=cfg.vae_parallel,
                     max_area=width * height, image_aspect=height / width, placement=device.type, model_sizes=sizes,
                     weights=cfg.quantize, t5_weights=cfg.quantize_t5, step_cache=cfg.step_cache,
                     guide_scale=opts.guidance, shift=opts.shift, held_weights=held)


def device_need_bytes(plan, cfg, device) -> float:
    """Peak bytes on one device (plan's model), times the ranks sharing a host on the CPU."""
    return plan.memory.peak * (local_ranks(cfg) if device.type == "cpu" else 1)


def host_need_bytes(plan, cfg) -> float:
    """Weights kept in host memory beside an accelerator, for every rank on this host."""
    return plan.host_bytes_per_rank * local_ranks(cfg)


def advice(cfg, device) -> str:
    options = []
    if device.type != "cpu":
        if not cfg.offload_model:
            options.append("--offload-model")
        if not cfg.t5_cpu:
            options.append("--t5-cpu")
        if cfg.world_size == 1:
            options.append("more devices (--ulysses-size/--dit-fsdp under torchrun)")
    options.append("--dtype bfloat16" if cfg.dtype == "float32" else None)
    options.append("--ignore-memory-check to try anyway")
    return ", ".join(o for o in options if o)


def host_advice(cfg, offload: bool) -> str:
    options = ["--no-offload-model if the device holds both experts" if offload else None,
               "the encoder on the device (no --t5-cpu)" if cfg.t5_cpu else None,
               "--quantize int8" if not cfg.quantize else None,
               "--dit-fsdp --t5-fsdp under torchrun (shards stay on the devices)",
               "--ignore-memory-check to try anyway"]
    return ", ".join(o for o in options if o)


def check_memory(cfg, opts, frame_size, layout, expert_config, device) -> Optional[float]:
    """Raise ConfigError if the estimate exceeds the available memory -- the run device's, and
    beside an accelerator the host's for the weights kept there; returns the device estimate in
    bytes (None when the available memory is unknown and nothing was compared)."""
    from .held_weights import held_weights, t5_for_config

    have = available_bytes(device)
    host_have = host_budget_bytes() if device.type != "cpu" else None
    if have is None and host_have is None:
        return None
    t5_model = t5_for_config(layout, cfg)
    sizes = checkpoint_sizes(layout, expert_config, t5_model)
    plan = run_plan(cfg, opts, frame_size, sizes, device, held_weights(layout, cfg, t5_model))
    need = device_need_bytes(plan, cfg, device)
    if have is not None and need > have:
        where = "host memory" if device.type == "cpu" else f"free on {device}"
        raise ConfigError(f"memory: this run needs ~{need / GB:.1f} GB, have {have / GB:.1f} GB ({where}); "
                          f"reduce --frame-num/--size or use {advice(cfg, device)}")
    host_need = host_need_bytes(plan, cfg)
    if host_have is not None and host_need > host_have:
        ranks = local_ranks(cfg)
        kept = "the offloaded experts and the text encoder" if plan.offload else "the text encoder (--t5-cpu)"
        raise ConfigError(f"memory: this run keeps ~{host_need / GB:.1f} GB of weights in host memory ({kept}"
                          f"{f', {ranks} ranks on this host' if ranks > 1 else ''}), have {host_have / GB:.1f} GB "
                          f"available; use {host_advice(cfg, plan.offload)}")
    return need if have is not None else None
