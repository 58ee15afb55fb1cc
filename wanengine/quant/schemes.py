"""The quantization rule of this engine and the matching dequantization (spec `formats.md` 3).

Quantizing at load, so that results are reproducible: per output channel (row), symmetric,
all in float32:
- int8: `scale = row_absmax / 127`, `q = round(W / scale)` clamped to +-127 (`torch.round`,
  i.e. half to even);
- fp8:  `scale = row_absmax / 448`, `q = (W / scale)` cast to `float8_e4m3fn`;
- a row of zeros gets scale 1 (its q is all zeros either way).
Dequantized: `W = q.float() * scale`, `scale` float32 `[out, 1]`.

Error bounds (what the tests check on a random `[5120, 5120]` weight), per element of row r:
int8 `|W - deq| <= scale_r / 2`; fp8 (3 mantissa bits) `|W - deq| <= max(|W| / 16,
scale_r * 2**-10)` -- half an ulp of a normal e4m3 number, or half the subnormal spacing.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from ..errors import InvalidArgument

QUANT_DTYPES: Dict[str, torch.dtype] = {"int8": torch.int8}
if hasattr(torch, "float8_e4m3fn"):  # torch >= 2.1
    QUANT_DTYPES["fp8"] = torch.float8_e4m3fn
# The largest magnitude each 8-bit dtype represents (the symmetric range the scale maps to).
QMAX: Dict[torch.dtype, float] = {torch.int8: 127.0}
if "fp8" in QUANT_DTYPES:
    QMAX[QUANT_DTYPES["fp8"]] = 448.0
EIGHT_BIT_DTYPES: Tuple[torch.dtype, ...] = tuple(QMAX)


def resolve_quant_dtype(name: str, argument: str = "quantize") -> torch.dtype:
    """'int8' / 'fp8' -> the storage dtype, or an InvalidArgument naming `argument`."""
    if name not in QUANT_DTYPES:
        choices = ", ".join(QUANT_DTYPES)
        raise InvalidArgument(argument, f"{name!r} is not an 8-bit format; choose one of {choices}")
    return QUANT_DTYPES[name]


def config_quant_dtype(cfg: Any, option: str) -> Optional[torch.dtype]:
    """The 8-bit storage dtype an `EngineConfig`'s `quantize` / `quantize_t5` asks for, or None."""
    name = getattr(cfg, option)
    return resolve_quant_dtype(name, option) if name else None


def is_eight_bit(dtype: torch.dtype) -> bool:
    return dtype in QMAX


def quantize_rows(weight: torch.Tensor, qdtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """`[out, in]` weight -> (`q [out, in]` in `qdtype`, `scale [out, 1]` float32), the rule above."""
    if qdtype not in QMAX:
        raise ValueError(f"not an 8-bit dtype: {qdtype}")
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    qmax = QMAX[qdtype]
    absmax = weight.abs().amax(dim=1, keepdim=True).to(torch.float32)  # [out, 1]; exact in any float dtype
    scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    # One float32 working copy, divided in place (the same arithmetic as W / scale): at load time
    # this is the only full-size temporary besides the 8-bit result.
    scaled = weight.to(torch.float32, copy=True).div_(scale)
    if qdtype == torch.int8:
        q = scaled.round_().clamp_(-127, 127).to(torch.int8)
    else:
        q = scaled.to(qdtype)
    del scaled
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`q.float() * scale` (scale `[out, 1]` or a scalar), computed in float32, returned in `dtype`."""
    return (q.to(torch.float32) * scale.to(torch.float32)).to(dtype)
