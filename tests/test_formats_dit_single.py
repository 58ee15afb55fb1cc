"""Single-file DiT experts (ComfyUI / LightX2V layout): bare or prefixed released names, the
configuration inferred from shapes or given by a config file, and the `split_extra` hook."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import pytest
import torch
from safetensors.torch import load_file, save_file

from wanengine.errors import CheckpointError
from wanengine.io.formats.dit_diffusers import to_diffusers_name
from wanengine.models.dit import DiTConfig, WanDiT
from wanengine.models.dit_loading import inspect_expert, load_dit
from wanengine.models.loading import expected_shapes


def _stored(expert: Path) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    for shard in sorted(expert.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


@pytest.fixture(scope="module")
def low_tensors(golden_ckpt) -> Dict[str, torch.Tensor]:
    return _stored(golden_ckpt / "low_noise_model")


@pytest.fixture(scope="module")
def reference(golden_ckpt):
    return load_dit(golden_ckpt / "low_noise_model", dtype=torch.float32).state_dict()


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model."])
def test_single_file_expert_loads_like_the_released_directory(tmp_path, golden_ckpt, low_tensors, reference, prefix):
    path = tmp_path / "wan2.2_i2v_low_noise_14B_fp16.safetensors"
    save_file({prefix + n: t for n, t in low_tensors.items()}, str(path))
    plan = inspect_expert(path)
    assert plan.config == DiTConfig.from_json(golden_ckpt / "low_noise_model" / "config.json")
    assert "single file" in plan.layout and (repr(prefix) if prefix else "no prefix") in plan.layout
    assert "inferred" in plan.layout
    state = load_dit(path, dtype=torch.float32).state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[n], reference[n]) for n in reference)


def test_single_file_in_diffusers_names(tmp_path, low_tensors, reference):
    path = tmp_path / "expert.safetensors"
    save_file({to_diffusers_name(n): t for n, t in low_tensors.items()}, str(path))
    assert inspect_expert(path).layout.startswith("diffusers names, single file")
    state = load_dit(path, dtype=torch.float32).state_dict()
    assert all(torch.equal(state[n], reference[n]) for n in reference)


def test_config_file_overrides_the_inferred_head_count(tmp_path, golden_ckpt, low_tensors):
    path = tmp_path / "expert.safetensors"
    save_file(low_tensors, str(path))
    config = json.loads((golden_ckpt / "low_noise_model" / "config.json").read_text())
    (tmp_path / "four_heads.json").write_text(json.dumps(dict(config, num_heads=4)))
    plan = inspect_expert(path, config_file=tmp_path / "four_heads.json")
    assert plan.config.num_heads == 4 and "four_heads.json" in plan.layout
    assert load_dit(path, config_file=tmp_path / "four_heads.json").blocks[0].self_attn.num_heads == 4


def test_width_not_a_multiple_of_128_asks_for_a_config_file(tmp_path):
    config = DiTConfig(dim=192, ffn_dim=256, freq_dim=256, in_dim=36, out_dim=16, num_heads=2, num_layers=1)
    with torch.device("meta"):
        shapes = expected_shapes(WanDiT(config))
    path = tmp_path / "odd.safetensors"
    save_file({n: torch.zeros(s) for n, s in shapes.items()}, str(path))
    with pytest.raises(CheckpointError, match="as dit_config$") as info:
        inspect_expert(path)
    assert str(path) in str(info.value) and info.value.cli_message.endswith("as --dit-config")
    (tmp_path / "odd.json").write_text(json.dumps({"model_type": "i2v", "dim": 192, "ffn_dim": 256, "freq_dim": 256,
                                                   "in_dim": 36, "out_dim": 16, "num_heads": 2, "num_layers": 1}))
    assert inspect_expert(path, config_file=tmp_path / "odd.json").config == config


def test_stray_key_is_named(tmp_path, low_tensors):
    path = tmp_path / "expert.safetensors"
    save_file({**{"model.diffusion_model." + n: t for n, t in low_tensors.items()},
               "model.diffusion_model.blocks.0.stray": torch.zeros(1)}, str(path))
    with pytest.raises(CheckpointError, match="unexpected tensor.*blocks.0.stray") as info:
        inspect_expert(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_split_extra_hook_sets_scale_tensors_aside(tmp_path, low_tensors, reference):
    """The hook an 8-bit format uses: extra per-linear tensors leave the strict check and are
    kept in the plan; the model records load as usual."""
    scales = {f"blocks.{i}.self_attn.q.scale_weight": torch.tensor(0.5) for i in range(2)}
    path = tmp_path / "scaled.safetensors"
    save_file({**{"diffusion_model." + n: t for n, t in {**low_tensors, **scales}.items()}}, str(path))
    with pytest.raises(CheckpointError, match="unexpected"):
        inspect_expert(path)

    def split(records):
        return ([r for r in records if not r.name.endswith("scale_weight")],
                [r for r in records if r.name.endswith("scale_weight")])

    plan = inspect_expert(path, split_extra=split)
    assert sorted(r.name for r in plan.extra) == sorted(scales)
    assert all(r.stored_name == "diffusion_model." + r.name for r in plan.extra)
    state = load_dit(path, dtype=torch.float32, plan=plan).state_dict()
    assert all(torch.equal(state[n], reference[n]) for n in reference)


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "expert.bin"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointError, match=".safetensors"):
        inspect_expert(path)
