"""The golden end-to-end case through every layout users have -- a diffusers repository,
ComfyUI-style single files with and without prefixes, and a released directory with a
single-file VAE override: each equals the released-layout run and the golden video."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from formats_writers import write_comfy_files, write_diffusers_repo


@pytest.fixture(scope="module")
def layouts(golden_ckpt, tmp_path_factory):
    base = tmp_path_factory.mktemp("layouts")
    return {"repo": write_diffusers_repo(golden_ckpt, base / "Wan2.2-I2V-A14B-Diffusers"),
            "prefixed": write_comfy_files(golden_ckpt, base / "comfy", "model.diffusion_model."),
            "bare": write_comfy_files(golden_ckpt, base / "comfy_bare", "")}


def _sources(case, layouts, golden_ckpt):
    tokenizer_dir = golden_ckpt / "google" / "umt5-xxl"
    if case == "diffusers repository":
        return {"ckpt_dir": str(layouts["repo"])}
    if case == "single files, model.diffusion_model. prefix":
        return {**{k: str(v) for k, v in layouts["prefixed"].items()}, "tokenizer": str(tokenizer_dir)}
    if case == "single files, bare names":
        return {**{k: str(v) for k, v in layouts["bare"].items()}, "tokenizer": str(tokenizer_dir / "spiece.model")}
    assert case == "released directory + single-file VAE"
    return {"ckpt_dir": str(golden_ckpt), "vae": str(layouts["bare"]["vae"])}


def _engine(**sources):
    from wanengine import Engine, EngineConfig

    return Engine(EngineConfig(**sources, device="cpu", dtype="float32", progress=False))


def _run(engine, golden, **settings):
    meta = {**json.loads((golden / "meta.json").read_text())["i2v"], **settings}
    return engine.i2v(golden / "input.png", meta["prompt"], negative_prompt=meta["n_prompt"],
                      max_area=meta["max_area"], frame_num=meta["frame_num"], steps=meta["steps"],
                      shift=meta["shift"], solver=meta["solver"], guide_scale=tuple(meta["guide_scale"]),
                      seed=meta["seed"]).tensor


@pytest.fixture(scope="module")
def released(golden, golden_ckpt):
    engine = _engine(ckpt_dir=str(golden_ckpt))
    return engine, _run(engine, golden)


def _states(engine):
    return {"t5": engine.t5.state_dict(), "vae": engine.vae.state_dict(),
            **{name: engine.experts.get(name).state_dict() for name in ("high_noise_model", "low_noise_model")}}


CASES = ["diffusers repository", "single files, model.diffusion_model. prefix", "single files, bare names",
         "released directory + single-file VAE"]


@pytest.mark.parametrize("case", CASES)
def test_each_layout_loads_the_released_weights_and_video(case, layouts, golden, golden_ckpt, released):
    """Bit-identical weights in every component, the same tokenizer, and the golden case's
    video equal to the released-layout run (<= 1e-5) and to the golden video (<= 1e-3)."""
    released_engine, released_video = released
    engine = _engine(**_sources(case, layouts, golden_ckpt))
    ours, theirs = _states(engine), _states(released_engine)
    for component in theirs:
        assert ours[component].keys() == theirs[component].keys(), component
        for name, value in theirs[component].items():
            assert ours[component][name].dtype == value.dtype and torch.equal(ours[component][name], value), name
    assert engine.tokenizer("a cat")[0].tolist() == released_engine.tokenizer("a cat")[0].tolist()
    video = _run(engine, golden)
    assert float((video - released_video).abs().max()) <= 1e-5
    assert float((video - load_file(str(golden / "i2v.safetensors"))["video"]).abs().max()) <= 1e-3
    vae_layout = engine.layout.components["vae"].layout
    assert vae_layout.startswith("diffusers names" if case == CASES[0] else "released names")
    assert ("single file" in vae_layout) == (case != CASES[0])
