"""Configuration as data: what the engine is built with (`EngineConfig`) and what one video
is generated with (`GenerationOptions`). Both are frozen dataclasses whose `validate()`
raises one `InvalidArgument` (a `ValueError`) naming the field and what is wrong.
Defaults come from the reference release's `constants.json` (via `wanengine.constants`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Sequence, Tuple, Union

from .adapters.spec import LoraSpec, validate_specs
from .cache.options import validate_cache_options
from .constants import constants, defaults
from .errors import InvalidArgument

DTYPES = ("float32", "bfloat16", "float16")
SOLVERS = ("unipc", "dpm++", "euler")
KERNEL_BACKENDS = ("auto", "reference", "torch", "cuda", "npu")  # "cuda" and "torch": the torch-fused one
QUANTIZE_FORMATS = ("int8", "fp8")  # 8-bit weight formats of --quantize / --quantize-t5
VAE_STRIDE = (4, 8, 8)
PATCH = (1, 2, 2)
COMPONENT_FIELDS = ("high_noise_model", "low_noise_model", "t5", "vae", "tokenizer")


@dataclass(frozen=True)
class EngineConfig:
    """How the engine is built: checkpoint, device, precision, kernels, memory and parallel layout.

    Args:
        ckpt_dir: the Wan2.2-I2V-A14B checkpoint directory: the released layout or a diffusers
            repository (`Wan2.2-I2V-A14B-Diffusers`); optional when every component is given below.
        device: "cpu", "cuda", "cuda:1", "npu", ... or None for npu > cuda > cpu.
        dtype: run dtype of the DiT experts (and T5); "float32" reproduces the reference on CPU.
        kernel_backend: "auto" (WANENGINE_KERNEL_BACKEND if set, else by device), "reference",
            "torch" (alias "cuda": the torch-fused kernels) or "npu" (see `wanengine.kernels`).
        offload_model: keep only the active expert on the device (None: on for a single accelerator).
        t5_cpu: run the text encoder on the CPU.
        vae_dtype: VAE precision (the reference uses float32).
        vae_tile_rows: decode in exact horizontal bands of this many latent rows (None: untiled).
        cfg_batch: evaluate the conditional and unconditional branches as one batch of 2.
        ulysses_size, cfg_size, dit_fsdp, t5_fsdp, vae_parallel: multi-card layout (torchrun).
        progress: show the step bar and the stage table.
        high_noise_model, low_noise_model, t5, vae, tokenizer: per-component sources, each a file
            or a directory in any known layout (e.g. `wan2.2_i2v_high_noise_14B_fp16.safetensors`,
            `umt5_xxl_fp16.safetensors`, `wan_2.1_vae.safetensors`, a `spiece.model` or its
            directory); each beats the `ckpt_dir`'s component.
        dit_config: a config.json for single-file experts (else inferred from tensor shapes).
        quantize: "int8" or "fp8": quantize the experts' block linears stored in full precision
            while loading (`--quantize`; published 8-bit experts load as they are without it).
        quantize_t5: the same for the text encoder's block linears (`--quantize-t5`).
        step_cache, cache_threshold, cache_warmup, cache_max_skips, cache_table: the step cache
            (`wanengine.cache`): policy off / first-block / mag, its threshold, warm-up steps after
            each expert switch, consecutive-skip limit and the mag table file.
        loras: LoRA / delta adapters merged into the experts once at load (`LoraSpec`: path,
            strength, expert "high" | "low" | "both"); several on one expert add up.
    """

    ckpt_dir: Optional[str] = None
    device: Optional[str] = None
    dtype: str = "bfloat16"
    kernel_backend: str = "auto"
    offload_model: Optional[bool] = None
    t5_cpu: bool = False
    vae_dtype: str = "float32"
    vae_tile_rows: Optional[int] = None
    cfg_batch: bool = True
    ulysses_size: int = 1
    cfg_size: int = 1
    dit_fsdp: bool = False
    t5_fsdp: bool = False
    vae_parallel: bool = False
    progress: bool = True
    high_noise_model: Optional[str] = None
    low_noise_model: Optional[str] = None
    t5: Optional[str] = None
    vae: Optional[str] = None
    tokenizer: Optional[str] = None
    dit_config: Optional[str] = None
    quantize: Optional[str] = None
    quantize_t5: Optional[str] = None
    step_cache: str = "off"
    cache_threshold: Optional[float] = None
    cache_warmup: int = 1
    cache_max_skips: Optional[int] = None
    cache_table: Optional[str] = None
    loras: Sequence[LoraSpec] = ()

    def component_overrides(self) -> Dict[str, Optional[str]]:
        """The per-component sources, by component name (None: from `ckpt_dir`)."""
        return {name: getattr(self, name) for name in COMPONENT_FIELDS}

    def validate(self) -> "EngineConfig":
        if not self.ckpt_dir and not all(self.component_overrides().values()):
            lacking = [name for name, value in self.component_overrides().items() if not value]
            raise InvalidArgument.for_argument("ckpt_dir", lambda words: (
                f"no checkpoint directory given, and no {', '.join(map(words.name, lacking))} to take those "
                "components from"))
        for name in ("dtype", "vae_dtype"):
            if getattr(self, name) not in DTYPES:
                raise InvalidArgument(name, f"{getattr(self, name)!r} is not one of {', '.join(DTYPES)}")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise InvalidArgument("kernel_backend", f"{self.kernel_backend!r} is not one of {', '.join(KERNEL_BACKENDS)}")
        if self.device is not None:
            check_device_name(self.device)
        for name in ("ulysses_size", "cfg_size"):
            if getattr(self, name) < 1:
                raise InvalidArgument(name, f"must be >= 1, got {getattr(self, name)}")
        if self.cfg_size not in (1, 2):
            raise InvalidArgument("cfg_size", f"must be 1 or 2 (two guidance branches), got {self.cfg_size}")
        if self.vae_tile_rows is not None and self.vae_tile_rows < 1:
            raise InvalidArgument("vae_tile_rows", f"must be >= 1, got {self.vae_tile_rows}")
        for name in ("quantize", "quantize_t5"):
            if getattr(self, name) is not None and getattr(self, name) not in QUANTIZE_FORMATS:
                raise InvalidArgument(name, f"{getattr(self, name)!r} is not one of {', '.join(QUANTIZE_FORMATS)}")
        validate_cache_options(self)
        validate_specs(self.loras)
        return self

    @property
    def world_size(self) -> int:
        return self.ulysses_size * self.cfg_size

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.dit_fsdp or self.t5_fsdp or self.vae_parallel


def check_device_name(device: str) -> str:
    """`cpu`, `cuda[:N]` or `npu[:N]` -> its kind ("cpu" / "cuda" / "npu"), or an InvalidArgument."""
    if not isinstance(device, str) or not re.fullmatch(r"(cpu|cuda|npu)(:\d+)?", device):
        raise InvalidArgument("device", f"{device!r} is not cpu, cuda[:N] or npu[:N]")
    return device.split(":")[0]


def parse_size(size: Union[str, Sequence[int]]) -> Tuple[int, int]:
    """'W*H' (also 'WxH') or a (W, H) pair -> (W, H), or an InvalidArgument naming `size`."""
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(n, int) for n in size):
        size = f"{size[0]}*{size[1]}"
    match = re.fullmatch(r"\s*(\d+)\s*[*xX]\s*(\d+)\s*", size if isinstance(size, str) else "")
    if not match:
        raise InvalidArgument("size", f"{size!r} is not of the form W*H (e.g. 1280*720 or 832*480)")
    width, height = int(match.group(1)), int(match.group(2))
    if width <= 0 or height <= 0:
        raise InvalidArgument("size", f"{size!r} must have a positive width and height")
    return width, height


def parse_guide_scale(value: Union[float, str, Sequence[float]]) -> Tuple[float, float]:
    """One number (both experts) or 'LOW,HIGH' / (low_noise, high_noise) -> (low, high)."""
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,\s]+", value.strip()) if p]
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            raise InvalidArgument("guide_scale", f"{value!r} is not a number or LOW,HIGH pair") from None
    elif isinstance(value, (int, float)):
        numbers = [float(value)]
    else:
        numbers = [float(v) for v in value]
    if len(numbers) == 1:
        numbers = numbers * 2
    if len(numbers) != 2:
        raise InvalidArgument("guide_scale", f"give one value or LOW,HIGH, got {value!r}")
    if not all(math.isfinite(n) for n in numbers):
        raise InvalidArgument("guide_scale", f"guidance must be finite, got {value!r}")
    return numbers[0], numbers[1]


def parse_step_list(value: Union[str, Sequence[float]]) -> Tuple[float, ...]:
    """'1000,750,500,250' (or a sequence of numbers) -> (1000.0, 750.0, 500.0, 250.0)."""
    parts = [p for p in re.split(r"[,\s]+", value.strip()) if p] if isinstance(value, str) else list(value)
    try:
        steps = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise InvalidArgument("denoising_steps", f"{value!r} is not a comma-separated list of timesteps") from None
    if not steps:
        raise InvalidArgument("denoising_steps", "the step list is empty")
    return steps


def check_step_list(steps: Sequence[float], train_steps: int = 1000) -> Tuple[float, ...]:
    """An explicit Euler step list: finite, in (0, train_steps], strictly decreasing."""
    values = parse_step_list(steps)
    shown = ",".join(f"{t:g}" for t in values)
    if not all(math.isfinite(t) and 0 < t <= train_steps for t in values):
        raise InvalidArgument("denoising_steps", f"every step must lie in (0, {train_steps}], got {shown}")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise InvalidArgument("denoising_steps", f"steps must be strictly decreasing, got {shown}")
    return values


@dataclass(frozen=True)
class GenerationOptions:
    """What one image-to-video call asks for; defaults are the reference release's."""

    prompt: str
    negative_prompt: Optional[str] = None
    size: Optional[Union[str, Tuple[int, int]]] = None  # "W*H" or (W, H)
    max_area: Optional[int] = None
    frame_num: int = field(default_factory=lambda: defaults()["frame_num"])
    steps: int = field(default_factory=lambda: defaults()["sample_steps"])
    shift: float = field(default_factory=lambda: defaults()["sample_shift"])
    solver: str = field(default_factory=lambda: defaults()["solver"])
    guide_scale: Union[float, str, Tuple[float, float]] = (3.5, 3.5)
    seed: int = -1
    # Euler only: the explicit timesteps (e.g. (1000, 750, 500, 250)); `steps` follows its length.
    denoising_steps: Optional[Tuple[float, ...]] = None

    def __post_init__(self) -> None:
        if self.denoising_steps is not None:
            steps = parse_step_list(self.denoising_steps)
            object.__setattr__(self, "denoising_steps", steps)
            object.__setattr__(self, "steps", len(steps))

    def validate(self) -> "GenerationOptions":
        if not isinstance(self.prompt, str):
            raise InvalidArgument("prompt", f"must be a string, got {type(self.prompt).__name__}")
        if self.size is not None:
            parse_size(self.size)
        if self.max_area is not None and self.max_area <= 0:
            raise InvalidArgument("max_area", f"must be positive, got {self.max_area}")
        if self.frame_num < 1 or (self.frame_num - 1) % 4 != 0:
            raise InvalidArgument("frame_num", f"{self.frame_num} is not of the form 4n+1 (e.g. 81, 49, 17, 5, 1)")
        if self.steps < 1:
            raise InvalidArgument("steps", f"must be >= 1, got {self.steps}")
        check_generation_bounds(self)
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise InvalidArgument("shift", f"must be a positive number, got {self.shift}")
        if self.solver not in SOLVERS:
            raise InvalidArgument("solver", f"unknown solver {self.solver!r}; choose unipc, dpm++ or euler")
        if self.denoising_steps is not None:
            if self.solver != "euler":
                solver = self.solver
                raise InvalidArgument.for_argument("denoising_steps", lambda words: (
                    f"only the euler sampler takes an explicit step list, not {solver!r} "
                    f"(set {words.setting('solver', 'euler')})"))
            check_step_list(self.denoising_steps)
        parse_guide_scale(self.guide_scale)
        return self

    @property
    def resolved_max_area(self) -> int:
        """--max-area wins; else W*H of --size; else the 1280*720 default area."""
        if self.max_area is not None:
            return int(self.max_area)
        if self.size is not None:
            width, height = parse_size(self.size)
            return width * height
        return int(constants()["max_area"]["1280*720"])

    @property
    def guidance(self) -> Tuple[float, float]:
        """(low_noise, high_noise) guidance scales."""
        return parse_guide_scale(self.guide_scale)

    @property
    def resolved_negative_prompt(self) -> str:
        return self.negative_prompt or constants()["negative_prompt_default"]

    def with_seed(self, seed: int) -> "GenerationOptions":
        return replace(self, seed=seed)


