"""Cost model behind `wanengine plan`: FLOP, memory per device and a time estimate for one
image-to-video run, from the model sizes in `constants.json` and the run layout alone (no
weights, no device). `make_plan(...)` returns a frozen `Plan`; `format_plan(plan)` (in
`plan_format`) renders it; parameter counts come from `param_counts`.

Sources: spec `dit.md` (Cost: per block `12 L D^2 + 4 L D ffn` linear and `4 L^2 D` attention
FLOP), `pipeline.md` (sizing, via `config.latent_grid`), `parallel.md` (what each parallel
mode splits), `t5.md` / `vae.md` (tensor shapes, from which parameters are counted).
Every modelling assumption is listed in `Plan.assumptions` and printed with the plan.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from .config import DTYPES, PATCH, SOLVERS, check_device_name, latent_grid, parse_size
from .cache.memory import cache_assumption, cache_bytes
from .constants import constants
from .errors import ConfigError, InvalidArgument

if TYPE_CHECKING:
    from .held_weights import HeldWeights

GB = 1e9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DEFAULT_EFFICIENCY = 0.40       # model FLOP utilisation of the DiT (attention-heavy, fused kernels)
DEFAULT_VAE_EFFICIENCY = 0.30   # float32 causal 3-D convolutions with many element-wise passes
MIN_TOKENS_PER_RANK = 2048      # below this, Ulysses all-to-all latency and small kernels dominate
VAE_CHUNK_FRAMES = 4            # decode/encode chunks hold up to 4 full-resolution frames
VAE_DECODE_LIVE = 5             # live [C, 4, h, w] float32 tensors at the decoder's last stage
VAE_ENCODE_LIVE = 4             # ... and at the encoder's first stage


@dataclass(frozen=True)
class DevicePreset:
    """Per-device figures: dense bf16 matrix peak, memory, float32-conv rate, link bandwidth."""

    name: str
    peak_tflops: Optional[float]
    memory_gb: Optional[float]
    vae_tflops: Optional[float]
    link_gbps: Optional[float]
    accelerator: bool
    note: str
    efficiency: float = DEFAULT_EFFICIENCY  # DiT model FLOP utilisation ...
    efficiency_source: str = "assumed (not measured on this device)"  # ... and where that figure comes from


_H200_MEASURED = ("measured: the 720p DiT forward at 61.0% MFU on an H200, mean of 3 "
                  "(docs/performance.md section 4, 2026-11-26)")

DEVICE_PRESETS: Dict[str, DevicePreset] = {p.name: p for p in (
    DevicePreset("h100", 989.0, 80.0, 494.0, 450.0, True,
                 "H100 SXM: 989 TFLOP/s dense bf16, 80 GB; VAE convs as TF32 (494, cuDNN default); "
                 "NVLink 450 GB/s per direction",
                 0.61, "the H200 measurement (same Hopper SMs and bf16 peak; not measured on an H100): "
                 + _H200_MEASURED),
    DevicePreset("h200", 989.0, 141.0, 494.0, 450.0, True,
                 "H200 SXM: 989 TFLOP/s dense bf16, 141 GB; VAE convs as TF32 (494); NVLink 450 GB/s",
                 0.61, _H200_MEASURED),
    DevicePreset("ascend-a2", 313.0, 64.0, 156.0, 196.0, True,
                 "Atlas 800T A2 / Ascend 910B (assumed): 313 TFLOP/s dense bf16, 64 GB; VAE convs as "
                 "HF32 at half rate (156, assumed); HCCS 196 GB/s per direction (assumed)",
                 DEFAULT_EFFICIENCY, "assumed (no Ascend measurement yet)"),
    DevicePreset("cpu", None, None, None, None, False,
                 "CPU: no built-in figures; give the peak (TFLOP/s) and memory yourself"),
)}


def placement_kind(placement: Optional[str], preset: Optional["DevicePreset"]) -> str:
    """"cpu" or "accelerator": where the engine would put the weights. `placement` is an i2v
    `--device` value (cpu, cuda[:N], npu[:N]); without one the preset decides, and without a
    preset an accelerator is assumed (the engine's default device is npu > cuda > cpu)."""
    if placement is not None:
        try:
            kind = check_device_name(placement)  # i2v's rule
        except InvalidArgument as exc:
            raise ConfigError(exc.cli_message) from None  # plan's messages name its flags
        return "cpu" if kind == "cpu" else "accelerator"
    if preset is not None and not preset.accelerator:
        return "cpu"
    return "accelerator"


from .param_counts import (VaeTally, count_dit_params, count_t5_params, count_vae_params,  # noqa: F401 (re-exported)
                           vae_decoder_tally, vae_encoder_tally)

# --------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Geometry:
    width: int
    height: int
    frame_num: int
    latent: Tuple[int, int, int, int]  # [16, F', lat_h, lat_w]
    tokens: int                        # L = F' * lat_h/2 * lat_w/2
    seq_len: int                       # L padded to a multiple of ulysses_size
    tokens_per_rank: int


@dataclass(frozen=True)
class Flops:
    linear_per_block: float            # single device, L tokens (spec formula)
    attention_per_block: float
    per_forward: float                 # one expert forward, all blocks
    forwards_per_step: int             # 2 with guidance (cond + uncond), else 1
    per_step: float
    per_video: float
    per_device_forward: float          # this rank's share of one forward (padding included)
    forwards_per_device_step: int
    per_device_step: float
    per_device_video: float
    t5: float                          # both prompts (the prompt alone with guidance off)
    vae_encode: float
    vae_decode: float
    dit_forwards: int = 0              # DiT forwards of the video (guidance off on a step: 1, else 2)
    dit_forwards_per_device: int = 0   # ... of them on one device (CFG parallel splits the branches)


@dataclass(frozen=True)
class Memory:
    """Bytes on one device (rank 0) in each phase; `rows` are (item, text, encode, denoise, decode)."""

    rows: Tuple[Tuple[str, float, float, float, float], ...]
    phases: Tuple[float, float, float, float]
    peak: float
    peak_phase: str
    capacity: Optional[float]


@dataclass(frozen=True)
class Timing:
    compute_per_step_s: float
    ulysses_comm_per_step_s: Optional[float]
    cfg_comm_per_step_s: Optional[float]
    fsdp_gather_per_step_s: Optional[float]  # overlapped with compute (prefetch); only the excess counts
    per_step_s: float
    denoise_s: float
    t5_s: float
    vae_encode_s: Optional[float]
    vae_decode_s: Optional[float]
    per_video_s: float


@dataclass(frozen=True)
class Plan:
    size: str
    frame_num: int
    steps: int
    solver: str
    cfg: bool
    world_size: int
    ulysses_size: int
    cfg_size: int
    dit_fsdp: bool
    t5_fsdp: bool
    t5_cpu: bool
    offload: bool
    cfg_batch: bool
    dtype: str
    vae_parallel: bool
    device: Optional[str]
    peak_tflops: Optional[float]
    efficiency: float
    link_gbps: Optional[float]
    dit_params_per_expert: int
    t5_params: int
    vae_params: int
    geometry: Geometry
    flops: Flops
    memory: Memory
    timing: Optional[Timing]
    warnings: Tuple[str, ...]
    assumptions: Tuple[str, ...]
    placement: str = "accelerator"   # "cpu" or "accelerator": where the weights live (see placement_kind)
    efficiency_source: str = ""
    host_bytes_per_rank: float = 0.0  # weights the engine keeps in host RAM beside an accelerator
    weights: Optional[str] = None      # 8-bit expert block linears ("int8" / "fp8"), None: at dtype
    t5_weights: Optional[str] = None   # the same for the text encoder
    dit_bytes_per_expert: Optional[float] = None  # weight bytes of one expert (the larger) / the text
    t5_bytes: Optional[float] = None              # encoder, 8-bit block linears at 1 byte + scales
    expert_bytes: Tuple[float, ...] = ()          # each expert's weight bytes (high, low noise)


def make_plan(size: Optional[str] = "1280*720", frame_num: int = 81, steps: int = 40, solver: str = "unipc",
              cfg: bool = True, world_size: Optional[int] = None, ulysses_size: int = 1, cfg_size: int = 1,
              dit_fsdp: bool = False, t5_fsdp: bool = False, t5_cpu: bool = False, offload: Optional[bool] = None,
              cfg_batch: bool = True, dtype: str = "bfloat16", vae_parallel: bool = False,
              device: Optional[str] = None, device_peak_tflops: Optional[float] = None,
              device_memory_gb: Optional[float] = None, efficiency: Optional[float] = None,
              vae_tflops: Optional[float] = None, vae_efficiency: Optional[float] = None,
              link_gbps: Optional[float] = None, max_area: Optional[int] = None,
              image_aspect: Optional[float] = None, placement: Optional[str] = None,
              weights: Optional[str] = None, t5_weights: Optional[str] = None,
              model_sizes: Optional[Dict[str, dict]] = None, step_cache: str = "off",
              guide_scale: Optional[Tuple[float, float]] = None, shift: float = 5.0,
              held_weights: Optional["HeldWeights"] = None) -> Plan:
    """Cost of one video. `cfg`: guidance on (cond + uncond forwards each step). `world_size`
    None means cfg_size * ulysses_size. `offload` None means what the engine does: on for
    accelerators (off with `dit_fsdp`, whose shards stay on the devices), off on the CPU.
    `device` picks a preset (`DEVICE_PRESETS`); explicit figures override it. `placement` is
    an i2v `--device` value (see `placement_kind`). `image_aspect` is the input image's
    height / width (default: the size's own). `weights` / `t5_weights`: "int8" or "fp8" for
    8-bit block linears in the experts / the text encoder (`quant.sizes`); None keeps them at
    `dtype`. `guide_scale` (low_noise, high_noise), when given, decides guidance per step
    instead of `cfg`: a step whose expert's scale is 1.0 runs one forward (the sampler's
    timesteps at `shift` route the steps to the experts), e.g. 4 forwards for `--preset
    distill-4step`. Invalid combinations raise ConfigError; wasteful ones become `Plan.warnings`.
    `model_sizes` ({"dit"|"t5"|"vae": sizes}) replaces the release's sizes from constants.json
    (the CLI's memory preflight passes the checkpoint's). `held_weights` (`wanengine.
    held_weights`): the weight bytes the engine will hold for a given checkpoint, from its
    headers, in place of the ones computed from the sizes (e.g. published 8-bit experts, whose
    8-bit layers the sizes do not show; the two agree for the layouts the sizes describe)."""
    consts = constants()
    sizes = model_sizes or {}
    dit, t5, vae = ({**consts[key], **sizes.get(name, {})} for name, key in
                    (("dit", "i2v_a14b_dit"), ("t5", "umt5_xxl_encoder"), ("vae", "wan21_vae")))
    preset = _preset(device)
    kind = placement_kind(placement, preset)
    world = cfg_size * ulysses_size if world_size is None else world_size
    _validate(frame_num, steps, solver, dtype, world, ulysses_size, cfg_size, heads=dit["num_heads"])
    if dit_fsdp and offload:
        raise ConfigError("--offload-model with --dit-fsdp: sharded experts stay on the devices; drop one of them")
    offload = (kind != "cpu" and not dit_fsdp) if offload is None else bool(offload)
    peak = device_peak_tflops if device_peak_tflops is not None else (preset.peak_tflops if preset else None)
    capacity_gb = device_memory_gb if device_memory_gb is not None else (preset.memory_gb if preset else None)
    vae_peak = vae_tflops if vae_tflops is not None else (preset.vae_tflops if preset else None)
    link = link_gbps if link_gbps is not None else (preset.link_gbps if preset else None)
    eff = (preset.efficiency if preset else DEFAULT_EFFICIENCY) if efficiency is None else efficiency
    eff_source = ("given (--efficiency)" if efficiency is not None
                  else preset.efficiency_source if preset else "assumed (no device preset)")
    vae_eff = DEFAULT_VAE_EFFICIENCY if vae_efficiency is None else vae_efficiency
    for flag, value in (("--peak-tflops", peak), ("--memory-gb", capacity_gb),
                        ("--vae-tflops", vae_peak), ("--link-gbps", link)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag}: must be a positive number, got {value}")
    for flag, value in (("--efficiency", eff), ("--vae-efficiency", vae_eff)):
        if not (0 < value <= 1):
            raise ConfigError(f"{flag}: must be in (0, 1] (a fraction of the peak), got {value}")

    geometry = _geometry(size, max_area, image_aspect, frame_num, ulysses_size)
    dit_params, block_params = count_dit_params(**dit)
    t5_params, vae_params = count_t5_params(**t5), count_vae_params(**vae)

    # ---- FLOP
    D, ffn, layers, L = dit["dim"], dit["ffn_dim"], dit["num_layers"], geometry.tokens
    linear, attention = block_flops(L, L, D, ffn)
    branches = _step_branches(solver, steps, shift, guide_scale, cfg)
    cfg = max(branches) == 2
    forwards = max(branches)
    video_forwards = sum(branches)
    device_forwards = sum(math.ceil(b / cfg_size) for b in branches)
    per_forward = layers * (linear + attention)
    # Ulysses: each rank runs the linear layers on seq_len / sp tokens and attention for N / sp
    # heads over all seq_len queries and the L real keys. CFG parallel: each group one branch.
    rank_linear, rank_attention = block_flops(geometry.seq_len, L, D, ffn)
    rank_forward = layers * (rank_linear + rank_attention) / ulysses_size
    # per device and step; an average where guidance is off on one expert only
    rank_forwards = device_forwards // steps if device_forwards % steps == 0 else device_forwards / steps
    _, lat_f, lat_h, lat_w = geometry.latent
    vae_args = (vae["dim"], vae["z_dim"], list(vae["dim_mult"]), vae["num_res_blocks"],
                list(vae["temporal_downsample"]))
    encoder = vae_encoder_tally(*vae_args, frame_num, geometry.height, geometry.width)
    decoder = vae_decoder_tally(*vae_args, lat_f, lat_h, lat_w)
    flops = Flops(linear, attention, per_forward, forwards, forwards * per_forward, video_forwards * per_forward,
                  rank_forward, rank_forwards, rank_forwards * rank_forward, device_forwards * rank_forward,
                  _t5_flops(t5, t5_params, prompts=2 if cfg else 1), encoder.flops, decoder.flops,
                  video_forwards, device_forwards)

    # ---- memory
    layout = dict(dtype=dtype, world=world, ulysses=ulysses_size, cfg=cfg, cfg_size=cfg_size, dit_fsdp=dit_fsdp,
                  t5_fsdp=t5_fsdp, t5_cpu=t5_cpu, cfg_batch=cfg_batch, vae_parallel=vae_parallel,
                  step_cache=step_cache)
    sizes = dict(geometry=geometry, dit=dit, dit_params=dit_params, block_params=block_params, t5=t5,
                 t5_params=t5_params, vae_params=vae_params, vae_dim=vae["dim"], encoder=encoder, decoder=decoder)
    sizes.update(_weight_sizes(dtype, weights, t5_weights, dit, dit_params, block_params, t5, t5_params))
    if held_weights is not None:
        sizes.update(expert_bytes=tuple(float(b) for b in held_weights.experts),
                     block_bytes=float(held_weights.largest_block), t5_bytes=float(held_weights.t5))
    capacity = capacity_gb * GB if capacity_gb is not None else None
    memory = _memory(offload=offload, capacity=capacity, **layout, **sizes)

    # ---- time
    timing = None
    if peak is not None:
        timing = _timing(flops, geometry, D, layers, dit_params, dtype, steps, ulysses_size, cfg_size, world,
                         dit_fsdp, vae_parallel, peak, eff, vae_peak, vae_eff, link)

    assumptions = _assumptions(preset, peak, eff, vae_peak, vae_eff, link, cfg_batch and cfg and cfg_size == 1)
    assumptions += (f"placement: weights on {'the CPU' if kind == 'cpu' else 'an accelerator'}"
                    + (" (the --device given)" if placement else " (from the preset)" if preset else
                       " (assumed; pass --device cpu or --hardware cpu for a CPU run)")
                    + f"; offload {'on' if offload else 'off'}"
                    + ("" if offload else " (both experts resident, as the engine keeps them)"),)
    if peak is not None:
        assumptions += (f"efficiency {eff:.2f}: {eff_source}",)
    if weights or t5_weights:
        assumptions += ("8-bit weights: block linears at 1 byte + a float32 scale per output row, the rest at the "
                        "run dtype (the DiT's modulation and time MLPs in float32); FLOP and time as for the run dtype (an 8-bit GEMM is not modelled), and a layer "
                        "dequantized just before its matmul adds one transient weight (<= 0.14 GB in bf16)",)
    if held_weights is not None:
        assumptions += ("weights: the bytes the loader allocates for this checkpoint, from its headers (8-bit "
                        "layers at 1 byte + a float32 scale per output row, float32-kept DiT tensors at 4 bytes)",)
    if step_cache != "off":
        assumptions += (cache_assumption(step_cache),)
    host = _host_bytes(kind, offload, t5_cpu, t5_fsdp, sizes["expert_bytes"], sizes["t5_bytes"])
    plan = Plan(host_bytes_per_rank=host,
                size=f"{geometry.width}*{geometry.height}", frame_num=frame_num, steps=steps, solver=solver, cfg=cfg,
                world_size=world, ulysses_size=ulysses_size, cfg_size=cfg_size, dit_fsdp=dit_fsdp, t5_fsdp=t5_fsdp,
                t5_cpu=t5_cpu, offload=offload, cfg_batch=cfg_batch, dtype=dtype, vae_parallel=vae_parallel,
                device=preset.name if preset else None, peak_tflops=peak, efficiency=eff, link_gbps=link,
                dit_params_per_expert=dit_params, t5_params=t5_params, vae_params=vae_params, geometry=geometry,
                flops=flops, memory=memory, timing=timing, warnings=(), assumptions=assumptions, placement=kind,
                efficiency_source=eff_source, weights=weights, t5_weights=t5_weights,
                dit_bytes_per_expert=max(sizes["expert_bytes"]), t5_bytes=sizes["t5_bytes"],
                expert_bytes=sizes["expert_bytes"])
    requested = parse_size(size) if size is not None and image_aspect is None and max_area is None else None
    without_offload = _memory(offload=False, capacity=capacity, **layout, **sizes) if offload else None
    return replace(plan, warnings=tuple(_warnings(plan, requested, preset, without_offload)))


def _host_bytes(kind: str, offload: bool, t5_cpu: bool, t5_fsdp: bool, expert_bytes: Tuple[float, ...],
                t5_bytes: float) -> float:
    """Weights one rank keeps in host memory next to an accelerator: with offload the host copies
    of both experts (`expert_bytes`) stay for the whole run (moving one off the device only
    drops its device tensors), and the text encoder lives there with offload or `t5_cpu`
    (unless sharded)."""
    if kind == "cpu":
        return 0.0  # the device is the host: already in the memory table
    experts = sum(expert_bytes) if offload else 0.0
    text = t5_bytes if (offload or t5_cpu) and not t5_fsdp else 0.0
    return experts + text


def _preset(device: Optional[str]) -> Optional[DevicePreset]:
    if device is None:
        return None
    key = device.strip().lower()
    if key not in DEVICE_PRESETS:
        raise ConfigError(f"--hardware: unknown device preset {device!r}; choose one of {', '.join(DEVICE_PRESETS)}")
    return DEVICE_PRESETS[key]


def _validate(frame_num: int, steps: int, solver: str, dtype: str, world: int, ulysses: int, cfg_size: int,
              heads: Optional[int] = None) -> None:
    heads = constants()["i2v_a14b_dit"]["num_heads"] if heads is None else heads
    if frame_num < 1 or (frame_num - 1) % 4:
        raise ConfigError(f"--frame-num: {frame_num} is not of the form 4n+1 (e.g. 81, 49, 17, 5, 1)")
    if steps < 1:
        raise ConfigError(f"--sample-steps: must be >= 1, got {steps}")
    if solver not in SOLVERS:
        raise ConfigError(f"--sample-solver: unknown solver {solver!r}; choose {' or '.join(SOLVERS)}")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if ulysses < 1:
        raise ConfigError(f"--ulysses-size: must be >= 1, got {ulysses}")
    if cfg_size not in (1, 2):
        raise ConfigError(f"--cfg-size: must be 1 or 2 (two guidance branches), got {cfg_size}")
    if world != cfg_size * ulysses:
        raise ConfigError(f"--world-size: {world} devices must equal --cfg-size {cfg_size} x --ulysses-size "
                          f"{ulysses} = {cfg_size * ulysses}")
    if heads % ulysses:
        divisors = ", ".join(str(d) for d in range(1, heads + 1) if heads % d == 0)
        raise ConfigError(f"--ulysses-size: {ulysses} does not divide the {heads} attention heads "
                          f"(use one of {divisors})")


def _geometry(size: Optional[str], max_area: Optional[int], image_aspect: Optional[float], frame_num: int,
              ulysses: int) -> Geometry:
    width, height = parse_size(size) if size is not None else (1280, 720)
    if max_area is not None and max_area <= 0:
        raise ConfigError(f"--max-area: must be positive, got {max_area}")
    if image_aspect is not None and not (math.isfinite(image_aspect) and image_aspect > 0):
        raise ConfigError(f"--image-aspect: must be a positive height/width ratio, got {image_aspect}")
    area = max_area if max_area is not None else width * height
    aspect = image_aspect if image_aspect is not None else height / width
    lat_f, lat_h, lat_w = latent_grid(aspect, 1.0, area, frame_num)
    tokens = lat_f * (lat_h // PATCH[1]) * (lat_w // PATCH[2])
    seq_len = math.ceil(tokens / ulysses) * ulysses
    z_dim = constants()["wan21_vae"]["z_dim"]
    return Geometry(8 * lat_w, 8 * lat_h, frame_num, (z_dim, lat_f, lat_h, lat_w), tokens, seq_len,
                    seq_len // ulysses)


def block_flops(queries: int, keys: int, dim: int, ffn: int) -> Tuple[float, float]:
    """(linear, attention) FLOP of one block: spec dit.md `12 L D^2 + 4 L D ffn` and `4 L^2 D`
    (here `4 * queries * keys * D` so padded queries under Ulysses are counted)."""
    return 12.0 * queries * dim * dim + 4.0 * queries * dim * ffn, 4.0 * queries * keys * dim


def forward_flops(tokens: int) -> float:
    """FLOP of one forward of one full-size expert over `tokens` DiT tokens (spec dit.md, Cost)."""
    dit = constants()["i2v_a14b_dit"]
    return dit["num_layers"] * sum(block_flops(tokens, tokens, dit["dim"], dit["ffn_dim"]))


def _t5_flops(t5: dict, params: int, prompts: int = 2) -> float:
    """`prompts` prompts (positive + negative; the positive alone with guidance off) of 512
    tokens: 2 FLOP per non-embedding weight per token plus the attention scores/values."""
    tokens, non_embedding = constants()["defaults"]["text_len"], params - t5["vocab_size"] * t5["dim"]
    per_prompt = 2.0 * non_embedding * tokens + t5["num_layers"] * 4.0 * tokens * tokens * t5["dim_attn"]
    return prompts * per_prompt


def _step_branches(solver: str, steps: int, shift: float, guide_scale: Optional[Tuple[float, float]],
                   cfg: bool) -> List[int]:
    """Guidance branches (DiT forwards) of every step: 2 where guidance is on, 1 where off."""
    if guide_scale is None:
        return [2 if cfg else 1] * steps
    from .pipeline import guidance_off, step_scales
    from .schedulers import make_sampler

    timesteps = make_sampler(solver, steps, shift).timesteps.tolist()
    return [1 if guidance_off(scale) else 2 for scale in step_scales(timesteps, guide_scale)]


def _memory(*, offload: bool, capacity: Optional[float], dtype: str, world: int, ulysses: int, cfg: bool,
            cfg_size: int, dit_fsdp: bool, t5_fsdp: bool, t5_cpu: bool, cfg_batch: bool, vae_parallel: bool,
            geometry: Geometry, dit: dict, dit_params: int, block_params: int, t5: dict, t5_params: int,
            vae_params: int, vae_dim: int, encoder: VaeTally, decoder: VaeTally, expert_bytes: Tuple[float, ...],
            block_bytes: float, t5_bytes: float, step_cache: str = "off") -> Memory:
    """Per-device bytes in the four phases of a run: text encoding, VAE encode, denoising, decode.
    With offload one expert is on the device at a time (the larger counts), else both."""
    width = DTYPE_BYTES[dtype]
    experts = 1 if offload else len(expert_bytes)
    resident = max(expert_bytes) if offload else sum(expert_bytes)
    dit_weights = resident / (world if dit_fsdp else 1)
    gather = 2 * block_bytes if dit_fsdp and world > 1 else 0.0  # current + prefetched block
    dit_idle = 0.0 if offload else dit_weights  # offloaded experts live on the host outside the loop
    t5_weights = 0.0 if t5_cpu else t5_bytes / (world if t5_fsdp else 1)
    t5_idle = 0.0 if (offload or t5_cpu) else t5_weights
    text_len = constants()["defaults"]["text_len"]
    # Two prompts: a few [512, D] / [512, dim_ffn] float32 tensors and one [H, 512, 512] bias.
    t5_act = 0.0 if t5_cpu else 2 * 4.0 * text_len * (4 * t5["dim"] + 2 * t5["dim_ffn"] + t5["num_heads"] * text_len)

    D, ffn, head_dim = dit["dim"], dit["ffn_dim"], dit["dim"] // dit["num_heads"]
    rows = geometry.tokens_per_rank * (2 if cfg and cfg_size == 1 and cfg_batch else 1)
    stream = 2 * rows * D * 4.0                     # float32 residual stream + modulated input
    attn = (6 + (3 if ulysses > 1 else 0)) * rows * D * width  # q, k, v, roped q, k, out (+ all-to-all)
    mlp = rows * (2 * ffn + D) * width              # ffn.0 output, its GELU, ffn.2 output
    rope = 2 * geometry.tokens_per_rank * head_dim * 4.0
    dit_act = stream + max(attn, mlp) + rope
    branches = 2 if cfg and cfg_size == 1 else 1  # guidance branches this device computes
    cache = cache_bytes(step_cache, geometry.tokens_per_rank, D, width, branches)

    h, w, tiles = geometry.height, geometry.width, (world if vae_parallel else 1)
    unit = vae_dim * VAE_CHUNK_FRAMES * h * w * 4.0  # one [C, 4, h, w] float32 tensor
    video = 3.0 * geometry.frame_num * h * w * 4     # [3, F, h, w] float32, whole (rank 0 writes it)
    encode = (VAE_ENCODE_LIVE * unit + encoder.cache_bytes) / tiles + video
    decode = (VAE_DECODE_LIVE * unit + decoder.cache_bytes) / tiles + video
    vae_weights = vae_params * 4.0

    shard = f", 1/{world}" if dit_fsdp and world > 1 else ""
    rows_out = (
        (f"DiT weights ({experts} expert{'s' if experts > 1 else ''}{shard})",
         dit_idle, dit_idle, dit_weights, dit_idle),
        ("DiT FSDP gather (2 blocks)", 0.0, 0.0, gather, 0.0),
        ("DiT activations", 0.0, 0.0, dit_act, 0.0),
        (f"step cache ({step_cache})", 0.0, 0.0, cache, 0.0),
        ("T5 weights" + (" (on CPU)" if t5_cpu else f" (1/{world})" if t5_fsdp and world > 1 else ""),
         t5_weights, t5_idle, t5_idle, t5_idle),
        ("T5 activations", t5_act, 0.0, 0.0, 0.0),
        ("VAE weights (float32)", vae_weights, vae_weights, vae_weights, vae_weights),
        ("VAE encode working set", 0.0, encode, 0.0, 0.0),
        ("VAE decode working set", 0.0, 0.0, 0.0, decode),
    )
    phases = tuple(sum(row[i] for row in rows_out) for i in range(1, 5))
    peak = max(phases)
    return Memory(tuple((r[0], *r[1:]) for r in rows_out if any(r[1:])), phases, peak,
                  PHASES[phases.index(peak)], capacity)


PHASES = ("text", "encode", "denoise", "decode")


def _weight_sizes(dtype: str, weights: Optional[str], t5_weights: Optional[str], dit: dict, dit_params: int,
                  block_params: int, t5: dict, t5_params: int) -> Dict[str, float]:
    """Bytes of each expert, one of its blocks and the text encoder as the loader holds them:
    8-bit block linears if asked, the DiT's float32-kept tensors at 4 bytes."""
    from .param_counts import count_dit_float32_params
    from .quant.sizes import check_weights, dit_block_linears, t5_block_linears, weight_bytes

    check_weights(weights, "--weights")
    check_weights(t5_weights, "--t5-weights")
    width = DTYPE_BYTES[dtype]
    dit_linears, t5_linears = dit_block_linears(**dit), t5_block_linears(**t5)
    float32_params, block_float32 = count_dit_float32_params(**dit)
    expert = weight_bytes(dit_params, dit["num_layers"], dit_linears, width, weights, float32_params)
    return {"expert_bytes": (expert, expert),
            "block_bytes": weight_bytes(block_params, 1, dit_linears, width, weights, block_float32),
            "t5_bytes": weight_bytes(t5_params, t5["num_layers"], t5_linears, width, t5_weights)}


def _timing(flops: Flops, geometry: Geometry, dim: int, layers: int, dit_params: int, dtype: str, steps: int,
            ulysses: int, cfg_size: int, world: int, dit_fsdp: bool, vae_parallel: bool, peak: float, eff: float,
            vae_peak: Optional[float], vae_eff: float, link: Optional[float]) -> Timing:
    """Compute time = FLOP / (peak x efficiency); communication = bytes / link (if a link is known)."""
    rate, width = peak * 1e12 * eff, DTYPE_BYTES[dtype]
    compute = flops.per_device_step / rate
    a2a = cfg_comm = fsdp = None
    if link is not None:
        link_rate = link * GB
        # 4 all-to-alls per block of this rank's [S/sp, D]; (sp-1)/sp of it leaves the device.
        a2a = (4 * layers * geometry.tokens_per_rank * dim * width * (ulysses - 1) / ulysses
               * flops.forwards_per_device_step / link_rate)
        cfg_comm = (math.prod(geometry.latent) * 4.0 / link_rate) if cfg_size == 2 else 0.0
        fsdp = (dit_params * width * (world - 1) / world * flops.forwards_per_device_step / link_rate
                if dit_fsdp and world > 1 else 0.0)
    per_step = max(compute, fsdp or 0.0) + (a2a or 0.0) + (cfg_comm or 0.0)
    tiles = world if vae_parallel else 1
    vae_rate = vae_peak * 1e12 * vae_eff if vae_peak is not None else None
    encode = flops.vae_encode / tiles / vae_rate if vae_rate else None
    decode = flops.vae_decode / tiles / vae_rate if vae_rate else None
    t5 = flops.t5 / rate
    total = steps * per_step + t5 + (encode or 0.0) + (decode or 0.0)
    return Timing(compute, a2a, cfg_comm, fsdp, per_step, steps * per_step, t5, encode, decode, total)


def _warnings(plan: Plan, requested: Optional[Tuple[int, int]], preset: Optional[DevicePreset],
              memory_without_offload: Optional[Memory]) -> List[str]:
    """Layouts that work but waste devices, memory or time (invalid ones raised earlier)."""
    geometry, memory, timing = plan.geometry, plan.memory, plan.timing
    world, ulysses = plan.world_size, plan.ulysses_size
    out = []
    if requested is not None and requested != (geometry.width, geometry.height):
        out.append(f"an image of exactly {requested[0]}x{requested[1]} gives {geometry.width}x{geometry.height} "
                   f"frames: the reference sizing floors sqrt(area * aspect) in float64 (pipeline.md 1.)")
    if ulysses > 1 and geometry.tokens_per_rank < MIN_TOKENS_PER_RANK:
        out.append(f"--ulysses-size {ulysses} leaves {geometry.tokens_per_rank:,} tokens per rank (L = "
                   f"{geometry.tokens:,}); all-to-all latency and small kernels dominate, use fewer ranks")
    if geometry.seq_len > geometry.tokens:
        pad = geometry.seq_len - geometry.tokens
        out.append(f"seq_len is padded by {pad} tokens to a multiple of --ulysses-size {ulysses} "
                   f"({100.0 * pad / geometry.tokens:.2f}% extra work)")
    if plan.cfg_size == 2 and not plan.cfg:
        out.append("--cfg-size 2 with guidance off: there is one branch per step, so half the devices idle "
                   "(wanengine i2v refuses it: nothing to split, use --ulysses-size)")
    if memory.capacity is not None:
        if memory.peak > memory.capacity:
            out.append(f"peak memory {memory.peak / GB:.1f} GB ({memory.peak_phase}) exceeds the device's "
                       f"{memory.capacity / GB:.0f} GB; consider --offload-model, --dit-fsdp, --t5-fsdp/--t5-cpu "
                       f"or --vae-parallel")
        elif memory.peak > 0.9 * memory.capacity:
            out.append(f"peak memory {memory.peak / GB:.1f} GB is within 10% of the device's "
                       f"{memory.capacity / GB:.0f} GB (allocator overhead may not fit)")
        if (memory_without_offload is not None
                and memory_without_offload.peak <= 0.9 * memory.capacity):
            out.append(f"offload is on although both experts fit ({memory_without_offload.peak / GB:.1f} GB "
                       f"peak without it); --no-offload-model saves the host/device expert swaps")
    if plan.dtype == "float32" and plan.placement != "cpu":
        out.append("float32 weights on an accelerator: twice the bf16 memory and far below the bf16 "
                   "matrix peak the time estimate assumes (keep float32 for reference checks on the CPU)")
    if world == 1:
        for flag, on in (("--dit-fsdp", plan.dit_fsdp), ("--t5-fsdp", plan.t5_fsdp),
                         ("--vae-parallel", plan.vae_parallel)):
            if on:
                out.append(f"{flag} on one device does nothing (there is no one to share with)")
    if world > 1 and plan.host_bytes_per_rank:
        out.append(f"each of the {world} ranks keeps {plan.host_bytes_per_rank / GB:.0f} GB of weights in host "
                   f"memory ({world * plan.host_bytes_per_rank / GB:.0f} GB on one server); --dit-fsdp --t5-fsdp "
                   "shard them on the devices instead")
    if plan.t5_fsdp and plan.t5_cpu:
        out.append("--t5-fsdp has no effect with --t5-cpu (the encoder is on the host)")
    fsdp_time = timing.fsdp_gather_per_step_s if timing is not None else None
    if fsdp_time and fsdp_time > timing.compute_per_step_s:
        out.append(f"FSDP weight all-gathers ({fsdp_time:.2f} s/step) exceed compute "
                   f"({timing.compute_per_step_s:.2f} s/step) and cannot be hidden")
    return out


def _assumptions(preset: Optional[DevicePreset], peak: Optional[float], eff: float, vae_peak: Optional[float],
                 vae_eff: float, link: Optional[float], batched_cfg: bool) -> Tuple[str, ...]:
    out = ["FLOP: spec dit.md per block 12 L D^2 + 4 L D ffn (linear) + 4 L^2 D (attention); cross-attention "
           "scores over the 512 text rows (~0.5%), patchify, head and element-wise work are left out",
           "Ulysses: each rank runs linear layers on seq_len/sp tokens and attention for N/sp heads over all "
           "tokens; CFG parallel gives each group one branch",
           "DiT activations: float32 residual + modulated input, then the larger of 6 (+3 for all-to-all) "
           "[L/sp, D] or 2 [L/sp, ffn] + 1 [L/sp, D] tensors; fused attention (O(L) workspace, no L x L scores)"
           + ("; cond/uncond run as one batch of 2" if batched_cfg else ""),
           f"VAE: {VAE_DECODE_LIVE} (decode) / {VAE_ENCODE_LIVE} (encode) live [96, 4, h, w] float32 tensors "
           "plus 2-frame causal caches of every temporal conv and the whole [3, F, h, w] video; "
           "divided by the ranks with --vae-parallel",
           "offloaded experts and T5 sit on the host outside their phase; allocator overhead and the runtime "
           "context (~1-3 GB) are not included"]
    if preset is not None:
        out.append(f"device: {preset.note}")
    if peak is not None:
        out.append(f"time: FLOP / ({peak:g} TFLOP/s x {eff:.2f} efficiency); VAE "
                   + (f"at {vae_peak:g} TFLOP/s x {vae_eff:.2f}" if vae_peak else "time not estimated (no rate)")
                   + ("; communication = bytes / " + f"{link:g} GB/s, Ulysses all-to-all not overlapped, FSDP "
                      "gathers overlapped with compute" if link else "; no link bandwidth, communication left out"))
    return tuple(out)


def format_plan(plan: "Plan") -> str:
    """The plan as printed tables (see `wanengine.plan_format`)."""
    from .plan_format import format_plan as render

    return render(plan)
