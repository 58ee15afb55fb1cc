"""`load_dit(expert_dir)`: one Wan2.2 expert from its safetensors directory (spec `checkpoint.md`).

Layouts: `config.json` plus either `diffusion_pytorch_model.safetensors.index.json` and the
shards it names (any count), or a single `diffusion_pytorch_model.safetensors`. Tensor names
may be the released ones or diffusers' (renamed through `diffusers_names.to_wan_name`).

Order of work, so that a bad checkpoint fails fast and cheaply:
1. read config.json and build the model on the meta device (no memory);
2. open every shard's *header* (`safe_open`, which also rejects truncated/corrupt files) and
   check names and shapes against the model -- no tensor data has been read yet;
3. stream: each shard is opened once and only the tensors it maps are read, one at a time,
   with plain positional reads into a freshly allocated tensor that owns its memory, then
   converted to the target device/dtype and installed (`assign_streaming`).

Why not `safe_open(...).get_tensor`: it returns views of a private mmap of the whole shard,
and the pages it touches count in the process RSS until the shard is closed, so copying out
of it peaks at (loaded weights + one shard); a bf16 -> bf16 CPU load would even keep the
mmap alive inside the parameters. Reading with `readinto` leaves the data in the page cache
(not our RSS) and the peak host memory is the loaded weights plus one tensor.

Dtype policy: floating tensors are converted to `dtype`, except `FLOAT32_PARAMS` -- the
per-block and head `modulation` offsets and the time embedding/projection MLPs -- which are
kept float32 because the spec computes the whole time embedding and all modulation in
float32 (a bf16 checkpoint's values are exact in float32; the cost is ~0.4 GB per 14B expert).
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from .dit import DiTConfig, WanDiT
from .diffusers_names import is_diffusers_layout, to_wan_name
from .loading import assign_streaming, check_names_and_shapes, expected_shapes

CONFIG_NAME = "config.json"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SINGLE_NAME = "diffusion_pytorch_model.safetensors"
FLOAT32_PARAMS: Tuple[str, ...] = ("modulation", "time_embedding.", "time_projection.")
_LAYOUT = f"expected {CONFIG_NAME} plus {INDEX_NAME} and its shards, or {CONFIG_NAME} plus {SINGLE_NAME}"
_SHOW = 5

_DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)


@dataclass(frozen=True)
class _TensorRecord:
    """Where one checkpoint tensor lives: file, stored name, model name, byte range, dtype, shape."""

    shard: Path
    stored_name: str
    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


# --------------------------------------------------------------------------- headers
def _read_header(path: Path) -> Dict[str, Tuple[torch.dtype, Tuple[int, ...], int, int]]:
    """name -> (dtype, shape, absolute begin, absolute end), from the safetensors header only.

    `safe_open` validates the file (header syntax, offsets, that the data covers the file --
    so truncation is caught); the byte offsets are then taken from the same JSON header."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
        with open(path, "rb") as raw:
            (header_len,) = struct.unpack("<Q", raw.read(8))
            header = json.loads(raw.read(header_len))
    except Exception as exc:  # SafetensorError, OSError, bad JSON: all mean "not a usable file"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable safetensors file (corrupt or truncated?): "
                              f"{reason[:200]}") from exc
    data_start = 8 + header_len
    records = {}
    for name, shape in shapes.items():
        info = header[name]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        records[name] = (dtype, shape, data_start + int(begin), data_start + int(end))
    return records


