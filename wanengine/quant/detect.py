"""Which 8-bit format a checkpoint holds, from its tensor names, dtypes and shapes (spec
`formats.md` 3), and the checks that make a malformed file one clear `CheckpointError`.

Recognised (names after any format renaming, e.g. without a `model.diffusion_model.` prefix):
- ComfyUI `fp8_scaled`: `M.weight` float8_e4m3fn, `M.scale_weight` a float32 scalar (per
  tensor), a marker tensor `scaled_fp8`; optional `M.scale_input` (a static activation scale:
  this engine quantizes activations per token at run time, so it is checked and dropped).
- ComfyUI's newer variant: `M.weight` 8-bit, `M.weight_scale`, and `M.comfy_quant` (JSON bytes
  naming the format, e.g. `{"format": "float8_e4m3fn"}`), checked against the weight dtype.
- LightX2V: `M.weight` int8 or float8_e4m3fn with `M.weight_scale` float32 `[out, 1]`.

Whatever the source, a detected layer becomes the canonical `Linear8` state: `M.weight`
(8-bit `[out, in]`), `M.weight_scale` (float32 `[out, 1]`; a per-tensor scale is repeated per
row) and `M.bias` if the layer has one. Only the block linears may be 8-bit (DiT:
`self_attn`/`cross_attn` q, k, v, o, `ffn.0`, `ffn.2`; UMT5: `attn` q, k, v, o, `ffn.gate.0`,
`fc1`, `fc2`); anything else 8-bit is an error, as is a scale that is missing or mis-shaped,
a scale without an 8-bit weight, or a `scaled_fp8` marker without any `scale_weight`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, Mapping, Optional, Pattern, Tuple

import torch

from ..errors import CheckpointError
from .schemes import is_eight_bit

DIT_QUANTIZABLE: Pattern[str] = re.compile(r"blocks\.\d+\.(?:(?:self_attn|cross_attn)\.[qkvo]|ffn\.[02])")
T5_QUANTIZABLE: Pattern[str] = re.compile(r"blocks\.\d+\.(?:attn\.[qkvo]|ffn\.(?:gate\.0|fc1|fc2))")
DIT_QUANTIZABLE_TEXT = "blocks.N.self_attn/cross_attn.{q,k,v,o} and blocks.N.ffn.{0,2}"
T5_QUANTIZABLE_TEXT = "blocks.N.attn.{q,k,v,o} and blocks.N.ffn.{gate.0,fc1,fc2}"

MARKER = "scaled_fp8"
COMFY_SCALE = "scale_weight"       # ComfyUI fp8_scaled, per tensor
SCALE = "weight_scale"             # LightX2V (per channel) and ComfyUI's newer variant
INPUT_SCALE = "scale_input"        # ComfyUI static activation scale (dropped)
COMFY_QUANT = "comfy_quant"        # ComfyUI per-layer JSON format record (dropped once checked)
CANONICAL_SCALE = SCALE
# comfy_quant "format" names this engine runs, with the weight dtype each implies.
COMFY_FORMATS: Dict[str, torch.dtype] = {"float8_e4m3fn": getattr(torch, "float8_e4m3fn", torch.int8),
                                         "int8": torch.int8}

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor as far as detection needs it: dtype, shape and the file holding it."""

    dtype: torch.dtype
    shape: Shape
    file: str


@dataclass(frozen=True)
class QuantizedLinear:
    """One 8-bit linear: module name, 8-bit dtype, `[out, in]`, and where its scale is stored."""

    module: str
    qdtype: torch.dtype
    out_features: int
    in_features: int
    scale_name: str      # as stored (`M.scale_weight` or `M.weight_scale`)
    per_channel: bool    # False: one scale for the whole tensor


