"""Checkpoint discovery and preflight: is a directory a complete Wan2.2-I2V-A14B release?

Everything here reads only directory listings, JSON files, safetensors headers and zip
directories -- never weights -- so it takes well under a second even on the 14B release
and catches missing, truncated or inconsistent files before minutes of loading.
"""
from __future__ import annotations

import json
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Union

from ..errors import CheckpointError

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
VAE_FILE = "Wan2.1_VAE.pth"
TOKENIZER_DIR = "google/umt5-xxl"
SPM_FILE = "spiece.model"
EXPERTS = ("high_noise_model", "low_noise_model")
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
SINGLE_FILE = "diffusion_pytorch_model.safetensors"

LAYOUT_HINT = (f"expected {T5_FILE}, {VAE_FILE}, {TOKENIZER_DIR}/{SPM_FILE}, and "
               f"{{high,low}}_noise_model/ with config.json + {INDEX_FILE} + shards")


@dataclass(frozen=True)
class CheckpointLayout:
    """Paths of every component of a released checkpoint directory."""

    root: Path

    @property
    def t5(self) -> Path:
        return self.root / T5_FILE

    @property
    def vae(self) -> Path:
        return self.root / VAE_FILE

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / TOKENIZER_DIR

    def expert(self, name: str) -> Path:
        return self.root / name


def safetensors_header(path: Path) -> Dict[str, dict]:
    """The JSON header of a safetensors file, checked against the file's size (so a truncated
    file is caught without reading any tensor data)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than a safetensors header")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(size - 8, 100_000_000):
                raise ValueError("header length exceeds the file")
            header = json.loads(handle.read(header_len))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file (corrupt or truncated?): {exc}") from None
    data_end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + data_end > size:
        raise CheckpointError(f"{path}: truncated: tensors need {8 + header_len + data_end} bytes, file has {size}")
    return header


def check_torch_zip(path: Path) -> None:
    """A torch.save file is a zip archive; reading its central directory catches truncation."""
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                raise zipfile.BadZipFile("no data.pkl record")
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint (corrupt or truncated?): {exc}") from None


def expert_shards(expert_dir: Path) -> Dict[Path, List[str]]:
    """Shard file -> the tensor names the index maps to it (or the single file and its names)."""
    index = expert_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: unreadable index (no weight_map?): {exc}") from None
        shards: Dict[Path, List[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(expert_dir / shard, []).append(name)
        return shards
    single = expert_dir / SINGLE_FILE
    if single.is_file():
        return {single: [k for k in safetensors_header(single) if k != "__metadata__"]}
    raise CheckpointError(f"{expert_dir}: no {INDEX_FILE} and no {SINGLE_FILE}")


def read_expert_config(expert_dir: Path) -> dict:
    path = expert_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing ({LAYOUT_HINT})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CheckpointError(f"{path}: not valid JSON: {exc}") from None
    if config.get("model_type") != "i2v":
        raise CheckpointError(f"{path}: model_type is {config.get('model_type')!r}; this engine runs i2v checkpoints")
    return config


def check_expert(expert_dir: Path) -> None:
    """config.json readable and i2v; every shard the index names exists, is complete, and
    holds the tensors mapped to it."""
    read_expert_config(expert_dir)
    for shard, names in expert_shards(expert_dir).items():
        if not shard.is_file():
            raise CheckpointError(f"{shard}: shard named in {expert_dir / INDEX_FILE} does not exist")
        header = safetensors_header(shard)
        absent = [n for n in names if n not in header]
        if absent:
            raise CheckpointError(f"{shard}: lacks {len(absent)} tensor(s) the index maps to it, e.g. {', '.join(absent[:5])}")


def preflight_checkpoint(ckpt_dir: Union[str, "os.PathLike[str]"]) -> CheckpointLayout:
    """Check the whole released layout without reading weights; one CheckpointError per problem
    found first (all missing files are listed together)."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise CheckpointError(f"--ckpt-dir: {root}: directory not found")
    layout = CheckpointLayout(root)
    required = [layout.t5, layout.vae, layout.tokenizer_dir / SPM_FILE] + [layout.expert(e) / "config.json" for e in EXPERTS]
    missing = [str(p.relative_to(root)) for p in required if not p.is_file()]
    if missing:
        raise CheckpointError(f"--ckpt-dir: {root}: missing {', '.join(missing)} ({LAYOUT_HINT})")
    for expert in EXPERTS:
        check_expert(layout.expert(expert))
    check_torch_zip(layout.t5)
    check_torch_zip(layout.vae)
    return layout