def check_generation_bounds(opts: "GenerationOptions") -> None:
    """The documented upper bounds of `wanengine.limits` (frames, steps, seed range)."""
    from .limits import MAX_FRAME_NUM, MAX_STEPS, SEED_MAX

    if opts.frame_num > MAX_FRAME_NUM:
        raise InvalidArgument("frame_num", f"{opts.frame_num} is above the limit of {MAX_FRAME_NUM} "
                                           "(1024 latent frames, the model's RoPE positions)")
    if opts.steps > MAX_STEPS:
        raise InvalidArgument("steps", f"{opts.steps} is above the limit of {MAX_STEPS} (the scheduler's "
                                       "training timesteps)")
    if isinstance(opts.seed, bool) or not isinstance(opts.seed, int):
        raise InvalidArgument("seed", f"must be an integer, got {opts.seed!r}")
    if opts.seed > SEED_MAX:
        raise InvalidArgument("seed", f"{opts.seed} is out of range; use 0 .. 2**63-1 (= {SEED_MAX}), "
                                      "or a negative value to draw one")


def check_frame_size(width: int, height: int) -> None:
    """A frame of at most `limits.MAX_SIDE` pixels per side (RoPE positions)."""
    from .limits import MAX_SIDE

    if max(width, height) > MAX_SIDE:
        raise InvalidArgument.for_argument("max_area", lambda words: (
            f"gives a {width}x{height} frame; at most {MAX_SIDE} pixels per side (the model's RoPE positions; "
            f"lower {words.name('size')}/{words.name('max_area')})"))


def latent_grid(image_height: int, image_width: int, max_area: int, frame_num: int) -> Tuple[int, int, int]:
    """(latent frames F', lat_h, lat_w) following the image's aspect within max_area (spec
    pipeline.md 1.); raises InvalidArgument (`max_area`) if the area leaves no latent row or column
    or gives a frame above `check_frame_size`'s bound -- so every caller (engine, CLI, serve) is held
    to it."""
    aspect = image_height / image_width
    lat_h = round(math.floor(math.floor(math.sqrt(max_area * aspect) / VAE_STRIDE[1]) / PATCH[1]) * PATCH[1])
    lat_w = round(math.floor(math.floor(math.sqrt(max_area / aspect) / VAE_STRIDE[2]) / PATCH[2]) * PATCH[2])
    if lat_h < PATCH[1] or lat_w < PATCH[2]:
        raise InvalidArgument(
            "max_area", f"{max_area} is too small for a {image_width}x{image_height} image "
            f"(gives a {lat_w * 8}x{lat_h * 8} frame; needs at least 16x16 pixels of output)")
    check_frame_size(8 * lat_w, 8 * lat_h)
    return (frame_num - 1) // VAE_STRIDE[0] + 1, lat_h, lat_w