def _index_weight_map(index_path: Path) -> Dict[str, str]:
    try:
        with open(index_path, "r", encoding="utf-8") as handle:
            index = json.load(handle)
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, an over-long number, bad UTF-8
        raise CheckpointError(f"{index_path}: not a readable index file: {exc}") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index_path}: expected {{\"weight_map\": {{tensor name: shard file}}}}")
    return weight_map


def _plan(expert_dir: Path) -> Tuple[str, List[_TensorRecord]]:
    """(source file used in messages, every tensor to load) after checking that files exist,
    the index agrees with the shards, and names are unique once renamed."""
    index_path, single_path = expert_dir / INDEX_NAME, expert_dir / SINGLE_NAME
    if index_path.is_file():
        weight_map, source = _index_weight_map(index_path), str(index_path)
        by_shard: Dict[str, List[str]] = {}
        for name, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        from ..io.file_kinds import not_a_file_reason

        for shard in by_shard:
            if os.path.basename(shard) != shard or not os.path.lexists(expert_dir / shard):
                raise CheckpointError(f"{index_path}: names shard {shard!r}, which does not exist in {expert_dir}")
            problem = not_a_file_reason(expert_dir / shard)
            if problem is not None:
                raise CheckpointError(f"{expert_dir / shard}: {problem} (a shard named by {INDEX_NAME})")
    elif single_path.is_file():
        by_shard, source = {SINGLE_NAME: []}, str(single_path)
    else:
        raise CheckpointError(f"{expert_dir}: no {INDEX_NAME} or {SINGLE_NAME} found ({_LAYOUT})")

    headers = {shard: _read_header(expert_dir / shard) for shard in sorted(by_shard)}
    if not index_path.is_file():
        by_shard[SINGLE_NAME] = list(headers[SINGLE_NAME])
    for shard, names in by_shard.items():
        lacking = [n for n in names if n not in headers[shard]]
        if lacking:
            raise CheckpointError(f"{expert_dir / shard}: lacks {len(lacking)} tensor(s) that {INDEX_NAME} maps to it, "
                                  f"e.g. {', '.join(lacking[:_SHOW])}")

    all_names = [n for names in by_shard.values() for n in names]
    rename = to_wan_name if is_diffusers_layout(all_names) else (lambda n: n)
    records, seen = [], {}
    for shard in sorted(by_shard):
        for stored in by_shard[shard]:
            name = rename(stored)
            if name in seen:
                raise CheckpointError(f"{source}: tensors {seen[name]!r} and {stored!r} both map to {name}")
            seen[name] = stored
            dtype, shape, begin, end = headers[shard][stored]
            records.append(_TensorRecord(expert_dir / shard, stored, name, dtype, shape, begin, end))
    return source, records


# --------------------------------------------------------------------------- data
def _read_tensor(handle, record: _TensorRecord) -> torch.Tensor:
    """Read one tensor's bytes into a new CPU tensor that owns its memory (no mmap)."""
    nbytes = record.end - record.begin
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes:
        view = memoryview(buffer.numpy())
        handle.seek(record.begin)
        done = 0
        while done < nbytes:
            got = handle.readinto(view[done:])
            if not got:
                raise CheckpointError(f"{record.shard}: truncated while reading tensor {record.stored_name}")
            done += got
    return buffer.view(record.dtype).reshape(record.shape)


def stream_tensors(records: List[_TensorRecord]) -> Iterator[Tuple[str, torch.Tensor]]:
    """Open each shard once and yield its tensors in file order, one at a time."""
    by_shard: Dict[Path, List[_TensorRecord]] = {}
    for record in records:
        by_shard.setdefault(record.shard, []).append(record)
    for shard, shard_records in by_shard.items():
        with open(shard, "rb", buffering=0) as handle:
            for record in sorted(shard_records, key=lambda r: r.begin):
                yield record.name, _read_tensor(handle, record)


# --------------------------------------------------------------------------- entry point
def load_dit(expert_dir: Union[str, "os.PathLike[str]"], *, device: Union[str, torch.device] = "cpu",
             dtype: Optional[torch.dtype] = torch.bfloat16,
             keep_float32: Iterable[str] = FLOAT32_PARAMS) -> WanDiT:
    """Load one expert (e.g. `<ckpt>/low_noise_model`) onto `device`, floating tensors in `dtype`
    (None keeps the stored dtype) except the float32-critical `keep_float32` ones.

    Raises CheckpointError (one line naming the file) for a missing config/index/shard, an index
    naming a missing shard or a tensor its shard lacks, a corrupt or truncated file,
    missing/unexpected/mis-shaped tensors, or a model_type other than i2v."""
    plan = inspect_expert(expert_dir)
    with torch.device("meta"):
        model = WanDiT(plan.config)
    return assign_streaming(model, stream_tensors(plan.records), device=device, dtype=dtype, source=plan.source,
                            keep_float32=keep_float32)


@dataclass(frozen=True)
class ExpertPlan:
    """What loading an expert will read, fully validated: config, the file named in messages,
    and every tensor's location, dtype and shape."""

    config: DiTConfig
    source: str
    records: List[_TensorRecord]

    @property
    def parameters(self) -> int:
        return sum(math.prod(r.shape) for r in self.records)

    @property
    def nbytes(self) -> int:
        return sum(r.end - r.begin for r in self.records)


def inspect_expert(expert_dir: Union[str, "os.PathLike[str]"]) -> ExpertPlan:
    """Every check `load_dit` makes, from config.json, the index and the safetensors headers
    alone (no tensor data is read): the engine's preflight and `wanengine info` use it."""
    expert_dir = Path(expert_dir)
    if not expert_dir.is_dir():
        raise CheckpointError(f"{expert_dir}: expert directory not found ({_LAYOUT})")
    config = DiTConfig.from_json(expert_dir / CONFIG_NAME)
    source, records = _plan(expert_dir)
    from .config_check import check_dit_config  # before building: sizes come from the config

    check_dit_config(config, {r.name: r.shape for r in records}, str(expert_dir / CONFIG_NAME), source)
    with torch.device("meta"):
        model = WanDiT(config)
    check_names_and_shapes(expected_shapes(model), {r.name: r.shape for r in records}, source)
    bad = [r for r in records if not r.dtype.is_floating_point]
    if bad:
        raise CheckpointError(f"{bad[0].shard}: tensor {bad[0].stored_name} has non-floating dtype {bad[0].dtype}")
    return ExpertPlan(config, source, records)
