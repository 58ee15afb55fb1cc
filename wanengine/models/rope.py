"""3-D rotary position embedding tables of the Wan DiT (spec `dit.md`, "3-D rotary position
embedding").

Per head, the d channels form c = d/2 complex pairs `(x[2k], x[2k+1])`. They are split into
three consecutive groups that rotate with the token's frame, row and column index:
`c - 2*(c//3)`, `c//3` and `c//3` pairs (22, 21, 21 for d = 128). Pair j of a group with P
pairs (axis table width 2P) at position `pos` turns by `pos * 10000 ** (-2j / (2P))`.

The tables are what `kernels.rotary` takes: `cos`, `sin` of shape `[1, S, 1, d]` with every
angle repeated twice along the last dim (interleaved pairs). Angles are computed in float64
on the CPU, once per (grid, seq_len, head dim, token range) thanks to an LRU cache, and
returned in float32; per-call complex float64 arithmetic is avoided. Padding tokens
(index >= L = f*h*w) get angle 0, i.e. cos 1 / sin 0: they pass through unrotated.

A token range `[start, end)` of *global* positions can be requested, so a sequence-parallel
rank builds only the rows of its chunk.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence, Tuple

import torch

THETA = 10000.0


def axis_pair_counts(head_dim: int) -> Tuple[int, int, int]:
    """Complex pairs rotating with (frame, row, column): `c - 2*(c//3), c//3, c//3`, c = d/2."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"3-D RoPE needs an even head dim >= 6, got {head_dim}")
    pairs = head_dim // 2
    return pairs - 2 * (pairs // 3), pairs // 3, pairs // 3


def axis_inverse_frequencies(num_pairs: int) -> torch.Tensor:
    """`10000 ** (-2j / (2P))` for j = 0..P-1, float64 `[P]` (one axis table of width 2P)."""
    width = 2 * num_pairs
    return 1.0 / torch.pow(THETA, torch.arange(0, width, 2, dtype=torch.float64) / width)


def token_positions(grid: Sequence[int], start: int, end: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(frame, row, column) indices `[S, 3]` (int64) of global tokens `[start, end)` in (f, h, w)
    row-major order, and a `[S]` bool mask of the real (non-padding) tokens."""
    f, h, w = (int(g) for g in grid)
    index = torch.arange(start, end, dtype=torch.int64)
    real = index < f * h * w
    index = torch.where(real, index, torch.zeros_like(index))
    pos = torch.stack((index // (h * w), (index // w) % h, index % w), dim=-1)
    return pos, real


@lru_cache(maxsize=32)
def _tables_cpu(grid: Tuple[int, int, int], head_dim: int, start: int, end: int) -> Tuple[torch.Tensor, torch.Tensor]:
    # Rows depend only on the global token indices, not on seq_len: padding is any index >= f*h*w.
    pos, real = token_positions(grid, start, end)  # [S, 3], [S]
    angle_groups = [pos[:, axis, None].to(torch.float64) * axis_inverse_frequencies(pairs)[None, :]
                    for axis, pairs in enumerate(axis_pair_counts(head_dim))]
    angles = torch.cat(angle_groups, dim=-1)  # [S, d/2], float64
    angles = torch.where(real[:, None], angles, torch.zeros_like(angles))  # padding: identity
    angles = angles.repeat_interleave(2, dim=-1)  # [S, d]: each angle for both members of its pair
    cos = torch.cos(angles).to(torch.float32).view(1, end - start, 1, head_dim)
    sin = torch.sin(angles).to(torch.float32).view(1, end - start, 1, head_dim)
    return cos, sin


def rope_cos_sin(grid: Sequence[int], seq_len: int, head_dim: int, *, start: int = 0,
                 end: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """`(cos, sin)`, float32 CPU tensors `[1, end - start, 1, head_dim]` for tokens `[start, end)`
    (default: all `seq_len`) of a `(f, h, w)` grid padded to `seq_len`.

    The result is cached and shared: treat it as read-only (copy before modifying).
    """
    grid_t = tuple(int(g) for g in grid)
    if len(grid_t) != 3 or min(grid_t) < 1:
        raise ValueError(f"grid must be three positive sizes (f, h, w), got {tuple(grid)}")
    num_tokens = grid_t[0] * grid_t[1] * grid_t[2]
    if seq_len < num_tokens:
        raise ValueError(f"seq_len {seq_len} is smaller than the {num_tokens} tokens of grid {grid_t}")
    end = seq_len if end is None else end
    if not 0 <= start <= end <= seq_len:
        raise ValueError(f"token range [{start}, {end}) is not within [0, {seq_len})")
    return _tables_cpu(grid_t, int(head_dim), int(start), int(end))
