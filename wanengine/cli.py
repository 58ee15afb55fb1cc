"""The `wanengine` command line: argument parsing, preflight, progress and exit codes only --
all model logic lives in `wanengine.engine`.

Exit codes: 0 success, 2 usage or input errors (one line on stderr, no traceback), 1 runtime
failures (`--debug` shows the traceback), 128 + signal when interrupted (130 SIGINT, 143
SIGTERM, 129 SIGHUP; `wanengine.interrupts`). The official `generate.py`
command lines work unchanged: `wanengine.cli_argv` rewrites the reference's spellings
(`--ckpt_dir`, `--sample_steps`, `--base_seed`, `--save_file`, `--offload_model True`, ...)
before parsing, so the help shows one spelling per option. Arguments are parsed and
validated before torch is imported: `--help` and usage errors come back at once.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Callable, List, Optional

from . import interrupts

interrupts.install_if_cli_process()  # before the imports below: no traceback for an early Ctrl-C

import typer  # noqa: E402

from . import __version__  # noqa: E402
from .cli_argv import UsageError  # noqa: E402
from .cli_quant import PANEL as QUANT_PANEL, quantize_option, quantize_t5_option  # noqa: E402
from .cli_runtime_options import (ADAPTERS as FEWSTEP, STEP_CACHE, cache_max_skips_option,  # noqa: E402
                                  cache_table_option, cache_threshold_option, cache_warmup_option, lora_high_option,
                                  lora_low_option, lora_option, runtime_fields, step_cache_option)
from .cli_weights import (ckpt_dir_option, dit_config_option, high_noise_option, low_noise_option,  # noqa: E402
                          t5_option, tokenizer_option, vae_option, weight_sources)
from .errors import UserInputError  # noqa: E402
from .runtime_env import is_lead_rank, mark_failed  # noqa: E402


class _PlainHelpFlag:
    """Shows --help/-h as the plain flag it is (typer would print a `<bool>` value)."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class Command(_PlainHelpFlag, typer.core.TyperCommand):
    """The class of every wanengine command (`@app.command(cls=Command)`)."""


class Group(_PlainHelpFlag, typer.core.TyperGroup):
    pass


app = typer.Typer(cls=Group, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="wanengine: Wan2.2-I2V-A14B image-to-video inference (Ascend NPU, CUDA, CPU).\n\n"
                       "Global options (--quiet/-q, --verbose/-v, --debug, --version) may also follow the command.")

# Help panels of `i2v` (and `plan`); other features add their own panel names.
INPUTS = "Inputs"
SAMPLING = "Sampling"
PERFORMANCE = "Performance / memory"
PARALLEL = "Parallel (torchrun)"
OUTPUT = "Output"
HARDWARE = "Hardware model"


class _State:
    debug = False
    verbosity = 1  # 0 quiet, 1 normal, 2 verbose


def say(message: str, level: int = 1) -> None:
    """Print a status line to stderr unless --quiet (level 2 lines need --verbose)."""
    if _State.verbosity >= level:
        print(message, file=sys.stderr, flush=True)


def fail(message: str, code: int) -> None:
    """One error line, then exit `code`. In a torchrun job rank 0 prints it; the other ranks
    wait for rank 0 to end the job and leave quietly, printing theirs only when rank 0 does
    not (`rank_errors`; at once with --verbose)."""
    mark_failed()  # no final barrier with the other ranks (parallel.groups.shutdown)
    if is_lead_rank():
        print(f"wanengine: error: {message}", file=sys.stderr, flush=True)
    else:
        from .rank_errors import leave_to_lead_rank

        leave_to_lead_rank(message, code, verbose=_State.verbosity >= 2)
    raise typer.Exit(code)


def user_message(exc: UserInputError) -> str:
    """The message of a user error in the CLI's words (flags, not library argument names)."""
    return getattr(exc, "cli_message", None) or str(exc)


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
            fail(user_message(exc), 2)
        except KeyboardInterrupt:  # reported once, by cli.main (it knows what was written)
            import signal

            raise interrupts.Interrupted(signal.SIGINT) from None
        except Exception as exc:  # runtime failure: one line unless --debug
            if _State.debug:
                raise
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            fail(f"{type(exc).__name__}: {first} (run with --debug for the traceback)", 1)

    return wrapper


