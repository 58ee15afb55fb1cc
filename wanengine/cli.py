"""The `wanengine` command line: argument parsing, preflight, progress and exit codes only --
all model logic lives in `wanengine.engine`.

Exit codes: 0 success, 2 usage or input errors (one line on stderr, no traceback), 1 runtime
failures (`--debug` shows the traceback), 130 interrupted. The reference release's flag
spellings (`--ckpt_dir`, `--sample_steps`, `--base_seed`, `--save_file`, ...) are accepted too.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

from .errors import UserInputError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="wanengine: Wan2.2-I2V-A14B image-to-video inference (Ascend NPU, CUDA, CPU).")


class _State:
    debug = False
    verbosity = 1  # 0 quiet, 1 normal, 2 verbose


def say(message: str, level: int = 1) -> None:
    """Print a status line to stderr unless --quiet (level 2 lines need --verbose)."""
    if _State.verbosity >= level:
        print(message, file=sys.stderr, flush=True)


def fail(message: str, code: int) -> None:
    print(f"wanengine: error: {message}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


def handles_errors(command: Callable) -> Callable:
    """Turn user errors into one line + exit 2, other failures into one line + exit 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except UserInputError as exc:
            if _State.debug:
                raise
            fail(str(exc), 2)
        except KeyboardInterrupt:
            print("wanengine: interrupted; no output was written", file=sys.stderr)
            raise typer.Exit(130)
        except Exception as exc:  # runtime failure: one line unless --debug
            if _State.debug:
                raise
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            fail(f"{type(exc).__name__}: {first} (run with --debug for the traceback)", 1)

    return wrapper


@app.callback()
def _global(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More output."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors; no progress bar or tables."),
) -> None:
    _State.debug = debug
    _State.verbosity = 0 if quiet else (2 if verbose else 1)


