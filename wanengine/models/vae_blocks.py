"""Building blocks of the Wan2.1 causal video VAE (`vae.md`), with the released tensor names.

Activations are `[B, C, T, H, W]`. The VAE runs clips chunk by chunk in time; every layer
that looks back in time keeps its state in a `CausalCache` that the caller creates for one
`encode`/`decode` call (or one spatial band) and passes down. Modules themselves hold no
per-call state, so they are re-entrant and can be shared by several bands or ranks.

Where spatial padding happens (the places a spatial-parallel wrapper applied from outside
must give halos): every 3-D conv builds its padded input in `CausalConv3d.padded_input`;
`Resample.resample` is `[ZeroPad2d(0,1,0,1), Conv2d(stride 2)]` when downsampling and
`[Upsample2x, Conv2d(padding=1)]` when upsampling; `AttentionBlock` is global per frame.
`Decoder3d.forward_band` is the single-device alternative: exact bands with recomputed halos.

On the CPU (float32, inference) a fast path is on by default (`CPU_FAST_PATH`): 3-D convs call
oneDNN directly in the channels-last layout (`conv3d`), and the upsampling `[Upsample2x,
Conv2d]` runs as four sub-pixel 2x2 convs (`upsample2x_conv3x3`) -- unless that Conv2d's
`forward` was replaced on the instance, in which case the modules run as listed above.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels

CACHE_FRAMES = 2  # a kernel-3 causal conv looks back two frames


# ----------------------------------------------------------------------------- CPU fast path
def _onednn_conv_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch, "mkldnn_convolution")


# Process-wide switch of the CPU fast path (channels-last oneDNN 3-D convs, see `conv3d`); on by
# default where oneDNN is built in. Benchmarks turn it off to time torch's own dispatch.
CPU_FAST_PATH = _onednn_conv_available()


def _cpu_fast(x: torch.Tensor) -> bool:
    return CPU_FAST_PATH and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """`channels_last(_3d)` when `x` is laid out channels-last (and not also plain contiguous)."""
    if x.dim() in (4, 5) and not x.is_contiguous():
        last = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
        if x.is_contiguous(memory_format=last):
            return last
    return torch.contiguous_format


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Any) -> torch.Tensor:
    """`F.conv3d` without padding. On the CPU (float32, inference) it calls oneDNN directly, in
    the channels-last layout:
    - torch's dispatcher sends every batch-1 conv with N*C*T*H <= 20480 -- a rule of thumb made
      for 2-D convs -- to its unfold + GEMM path, 1.5-8x slower for the VAE's 3-D convs (the
      encoder's 3-channel conv1, the first chunks, the 1/8-resolution stages);
    - with `[B, C, T, H, W]` in plain layout oneDNN reorders every input and output to its
      blocked layout (~15% of the VAE's time); channels-last it reads and writes directly. The
      output is channels-last, and the VAE's other ops keep that layout.
    Same result up to float32 summation order (~5e-7 relative)."""
    if _cpu_fast(x):
        x = x.contiguous(memory_format=torch.channels_last_3d)
        return torch.mkldnn_convolution(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
                                        [0, 0, 0], list(stride), [1, 1, 1], 1)
    return F.conv3d(x, weight, bias, stride)


class CausalCache:
    """Per-call temporal state of every causal layer, keyed by the layer module itself.

    One object spans one chunked pass (all chunks of one encode or decode, or of one
    spatial band); a fresh object means "nothing seen yet"."""

    def __init__(self) -> None:
        self._slots: Dict[nn.Module, Any] = {}

    def get(self, layer: nn.Module) -> Any:
        return self._slots.get(layer)

    def set(self, layer: nn.Module, value: Any) -> None:
        self._slots[layer] = value

    def __len__(self) -> int:
        return len(self._slots)

    def tensors(self) -> list:
        return [v for v in self._slots.values() if isinstance(v, torch.Tensor)]

    def move_to(self, device: Union[str, torch.device]) -> None:
        """Move every cached tensor (e.g. park a band's state on the host while others run).
        Asynchronous: a CUDA -> CPU copy lands in pinned memory, and the copy back is queued
        on the same stream, so stream order keeps it correct without a host sync."""
        for layer, value in self._slots.items():
            if isinstance(value, torch.Tensor):
                self._slots[layer] = value.to(device, non_blocking=True)


_FIRST = "first"  # upsample3d slot marker: the first chunk went through without a time conv


def frames_to_keep(x: torch.Tensor, past: Optional[torch.Tensor]) -> torch.Tensor:
    """The last two input frames seen once `x` is consumed: `x[-2:]`, or `[past[-1], x[0]]`
    for a one-frame chunk with a cache. Cloned so the chunk itself can be freed."""
    if x.shape[2] < CACHE_FRAMES and past is not None:
        return torch.cat([past[:, :, -1:].to(x.dtype), x[:, :, -1:]], dim=2)
    return x[:, :, -CACHE_FRAMES:].clone()


class CausalConv3d(nn.Conv3d):
    """Conv3d that pads `(pw, pw)`, `(ph, ph)` spatially and `2 * pt` frames at the start of
    time only; frames from a cache replace that many zero frames."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, *,
                 stride: Any = 1, padding: Any = 0) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        pt, ph, pw = padding if isinstance(padding, (tuple, list)) else (padding,) * 3
        self.causal_padding: Tuple[int, int, int] = (int(pt), int(ph), int(pw))

    def conv_with_past(self, x: torch.Tensor, past: Optional[torch.Tensor]) -> torch.Tensor:
        """Apply the conv to `x` with `past` frames prepended in time, zero frames making up the
        rest of the `2 * pt` causal padding, and zero rows/columns around each frame."""
        padded, weight = self.padded_input(x, past), self.weight
        skip = self._zero_taps(x, past)
        if skip:
            # One output frame whose first `skip` time taps read causal zero frames: those taps add
            # exact zeros, so drop them (the first chunk's convs cost a third).
            padded, weight = padded[:, :, skip:], weight[:, :, skip:]
        return conv3d(padded, weight, self.bias, self.stride)

    def _zero_taps(self, x: torch.Tensor, past: Optional[torch.Tensor]) -> int:
        """Number of leading zero frames that the (single) output frame reads, else 0."""
        pt = self.causal_padding[0]
        if not pt or self.stride[0] != 1 or x.shape[2] != 1:
            return 0
        return max(2 * pt - (0 if past is None else past.shape[2]), 0)

    def padded_input(self, x: torch.Tensor, past: Optional[torch.Tensor]) -> torch.Tensor:
        """`[zeros, past, x]` in time, zero-padded in space, built in one allocation (at 720p a
        full-resolution copy is ~2 GB, so no intermediate `cat`). A spatial-parallel wrapper
        replaces this method to fill the border rows/columns from its neighbours instead."""
        pt, ph, pw = self.causal_padding
        pieces = [x] if past is None else [past, x]
        zero_frames = max(2 * pt - sum(p.shape[2] for p in pieces[:-1]), 0)
        if not (ph or pw or zero_frames) and past is None:
            return x
        b, c, t, h, w = x.shape
        frames = zero_frames + sum(p.shape[2] for p in pieces)
        out = torch.empty((b, c, frames, h + 2 * ph, w + 2 * pw), dtype=x.dtype, device=x.device,
                          memory_format=memory_format_of(x))
        if zero_frames:
            out[:, :, :zero_frames].zero_()
        if ph:
            out[:, :, zero_frames:, :ph].zero_()
            out[:, :, zero_frames:, -ph:].zero_()
        if pw:
            out[:, :, zero_frames:, ph:ph + h, :pw].zero_()
            out[:, :, zero_frames:, ph:ph + h, -pw:].zero_()
        start = zero_frames
        for piece in pieces:
            out[:, :, start:start + piece.shape[2], ph:ph + h, pw:pw + w] = piece
            start += piece.shape[2]
        return out

    def forward(self, x: torch.Tensor, cache: Optional[CausalCache] = None) -> torch.Tensor:
        if cache is None or self.causal_padding[0] == 0:  # stateless, or no look-back
            return self.conv_with_past(x, None)
        past = cache.get(self)
        cache.set(self, frames_to_keep(x, past))
        return self.conv_with_past(x, past)


class RMS_norm(nn.Module):  # noqa: N801 - the released module name
    """`x / max(||x||_2 over channels, 1e-12) * sqrt(C) * gamma`, computed in float32."""

    def __init__(self, dim: int, *, images: bool = False) -> None:
        super().__init__()
        # images=True: per-frame 4-D input [N, C, H, W]; else 5-D [B, C, T, H, W]
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))
        self.scale = dim ** 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.normalize(x.float(), dim=1)  # a fresh tensor: scale it in place (memory)
        return normed.mul_(self.scale).mul_(self.gamma.float()).to(x.dtype)


