"""Bytes of 8-bit experts and text encoders from their configuration numbers, for `wanengine
plan --weights int8|fp8` (spec `formats.md` 3, "Memory").

The block linears (DiT: self/cross-attention q, k, v, o and ffn.0 / ffn.2; UMT5: attention
q, k, v, o and the three FFN matrices) take 1 byte per weight plus one float32 scale per output
row; every other tensor (embeddings, head, norms, biases) stays at the run width, except what the
DiT loader keeps in float32 (modulation, time embedding / projection). For the 14B expert in bf16
that is 14.05 GB of 8-bit linears plus 0.86 GB of scales and the rest: 14.91 GB, 0.515x its
28.95 GB in bf16.
"""
from __future__ import annotations

from typing import Optional, Tuple

from ..config import QUANTIZE_FORMATS  # the names only: `plan` runs without importing torch

SCALE_BYTES = 4  # float32 per output row


def dit_block_linears(dim: int, ffn_dim: int, **_: object) -> Tuple[int, int]:
    """(weights, output rows) of one DiT block's quantizable linears."""
    weights = 8 * dim * dim + 2 * dim * ffn_dim  # 2 attentions x (q, k, v, o), ffn.0, ffn.2
    rows = 8 * dim + ffn_dim + dim
    return weights, rows


def t5_block_linears(dim: int, dim_attn: int, dim_ffn: int, **_: object) -> Tuple[int, int]:
    weights = 4 * dim * dim_attn + 3 * dim * dim_ffn  # q, k, v, o; gate.0, fc1, fc2
    rows = 3 * dim_attn + dim + 2 * dim_ffn + dim
    return weights, rows


def check_weights(weights: Optional[str], flag: str) -> None:
    from ..errors import ConfigError

    if weights is not None and weights not in QUANTIZE_FORMATS:
        raise ConfigError(f"{flag}: {weights!r} is not an 8-bit format; choose one of {', '.join(QUANTIZE_FORMATS)}")


def weight_bytes(params: int, blocks: int, block_linears: Tuple[int, int], width: int,
                 weights: Optional[str], float32_params: int = 0) -> float:
    """Bytes of `params` parameters at `width` bytes, with `blocks` blocks' linears 8-bit when
    `weights` names an 8-bit format (None: everything at `width`), and `float32_params` of the
    rest kept in float32 by the loader whatever the run dtype."""
    kept = float32_params * (4 - width) if width < 4 else 0
    if weights is None:
        return float(params * width + kept)
    linear_weights, rows = block_linears
    quantized = blocks * linear_weights
    return float((params - quantized) * width + kept + quantized * 1 + blocks * rows * SCALE_BYTES)