# --------------------------------------------------------------------------- i2v
@app.command()
@handles_errors
def i2v(
    ckpt_dir: Path = typer.Option(..., "--ckpt-dir", "--ckpt_dir", help="Released Wan2.2-I2V-A14B checkpoint directory."),
    image: Path = typer.Option(..., "--image", help="Input image (any format PIL reads; EXIF orientation applied)."),
    prompt: str = typer.Option(..., "--prompt", help="Text prompt."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", "--negative_prompt",
                                                  help="Negative prompt (default: the reference's)."),
    size: Optional[str] = typer.Option(None, "--size", help="W*H, e.g. 1280*720 or 832*480; sets the max area."),
    max_area: Optional[int] = typer.Option(None, "--max-area", "--max_area", help="Pixel area (overrides --size)."),
    frame_num: int = typer.Option(81, "--frame-num", "--frame_num", help="Frames, 4n+1."),
    sample_steps: int = typer.Option(40, "--sample-steps", "--sample_steps", help="Denoising steps."),
    sample_shift: float = typer.Option(5.0, "--sample-shift", "--sample_shift", help="Flow shift (3.0 suits 480p)."),
    sample_solver: str = typer.Option("unipc", "--sample-solver", "--sample_solver", help="unipc or dpm++."),
    guide_scale: str = typer.Option("3.5,3.5", "--guide-scale", "--sample_guide_scale", "--sample-guide-scale",
                                    help="One value, or LOW,HIGH for the low-/high-noise experts."),
    seed: int = typer.Option(-1, "--seed", "--base_seed", "--base-seed", help="Seed; negative draws one."),
    out: Optional[Path] = typer.Option(None, "--out", "--save_file", "--save-file", help="Output .mp4 or .safetensors."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda[:N], npu[:N] (default: best available)."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="float32, bfloat16 or float16."),
    kernel_backend: str = typer.Option("auto", "--kernel-backend", "--kernel_backend", help="auto, reference, cuda, npu."),
    offload_model: Optional[bool] = typer.Option(None, "--offload-model/--no-offload-model",
                                                 help="Keep only the active expert on the device."),
    t5_cpu: bool = typer.Option(False, "--t5-cpu", "--t5_cpu", help="Run the text encoder on the CPU."),
    vae_tile_rows: Optional[int] = typer.Option(None, "--vae-tile-rows", help="Decode in exact bands of N latent rows."),
    ulysses_size: int = typer.Option(1, "--ulysses-size", "--ulysses_size", help="Sequence-parallel degree."),
    cfg_size: int = typer.Option(1, "--cfg-size", "--cfg_size", help="2: the guidance branches on two groups."),
    dit_fsdp: bool = typer.Option(False, "--dit-fsdp", "--dit_fsdp", help="Shard the DiT experts (FSDP)."),
    t5_fsdp: bool = typer.Option(False, "--t5-fsdp", "--t5_fsdp", help="Shard the text encoder (FSDP)."),
    vae_parallel: bool = typer.Option(False, "--vae-parallel", "--vae_parallel", help="Split the VAE over the ranks."),
    metrics_json: Optional[Path] = typer.Option(None, "--metrics-json", help="Write timings, settings, seed, versions."),
    task: str = typer.Option("i2v-A14B", "--task", help="Accepted for reference scripts; must be i2v-A14B."),
    preset: Optional[str] = typer.Option(None, "--preset", rich_help_panel="Few-step and LoRA",
                                         help="distill-4step: euler, 4 steps, shift 5.0, guidance 1.0 "
                                              "(explicit flags override)."),
    denoising_steps: Optional[str] = typer.Option(None, "--denoising-steps", rich_help_panel="Few-step and LoRA",
                                                  help="Euler timesteps, e.g. 1000,750,500,250."),
    lora: Optional[List[str]] = typer.Option(None, "--lora", rich_help_panel="Few-step and LoRA",
                                             help="PATH[:STRENGTH] adapter for both experts (repeatable)."),
    lora_high: Optional[List[str]] = typer.Option(None, "--lora-high", rich_help_panel="Few-step and LoRA",
                                                  help="PATH[:STRENGTH] adapter for the high-noise expert."),
    lora_low: Optional[List[str]] = typer.Option(None, "--lora-low", rich_help_panel="Few-step and LoRA",
                                                 help="PATH[:STRENGTH] adapter for the low-noise expert."),
    context: typer.Context = None,  # which flags were given explicitly (they override --preset)
) -> None:
    """Generate a video from an image and a prompt."""
    from .adapters.spec import lora_specs_from_flags
    from .config import EngineConfig, GenerationOptions
    from .run import preflight_run, run_i2v

    if task != "i2v-A14B":
        raise UserInputError(f"--task: {task!r} is not supported; this engine runs i2v-A14B")
    sampling = _sampling_options(context, preset, denoising_steps, steps=sample_steps, shift=sample_shift,
                                 solver=sample_solver, guide_scale=guide_scale)
    opts = GenerationOptions(prompt=prompt, negative_prompt=negative_prompt, size=size, max_area=max_area,
                             frame_num=frame_num, seed=seed, **sampling)
    cfg = EngineConfig(ckpt_dir=str(ckpt_dir), device=device, dtype=dtype, kernel_backend=kernel_backend,
                       offload_model=offload_model, t5_cpu=t5_cpu, vae_tile_rows=vae_tile_rows,
                       ulysses_size=ulysses_size, cfg_size=cfg_size, dit_fsdp=dit_fsdp, t5_fsdp=t5_fsdp,
                       vae_parallel=vae_parallel, progress=_State.verbosity > 0,
                       loras=tuple(lora_specs_from_flags(lora or (), lora_high or (), lora_low or ())))
    plan = preflight_run(cfg, opts, image, out, metrics_json)
    run_i2v(plan, say=say)


_SAMPLING_PARAMS = {"steps": "sample_steps", "shift": "sample_shift", "solver": "sample_solver",
                    "guide_scale": "guide_scale"}


def _sampling_options(context: Optional[typer.Context], preset: Optional[str], denoising_steps: Optional[str],
                      names: Optional[dict] = None, **values) -> dict:
    """steps / shift / solver / guide_scale (+ denoising_steps): each flag given on the command
    line wins, then the preset's value, then the flag's default. `names`: option -> the
    command's parameter name (default: the i2v command's)."""
    names = names or _SAMPLING_PARAMS
    from .config import parse_step_list
    from .presets import resolve_with_preset

    def given(key: str) -> bool:
        source = context.get_parameter_source(names[key]) if context is not None else None
        return source is None or source.name not in ("DEFAULT", "DEFAULT_MAP")

    explicit = {key: value for key, value in values.items() if given(key)}
    resolved = resolve_with_preset(preset or "", explicit, values)
    if denoising_steps is not None:
        steps = parse_step_list(denoising_steps)
        if "steps" in explicit and explicit["steps"] != len(steps):
            raise UserInputError(f"--denoising-steps gives {len(steps)} steps but --sample-steps is {explicit['steps']}")
        if "solver" not in explicit:
            resolved["solver"] = "euler"  # a step list is the euler sampler's input
        resolved.update(steps=len(steps), denoising_steps=steps)
    return resolved


# --------------------------------------------------------------------------- demo
@app.command()
@handles_errors
def demo(
    out: Path = typer.Option(Path("demo.mp4"), "--out", help="Where to write the demo video (.mp4 or .safetensors)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where the random demo checkpoint is kept."),
    seed: int = typer.Option(42, "--seed", help="Seed of the generation."),
) -> None:
    """Run the whole pipeline on a small random-weight checkpoint (no downloads, < 1 minute on CPU)."""
    from .demo import run_demo

    run_demo(out, cache_dir=cache_dir, seed=seed, say=say, progress=_State.verbosity > 0)


# --------------------------------------------------------------------------- info
@app.command()
@handles_errors
def info(
    ckpt_dir: Optional[Path] = typer.Option(None, "--ckpt-dir", "--ckpt_dir", help="Checkpoint directory."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    lora: Optional[List[Path]] = typer.Option(None, "--lora", rich_help_panel="Few-step and LoRA",
                                              help="A LoRA file: target modules, rank, alpha, what is skipped "
                                                   "(checked against --ckpt-dir, else the released shapes)."),
) -> None:
    """What is in a checkpoint (component sizes, dtypes, configs) without loading weights."""
    if lora:
        from .adapters.inspect import describe_adapter, format_adapter

        adapters = [describe_adapter(path, ckpt_dir) for path in lora]
        print(json.dumps(adapters, indent=1) if as_json else "\n\n".join(format_adapter(a) for a in adapters))
        return
    if ckpt_dir is None:
        raise UserInputError("--ckpt-dir: give a checkpoint directory (or --lora FILE to describe an adapter)")
    from .io.inspect import describe_checkpoint, format_description

    description = describe_checkpoint(ckpt_dir)
    print(json.dumps(description, indent=1) if as_json else format_description(description))



# --------------------------------------------------------------------------- plan
@app.command("plan")
@handles_errors
def plan_command(
    size: str = typer.Option("1280*720", "--size", help="W*H whose area bounds the frame."),
    max_area: Optional[int] = typer.Option(None, "--max-area", "--max_area"),
    image_aspect: Optional[float] = typer.Option(None, "--image-aspect", help="Input image height/width."),
    frame_num: int = typer.Option(81, "--frame-num", "--frame_num"),
    steps: int = typer.Option(40, "--sample-steps", "--sample_steps"),
    solver: str = typer.Option("unipc", "--sample-solver", "--sample_solver"),
    guidance: bool = typer.Option(True, "--cfg/--no-cfg", help="Guidance on: 2 forwards per step."),
    world_size: Optional[int] = typer.Option(None, "--world-size", help="Default: cfg-size x ulysses-size."),
    ulysses_size: int = typer.Option(1, "--ulysses-size", "--ulysses_size"),
    cfg_size: int = typer.Option(1, "--cfg-size", "--cfg_size"),
    dit_fsdp: bool = typer.Option(False, "--dit-fsdp", "--dit_fsdp"),
    t5_fsdp: bool = typer.Option(False, "--t5-fsdp", "--t5_fsdp"),
    t5_cpu: bool = typer.Option(False, "--t5-cpu", "--t5_cpu"),
    offload_model: Optional[bool] = typer.Option(None, "--offload-model/--no-offload-model"),
    cfg_batch: bool = typer.Option(True, "--cfg-batch/--no-cfg-batch"),
    dtype: str = typer.Option("bfloat16", "--dtype"),
    vae_parallel: bool = typer.Option(False, "--vae-parallel", "--vae_parallel"),
    hardware: Optional[str] = typer.Option(None, "--hardware", help="h100, h200, ascend-a2 or cpu."),
    peak_tflops: Optional[float] = typer.Option(None, "--peak-tflops"),
    memory_gb: Optional[float] = typer.Option(None, "--memory-gb"),
    efficiency: Optional[float] = typer.Option(None, "--efficiency", help="Fraction of peak achieved."),
    link_gbps: Optional[float] = typer.Option(None, "--link-gbps", help="Per-link bandwidth for communication."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    guide_scale: Optional[str] = typer.Option(None, "--guide-scale", "--sample_guide_scale",
                                              rich_help_panel="Few-step and LoRA",
                                              help="LOW,HIGH: a step whose expert has 1.0 runs one forward."),
    sample_shift: float = typer.Option(5.0, "--sample-shift", "--sample_shift", rich_help_panel="Few-step and LoRA",
                                       help="Flow shift (routes the steps to the experts with --guide-scale)."),
    preset: Optional[str] = typer.Option(None, "--preset", rich_help_panel="Few-step and LoRA",
                                         help="distill-4step: euler, 4 steps, shift 5.0, guidance off."),
    context: typer.Context = None,  # which flags were given explicitly (they override --preset)
) -> None:
    """Estimate FLOP, memory per device and time for one video; needs no weights."""
    import dataclasses

    from .plan import format_plan, make_plan

    steps, solver, sample_shift, scales = _plan_sampling(context, preset, steps, solver, sample_shift, guide_scale)
    result = make_plan(size=size, max_area=max_area, image_aspect=image_aspect, frame_num=frame_num, steps=steps,
                       solver=solver, cfg=guidance, world_size=world_size, ulysses_size=ulysses_size, cfg_size=cfg_size,
                       dit_fsdp=dit_fsdp, t5_fsdp=t5_fsdp, t5_cpu=t5_cpu, offload=offload_model, cfg_batch=cfg_batch,
                       dtype=dtype, vae_parallel=vae_parallel, device=hardware, device_peak_tflops=peak_tflops,
                       device_memory_gb=memory_gb, efficiency=efficiency, link_gbps=link_gbps,
                       guide_scale=scales, shift=sample_shift)
    print(json.dumps(dataclasses.asdict(result), indent=2, default=str) if as_json else format_plan(result))


def _plan_sampling(context, preset: Optional[str], steps: int, solver: str, shift: float,
                   guide_scale: Optional[str]):
    """(steps, solver, shift, (low, high) guide scales or None) for `plan`, with --preset."""
    from .config import parse_guide_scale

    if preset:
        names = {"steps": "steps", "shift": "sample_shift", "solver": "solver", "guide_scale": "guide_scale"}
        sampling = _sampling_options(context, preset, None, names, steps=steps, shift=shift, solver=solver,
                                     guide_scale=guide_scale)
        steps, solver, shift, guide_scale = (sampling[k] for k in ("steps", "solver", "shift", "guide_scale"))
    return steps, solver, shift, parse_guide_scale(guide_scale) if guide_scale is not None else None


# --------------------------------------------------------------------------- entry point
_REFERENCE_BOOL_VALUES = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def translate_reference_flags(argv: List[str]) -> List[str]:
    """The reference passes `--offload_model True|False`; map it onto our boolean flag pair."""
    result: List[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        name, eq, value = arg.partition("=")
        if name == "--offload_model":
            if not eq and index + 1 < len(argv) and argv[index + 1].lower() in _REFERENCE_BOOL_VALUES:
                value, index = argv[index + 1], index + 1
            flag = _REFERENCE_BOOL_VALUES.get(value.lower(), True) if (eq or value) else True
            result.append("--offload-model" if flag else "--no-offload-model")
        else:
            result.append(arg)
        index += 1
    return result


def main(argv: Optional[List[str]] = None) -> None:
    """Console-script entry point."""
    from .device import ascend_environment_defaults

    ascend_environment_defaults()  # before anything imports torch_npu
    args = translate_reference_flags(list(sys.argv[1:] if argv is None else argv))
    app(args=args, prog_name="wanengine")


if __name__ == "__main__":
    main()
