"""One CLI generation, split into a preflight that reads no weights and the run itself.

`preflight_run` checks every option, the checkpoint layout, the image, the output path and
the parallel layout in well under two seconds; only then does `run_i2v` load tens of GB.
Every stage prints a progress line and becomes a row of the final stage table, which adds
up to the wall time since the process started (`wanengine.clock`). Importing this module
does not import torch.
"""
from __future__ import annotations

import json
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from .cache.report import cache_summary, check_cache_table
from .config import EngineConfig, GenerationOptions, latent_grid
from .errors import ConfigError
from .io.checkpoint import EXPERTS, preflight_checkpoint
from .io.output_paths import VIDEO_EXTENSIONS, check_output_file, check_run_outputs
from .runtime_env import is_lead_rank
from .stage_log import StageLog
from .timing import StageTimer


@dataclass
class RunPlan:
    cfg: EngineConfig
    opts: GenerationOptions
    image: object  # an opened RGB PIL image
    out: Path
    metrics_json: Optional[Path]
    frame_size: tuple  # (width, height)
    timings: Dict[str, float] = field(default_factory=dict)  # stages before the engine (check inputs, read image)
    source_notes: tuple = ()  # component options that beat the --ckpt-dir's (shown at --verbose)
    layout: object = None  # the checked `io.checkpoint.CheckpointLayout`, handed to the engine


def check_parallel_layout(cfg: EngineConfig, num_heads: int) -> None:
    """world size == cfg_size * ulysses_size, heads divisible, and actually launched by torchrun."""
    if cfg.ulysses_size > 1 and num_heads % cfg.ulysses_size != 0:
        raise ConfigError(f"--ulysses-size {cfg.ulysses_size}: must divide the {num_heads} attention heads")
    if not cfg.distributed:
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not launched:
        raise ConfigError(f"--ulysses-size {cfg.ulysses_size} --cfg-size {cfg.cfg_size}: multi-card runs need "
                          f"torchrun, e.g. torchrun --nproc_per_node={cfg.world_size} -m wanengine.cli i2v ...")
    if world != cfg.world_size:
        raise ConfigError(f"--ulysses-size {cfg.ulysses_size} x --cfg-size {cfg.cfg_size} = {cfg.world_size} ranks, "
                          f"but torchrun started {world}; they must be equal")


def check_fewstep_run(cfg: EngineConfig, opts: GenerationOptions, layout) -> None:
    """Before any weight: every adapter against the experts' shapes (headers only), and
    `--cfg-size 2` refused when no step runs the unconditional branch."""
    from .adapters.plan import plan_checkpoint_adapters
    from .pipeline import runs_unconditional

    plan_checkpoint_adapters(cfg.loras, layout)
    if cfg.cfg_size == 2 and not runs_unconditional(opts):
        from .parallel.engine import nothing_to_split

        raise nothing_to_split()


def default_output_name(opts: GenerationOptions, frame_size: tuple) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", opts.prompt).strip("_")[:40] or "video"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(f"i2v-A14B_{frame_size[0]}x{frame_size[1]}_{opts.frame_num}f_seed{opts.seed}_{slug}_{stamp}.mp4")


def check_before_torch(cfg: EngineConfig, opts: GenerationOptions, image_path, out: Optional[Path] = None,
                       metrics_json: Optional[Path] = None) -> Tuple[Optional[Path], Optional[Path]]:
    """The input checks that need no torch, run before torch's 1-5 s import so that the most
    common mistakes -- a mistyped checkpoint, image, adapter, table or output path -- come back
    at once. The full checks (headers, shapes, the parallel layout) follow later. Returns the
    output paths to write (`out`, `metrics_json`; a symlink resolved, None where not given)."""
    from .adapters.plan import check_adapter_file
    from .io.checkpoint import resolve_sources
    from .io.image_input import normalize_image_input

    resolve_sources(cfg.ckpt_dir, cfg.component_overrides(), cfg.dit_config)
    if isinstance(image_path, (str, os.PathLike)):
        normalize_image_input(image_path)
    for spec in cfg.loras:
        check_adapter_file(Path(os.fspath(spec.path)))
    check_cache_table(cfg, opts.steps)
    return (check_output_file(out, "out", extensions=VIDEO_EXTENSIONS) if out is not None else None,
            check_output_file(metrics_json, "metrics_json") if metrics_json is not None else None)