@dataclass(frozen=True)
class QuantLayout:
    """The 8-bit layers of one checkpoint and the stored tensors that are not model state."""

    formats: Tuple[str, ...] = ()
    layers: Mapping[str, QuantizedLinear] = field(default_factory=dict)
    dropped: frozenset = frozenset()  # markers, activation scales, comfy_quant records

    @property
    def quantized(self) -> bool:
        return bool(self.layers)

    @property
    def label(self) -> str:
        return " + ".join(self.formats) if self.formats else "none"

    def qdtypes(self) -> Dict[str, torch.dtype]:
        """module name -> 8-bit dtype, what `apply_linear8` takes."""
        return {name: layer.qdtype for name, layer in self.layers.items()}

    def canonical_shapes(self, shapes: Mapping[str, Shape]) -> Dict[str, Shape]:
        """Stored names/shapes -> the `Linear8` state names/shapes they load as."""
        scales = {layer.scale_name: layer for layer in self.layers.values()}
        out: Dict[str, Shape] = {}
        for name, shape in shapes.items():
            if name in self.dropped:
                continue
            layer = scales.get(name)
            if layer is not None:
                out[f"{layer.module}.{CANONICAL_SCALE}"] = (layer.out_features, 1)
            else:
                out[name] = tuple(shape)
        return out

    def canonical_tensors(self, tensors: Iterable[Tuple[str, torch.Tensor]]) -> Iterator[Tuple[str, torch.Tensor]]:
        """The stored stream as `Linear8` state: extras dropped, scales as float32 `[out, 1]`."""
        scales = {layer.scale_name: layer for layer in self.layers.values()}
        for name, tensor in tensors:
            if name in self.dropped:
                continue
            layer = scales.get(name)
            if layer is None:
                yield name, tensor
                continue
            scale = tensor.to(torch.float32).reshape(-1, 1)
            if not layer.per_channel:
                scale = scale.expand(layer.out_features, 1)
            yield f"{layer.module}.{CANONICAL_SCALE}", scale.contiguous()


def _split(name: str) -> Tuple[str, str]:
    module, _, leaf = name.rpartition(".")
    return module, leaf


