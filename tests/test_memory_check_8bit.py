"""The memory preflight with 8-bit weights: the bytes it counts for each expert and the text
encoder are the bytes the engine will hold -- published 8-bit files at their 8-bit size plus the
float32 scales plus the layers kept in higher precision, `--quantize` likewise -- summed here
independently from the safetensors headers (dtype and shape of each tensor) and compared with
the loaded modules; `plan`'s figures from the dims equal them at the release's 14B shapes; a
budget between the 8-bit and the full-precision need passes the 8-bit checkpoint and refuses
the other with one line; beside an accelerator the host memory holding the offloaded weights
is checked too.

Small: golden-size experts written in the test (tests/quant_files.py), and 14B-shaped sparse
files (headers only, tests/test_preflight_full_size.py).
"""
from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Dict

import pytest
import torch

from quant_files import DIT_LINEAR, FORMATS, T5_LINEAR, checkpoint_with_experts, quantize_file, read_expert
from test_preflight_full_size import full_size_shapes, write_sparse_checkpoint
from wanengine.config import EngineConfig, GenerationOptions
from wanengine.errors import ConfigError
from wanengine.held_weights import expert_bytes, held_weights, module_bytes
from wanengine.io.checkpoint import preflight_checkpoint
from wanengine.memory_check import check_memory
from wanengine.plan import make_plan

EXPERTS = ("high_noise_model", "low_noise_model")
GB = 1e9
# What the DiT loader keeps in float32 whatever the run dtype (spec: time embedding and all
# modulation are computed in float32), spelled out here rather than imported.
KEPT_FLOAT32 = re.compile(r"(?:.*modulation.*|time_embedding\..*|time_projection\..*)")
EIGHT_BIT = {"I8", "F8_E4M3"}
SCALES = (".scale_weight", ".weight_scale")
DROPPED = re.compile(r"(?:scaled_fp8|.*\.scale_input|.*\.comfy_quant)")


