"""Bad input on every new path, through the real CLI subprocess: exit 2, one line naming the
file or flag, no traceback, nothing written -- all from the preflight, before any weight."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import List

import pytest
import torch
from safetensors.torch import load_file, save_file

from formats_writers import write_comfy_files, write_diffusers_repo
from helpers import assert_one_line_usage_error, run_cli
from wanengine.errors import CheckpointError

VAE_FILE = "vae/diffusion_pytorch_model.safetensors"
DROPPED = "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"


@pytest.fixture(scope="module")
def sources(golden_ckpt, tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    repo = write_diffusers_repo(golden_ckpt, base / "repo")
    no_low = base / "no_low"
    shutil.copytree(repo, no_low)
    shutil.rmtree(no_low / "transformer_2")
    bad_vae = base / "bad_vae"
    shutil.copytree(repo, bad_vae)
    tensors = load_file(str(bad_vae / VAE_FILE))
    tensors.pop(DROPPED)
    save_file(tensors, str(bad_vae / VAE_FILE))
    comfy = write_comfy_files(golden_ckpt, base / "comfy", "model.diffusion_model.")
    stray = base / "stray.safetensors"
    save_file({**load_file(str(comfy["high_noise_model"])), "model.diffusion_model.blocks.0.lora_down.weight":
               torch.zeros(2, 2)}, str(stray))
    return {"repo": repo, "no_low": no_low, "bad_vae": bad_vae, "comfy": comfy, "stray": stray}


def _cli(args: List[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_cli(args, cwd)


def _clean_failure(result: subprocess.CompletedProcess, words: List[str]) -> None:
    assert_one_line_usage_error(result, words)


def _i2v_args(golden, out: Path) -> List[str]:
    return ["i2v", "--image", str(golden / "input.png"), "--prompt", "a cat", "--max-area", "12288",
            "--frame-num", "5", "--sample-steps", "2", "--device", "cpu", "--dtype", "float32", "--out", str(out)]


CASES = {
    "diffusers repository without transformer_2/": (
        lambda s: ["--ckpt-dir", str(s["no_low"])], ["no_low", "transformer_2", "found", "transformer/", "--low-noise-model"]),
    "diffusers VAE lacking a tensor": (
        lambda s: ["--ckpt-dir", str(s["bad_vae"])], [VAE_FILE, "missing", "decoder.upsamples.4.shortcut.weight"]),
    "single-file expert with a stray key": (
        lambda s: ["--ckpt-dir", str(s["repo"]), "--high-noise-model", str(s["stray"])],
        ["stray.safetensors", "unexpected", "blocks.0.lora_down.weight"]),
    "override that does not exist": (
        lambda s: ["--ckpt-dir", str(s["repo"]), "--vae", str(s["repo"] / "nope.safetensors")], ["--vae", "nope", "not found"]),
    "components without --ckpt-dir": (
        lambda s: ["--high-noise-model", str(s["comfy"]["high_noise_model"])],
        ["--ckpt-dir", "--low-noise-model", "--t5", "--vae", "--tokenizer"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_source_for_i2v(case, sources, golden, tmp_path):
    args, words = CASES[case]
    result = _cli(_i2v_args(golden, tmp_path / "out.mp4") + args(sources), tmp_path)
    _clean_failure(result, words)
    assert list(tmp_path.iterdir()) == []


def test_convert_bad_inputs(sources, tmp_path):
    result = _cli(["convert", "--out", str(tmp_path / "dst"), "--ckpt-dir", str(sources["bad_vae"])], tmp_path)
    _clean_failure(result, [VAE_FILE, "missing"])
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "x").write_text("")
    result = _cli(["convert", "--out", str(tmp_path / "dst"), "--ckpt-dir", str(sources["repo"])], tmp_path)
    _clean_failure(result, ["--out", "not an empty directory"])
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["x"]


def test_engine_fails_before_reading_any_weight(sources, monkeypatch):
    from wanengine import Engine, EngineConfig
    from wanengine.io.formats import safetensors_files

    def must_not_read(*args, **kwargs):
        raise AssertionError("a weight was read before the preflight finished")

    monkeypatch.setattr(safetensors_files, "read_tensor", must_not_read)
    with pytest.raises(CheckpointError, match="missing"):
        Engine(EngineConfig(ckpt_dir=str(sources["bad_vae"]), device="cpu", dtype="float32", progress=False))