def detect_quantization(tensors: Mapping[str, TensorInfo], *, quantizable: Pattern[str], allowed_text: str,
                        read_small: Optional[Callable[[str], torch.Tensor]] = None) -> QuantLayout:
    """The checkpoint's 8-bit layout (empty when nothing is 8-bit), or one CheckpointError naming
    the file of the offending tensor and what is wrong.

    Args:
        tensors: stored name -> dtype, shape, file (from headers; no weights read).
        quantizable: full-match pattern of the module names that may be 8-bit.
        allowed_text: the same set in words, for the error message.
        read_small: reads one small tensor's data (`comfy_quant` records); None skips their content check.
    """
    def fail(name: str, what: str) -> None:
        raise CheckpointError(f"{tensors[name].file}: tensor {name} {what}")

    markers = [n for n in tensors if n == MARKER or n.endswith("." + MARKER)]
    layers: Dict[str, QuantizedLinear] = {}
    dropped = set(markers)
    formats = []
    for name, info in tensors.items():
        module, leaf = _split(name)
        if name in dropped or not is_eight_bit(info.dtype):
            continue
        if leaf != "weight" or not quantizable.fullmatch(module):
            fail(name, f"is {_dtype_name(info.dtype)}, but only the block linears ({allowed_text}) may be 8-bit")
        if len(info.shape) != 2:
            fail(name, f"is 8-bit with shape {list(info.shape)}; an 8-bit linear weight is [out, in]")
        out_features, in_features = info.shape
        stored = [f"{module}.{s}" for s in (COMFY_SCALE, SCALE) if f"{module}.{s}" in tensors]
        if not stored:
            fail(name, f"is {_dtype_name(info.dtype)} but its scale ({module}.{COMFY_SCALE} or "
                       f"{module}.{SCALE}) is missing")
        if len(stored) > 1:
            fail(name, f"has two scales ({' and '.join(stored)}); a file uses one convention")
        scale_name = stored[0]
        scale = tensors[scale_name]
        if not scale.dtype.is_floating_point or is_eight_bit(scale.dtype):
            fail(scale_name, f"has dtype {_dtype_name(scale.dtype)}; a weight scale is float32 (or bf16/fp16)")
        numel = _numel(scale.shape)
        per_tensor = numel == 1 and len(scale.shape) <= 1
        per_channel = tuple(scale.shape) in ((out_features, 1), (out_features,))
        if scale_name.endswith(COMFY_SCALE) and not per_tensor:
            fail(scale_name, f"has shape {list(scale.shape)}; ComfyUI's scale_weight is a per-tensor scalar")
        if not (per_tensor or per_channel):
            fail(scale_name, f"has shape {list(scale.shape)}; expected a scalar or [{out_features}, 1] "
                             f"(one scale per output channel of {name} {list(info.shape)})")
        if per_channel and out_features == 1:
            per_channel = False  # one row: both readings agree
        layers[module] = QuantizedLinear(module, info.dtype, out_features, in_features, scale_name,
                                         per_channel=per_channel and not per_tensor)
        formats.append(_format_of(module, scale_name, info.dtype, tensors))
        for extra in (INPUT_SCALE, COMFY_QUANT):
            if f"{module}.{extra}" in tensors:
                dropped.add(f"{module}.{extra}")
        if f"{module}.{INPUT_SCALE}" in tensors and _numel(tensors[f"{module}.{INPUT_SCALE}"].shape) != 1:
            fail(f"{module}.{INPUT_SCALE}", f"has shape {list(tensors[f'{module}.{INPUT_SCALE}'].shape)}; "
                                            "scale_input is a scalar")
        if f"{module}.{COMFY_QUANT}" in tensors and read_small is not None:
            _check_comfy_quant(f"{module}.{COMFY_QUANT}", info.dtype, read_small, fail)

    scale_names = {layer.scale_name for layer in layers.values()}
    for name in tensors:
        module, leaf = _split(name)
        if leaf in (COMFY_SCALE, SCALE, INPUT_SCALE, COMFY_QUANT) and name not in scale_names and name not in dropped:
            weight = f"{module}.weight"
            what = (f"{_dtype_name(tensors[weight].dtype)}, not 8-bit" if weight in tensors else "missing")
            fail(name, f"is an 8-bit scale/record, but its weight {weight} is {what}")
    if markers and not any(n.endswith(COMFY_SCALE) for n in scale_names):
        fail(markers[0], f"marks a ComfyUI fp8_scaled file, but no tensor has a {COMFY_SCALE} "
                         "(the per-tensor scales are missing)")
    return QuantLayout(tuple(dict.fromkeys(formats)), layers, frozenset(dropped))


def _format_of(module: str, scale_name: str, qdtype: torch.dtype, tensors: Mapping[str, TensorInfo]) -> str:
    if scale_name.endswith(COMFY_SCALE):
        return "ComfyUI fp8_scaled"
    if f"{module}.{COMFY_QUANT}" in tensors:
        return "ComfyUI quantized (weight_scale + comfy_quant)"
    return f"LightX2V {'int8' if qdtype == torch.int8 else 'fp8'}"


def _check_comfy_quant(name: str, qdtype: torch.dtype, read_small: Callable[[str], torch.Tensor], fail) -> None:
    """`comfy_quant` holds JSON bytes naming the layer's format; it must be one this engine runs
    and agree with the stored weight dtype."""
    raw = read_small(name)
    try:
        record = json.loads(bytes(raw.to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RuntimeError) as exc:
        fail(name, f"is not JSON bytes ({exc})")
        return
    fmt = record.get("format") if isinstance(record, dict) else None
    if fmt not in COMFY_FORMATS:
        fail(name, f"names format {fmt!r}; supported: {', '.join(COMFY_FORMATS)}")
    if COMFY_FORMATS[fmt] != qdtype:
        fail(name, f"names format {fmt!r} but the weight is {_dtype_name(qdtype)}")


def _numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
