"""`wanengine convert` for 8-bit weights (spec `formats.md` 3-4), tensor by tensor:

- an 8-bit source expert / text encoder without `--quantize` is written dequantized (the
  released layout holds full-precision weights): `W = weight.float() * scale`, stored in
  bfloat16 (the release's dtype); scales, markers and format records are dropped;
- `--quantize int8|fp8` (experts) / `--quantize-t5` (text encoder) write the block linears
  8-bit in this engine's canonical form, which it loads back as is: `M.weight` int8 /
  float8_e4m3fn and `M.weight_scale` float32 `[out, 1]` (LightX2V's names). Full-precision
  block linears are quantized by the engine's rule; layers already stored 8-bit are kept as
  they are (a per-tensor ComfyUI scale is written per row, the same values).

Experts stream into safetensors shards: each tensor is computed, appended to the shard's data
file and forgotten; the header is written once the shard is complete (data copied behind it
in chunks), so memory holds one tensor at a time. The text encoder is one `torch.save`d dict,
so its 8-bit state (~7 GB for UMT5-XXL int8) is in memory while it is written.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch

from .detect import CANONICAL_SCALE, QuantLayout
from .schemes import dequantize

Stream = Iterator[Tuple[str, torch.Tensor]]
DEQUANTIZED_DTYPE = torch.bfloat16
_COPY_CHUNK = 64 * 2 ** 20


def dequantize_stream(tensors: Iterable[Tuple[str, torch.Tensor]], layout: QuantLayout,
                      dtype: torch.dtype = DEQUANTIZED_DTYPE) -> Stream:
    """Canonical `Linear8` tensors -> full-precision weights (`dtype`); each 8-bit weight is
    held until its scale has passed (at most one layer's 8-bit weight)."""
    pending: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, tensor in tensors:
        module, _, leaf = name.rpartition(".")
        if module in layout.layers and leaf in ("weight", CANONICAL_SCALE):
            parts = pending.setdefault(module, {})
            parts[leaf] = tensor
            if len(parts) == 2:
                del pending[module]
                yield f"{module}.weight", dequantize(parts["weight"], parts[CANONICAL_SCALE], dtype)
            continue
        yield name, tensor


def _dtype_name(dtype: torch.dtype) -> str:
    from ..io.formats.safetensors_files import DTYPE_NAMES

    return DTYPE_NAMES[dtype]


class _ShardWriter:
    """One safetensors file written from a stream: data first (to `<file>.data`), header last."""

    def __init__(self, path: Path) -> None:
        self.path, self.data_path = path, path.with_name(path.name + ".data")
        self.handle = open(self.data_path, "wb")
        self.header: Dict[str, object] = {}
        self.offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        self.header[name] = {"dtype": _dtype_name(tensor.dtype), "shape": list(tensor.shape),
                             "data_offsets": [self.offset, self.offset + len(raw)]}
        self.handle.write(raw)
        self.offset += len(raw)

    def close(self) -> None:
        from ..io.video import atomic_path

        self.handle.close()
        header = json.dumps(self.header, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        with atomic_path(self.path) as tmp, open(tmp, "wb") as dst, open(self.data_path, "rb") as src:
            dst.write(struct.pack("<Q", len(header)) + header)
            while True:
                chunk = src.read(_COPY_CHUNK)
                if not chunk:
                    break
                dst.write(chunk)
        os.unlink(self.data_path)


def write_expert_stream(dst: Path, config: Mapping[str, object], tensors: Iterable[Tuple[str, torch.Tensor]],
                        shard_bytes: int) -> int:
    """An expert in the released layout (config.json, shards of at most ~`shard_bytes`, index)
    from a tensor stream; returns the bytes of tensor data written."""
    from ..io.checkpoint import INDEX_FILE
    from ..io.video import atomic_path

    dst.mkdir()
    files: List[Tuple[str, List[str]]] = []
    writer: Optional[_ShardWriter] = None
    total = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if writer is None or (writer.offset and writer.offset + nbytes > shard_bytes):
            if writer is not None:
                writer.close()
            writer = _ShardWriter(dst / f"part-{len(files) + 1:05d}.safetensors")
            files.append((writer.path.name, []))
        writer.add(name, tensor)
        files[-1][1].append(name)
        total += nbytes
        del tensor
    if writer is not None:
        writer.close()
    weight_map = {}
    for number, (temp_name, names) in enumerate(files, start=1):  # the release's shard names
        final = f"diffusion_pytorch_model-{number:05d}-of-{len(files):05d}.safetensors"
        os.replace(dst / temp_name, dst / final)
        weight_map.update({n: final for n in names})
    with atomic_path(dst / INDEX_FILE) as tmp:
        tmp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2),
                       encoding="utf-8")
    with atomic_path(dst / "config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return total


def expert_tensors(source: Path, *, config_file=None, quantize: Optional[torch.dtype] = None) -> Tuple[Stream, str]:
    """(the expert's tensors as convert writes them, a description) -- see the module doc."""
    from ..io.formats.safetensors_files import stream_tensors
    from ..models.dit import WanDiT
    from .detect import DIT_QUANTIZABLE
    from .loading import _to_quantize, inspect_expert_8bit, quantize_stream

    plan = inspect_expert_8bit(source, config_file=config_file)
    canonical = plan.layout.canonical_tensors(stream_tensors(list(plan.records) + list(plan.plan.extra)))
    if quantize is None:
        what = f"8-bit {plan.layout.label}, dequantized to bfloat16" if plan.layout.quantized else "as stored"
        return dequantize_stream(canonical, plan.layout), what
    with torch.device("meta"):
        model = WanDiT(plan.config)
    extra = _to_quantize(model, DIT_QUANTIZABLE, plan.layout, quantize)
    what = f"{len(extra)} block linears quantized to {str(quantize).replace('torch.', '')}"
    if plan.layout.quantized:
        what += f", {len(plan.layout.layers)} kept as stored ({plan.layout.label})"
    return quantize_stream(canonical, extra), what


def t5_state(source: Path, quantize: Optional[torch.dtype] = None) -> Tuple[Dict[str, torch.Tensor], str]:
    """The text encoder's state dict as convert writes it (8-bit block linears in memory)."""
    from .loading import open_t5

    _, tensors, _ = open_t5(source, quantize=quantize)
    if quantize is None:
        return dict(dequantize_stream(tensors.eight_bit.canonical_tensors(tensors.tensors.stream()),
                                      tensors.eight_bit)), f"8-bit {tensors.eight_bit.label}, dequantized to bfloat16"
    return dict(tensors.stream()), f"block linears {str(quantize).replace('torch.', '')}"