def preflight_run(cfg: EngineConfig, opts: GenerationOptions, image_path, out: Optional[Path],
                  metrics_json: Optional[Path], *, startup: Optional[float] = None,
                  ignore_memory_check: bool = False) -> RunPlan:
    """Validate everything a run needs, without reading any weight; returns the plan.
    `startup`: seconds from the process start to here (the stage table's first row).
    `ignore_memory_check`: skip the refusal of a run the memory estimate says does not fit."""
    timer = StageTimer()  # silent: a bad input must stay the only line printed
    if startup is not None:
        timer.add("start-up", startup)
    with timer.stage("check inputs"):
        cfg.validate()
        opts.validate()
        out, metrics_json = check_before_torch(cfg, opts, image_path, out, metrics_json)
    with timer.stage("import torch"):  # its own row: 1-5 s that would otherwise hide in the checks
        import torch  # noqa: F401

        from .io.image import open_image
    with timer.stage("check inputs"):
        layout = preflight_checkpoint(cfg.ckpt_dir, cfg.component_overrides(), cfg.dit_config)
        expert_config = layout.dit_configs[EXPERTS[0]]
        check_parallel_layout(cfg, expert_config.num_heads)
        check_fewstep_run(cfg, opts, layout)
    with timer.stage("read image", f"({image_path})"):
        image = open_image(image_path)
    with timer.stage("check inputs", announce=False):
        _, lat_h, lat_w = latent_grid(image.height, image.width, opts.resolved_max_area, opts.frame_num)
        if opts.seed < 0:  # draw now so the file name, the log and the metadata agree
            opts = opts.with_seed(random.randint(0, 2**31 - 1))
        frame_size = (8 * lat_w, 8 * lat_h)
        if out is None:  # named from the settings: known only now
            out = check_output_file(default_output_name(opts, frame_size), "out", extensions=VIDEO_EXTENSIONS)
        outputs = {"out": out, **({"metrics_json": metrics_json} if metrics_json is not None else {})}
        check_run_outputs(outputs, image=image_path, ckpt_dir=cfg.ckpt_dir,
                          reads=[part.path for part in layout.components.values()])
        if not ignore_memory_check:
            from .device import resolve_device
            from .memory_check import check_memory

            check_memory(cfg, opts, frame_size, layout, expert_config, resolve_device(cfg.device))
    return RunPlan(cfg, opts, image, out, metrics_json, frame_size, dict(timer.seconds), source_notes=layout.notes,
                   layout=layout)


def run_i2v(plan: RunPlan, say: Callable[..., None] = lambda message, level=1: print(message)) -> Path:
    """Load, generate, write; print the seed, the output and the stage table, whose rows add
    up to the wall time since the process started (`plan.timings` holds the earlier rows)."""
    from .clock import process_age

    lead = is_lead_rank()
    if not lead:  # one rank speaks for a torchrun job
        def say(message: str, level: int = 1) -> None:
            return None

    timer = StageTimer(log=StageLog(plan.cfg.progress and lead))
    for name, seconds in plan.timings.items():
        timer.add(name, seconds)
    width, height = plan.frame_size
    for note in plan.source_notes:
        say(note, level=2)
    say(f"i2v: {width}x{height}, {plan.opts.frame_num} frames, {plan.opts.steps} {plan.opts.solver} steps, "
        f"seed {plan.opts.seed}")
    with timer.stage("import engine", announce=False):  # torch is in already: a fraction of a second
        from .engine import Engine
        from .parallel import is_writer, make_engine

    # the checkpoint the preflight checked: its headers are not read again
    engine = make_engine(plan.cfg, plan.layout) if plan.cfg.distributed else Engine(plan.cfg, layout=plan.layout)
    say(f"engine: device {engine.device}, dtype {plan.cfg.dtype}, kernels {engine.kernel_backend}, "
        f"offload {'on' if engine.offload else 'off'}, loaded in {engine.load_timer.total:.1f} s", level=2)
    for line in getattr(engine, "adapter_report", ()):
        say(line)
    for name, seconds in engine.load_timer.seconds.items():
        timer.add(name, seconds)
    video = engine.generate(plan.image, plan.opts)
    for name, seconds in video.metadata["timings_s"].items():
        if name != "load":  # the per-component load rows are in already
            timer.add(name, seconds)
    if is_writer():
        with timer.stage("write", f"{plan.out}"):
            video.save(plan.out)
        video.metadata["timings_s"]["write"] = round(timer.seconds["write"], 4)
        wall = process_age()
        video.metadata["stages_s"] = {**{k: round(v, 4) for k, v in timer.seconds.items()},
                                      "other": round(max(0.0, wall - timer.total), 4), "wall": round(wall, 4)}
        say(f"wrote {plan.out} ({video.num_frames} frames, seed {video.seed})", level=0)  # even --quiet records the seed
        if plan.cfg.progress:
            say(timer.table(wall=wall))
            if "cache" in video.metadata:
                say(cache_summary(video.metadata["cache"]))
        if plan.metrics_json is not None:
            write_metrics(plan.metrics_json, video.metadata, plan.out)
    return plan.out


def write_metrics(path: Path, metadata: dict, out: Path) -> None:
    """The metrics JSON, atomically (fsynced, read back) -- never over anything but a complete file."""
    from . import interrupts
    from .io.atomic import write_text_atomically

    payload = {**metadata, "output": str(out)}
    write_text_atomically(path, json.dumps(payload, indent=1, default=str))
    interrupts.note_written(path)