def version_line() -> str:
    """wanengine's version with torch's (and torch_npu's) from the package metadata: nothing
    is imported, so it answers at once even where torch is broken."""
    from importlib import metadata

    parts = [f"python {sys.version.split()[0]}"]
    for package in ("torch", "torch_npu"):
        try:
            parts.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            if package == "torch":
                parts.append("torch not installed")
    return f"wanengine {__version__} ({', '.join(parts)})"


def _show_version(value: bool) -> None:
    if value:
        print(version_line())
        raise typer.Exit(0)


@app.callback()
def _global(
    debug: bool = typer.Option(False, "--debug", metavar="", help="Show tracebacks for errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", metavar="", help="More output (engine settings, every rank's errors)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", metavar="", help="Only errors: no progress lines, bar or tables."),
    version: bool = typer.Option(False, "--version", metavar="", callback=_show_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    _State.debug = debug
    _State.verbosity = 0 if quiet else (2 if verbose else 1)


# --------------------------------------------------------------------------- i2v
@app.command(cls=Command, epilog="The reference's spellings (--ckpt_dir, --frame_num, --sample_steps, --base_seed, "
                    "--save_file, --offload_model True, --convert_model_dtype, --task i2v-A14B, ...) are "
                    "accepted too. Global options may follow the command.")
@handles_errors
def i2v(
    ckpt_dir: Optional[Path] = ckpt_dir_option(INPUTS),
    image: Path = typer.Option(..., "--image", rich_help_panel=INPUTS,
                               help="Input image (any format PIL reads; EXIF orientation applied)."),
    prompt: str = typer.Option(..., "--prompt", rich_help_panel=INPUTS, help="Text prompt."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", rich_help_panel=INPUTS,
                                                  show_default="the reference's", help="Negative prompt."),
    size: Optional[str] = typer.Option(None, "--size", rich_help_panel=SAMPLING, show_default="1280*720",
                                       help="W*H whose area bounds the frame; the image's aspect is kept."),
    max_area: Optional[int] = typer.Option(None, "--max-area", rich_help_panel=SAMPLING, show_default="W*H of --size",
                                           help="Pixel area of the frame (overrides --size)."),
    frame_num: int = typer.Option(81, "--frame-num", rich_help_panel=SAMPLING, help="Frames, 4n+1."),
    sample_steps: int = typer.Option(40, "--sample-steps", rich_help_panel=SAMPLING, help="Denoising steps."),
    sample_shift: float = typer.Option(5.0, "--sample-shift", rich_help_panel=SAMPLING,
                                       help="Flow shift (3.0 suits 480p)."),
    sample_solver: str = typer.Option("unipc", "--sample-solver", rich_help_panel=SAMPLING,
                                      help="unipc, dpm++ or euler."),
    guide_scale: str = typer.Option("3.5,3.5", "--guide-scale", rich_help_panel=SAMPLING,
                                    help="One value, or LOW,HIGH for the low-/high-noise experts."),
    seed: int = typer.Option(-1, "--seed", rich_help_panel=SAMPLING, help="Seed; negative draws one."),
    device: Optional[str] = typer.Option(None, "--device", rich_help_panel=PERFORMANCE, show_default="npu > cuda > cpu",
                                         help="cpu, cuda[:N] or npu[:N]."),
    dtype: Optional[str] = typer.Option(None, "--dtype", rich_help_panel=PERFORMANCE, show_default="bfloat16",
                                        help="float32, bfloat16 or float16 (DiT and T5)."),
    kernel_backend: str = typer.Option("auto", "--kernel-backend", rich_help_panel=PERFORMANCE,
                                       help="auto (WANENGINE_KERNEL_BACKEND if set, else by device), reference, torch (alias cuda) or npu."),
    offload_model: Optional[bool] = typer.Option(None, "--offload-model/--no-offload-model", metavar="", rich_help_panel=PERFORMANCE,
                                                 show_default="on for an accelerator, off on CPU",
                                                 help="Keep only the active expert on the device."),
    t5_cpu: bool = typer.Option(False, "--t5-cpu", metavar="", rich_help_panel=PERFORMANCE, help="Run the text encoder on the CPU."),
    vae_tile_rows: Optional[int] = typer.Option(None, "--vae-tile-rows", rich_help_panel=PERFORMANCE,
                                                show_default="untiled", help="Decode in exact bands of N latent rows."),
    ulysses_size: int = typer.Option(1, "--ulysses-size", rich_help_panel=PARALLEL, help="Sequence-parallel degree."),
    cfg_size: int = typer.Option(1, "--cfg-size", rich_help_panel=PARALLEL,
                                 help="2: the guidance branches on two groups of cards."),
    dit_fsdp: bool = typer.Option(False, "--dit-fsdp", metavar="", rich_help_panel=PARALLEL, help="Shard the DiT experts (FSDP)."),
    t5_fsdp: bool = typer.Option(False, "--t5-fsdp", metavar="", rich_help_panel=PARALLEL, help="Shard the text encoder (FSDP)."),
    vae_parallel: bool = typer.Option(False, "--vae-parallel", metavar="", rich_help_panel=PARALLEL,
                                      help="Split the VAE over the ranks."),
    out: Optional[Path] = typer.Option(None, "--out", rich_help_panel=OUTPUT, show_default="named from the settings",
                                       help="Output .mp4 or .safetensors."),
    metrics_json: Optional[Path] = typer.Option(None, "--metrics-json", rich_help_panel=OUTPUT,
                                                help="Write timings, settings, seed, versions as JSON."),
    convert_model_dtype: bool = typer.Option(False, "--convert-model-dtype", metavar="", hidden=True,
                                             help="Reference flag: the DiT runs in bfloat16 (the engine always "
                                                  "converts to --dtype)."),
    task: str = typer.Option("i2v-A14B", "--task", hidden=True, help="Reference flag; must be i2v-A14B."),
    high_noise_model: Optional[Path] = high_noise_option(),
    low_noise_model: Optional[Path] = low_noise_option(),
    t5: Optional[Path] = t5_option(),
    vae: Optional[Path] = vae_option(),
    tokenizer: Optional[Path] = tokenizer_option(),
    dit_config: Optional[Path] = dit_config_option(),
    quantize: Optional[str] = quantize_option(),
    quantize_t5: Optional[str] = quantize_t5_option(),
    ignore_memory_check: bool = typer.Option(False, "--ignore-memory-check", metavar="", rich_help_panel="Reliability",
                                             help="Run even if the memory estimate exceeds what the device or host has."),
    step_cache: str = step_cache_option(),
    cache_threshold: Optional[float] = cache_threshold_option(),
    cache_warmup: int = cache_warmup_option(),
    cache_max_skips: Optional[int] = cache_max_skips_option(),
    cache_table: Optional[Path] = cache_table_option(),
    preset: Optional[str] = typer.Option(None, "--preset", rich_help_panel=FEWSTEP,
                                         help="distill-4step: euler, 4 steps, shift 5.0, guidance 1.0 "
                                              "(explicit flags override)."),
    denoising_steps: Optional[str] = typer.Option(None, "--denoising-steps", rich_help_panel=FEWSTEP, metavar="<t,t,...>",
                                                  help="Euler timesteps, e.g. 1000,750,500,250."),
    lora: Optional[List[str]] = lora_option(),
    lora_high: Optional[List[str]] = lora_high_option(),
    lora_low: Optional[List[str]] = lora_low_option(),
    context: typer.Context = None,  # which flags were given explicitly (they override --preset)
) -> None:
    """Generate a video from an image and a prompt."""
    from .clock import process_age
    from .config import EngineConfig, GenerationOptions

    startup = process_age()  # interpreter, imports and parsing: the first row of the stage table
    check_task(task)
    sampling = _sampling_options(context, preset, denoising_steps, steps=sample_steps, shift=sample_shift,
                                 solver=sample_solver, guide_scale=guide_scale)
    opts = GenerationOptions(prompt=prompt, negative_prompt=negative_prompt, size=size, max_area=max_area,
                             frame_num=frame_num, seed=seed, **sampling)
    sources = weight_sources(ckpt_dir, high_noise_model, low_noise_model, t5, vae, tokenizer, dit_config)
    cfg = EngineConfig(**sources, device=device, dtype=resolve_dtype(dtype, convert_model_dtype),
                       kernel_backend=kernel_backend, offload_model=offload_model, t5_cpu=t5_cpu,
                       vae_tile_rows=vae_tile_rows, ulysses_size=ulysses_size, cfg_size=cfg_size, dit_fsdp=dit_fsdp,
                       t5_fsdp=t5_fsdp, vae_parallel=vae_parallel, progress=_State.verbosity > 0,
                       quantize=quantize, quantize_t5=quantize_t5,
                       **runtime_fields(lora, lora_high, lora_low, step_cache, cache_threshold, cache_warmup,
                                        cache_max_skips, cache_table))
    cfg.validate(), opts.validate()  # usage errors before torch is imported

    from .run import preflight_run, run_i2v

    plan = preflight_run(cfg, opts, image, out, metrics_json, startup=startup, ignore_memory_check=ignore_memory_check)
    run_i2v(plan, say=say)


def check_task(task: str) -> None:
    if task != "i2v-A14B":
        raise UserInputError(f"--task {task}: not supported by this engine (it runs i2v-A14B only)")


def resolve_dtype(dtype: Optional[str], convert_model_dtype: bool) -> str:
    """--dtype, defaulting to bfloat16. The reference's --convert_model_dtype casts the DiT to its
    bfloat16 parameter dtype, which is what the engine does anyway; it only conflicts with
    another explicit --dtype."""
    if convert_model_dtype and dtype not in (None, "bfloat16"):
        raise UserInputError(f"--convert_model_dtype converts the model to bfloat16, but --dtype is {dtype}; "
                             "give one of them")
    return dtype or "bfloat16"


_SAMPLING_PARAMS = {"steps": "sample_steps", "shift": "sample_shift", "solver": "sample_solver",
                    "guide_scale": "guide_scale"}


def _sampling_options(context: Optional[typer.Context], preset: Optional[str], denoising_steps: Optional[str],
                      names: Optional[dict] = None, **values) -> dict:
    """steps / shift / solver / guide_scale (+ denoising_steps): each flag given on the command
    line wins, then the preset's value, then the flag's default. `names`: option -> the
    command's parameter name (default: the i2v command's)."""
    from .config import parse_step_list
    from .presets import resolve_with_preset

    names = names or _SAMPLING_PARAMS

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
@app.command(cls=Command)
@handles_errors
def demo(
    out: Path = typer.Option(Path("demo.mp4"), "--out", help="Where to write the demo video (.mp4 or .safetensors)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", show_default="$WANENGINE_CACHE or ~/.cache/wanengine",
                                             help="Where the random demo checkpoint is kept."),
    seed: int = typer.Option(42, "--seed", help="Seed of the generation."),
    device: Optional[str] = typer.Option(None, "--device", show_default="npu > cuda > cpu",
                                         help="cpu, cuda[:N] or npu[:N]: the device to check."),
    dtype: Optional[str] = typer.Option(None, "--dtype", show_default="float32 on CPU, else bfloat16",
                                        help="float32, bfloat16 or float16."),
) -> None:
    """Run the whole pipeline on a small random-weight checkpoint (no downloads, < 1 minute on CPU).

    Writes the video, the generated input image (<stem>_input.png) and a preview
    (<stem>_preview.png: input | first frame | last frame)."""
    import time

    from .clock import process_age
    from .config import EngineConfig

    startup = process_age()
    EngineConfig(ckpt_dir=".", device=device, dtype=dtype or "float32").validate()  # usage errors before torch
    start = time.perf_counter()
    from .demo import run_demo

    timings = {"start-up": startup, "import torch": time.perf_counter() - start}
    run_demo(out, cache_dir=cache_dir, seed=seed, say=say, progress=_State.verbosity > 0, device=device, dtype=dtype,
             timings=timings)


# --------------------------------------------------------------------------- info
@app.command(cls=Command)
@handles_errors
def info(
    ckpt_dir: Optional[Path] = ckpt_dir_option(),
    as_json: bool = typer.Option(False, "--json", metavar="", help="Print JSON instead of a table."),
    high_noise_model: Optional[Path] = high_noise_option(),
    low_noise_model: Optional[Path] = low_noise_option(),
    t5: Optional[Path] = t5_option(),
    vae: Optional[Path] = vae_option(),
    tokenizer: Optional[Path] = tokenizer_option(),
    dit_config: Optional[Path] = dit_config_option(),
    lora: Optional[List[Path]] = typer.Option(None, "--lora", rich_help_panel=FEWSTEP, metavar="<path>",
                                              help="A LoRA file: target modules, rank, alpha, what is skipped "
                                                   "(checked against the given checkpoint, else the released shapes)."),
) -> None:
    """What is in a checkpoint (component layouts, sizes, dtypes, configs) without loading weights."""
    from .io.inspect import describe_checkpoint, format_description

    sources = weight_sources(ckpt_dir, high_noise_model, low_noise_model, t5, vae, tokenizer, dit_config)
    if lora:
        from .adapters.inspect import describe_adapter, format_adapter
        from .io.checkpoint import preflight_checkpoint

        given = {k: v for k, v in sources.items() if k not in ("ckpt_dir", "dit_config")}
        layout = (preflight_checkpoint(sources["ckpt_dir"], given, sources["dit_config"])
                  if any(sources.values()) else None)
        adapters = [describe_adapter(path, layout) for path in lora]
        print(json.dumps(adapters, indent=1) if as_json else "\n\n".join(format_adapter(a) for a in adapters))
        return
    description = describe_checkpoint(**sources)
    for note in description.get("notes", []):
        say(note, level=2)
    print(json.dumps(description, indent=1) if as_json else format_description(description))


# --------------------------------------------------------------------------- convert
@app.command(cls=Command)
@handles_errors
def convert(
    out: Path = typer.Option(..., "--out", help="New (or empty) directory to write the released layout into."),
    ckpt_dir: Optional[Path] = ckpt_dir_option(),
    high_noise_model: Optional[Path] = high_noise_option(),
    low_noise_model: Optional[Path] = low_noise_option(),
    t5: Optional[Path] = t5_option(),
    vae: Optional[Path] = vae_option(),
    tokenizer: Optional[Path] = tokenizer_option(),
    dit_config: Optional[Path] = dit_config_option(),
    quantize: Optional[str] = quantize_option("int8 or fp8: write the experts' block linears 8-bit "
                                              "(default: 8-bit sources are dequantized to bfloat16)."),
    quantize_t5: Optional[str] = quantize_t5_option(),
) -> None:
    """Write any layout as the released layout, tensor by tensor (stored dtypes kept)."""
    from .io.convert import convert_checkpoint

    sources = weight_sources(ckpt_dir, high_noise_model, low_noise_model, t5, vae, tokenizer, dit_config)
    convert_checkpoint(out, **sources, say=say, quantize=quantize, quantize_t5=quantize_t5)


# --------------------------------------------------------------------------- plan
@app.command("plan", cls=Command, epilog="Any i2v command line is accepted: options plan has no use for (--ckpt-dir, "
                            "--prompt, --seed, --out, ...) are ignored.")
@handles_errors
def plan_command(
    size: str = typer.Option("1280*720", "--size", rich_help_panel=SAMPLING, help="W*H whose area bounds the frame."),
    max_area: Optional[int] = typer.Option(None, "--max-area", rich_help_panel=SAMPLING, show_default="W*H of --size",
                                           help="Pixel area of the frame (overrides --size)."),
    image: Optional[Path] = typer.Option(None, "--image", rich_help_panel=SAMPLING, show_default="the size's aspect",
                                         help="Input image: only its aspect ratio is read (from the header), if it exists here."),
    image_aspect: Optional[float] = typer.Option(None, "--image-aspect", rich_help_panel=SAMPLING,
                                                 show_default="the size's", help="Input image height / width."),
    frame_num: int = typer.Option(81, "--frame-num", rich_help_panel=SAMPLING, help="Frames, 4n+1."),
    steps: int = typer.Option(40, "--sample-steps", rich_help_panel=SAMPLING, help="Denoising steps."),
    solver: str = typer.Option("unipc", "--sample-solver", rich_help_panel=SAMPLING, help="unipc, dpm++ or euler."),
    guidance: bool = typer.Option(True, "--cfg/--no-cfg", metavar="", rich_help_panel=SAMPLING,
                                  help="Guidance on: 2 forwards per step."),
    dtype: Optional[str] = typer.Option(None, "--dtype", rich_help_panel=PERFORMANCE, show_default="bfloat16",
                                        help="float32, bfloat16 or float16."),
    device: Optional[str] = typer.Option(None, "--device", rich_help_panel=PERFORMANCE,
                                         show_default="the --hardware kind",
                                         help="cpu, cuda[:N] or npu[:N]: where the engine would place the weights."),
    offload_model: Optional[bool] = typer.Option(None, "--offload-model/--no-offload-model", metavar="", rich_help_panel=PERFORMANCE,
                                                 show_default="as the engine: on for an accelerator, off on CPU",
                                                 help="Only the active expert on the device."),
    t5_cpu: bool = typer.Option(False, "--t5-cpu", metavar="", rich_help_panel=PERFORMANCE, help="Text encoder on the CPU."),
    cfg_batch: bool = typer.Option(True, "--cfg-batch/--no-cfg-batch", metavar="", rich_help_panel=PERFORMANCE,
                                   help="Both guidance branches as one batch of 2."),
    world_size: Optional[int] = typer.Option(None, "--world-size", rich_help_panel=PARALLEL,
                                             show_default="cfg-size x ulysses-size", help="Number of devices."),
    ulysses_size: int = typer.Option(1, "--ulysses-size", rich_help_panel=PARALLEL, help="Sequence-parallel degree."),
    cfg_size: int = typer.Option(1, "--cfg-size", rich_help_panel=PARALLEL, help="2: guidance branches on two groups."),
    dit_fsdp: bool = typer.Option(False, "--dit-fsdp", metavar="", rich_help_panel=PARALLEL, help="Shard the DiT experts (FSDP)."),
    t5_fsdp: bool = typer.Option(False, "--t5-fsdp", metavar="", rich_help_panel=PARALLEL, help="Shard the text encoder (FSDP)."),
    vae_parallel: bool = typer.Option(False, "--vae-parallel", metavar="", rich_help_panel=PARALLEL,
                                      help="Split the VAE over the ranks."),
    hardware: Optional[str] = typer.Option(None, "--hardware", rich_help_panel=HARDWARE,
                                           show_default="none: memory and FLOP only",
                                           help="Device preset: h100, h200, ascend-a2 or cpu."),
    peak_tflops: Optional[float] = typer.Option(None, "--peak-tflops", rich_help_panel=HARDWARE,
                                                show_default="the preset's", help="Dense bf16 peak, TFLOP/s."),
    memory_gb: Optional[float] = typer.Option(None, "--memory-gb", rich_help_panel=HARDWARE,
                                              show_default="the preset's", help="Device memory, GB."),
    efficiency: Optional[float] = typer.Option(None, "--efficiency", rich_help_panel=HARDWARE,
                                               show_default="the preset's; its source is printed",
                                               help="Fraction of the peak the DiT achieves."),
    link_gbps: Optional[float] = typer.Option(None, "--link-gbps", rich_help_panel=HARDWARE,
                                              show_default="the preset's", help="Per-link bandwidth, GB/s."),
    as_json: bool = typer.Option(False, "--json", metavar="", rich_help_panel=OUTPUT, help="Print JSON instead of tables."),
    convert_model_dtype: bool = typer.Option(False, "--convert-model-dtype", metavar="", hidden=True),
    task: str = typer.Option("i2v-A14B", "--task", hidden=True),
    weights: Optional[str] = typer.Option(None, "--weights", rich_help_panel=QUANT_PANEL,
                                          show_default="--quantize, else the run dtype",
                                          help="int8 or fp8: the experts' block linears in 8 bits."),
    t5_weights: Optional[str] = typer.Option(None, "--t5-weights", rich_help_panel=QUANT_PANEL,
                                             show_default="--quantize-t5, else the run dtype",
                                             help="int8 or fp8: the text encoder's block linears in 8 bits."),
    quantize: Optional[str] = quantize_option("As for i2v: the experts quantized at load (sets --weights)."),
    quantize_t5: Optional[str] = quantize_t5_option("As for i2v (sets --t5-weights)."),
    step_cache: str = typer.Option("off", "--step-cache", rich_help_panel=STEP_CACHE,
                                   help="off, first-block or mag: adds the memory of its saved residuals."),
    guide_scale: Optional[str] = typer.Option(None, "--guide-scale", rich_help_panel=FEWSTEP,
                                              help="LOW,HIGH: a step whose expert has 1.0 runs one forward."),
    sample_shift: float = typer.Option(5.0, "--sample-shift", rich_help_panel=FEWSTEP,
                                       help="Flow shift (routes the steps to the experts with --guide-scale)."),
    preset: Optional[str] = typer.Option(None, "--preset", rich_help_panel=FEWSTEP,
                                         help="distill-4step: euler, 4 steps, shift 5.0, guidance off."),
    context: typer.Context = None,  # which flags were given explicitly (they override --preset)
) -> None:
    """Estimate FLOP, memory per device and time for one video; needs no weights."""
    import dataclasses

    from .plan import format_plan, make_plan

    check_task(task)
    steps, solver, sample_shift, scales = _plan_sampling(context, preset, steps, solver, sample_shift, guide_scale)
    aspect = image_aspect if image_aspect is not None else (read_aspect(image) if image is not None else None)
    result = make_plan(size=size, max_area=max_area, image_aspect=aspect, frame_num=frame_num, steps=steps,
                       solver=solver, cfg=guidance, world_size=world_size, ulysses_size=ulysses_size, cfg_size=cfg_size,
                       dit_fsdp=dit_fsdp, t5_fsdp=t5_fsdp, t5_cpu=t5_cpu, offload=offload_model, cfg_batch=cfg_batch,
                       dtype=resolve_dtype(dtype, convert_model_dtype), vae_parallel=vae_parallel, device=hardware,
                       device_peak_tflops=peak_tflops, device_memory_gb=memory_gb, efficiency=efficiency,
                       link_gbps=link_gbps, placement=device, weights=weights or quantize,
                       t5_weights=t5_weights or quantize_t5, step_cache=step_cache,
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


def read_aspect(image: Path) -> Optional[float]:
    """height / width of an image file, from its header (EXIF orientation applied); None, with
    a note, when it cannot be read here (a command line pasted from another machine)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as handle:
            width, height = handle.size
            if handle.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
                width, height = height, width
    except (OSError, UnidentifiedImageError) as exc:
        say(f"plan: --image {image} cannot be read here ({type(exc).__name__}); using the aspect of --size")
        return None
    return height / width


# --------------------------------------------------------------------------- serve
from .serve.command import serve as _serve  # noqa: E402  (its options live in wanengine/serve/command.py)

app.command("serve")(handles_errors(_serve))


# --------------------------------------------------------------------------- calibrate-cache
from .cache.command import calibrate_cache  # noqa: E402 (a command module; imports no torch)

app.command("calibrate-cache")(handles_errors(calibrate_cache))


# --------------------------------------------------------------------------- entry point
def run_app(args: List[str]) -> int:
    """Parse and run `args` (already rewritten by `cli_argv.normalize_argv`); returns the exit
    code. A usage error (unknown option, missing value, bad type) is one line and exit 2."""
    try:
        code = app(args=args, prog_name="wanengine", standalone_mode=False)
    except UsageError as exc:
        from .exits import usage_message

        command = exc.ctx.command_path if exc.ctx is not None else "wanengine"
        return _report(f"{usage_message(exc)} (see '{command} --help')")
    except typer.Abort:  # click's own Ctrl-C / EOF at a prompt
        import signal

        return interrupts.report(signal.SIGINT)
    except typer.Exit as exc:
        return exc.exit_code
    return code if isinstance(code, int) else 0


def main(argv: Optional[List[str]] = None) -> None:
    """Console-script entry point."""
    from . import exits

    interrupts.install()  # first: an interrupt from here on is one line and 128 + signal, never a traceback
    try:
        code = exits.guarded(lambda: _main(argv))
    finally:
        if argv is not None:  # called from another program (tests): give its signals back
            interrupts.uninstall()
    exits.exit_with(code, fast=argv is None)  # the console script: no interpreter teardown


def _main(argv: Optional[List[str]]) -> int:
    from .cli_argv import ArgvError, normalize_argv
    from .runtime_env import ascend_environment_defaults

    ascend_environment_defaults()  # before anything imports torch_npu
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        args = normalize_argv(args or ["--help"], typer.main.get_command(app))
        return run_app(args)
    except ArgvError as exc:
        return _report(exc.format_message())


def _report(message: str) -> int:
    try:
        fail(message, 2)
    except typer.Exit as exc:
        return exc.exit_code
    return 2


if __name__ == "__main__":
    main()
