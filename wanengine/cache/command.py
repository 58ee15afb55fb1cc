"""`wanengine calibrate-cache`: record a mag-cache table from a real run (registered on the
CLI's app in `wanengine.cli`; the reference's snake_case spellings are rewritten there, as for `i2v`).
Every option is checked before any weight is read; the table is written atomically, only
after the run succeeded. Importing this module imports no torch."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Optional

import typer

from ..errors import ConfigError


def calibrate_cache(
    ckpt_dir: Path = typer.Option(..., "--ckpt-dir", help="Released Wan2.2-I2V-A14B checkpoint directory."),
    image: Path = typer.Option(..., "--image", help="Input image of the calibration run."),
    prompt: str = typer.Option(..., "--prompt", help="Text prompt of the calibration run."),
    out: Path = typer.Option(..., "--out", help="Where to write the table (.json)."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt"),
    size: Optional[str] = typer.Option(None, "--size", help="W*H, e.g. 1280*720 or 832*480; sets the max area."),
    max_area: Optional[int] = typer.Option(None, "--max-area"),
    frame_num: int = typer.Option(81, "--frame-num"),
    sample_steps: int = typer.Option(40, "--sample-steps", help="The table is valid for this count only."),
    sample_shift: float = typer.Option(5.0, "--sample-shift"),
    sample_solver: str = typer.Option("unipc", "--sample-solver"),
    guide_scale: str = typer.Option("3.5,3.5", "--guide-scale"),
    seed: int = typer.Option(-1, "--seed", help="Seed; negative draws one."),
    device: Optional[str] = typer.Option(None, "--device"),
    dtype: str = typer.Option("bfloat16", "--dtype"),
    kernel_backend: str = typer.Option("auto", "--kernel-backend"),
    offload_model: Optional[bool] = typer.Option(None, "--offload-model/--no-offload-model"),
    t5_cpu: bool = typer.Option(False, "--t5-cpu", metavar=""),
) -> None:
    """Record a mag-cache table (per expert and guidance branch) from one real run."""
    from ..cli import say
    from ..config import EngineConfig, GenerationOptions, latent_grid
    from ..io.checkpoint import preflight_checkpoint
    from ..io.image import open_image
    from .table import save_table, summarize

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("calibrate-cache runs on one device; start it without torchrun")
    opts = GenerationOptions(prompt=prompt, negative_prompt=negative_prompt, size=size, max_area=max_area,
                             frame_num=frame_num, steps=sample_steps, shift=sample_shift, solver=sample_solver,
                             guide_scale=guide_scale, seed=seed).validate()
    cfg = EngineConfig(ckpt_dir=str(ckpt_dir), device=device, dtype=dtype, kernel_backend=kernel_backend,
                       offload_model=offload_model, t5_cpu=t5_cpu, progress=say_progress()).validate()
    check_table_path(out)
    preflight_checkpoint(cfg.ckpt_dir, cfg.component_overrides(), cfg.dit_config)
    picture = open_image(image)
    _, lat_h, lat_w = latent_grid(picture.height, picture.width, opts.resolved_max_area, opts.frame_num)
    if opts.seed < 0:
        opts = opts.with_seed(random.randint(0, 2**31 - 1))
    say(f"calibrate-cache: {8 * lat_w}x{8 * lat_h}, {opts.frame_num} frames, {opts.steps} {opts.solver} steps, "
        f"seed {opts.seed}")

    from ..engine import Engine
    from .calibrate import calibrate

    table = calibrate(Engine(cfg), picture, opts, source=str(out))
    save_table(table, out)
    for line in summarize(table):
        say(f"  {line}", level=2)
    say(f"wrote {out} (mag table for {table.steps} steps)")


def say_progress() -> bool:
    from ..cli import _State

    return _State.verbosity > 0


def check_table_path(out: Path) -> None:
    """`--out` follows the output-path rules (`io.output_paths`: a new or regular .json file in
    an existing, writable directory), checked before any weight is read."""
    from ..io.output_paths import check_output_file

    check_output_file(out, "out", extensions=(".json",))
