"""`Engine(cfg).i2v(image, prompt)`: loads the components of a checkpoint (any layout) once and
runs the image-to-video pipeline, returning a `Video`.

Order of work: validate the configuration and preflight the checkpoint (no weights read),
then load tokenizer, UMT5, VAE and both experts exactly once, streaming each tensor to its
device and dtype.
"""
from __future__ import annotations

import contextlib
import random
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import __version__, kernels
from .cache.apply import StepCache
from .cache.state import CacheLayout
from .config import EngineConfig, GenerationOptions, latent_grid
from .device import prepare_device, resolve_device, resolve_dtype, synchronizer
from .experts import ExpertSwitcher
from .io.checkpoint import EXPERTS, CheckpointLayout, preflight_checkpoint
from .io.image import ImageLike, image_to_tensor, open_image
from .io.video import Video
from .numerics import check_finite, hinted
from .pipeline import (HIGH, LOW, ForwardCount, StepInfo, batched_cfg, conditioning_video, denoise, first_frame_mask,
                       guidance_off, initial_noise, needs_unconditional, seq_len_for, sequential_cfg)
from .progress import ChunkProgress, StepProgress, causal_chunk_frames, vae_chunks
from .schedulers import make_sampler
from .stage_log import StageLog, human_bytes
from .timing import StageTimer


