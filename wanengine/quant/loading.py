"""Streaming loads with 8-bit block linears: published 8-bit experts / text encoders as they
are, and bf16/fp32 checkpoints quantized at load (`--quantize`, `--quantize-t5`).

Order of work (as every loader here): headers only -> detect the 8-bit layout (`detect`) ->
build the model on the meta device -> put `Linear8` in place of the 8-bit (or to-be-quantized)
block linears (`apply_linear8`) -> check every name and shape -> stream the tensors one at a
time: a stored 8-bit weight is installed as it is read (never a bf16 copy of it), a
full-precision block weight is quantized by the engine's rule the moment it is read (float32
for that one tensor only). So the host peak is the loaded 8-bit model plus one tensor.

`open_expert` / `open_t5` return (meta model with final dtypes, tensor stream, source), which
the single-process install (`install_streaming`) and the FSDP shard loaders
(`parallel.fsdp`) both consume. Without any 8-bit tensor and without a quantize request they
are the plain loaders' behaviour exactly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Pattern, Tuple, Union

import torch
from torch import nn

from ..errors import CheckpointError
from .detect import (CANONICAL_SCALE, COMFY_QUANT, COMFY_SCALE, DIT_QUANTIZABLE, DIT_QUANTIZABLE_TEXT, INPUT_SCALE,
                     SCALE, T5_QUANTIZABLE, T5_QUANTIZABLE_TEXT, QuantLayout, TensorInfo, detect_quantization)
from .linear8 import Linear8, apply_linear8, quantizable_linears
from .schemes import is_eight_bit, quantize_rows

PathLike = Union[str, "os.PathLike[str]"]
Stream = Iterator[Tuple[str, torch.Tensor]]


# --------------------------------------------------------------------------- shared steps
def quantize_stream(tensors: Iterable[Tuple[str, torch.Tensor]], modules: Mapping[str, torch.dtype]) -> Stream:
    """Quantize the weights of `modules` (name -> 8-bit dtype) as they pass, by the engine's rule,
    yielding `M.weight` (8-bit) and `M.weight_scale`; everything else passes unchanged."""
    for name, tensor in tensors:
        module, _, leaf = name.rpartition(".")
        qdtype = modules.get(module)
        if leaf == "weight" and qdtype is not None and not is_eight_bit(tensor.dtype):
            q, scale = quantize_rows(tensor, qdtype)
            del tensor
            yield name, q
            yield f"{module}.{CANONICAL_SCALE}", scale
        else:
            yield name, tensor


def _final_dtype(model: nn.Module, name: str, tensor_dtype: torch.dtype, dtype: Optional[torch.dtype],
                 keep_float32: Tuple[str, ...]) -> torch.dtype:
    """The dtype a tensor is installed in: 8-bit weights and their float32 scales as they are;
    other floating tensors in `dtype`, except `keep_float32` ones (float32)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if isinstance(owner, Linear8) and leaf == "weight":
        return owner.qdtype
    if isinstance(owner, Linear8) and leaf == CANONICAL_SCALE:
        return torch.float32
    if not tensor_dtype.is_floating_point or dtype is None:
        return tensor_dtype
    return torch.float32 if any(k in name for k in keep_float32) else dtype


def cast_meta(model: nn.Module, dtype: Optional[torch.dtype], keep_float32: Tuple[str, ...]) -> None:
    """Give a meta-built model (Linear8 in place) its final parameter dtypes (free on meta)."""
    for name, param in model.named_parameters():
        param.data = param.data.to(_final_dtype(model, name, param.dtype, dtype, keep_float32))


