"""The Wan2.1 causal video VAE (`Wan2.1_VAE.pth`): `WanVAE.encode` / `decode` and `load_vae`.

Clips are processed in causal time chunks exactly as the reference does (encode: frame 0,
then groups of 4; decode: one latent frame at a time), with every temporal layer's state in
a `CausalCache` created per call, so calls are independent and re-entrant.

`decode(latent, tile_rows=n)` bounds memory by decoding horizontal bands of `n` latent rows
(`8n` output rows). It is exact: the stem (conv1 + middle, whose attention needs the whole
frame) runs once per chunk on the full, small latent-resolution frame; everything after it
runs per band on a slab with just enough halo rows, cropped after every layer to the rows
still needed (`Decoder3d.band_rows`), with each band keeping its own causal caches.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..constants import constants
from ..errors import CheckpointError, UserInputError
from .loading import assign_streaming, check_names_and_shapes, expected_shapes
from .vae_blocks import CausalCache, CausalConv3d, Decoder3d, Encoder3d

if TYPE_CHECKING:  # pragma: no cover
    from ..io.formats.component_files import ComponentTensors

SPATIAL_STRIDE = 8
TEMPORAL_STRIDE = 4


@dataclass(frozen=True)
class VAEConfig:
    """Architecture numbers; for a checkpoint they come from its tensor shapes."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: Tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: Tuple[bool, ...] = (False, True, True)

    def __post_init__(self) -> None:
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError("VAEConfig: temporal_downsample needs one entry per downsampling stage")
        if 2 ** (len(self.dim_mult) - 1) != SPATIAL_STRIDE or 2 ** sum(self.temporal_downsample) != TEMPORAL_STRIDE:
            raise ValueError("VAEConfig: this engine expects 8x spatial and 4x temporal compression")


