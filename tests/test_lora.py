"""LoRA / delta adapters (spec distill.md): every key spelling equals the closed form
`W + s * (alpha / r) * (up @ down)` exactly in float32, strength 0 is bit-identical, adapters
add up, Wan2.1 CLIP keys are skipped and counted, bad files give one clear error (also through
the CLI, before loading), and an end-to-end run with adapters equals a run on a checkpoint
merged by hand."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_helpers import (LINEAR_TARGETS, closed_form, expert_shapes, kohya, lora_tensors, pair_delta,
                          premerged_checkpoint, random_lora, write_lora)
from wanengine.adapters import LoraSpec, parse_lora_flag
from wanengine.adapters.merge import merge_into_model
from wanengine.adapters.plan import plan_adapter
from wanengine.errors import CheckpointError, ConfigError
from wanengine.io.formats import to_diffusers_name
from wanengine.models.dit_loading import load_dit

LOW = "low_noise_model"


@pytest.fixture(scope="module")
def low_dir(golden_ckpt: Path) -> Path:
    return golden_ckpt / LOW


@pytest.fixture(scope="module")
def shapes(low_dir):
    return expert_shapes(low_dir)


@pytest.fixture(scope="module")
def base(low_dir):
    return {k: v.clone() for k, v in load_dit(low_dir, device="cpu", dtype=torch.float32).state_dict().items()}


def merged_state(low_dir, shapes, specs):
    model = load_dit(low_dir, device="cpu", dtype=torch.float32)
    merge_into_model(model, [plan_adapter(spec, LOW, shapes) for spec in specs])
    return model.state_dict()


def _diffusers_module(module: str) -> str:
    return to_diffusers_name(module + ".weight")[: -len(".weight")]


FORMATS = {
    "bare/lora_down/alpha": dict(prefix="", spelling="lora_down"),
    "diffusion_model./lora_A": dict(prefix="diffusion_model.", spelling="lora_A"),
    "model.diffusion_model./lora.down/no-alpha": dict(prefix="model.diffusion_model.", spelling="lora.down", alpha=None),
    "transformer./diffusers/lora_A.default": dict(prefix="transformer.", spelling="lora_A.default",
                                                  rename=_diffusers_module),
    "bare diffusers names/lora_A": dict(prefix="", spelling="lora_A", rename=_diffusers_module),
    "kohya lora_unet_": dict(prefix="", spelling="lora_down", rename=kohya),
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_key_format_equals_the_closed_form(name, tmp_path, low_dir, shapes, base):
    fmt = dict(FORMATS[name])
    alpha = fmt.pop("alpha", 2.0)
    pairs = random_lora(shapes, LINEAR_TARGETS, rank=4, alpha=alpha, seed=1)
    path = write_lora(tmp_path / "a.safetensors", lora_tensors(pairs, **fmt))
    state = merged_state(low_dir, shapes, [LoraSpec(str(path), strength=0.7)])
    targets = {m + ".weight" for m in LINEAR_TARGETS}
    for module, pair in pairs.items():
        assert torch.equal(state[module + ".weight"], closed_form(base[module + ".weight"], pair, 0.7)), module
    assert all(torch.equal(state[k], base[k]) for k in base if k not in targets)
    assert all(not torch.equal(state[k], base[k]) for k in targets)


def test_patch_embedding_conv_pair(tmp_path, low_dir, shapes, base):
    weight = base["patch_embedding.weight"]  # [D, C, 1, 2, 2]
    gen = torch.Generator().manual_seed(3)
    down = torch.randn(4, *weight.shape[1:], generator=gen)
    up = torch.randn(weight.shape[0], 4, 1, 1, 1, generator=gen)
    path = write_lora(tmp_path / "conv.safetensors", {"patch_embedding.lora_down.weight": down,
                                                      "patch_embedding.lora_up.weight": up})
    state = merged_state(low_dir, shapes, [LoraSpec(str(path))])
    want = weight + 1.0 * 1.0 * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    assert torch.equal(state["patch_embedding.weight"], want)


def test_full_deltas_diff_diff_b_diff_m_and_diffusers_bias(tmp_path, low_dir, shapes, base):
    gen = torch.Generator().manual_seed(2)
    full = {"blocks.0.norm3.diff": "blocks.0.norm3.weight", "blocks.0.self_attn.norm_q.diff": "blocks.0.self_attn.norm_q.weight",
            "blocks.1.ffn.0.diff": "blocks.1.ffn.0.weight", "blocks.0.self_attn.q.diff_b": "blocks.0.self_attn.q.bias",
            "blocks.0.diff_m": "blocks.0.modulation", "head.diff_m": "head.modulation"}
    deltas = {key: torch.randn(shapes[target], generator=gen) for key, target in full.items()}
    path = write_lora(tmp_path / "d.safetensors", {"diffusion_model." + k: v for k, v in deltas.items()})
    state = merged_state(low_dir, shapes, [LoraSpec(str(path), strength=0.5)])
    for key, target in full.items():
        assert torch.equal(state[target], base[target] + 0.5 * deltas[key]), key
    # diffusers: bias delta lora_B.bias beside the pair, norm2 <-> norm3 swapped
    pair = random_lora(shapes, ["blocks.0.cross_attn.k"], seed=4)["blocks.0.cross_attn.k"]
    bias = torch.randn(shapes["blocks.0.cross_attn.k.bias"], generator=gen)
    norm = torch.randn(shapes["blocks.1.norm3.weight"], generator=gen)
    path = write_lora(tmp_path / "diffusers.safetensors", {
        "transformer.blocks.0.attn2.to_k.lora_A.weight": pair["down"], "transformer.blocks.0.attn2.to_k.lora_B.weight": pair["up"],
        "transformer.blocks.0.attn2.to_k.alpha": pair["alpha"], "transformer.blocks.0.attn2.to_k.lora_B.bias": bias,
        "transformer.blocks.1.norm2.diff": norm})
    state = merged_state(low_dir, shapes, [LoraSpec(str(path))])
    assert torch.equal(state["blocks.0.cross_attn.k.weight"], closed_form(base["blocks.0.cross_attn.k.weight"], pair))
    assert torch.equal(state["blocks.0.cross_attn.k.bias"], base["blocks.0.cross_attn.k.bias"] + 1.0 * bias)
    assert torch.equal(state["blocks.1.norm3.weight"], base["blocks.1.norm3.weight"] + 1.0 * norm)


def test_strength_zero_is_bit_identical_and_two_adapters_add(tmp_path, low_dir, shapes, base):
    a = random_lora(shapes, LINEAR_TARGETS, seed=5)
    b = random_lora(shapes, LINEAR_TARGETS[:3], rank=2, alpha=1.0, seed=6)
    path_a = write_lora(tmp_path / "a.safetensors", lora_tensors(a))
    path_b = write_lora(tmp_path / "b.safetensors", lora_tensors(b, spelling="lora_A", prefix="diffusion_model."))
    zero = merged_state(low_dir, shapes, [LoraSpec(str(path_a), strength=0.0)])
    assert all(torch.equal(zero[k], base[k]) for k in base)
    both = merged_state(low_dir, shapes, [LoraSpec(str(path_a), strength=1.0), LoraSpec(str(path_b), strength=-0.5)])
    for module in LINEAR_TARGETS:
        want = base[module + ".weight"].float() + pair_delta(a[module], 1.0)
        if module in b:
            want = want + pair_delta(b[module], -0.5)
        assert torch.equal(both[module + ".weight"], want), module


def test_clip_keys_are_skipped_and_counted(tmp_path, shapes):
    pairs = random_lora(shapes, ["blocks.0.self_attn.q"])
    clip = {f"diffusion_model.blocks.{i}.cross_attn.{m}.lora_down.weight": torch.zeros(4, 256)
            for i in range(2) for m in ("k_img", "v_img")}
    clip.update({"diffusion_model.blocks.0.cross_attn.norm_k_img.diff": torch.zeros(256),
                 "diffusion_model.img_emb.proj.1.lora_up.weight": torch.zeros(256, 4)})
    path = write_lora(tmp_path / "clip.safetensors", {**lora_tensors(pairs, prefix="diffusion_model."), **clip})
    plan = plan_adapter(LoraSpec(str(path)), LOW, shapes)
    assert len(plan.skipped_clip) == 6 and plan.targets == ["blocks.0.self_attn.q.weight"]
    assert "6 Wan2.1 CLIP key(s) skipped" in plan.summary()
    kohya_clip = write_lora(tmp_path / "k.safetensors", {"lora_unet_blocks_0_cross_attn_k_img.lora_down.weight": torch.zeros(4, 256),
                                                         **lora_tensors(pairs, rename=kohya)})
    assert len(plan_adapter(LoraSpec(str(kohya_clip)), LOW, shapes).skipped_clip) == 1


BAD = {
    "unknown key": ({"blocks.0.self_attn.zz.lora_down.weight": (4, 256), "blocks.0.self_attn.zz.lora_up.weight": (256, 4)},
                    ["2 key(s) match no tensor", "blocks.0.self_attn.zz.lora_down.weight"]),
    "shape mismatch": ({"blocks.0.self_attn.q.lora_down.weight": (4, 255), "blocks.0.self_attn.q.lora_up.weight": (256, 4)},
                       ["do not fit", "blocks.0.self_attn.q.lora_down.weight [4, 255]"]),
    "half a pair": ({"blocks.0.self_attn.q.lora_down.weight": (4, 256)}, ["no matching up half"]),
    "bad diff shape": ({"blocks.0.norm3.diff": (255,)}, ["blocks.0.norm3.diff [255]"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapters_fail_with_one_clear_error(case, tmp_path, shapes):
    tensors, words = BAD[case]
    path = write_lora(tmp_path / "bad.safetensors", {k: torch.zeros(s) for k, s in tensors.items()})
    with pytest.raises(CheckpointError) as info:
        plan_adapter(LoraSpec(str(path)), LOW, shapes)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert all(w in message for w in words), message


def test_lora_flag_parsing(tmp_path):
    assert parse_lora_flag("a.safetensors", "high", "--lora-high") == LoraSpec("a.safetensors", 1.0, "high")
    assert parse_lora_flag("dir/a.safetensors:0.75", "both", "--lora") == LoraSpec("dir/a.safetensors", 0.75, "both")
    assert parse_lora_flag(r"C:\x\a.safetensors", "low", "--lora-low").path == r"C:\x\a.safetensors"
    with pytest.raises(ConfigError, match="strength must be a finite"):
        parse_lora_flag("a.safetensors:inf", "both", "--lora")
    with pytest.raises(ConfigError, match="expert 'mid'"):
        LoraSpec("a", expert="mid").validate()


def test_cli_refuses_a_bad_adapter_before_loading(tmp_path, golden, golden_ckpt):
    tensors, words = BAD["unknown key"]
    path = write_lora(tmp_path / "bad.safetensors", {k: torch.zeros(s) for k, s in tensors.items()})
    out = tmp_path / "x.mp4"
    cmd = [sys.executable, "-m", "wanengine.cli", "i2v", "--ckpt-dir", str(golden_ckpt), "--image",
           str(golden / "input.png"), "--prompt", "p", "--max-area", "12288", "--frame-num", "5",
           "--preset", "distill-4step", "--device", "cpu", "--lora-low", f"{path}:0.5", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("wanengine: error: ") and str(path) in lines[0] and words[0] in lines[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_cli_refuses_a_misshapen_adapter_in_process(tmp_path, golden, golden_ckpt, capsys, monkeypatch):
    from wanengine import cli, engine

    def no_loading(*args, **kwargs):
        raise AssertionError("an engine was built")

    monkeypatch.setattr(engine.Engine, "__init__", no_loading)
    tensors, words = BAD["shape mismatch"]
    path = write_lora(tmp_path / "bad.safetensors", {k: torch.zeros(s) for k, s in tensors.items()})
    out = tmp_path / "x.mp4"
    with pytest.raises(SystemExit) as info:
        cli.main(["i2v", "--ckpt-dir", str(golden_ckpt), "--image", str(golden / "input.png"), "--prompt", "p",
                  "--preset", "distill-4step", "--device", "cpu", "--lora", str(path), "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(w in err[0] for w in words) and str(path) in err[0] and not out.exists()


def test_end_to_end_with_adapters_equals_a_premerged_checkpoint(tmp_path, golden, golden_ckpt):
    from wanengine import Engine, EngineConfig
    from wanengine.presets import preset_values

    experts = ("high_noise_model", LOW)
    shapes = {e: expert_shapes(golden_ckpt / e) for e in experts}
    both = random_lora(shapes[LOW], LINEAR_TARGETS, seed=7)
    high = random_lora(shapes["high_noise_model"], LINEAR_TARGETS[2:], rank=3, alpha=6.0, seed=8)
    path_both = write_lora(tmp_path / "lora" / "both.safetensors", lora_tensors(both, prefix="diffusion_model."))
    path_high = write_lora(tmp_path / "lora" / "high_noise_model.safetensors", lora_tensors(high, rename=kohya))
    specs = [LoraSpec(str(path_both), 0.8, "both"), LoraSpec(str(path_high), 1.0, "high")]
    merged = {}
    for expert in experts:  # by hand: the closed form in float32, in the adapters' order, stored dtype
        state = {}
        for shard in sorted((golden_ckpt / expert).glob("*.safetensors")):
            state.update(load_file(str(shard)))  # the golden high expert is stored bf16, the low float32
        for module in LINEAR_TARGETS:
            name = module + ".weight"
            total = state[name].float() + pair_delta(both[module], 0.8)
            if expert == "high_noise_model" and module in high:
                total = total + pair_delta(high[module], 1.0)
            state[name] = total.to(state[name].dtype)
        merged[expert] = state
    premerged = premerged_checkpoint(golden_ckpt, tmp_path / "premerged", merged)
    call = dict(image=golden / "input.png", prompt="a cat", max_area=12288, frame_num=5, seed=3,
                **preset_values("distill-4step"))
    common = dict(device="cpu", dtype="float32", progress=False)
    # with offload: the adapters merge into the host copies the switcher moves in one at a time
    engines = [Engine(EngineConfig(ckpt_dir=str(golden_ckpt), loras=specs, offload_model=True, **common)),
               Engine(EngineConfig(ckpt_dir=str(premerged), **common))]
    for engine in engines:  # the latents are compared: the (deterministic) VAE decode is skipped
        engine.decode = lambda z: torch.empty(3, 0, 8 * z.shape[-2], 8 * z.shape[-1])
    with_adapters, by_hand = (engine.i2v(**call) for engine in engines)
    assert torch.equal(with_adapters.latent, by_hand.latent)
    assert with_adapters.metadata["dit_forwards"] == 4
    report = with_adapters.metadata["adapters"]
    assert len(report) == 3 and "both.safetensors (strength 0.8) -> high_noise_model" in report[0]


def test_info_on_a_lora_file(tmp_path, golden_ckpt, shapes, capsys):
    import json

    from wanengine import cli

    pairs = random_lora(shapes, LINEAR_TARGETS[:2], rank=4, alpha=2.0)
    tensors = {**lora_tensors(pairs, prefix="diffusion_model."),
               "diffusion_model.blocks.1.cross_attn.v_img.lora_down.weight": torch.zeros(4, 256),
               "diffusion_model.blocks.0.norm3.diff": torch.zeros(256)}
    path = write_lora(tmp_path / "l.safetensors", tensors)
    with pytest.raises(SystemExit) as info:
        cli.main(["info", "--lora", str(path), "--ckpt-dir", str(golden_ckpt), "--json"])
    assert info.value.code in (0, None)
    described = json.loads(capsys.readouterr().out)[0]
    low = described["experts"][1]
    assert low["ranks"] == {"4": 2} and low["alphas"] == {"2": 2} and low["skipped_clip_keys"] == 1
    assert low["target_modules"] == {"blocks.*.cross_attn.k.weight": 1, "blocks.*.norm3.weight": 1,
                                     "blocks.*.self_attn.q.weight": 1}
    with pytest.raises(SystemExit) as info:  # the tiny adapter does not fit the released A14B shapes
        cli.main(["info", "--lora", str(path)])
    assert info.value.code == 2 and "do not fit the Wan2.2-I2V-A14B expert" in capsys.readouterr().err
