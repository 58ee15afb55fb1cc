"""Tiny LoRA adapter files for the tests, and the closed-form merge they must equal.

`random_lora(shapes, targets, rank)` draws float32 low-rank pairs `down [r, in]`, `up [out, r]`
and an alpha per target; `write_lora(path, pairs, spelling, prefix)` writes them under any
published key spelling; `closed_form(W, pair, strength)` is `W + s * (alpha / r) * (up @ down)`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch
from safetensors.torch import save_file

PAIR_SPELLINGS = {
    "lora_down": (".lora_down.weight", ".lora_up.weight"),
    "lora_A": (".lora_A.weight", ".lora_B.weight"),
    "lora.down": (".lora.down.weight", ".lora.up.weight"),
    "lora_A.default": (".lora_A.default.weight", ".lora_B.default.weight"),
}

# Linear targets of a golden-size expert (dim 256, ffn 512, 2 blocks)
LINEAR_TARGETS = ("blocks.0.self_attn.q", "blocks.0.cross_attn.k", "blocks.1.ffn.0", "blocks.1.ffn.2",
                  "blocks.1.self_attn.o", "text_embedding.0", "head.head")


def random_lora(shapes: Mapping[str, Tuple[int, ...]], modules: Iterable[str], rank: int = 4, seed: int = 0,
                alpha: Optional[float] = 2.0) -> Dict[str, Dict[str, torch.Tensor]]:
    """module -> {"down": [r, in], "up": [out, r], "alpha": scalar (optional)}."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for module in modules:
        rows, cols = shapes[module + ".weight"][:2]
        pair = {"down": torch.randn(rank, cols, generator=gen) * 0.1, "up": torch.randn(rows, rank, generator=gen) * 0.1}
        if alpha is not None:
            pair["alpha"] = torch.tensor(float(alpha))
        out[module] = pair
    return out


def kohya(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def lora_tensors(pairs: Mapping[str, Mapping[str, torch.Tensor]], spelling: str = "lora_down", prefix: str = "",
                 rename=lambda m: m) -> Dict[str, torch.Tensor]:
    down_suffix, up_suffix = PAIR_SPELLINGS[spelling]
    tensors = {}
    for module, pair in pairs.items():
        name = prefix + rename(module)
        tensors[name + down_suffix] = pair["down"].contiguous()
        tensors[name + up_suffix] = pair["up"].contiguous()
        if "alpha" in pair:
            tensors[name + ".alpha"] = pair["alpha"]
    return tensors


def write_lora(path: Path, tensors: Mapping[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(dict(tensors), str(path))
    return path


def pair_delta(pair: Mapping[str, torch.Tensor], strength: float) -> torch.Tensor:
    """strength * (alpha / r) * (up @ down) in float32, as the spec writes it."""
    rank = pair["down"].shape[0]
    scale = float(pair["alpha"]) / rank if "alpha" in pair else 1.0
    return strength * scale * (pair["up"].float() @ pair["down"].float())


def closed_form(weight: torch.Tensor, pair: Mapping[str, torch.Tensor], strength: float = 1.0) -> torch.Tensor:
    return (weight.float() + pair_delta(pair, strength)).to(weight.dtype)


def premerged_checkpoint(golden_ckpt: Path, root: Path,
                         merged: Mapping[str, Mapping[str, torch.Tensor]]) -> Path:
    """A checkpoint of symlinks to the golden T5 / VAE / tokenizer with each expert replaced by
    `merged[expert]` (a full state dict) in one diffusion_pytorch_model.safetensors."""
    root.mkdir(parents=True, exist_ok=True)
    for item in golden_ckpt.iterdir():
        if item.name not in merged:
            (root / item.name).symlink_to(item)
    for expert, state in merged.items():
        (root / expert).mkdir()
        shutil.copy(golden_ckpt / expert / "config.json", root / expert / "config.json")
        save_file({k: v.contiguous() for k, v in state.items()}, str(root / expert / "diffusion_pytorch_model.safetensors"))
    return root


def expert_shapes(expert_dir: Path) -> Dict[str, Tuple[int, ...]]:
    from wanengine.models.dit_loading import inspect_expert

    return {r.name: r.shape for r in inspect_expert(expert_dir).records}


def config_of(expert_dir: Path) -> dict:
    return json.loads((expert_dir / "config.json").read_text())