def install_streaming(model: nn.Module, tensors: Iterable[Tuple[str, torch.Tensor]], *,
                      device: Union[str, torch.device], dtype: Optional[torch.dtype], source: str,
                      keep_float32: Iterable[str] = ()) -> nn.Module:
    """`models.loading.assign_streaming` for models with `Linear8` layers: each tensor goes to
    `device` in its final dtype (8-bit weights stay 8-bit) as it arrives."""
    from ..models.loading import assign_streaming

    keep = tuple(keep_float32)

    def dtype_of(name: str, tensor: torch.Tensor) -> torch.dtype:
        target = _final_dtype(model, name, tensor.dtype, dtype, keep)
        if tensor.dtype != target and is_eight_bit(target):
            raise CheckpointError(f"{source}: tensor {name} is {tensor.dtype}, expected {target}")
        return target

    return assign_streaming(model, tensors, device=device, dtype=dtype, source=source, dtype_of=dtype_of)


def _to_quantize(model: nn.Module, pattern: Pattern[str], layout: QuantLayout,
                 quantize: Optional[torch.dtype]) -> Dict[str, torch.dtype]:
    """Block linears stored in full precision that `--quantize` turns 8-bit."""
    if quantize is None:
        return {}
    return {name: quantize for name in quantizable_linears(model, pattern) if name not in layout.layers}


def check_tensor_dtypes(tensors: Mapping[str, TensorInfo], layout: QuantLayout) -> None:
    """Only the 8-bit weights of the layout (and the records it drops) may be non-floating."""
    for name, info in tensors.items():
        if info.dtype.is_floating_point or name in layout.dropped:
            continue
        module, _, leaf = name.rpartition(".")
        if not (leaf == "weight" and module in layout.layers):
            raise CheckpointError(f"{info.file}: tensor {name} has non-floating dtype {info.dtype}")


# --------------------------------------------------------------------------- DiT experts
@dataclass(frozen=True)
class QuantExpertPlan:
    """`dit_loading.ExpertPlan` plus the 8-bit layout detected in its tensors."""

    plan: Any  # models.dit_loading.ExpertPlan
    layout: QuantLayout

    @property
    def config(self):
        return self.plan.config

    @property
    def source(self) -> str:
        return self.plan.source

    @property
    def records(self):
        return self.plan.records


def _records_index(records) -> Dict[str, TensorInfo]:
    return {r.name: TensorInfo(r.dtype, tuple(r.shape), str(r.shard)) for r in records}


def _record_reader(records) -> Callable[[str], torch.Tensor]:
    from ..io.formats.safetensors_files import read_tensor

    by_name = {r.name: r for r in records}

    def read(name: str) -> torch.Tensor:
        record = by_name[name]
        with open(record.shard, "rb", buffering=0) as handle:
            return read_tensor(handle, record)

    return read


def inspect_expert_8bit(source: PathLike, *, config_file: Optional[PathLike] = None) -> QuantExpertPlan:
    """Every check `dit_loading.inspect_expert` makes, for an expert (any layout it reads) that
    may hold 8-bit block linears: headers and the tiny `comfy_quant` records only, no weights.

    Hooked in through `inspect_expert(split_extra=...)`: the 8-bit layout is detected on the
    renamed records, the scales and format records are set aside as extras (the 8-bit weights
    keep the model's names and shapes, so the strict check still covers them), and the dtypes
    are checked here (only the layout's 8-bit weights may be integer)."""
    from ..models.dit_loading import inspect_expert

    found: Dict[str, QuantLayout] = {}

    def split_extra(records):
        index = _records_index(records)
        layout = detect_quantization(index, quantizable=DIT_QUANTIZABLE, allowed_text=DIT_QUANTIZABLE_TEXT,
                                     read_small=_record_reader(records))
        found["layout"] = layout
        extra_names = layout.dropped | {layer.scale_name for layer in layout.layers.values()}
        return ([r for r in records if r.name not in extra_names], [r for r in records if r.name in extra_names])

    plan = inspect_expert(source, config_file=config_file, split_extra=split_extra)
    layout = found["layout"]
    check_tensor_dtypes(_records_index(plan.records), layout)
    return QuantExpertPlan(plan, layout)