def infer_vae_config(shapes: Mapping[str, Tuple[int, ...]], source: str) -> VAEConfig:
    """Read the config off tensor shapes: widths from `encoder.conv1`/`conv2`, the stage layout
    from the `encoder.downsamples.*` entries (residual blocks, then a resample per stage)."""
    def need(name: str) -> Tuple[int, ...]:
        if name not in shapes:
            raise CheckpointError(f"{source}: tensor {name} missing (cannot infer the VAE configuration)")
        return tuple(shapes[name])

    dim, z_dim = need("encoder.conv1.weight")[0], need("conv2.weight")[0]
    stages, blocks, temporal, width = [], 0, [], 0
    index = 0
    while True:
        prefix = f"encoder.downsamples.{index}."
        if prefix + "residual.2.weight" in shapes:
            blocks += 1
            width = shapes[prefix + "residual.2.weight"][0]
        elif prefix + "resample.1.weight" in shapes and blocks:
            stages.append((blocks, width))
            temporal.append(prefix + "time_conv.weight" in shapes)
            blocks = 0
        else:
            break
        index += 1
    if blocks == 0 or not stages:
        raise CheckpointError(f"{source}: encoder.downsamples.* do not look like a Wan VAE encoder")
    stages.append((blocks, width))
    counts = {b for b, _ in stages}
    if len(counts) != 1 or any(w % dim for _, w in stages):
        raise CheckpointError(f"{source}: inconsistent encoder stages {stages} (residual blocks, width)")
    try:
        return VAEConfig(dim=dim, z_dim=z_dim, dim_mult=tuple(w // dim for _, w in stages),
                         num_res_blocks=counts.pop(), temporal_downsample=tuple(temporal))
    except ValueError as exc:
        raise CheckpointError(f"{source}: unsupported VAE layout: {exc}") from exc


class WanVAE(nn.Module):
    """Encoder + decoder with the released tensor names (`encoder.*`, `decoder.*`, `conv1`, `conv2`)."""

    def __init__(self, config: VAEConfig = VAEConfig()) -> None:
        super().__init__()
        self.config = config
        c = config
        self.encoder = Encoder3d(c.dim, c.z_dim, c.dim_mult, c.num_res_blocks, c.temporal_downsample)
        self.conv1 = CausalConv3d(c.z_dim * 2, c.z_dim * 2, 1)
        self.conv2 = CausalConv3d(c.z_dim, c.z_dim, 1)
        self.decoder = Decoder3d(c.dim, c.z_dim, c.dim_mult, c.num_res_blocks, tuple(reversed(c.temporal_downsample)))
        self.allow_tf32 = False  # float32 on CUDA means true float32 unless this is set

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype (the conv weights'; RMS_norm gammas may be kept in float32)."""
        return self.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv1.weight.device

    def _latent_stats(self, channels: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-channel latent mean/std from constants.json as `[1, z, 1, 1, 1]` float32."""
        consts = constants()
        mean = torch.tensor(consts["vae_latent_mean"], dtype=torch.float32, device=self.device)
        std = torch.tensor(consts["vae_latent_std"], dtype=torch.float32, device=self.device)
        if mean.numel() != channels:
            raise UserInputError(f"constants.json has {mean.numel()} latent statistics, the VAE has {channels} channels")
        return mean.view(1, -1, 1, 1, 1), std.view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """`[3, T, H, W]` (or `[B, 3, T, H, W]`) in [-1, 1], T = 4k+1, H and W multiples of 8
        -> scaled latent `[16, 1+k, H/8, W/8]` (or batched), float32."""
        with self._float32_precision():
            return self._encode(video)

    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        x, batched = _as_batch(video, channels=3, what="video")
        _, _, frames, height, width = x.shape
        if frames % TEMPORAL_STRIDE != 1 or height % SPATIAL_STRIDE or width % SPATIAL_STRIDE or not height or not width:
            raise UserInputError(f"video: expected T = 4k+1 frames and H, W multiples of 8 (> 0), "
                                 f"got T={frames}, H={height}, W={width}")
        x = x.to(device=self.device, dtype=self.dtype)
        cache = CausalCache()
        chunks = [x[:, :, :1]] + [x[:, :, 1 + 4 * i: 5 + 4 * i] for i in range((frames - 1) // 4)]
        h = torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)
        mu = self.conv1(h)[:, :self.config.z_dim].float()  # the log-variance half is unused
        mean, std = self._latent_stats(mu.shape[1])
        latent = ((mu - mean) / std).contiguous()  # plain layout out, whatever the convs used
        return latent if batched else latent[0]

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, *, tile_rows: Optional[int] = None,
               offload_caches: bool = False) -> torch.Tensor:
        """Scaled latent `[16, F', h, w]` (or batched) -> video `[3, 1+4(F'-1), 8h, 8w]` in
        [-1, 1], float32.

        `tile_rows`: decode in bands of that many latent rows (same result, less working
        memory; see the module docstring). `offload_caches` (with `tile_rows`): keep each band's
        causal caches on the CPU while other bands run -- those caches (two frames of every
        temporal conv's input, ~8.6 GB at 720p in float32) otherwise dominate the peak."""
        with self._float32_precision():
            return self._decode(latent, tile_rows, offload_caches)

    @contextmanager
    def _float32_precision(self) -> Iterator[None]:
        """Run float32 convs/matmuls in true float32 (no TF32) unless `allow_tf32` is set:
        TF32 convs put the decode ~2.5e-3 away from the float32 reference."""
        if self.allow_tf32 or self.dtype != torch.float32 or self.device.type != "cuda":
            yield
            return
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved

    def _decode(self, latent: torch.Tensor, tile_rows: Optional[int], offload_caches: bool) -> torch.Tensor:
        z, batched = _as_batch(latent, channels=self.config.z_dim, what="latent")
        batch, _, frames, height, width = z.shape
        if not frames or not height or not width:
            raise UserInputError(f"latent: empty shape {list(latent.shape)}")
        if tile_rows is not None and (isinstance(tile_rows, bool) or not isinstance(tile_rows, int) or tile_rows < 1):
            raise UserInputError(f"tile_rows must be a positive number of latent rows, got {tile_rows!r}")
        if offload_caches and tile_rows is None:
            raise UserInputError("offload_caches needs tile_rows (it parks the caches of the bands not running)")
        mean, std = self._latent_stats(z.shape[1])
        z = self.conv2((z.to(device=self.device, dtype=torch.float32) * std + mean).to(self.dtype))
        out = torch.empty(batch, 3, 1 + TEMPORAL_STRIDE * (frames - 1), height * SPATIAL_STRIDE,
                          width * SPATIAL_STRIDE, dtype=torch.float32, device=self.device)
        bands = _bands(height, tile_rows)
        cache = CausalCache()
        band_caches = [CausalCache() for _ in bands]
        start = 0
        for t in range(frames):
            chunk = z[:, :, t:t + 1]  # one latent frame -> 1 frame (t = 0) or 4 frames
            if len(bands) == 1:
                decoded = self.decoder(chunk, cache)
                out[:, :, start:start + decoded.shape[2]] = decoded.clamp(-1.0, 1.0)
            else:
                stem = self.decoder.stem(chunk, cache)
                for (lo, hi), band_cache in zip(bands, band_caches):
                    rows = (lo * SPATIAL_STRIDE, hi * SPATIAL_STRIDE)
                    if offload_caches:
                        band_cache.move_to(self.device)
                    decoded = self.decoder.forward_band(stem, band_cache, rows)
                    if offload_caches:
                        band_cache.move_to("cpu")
                    out[:, :, start:start + decoded.shape[2], rows[0]:rows[1]] = decoded.clamp(-1.0, 1.0)
            start += decoded.shape[2]
            del decoded
        return out if batched else out[0]


def _bands(height: int, tile_rows: Optional[int]) -> list:
    if tile_rows is None or tile_rows >= height:
        return [(0, height)]
    return [(lo, min(lo + tile_rows, height)) for lo in range(0, height, tile_rows)]


def _as_batch(x: torch.Tensor, *, channels: int, what: str) -> Tuple[torch.Tensor, bool]:
    """Accept `[C, T, H, W]` or `[B, C, T, H, W]`; return the 5-D tensor and whether it was batched."""
    if not isinstance(x, torch.Tensor) or x.dim() not in (4, 5) or x.shape[-4] != channels:
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise UserInputError(f"{what}: expected [{channels}, T, H, W] or [B, {channels}, T, H, W], got {shape}")
    if not x.is_floating_point():
        raise UserInputError(f"{what}: expected a floating-point tensor, got {x.dtype}")
    return (x, True) if x.dim() == 5 else (x.unsqueeze(0), False)


def load_vae(path: Union[str, "os.PathLike[str]"], *, device: Union[str, torch.device] = "cpu",
             dtype: torch.dtype = torch.float32) -> WanVAE:
    """Load the VAE from `Wan2.1_VAE.pth`, a single `.safetensors` in released or diffusers
    names (e.g. `wan_2.1_vae.safetensors`) or a diffusers `vae/` directory, streaming tensors
    into the model `open_vae` checked (RMS_norm gammas stay float32)."""
    model, tensors, source = open_vae(path)
    return assign_streaming(model, tensors.stream(), device=device, dtype=dtype, source=source,
                            keep_float32=("gamma",))


def open_vae(path: Union[str, "os.PathLike[str]"]) -> Tuple[WanVAE, "ComponentTensors", str]:
    """The checked first half of loading: the config inferred from tensor shapes, the model
    built on the meta device, names and shapes checked strictly -- no weight read yet."""
    from ..io.formats.component_files import VAE_KIND, open_component

    tensors = open_component(path, VAE_KIND)
    source, found = tensors.source, tensors.shapes
    config = infer_vae_config(found, source)
    with torch.device("meta"):
        model = WanVAE(config)
    check_names_and_shapes(expected_shapes(model), found, source)
    return model, tensors, source
