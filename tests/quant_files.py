"""8-bit checkpoint files built by the tests from the golden checkpoint (spec `formats.md` 3).

Written here, independently of `wanengine.quant`, straight from the spec's formulas, so the
tests check the engine against the published formats rather than against itself:
- `comfy-fp8`: ComfyUI fp8_scaled -- `M.weight` float8_e4m3fn, `M.scale_weight` float32 scalar
  (`absmax / 448`), `M.scale_input` 1.0, and the `scaled_fp8` marker;
- `comfy-quant`: `M.weight` fp8, scalar `M.weight_scale`, `M.comfy_quant` JSON bytes;
- `lightx2v-int8` / `lightx2v-fp8`: `M.weight` int8 / fp8, `M.weight_scale [out, 1]` per row.
Each writer also returns the dequantized tensors (`W = weight.float() * scale`), which
`write_expert` stores in full precision as the comparison checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from safetensors.torch import load_file, save_file

DIT_LINEAR = re.compile(r"blocks\.\d+\.(?:(?:self_attn|cross_attn)\.[qkvo]|ffn\.[02])\.weight")
T5_LINEAR = re.compile(r"blocks\.\d+\.(?:attn\.[qkvo]|ffn\.(?:gate\.0|fc1|fc2))\.weight")
FP8 = torch.float8_e4m3fn
FORMATS = ("comfy-fp8", "comfy-quant", "lightx2v-int8", "lightx2v-fp8")


def read_expert(expert_dir: Path) -> Dict[str, torch.Tensor]:
    tensors: Dict[str, torch.Tensor] = {}
    for shard in sorted(expert_dir.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


def spec_int8_rows(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The spec's at-load rule, int8: scale = row absmax / 127, q = round(W / scale) in +-127."""
    w = w.float()
    absmax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(absmax == 0, torch.ones_like(absmax), absmax / 127)
    return torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale


def spec_fp8_rows(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    w = w.float()
    absmax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(absmax == 0, torch.ones_like(absmax), absmax / 448)
    return (w / scale).to(FP8), scale


def quantize_file(tensors: Dict[str, torch.Tensor], fmt: str, linear: re.Pattern = DIT_LINEAR
                  ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(tensors as the format stores them, the same model dequantized in float32)."""
    stored: Dict[str, torch.Tensor] = {}
    dequantized: Dict[str, torch.Tensor] = {}
    for name, w in tensors.items():
        if not linear.fullmatch(name):
            stored[name], dequantized[name] = w, w.float()
            continue
        module = name[: -len(".weight")]
        if fmt in ("comfy-fp8", "comfy-quant"):
            scale = w.float().abs().max() / 448  # per tensor
            q = (w.float() / scale).to(FP8)
            stored[name] = q
            if fmt == "comfy-fp8":
                stored[f"{module}.scale_weight"] = scale.reshape(())
                stored[f"{module}.scale_input"] = torch.ones(())
            else:
                stored[f"{module}.weight_scale"] = scale.reshape(())
                record = json.dumps({"format": "float8_e4m3fn"}).encode()
                stored[f"{module}.comfy_quant"] = torch.tensor(list(record), dtype=torch.uint8)
        else:
            q, scale = (spec_int8_rows if fmt == "lightx2v-int8" else spec_fp8_rows)(w)
            stored[name], stored[f"{module}.weight_scale"] = q, scale
        dequantized[name] = q.float() * scale
    if fmt == "comfy-fp8":
        stored["scaled_fp8"] = torch.zeros(0, dtype=FP8)
    return stored, dequantized


def write_expert(expert_dir: Path, tensors: Dict[str, torch.Tensor], config_from: Path, shards: int = 2) -> None:
    """A released-layout expert: config.json + `shards` shards + index."""
    expert_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(config_from / "config.json", expert_dir / "config.json")
    names = sorted(tensors)
    groups: List[List[str]] = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, group in enumerate(groups):
        file_name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in group}, str(expert_dir / file_name))
        weight_map.update({n: file_name for n in group})
    (expert_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def checkpoint_with_experts(root: Path, golden_ckpt: Path, experts: Dict[str, Dict[str, torch.Tensor]],
                            t5_state: Dict[str, torch.Tensor] = None) -> Path:
    """A checkpoint dir: the golden T5/VAE/tokenizer linked, the given experts written."""
    root.mkdir(parents=True, exist_ok=True)
    for item in ("Wan2.1_VAE.pth", "google", "configuration.json", "models_t5_umt5-xxl-enc-bf16.pth"):
        if item == "models_t5_umt5-xxl-enc-bf16.pth" and t5_state is not None:
            torch.save(t5_state, root / item)
            continue
        os.symlink((golden_ckpt / item).resolve(), root / item)
    for name, tensors in experts.items():
        write_expert(root / name, tensors, golden_ckpt / name)
    return root