def read_headers(expert_dir: Path) -> Dict[str, dict]:
    """name -> {"dtype", "shape"} of every tensor in the expert's safetensors shards (no data read)."""
    headers: Dict[str, dict] = {}
    for shard in sorted(expert_dir.glob("*.safetensors")):
        with open(shard, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        headers.update({name: entry for name, entry in header.items() if name != "__metadata__"})
    return headers


def header_sum(headers: Dict[str, dict], run_width: int, quantize: bool = False, linear=DIT_LINEAR,
               kept_float32=KEPT_FLOAT32) -> int:
    """What the engine holds for these tensors: an 8-bit weight 1 byte per element plus a float32
    scale per output row (`[out, 1]` whatever the file stores), markers and activation scales
    nothing, float32-kept tensors 4 bytes, everything else the run width; with `quantize` the
    full-precision block linears become 1 byte + a float32 scale per row too."""
    total = 0
    for name, entry in headers.items():
        numel = math.prod(entry["shape"])
        if DROPPED.fullmatch(name):
            continue
        if name.endswith(SCALES):
            weight = name.rsplit(".", 1)[0] + ".weight"
            total += headers[weight]["shape"][0] * 4
        elif entry["dtype"] in EIGHT_BIT or (quantize and linear.fullmatch(name)):
            total += numel + (entry["shape"][0] * 4 if entry["dtype"] not in EIGHT_BIT else 0)
        elif kept_float32.fullmatch(name):
            total += numel * 4
        else:
            total += numel * run_width
    return total


# --------------------------------------------------------------------------- exact bytes, small files
@pytest.mark.parametrize("fmt", FORMATS)
def test_published_8bit_expert_bytes_equal_the_header_sum_and_the_loaded_module(fmt, tmp_path, golden_ckpt):
    from wanengine.quant.loading import load_expert

    stored, _ = quantize_file(read_expert(golden_ckpt / "high_noise_model"), fmt)
    ckpt = checkpoint_with_experts(tmp_path / fmt, golden_ckpt, {name: stored for name in EXPERTS})
    expected = header_sum(read_headers(ckpt / "high_noise_model"), run_width=2)
    total, _ = expert_bytes(ckpt / "high_noise_model", dtype=torch.bfloat16)
    assert total == expected
    assert module_bytes(load_expert(ckpt / "high_noise_model", dtype=torch.bfloat16)) == expected
    plain = read_headers(golden_ckpt / "high_noise_model")
    linears = [entry["shape"] for name, entry in plain.items() if DIT_LINEAR.fullmatch(name)]
    saved = sum(math.prod(shape) for shape in linears) - sum(out * 4 for out, _ in linears)  # 2 -> 1 byte, + scales
    assert header_sum(plain, run_width=2) - expected == saved > 0  # below the bf16 figure the check used before


def test_quantize_at_load_bytes_equal_the_header_sum_and_the_loaded_modules(golden_ckpt):
    from wanengine.quant.loading import load_expert, load_t5

    cfg = EngineConfig(ckpt_dir=str(golden_ckpt), dtype="bfloat16", quantize="int8", quantize_t5="fp8")
    held = held_weights(preflight_checkpoint(golden_ckpt), cfg)
    for index, name in enumerate(EXPERTS):
        expected = header_sum(read_headers(golden_ckpt / name), run_width=2, quantize=True)
        assert held.experts[index] == expected
        assert module_bytes(load_expert(golden_ckpt / name, dtype=torch.bfloat16, quantize=torch.int8)) == expected
    t5_path = golden_ckpt / "models_t5_umt5-xxl-enc-bf16.pth"
    t5_state = torch.load(str(t5_path), map_location="meta", weights_only=True)
    t5_headers = {n: {"dtype": "BF16", "shape": list(t.shape)} for n, t in t5_state.items()}
    t5_expected = header_sum(t5_headers, run_width=2, quantize=True, linear=T5_LINEAR, kept_float32=re.compile("$^"))
    assert held.t5 == t5_expected
    assert module_bytes(load_t5(t5_path, dtype=torch.bfloat16, quantize=torch.float8_e4m3fn)) == t5_expected


def test_published_8bit_text_encoder_bytes_equal_the_header_sum_and_the_loaded_module(tmp_path, golden_ckpt):
    from wanengine.quant.loading import load_t5

    plain = torch.load(str(golden_ckpt / "models_t5_umt5-xxl-enc-bf16.pth"), map_location="cpu", weights_only=True)
    stored, _ = quantize_file(plain, "lightx2v-int8", linear=T5_LINEAR)
    ckpt = checkpoint_with_experts(tmp_path / "ckpt", golden_ckpt, {}, t5_state=stored)
    for name in EXPERTS:
        (ckpt / name).symlink_to(golden_ckpt / name)
    dtypes = {torch.int8: "I8", torch.float32: "F32", torch.bfloat16: "BF16"}
    headers = {n: {"dtype": dtypes[t.dtype], "shape": list(t.shape)} for n, t in stored.items()}
    expected = header_sum(headers, run_width=2, kept_float32=re.compile("$^"))
    held = held_weights(preflight_checkpoint(ckpt), EngineConfig(ckpt_dir=str(ckpt), dtype="bfloat16"))
    assert held.t5 == expected
    assert module_bytes(load_t5(ckpt / "models_t5_umt5-xxl-enc-bf16.pth", dtype=torch.bfloat16)) == expected
    assert expected < header_sum({n: {"dtype": "BF16", "shape": list(t.shape)} for n, t in plain.items()}, 2)


# --------------------------------------------------------------------------- budgets, small files
def _need(ckpt: Path, golden: Path):
    """(the memory check's estimate for a short float32 CPU run on `ckpt`, the run's plan)."""
    from wanengine.run import preflight_run

    cfg = EngineConfig(ckpt_dir=str(ckpt), device="cpu", dtype="float32")
    opts = GenerationOptions(prompt="p", max_area=64 * 64, frame_num=1, steps=2, seed=1)
    plan = preflight_run(cfg, opts, golden / "input.png", ckpt.parent / "clip.mp4", None, ignore_memory_check=True)
    layout = preflight_checkpoint(ckpt)
    return check_memory(cfg, plan.opts, plan.frame_size, layout, layout.dit_configs[EXPERTS[0]],
                        torch.device("cpu")), plan


def test_a_budget_between_the_8bit_and_the_full_size_need(tmp_path, golden, golden_ckpt, monkeypatch, capsys):
    from wanengine import cli
    from wanengine.run import preflight_run

    stored, dequantized = quantize_file(read_expert(golden_ckpt / "high_noise_model"), "lightx2v-int8")
    eight_bit = checkpoint_with_experts(tmp_path / "int8" / "ckpt", golden_ckpt, {n: stored for n in EXPERTS})
    full = checkpoint_with_experts(tmp_path / "full" / "ckpt", golden_ckpt, {n: dequantized for n in EXPERTS})
    monkeypatch.setenv("WANENGINE_MEMORY_GB", "1000")
    need_8bit, plan = _need(eight_bit, golden)
    need_full, _ = _need(full, golden)
    # both experts resident on the CPU in every phase: the needs differ by exactly their bytes
    saved = 2 * (header_sum(read_headers(full / EXPERTS[0]), 4) - header_sum(read_headers(eight_bit / EXPERTS[0]), 4))
    assert need_full - need_8bit == pytest.approx(saved, rel=1e-12) and saved > 0

    budget = (need_8bit + need_full) / 2 / GB
    monkeypatch.setenv("WANENGINE_MEMORY_GB", repr(budget))
    for ckpt, fits in ((eight_bit, True), (full, False)):
        cfg = EngineConfig(ckpt_dir=str(ckpt), device="cpu", dtype="float32")
        if fits:
            preflight_run(cfg, plan.opts, golden / "input.png", ckpt.parent / "clip.mp4", None)
            continue
        with pytest.raises(ConfigError, match=r"^memory: this run needs ~\d+\.\d GB, have \d+\.\d GB \(host memory\)"):
            preflight_run(cfg, plan.opts, golden / "input.png", ckpt.parent / "clip.mp4", None)
        with pytest.raises(SystemExit) as refused:  # the CLI: exit 2, the one line, nothing written
            cli.main(["i2v", "--ckpt-dir", str(ckpt), "--image", str(golden / "input.png"), "--prompt", "p",
                      "--max-area", str(64 * 64), "--frame-num", "1", "--sample-steps", "2", "--seed", "1",
                      "--device", "cpu", "--dtype", "float32", "--out", str(ckpt.parent / "clip.mp4")])
        err = capsys.readouterr().err.strip().splitlines()
        assert refused.value.code == 2 and len(err) == 1, err
        assert err[0].startswith("wanengine: error: memory: this run needs ~"), err
        assert not (ckpt.parent / "clip.mp4").exists()


# --------------------------------------------------------------------------- the release's shapes
@pytest.fixture(scope="module")
def full_size(tmp_path_factory, golden_ckpt):
    """14B-shaped sparse checkpoints (headers only): bf16, and LightX2V int8 block linears."""
    shapes = full_size_shapes()
    linears = [n for n in shapes if DIT_LINEAR.fullmatch(n)]
    int8_shapes = {**shapes, **{n.replace(".weight", ".weight_scale"): (shapes[n][0], 1) for n in linears}}
    int8_dtypes = {**{n: "I8" for n in linears}, **{n.replace(".weight", ".weight_scale"): "F32" for n in linears}}
    roots = {}
    for kind, (kind_shapes, dtypes) in (("bf16", (shapes, None)), ("int8", (int8_shapes, int8_dtypes))):
        roots[kind] = tmp_path_factory.mktemp(kind) / "Wan2.2-I2V-A14B"
        write_sparse_checkpoint(roots[kind], golden_ckpt, kind_shapes, dtypes)
    return roots


def test_plan_figures_equal_the_bytes_the_check_counts_at_14b(full_size):
    bf16 = make_plan(dtype="bfloat16")
    int8 = make_plan(dtype="bfloat16", weights="int8")
    for kind, plan in (("bf16", bf16), ("int8", int8)):
        total, block = expert_bytes(full_size[kind] / EXPERTS[0], dtype=torch.bfloat16)
        assert total == header_sum(read_headers(full_size[kind] / EXPERTS[0]), run_width=2)
        assert total == plan.dit_bytes_per_expert  # plan from the dims == the check from the headers
        assert block == _row(plan, "DiT FSDP gather", dit_fsdp=True) / 2
    quantized, _ = expert_bytes(full_size["bf16"] / EXPERTS[0], dtype=torch.bfloat16, quantize=torch.int8)
    assert quantized == int8.dit_bytes_per_expert  # --quantize int8 of the bf16 release, the same bytes
    assert int8.dit_bytes_per_expert / GB == pytest.approx(14.91, abs=0.01)
    assert bf16.dit_bytes_per_expert / GB == pytest.approx(28.95, abs=0.01)


def _row(plan, prefix: str, dit_fsdp: bool = False) -> float:
    if dit_fsdp:
        plan = make_plan(dtype=plan.dtype, weights=plan.weights, ulysses_size=8, dit_fsdp=True)
    return next(row for row in plan.memory.rows if row[0].startswith(prefix))[3]


def _check(root: Path, device: str, frame_size=(1280, 720), **options) -> float:
    cfg = EngineConfig(ckpt_dir=str(root), device=device, dtype="bfloat16", **options)
    opts = GenerationOptions(prompt="p", size="1280*720", frame_num=81, steps=40, seed=1)
    layout = preflight_checkpoint(root)
    return check_memory(cfg, opts, frame_size, layout, layout.dit_configs[EXPERTS[0]], torch.device(device))


def test_14b_int8_fits_a_budget_the_bf16_release_does_not(full_size, monkeypatch):
    monkeypatch.setenv("WANENGINE_MEMORY_GB", "1000")
    need = {kind: _check(full_size[kind], "cpu") for kind in full_size}
    assert need["bf16"] - need["int8"] == pytest.approx(2 * (28.95 - 14.91) * GB, rel=1e-3)
    monkeypatch.setenv("WANENGINE_MEMORY_GB", repr((need["int8"] + need["bf16"]) / 2 / GB))
    assert _check(full_size["int8"], "cpu") == need["int8"]
    with pytest.raises(ConfigError, match=r"^memory: this run needs ~\d+\.\d GB, have \d+\.\d GB \(host memory\)"):
        _check(full_size["bf16"], "cpu")


def test_on_an_accelerator_with_offload_the_host_memory_is_checked_too(full_size, monkeypatch):
    """cuda is named but never touched: both budgets come from the environment."""
    monkeypatch.setenv("WANENGINE_MEMORY_GB", "1000")  # the device has room for anything
    monkeypatch.setenv("WANENGINE_HOST_MEMORY_GB", "40")  # int8 experts ~29.8 GB, bf16 ~57.9 GB
    _check(full_size["int8"], "cuda")
    with pytest.raises(ConfigError) as refused:
        _check(full_size["bf16"], "cuda")
    message = str(refused.value)
    assert re.fullmatch(r"memory: this run keeps ~57\.9 GB of weights in host memory \(the offloaded experts and the "
                        r"text encoder\), have 40\.0 GB available; use .*--ignore-memory-check to try anyway", message)
    _check(full_size["bf16"], "cuda", offload_model=False)  # both experts on the device: nothing kept on the host
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on this host, each with its own copies
    with pytest.raises(ConfigError, match=r"keeps ~59\.\d GB .*2 ranks on this host"):
        _check(full_size["int8"], "cuda", ulysses_size=2)
    _check(full_size["bf16"], "cuda", ulysses_size=2, dit_fsdp=True, t5_fsdp=True)  # shards stay on the devices
    monkeypatch.setenv("WANENGINE_HOST_MEMORY_GB", "lots")
    with pytest.raises(ConfigError, match="WANENGINE_HOST_MEMORY_GB"):
        _check(full_size["int8"], "cuda")
