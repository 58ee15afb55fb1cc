"""8-bit weights, the pieces (spec `formats.md` 3): the engine's quantization rule and its error
bound, detection of the published formats from tensors, `Linear8` applied from outside, and
bad files -> one CheckpointError naming the file (and exit 2 from the CLI).

Forward-level parity: every format (sharded directory and a prefixed single file) against
the same expert dequantized and stored in float32 -- equal in a float32 CPU run (seen: 0.0).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import REPO_ROOT
from quant_files import FORMATS, checkpoint_with_experts, quantize_file, read_expert, spec_int8_rows, write_expert
from wanengine.errors import CheckpointError
from wanengine.quant import dequantize, quantize_rows
from wanengine.quant.linear8 import Linear8, apply_linear8, eight_bit_modules
from wanengine.quant.loading import inspect_expert_8bit, load_expert

FP8 = torch.float8_e4m3fn
LOW = "low_noise_model"


# --------------------------------------------------------------------------- the rule and its bounds
def test_int8_rule_is_the_spec_formula_with_zero_rows_and_ties() -> None:
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0],      # zero row: scale 1, q 0
                      [1.27, -0.635, 0.005, 0.0],  # scale 0.01: 63.5 -> 64? ties go to even
                      [-3.0, 1.5, 0.75, 3.0]])
    q, scale = quantize_rows(w, torch.int8)
    ref_q, ref_scale = spec_int8_rows(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (3, 1)
    assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale)
    assert scale[0, 0] == 1 and not q[0].any()
    assert q[1].tolist() == torch.round(w[1] / (w[1].abs().max() / 127)).to(torch.int8).tolist()
    assert q[2, 0] == -127 and q[2, 3] == 127


def test_fp8_rule_maps_each_row_absmax_to_448() -> None:
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    w[3] = 0
    q, scale = quantize_rows(w, FP8)
    assert q.dtype == FP8 and scale[3, 0] == 1
    assert torch.equal(scale[:3], w[:3].abs().amax(1, keepdim=True) / 448)
    assert torch.equal(q.float().abs().amax(1)[:3], torch.full((3,), 448.0))
    assert torch.equal(q, (w / scale).to(FP8))


@pytest.mark.parametrize("qdtype", [torch.int8, FP8], ids=["int8", "fp8"])
def test_quantization_error_of_a_5120_square_weight_is_within_the_format_bound(qdtype: torch.dtype) -> None:
    """int8: |W - deq| <= scale / 2 (rounding to the nearest step); fp8 e4m3 (3 mantissa bits):
    <= |W| / 16 for normal numbers, <= scale * 2^-10 (half the subnormal step) near zero."""
    w = torch.randn(5120, 5120, generator=torch.Generator().manual_seed(1)) * 0.02
    q, scale = quantize_rows(w, qdtype)
    error = (dequantize(q, scale) - w).abs()
    rounding = w.abs() * 2.0 ** -22  # float32 rounding of W / scale and of q * scale (2 ulp)
    if qdtype == torch.int8:
        bound = scale / 2 + rounding
    else:
        bound = torch.maximum(w.abs() / 16, scale * 2.0 ** -10) + rounding
    assert bool((error <= bound).all()), float((error / bound).max())
    relative = float(error.pow(2).mean().sqrt() / w.pow(2).mean().sqrt())
    assert relative < (0.01 if qdtype == torch.int8 else 0.04)  # seen: int8 ~0.007, fp8 ~0.023


# --------------------------------------------------------------------------- Linear8 from outside
def test_linear8_replaces_block_linears_of_a_built_model_and_stays_8bit(golden_ckpt: Path) -> None:
    from wanengine.models import load_dit
    from wanengine.quant.detect import DIT_QUANTIZABLE
    from wanengine.quant.linear8 import quantizable_linears

    model = load_dit(golden_ckpt / LOW, dtype=torch.float32)
    names = list(quantizable_linears(model, DIT_QUANTIZABLE))
    assert len(names) == 2 * 10  # two blocks x (self q k v o, cross q k v o, ffn.0, ffn.2)
    reference = {n: model.get_submodule(n).weight.clone() for n in names}
    apply_linear8(model, {n: torch.int8 for n in names})
    layers = eight_bit_modules(model)
    assert sorted(layers) == sorted(names)
    for name, layer in layers.items():
        assert layer.weight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
        q, scale = quantize_rows(reference[name], torch.int8)
        assert torch.equal(layer.weight, q) and torch.equal(layer.weight_scale, scale)
        # first parameter = the run dtype: the DiT casts a linear's input to it (dit._linear_in)
        assert next(layer.parameters()).dtype == torch.float32
    assert type(model.text_embedding[0]) is torch.nn.Linear and type(model.head.head) is torch.nn.Linear


# --------------------------------------------------------------------------- published formats
@pytest.fixture(scope="module")
def low_expert(golden_ckpt: Path):
    return read_expert(golden_ckpt / LOW)


@pytest.fixture(scope="module")
def dit_case(golden: Path):
    data = load_file(str(golden / "dit.safetensors"))
    context = [data["context"]] if data["context"].dim() == 2 else list(data["context"])
    return data["x"], data["t"], context, data["y"]


EXPECTED_LABEL = {"comfy-fp8": "ComfyUI fp8_scaled", "comfy-quant": "ComfyUI quantized (weight_scale + comfy_quant)",
                  "lightx2v-int8": "LightX2V int8", "lightx2v-fp8": "LightX2V fp8"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_equals_its_dequantized_float32_copy(fmt: str, tmp_path: Path, golden_ckpt: Path,
                                                         low_expert, dit_case) -> None:
    stored, dequantized = quantize_file(low_expert, fmt)
    write_expert(tmp_path / "q", stored, golden_ckpt / LOW)
    write_expert(tmp_path / "dq", dequantized, golden_ckpt / LOW)
    plan = inspect_expert_8bit(tmp_path / "q")
    assert plan.layout.label == EXPECTED_LABEL[fmt] and len(plan.layout.layers) == 20
    from wanengine.models import load_dit

    eight = load_expert(tmp_path / "q", dtype=torch.float32)
    full = load_dit(tmp_path / "dq", dtype=torch.float32)
    layer = eight.blocks[1].ffn[2]
    assert isinstance(layer, Linear8) and layer.weight.dtype == stored["blocks.1.ffn.2.weight"].dtype
    for name, module in eight_bit_modules(eight).items():  # the stored layer is the dequantized one
        assert torch.equal(module.dequantized_weight(), full.get_submodule(name).weight), name
    if fmt in ("comfy-quant", "lightx2v-fp8"):
        return  # same state as above; the whole forward is checked for the two main formats
    with torch.no_grad():
        assert float((eight(*dit_case) - full(*dit_case)).abs().max()) <= 1e-5
    if fmt == "comfy-fp8":  # the same file as ComfyUI ships it: one file, prefixed names, top-level marker
        single = tmp_path / "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors"
        save_file({(k if k == "scaled_fp8" else f"model.diffusion_model.{k}"): v.contiguous()
                   for k, v in stored.items()}, str(single))
        one_file = load_expert(single, dtype=torch.float32)  # config inferred from the shapes
        with torch.no_grad():
            assert float((one_file(*dit_case) - full(*dit_case)).abs().max()) <= 1e-5


def test_one_8bit_expert_weighs_half_its_linears_plus_the_rest(tmp_path: Path, golden_ckpt: Path, low_expert) -> None:
    """The spec's bound for a test model: 0.5 x (linears in bf16) + the rest (+ one float32 scale per row)."""
    from wanengine.models import load_dit

    stored, _ = quantize_file(low_expert, "lightx2v-int8")
    write_expert(tmp_path / "q", stored, golden_ckpt / LOW)
    eight = load_expert(tmp_path / "q", dtype=torch.bfloat16)
    plain = load_dit(golden_ckpt / LOW, dtype=torch.bfloat16)
    nbytes = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    linears = sum(m.weight.numel() * 2 for m in eight_bit_modules(eight).values())
    scales = sum(m.weight_scale.numel() * 4 for m in eight_bit_modules(eight).values())
    assert nbytes(eight) == nbytes(plain) - linears + linears // 2 + scales