def bytes_on_disk(path: Path) -> int:
    """Size of a file, or of all files under a directory (a sharded expert, the tokenizer)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Engine:
    """The Wan2.2-I2V-A14B image-to-video engine.

    Example:
        >>> engine = Engine(EngineConfig(ckpt_dir="Wan2.2-I2V-A14B"))
        >>> video = engine.i2v("cat.jpg", "a cat surfing", frame_num=81)
        >>> video.save("cat.mp4")

    `layout`: the checkpoint as `io.checkpoint.preflight_checkpoint` already checked it for this
    `cfg` (the CLI's and the server's preflight hand theirs over, so the headers are read once);
    None checks it here.
    """

    def __init__(self, cfg: EngineConfig, *, layout: Optional[CheckpointLayout] = None) -> None:
        self.cfg = cfg.validate()
        self.device = resolve_device(cfg.device)
        prepare_device(self.device)
        self.dtype = resolve_dtype(cfg.dtype)
        self.vae_dtype = resolve_dtype(cfg.vae_dtype)
        self.layout = layout if layout is not None else preflight_checkpoint(cfg.ckpt_dir, cfg.component_overrides(),
                                                                              cfg.dit_config)
        self.adapter_plans = self.plan_adapters()  # every adapter checked before any expert loads
        # This engine's own kernels, bound around its work (`kernels.using_own_kernels`): another
        # engine in the process, with another backend, cannot switch them.
        self.kernel_set = kernels.select(cfg.kernel_backend, self.device)
        self.kernel_backend = self.kernel_set.name
        self.offload = cfg.offload_model if cfg.offload_model is not None else self.device.type != "cpu"
        self.stage_log = StageLog(enabled=cfg.progress)  # one progress line per stage on stderr
        self.load_timer = StageTimer(synchronizer(self.device), log=self.stage_log)
        self.step_cache = StepCache.from_config(cfg, self.dtype)  # reads the mag table before any weight
        self._load()
        if self.step_cache is not None:
            self.step_cache.attach(self.experts.experts, self.cache_layout())

    # ------------------------------------------------------------------ loading
    def _load(self) -> None:
        from .models import Tokenizer, load_vae

        def stage(name: str, *paths: Path):  # a load stage with its bytes on disk (for a GB/s figure)
            nbytes = sum(map(bytes_on_disk, paths))
            return self.load_timer.stage(name, f"({human_bytes(nbytes)})", nbytes=nbytes)

        with stage("load tokenizer", self.layout.tokenizer):
            self.tokenizer = Tokenizer(self.layout.tokenizer)
        with stage("load text encoder", self.layout.t5):
            self.t5 = self.load_text_encoder()
        with stage("load VAE", self.layout.vae):
            self.vae = load_vae(self.layout.vae, device=self.device, dtype=self.vae_dtype)
        with stage("load experts", *(self.layout.expert(name) for name in EXPERTS)):
            self.experts = ExpertSwitcher(self.load_experts(), self.device, self.offload)

    def load_text_encoder(self) -> nn.Module:
        """UMT5 on the device, or on the host with `t5_cpu` or offload. With offload (and not
        `t5_cpu`) it visits the device only to encode; its host copy stays, so leaving the
        device is dropping the device tensors, not copying 11 GB back."""
        from .quant.loading import load_t5  # models.load_t5, plus 8-bit encoders and --quantize-t5

        home = torch.device("cpu") if (self.cfg.t5_cpu or self.offload) else self.device
        t5 = load_t5(self.layout.t5, device=home, dtype=self.dtype, quantize=self.quantize_dtype("quantize_t5"))
        visits = self.offload and not self.cfg.t5_cpu
        self.t5_visits = ExpertSwitcher({"t5": t5}, self.device, offload=True) if visits else None
        return t5

    def load_experts(self) -> Dict[str, nn.Module]:
        """Both experts, on the host with offload (the switcher moves one in at a time)."""
        from .quant.loading import load_expert  # load_dit, plus 8-bit experts and --quantize
        from .adapters.merge import AdapterMerger

        home = torch.device("cpu") if self.offload else self.device
        quantize = self.quantize_dtype("quantize")
        experts = {}
        for name in EXPERTS:  # adapters merge into each tensor as it streams in (float32, then stored dtype)
            with AdapterMerger(self.adapter_plans.get(name, ())) as merger:
                experts[name] = load_expert(self.layout.expert(name), device=home, dtype=self.dtype,
                                            quantize=quantize, config_file=self.layout.dit_config,
                                            merger=merger if merger else None)
        return experts

    def quantize_dtype(self, option: str) -> Optional[torch.dtype]:
        """The 8-bit storage dtype `--quantize` / `--quantize-t5` asks for, or None."""
        from .quant.schemes import config_quant_dtype

        return config_quant_dtype(self.cfg, option)

    # ------------------------------------------------------------------ adapters
    def plan_adapters(self):
        """The configured LoRA adapters checked against both experts' tensor shapes (headers only)."""
        from .adapters.plan import plan_checkpoint_adapters

        plans = plan_checkpoint_adapters(self.cfg.loras, self.layout)
        self.adapter_report = [p.summary() for name in EXPERTS for p in plans[name]]
        return plans

    # ------------------------------------------------------------------ stages
    @kernels.using_own_kernels
    def encode_text(self, prompts: Sequence[str]) -> Tuple[torch.Tensor, ...]:
        """Prompts -> per-prompt UMT5 rows `[n_i, 4096]` on the run device."""
        t5_device = torch.device("cpu") if self.cfg.t5_cpu else self.device
        ids, mask = self.tokenizer(list(prompts))
        t5 = self.t5_visits.get("t5") if self.t5_visits is not None else self.t5
        with torch.no_grad():
            rows = t5.encode(ids.to(t5_device), mask.to(t5_device))
        if self.t5_visits is not None:
            self.t5_visits.release()  # T5 leaves the accelerator once the prompts are encoded
        return tuple(r.to(self.device) for r in rows)

    @kernels.using_own_kernels
    def encode_image(self, image: torch.Tensor, frames: int, lat_h: int, lat_w: int, frame_num: int) -> torch.Tensor:
        """`[3, H0, W0]` in [-1, 1] -> conditioning `y [20, F', lat_h, lat_w]` (mask + VAE latent)."""
        video = conditioning_video(image.to(self.device), 8 * lat_h, 8 * lat_w, frame_num)
        with torch.no_grad():
            latent = self.vae.encode(video.to(self.vae_dtype)).float()
        return torch.cat([first_frame_mask(frames, lat_h, lat_w, self.device), latent], dim=0)

    @kernels.using_own_kernels
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.vae.decode(latent.to(self.vae_dtype), tile_rows=self.cfg.vae_tile_rows).float()

    # ------------------------------------------------------------------ the job
    def i2v(
        self,
        image: ImageLike,
        prompt: str,
        negative_prompt: Optional[str] = None,
        size: Optional[Union[str, Tuple[int, int]]] = None,
        max_area: Optional[int] = None,
        frame_num: int = 81,
        steps: int = 40,
        shift: float = 5.0,
        solver: str = "unipc",
        guide_scale: Union[float, str, Tuple[float, float]] = (3.5, 3.5),
        seed: int = -1,
        *,
        on_step: Optional[Callable[[StepInfo, torch.Tensor], None]] = None,
        denoising_steps: Optional[Sequence[float]] = None,
    ) -> Video:
        """Generate a video from `image` and `prompt`; see `GenerationOptions` for the options.

        `image`: a path, encoded bytes, a PIL image, a numpy array or a torch tensor (see
        `wanengine.io.image_input`). `guide_scale` is one float or (low_noise, high_noise);
        `seed < 0` draws one (reported as `video.seed`). `denoising_steps` (solver "euler")
        lists the timesteps, e.g. (1000, 750, 500, 250). Step-distilled weights:
        `**wanengine.presets.preset_values("distill-4step")`.

        `on_step(info, latent)`, if given, is called after every denoising step with a
        `StepInfo` (index, timestep, expert, num_steps) and the current latent
        `[16, F', H/8, W/8]` (on the run device; do not modify it). Raising
        `wanengine.errors.GenerationCancelled` from it stops the run after that step: the
        exception propagates out of `i2v` and the engine stays usable for the next call.

        Invalid arguments raise `wanengine.errors.InvalidArgument` (a `ValueError`) naming the
        argument, before any work is done."""
        opts = GenerationOptions(prompt=prompt, negative_prompt=negative_prompt, size=size, max_area=max_area,
                                 frame_num=frame_num, steps=steps, shift=shift, solver=solver,
                                 guide_scale=guide_scale, seed=seed, denoising_steps=denoising_steps).validate()
        return self.generate(open_image(image), opts, on_step=on_step)

    @kernels.using_own_kernels
    def generate(self, image, opts: GenerationOptions, *, on_step=None) -> Video:
        """`i2v` on an already opened RGB PIL image and validated options."""
        timer = StageTimer(synchronizer(self.device), log=self.stage_log)
        if self.step_cache is not None:
            self.step_cache.check_steps(opts.steps)
        frames, lat_h, lat_w = latent_grid(image.height, image.width, opts.resolved_max_area, opts.frame_num)
        seed = self.resolve_seed(opts.seed)
        sampler = make_sampler(opts.solver, opts.steps, opts.shift, device=self.device,
                               step_list=opts.denoising_steps)
        unconditional = needs_unconditional(sampler.timesteps.tolist(), opts.guidance)
        self.check_guidance(unconditional)
        if unconditional:
            with timer.stage("text encode", "(prompt and negative prompt)"):
                contexts = self.encode_text([opts.prompt, opts.resolved_negative_prompt])
        else:  # guidance off on every step: the negative prompt is never used
            with timer.stage("text encode", "(prompt; guidance off, no negative prompt)"):
                contexts = (self.encode_text([opts.prompt])[0], None)
        encoding = ChunkProgress("VAE encode", causal_chunk_frames(opts.frame_num), self.stage_log)
        with timer.stage("VAE encode", f"({image.width}x{image.height} -> {8 * lat_w}x{8 * lat_h}, "
                                       f"{frames} latent frames)"), vae_chunks(self.vae, "encoder", encoding):
            y = self.encode_image(image_to_tensor(image), frames, lat_h, lat_w, opts.frame_num)
        noise = initial_noise(seed, (16, frames, lat_h, lat_w), self.device)
        progress = StepProgress(len(sampler.timesteps), enabled=self.cfg.progress)

        def step_done(info: StepInfo, latent: torch.Tensor) -> None:
            progress.update(info)
            if on_step is not None:
                on_step(info, latent)

        count = ForwardCount()
        low_scale, high_scale = opts.guidance
        cond_only = [name for name, scale in ((HIGH, high_scale), (LOW, low_scale)) if guidance_off(scale)]
        cache_run = self.step_cache.begin(len(sampler.timesteps), cond_only) if self.step_cache is not None else None
        with timer.stage("denoise", announce=False), progress, hinted(self.cfg.dtype, "denoise"), \
                (cache_run or contextlib.nullcontext()):
            get_expert = cache_run.track(self.experts.get) if cache_run is not None else self.experts.get
            latent = denoise(get_expert=get_expert, sampler=sampler, latent=noise, y=y, contexts=contexts,
                             seq_len=self.seq_len(noise.shape), guide_scale=opts.guidance,
                             guidance=self.guidance(), on_step=step_done, prefetch=self.experts.prefetch,
                             count=count)
        decoding = ChunkProgress("VAE decode", causal_chunk_frames(opts.frame_num), self.stage_log)
        with timer.stage("VAE decode", f"({frames} latent frames -> {opts.frame_num} frames)"), \
                vae_chunks(self.vae, "decoder", decoding):
            video = self.decode(latent)
        check_finite(video, "VAE decode", self.cfg.vae_dtype)  # NaN/Inf VAE weights: an error, not a garbage video
        metadata = self.metadata(opts, seed, timer)
        if cache_run is not None:
            metadata["cache"] = cache_run.report()
        metadata["dit_forwards"] = self.video_forwards(count.forwards)
        if self.adapter_report:
            metadata["adapters"] = self.adapter_report
        return Video(tensor=video.cpu(), latent=latent.float().cpu(), fps=16, seed=seed, metadata=metadata)

    # ------------------------------------------------------------------ hooks for parallel runs
    def seq_len(self, latent_shape) -> int:
        return seq_len_for(latent_shape, self.cfg.ulysses_size)

    def guidance(self):
        return batched_cfg if self.cfg.cfg_batch else sequential_cfg

    def cache_layout(self) -> CacheLayout:
        """Where this process sits for the step cache's decisions (one process: alone)."""
        return CacheLayout()

    def check_guidance(self, unconditional: bool) -> None:
        """Hook: a layout may refuse a run whose steps never need the unconditional branch."""

    def video_forwards(self, local_forwards: int) -> int:
        """DiT forwards of the whole video from this process's count (one process: the same)."""
        return local_forwards

    def resolve_seed(self, seed: int) -> int:
        """The seed to use: `seed` itself, or a random one when it is negative."""
        return seed if seed >= 0 else random.randint(0, 2**31 - 1)

    def metadata(self, opts: GenerationOptions, seed: int, timer: StageTimer) -> Dict[str, Any]:
        return {
            "settings": {**asdict(opts.with_seed(seed)), "guide_scale": list(opts.guidance)},
            "engine": {k: v for k, v in asdict(self.cfg).items() if k != "progress"},
            "kernel_backend": self.kernel_backend,
            "device": str(self.device),
            "timings_s": {"load": round(self.load_timer.total, 4),
                          **{k: round(v, 4) for k, v in timer.seconds.items()}},
            "versions": {"wanengine": __version__, "torch": torch.__version__, "python": sys.version.split()[0]},
        }