def open_expert(expert_dir: PathLike, *, dtype: Optional[torch.dtype], quantize: Optional[torch.dtype] = None,
                keep_float32: Optional[Iterable[str]] = None, config_file: Optional[PathLike] = None,
                merger=None) -> Tuple[nn.Module, Stream, str]:
    """(the expert on meta with `Linear8` in place and final dtypes, its tensor stream in
    `Linear8` names, the file named in messages). `merger`: adapter deltas merged into the
    stream (`quant.lora.merge_stream`: 8-bit layers dequantized, merged, re-quantized)."""
    from ..io.formats.safetensors_files import stream_tensors
    from ..models.dit import WanDiT
    from ..models.dit_loading import FLOAT32_PARAMS

    keep = tuple(FLOAT32_PARAMS if keep_float32 is None else keep_float32)
    plan = inspect_expert_8bit(expert_dir, config_file=config_file)
    with torch.device("meta"):
        model = WanDiT(plan.config)
    extra = _to_quantize(model, DIT_QUANTIZABLE, plan.layout, quantize)
    apply_linear8(model, {**plan.layout.qdtypes(), **extra})
    cast_meta(model, dtype, keep)
    stored = stream_tensors(list(plan.records) + list(plan.plan.extra))
    tensors = plan.layout.canonical_tensors(stored)
    if merger is not None and merger.targets:
        from .lora import merge_stream

        tensors = merge_stream(tensors, merger, plan.layout.qdtypes(), extra)
    tensors = quantize_stream(tensors, extra)
    return model, tensors, plan.source


def load_expert(expert_dir: PathLike, *, device: Union[str, torch.device] = "cpu",
                dtype: Optional[torch.dtype] = torch.bfloat16, quantize: Optional[torch.dtype] = None,
                keep_float32: Optional[Iterable[str]] = None, config_file: Optional[PathLike] = None,
                merger=None) -> nn.Module:
    """`load_dit` that also loads 8-bit block linears as stored and, with `quantize`, quantizes
    the full-precision ones while streaming. Plain checkpoints without `quantize` (and without
    a `merger`, see `open_expert`) load exactly as `load_dit` loads them."""
    from ..models.dit_loading import FLOAT32_PARAMS, load_dit

    keep = tuple(FLOAT32_PARAMS if keep_float32 is None else keep_float32)
    if quantize is None and merger is None:
        plan = inspect_expert_8bit(expert_dir, config_file=config_file)
        if not plan.layout.quantized:  # nothing 8-bit: the plain loader, unchanged
            return load_dit(expert_dir, device=device, dtype=dtype, keep_float32=keep, plan=plan.plan)
    model, tensors, source = open_expert(expert_dir, dtype=dtype, quantize=quantize, keep_float32=keep,
                                         config_file=config_file, merger=merger)
    return install_streaming(model, tensors, device=device, dtype=dtype, source=source, keep_float32=keep)


def describe_8bit(layout: QuantLayout, examples: int = 3) -> Dict[str, Any]:
    """What `wanengine info` shows about a component's 8-bit tensors."""
    dtypes: Dict[str, int] = {}
    for layer in layout.layers.values():
        key = str(layer.qdtype).replace("torch.", "")
        dtypes[key] = dtypes.get(key, 0) + 1
    per_tensor = sum(not layer.per_channel for layer in layout.layers.values())
    return {"format": layout.label, "layers": len(layout.layers), "dtypes": dtypes,
            "per_tensor_scales": per_tensor, "examples": [f"{name}.weight" for name in list(layout.layers)[:examples]]}


# --------------------------------------------------------------------------- UMT5
EXTRA_LEAVES = (COMFY_SCALE, SCALE, INPUT_SCALE, COMFY_QUANT)


class Quant8Component:
    """A text encoder's `ComponentTensors` with its 8-bit layout: `stream()` yields the tensors
    in `Linear8` names (and quantizes `quantize_modules` as they pass); everything else
    (source, layout, shapes, dtypes, records, ...) is the wrapped object's."""

    def __init__(self, tensors, eight_bit: QuantLayout, quantize_modules: Mapping[str, torch.dtype]) -> None:
        self.tensors, self.eight_bit, self.quantize_modules = tensors, eight_bit, dict(quantize_modules)

    def __getattr__(self, name: str):
        return getattr(self.tensors, name)

    def stream(self) -> Stream:
        return quantize_stream(self.eight_bit.canonical_tensors(self.tensors.stream()), self.quantize_modules)


