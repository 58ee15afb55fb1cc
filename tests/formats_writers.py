"""Write the golden checkpoint in the other layouts users have: a diffusers repository and
ComfyUI-style single files (test helpers; names from `wanengine.io.formats`)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, List

import torch
from safetensors.torch import load_file, save_file

from wanengine.io.formats.dit_diffusers import to_diffusers_name
from wanengine.io.formats.umt5_transformers import to_transformers_t5_name
from wanengine.io.formats.vae_diffusers import to_diffusers_vae_name

EXPERTS = ("high_noise_model", "low_noise_model")
COMFY = {"high_noise_model": "wan2.2_i2v_high_noise_14B_fp16.safetensors",
         "low_noise_model": "wan2.2_i2v_low_noise_14B_fp16.safetensors",
         "t5": "umt5_xxl_fp16.safetensors", "vae": "wan_2.1_vae.safetensors"}


def expert_tensors(expert: Path) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    for shard in sorted(expert.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def pth_tensors(path: Path) -> Dict[str, torch.Tensor]:
    return dict(torch.load(path, map_location="cpu", weights_only=True))


def save_sharded(folder: Path, stem: str, tensors: Dict[str, torch.Tensor], shards: int) -> None:
    """`<stem>-0000i-of-0000n.safetensors` + `<stem>.safetensors.index.json`."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        file_name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part: List[str] = names[i::shards]
        save_file({n: tensors[n].contiguous() for n in part}, str(folder / file_name))
        weight_map.update({n: file_name for n in part})
    (folder / f"{stem}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


def _diffusers_dit_config(config: Dict) -> Dict:
    return {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.35.0", "added_kv_proj_dim": None,
            "attention_head_dim": config["dim"] // config["num_heads"], "cross_attn_norm": True, "eps": config["eps"],
            "ffn_dim": config["ffn_dim"], "freq_dim": config["freq_dim"], "image_dim": None,
            "in_channels": config["in_dim"], "num_attention_heads": config["num_heads"],
            "num_layers": config["num_layers"], "out_channels": config["out_dim"], "patch_size": [1, 2, 2],
            "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024, "text_dim": 4096}


def write_diffusers_repo(golden_ckpt: Path, root: Path) -> Path:
    """`Wan2.2-I2V-A14B-Diffusers` layout of the golden checkpoint (sharded experts and encoder)."""
    root.mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "WanImageToVideoPipeline", "boundary_ratio": 0.9,
        "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"], "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"], "scheduler": ["diffusers", "UniPCMultistepScheduler"]}))
    for expert, folder in zip(EXPERTS, ("transformer", "transformer_2")):
        src = golden_ckpt / expert
        config = json.loads((src / "config.json").read_text())
        tensors = {to_diffusers_name(n): t for n, t in expert_tensors(src).items()}
        save_sharded(root / folder, "diffusion_pytorch_model", tensors, shards=3)
        (root / folder / "config.json").write_text(json.dumps(_diffusers_dit_config(config)))
    (root / "vae").mkdir()
    (root / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", "base_dim": 16}))
    vae = {to_diffusers_vae_name(n): t for n, t in pth_tensors(golden_ckpt / "Wan2.1_VAE.pth").items()}
    save_file(vae, str(root / "vae" / "diffusion_pytorch_model.safetensors"))
    t5 = {to_transformers_t5_name(n): t for n, t in pth_tensors(golden_ckpt / "models_t5_umt5-xxl-enc-bf16.pth").items()}
    save_sharded(root / "text_encoder", "model", t5, shards=2)
    (root / "text_encoder" / "config.json").write_text(json.dumps({"architectures": ["UMT5EncoderModel"]}))
    shutil.copytree(golden_ckpt / "google" / "umt5-xxl", root / "tokenizer", copy_function=shutil.copyfile)
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "UniPCMultistepScheduler"}))
    return root


def write_comfy_files(golden_ckpt: Path, folder: Path, prefix: str) -> Dict[str, Path]:
    """ComfyUI-style single files: experts (released names under `prefix`), the encoder in
    transformers names (with the tied `encoder.embed_tokens.weight` copy), the VAE in released names."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / file_name for name, file_name in COMFY.items()}
    for expert in EXPERTS:
        save_file({prefix + n: t for n, t in expert_tensors(golden_ckpt / expert).items()}, str(paths[expert]))
    t5 = {to_transformers_t5_name(n): t for n, t in pth_tensors(golden_ckpt / "models_t5_umt5-xxl-enc-bf16.pth").items()}
    t5["encoder.embed_tokens.weight"] = t5["shared.weight"].clone()
    save_file(t5, str(paths["t5"]))
    save_file(pth_tensors(golden_ckpt / "Wan2.1_VAE.pth"), str(paths["vae"]))
    return paths
