"""`wanengine convert` (diffusers repository -> released layout, bit for bit) and `wanengine
info` naming the layout of every component, on each layout."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from formats_writers import EXPERTS, expert_tensors, pth_tensors, write_comfy_files, write_diffusers_repo
from wanengine import cli
from wanengine.errors import CheckpointError
from wanengine.io.convert import convert_checkpoint
from wanengine.models.dit import DiTConfig

PTH_FILES = ("models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth")


@pytest.fixture(scope="module")
def repo(golden_ckpt, tmp_path_factory) -> Path:
    return write_diffusers_repo(golden_ckpt, tmp_path_factory.mktemp("src") / "Wan2.2-I2V-A14B-Diffusers")


@pytest.fixture(scope="module")
def comfy(golden_ckpt, tmp_path_factory):
    return write_comfy_files(golden_ckpt, tmp_path_factory.mktemp("comfy"), "model.diffusion_model.")


def _same_bits(ours, theirs) -> None:
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        mine = ours[name]
        assert mine.dtype == value.dtype and mine.shape == value.shape, name
        assert torch.equal(mine.contiguous().view(-1).view(torch.uint8), value.contiguous().view(-1).view(torch.uint8)), name


def test_convert_diffusers_repository_reproduces_the_released_files(repo, golden_ckpt, tmp_path):
    out = convert_checkpoint(tmp_path / "released", str(repo), shard_bytes=2**20)
    for expert in EXPERTS:
        _same_bits(expert_tensors(out / expert), expert_tensors(golden_ckpt / expert))
        assert DiTConfig.from_json(out / expert / "config.json") == DiTConfig.from_json(golden_ckpt / expert / "config.json")
        index = json.loads((out / expert / "diffusion_pytorch_model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1  # shard_bytes split it
    for name in PTH_FILES:
        _same_bits(pth_tensors(out / name), pth_tensors(golden_ckpt / name))
    spm = "google/umt5-xxl/spiece.model"
    assert (out / spm).read_bytes() == (golden_ckpt / spm).read_bytes()
    assert not [p for p in out.rglob("*partial*")]


def test_convert_single_files_without_ckpt_dir(comfy, golden_ckpt, tmp_path):
    out = convert_checkpoint(tmp_path / "released", **{k: str(v) for k, v in comfy.items()},
                             tokenizer=str(golden_ckpt / "google" / "umt5-xxl"))
    _same_bits(expert_tensors(out / "high_noise_model"), expert_tensors(golden_ckpt / "high_noise_model"))
    _same_bits(pth_tensors(out / "Wan2.1_VAE.pth"), pth_tensors(golden_ckpt / "Wan2.1_VAE.pth"))
    # the encoder file held the tied embedding twice; the released file holds it once
    _same_bits(pth_tensors(out / PTH_FILES[0]), pth_tensors(golden_ckpt / PTH_FILES[0]))


def test_convert_refuses_a_non_empty_destination(repo, tmp_path):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="--out.*not an empty directory"):
        convert_checkpoint(tmp_path / "dst", str(repo))
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["keep.txt"]


def test_failed_convert_leaves_nothing(repo, tmp_path, monkeypatch):
    from wanengine.io import convert

    def broken(path, tensors):
        raise OSError("disk full")

    monkeypatch.setattr(convert, "write_pth", broken)
    with pytest.raises(OSError):
        convert_checkpoint(tmp_path / "dst", str(repo))
    assert not (tmp_path / "dst").exists()


def _info(capsys, *args) -> dict:
    with pytest.raises(SystemExit) as info:
        cli.main(["info", "--json", *args])
    assert info.value.code in (0, None), capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_info_names_the_layout_of_every_component(repo, comfy, golden_ckpt, capsys):
    described = _info(capsys, "--ckpt-dir", str(repo))
    assert described["ckpt_layout"] == "diffusers"
    assert described["high_noise_model"]["path"].endswith("transformer")
    assert described["low_noise_model"]["path"].endswith("transformer_2")
    assert described["high_noise_model"]["layout"].startswith("diffusers names, directory")
    assert described["t5"]["layout"] == "transformers names, directory, 2 shard(s)"
    assert described["vae"]["layout"] == "diffusers names, directory, 1 file"

    described = _info(capsys, *[x for k, v in comfy.items() for x in (f"--{k.replace('_', '-')}", str(v))],
                      "--tokenizer", str(golden_ckpt / "google" / "umt5-xxl"))
    assert described["ckpt_dir"] is None
    assert described["low_noise_model"]["layout"] == ("released names, single file, prefix 'model.diffusion_model.', "
                                                      "config inferred from shapes")
    assert described["t5"]["layout"] == "transformers names, single file"
    assert described["vae"]["layout"] == "released names, single file"
    assert described["t5"]["parameters"] == _info(capsys, "--ckpt-dir", str(golden_ckpt))["t5"]["parameters"]

    described = _info(capsys, "--ckpt-dir", str(golden_ckpt))
    assert described["ckpt_layout"] == "released" and described["vae"]["layout"] == "released names, .pth"
    assert described["high_noise_model"]["layout"] == "released names, directory, config.json"


def test_verbose_says_when_an_override_beats_the_repository(repo, comfy, capsys):
    with pytest.raises(SystemExit):
        cli.main(["--verbose", "info", "--ckpt-dir", str(repo), "--vae", str(comfy["vae"])])
    err = capsys.readouterr().err
    assert f"--vae {comfy['vae']} is used instead of {repo / 'vae'} (diffusers repository)" in err
    with pytest.raises(SystemExit):
        cli.main(["info", "--ckpt-dir", str(repo), "--vae", str(comfy["vae"])])
    assert "instead of" not in capsys.readouterr().err


def test_dit_config_option_reaches_single_file_experts(comfy, golden_ckpt, tmp_path, capsys):
    config = json.loads((golden_ckpt / "low_noise_model" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, num_heads=4)))
    args = [x for k, v in comfy.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    args += ["--tokenizer", str(golden_ckpt / "google" / "umt5-xxl")]
    described = _info(capsys, *args, "--dit-config", str(tmp_path / "config.json"))
    assert described["high_noise_model"]["config"]["num_heads"] == 4
    assert described["high_noise_model"]["layout"].endswith(f"config {tmp_path / 'config.json'}")
    with pytest.raises(SystemExit) as info:
        cli.main(["info", *args, "--dit-config", str(tmp_path / "nope.json")])
    assert info.value.code == 2 and "--dit-config" in capsys.readouterr().err
