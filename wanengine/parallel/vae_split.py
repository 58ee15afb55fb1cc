"""VAE spatial parallelism (spec `parallel.md`): every rank encodes / decodes one tile of the
frame, exactly (not blended), and the tiles are all-gathered at the end.

The frame is cut into a `rows x cols` grid of tiles along latent rows and columns (2x1 for 2
ranks, 2x2 for 4, 4x2 for 8); pixel tiles are the latent tiles times 8, so every level of the
encoder and decoder splits on whole rows (even rows before each stride-2 step). The unchanged
VAE runs on the local tile with a few module instances patched from outside:

- each `CausalConv3d` with a spatial kernel of 3: `padded_input` exchanges a one-row and then a
  one-column halo with the neighbouring tiles (zero at the true image border); exchanging
  columns on the row-extended tile carries the corner pixels too;
- the upsampling `Conv2d(3, padding 1)` after nearest 2x upsampling: the same halo on the
  upsampled tile (nearest upsampling is row-local, so this equals the untiled conv);
- the downsampling `ZeroPad2d(0, 1, 0, 1)` before a 3x3 stride-2 conv: a band starting at an
  even row `2a` yields output rows `[a, b)` and needs only the one row below it (and the one
  column to its right) from the neighbour, zero at the true border;
- the middle `AttentionBlock`s: each tile's K and V are all-gathered (attention is over the
  whole frame), queries stay local;
- causal time caches are per call and per process, hence per tile.

Everything else (RMS_norm over channels, SiLU, kernel-1 and time-only convs, the latent
scaling) is per pixel. Patched instances behave as before outside `SplitVAE` calls.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..models.vae_blocks import AttentionBlock, CausalConv3d, Resample, from_frames, per_frame

SPATIAL_STRIDE = 8


def split_sizes(total: int, parts: int) -> List[Tuple[int, int]]:
    """`[lo, hi)` bounds of `parts` near-equal contiguous pieces of `total` (larger ones first)."""
    base, extra = divmod(total, parts)
    bounds, lo = [], 0
    for i in range(parts):
        hi = lo + base + (1 if i < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def tile_grid(world: int, lat_h: int, lat_w: int) -> Optional[Tuple[int, int]]:
    """(rows, cols) of tiles for `world` ranks, most square with rows >= cols, each tile at
    least one latent row and column; None if the frame is too small to split that way."""
    options = []
    for cols in range(1, world + 1):
        if world % cols == 0:
            options.append((world // cols, cols))
    # prefer rows >= cols, then the most square (smallest rows - cols)
    options.sort(key=lambda rc: (rc[0] < rc[1], abs(rc[0] - rc[1])))
    for rows, cols in options:
        if rows <= lat_h and cols <= lat_w:
            return rows, cols
    return None


@dataclass(frozen=True)
class Tiling:
    """This rank's tile of a `lat_h x lat_w` latent frame split into `rows x cols` tiles."""

    rows: int
    cols: int
    index: int  # group rank; tiles are numbered row-major
    lat_h: int
    lat_w: int
    group: Optional[dist.ProcessGroup]

    @property
    def row_bounds(self) -> List[Tuple[int, int]]:
        return split_sizes(self.lat_h, self.rows)

    @property
    def col_bounds(self) -> List[Tuple[int, int]]:
        return split_sizes(self.lat_w, self.cols)

    def latent_box(self, index: Optional[int] = None) -> Tuple[int, int, int, int]:
        """(r0, r1, c0, c1) in latent pixels of tile `index` (default: this rank's)."""
        index = self.index if index is None else index
        (r0, r1), (c0, c1) = self.row_bounds[index // self.cols], self.col_bounds[index % self.cols]
        return r0, r1, c0, c1

    def _neighbour(self, drow: int, dcol: int) -> Optional[int]:
        row, col = divmod(self.index, self.cols)
        row, col = row + drow, col + dcol
        if 0 <= row < self.rows and 0 <= col < self.cols:
            return _global_rank(self.group, row * self.cols + col)
        return None

    @property
    def up(self) -> Optional[int]:
        return self._neighbour(-1, 0)

    @property
    def down(self) -> Optional[int]:
        return self._neighbour(1, 0)

    @property
    def left(self) -> Optional[int]:
        return self._neighbour(0, -1)

    @property
    def right(self) -> Optional[int]:
        return self._neighbour(0, 1)

    @property
    def size(self) -> int:
        return self.rows * self.cols


def _global_rank(group: Optional[dist.ProcessGroup], group_rank: int) -> int:
    if group is None or group == dist.group.WORLD:
        return group_rank
    getter = getattr(dist, "get_global_rank", None) or dist.distributed_c10d._get_global_rank  # torch < 2.0
    return getter(group, group_rank)


# --------------------------------------------------------------------------- halo exchange
def _exchange(x: torch.Tensor, dim: int, before: int, after: int, prev: Optional[int], nxt: Optional[int],
              group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """`x` extended along `dim` by `before` slices from the previous tile and `after` from the
    next one (zeros where there is no neighbour: the true image border)."""
    size = x.shape[dim]
    ops, recv_before, recv_after = [], None, None

    def empty(n: int) -> torch.Tensor:
        shape = list(x.shape)
        shape[dim] = n
        return x.new_empty(shape)

    if prev is not None:
        if after:  # the previous tile's bottom halo is my first `after` slices
            ops.append(dist.P2POp(dist.isend, x.narrow(dim, 0, after).contiguous(), prev, group))
        if before:
            recv_before = empty(before)
            ops.append(dist.P2POp(dist.irecv, recv_before, prev, group))
    if nxt is not None:
        if before:  # the next tile's top halo is my last `before` slices
            ops.append(dist.P2POp(dist.isend, x.narrow(dim, size - before, before).contiguous(), nxt, group))
        if after:
            recv_after = empty(after)
            ops.append(dist.P2POp(dist.irecv, recv_after, nxt, group))
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    parts = []
    if before:
        parts.append(recv_before if recv_before is not None else empty(before).zero_())
    parts.append(x)
    if after:
        parts.append(recv_after if recv_after is not None else empty(after).zero_())
    return torch.cat(parts, dim=dim) if len(parts) > 1 else x


def halo_pad(x: torch.Tensor, tiling: Tiling, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
    """Spatially pad the tile `x [..., H, W]` with its neighbours' pixels (rows first, then
    columns of the row-extended tile, so corners are included)."""
    if top or bottom:
        x = _exchange(x, -2, top, bottom, tiling.up, tiling.down, tiling.group)
    if left or right:
        x = _exchange(x, -1, left, right, tiling.left, tiling.right, tiling.group)
    return x


def gather_tiles(x: torch.Tensor, tiling: Tiling, scale: int) -> torch.Tensor:
    """Every rank's tile `[..., scale*rows_i, scale*cols_i]` -> the full frame on every rank."""
    r0, r1, c0, c1 = tiling.latent_box()
    max_h = max(hi - lo for lo, hi in tiling.row_bounds) * scale
    max_w = max(hi - lo for lo, hi in tiling.col_bounds) * scale
    padded = F.pad(x, (0, max_w - x.shape[-1], 0, max_h - x.shape[-2])).contiguous()
    parts = [torch.empty_like(padded) for _ in range(tiling.size)]
    dist.all_gather(parts, padded, group=tiling.group)
    full = x.new_empty(*x.shape[:-2], tiling.lat_h * scale, tiling.lat_w * scale)
    for i, part in enumerate(parts):
        r0, r1, c0, c1 = tiling.latent_box(i)
        h, w = (r1 - r0) * scale, (c1 - c0) * scale
        full[..., r0 * scale:r1 * scale, c0 * scale:c1 * scale] = part[..., :h, :w]
    return full


def _gather_tokens(t: torch.Tensor, tiling: Tiling, scale: int) -> torch.Tensor:
    """Per-frame tokens `[N, h*w, 1, C]` of every tile -> `[N, sum_i h_i*w_i, 1, C]` (tile order;
    the order of keys does not change attention)."""
    sizes = []
    for i in range(tiling.size):
        r0, r1, c0, c1 = tiling.latent_box(i)
        sizes.append((r1 - r0) * (c1 - c0) * scale * scale)
    padded = F.pad(t, (0, 0, 0, 0, 0, max(sizes) - t.shape[1])).contiguous()
    parts = [torch.empty_like(padded) for _ in range(tiling.size)]
    dist.all_gather(parts, padded, group=tiling.group)
    return torch.cat([p[:, :n] for p, n in zip(parts, sizes)], dim=1)


# --------------------------------------------------------------------------- the patches
class SplitVAE:
    """`encode` / `decode` of a `WanVAE` split over `group`, with the same signatures and
    results as the wrapped VAE (every rank gets the full output). Other attributes are the
    wrapped VAE's."""

    def __init__(self, vae: nn.Module, group: Optional[dist.ProcessGroup] = None) -> None:
        self.vae = vae
        self.group = group
        self.tiling: Optional[Tiling] = None  # set only while a split call runs
        self._patch()

    def __getattr__(self, name: str):
        return getattr(self.vae, name)

    # ---- public API
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """`[3, T, H, W]` (or batched) -> scaled latent, the tile of each rank encoded there."""
        height, width = video.shape[-2:]
        if height % SPATIAL_STRIDE or width % SPATIAL_STRIDE:
            return self.vae.encode(video)  # not a VAE-sized frame: let the VAE give its own error
        with self._split(height // SPATIAL_STRIDE, width // SPATIAL_STRIDE) as tiling:
            if tiling is None:
                return self.vae.encode(video)
            r0, r1, c0, c1 = (v * SPATIAL_STRIDE for v in tiling.latent_box())
            local = self.vae.encode(video[..., r0:r1, c0:c1].contiguous())
            return gather_tiles(local, tiling, 1)

    def decode(self, latent: torch.Tensor, **options) -> torch.Tensor:
        """Scaled latent -> video. `options` of `WanVAE.decode` (`tile_rows`, ...) apply only
        when the frame is too small to split (a tile is already a fraction of the frame)."""
        with self._split(latent.shape[-2], latent.shape[-1]) as tiling:
            if tiling is None:
                return self.vae.decode(latent, **options)
            r0, r1, c0, c1 = tiling.latent_box()
            local = self.vae.decode(latent[..., r0:r1, c0:c1].contiguous())
            return gather_tiles(local, tiling, SPATIAL_STRIDE)

    @contextmanager
    def _split(self, lat_h: int, lat_w: int) -> Iterator[Optional[Tiling]]:
        world = dist.get_world_size(self.group)
        grid = tile_grid(world, lat_h, lat_w) if world > 1 else None
        if grid is None:  # too small to split: every rank runs the whole (identical) thing
            yield None
            return
        self.tiling = Tiling(grid[0], grid[1], dist.get_rank(self.group), lat_h, lat_w, self.group)
        try:
            yield self.tiling
        finally:
            self.tiling = None

    def _scale(self, height: int) -> int:
        """Resolution of a tile `height` rows high relative to the latent tile."""
        r0, r1, _, _ = self.tiling.latent_box()
        return height // (r1 - r0)

    # ---- instance patches (inactive unless a split call runs)
    def _patch(self) -> None:
        for module in self.vae.modules():
            if isinstance(module, CausalConv3d) and (module.causal_padding[1] or module.causal_padding[2]):
                module.padded_input = self._halo_padded_input(module)
            elif isinstance(module, Resample):
                if module.mode.startswith("upsample"):
                    module.resample[1].forward = self._halo_conv2d(module.resample[1])
                else:
                    module.resample[0].forward = self._halo_zero_pad(module.resample[0])
            elif isinstance(module, AttentionBlock):
                module.forward = self._gathered_attention(module)

    def _halo_padded_input(self, conv: CausalConv3d):
        """Replacement of `CausalConv3d.padded_input(x, past)`: `[zeros, past, x]` in time, with
        the spatial border taken from the neighbouring tiles."""
        original = conv.padded_input
        pt, ph, pw = conv.causal_padding

        def padded_input(x: torch.Tensor, past: Optional[torch.Tensor]) -> torch.Tensor:
            if self.tiling is None:
                return original(x, past)
            if past is not None:
                x = torch.cat([past.to(x.dtype), x], dim=2)
            zero_frames = max(2 * pt - (0 if past is None else past.shape[2]), 0)
            x = halo_pad(x, self.tiling, ph, ph, pw, pw)  # the cached frames' halo travels too
            return F.pad(x, (0, 0, 0, 0, zero_frames, 0)) if zero_frames else x

        return padded_input

    def _halo_conv2d(self, conv: nn.Conv2d):
        original = conv.forward
        ph, pw = conv.padding

        def forward(x: torch.Tensor) -> torch.Tensor:
            if self.tiling is None:
                return original(x)
            x = halo_pad(x, self.tiling, ph, ph, pw, pw)
            return F.conv2d(x, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)

        return forward

    def _halo_zero_pad(self, pad: nn.Module):
        original = pad.forward
        left, right, top, bottom = pad.padding

        def forward(x: torch.Tensor) -> torch.Tensor:
            if self.tiling is None:
                return original(x)
            return halo_pad(x, self.tiling, top, bottom, left, right)

        return forward

    def _gathered_attention(self, block: AttentionBlock):
        original = block.forward

        def forward(x: torch.Tensor, cache=None) -> torch.Tensor:
            if self.tiling is None:
                return original(x, cache)
            # AttentionBlock.forward with K/V of the whole frame (all tiles)
            batch, dim, _, height, width = x.shape
            scale = self._scale(height)
            frames = block.norm(per_frame(x))  # [N, C, h, w]
            qkv = block.to_qkv(frames).reshape(frames.shape[0], 3, dim, height * width)
            q, k, v = (qkv[:, i].transpose(1, 2).unsqueeze(2) for i in range(3))  # [N, hw, 1, C]
            k, v = _gather_tokens(k, self.tiling, scale), _gather_tokens(v, self.tiling, scale)
            out = kernels.attention(q.contiguous(), k, v, scale=1.0 / math.sqrt(dim))  # [N, hw, 1, C]
            out = out.squeeze(2).transpose(1, 2).reshape(frames.shape[0], dim, height, width)
            return x + from_frames(block.proj(out), batch)

        return forward


def apply_vae_split(vae: nn.Module, group: Optional[dist.ProcessGroup] = None) -> SplitVAE:
    """Split `vae`'s encode/decode over `group` (default: every rank). Returns the facade the
    engine uses in place of the VAE; the VAE instance itself still works unsplit."""
    return SplitVAE(vae, group)
