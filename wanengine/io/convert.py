"""`wanengine convert --out DST [sources]`: write any layout the engine reads as the released
layout, tensor by tensor, keeping the stored dtypes (so a diffusers repository converts back
to the released files bit for bit).

- Experts: `config.json` (released field names) and safetensors shards of at most
  `shard_bytes` plus the index; each shard's header is built from the source records and
  its data copied byte range by byte range -- no tensor is ever materialised.
- Text encoder and VAE: `torch.save` of a flat dict whose tensors are read-only memory maps
  of the source (safetensors) or its memory-mapped pickle (.pth), so the data passes
  through the page cache, not the process's own memory.
- Tokenizer: `spiece.model` (and its sibling tokenizer files, when present) copied.

Everything is preflighted before the first byte is written; `DST` must be new or empty;
every file is written under a temporary name and renamed into place when complete.
"""
from __future__ import annotations

import json
import mmap
import shutil
import struct
import warnings
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from ..errors import CheckpointError
from .checkpoint import EXPERTS, INDEX_FILE, RELEASED_PATHS, T5_FILE, VAE_FILE, preflight_checkpoint
from .formats.safetensors_files import DTYPE_NAMES, TensorRecord
from .video import atomic_path

SHARD_BYTES = 5 * 10**9  # per safetensors shard written (the release's shards are ~5 GB)
_COPY_CHUNK = 64 * 2**20
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _check_destination(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"--out: {out}: exists and is not an empty directory (convert writes a new checkpoint)")
    if not out.exists() and not out.parent.is_dir():
        raise CheckpointError(f"--out: {out}: parent directory {out.parent} does not exist")


def _released_config(config) -> Dict[str, object]:
    values = asdict(config)
    keep = ("dim", "eps", "ffn_dim", "freq_dim", "in_dim", "num_heads", "num_layers", "out_dim", "text_len")
    return {"_class_name": "WanModel", **{k: values[k] for k in keep}, "model_type": "i2v"}


def _shards(records: List[TensorRecord], shard_bytes: int) -> List[List[TensorRecord]]:
    groups: List[List[TensorRecord]] = [[]]
    size = 0
    for record in records:
        if groups[-1] and size + record.nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(record)
        size += record.nbytes
    return groups


def write_safetensors(path: Path, records: List[TensorRecord]) -> None:
    """One safetensors file holding `records` (under their released names), copied byte range
    by byte range from their source files; atomic."""
    header: Dict[str, object] = {}
    offset = 0
    for record in records:
        header[record.name] = {"dtype": DTYPE_NAMES[record.dtype], "shape": list(record.shape),
                               "data_offsets": [offset, offset + record.nbytes]}
        offset += record.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as dst, ExitStack() as stack:
        dst.write(struct.pack("<Q", len(raw)) + raw)
        handles: Dict[Path, object] = {}
        for record in records:
            if record.shard not in handles:
                handles[record.shard] = stack.enter_context(open(record.shard, "rb"))
            src = handles[record.shard]
            src.seek(record.begin)
            left = record.nbytes
            while left:
                chunk = src.read(min(left, _COPY_CHUNK))
                if not chunk:
                    raise CheckpointError(f"{record.shard}: truncated while reading tensor {record.stored_name}")
                dst.write(chunk)
                left -= len(chunk)


def _write_expert(dst: Path, plan, shard_bytes: int) -> None:
    dst.mkdir()
    groups = _shards(plan.records, shard_bytes)
    weight_map: Dict[str, str] = {}
    for number, group in enumerate(groups, start=1):
        name = f"diffusion_pytorch_model-{number:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(dst / name, group)
        weight_map.update({r.name: name for r in group})
    index = {"metadata": {"total_size": sum(r.nbytes for r in plan.records)}, "weight_map": weight_map}
    with atomic_path(dst / INDEX_FILE) as tmp:
        tmp.write_text(json.dumps(index, indent=2), encoding="utf-8")
    with atomic_path(dst / "config.json") as tmp:
        tmp.write_text(json.dumps(_released_config(plan.config), indent=2), encoding="utf-8")


def _mapped(record: TensorRecord, maps: Dict[Path, mmap.mmap], stack: ExitStack) -> torch.Tensor:
    """A read-only view of one tensor's bytes in its (memory-mapped) source file."""
    if record.shard not in maps:
        handle = stack.enter_context(open(record.shard, "rb"))
        maps[record.shard] = stack.enter_context(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))
    if not record.nbytes:
        return torch.empty(record.shape, dtype=record.dtype)
    with warnings.catch_warnings():  # torch.save only reads it; the non-writable warning is noise here
        warnings.simplefilter("ignore")
        data = torch.frombuffer(maps[record.shard], dtype=torch.uint8, count=record.nbytes, offset=record.begin)
    return data.view(record.dtype).reshape(record.shape)


