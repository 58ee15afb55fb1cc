"""Checkpoint discovery and preflight: is a directory a complete Wan2.2-I2V-A14B release?

Everything here reads only directory listings, JSON files, safetensors headers and zip
directories -- never weights -- so it takes well under a second even on the 14B release
and catches missing, truncated or inconsistent files, and tensors missing from or
mis-shaped in an expert, before minutes of loading.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from ..errors import CheckpointError

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
VAE_FILE = "Wan2.1_VAE.pth"
TOKENIZER_DIR = "google/umt5-xxl"
SPM_FILE = "spiece.model"
EXPERTS = ("high_noise_model", "low_noise_model")
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"

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


def check_torch_zip(path: Path) -> None:
    """A torch.save file is a zip archive; reading its central directory catches truncation."""
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                raise zipfile.BadZipFile("no data.pkl record")
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint (corrupt or truncated?): {exc}") from None


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
    from ..quant.loading import inspect_expert_8bit  # names, shapes, index, shards, 8-bit layout: headers only

    for expert in EXPERTS:
        inspect_expert_8bit(layout.expert(expert))
    check_torch_zip(layout.t5)
    check_torch_zip(layout.vae)
    return layout
