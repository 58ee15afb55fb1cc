"""UMT5 encoder: golden parity (float32 and bfloat16), bucket math, config inference, and
loader errors on missing / corrupt / mismatched checkpoints."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict

import pytest
import torch
from safetensors.torch import load_file

from helpers import rel_err
from wanengine.constants import constants
from wanengine.errors import CheckpointError
from wanengine.models.loading import expected_shapes
from wanengine.models.t5 import (T5Config, UMT5Encoder, encode_prompts, load_t5, position_buckets,
                                 relative_position_bucket)
from wanengine.models.tokenizer import load_tokenizer

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
# bf16 weights and activations against the float32 reference: bf16 keeps 8 mantissa bits
# (~3.9e-3 relative per rounding), and every projection, residual add and norm rounds
# again. On the 2-layer golden encoder we measure ~0.9% of max|out| worst element and a
# cosine similarity of ~0.99998; the bounds leave ~2x headroom over that.
BF16_MAX_REL = 2e-2
BF16_MIN_COSINE = 0.9995


@pytest.fixture(scope="module")
def t5_golden(golden: Path) -> Dict[str, torch.Tensor]:
    return load_file(str(golden / "t5.safetensors"))


@pytest.fixture(scope="module")
def t5_path(golden_ckpt: Path) -> Path:
    return golden_ckpt / T5_FILE


@pytest.fixture(scope="module")
def encoder_fp32(t5_path: Path) -> UMT5Encoder:
    return load_t5(t5_path, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def state_dict(t5_path: Path) -> Dict[str, torch.Tensor]:
    return torch.load(t5_path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- bucket math


def test_bucket_hand_computed_values() -> None:
    # r = key - query. |r| < 8 exact; else 8 + trunc(log(|r|/8) / log(16) * 8), capped at 15;
    # keys after the query add 16. e.g. |r|=22: log(2.75)/log(16)*8 = 2.92 -> 10;
    # |r|=23: 3.05 -> 11; |r|=16: exactly 2 -> 10; |r|=91: 7.01 -> 15; |r|=90: 6.98 -> 14.
    expected = {0: 0, -1: 1, -7: 7, -8: 8, -11: 8, -12: 9, -16: 10, -22: 10, -23: 11, -32: 12,
                -64: 14, -90: 14, -91: 15, -127: 15, -128: 15, -1000: 15,
                1: 17, 7: 23, 8: 24, 16: 26, 22: 26, 23: 27, 32: 28, 64: 30, 90: 30, 91: 31, 511: 31}
    rel = torch.tensor(list(expected))
    assert relative_position_bucket(rel, 32).tolist() == list(expected.values())


def test_bucket_matrix_layout() -> None:
    buckets = position_buckets(5, 32, "cpu")  # [query i, key j], r = j - i
    assert buckets.shape == (5, 5) and buckets.dtype == torch.long
    assert buckets.diagonal().eq(0).all()
    assert buckets[0, 3].item() == 16 + 3 and buckets[3, 0].item() == 3


# ---------------------------------------------------------------- config and names


def test_config_inferred_from_golden_shapes(encoder_fp32: UMT5Encoder, golden: Path) -> None:
    meta = json.loads((golden / "meta.json").read_text())["t5"]
    cfg = encoder_fp32.cfg
    assert (cfg.vocab_size, cfg.dim, cfg.dim_attn, cfg.dim_ffn, cfg.num_heads, cfg.num_layers, cfg.num_buckets) == (
        meta["vocab_size"], meta["dim"], meta["dim_attn"], meta["dim_ffn"], meta["num_heads"],
        meta["encoder_layers"], meta["num_buckets"])


def test_strict_load_state_dict_without_renaming(state_dict: Dict[str, torch.Tensor]) -> None:
    cfg = T5Config.from_state_dict_shapes({k: v.shape for k, v in state_dict.items()})
    with torch.device("meta"):
        model = UMT5Encoder(cfg)
    model.load_state_dict(state_dict, strict=True, assign=True)
    assert set(expected_shapes(model)) == set(state_dict)


def test_full_size_names_and_shapes_match_spec_table() -> None:
    full = constants()["umt5_xxl_encoder"]
    cfg = T5Config(vocab_size=full["vocab_size"], dim=full["dim"], dim_attn=full["dim_attn"],
                   dim_ffn=full["dim_ffn"], num_heads=full["num_heads"], num_layers=full["num_layers"],
                   num_buckets=full["num_buckets"])
    with torch.device("meta"):
        shapes = expected_shapes(UMT5Encoder(cfg))
    assert len(shapes) == 2 + 10 * 24
    assert shapes["token_embedding.weight"] == (256384, 4096)
    assert shapes["blocks.23.attn.o.weight"] == (4096, 4096)
    assert shapes["blocks.0.ffn.gate.0.weight"] == shapes["blocks.0.ffn.fc1.weight"] == (10240, 4096)
    assert shapes["blocks.5.ffn.fc2.weight"] == (4096, 10240)
    assert shapes["blocks.7.pos_embedding.embedding.weight"] == (32, 64)
    assert T5Config.from_state_dict_shapes(shapes) == cfg


# ---------------------------------------------------------------- golden parity


def _check_parity(contexts, t5_golden, max_rel: float, min_cos: float = 1.0) -> list:
    lengths = t5_golden["mask"].sum(dim=1).tolist()
    assert [c.shape for c in contexts] == [(n, 4096) for n in lengths]
    errors = []
    for i, ctx in enumerate(contexts):
        ref = t5_golden["out"][i, : lengths[i]]
        err = rel_err(ctx.float(), ref)
        cos = torch.nn.functional.cosine_similarity(ctx.double().flatten(), ref.double().flatten(), dim=0).item()
        assert err <= max_rel, f"prompt {i}: rel err {err:.3e} > {max_rel:.0e}"
        assert cos >= min_cos - 1e-12, f"prompt {i}: cosine {cos:.6f} < {min_cos}"
        errors.append(err)
    return errors


def test_float32_encode_matches_golden(encoder_fp32: UMT5Encoder, t5_golden) -> None:
    contexts = encoder_fp32.encode(t5_golden["ids"], t5_golden["mask"])
    assert [c.dtype for c in contexts] == [torch.float32] * 2
    _check_parity(contexts, t5_golden, 1e-4)  # measured ~3e-7


def test_float32_full_length_forward_matches_golden(encoder_fp32: UMT5Encoder, t5_golden) -> None:
    # The reference runs all 512 positions; `encode` runs only max(n) of them. Both must match.
    with torch.no_grad():
        out = encoder_fp32(t5_golden["ids"], t5_golden["mask"])
    assert out.shape == (2, 512, 4096)
    lengths = t5_golden["mask"].sum(dim=1).tolist()
    _check_parity([out[i, :n] for i, n in enumerate(lengths)], t5_golden, 1e-4)


def test_bfloat16_encode_against_float32_golden(t5_path: Path, t5_golden) -> None:
    encoder = load_t5(t5_path, device="cpu", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in encoder.parameters())
    contexts = encoder.encode(t5_golden["ids"], t5_golden["mask"])
    assert [c.dtype for c in contexts] == [torch.bfloat16] * 2
    _check_parity(contexts, t5_golden, BF16_MAX_REL, BF16_MIN_COSINE)


def test_encode_prompts_from_text(encoder_fp32: UMT5Encoder, golden_ckpt: Path, golden: Path, t5_golden) -> None:
    prompt = json.loads((golden / "meta.json").read_text())["config"]["prompt"]
    negative = constants()["negative_prompt_default"]
    contexts = encode_prompts(load_tokenizer(golden_ckpt), encoder_fp32, [prompt, negative], device="cpu")
    _check_parity(contexts, t5_golden, 1e-4)


def test_padding_does_not_leak_into_valid_rows(encoder_fp32: UMT5Encoder, t5_golden) -> None:
    ids, mask = t5_golden["ids"][:1].clone(), t5_golden["mask"][:1]
    n = int(mask.sum())
    ids[0, n:] = 7  # garbage behind the mask must not change the valid rows
    with torch.no_grad():
        a = encoder_fp32(t5_golden["ids"][:1], mask)[0, :n]
        b = encoder_fp32(ids, mask)[0, :n]
    assert rel_err(b, a) <= 1e-6


# ---------------------------------------------------------------- loader errors


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / T5_FILE
    with pytest.raises(CheckpointError, match=T5_FILE):
        load_t5(path)


@pytest.mark.parametrize("keep_fraction", [0.5, 0.98])
def test_truncated_file(tmp_path: Path, t5_path: Path, keep_fraction: float) -> None:
    data = t5_path.read_bytes()
    path = tmp_path / T5_FILE
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_t5(path, dtype=torch.float32)


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / T5_FILE
    path.write_bytes(b"\x00not a torch file" * 100)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_t5(path)


def _save(tmp_path: Path, state: Dict[str, torch.Tensor]) -> Path:
    path = tmp_path / T5_FILE
    torch.save(state, path)
    return path


@pytest.mark.parametrize("name", ["blocks.1.ffn.fc1.weight", "blocks.0.attn.q.weight", "norm.weight",
                                  "token_embedding.weight", "blocks.1.pos_embedding.embedding.weight"])
def test_missing_tensor(tmp_path: Path, state_dict, name: str) -> None:
    state = {k: v for k, v in state_dict.items() if k != name}
    path = _save(tmp_path, state)
    with pytest.raises(CheckpointError, match="missing") as info:
        load_t5(path)
    assert str(path) in str(info.value) and name in str(info.value)


@pytest.mark.parametrize("name", ["blocks.0.attn.extra.weight", "blocks.1.ffn.fc1.bias", "encoder.final.weight"])
def test_unexpected_tensor(tmp_path: Path, state_dict, name: str) -> None:
    path = _save(tmp_path, {**state_dict, name: torch.zeros(3)})
    with pytest.raises(CheckpointError, match="unexpected") as info:
        load_t5(path)
    assert str(path) in str(info.value) and name in str(info.value)


@pytest.mark.parametrize("name, shape", [("blocks.1.attn.k.weight", (32, 4096)),
                                         ("blocks.0.attn.q.weight", (32, 4096)),  # also used to infer A
                                         ("blocks.1.ffn.fc2.weight", (4096, 95)),
                                         ("blocks.0.norm2.weight", (4095,))])
def test_misshaped_tensor(tmp_path: Path, state_dict, name: str, shape) -> None:
    path = _save(tmp_path, {**state_dict, name: torch.zeros(shape, dtype=torch.bfloat16)})
    with pytest.raises(CheckpointError) as info:
        load_t5(path)
    message = str(info.value)
    assert str(path) in message and name in message and str(list(shape)) in message


def test_not_a_dict_of_tensors(tmp_path: Path) -> None:
    path = _save(tmp_path, {"token_embedding.weight": [1, 2, 3]})  # type: ignore[dict-item]
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_t5(path)