def _rename_extras(tensors, rename: Callable[[str], str]):
    """8-bit scales and records in a format's own naming (`encoder.block.0.layer.0.SelfAttention.q.
    scale_weight`) follow their weight through the format's table, which only knows weights."""
    from ..io.formats.component_files import ComponentTensors

    mapping = {}
    for name in tensors.shapes:
        module, _, leaf = name.rpartition(".")
        if leaf in EXTRA_LEAVES:
            weight = rename(f"{module}.weight")
            if weight != f"{module}.weight":
                mapping[name] = f"{weight[: -len('weight')]}{leaf}"
    if not mapping:
        return tensors
    new = lambda n: mapping.get(n, n)  # noqa: E731
    records = tensors.records
    state = None if records is not None else {new(n): t for n, t in tensors._state.items()}
    if records is not None:
        records = [replace(r, name=new(r.name)) for r in records]
    return ComponentTensors(tensors.source, tensors.layout, {new(n): s for n, s in tensors.shapes.items()},
                            {new(n): d for n, d in tensors.dtypes.items()}, records=records, state=state)


def _component_reader(tensors) -> Callable[[str], torch.Tensor]:
    if tensors.records is not None:
        return _record_reader(tensors.records)
    return lambda name: tensors._state[name]  # a memory-mapped .pth entry


def open_t5(path: PathLike, *, dtype: Optional[torch.dtype] = None,
            quantize: Optional[torch.dtype] = None) -> Tuple[nn.Module, Quant8Component, str]:
    """`models.t5.open_t5` for encoders that may hold 8-bit block linears (any layout it reads,
    e.g. ComfyUI's `umt5_xxl_fp8_e4m3fn_scaled.safetensors` in transformers names): (the encoder
    on meta with `Linear8` in place -- stored 8-bit layers plus `quantize` for the others -- and
    final dtypes, its tensors (`.stream()` them), the file named in messages)."""
    from ..io.formats.component_files import T5_KIND, open_component
    from ..io.formats.umt5_transformers import to_released_t5_name
    from ..models.loading import check_names_and_shapes, expected_shapes
    from ..models.t5 import T5Config, UMT5Encoder

    tensors = _rename_extras(open_component(path, T5_KIND), to_released_t5_name)
    source = tensors.source
    index = {n: TensorInfo(tensors.dtypes[n], tuple(shape), source) for n, shape in tensors.shapes.items()}
    layout = detect_quantization(index, quantizable=T5_QUANTIZABLE, allowed_text=T5_QUANTIZABLE_TEXT,
                                 read_small=_component_reader(tensors))
    shapes = layout.canonical_shapes(tensors.shapes)
    cfg = T5Config.from_state_dict_shapes(shapes, source)
    with torch.device("meta"):
        model = UMT5Encoder(cfg)
    apply_linear8(model, layout.qdtypes())
    check_names_and_shapes(expected_shapes(model), shapes, source)
    check_tensor_dtypes(index, layout)
    extra = _to_quantize(model, T5_QUANTIZABLE, layout, quantize)
    apply_linear8(model, extra)
    cast_meta(model, dtype, ())
    return model, Quant8Component(tensors, layout, extra), source


def load_t5(path: PathLike, *, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.bfloat16,
            quantize: Optional[torch.dtype] = None) -> nn.Module:
    """`models.t5.load_t5` with 8-bit block linears (stored, or quantized at load with `quantize`).
    Without either it streams exactly as `models.t5.load_t5` does, from the file opened once."""
    from ..models.loading import assign_streaming

    model, tensors, source = open_t5(path, dtype=dtype, quantize=quantize)
    if not tensors.eight_bit.quantized and not tensors.quantize_modules:
        return assign_streaming(model, tensors.stream(), device=device, dtype=dtype, source=source)
    return install_streaming(model, tensors.stream(), device=device, dtype=dtype, source=source)