def write_pth(path: Path, tensors) -> None:
    """`torch.save` of the component's flat state dict (released names, stored dtypes); atomic."""
    with ExitStack() as stack:
        if tensors.records is not None:
            maps: Dict[Path, mmap.mmap] = {}
            state = {r.name: _mapped(r, maps, stack) for r in tensors.records}
        else:
            state = dict(tensors.stream())  # memory-mapped storages of the source .pth
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        del state


def convert_checkpoint(out, ckpt_dir: Optional[str] = None, *, high_noise_model: Optional[str] = None,
                       low_noise_model: Optional[str] = None, t5: Optional[str] = None, vae: Optional[str] = None,
                       tokenizer: Optional[str] = None, dit_config: Optional[str] = None,
                       shard_bytes: int = SHARD_BYTES, say: Callable[..., None] = lambda message, level=1: None,
                       quantize: Optional[str] = None, quantize_t5: Optional[str] = None) -> Path:
    """Write the sources (as for a run) into `out` in the released layout; returns `out`.
    8-bit sources are dequantized; `quantize` / `quantize_t5` ("int8" / "fp8") write the
    experts' / text encoder's block linears 8-bit instead (`wanengine.quant.convert`)."""
    from ..quant.loading import inspect_expert_8bit
    from ..quant.schemes import resolve_quant_dtype

    eight_bit = {"experts": resolve_quant_dtype(quantize, "quantize") if quantize else None,
                 "t5": resolve_quant_dtype(quantize_t5, "quantize_t5") if quantize_t5 else None}

    out = Path(out)
    _check_destination(out)
    overrides = {"high_noise_model": high_noise_model, "low_noise_model": low_noise_model, "t5": t5, "vae": vae,
                 "tokenizer": tokenizer}
    layout = preflight_checkpoint(ckpt_dir, overrides, dit_config)
    for note in layout.notes:
        say(note, level=2)
    plans = {name: inspect_expert_8bit(layout.expert(name), config_file=layout.dit_config) for name in EXPERTS}
    created = not out.exists()
    out.mkdir(exist_ok=True)
    try:
        _write_all(out, layout, plans, shard_bytes, say, eight_bit)
    except BaseException:  # leave no half-converted checkpoint behind (DST was new or empty)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for child in out.iterdir():
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()
        raise
    say(f"wrote the released layout to {out}")
    return out


def _write_all(out: Path, layout, plans, shard_bytes: int, say: Callable[..., None], eight_bit) -> None:
    from ..models.vae import open_vae
    from ..quant import convert as quant_convert
    from ..quant.loading import open_t5  # models.t5.open_t5, plus the 8-bit layout

    for name in EXPERTS:
        plan = plans[name]
        if plan.layout.quantized or eight_bit["experts"] is not None:  # 8-bit in or out: computed tensors
            tensors, what = quant_convert.expert_tensors(layout.expert(name), config_file=layout.dit_config,
                                                         quantize=eight_bit["experts"])
            say(f"convert: {name} ({plan.plan.layout}; {what}) -> {out / name}")
            quant_convert.write_expert_stream(out / name, _released_config(plan.config), tensors, shard_bytes)
            continue
        say(f"convert: {name} ({plan.plan.layout}) -> {out / name}")
        _write_expert(out / name, plan.plan, shard_bytes)
    for name, opener, file_name in (("t5", open_t5, T5_FILE), ("vae", open_vae, VAE_FILE)):
        _, tensors, _ = opener(layout.components[name].path)
        if name == "t5" and (tensors.eight_bit.quantized or eight_bit["t5"] is not None):
            state, what = quant_convert.t5_state(layout.components[name].path, quantize=eight_bit["t5"])
            say(f"convert: {name} ({tensors.layout}; {what}) -> {out / file_name}")
            with atomic_path(out / file_name) as tmp:
                torch.save(state, tmp)
            del state
            continue
        say(f"convert: {name} ({tensors.layout}) -> {out / file_name}")
        write_pth(out / file_name, tensors)
    token_dst = out / Path(RELEASED_PATHS["tokenizer"]).parent
    token_dst.mkdir(parents=True)
    for file_name in TOKENIZER_FILES:
        src = layout.tokenizer if file_name == "spiece.model" else layout.tokenizer.parent / file_name
        if src.is_file():
            with atomic_path(token_dst / file_name) as tmp:
                shutil.copyfile(src, tmp)
