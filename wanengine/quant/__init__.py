"""8-bit weights (spec `formats.md` section 3), applied from outside the models.

- `schemes`: the engine's own quantization rule (per output channel, symmetric, float32) and
  dequantization -- the one definition every other piece uses.
- `detect`: which 8-bit format a checkpoint holds (ComfyUI `fp8_scaled`, its newer
  `weight_scale` + `comfy_quant` variant, LightX2V int8/fp8), from tensor names, dtypes and
  shapes, with one clear `CheckpointError` for a malformed file.
- `linear8`: `Linear8`, the 8-bit linear layer (weight stays 8-bit in memory; the matmul is
  `kernels.linear8`), and `apply_linear8`, which swaps it in for the block linears of a built
  WanDiT / UMT5 encoder without touching the model code.
- `loading`: streaming loads of 8-bit checkpoints and quantize-at-load of bf16/fp32 ones,
  tensor by tensor, single-process and FSDP-sharded.
- `lora`: adapter deltas on 8-bit experts (merged into the dequantized weight, re-quantized).
- `convert`: `wanengine convert` with 8-bit sources (dequantized) or `--quantize` (8-bit out).
- `sizes`: bytes of 8-bit experts / text encoders for `wanengine plan --weights` (torch-free).
"""
from __future__ import annotations

from typing import Any

__all__ = ["QUANT_DTYPES", "dequantize", "quantize_rows", "resolve_quant_dtype"]


def __getattr__(name: str) -> Any:  # lazy: `plan` reads `quant.sizes` and must not import torch
    if name in __all__:
        from . import schemes

        return getattr(schemes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
