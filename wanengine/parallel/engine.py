"""`ParallelEngine`: the `Engine` for a torchrun job, with the parallel modes applied from
outside to the unchanged models (spec `parallel.md`, `pipeline.md` section 7).

What differs from the single-device engine, hook by hook:
- `__init__`: joins the process groups (one rank per device, `npu:<LOCAL_RANK>` /
  `cuda:<LOCAL_RANK>` / cpu); only rank 0 shows progress.
- `_load`: experts get the Ulysses patch (`--ulysses-size`), and are built sharded
  (`--dit-fsdp`, no rank holds a full expert; the experts then stay on the device, no
  offload); the UMT5 encoder likewise (`--t5-fsdp`); the VAE is wrapped to split the frame
  over all ranks (`--vae-parallel`).
- `generate`: the seed is rank 0's (broadcast), so every rank draws the same noise.
- `guidance`: with `--cfg-size 2`, branch 0 computes the conditional and branch 1 the
  unconditional prediction (`cfg_parallel`).
- `decode`: all ranks decode their tile with `--vae-parallel`; otherwise only rank 0 decodes
  and the other ranks return a video with no frames (they write nothing).
"""
from __future__ import annotations

import atexit
import time
from dataclasses import replace
from typing import Any, Dict

import torch
from torch import nn

from ..cache.state import CacheLayout
from ..config import EngineConfig
from ..device import resolve_device
from ..engine import Engine
from ..errors import ConfigError, InvalidArgument
from ..io.checkpoint import EXPERTS
from ..runtime_env import is_lead_rank
from ..stage_log import StageLog
from .cfg_parallel import make_cfg_parallel_guidance
from .fsdp import fsdp2_available, load_dit_sharded, load_t5_sharded, reshard, world_mesh
from .groups import ParallelState, all_reduce_int, broadcast_int, init_parallel, shutdown
from .ulysses import apply_ulysses
from .vae_split import apply_vae_split


def nothing_to_split() -> InvalidArgument:
    """`cfg_size` 2 with guidance off on every step."""
    return InvalidArgument.for_argument("cfg_size", lambda words: (
        f"2 with guidance off on every step (guide scale 1.0): there is one branch per step and nothing to "
        f"split; use {words.name('ulysses_size')} instead"))


