"""Reading `.safetensors` files without reading weights first: per-tensor records (file, name,
dtype, shape, byte range) from the headers, then the data one tensor at a time.

Every loader of a safetensors checkpoint (DiT experts, UMT5, VAE, in any naming) plans with
`file_records` / `index_records` and streams with `stream_tensors`.

Why not `safe_open(...).get_tensor`: it returns views of a private mmap of the whole file,
and the pages it touches count in the process RSS until the file is closed, so copying out
of it peaks at (loaded weights + one file); a bf16 -> bf16 CPU load would even keep the
mmap alive inside the parameters. Reading with `readinto` leaves the data in the page cache
(not our RSS) and the peak host memory is the loaded weights plus one tensor.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Sequence, Tuple

import torch
from safetensors import safe_open

from ...errors import CheckpointError

_SHOW = 5

DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: Dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class TensorRecord:
    """Where one checkpoint tensor lives: file, stored name, name in the released layout
    (after the format's renaming), byte range, dtype and shape. No data is held."""

    shard: Path
    stored_name: str
    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> Dict[str, Tuple[torch.dtype, Tuple[int, ...], int, int]]:
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
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        records[name] = (dtype, shape, data_start + int(begin), data_start + int(end))
    return records


def file_records(path: Path, names: Iterable[str] = ()) -> List[TensorRecord]:
    """Records of every tensor of one file (or only `names`, which the file must all hold),
    in file order, named as stored."""
    header = read_header(path)
    wanted = list(names) or list(header)
    lacking = [n for n in wanted if n not in header]
    if lacking:
        raise CheckpointError(f"{path}: lacks {len(lacking)} tensor(s) that its index maps to it, "
                              f"e.g. {', '.join(lacking[:_SHOW])}")
    records = [TensorRecord(path, n, n, *header[n]) for n in wanted]
    return sorted(records, key=lambda r: r.begin)


def index_weight_map(index_path: Path) -> Dict[str, str]:
    """The `weight_map` of a `*.safetensors.index.json` (tensor name -> shard file name)."""
    try:
        with open(index_path, "r", encoding="utf-8") as handle:
            index = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{index_path}: not a readable index file: {exc}") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index_path}: expected {{\"weight_map\": {{tensor name: shard file}}}}")
    return weight_map


def index_records(index_path: Path) -> List[TensorRecord]:
    """Records of every tensor an index maps, after checking that each shard exists (beside
    the index) and holds the tensors mapped to it; ordered by shard, then file offset."""
    weight_map = index_weight_map(index_path)
    folder = index_path.parent
    by_shard: Dict[str, List[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    for shard in by_shard:
        if os.path.basename(shard) != shard or not (folder / shard).is_file():
            raise CheckpointError(f"{index_path}: names shard {shard!r}, which does not exist in {folder}")
    return [r for shard in sorted(by_shard) for r in file_records(folder / shard, by_shard[shard])]


def rename_records(records: Sequence[TensorRecord], rename: Callable[[str], str], source: str) -> List[TensorRecord]:
    """Apply a naming table to the records' `name`s; two stored tensors landing on one name is
    a CheckpointError naming `source`."""
    seen: Dict[str, str] = {}
    out = []
    for record in records:
        name = rename(record.name)
        if name in seen:
            raise CheckpointError(f"{source}: tensors {seen[name]!r} and {record.stored_name!r} both map to {name}")
        seen[name] = record.stored_name
        out.append(replace(record, name=name) if name != record.name else record)
    return out


def read_tensor(handle, record: TensorRecord) -> torch.Tensor:
    """Read one tensor's bytes into a new CPU tensor that owns its memory (no mmap)."""
    nbytes = record.nbytes
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


def stream_tensors(records: Sequence[TensorRecord]) -> Iterator[Tuple[str, torch.Tensor]]:
    """Open each file once and yield `(name, tensor)` in file order, one tensor at a time."""
    by_shard: Dict[Path, List[TensorRecord]] = {}
    for record in records:
        by_shard.setdefault(record.shard, []).append(record)
    for shard, shard_records in by_shard.items():
        with open(shard, "rb", buffering=0) as handle:
            for record in sorted(shard_records, key=lambda r: r.begin):
                yield record.name, read_tensor(handle, record)