def _silu() -> nn.SiLU:
    # in place: it always follows an RMS_norm, whose output is a fresh tensor
    return nn.SiLU(inplace=True)


class ResidualBlock(nn.Module):
    """`residual(x) + shortcut(x)`; residual = [norm, SiLU, conv3, norm, SiLU, dropout, conv3]."""

    spatial_halo = 2  # two 3x3 convs: each output row depends on input rows +-2
    spatial_scale = 1

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMS_norm(in_dim), _silu(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim), _silu(), nn.Dropout(0.0), CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        shortcut = self.shortcut(x)
        for layer in self.residual:
            x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x.add_(shortcut)  # x is the conv's fresh output


def per_frame(x: torch.Tensor) -> torch.Tensor:
    """`[B, C, T, H, W]` -> `[B*T, C, H, W]`."""
    b, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


def from_frames(x: torch.Tensor, batch: int) -> torch.Tensor:
    """`[B*T, C, H, W]` -> `[B, C, T, H, W]`."""
    bt, c, h, w = x.shape
    return x.reshape(batch, bt // batch, c, h, w).permute(0, 2, 1, 3, 4)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame, plus the input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMS_norm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: Optional[CausalCache] = None) -> torch.Tensor:
        batch, dim, _, height, width = x.shape
        frames = self.norm(per_frame(x))                                  # [N, C, H, W]
        qkv = self.to_qkv(frames).reshape(frames.shape[0], 3, dim, height * width)
        q, k, v = (qkv[:, i].transpose(1, 2).unsqueeze(2) for i in range(3))  # [N, HW, 1, C]
        out = kernels.attention(q, k, v, scale=1.0 / math.sqrt(dim))      # [N, HW, 1, C]
        out = out.squeeze(2).transpose(1, 2).reshape(frames.shape[0], dim, height, width)
        return (x + from_frames(self.proj(out), batch)).contiguous(memory_format=memory_format_of(x))


class Upsample2x(nn.Module):
    """Nearest-exact 2x spatial upsampling of `[N, C, H, W]`, computed in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").to(x.dtype)


def upsample2x_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """`conv3x3(nearest_upsample_2x(x), padding=1)` for `x [N, C, H, W]` -> `[N, C_out, 2H, 2W]`,
    without building the upsampled image, on the CPU fast path (oneDNN, channels-last).

    Output pixel (2i + a, 2j + b) only sees source rows {i-1, i} (a = 0) or {i, i+1} (a = 1),
    and likewise columns, so each of the four phases is a 2x2 conv on the source with summed
    taps: 16 instead of 36 multiply-adds per output pixel and input channel. Same result up
    to float32 rounding of the summed weights (~1e-7 relative)."""
    n, _, h, w = x.shape
    taps = ((weight[:, :, 0:1], weight[:, :, 1:2] + weight[:, :, 2:3]),   # a = 0: rows i-1, i
            (weight[:, :, 0:1] + weight[:, :, 1:2], weight[:, :, 2:3]))   # a = 1: rows i, i+1
    padded = F.pad(x, (1, 1, 1, 1))  # [N, C, H+2, W+2]
    out = torch.empty((n, weight.shape[0], 2 * h, 2 * w), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    phases = out.unflatten(2, (h, 2)).unflatten(4, (w, 2))  # [N, C_out, H, 2, W, 2]
    for a in (0, 1):
        rows = torch.cat(taps[a], dim=2)  # [C_out, C, 2, 3]
        for b in (0, 1):
            cols = (rows[..., 0:1], rows[..., 1:2] + rows[..., 2:3]) if b == 0 else \
                (rows[..., 0:1] + rows[..., 1:2], rows[..., 2:3])
            kernel = torch.cat(cols, dim=3).contiguous()  # [C_out, C, 2, 2]
            window = padded[:, :, a:a + h + 1, b:b + w + 1].contiguous(memory_format=torch.channels_last)
            phases[:, :, :, a, :, b] = torch.mkldnn_convolution(window, kernel, bias, [0, 0], [1, 1], [1, 1], 1)
    return out


class Resample(nn.Module):
    """2x spatial (and for the `3d` modes 2x temporal) down- or upsampling.

    `resample.0` is parameter-free (upsample / zero-pad), `resample.1` the Conv2d, and
    `time_conv` the temporal conv of `downsample3d` / `upsample3d`."""

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Resample mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
            # an output row of the 3x3 conv (at the upsampled size) reads rows +-1
            self.spatial_halo, self.spatial_scale = 1, 2
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            self.spatial_halo, self.spatial_scale = None, None  # not used by row tiling
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=0)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._upsample_time(x, cache)
        frames = per_frame(x)
        conv = self.resample[1]
        if self.mode.startswith("upsample") and _cpu_fast(frames) and "forward" not in conv.__dict__:
            # (a wrapper that replaced the conv's forward, e.g. for halos, gets the plain path)
            frames = upsample2x_conv3x3(frames, conv.weight, conv.bias)
        else:
            frames = self.resample(frames)
        x = from_frames(frames, x.shape[0])
        if self.mode == "downsample3d":
            x = self._downsample_time(x, cache)
        return x

    def _upsample_time(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        state = cache.get(self.time_conv)
        if state is None:  # first chunk: one frame stays one frame
            cache.set(self.time_conv, _FIRST)
            return x
        past = None if isinstance(state, str) else state
        if x.shape[2] >= CACHE_FRAMES:
            new = x[:, :, -CACHE_FRAMES:].clone()
        else:  # the slot never saw real frames before: a zero frame stands in
            before = torch.zeros_like(x[:, :, -1:]) if past is None else past[:, :, -1:].to(x.dtype)
            new = torch.cat([before, x[:, :, -1:]], dim=2)
        y = self.time_conv.conv_with_past(x, past)  # [B, 2C, T, H, W]
        cache.set(self.time_conv, new)
        b, c2, t, h, w = y.shape
        # channels [0, C) become frame 2t, channels [C, 2C) frame 2t+1 (one copy, in y's layout)
        out = torch.empty((b, c2 // 2, 2 * t, h, w), dtype=y.dtype, device=y.device, memory_format=memory_format_of(y))
        out.unflatten(2, (t, 2)).copy_(y.unflatten(1, (2, c2 // 2)).permute(0, 2, 3, 1, 4, 5))
        return out

    def _downsample_time(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        state = cache.get(self.time_conv)
        cache.set(self.time_conv, x[:, :, -1:].clone())
        if state is None:  # first chunk passes unchanged
            return x
        return self.time_conv.conv_with_past(x, state)  # [stored[-1], x], kernel 3, stride 2


class Head(nn.Sequential):
    """`[RMS_norm, SiLU, CausalConv3d(k=3)]` with the conv's causal cache threaded through."""

    spatial_halo = 1
    spatial_scale = 1

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__(RMS_norm(in_dim), _silu(), CausalConv3d(in_dim, out_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:  # type: ignore[override]
        return self[2](self[1](self[0](x)), cache)


def _run(layers: nn.ModuleList, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
    for layer in layers:
        x = layer(x, cache)
    return x


def _middle(dim: int) -> nn.ModuleList:
    return nn.ModuleList([ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim)])


class Encoder3d(nn.Module):
    """Video chunk `[B, 3, t, H, W]` -> `[B, 2z, t', H/8, W/8]` (mean and log-variance)."""

    def __init__(self, dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                 temporal_downsample: Sequence[bool]) -> None:
        super().__init__()
        dims = [dim * m for m in [1, *dim_mult]]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks = []
        for stage, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if stage != len(dim_mult) - 1:
                blocks.append(Resample(out_dim, "downsample3d" if temporal_downsample[stage] else "downsample2d"))
        self.downsamples = nn.ModuleList(blocks)
        self.middle = _middle(dims[-1])
        self.head = Head(dims[-1], z_dim * 2)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        x = _run(self.downsamples, x, cache)
        x = _run(self.middle, x, cache)
        return self.head(x, cache)


class Decoder3d(nn.Module):
    """Latent chunk `[B, z, t, h, w]` -> video `[B, 3, t', 8h, 8w]` (not clamped).

    `forward_band` produces only some output rows: the layers after the (global, per-frame)
    middle attention run on a horizontal slab that carries enough halo rows, with the slab
    cropped after every layer to exactly the rows the rest of the decoder still needs."""

    def __init__(self, dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                 temporal_upsample: Sequence[bool]) -> None:
        super().__init__()
        dims = [dim * m for m in [dim_mult[-1], *reversed(dim_mult)]]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0])
        blocks = []
        in_dim = dims[0]
        for stage, out_dim in enumerate(dims[1:]):
            for _ in range(num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if stage != len(dim_mult) - 1:
                blocks.append(Resample(out_dim, "upsample3d" if temporal_upsample[stage] else "upsample2d"))
                in_dim = out_dim // 2  # the upsampling conv halves the width
        self.upsamples = nn.ModuleList(blocks)
        self.head = Head(dims[-1], 3)

    def stem(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """conv1 + middle (incl. the per-frame global attention), at latent resolution."""
        return _run(self.middle, self.conv1(x, cache), cache)

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = _run(self.upsamples, self.stem(x, cache), cache)
        return self.head(x, cache)

    def band_rows(self, out_rows: Tuple[int, int], latent_height: int) -> list:
        """Input row range `[lo, hi)` of every layer after the stem (plus the final output
        range) so that output rows `out_rows` come out exact: walk back from the output,
        widening by each layer's halo and shrinking by its upsampling, clipped to the image
        (clipped edges are true borders, where zero padding is the right answer)."""
        layers = [*self.upsamples, self.head]
        heights = [latent_height]
        for layer in layers:
            heights.append(heights[-1] * layer.spatial_scale)
        ranges = [out_rows]
        for i in range(len(layers) - 1, -1, -1):
            lo, hi = ranges[0]
            halo, scale = layers[i].spatial_halo, layers[i].spatial_scale
            ranges.insert(0, (max((lo - halo) // scale, 0), min(-(-(hi + halo) // scale), heights[i])))
        return ranges

    def forward_band(self, stem_out: torch.Tensor, cache: CausalCache, out_rows: Tuple[int, int]) -> torch.Tensor:
        """Rows `out_rows` (output resolution) of the decoded chunk, from the full-frame stem
        output `[B, C, t, h, w]`; `cache` must be this band's own (its slabs are band-sized)."""
        ranges = self.band_rows(out_rows, stem_out.shape[3])
        x = stem_out[:, :, :, ranges[0][0]:ranges[0][1]]
        for i, layer in enumerate([*self.upsamples, self.head]):
            x = layer(x, cache)  # covers rows [lo_i * scale, hi_i * scale)
            start = ranges[i][0] * layer.spatial_scale
            lo, hi = ranges[i + 1]
            x = x[:, :, :, lo - start:hi - start]
        return x