# --------------------------------------------------------------------------- bad files
def _break(stored: dict, how: str) -> dict:
    bad = dict(stored)
    if how == "scale missing":
        del bad["blocks.0.self_attn.q.weight_scale"]
    elif how == "scale mis-shaped":
        bad["blocks.0.ffn.0.weight_scale"] = torch.ones(512, 2)
    elif how == "comfy scale not a scalar":
        bad["blocks.0.ffn.0.scale_weight"] = torch.ones(512, 1)
        del bad["blocks.0.ffn.0.weight_scale"]
    elif how == "marker without scales":
        bad = {k: v for k, v in bad.items() if not k.endswith("weight_scale")}
        bad = {k: (v.float() * 0.01 if v.dtype == torch.int8 else v) for k, v in bad.items()}
        bad["scaled_fp8"] = torch.zeros(0, dtype=FP8)
    elif how == "8-bit outside the block linears":
        bad["head.head.weight"] = bad["head.head.weight"].to(FP8)
        bad["head.head.weight_scale"] = torch.ones(64, 1)
    elif how == "scale without an 8-bit weight":
        bad["text_embedding.0.weight_scale"] = torch.ones(256, 1)
    elif how == "scale in int8":
        bad["blocks.1.cross_attn.k.weight_scale"] = torch.ones(256, 1, dtype=torch.int8)
    return bad


