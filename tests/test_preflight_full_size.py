"""Preflight on a checkpoint with the real 14B shapes (sparse files: headers only, no data on
disk) finishes well under two seconds -- it never reads a weight."""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import time

import torch

from wanengine.constants import constants
from wanengine.io.checkpoint import preflight_checkpoint


DTYPE_BYTES = {"BF16": 2, "F32": 4, "I8": 1, "F8_E4M3": 1}


def _write_sparse_expert(expert_dir, shapes, shards: int = 6, dtypes=None) -> int:
    """Safetensors shards whose headers describe tensors of the given shapes (bf16, or the
    safetensors dtype `dtypes` names); the data region is a hole (os.truncate), so a 28.6 GB
    expert costs a few KB of disk."""
    expert_dir.mkdir(parents=True)
    config = {k: v for k, v in constants()["i2v_a14b_dit"].items()
              if k in ("dim", "eps", "ffn_dim", "freq_dim", "in_dim", "num_heads", "num_layers", "out_dim", "text_len")}
    (expert_dir / "config.json").write_text(json.dumps({"_class_name": "WanModel", "model_type": "i2v", **config}))
    names = list(shapes)
    weight_map, total = {}, 0
    for index in range(shards):
        file_name = f"diffusion_pytorch_model-{index + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {}, 0
        for name in names[index::shards]:
            dtype = (dtypes or {}).get(name, "BF16")
            nbytes = math.prod(shapes[name]) * DTYPE_BYTES[dtype]
            header[name] = {"dtype": dtype, "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file_name
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        path = expert_dir / file_name
        with open(path, "wb") as handle:
            handle.write(struct.pack("<Q", len(raw)) + raw)
        os.truncate(path, 8 + len(raw) + offset)
        total += offset
    (expert_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def full_size_shapes() -> dict:
    """name -> shape of every tensor of an expert with the release's dims (built on meta)."""
    from wanengine.models.dit import DiTConfig, WanDiT

    cfg = constants()["i2v_a14b_dit"]
    with torch.device("meta"):
        model = WanDiT(DiTConfig(**{k: cfg[k] for k in ("dim", "ffn_dim", "freq_dim", "in_dim", "out_dim",
                                                        "num_heads", "num_layers", "text_len", "eps")}))
    return {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}


def write_sparse_checkpoint(root, golden_ckpt, shapes, dtypes=None) -> int:
    """A released-layout checkpoint at `root`: both experts sparse (`_write_sparse_expert`), the
    golden tokenizer, T5 and VAE beside them; returns one expert's bytes on disk."""
    for expert in ("high_noise_model", "low_noise_model"):
        total = _write_sparse_expert(root / expert, shapes, dtypes=dtypes)
    shutil.copytree(golden_ckpt / "google", root / "google")
    for name in ("models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth"):
        (root / name).symlink_to(golden_ckpt / name)
    return total


def test_preflight_of_a_14b_layout_is_fast(golden_ckpt, tmp_path):
    root = tmp_path / "Wan2.2-I2V-A14B"
    total = write_sparse_checkpoint(root, golden_ckpt, full_size_shapes())
    assert total > 28e9  # the real expert's bf16 size
    start = time.perf_counter()
    preflight_checkpoint(root)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"preflight took {elapsed:.2f} s"
