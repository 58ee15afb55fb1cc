"""Cost model behind `wanengine plan`: FLOP, memory per device and a time estimate for one
image-to-video run, from the model sizes in `constants.json` and the run layout alone (no
weights, no device). `make_plan(...)` returns a frozen `Plan`; `format_plan(plan)` renders it.

Sources: spec `dit.md` (Cost: per block `12 L D^2 + 4 L D ffn` linear and `4 L^2 D` attention
FLOP), `pipeline.md` (sizing, via `config.latent_grid`), `parallel.md` (what each parallel
mode splits), `t5.md` / `vae.md` (tensor shapes, from which parameters are counted).
Every modelling assumption is listed in `Plan.assumptions` and printed with the plan.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

from .config import DTYPES, PATCH, SOLVERS, latent_grid, parse_size
from .constants import constants
from .errors import ConfigError

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


DEVICE_PRESETS: Dict[str, DevicePreset] = {p.name: p for p in (
    DevicePreset("h100", 989.0, 80.0, 494.0, 450.0, True,
                 "H100 SXM: 989 TFLOP/s dense bf16, 80 GB; VAE convs as TF32 (494, cuDNN default); "
                 "NVLink 450 GB/s per direction"),
    DevicePreset("h200", 989.0, 141.0, 494.0, 450.0, True,
                 "H200 SXM: 989 TFLOP/s dense bf16, 141 GB; VAE convs as TF32 (494); NVLink 450 GB/s"),
    DevicePreset("ascend-a2", 313.0, 64.0, 156.0, 196.0, True,
                 "Atlas 800T A2 / Ascend 910B (assumed): 313 TFLOP/s dense bf16, 64 GB; VAE convs as "
                 "HF32 at half rate (156, assumed); HCCS 196 GB/s per direction (assumed)"),
    DevicePreset("cpu", None, None, None, None, False,
                 "CPU: no built-in figures; give the peak (TFLOP/s) and memory yourself"),
)}


# --------------------------------------------------------------------------- parameter counts
def count_dit_params(dim: int, ffn_dim: int, freq_dim: int, num_layers: int, in_dim: int, out_dim: int,
                     text_dim: int = 4096, **_: object) -> Tuple[int, int]:
    """Parameters of one WanDiT expert from its dims (spec dit.md, Tensors) -> (total, per block)."""
    patch = PATCH[0] * PATCH[1] * PATCH[2]
    linear = lambda n_in, n_out: n_in * n_out + n_out  # noqa: E731  weight + bias
    attention = 4 * linear(dim, dim) + 2 * dim  # q, k, v, o + RMSNorm q, k (over all of D)
    block = (6 * dim                                    # modulation [1, 6, D]
             + 2 * attention                            # self- and cross-attention
             + 2 * dim                                  # norm3 (affine LayerNorm)
             + linear(dim, ffn_dim) + linear(ffn_dim, dim))
    embeddings = (dim * in_dim * patch + dim                          # patch Conv3d
                  + linear(text_dim, dim) + linear(dim, dim)          # text MLP
                  + linear(freq_dim, dim) + linear(dim, dim)          # time MLP
                  + linear(dim, 6 * dim))                             # time projection
    head = 2 * dim + linear(dim, out_dim * patch)
    return embeddings + num_layers * block + head, block


def count_t5_params(vocab_size: int, dim: int, dim_attn: int, dim_ffn: int, num_heads: int, num_layers: int,
                    num_buckets: int, **_: object) -> int:
    """UMT5 encoder parameters from its dims (spec t5.md; no biases, per-block position tables)."""
    block = 2 * dim + 4 * dim * dim_attn + 3 * dim * dim_ffn + num_buckets * num_heads
    return vocab_size * dim + num_layers * block + dim


class _VaeTally:
    """Walks the VAE layout of spec vae.md, adding up parameters, FLOP and causal-cache bytes.
    Extents are totals over the clip: `frames` output frames of `h x w` pixels."""

    def __init__(self) -> None:
        self.params = 0
        self.flops = 0.0
        self.cache_bytes = 0.0  # float32 frames each temporal conv keeps from the previous chunk

    def conv(self, cin: int, cout: int, kernel: Tuple[int, int, int], frames: float, h: int, w: int,
             cached_frames: int = 0) -> None:
        volume = kernel[0] * kernel[1] * kernel[2]
        self.params += cin * cout * volume + cout
        self.flops += 2.0 * cin * cout * volume * frames * h * w
        self.cache_bytes += 4.0 * cached_frames * cin * h * w

    def res(self, cin: int, cout: int, frames: float, h: int, w: int) -> None:
        self.params += cin + cout  # two RMS_norm gammas
        self.conv(cin, cout, (3, 3, 3), frames, h, w, cached_frames=2)
        self.conv(cout, cout, (3, 3, 3), frames, h, w, cached_frames=2)
        if cin != cout:
            self.conv(cin, cout, (1, 1, 1), frames, h, w)

    def attention(self, c: int, frames: float, h: int, w: int) -> None:
        pixels = h * w  # single-head attention over one frame
        self.params += c + (3 * c * c + 3 * c) + (c * c + c)
        self.flops += frames * (2.0 * 4 * c * c * pixels + 4.0 * pixels * pixels * c)


def vae_encoder_tally(c: int, z: int, mult: List[int], res_blocks: int, temporal: List[bool],
                      frames: int, h: int, w: int) -> _VaeTally:
    """Encoder over a `frames x h x w` video (chunks of 1, 4, 4, ... frames)."""
    tally, dims = _VaeTally(), [c * m for m in [1] + list(mult)]
    tally.conv(3, dims[0], (3, 3, 3), frames, h, w, cached_frames=2)
    for stage, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        for i in range(res_blocks):
            tally.res(cin if i == 0 else cout, cout, frames, h, w)
        if stage < len(mult) - 1:
            h, w = h // 2, w // 2
            tally.conv(cout, cout, (1, 3, 3), frames, h, w)  # stride-2 Conv2d
            if temporal[stage]:  # stride-2 time conv on every chunk but the first
                tally.conv(cout, cout, (3, 1, 1), (frames - 1) / 2, h, w, cached_frames=1)
                frames = 1 + (frames - 1) // 2
    top = dims[-1]
    tally.res(top, top, frames, h, w), tally.attention(top, frames, h, w), tally.res(top, top, frames, h, w)
    tally.params += top
    tally.conv(top, 2 * z, (3, 3, 3), frames, h, w, cached_frames=2)
    tally.conv(2 * z, 2 * z, (1, 1, 1), frames, h, w)  # top-level conv1
    return tally


def vae_decoder_tally(c: int, z: int, mult: List[int], res_blocks: int, temporal: List[bool],
                      latent_frames: int, h: int, w: int) -> _VaeTally:
    """Decoder from a `latent_frames x h x w` latent (one latent frame per chunk)."""
    tally, frames = _VaeTally(), latent_frames
    dims = [c * m for m in [mult[-1]] + list(reversed(mult))]
    up_temporal = list(reversed(temporal))
    tally.conv(z, z, (1, 1, 1), frames, h, w)  # top-level conv2
    tally.conv(z, dims[0], (3, 3, 3), frames, h, w, cached_frames=2)
    tally.res(dims[0], dims[0], frames, h, w), tally.attention(dims[0], frames, h, w)
    tally.res(dims[0], dims[0], frames, h, w)
    for stage, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        cin = cin // 2 if stage > 0 else cin  # every upsample halves the channels
        for i in range(res_blocks + 1):
            tally.res(cin if i == 0 else cout, cout, frames, h, w)
        if stage < len(mult) - 1:
            if up_temporal[stage]:  # time conv to 2C channels, interleaved into twice the frames
                tally.conv(cout, 2 * cout, (3, 1, 1), frames - 1, h, w, cached_frames=2)
                frames = 1 + 2 * (frames - 1)
            h, w = 2 * h, 2 * w
            tally.conv(cout, cout // 2, (1, 3, 3), frames, h, w)  # nearest 2x, then Conv2d
    tally.params += dims[-1]
    tally.conv(dims[-1], 3, (3, 3, 3), frames, h, w, cached_frames=2)
    return tally


def count_vae_params(dim: int, z_dim: int, dim_mult: List[int], num_res_blocks: int,
                     temporal_downsample: List[bool], **_: object) -> int:
    """Wan2.1 VAE parameters (encoder + decoder + the two top-level 1x1 convs)."""
    args = (dim, z_dim, list(dim_mult), num_res_blocks, list(temporal_downsample))
    return vae_encoder_tally(*args, 1, 8, 8).params + vae_decoder_tally(*args, 1, 1, 1).params


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
    t5: float                          # both prompts
    vae_encode: float
    vae_decode: float


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


def make_plan(size: Optional[str] = "1280*720", frame_num: int = 81, steps: int = 40, solver: str = "unipc",
              cfg: bool = True, world_size: Optional[int] = None, ulysses_size: int = 1, cfg_size: int = 1,
              dit_fsdp: bool = False, t5_fsdp: bool = False, t5_cpu: bool = False, offload: Optional[bool] = None,
              cfg_batch: bool = True, dtype: str = "bfloat16", vae_parallel: bool = False,
              device: Optional[str] = None, device_peak_tflops: Optional[float] = None,
              device_memory_gb: Optional[float] = None, efficiency: Optional[float] = None,
              vae_tflops: Optional[float] = None, vae_efficiency: Optional[float] = None,
              link_gbps: Optional[float] = None, max_area: Optional[int] = None,
              image_aspect: Optional[float] = None) -> Plan:
    """Cost of one video. `cfg`: guidance on (cond + uncond forwards each step). `world_size`
    None means cfg_size * ulysses_size. `offload` None means on for one device (the engine's
    default). `device` picks a preset (`DEVICE_PRESETS`); explicit figures override it.
    `image_aspect` is the input image's height / width (default: the size's own).
    Invalid combinations raise ConfigError; wasteful ones become `Plan.warnings`."""
    preset = _preset(device)
    world = cfg_size * ulysses_size if world_size is None else world_size
    _validate(frame_num, steps, solver, dtype, world, ulysses_size, cfg_size)
    offload = (world == 1) if offload is None else bool(offload)
    peak = device_peak_tflops if device_peak_tflops is not None else (preset.peak_tflops if preset else None)
    capacity_gb = device_memory_gb if device_memory_gb is not None else (preset.memory_gb if preset else None)
    vae_peak = vae_tflops if vae_tflops is not None else (preset.vae_tflops if preset else None)
    link = link_gbps if link_gbps is not None else (preset.link_gbps if preset else None)
    eff = DEFAULT_EFFICIENCY if efficiency is None else efficiency
    vae_eff = DEFAULT_VAE_EFFICIENCY if vae_efficiency is None else vae_efficiency
    for flag, value in (("--peak-tflops", peak), ("--memory-gb", capacity_gb),
                        ("--vae-tflops", vae_peak), ("--link-gbps", link)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag}: must be a positive number, got {value}")
    for flag, value in (("--efficiency", eff), ("--vae-efficiency", vae_eff)):
        if not (0 < value <= 1):
            raise ConfigError(f"{flag}: must be in (0, 1] (a fraction of the peak), got {value}")

    consts = constants()
    dit, t5, vae = consts["i2v_a14b_dit"], consts["umt5_xxl_encoder"], consts["wan21_vae"]
    geometry = _geometry(size, max_area, image_aspect, frame_num, ulysses_size)
    dit_params, block_params = count_dit_params(**dit)
    t5_params, vae_params = count_t5_params(**t5), count_vae_params(**vae)

    # ---- FLOP
    D, ffn, layers, L = dit["dim"], dit["ffn_dim"], dit["num_layers"], geometry.tokens
    linear, attention = block_flops(L, L, D, ffn)
    forwards = 2 if cfg else 1
    per_forward = layers * (linear + attention)
    # Ulysses: each rank runs the linear layers on seq_len / sp tokens and attention for N / sp
    # heads over all seq_len queries and the L real keys. CFG parallel: each group one branch.
    rank_linear, rank_attention = block_flops(geometry.seq_len, L, D, ffn)
    rank_forward = layers * (rank_linear + rank_attention) / ulysses_size
    rank_forwards = math.ceil(forwards / cfg_size)
    _, lat_f, lat_h, lat_w = geometry.latent
    vae_args = (vae["dim"], vae["z_dim"], list(vae["dim_mult"]), vae["num_res_blocks"],
                list(vae["temporal_downsample"]))
    encoder = vae_encoder_tally(*vae_args, frame_num, geometry.height, geometry.width)
    decoder = vae_decoder_tally(*vae_args, lat_f, lat_h, lat_w)
    flops = Flops(linear, attention, per_forward, forwards, forwards * per_forward, steps * forwards * per_forward,
                  rank_forward, rank_forwards, rank_forwards * rank_forward, steps * rank_forwards * rank_forward,
                  _t5_flops(t5, t5_params), encoder.flops, decoder.flops)

    # ---- memory
    layout = dict(dtype=dtype, world=world, ulysses=ulysses_size, cfg=cfg, cfg_size=cfg_size, dit_fsdp=dit_fsdp,
                  t5_fsdp=t5_fsdp, t5_cpu=t5_cpu, cfg_batch=cfg_batch, vae_parallel=vae_parallel)
    sizes = dict(geometry=geometry, dit=dit, dit_params=dit_params, block_params=block_params, t5=t5,
                 t5_params=t5_params, vae_params=vae_params, vae_dim=vae["dim"], encoder=encoder, decoder=decoder)
    capacity = capacity_gb * GB if capacity_gb is not None else None
    memory = _memory(offload=offload, capacity=capacity, **layout, **sizes)

    # ---- time
    timing = None
    if peak is not None:
        timing = _timing(flops, geometry, D, layers, dit_params, dtype, steps, ulysses_size, cfg_size, world,
                         dit_fsdp, vae_parallel, peak, eff, vae_peak, vae_eff, link)

    assumptions = _assumptions(preset, peak, eff, vae_peak, vae_eff, link, cfg_batch and cfg and cfg_size == 1)
    plan = Plan(size=f"{geometry.width}*{geometry.height}", frame_num=frame_num, steps=steps, solver=solver, cfg=cfg,
                world_size=world, ulysses_size=ulysses_size, cfg_size=cfg_size, dit_fsdp=dit_fsdp, t5_fsdp=t5_fsdp,
                t5_cpu=t5_cpu, offload=offload, cfg_batch=cfg_batch, dtype=dtype, vae_parallel=vae_parallel,
                device=preset.name if preset else None, peak_tflops=peak, efficiency=eff, link_gbps=link,
                dit_params_per_expert=dit_params, t5_params=t5_params, vae_params=vae_params, geometry=geometry,
                flops=flops, memory=memory, timing=timing, warnings=(), assumptions=assumptions)
    requested = parse_size(size) if size is not None and image_aspect is None and max_area is None else None
    without_offload = _memory(offload=False, capacity=capacity, **layout, **sizes) if offload else None
    return replace(plan, warnings=tuple(_warnings(plan, requested, preset, without_offload)))


def _preset(device: Optional[str]) -> Optional[DevicePreset]:
    if device is None:
        return None
    key = device.strip().lower()
    if key not in DEVICE_PRESETS:
        raise ConfigError(f"--hardware: unknown device preset {device!r}; choose one of {', '.join(DEVICE_PRESETS)}")
    return DEVICE_PRESETS[key]


def _validate(frame_num: int, steps: int, solver: str, dtype: str, world: int, ulysses: int, cfg_size: int) -> None:
    heads = constants()["i2v_a14b_dit"]["num_heads"]
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


def _t5_flops(t5: dict, params: int) -> float:
    """Two prompts (positive + negative) of 512 tokens: 2 FLOP per non-embedding weight per token
    plus the attention scores/values."""
    tokens, non_embedding = constants()["defaults"]["text_len"], params - t5["vocab_size"] * t5["dim"]
    per_prompt = 2.0 * non_embedding * tokens + t5["num_layers"] * 4.0 * tokens * tokens * t5["dim_attn"]
    return 2 * per_prompt


def _memory(*, offload: bool, capacity: Optional[float], dtype: str, world: int, ulysses: int, cfg: bool,
            cfg_size: int, dit_fsdp: bool, t5_fsdp: bool, t5_cpu: bool, cfg_batch: bool, vae_parallel: bool,
            geometry: Geometry, dit: dict, dit_params: int, block_params: int, t5: dict, t5_params: int,
            vae_params: int, vae_dim: int, encoder: _VaeTally, decoder: _VaeTally) -> Memory:
    """Per-device bytes in the four phases of a run: text encoding, VAE encode, denoising, decode."""
    width = DTYPE_BYTES[dtype]
    experts = 1 if offload else 2
    dit_weights = experts * dit_params * width / (world if dit_fsdp else 1)
    gather = 2 * block_params * width if dit_fsdp and world > 1 else 0.0  # current + prefetched block
    dit_idle = 0.0 if offload else dit_weights  # offloaded experts live on the host outside the loop
    t5_weights = 0.0 if t5_cpu else t5_params * width / (world if t5_fsdp else 1)
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
        out.append("--cfg-size 2 with guidance off: there is one branch per step, so half the devices idle")
    if memory.capacity is not None:
        if memory.peak > memory.capacity:
            out.append(f"peak memory {memory.peak / GB:.1f} GB ({memory.peak_phase}) exceeds the device's "
                       f"{memory.capacity / GB:.0f} GB; consider --offload-model, --dit-fsdp, --t5-fsdp/--t5-cpu "
                       f"or --vae-parallel")
        elif memory.peak > 0.9 * memory.capacity:
            out.append(f"peak memory {memory.peak / GB:.1f} GB is within 10% of the device's "
                       f"{memory.capacity / GB:.0f} GB (allocator overhead may not fit)")
        if (memory_without_offload is not None and world == 1
                and memory_without_offload.peak <= 0.9 * memory.capacity):
            out.append(f"offload is on although both experts fit ({memory_without_offload.peak / GB:.1f} GB "
                       f"peak without it); --no-offload-model saves the host/device expert swaps")
    if plan.dtype == "float32" and (preset is None or preset.accelerator):
        out.append("float32 weights on an accelerator: twice the bf16 memory and far below the bf16 "
                   "matrix peak the time estimate assumes (keep float32 for reference checks on the CPU)")
    if world == 1:
        for flag, on in (("--dit-fsdp", plan.dit_fsdp), ("--t5-fsdp", plan.t5_fsdp),
                         ("--vae-parallel", plan.vae_parallel)):
            if on:
                out.append(f"{flag} on one device does nothing (there is no one to share with)")
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


# --------------------------------------------------------------------------- rendering
def _si(value: float, unit: str = "FLOP") -> str:
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _seconds(value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f} s" if value < 100 else f"{value:.0f} s ({value / 60:.1f} min)"


def format_plan(plan: Plan) -> str:
    """A readable multi-line table of the plan (what `wanengine plan` prints)."""
    g, f, m, t = plan.geometry, plan.flops, plan.memory, plan.timing
    lines: List[str] = []
    row = lambda label, *cols: lines.append(f"  {label:<32}" + "".join(f"{c:>14}" for c in cols).rstrip())  # noqa: E731
    parallel = [name for name, on in (("DiT FSDP", plan.dit_fsdp), ("T5 FSDP", plan.t5_fsdp),
                                      ("T5 on CPU", plan.t5_cpu), ("VAE parallel", plan.vae_parallel)) if on]
    lines.append(f"wanengine plan: {g.width}x{g.height}, {plan.frame_num} frames, {plan.steps} steps "
                 f"({plan.solver}), guidance {'on' if plan.cfg else 'off'}")
    lines.append(f"layout: {plan.world_size} device(s) = cfg {plan.cfg_size} x ulysses {plan.ulysses_size}"
                 f"{'; ' + ', '.join(parallel) if parallel else ''}; offload {'on' if plan.offload else 'off'}; "
                 f"{plan.dtype}")
    if plan.peak_tflops is not None:
        capacity = f", {m.capacity / GB:.0f} GB" if m.capacity else ""
        lines.append(f"device: {plan.device or 'custom'}: {plan.peak_tflops:g} TFLOP/s x {plan.efficiency:.2f} "
                     f"efficiency{capacity}")
    lines.append("Geometry")
    row("output frame", f"{g.width} x {g.height} x {g.frame_num}")
    row("latent", " x ".join(str(n) for n in g.latent))
    row("DiT tokens L", f"{g.tokens:,}")
    row("seq_len (per rank)", f"{g.seq_len:,} ({g.tokens_per_rank:,})")
    lines.append("Parameters")
    width = DTYPE_BYTES[plan.dtype]
    expert = plan.dit_params_per_expert
    row("DiT, one expert", f"{expert / 1e9:.2f} B", f"{expert * width / GB:.1f} GB")
    row("UMT5-XXL encoder", f"{plan.t5_params / 1e9:.2f} B", f"{plan.t5_params * width / GB:.1f} GB")
    row("VAE", f"{plan.vae_params / 1e6:.1f} M", f"{plan.vae_params * 4 / GB:.2f} GB")
    lines.append("Compute" + " " * 27 + f"{'whole run':>14}{'per device':>14}")
    share = f.attention_per_block / (f.attention_per_block + f.linear_per_block)
    row("linear / block", _si(f.linear_per_block))
    row(f"attention / block ({share:.0%})", _si(f.attention_per_block))
    row("one forward", _si(f.per_forward), _si(f.per_device_forward))
    row(f"one step ({f.forwards_per_step} forwards)", _si(f.per_step), _si(f.per_device_step))
    if f.forwards_per_device_step != f.forwards_per_step:
        row("", "", f"({f.forwards_per_device_step} forward)")
    row(f"video ({plan.steps} steps)", _si(f.per_video), _si(f.per_device_video))
    row("T5 / VAE encode / VAE decode", f"{_si(f.t5)} / {_si(f.vae_encode)} / {_si(f.vae_decode)}")
    lines.append("Memory per device (GB)" + " " * 12 + "".join(f"{p:>14}" for p in PHASES))
    for label, *values in m.rows:
        row(label, *(f"{v / GB:.2f}" if v else "-" for v in values))
    row("total", *(f"{v / GB:.2f}" for v in m.phases))
    of = f" of {m.capacity / GB:.0f} GB" if m.capacity else ""
    lines.append(f"  peak {m.peak / GB:.1f} GB in the {m.peak_phase} phase{of}")
    if t is not None:
        lines.append("Time estimate (one device)")
        row("compute / step", _seconds(t.compute_per_step_s))
        for label, value in (("Ulysses all-to-all / step", t.ulysses_comm_per_step_s),
                             ("CFG exchange / step", t.cfg_comm_per_step_s),
                             ("FSDP all-gather / step (hidden)", t.fsdp_gather_per_step_s)):
            if value:  # None: no link bandwidth known; 0: that parallel mode is off
                row(label, _seconds(value))
        row("step", _seconds(t.per_step_s))
        row(f"denoising ({plan.steps} steps)", _seconds(t.denoise_s))
        row("T5 + VAE encode + VAE decode",
            " + ".join(_seconds(v) for v in (t.t5_s, t.vae_encode_s, t.vae_decode_s)))
        row("video (without model loading)", _seconds(t.per_video_s))
    if plan.warnings:
        lines.append("Warnings")
        lines.extend(f"  ! {w}" for w in plan.warnings)
    lines.append("Assumptions")
    lines.extend(f"  - {a}" for a in plan.assumptions)
    return "\n".join(lines)