BAD = {"scale missing": r"blocks\.0\.self_attn\.q\.weight is int8 but its scale .* is missing",
       "scale mis-shaped": r"blocks\.0\.ffn\.0\.weight_scale has shape \[512, 2\]; expected a scalar or \[512, 1\]",
       "comfy scale not a scalar": r"blocks\.0\.ffn\.0\.scale_weight has shape \[512, 1\]; ComfyUI's scale_weight is "
                                   r"a per-tensor scalar",
       "marker without scales": r"scaled_fp8 marks a ComfyUI fp8_scaled file, but no tensor has a scale_weight",
       "8-bit outside the block linears": r"head\.head\.weight is float8_e4m3fn, but only the block linears",
       "scale without an 8-bit weight": r"text_embedding\.0\.weight_scale is an 8-bit scale/record, but its weight "
                                        r"text_embedding\.0\.weight is float32, not 8-bit",
       "scale in int8": r"blocks\.1\.cross_attn\.k\.weight_scale has dtype int8"}


@pytest.mark.parametrize("how", sorted(BAD))
def test_bad_8bit_files_give_one_error_naming_the_file(how: str, tmp_path: Path, golden_ckpt: Path, low_expert) -> None:
    stored, _ = quantize_file(low_expert, "lightx2v-int8")
    write_expert(tmp_path / "bad", _break(stored, how), golden_ckpt / LOW)
    with pytest.raises(CheckpointError) as caught:
        load_expert(tmp_path / "bad", dtype=torch.float32)
    message = str(caught.value)
    assert "\n" not in message and re.search(BAD[how], message), message
    assert re.match(rf"{re.escape(str(tmp_path / 'bad'))}/diffusion_pytorch_model-0000[12]-of-00002\.safetensors: ",
                    message), message


def test_comfy_quant_record_must_name_the_weight_format(tmp_path: Path, golden_ckpt: Path, low_expert) -> None:
    stored, _ = quantize_file(low_expert, "comfy-quant")
    stored["blocks.0.ffn.2.comfy_quant"] = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()),
                                                        dtype=torch.uint8)
    write_expert(tmp_path / "bad", stored, golden_ckpt / LOW)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.ffn\.2\.comfy_quant names format 'nvfp4'"):
        inspect_expert_8bit(tmp_path / "bad")


def test_cli_reports_a_bad_8bit_expert_in_one_line_before_loading(tmp_path: Path, golden_ckpt: Path,
                                                                  low_expert) -> None:
    stored, _ = quantize_file(low_expert, "lightx2v-int8")
    high, _ = quantize_file(read_expert(golden_ckpt / "high_noise_model"), "comfy-fp8")
    root = checkpoint_with_experts(tmp_path / "ckpt", golden_ckpt,
                                   {LOW: _break(stored, "scale missing"), "high_noise_model": high})
    out = tmp_path / "out.mp4"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "cli.py"), "i2v", "--ckpt-dir", str(root), "--image",
                             str(golden_ckpt.parent / "input.png"), "--prompt", "a cat", "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "blocks.0.self_attn.q.weight is int8 but its scale" in lines[0]
    assert str(root / LOW) in lines[0] and not out.exists()
