"""`wanengine convert` and 8-bit weights: `--quantize int8 --quantize-t5 int8` writes the block
linears 8-bit (the engine's canonical form: int8 + per-row float32 `weight_scale`), which loads
back to exactly what quantizing at load gives; an 8-bit source converts to its dequantized
weights in bfloat16 (spec formats.md 4); a bad value is one line, exit 2, nothing written."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from helpers import REPO_ROOT
from quant_files import checkpoint_with_experts, quantize_file, read_expert
from wanengine.io.convert import convert_checkpoint
from wanengine.quant.loading import inspect_expert_8bit, load_expert, load_t5

EXPERTS = ("high_noise_model", "low_noise_model")
T5 = "models_t5_umt5-xxl-enc-bf16.pth"


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(_bytes(sa[name]), _bytes(sb[name])), name


def test_convert_quantize_writes_what_quantize_at_load_gives(tmp_path: Path, golden_ckpt: Path) -> None:
    out = convert_checkpoint(tmp_path / "int8", str(golden_ckpt), quantize="int8", quantize_t5="int8")
    for name in EXPERTS:
        assert inspect_expert_8bit(out / name).layout.label == "LightX2V int8"
        _same_state(load_expert(out / name, dtype=torch.float32),
                    load_expert(golden_ckpt / name, dtype=torch.float32, quantize=torch.int8))
    _same_state(load_t5(out / T5, dtype=torch.float32), load_t5(golden_ckpt / T5, dtype=torch.float32,
                                                                 quantize=torch.int8))
    info = subprocess.run([sys.executable, str(REPO_ROOT / "cli.py"), "info", "--ckpt-dir", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    assert info.stdout.count("8-bit: LightX2V int8: 20 block linears (20 int8)") == 2
    assert "8-bit: LightX2V int8: 14 block linears (14 int8)" in info.stdout  # the text encoder


def test_convert_dequantizes_8bit_sources_to_bfloat16(tmp_path: Path, golden_ckpt: Path) -> None:
    stored = {name: quantize_file(read_expert(golden_ckpt / name), fmt)[0]
              for name, fmt in zip(EXPERTS, ("comfy-fp8", "lightx2v-int8"))}
    source = checkpoint_with_experts(tmp_path / "8bit", golden_ckpt, stored)
    out = convert_checkpoint(tmp_path / "released", str(source))
    for name in EXPERTS:
        written = read_expert(out / name)
        assert not inspect_expert_8bit(out / name).layout.quantized
        assert not any(k.endswith(("scale_weight", "weight_scale", "scale_input", "scaled_fp8")) for k in written)
        q = stored[name]["blocks.1.cross_attn.v.weight"]
        scale = stored[name].get("blocks.1.cross_attn.v.scale_weight", stored[name].get("blocks.1.cross_attn.v.weight_scale"))
        want = (q.float() * scale.float().reshape(-1, 1) if scale.dim() else q.float() * scale).to(torch.bfloat16)
        assert written["blocks.1.cross_attn.v.weight"].dtype == torch.bfloat16
        assert torch.equal(written["blocks.1.cross_attn.v.weight"], want)
        assert torch.equal(written["head.head.weight"], stored[name]["head.head.weight"])  # untouched


def test_convert_rejects_a_bad_quantize_value_before_writing(tmp_path: Path, golden_ckpt: Path) -> None:
    out = tmp_path / "never"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "cli.py"), "convert", "--ckpt-dir", str(golden_ckpt),
                             "--out", str(out), "--quantize", "int4"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["wanengine: error: --quantize: 'int4' is not an 8-bit format; "
                                                  "choose one of int8, fp8"]
    assert not out.exists()


def test_comfyui_fp8_text_encoder_in_transformers_names(tmp_path: Path, golden: Path, golden_ckpt: Path) -> None:
    """`umt5_xxl_fp8_e4m3fn_scaled.safetensors` as ComfyUI ships it: transformers names, fp8
    block linears with per-tensor `scale_weight`, the `scaled_fp8` marker; it encodes as its
    dequantized copy in float32 (the scales follow their weights through the naming table)."""
    from safetensors.torch import load_file, save_file

    from quant_files import T5_LINEAR
    from wanengine.io.formats.umt5_transformers import to_transformers_t5_name
    from wanengine.models.t5 import load_t5 as load_plain_t5

    state = torch.load(golden_ckpt / T5, weights_only=True)
    stored, dequantized = quantize_file(state, "comfy-fp8", linear=T5_LINEAR)
    renamed = {}
    for name, tensor in stored.items():
        module, _, leaf = name.rpartition(".")
        new = name if name == "scaled_fp8" else (to_transformers_t5_name(f"{module}.weight")[: -len("weight")] + leaf
                                                 if leaf in ("scale_weight", "scale_input") else to_transformers_t5_name(name))
        renamed[new] = tensor.contiguous()
    assert "encoder.block.0.layer.0.SelfAttention.q.scale_weight" in renamed
    save_file(renamed, str(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"))
    torch.save(dequantized, tmp_path / "dequantized.pth")
    eight = load_t5(tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", dtype=torch.float32)
    full = load_plain_t5(tmp_path / "dequantized.pth", dtype=torch.float32)
    case = load_file(str(golden / "t5.safetensors"))
    for a, b in zip(eight.encode(case["ids"], case["mask"]), full.encode(case["ids"], case["mask"])):
        assert float((a - b).abs().max()) <= 1e-5
    assert eight.blocks[1].ffn.fc2.weight.dtype == torch.float8_e4m3fn
