"""`load_dit`: sharded bf16 / fp32 experts, the single-file layout, diffusers names, and every
rejection (one CheckpointError naming the file)."""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator

import pytest
import torch
from safetensors.torch import load_file, save_file

from wanengine.errors import CheckpointError
from wanengine.io.formats import safetensors_files
from wanengine.io.formats.dit_diffusers import is_diffusers_layout, to_diffusers_name, to_wan_name
from wanengine.models.dit_loading import FLOAT32_PARAMS, INDEX_NAME, SINGLE_NAME, load_dit

EXPERTS = ("high_noise_model", "low_noise_model")


# --------------------------------------------------------------------------- helpers
def _stored(expert: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of a sharded expert, read directly with safetensors."""
    out: Dict[str, torch.Tensor] = {}
    for shard in sorted(expert.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def _copy_expert(src: Path, dst: Path) -> Path:
    """Writable copy (the golden files are read-only; copyfile does not copy modes)."""
    dst.mkdir(parents=True)
    for item in src.iterdir():
        shutil.copyfile(item, dst / item.name)
    return dst


def _write_single(dst: Path, config_src: Path, tensors: Dict[str, torch.Tensor]) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config_src, dst / "config.json")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / SINGLE_NAME))
    return dst


def _write_sharded(dst: Path, config_src: Path, tensors: Dict[str, torch.Tensor], shards: int) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config_src, dst / "config.json")
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file_name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({n: tensors[n].contiguous() for n in part}, str(dst / file_name))
        weight_map.update({n: file_name for n in part})
    (dst / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return dst


def _forward(model, g: Dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(g["x"][None], g["t"], [g["context"]], g["y"][None], 144)


@pytest.fixture(scope="module")
def dit_golden(golden: Path) -> Dict[str, torch.Tensor]:
    return load_file(str(golden / "dit.safetensors"))


# --------------------------------------------------------------------------- layouts that load
@pytest.mark.parametrize("expert", EXPERTS)
def test_sharded_expert_loads_to_bf16(golden_ckpt, expert):
    """bf16 (7 shards) and fp32 (12 shards) releases both load; values are the stored ones
    rounded to the run dtype, the float32-critical parameters stay float32."""
    stored = _stored(golden_ckpt / expert)
    model = load_dit(golden_ckpt / expert, dtype=torch.bfloat16)
    params = dict(model.state_dict())
    assert set(params) == set(stored)
    for name, value in params.items():
        keep32 = any(k in name for k in FLOAT32_PARAMS)
        assert value.dtype == (torch.float32 if keep32 else torch.bfloat16), name
        assert torch.equal(value, stored[name].to(value.dtype)), name
        # the installed tensor owns exactly its bytes (no view into a whole-shard mmap)
        assert value.untyped_storage().nbytes() == value.numel() * value.element_size(), name
    assert not any(p.requires_grad for p in model.parameters())


def test_float32_load_keeps_exact_values(golden_ckpt):
    stored = _stored(golden_ckpt / "low_noise_model")
    model = load_dit(golden_ckpt / "low_noise_model", dtype=torch.float32)
    for name, value in model.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, stored[name]), name


def test_single_file_layout(tmp_path, golden_ckpt, dit_golden):
    src = golden_ckpt / "low_noise_model"
    single = _write_single(tmp_path / "single", src / "config.json", _stored(src))
    reference = load_dit(src, dtype=torch.float32)
    model = load_dit(single, dtype=torch.float32)
    assert torch.equal(_forward(model, dit_golden), _forward(reference, dit_golden))


@pytest.mark.parametrize("shards", [1, 3])
def test_diffusers_layout_gives_identical_outputs(tmp_path, golden_ckpt, dit_golden, shards):
    src = golden_ckpt / "high_noise_model"
    renamed = {to_diffusers_name(n): t for n, t in _stored(src).items()}
    assert is_diffusers_layout(renamed) and "blocks.0.attn1.to_q.weight" in renamed
    dst = tmp_path / "diffusers"
    if shards == 1:
        _write_single(dst, src / "config.json", renamed)
    else:
        _write_sharded(dst, src / "config.json", renamed, shards)
        # a diffusers release also names its config fields the diffusers way
        (dst / "config.json").write_text(json.dumps({
            "_class_name": "WanTransformer3DModel", "added_kv_proj_dim": None, "attention_head_dim": 128,
            "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 512, "freq_dim": 256, "image_dim": None,
            "in_channels": 36, "num_attention_heads": 2, "num_layers": 2, "out_channels": 16,
            "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024,
            "text_dim": 4096}))
    reference = load_dit(src, dtype=torch.float32)
    model = load_dit(dst, dtype=torch.float32)
    assert torch.equal(_forward(model, dit_golden), _forward(reference, dit_golden))


def test_diffusers_names_follow_the_spec(golden_ckpt):
    spec = {
        "blocks.3.self_attn.q.weight": "blocks.3.attn1.to_q.weight",
        "blocks.3.self_attn.o.bias": "blocks.3.attn1.to_out.0.bias",
        "blocks.3.self_attn.norm_k.weight": "blocks.3.attn1.norm_k.weight",
        "blocks.3.cross_attn.v.weight": "blocks.3.attn2.to_v.weight",
        "blocks.3.ffn.0.weight": "blocks.3.ffn.net.0.proj.weight",
        "blocks.3.ffn.2.bias": "blocks.3.ffn.net.2.bias",
        "blocks.3.modulation": "blocks.3.scale_shift_table",
        "blocks.3.norm3.weight": "blocks.3.norm2.weight",
        "head.head.weight": "proj_out.weight",
        "head.modulation": "scale_shift_table",
        "time_embedding.0.weight": "condition_embedder.time_embedder.linear_1.weight",
        "time_embedding.2.bias": "condition_embedder.time_embedder.linear_2.bias",
        "text_embedding.0.weight": "condition_embedder.text_embedder.linear_1.weight",
        "text_embedding.2.weight": "condition_embedder.text_embedder.linear_2.weight",
        "time_projection.1.weight": "condition_embedder.time_proj.weight",
        "patch_embedding.weight": "patch_embedding.weight",
    }
    for wan, diffusers in spec.items():
        assert to_diffusers_name(wan) == diffusers and to_wan_name(diffusers) == wan
    assert to_wan_name("head.scale_shift_table") == "head.modulation"
    names = list(_stored(golden_ckpt / "low_noise_model"))
    assert [to_wan_name(to_diffusers_name(n)) for n in names] == names
    assert len({to_diffusers_name(n) for n in names}) == len(names)
    assert not is_diffusers_layout(names)


# --------------------------------------------------------------------------- rejections
@contextmanager
def _expect_error(path_in_message, *match: str) -> Iterator[None]:
    """The block must raise a one-line CheckpointError naming `path_in_message` (and each `match`)."""
    with pytest.raises(CheckpointError) as info:
        yield
    message = str(info.value)
    assert "\n" not in message, message
    assert str(path_in_message) in message, message
    for m in match:
        assert m in message, message


@pytest.fixture
def bf16_copy(tmp_path, golden_ckpt) -> Path:
    return _copy_expert(golden_ckpt / "high_noise_model", tmp_path / "high")


@pytest.fixture
def single_copy(tmp_path, golden_ckpt) -> Path:
    src = golden_ckpt / "low_noise_model"
    return _write_single(tmp_path / "single", src / "config.json", _stored(src))


def _index(expert: Path) -> Dict:
    return json.loads((expert / INDEX_NAME).read_text())


def test_rejects_missing_directory(tmp_path):
    with _expect_error(tmp_path / "nope", "not found"):
        load_dit(tmp_path / "nope")


def test_rejects_missing_config(bf16_copy):
    (bf16_copy / "config.json").unlink()
    with _expect_error(bf16_copy / "config.json", "not found"):
        load_dit(bf16_copy)


def test_rejects_missing_index_and_single_file(bf16_copy):
    (bf16_copy / INDEX_NAME).unlink()
    with _expect_error(bf16_copy, INDEX_NAME, SINGLE_NAME):
        load_dit(bf16_copy)


def test_rejects_index_naming_a_missing_shard(bf16_copy):
    shard = _index(bf16_copy)["weight_map"]["head.head.weight"]
    (bf16_copy / shard).unlink()
    with _expect_error(bf16_copy / INDEX_NAME, shard):
        load_dit(bf16_copy)


def test_rejects_shard_lacking_a_mapped_tensor(bf16_copy):
    index = _index(bf16_copy)
    right = index["weight_map"]["head.head.weight"]
    wrong = next(s for s in sorted(set(index["weight_map"].values())) if s != right)
    index["weight_map"]["head.head.weight"] = wrong
    (bf16_copy / INDEX_NAME).write_text(json.dumps(index))
    with _expect_error(bf16_copy / wrong, "head.head.weight"):
        load_dit(bf16_copy)


def test_rejects_unreadable_index(bf16_copy):
    (bf16_copy / INDEX_NAME).write_text("{not json")
    with _expect_error(bf16_copy / INDEX_NAME):
        load_dit(bf16_copy)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_rejects_corrupt_or_truncated_shard(bf16_copy, damage):
    shard = bf16_copy / sorted(set(_index(bf16_copy)["weight_map"].values()))[2]
    data = shard.read_bytes()
    shard.write_bytes({"truncate": data[: len(data) - 1000], "garbage": b"\x00garbage" * 64, "empty": b""}[damage])
    with _expect_error(shard, "corrupt or truncated"):
        load_dit(bf16_copy)


def _rewrite_single(expert: Path, edit) -> None:
    tensors = load_file(str(expert / SINGLE_NAME))
    edit(tensors)
    save_file(tensors, str(expert / SINGLE_NAME))


def test_rejects_missing_tensor(single_copy):
    _rewrite_single(single_copy, lambda t: t.pop("blocks.1.cross_attn.norm_k.weight"))
    with _expect_error(single_copy / SINGLE_NAME, "missing", "blocks.1.cross_attn.norm_k.weight"):
        load_dit(single_copy)


def test_rejects_unexpected_tensor(single_copy):
    _rewrite_single(single_copy, lambda t: t.update({"blocks.2.modulation": torch.zeros(1, 6, 256)}))
    with _expect_error(single_copy / SINGLE_NAME, "unexpected", "blocks.2.modulation"):
        load_dit(single_copy)


def test_rejects_misshaped_tensor_before_reading_any_data(single_copy, monkeypatch):
    _rewrite_single(single_copy, lambda t: t.update({"head.head.weight": torch.zeros(32, 256)}))

    def must_not_read(*args, **kwargs):
        raise AssertionError("tensor data read before names/shapes were validated")

    monkeypatch.setattr(safetensors_files, "read_tensor", must_not_read)
    with _expect_error(single_copy / SINGLE_NAME, "head.head.weight", "[32, 256]", "[64, 256]"):
        load_dit(single_copy)


@pytest.mark.parametrize("model_type", ["t2v", "ti2v", None])
def test_rejects_non_i2v_model_type(bf16_copy, model_type):
    config = json.loads((bf16_copy / "config.json").read_text())
    config.pop("model_type")
    if model_type is not None:
        config["model_type"] = model_type
    (bf16_copy / "config.json").write_text(json.dumps(config))
    with _expect_error(bf16_copy / "config.json", "model_type"):
        load_dit(bf16_copy)


def test_rejects_config_that_disagrees_with_tensors(bf16_copy):
    config = json.loads((bf16_copy / "config.json").read_text())
    config["ffn_dim"] = 1024
    (bf16_copy / "config.json").write_text(json.dumps(config))
    with _expect_error(bf16_copy / INDEX_NAME, "ffn.0.weight", "expected"):
        load_dit(bf16_copy)