class ParallelEngine(Engine):
    """`Engine` for one rank of a `torchrun --nproc_per_node=cfg_size*ulysses_size` job.
    Every rank must construct it and call `generate` with the same arguments."""

    def __init__(self, cfg: EngineConfig, layout=None) -> None:
        cfg = cfg.validate()
        device_type = resolve_device(cfg.device).type
        if cfg.dit_fsdp and cfg.offload_model:
            raise ConfigError.worded(lambda words: (
                f"{words.setting('dit_fsdp')} with {words.setting('offload_model')}: sharded experts stay on the "
                f"devices (about 1/world of each per card); drop {words.name('offload_model')}"))
        if cfg.dit_fsdp and cfg.step_cache != "off" and not fsdp2_available():
            # FSDP1 wraps the expert: the cache's patch on the inner model would never be called
            raise ConfigError.worded(lambda words: (
                f"{words.setting('step_cache', cfg.step_cache)} with {words.setting('dit_fsdp')} needs FSDP2 "
                f"(torch >= 2.4; this is {torch.__version__})"))
        if cfg.t5_fsdp and cfg.t5_cpu and device_type != "cpu":
            raise ConfigError.worded(lambda words: (
                f"{words.setting('t5_fsdp')} with {words.setting('t5_cpu')}: a sharded text encoder runs on the "
                "devices; drop one of them"))
        # Joining the group waits for every rank (and their imports): its own stage, not silence.
        join_log = StageLog(enabled=cfg.progress and is_lead_rank())
        join_log.start("join process group", f"({cfg.world_size} ranks)")
        started = time.perf_counter()
        try:
            self.parallel: ParallelState = init_parallel(cfg.cfg_size, cfg.ulysses_size, device_type)
        except BaseException:
            join_log.end("join process group", time.perf_counter() - started, failed=True)
            raise
        joined = time.perf_counter() - started
        join_log.end("join process group", joined)
        atexit.register(shutdown)
        changes: Dict[str, Any] = {"progress": cfg.progress and self.parallel.is_writer}
        if device_type != "cpu":
            changes["device"] = str(self.parallel.device)
        if cfg.dit_fsdp and cfg.offload_model is None:
            changes["offload_model"] = False  # shards stay on the device; swapping them buys nothing
        super().__init__(replace(cfg, **changes), layout=layout)
        self.load_timer.add("join process group", joined, first=True)

    # ------------------------------------------------------------------ loading
    def _load(self) -> None:
        sharded = self.cfg.dit_fsdp or self.cfg.t5_fsdp
        self._mesh = world_mesh(self.device.type) if sharded else None
        super()._load()
        if self.cfg.vae_parallel:
            self.vae = apply_vae_split(self.vae, self.parallel.world_group)

    def _ulysses(self, model: nn.Module) -> nn.Module:
        """Applied before sharding: the patch must sit on the model, not on an FSDP wrapper."""
        state = self.parallel
        return apply_ulysses(model, state.ulysses_group) if state.ulysses_size > 1 else model

    def load_text_encoder(self) -> nn.Module:
        if not self.cfg.t5_fsdp:
            return super().load_text_encoder()
        self.t5_visits = None  # sharded over the devices, it stays there
        return load_t5_sharded(self.layout.t5, device=self.device, dtype=self.dtype, mesh=self._mesh,
                               quantize=self.quantize_dtype("quantize_t5"))

    def load_experts(self) -> Dict[str, nn.Module]:
        if not self.cfg.dit_fsdp:
            return {name: self._ulysses(expert) for name, expert in super().load_experts().items()}
        from ..adapters.merge import AdapterMerger

        experts = {}
        for name in EXPERTS:  # adapters merge into each full tensor as it streams in, before the rows are kept
            with AdapterMerger(self.adapter_plans.get(name, ())) as merger:
                experts[name] = load_dit_sharded(self.layout.expert(name), device=self.device, dtype=self.dtype,
                                                 mesh=self._mesh, prepare=self._ulysses,
                                                 config_file=self.layout.dit_config,
                                                 quantize=self.quantize_dtype("quantize"),
                                                 merger=merger if merger else None)
        return experts

    # ------------------------------------------------------------------ stages
    def encode_text(self, prompts):
        rows = super().encode_text(prompts)
        if self.cfg.t5_fsdp:
            reshard(self.t5)  # FSDP keeps a root unit's gathered weights after its forward
        return rows

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        if self.cfg.vae_parallel or self.parallel.is_writer:
            return super().decode(latent)
        _, frames, lat_h, lat_w = latent.shape  # nothing to write here: an empty clip
        return torch.empty(3, 0, 8 * lat_h, 8 * lat_w, dtype=torch.float32, device=latent.device)

    # ------------------------------------------------------------------ hooks
    def guidance(self):
        if self.parallel.cfg_size == 2:
            return make_cfg_parallel_guidance(self.parallel.cfg_rank, self.parallel.cfg_group)
        return super().guidance()

    def cache_layout(self) -> CacheLayout:
        # Step-cache decisions are agreed over every rank (Ulysses chunks and CFG groups).
        return CacheLayout.from_parallel(self.parallel)

    def check_guidance(self, unconditional: bool) -> None:
        if self.parallel.cfg_size == 2 and not unconditional:
            raise nothing_to_split()

    def video_forwards(self, local_forwards: int) -> int:
        # With CFG parallel each branch's ranks count their own branch: the video's total is the
        # pair's sum (Ulysses ranks of a branch share each forward, so one rank per branch counts).
        if self.parallel.cfg_size != 2:
            return local_forwards
        return all_reduce_int(local_forwards, group=self.parallel.cfg_group)

    def resolve_seed(self, seed: int) -> int:
        # Every rank must use rank 0's seed (the CLI draws one per process when none is given).
        return broadcast_int(super().resolve_seed(seed), src=0)

    def metadata(self, opts, seed, timer):
        data = super().metadata(opts, seed, timer)
        data["parallel"] = {"world_size": self.parallel.world_size, "cfg_size": self.parallel.cfg_size,
                            "ulysses_size": self.parallel.ulysses_size, "dit_fsdp": self.cfg.dit_fsdp,
                            "t5_fsdp": self.cfg.t5_fsdp, "vae_parallel": self.cfg.vae_parallel}
        return data
