"""The memory preflight: will this run fit, before a single weight is loaded?

The estimate is `wanengine.plan`'s memory model (`make_plan`), fed with the sizes of the
checkpoint actually given (the experts' configs, the UMT5 and VAE tensor shapes from their
files' headers -- no weight data is read), the requested frame size,
frames and steps, and the run's layout (offload, T5 on the CPU, parallel degrees). It is
compared with what the run device has free (`torch.cuda/npu.mem_get_info`) or, on the CPU,
with the host memory available (`MemAvailable`, capped by a cgroup limit). A run that does not
fit is refused with "needs ~X GB, have Y GB; reduce --frame-num/--size or use ..." (exit 2);
`--ignore-memory-check` skips the refusal.

`WANENGINE_MEMORY_GB` overrides the memory the check assumes is available (for containers
whose limits the probes cannot see, and for tests).
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional

from .errors import ConfigError

GB = 1e9
MEMORY_ENV = "WANENGINE_MEMORY_GB"


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


def available_bytes(device) -> Optional[float]:
    """Free memory of `device` (a torch.device) in bytes; the host's for the CPU; None if unknown."""
    override = os.environ.get(MEMORY_ENV)
    if override:
        try:
            value = float(override)
        except ValueError:
            raise ConfigError(f"{MEMORY_ENV}: {override!r} is not a number of GB") from None
        if not value > 0:
            raise ConfigError(f"{MEMORY_ENV}: must be a positive number of GB, got {override!r}")
        return value * GB
    if device.type == "cpu":
        return host_available_bytes()
    try:
        import torch

        module = getattr(torch, device.type)
        free, _ = module.mem_get_info(device)
        return float(free)
    except Exception:  # no runtime query on this backend: do not guess
        return None


def checkpoint_sizes(layout, expert_config) -> Dict[str, dict]:
    """The plan's model sizes (`dit`, `t5`, `vae`) for this checkpoint, from its config and the
    tensor shapes of the memory-mapped UMT5 / VAE files (no weight data is read)."""
    from .models.t5 import open_t5
    from .models.vae import open_vae

    t5 = open_t5(layout.t5)[0].cfg  # built on the meta device from the file's shapes; no data read
    vae = open_vae(layout.vae)[0].config
    dit = {k: v for k, v in asdict(expert_config).items() if k != "patch_size"}
    return {"dit": dit, "t5": asdict(t5),
            "vae": {**asdict(vae), "dim_mult": list(vae.dim_mult), "temporal_downsample": list(vae.temporal_downsample)}}


def estimate_peak_bytes(cfg, opts, frame_size, sizes: Dict[str, dict], device) -> float:
    """Peak bytes on one device for this run (plan's model), times the ranks sharing a host
    when the run device is the CPU."""
    from .plan import make_plan

    on_cpu = device.type == "cpu"
    offload = cfg.offload_model if cfg.offload_model is not None else not on_cpu
    width, height = frame_size
    plan = make_plan(size=f"{width}*{height}", frame_num=opts.frame_num, steps=opts.steps, solver=opts.solver,
                     cfg=True, ulysses_size=cfg.ulysses_size, cfg_size=cfg.cfg_size, dit_fsdp=cfg.dit_fsdp,
                     t5_fsdp=cfg.t5_fsdp, t5_cpu=cfg.t5_cpu and not on_cpu,
                     offload=offload and not on_cpu,  # on the CPU an "offloaded" expert is still in host memory
                     cfg_batch=cfg.cfg_batch, dtype=cfg.dtype, vae_parallel=cfg.vae_parallel,
                     max_area=width * height, image_aspect=height / width, placement=device.type, model_sizes=sizes,
                     weights=cfg.quantize, t5_weights=cfg.quantize_t5, step_cache=cfg.step_cache,
                     guide_scale=opts.guidance, shift=opts.shift)
    peak = plan.memory.peak
    if on_cpu and cfg.distributed:
        peak *= int(os.environ.get("LOCAL_WORLD_SIZE", cfg.world_size))
    return peak


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


def check_memory(cfg, opts, frame_size, layout, expert_config, device) -> Optional[float]:
    """Raise ConfigError if the estimate exceeds the available memory; returns the estimate
    in bytes (None when the available memory is unknown and nothing was compared)."""
    have = available_bytes(device)
    if have is None:
        return None
    need = estimate_peak_bytes(cfg, opts, frame_size, checkpoint_sizes(layout, expert_config), device)
    if need > have:
        where = "host memory" if device.type == "cpu" else f"free on {device}"
        raise ConfigError(f"memory: this run needs ~{need / GB:.1f} GB, have {have / GB:.1f} GB ({where}); "
                          f"reduce --frame-num/--size or use {advice(cfg, device)}")
    return need
