"""DiT expert parity with the golden reference (float32 CPU <= 1e-4 relative), batching,
padding, the bf16 path, RoPE tables and the config reader."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import pytest
import torch
from safetensors.torch import load_file

from helpers import rel_err
from wanengine import kernels
from wanengine.errors import CheckpointError, ConfigError
from wanengine.models.dit import DiTConfig, WanDiT, sinusoidal_embedding
from wanengine.models.dit_loading import load_dit
from wanengine.models.rope import axis_pair_counts, rope_cos_sin

TOL = 1e-4  # golden README: float32 CPU models
BATCH_TOL = 1e-5  # same math, batched: only float reordering differs
# bf16 weights and activations in every linear/attention (float32 residual, norms and modulation):
# bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 2e-3 per op); through 2 blocks we measured
# 3.1e-3 (high) and 5.2e-3 (low). 3e-2 leaves room for other bf16 kernels, and still catches any
# real bug (those give O(1) errors).
BF16_TOL = 3e-2


@pytest.fixture(scope="module")
def dit_golden(golden: Path) -> Dict[str, torch.Tensor]:
    return load_file(str(golden / "dit.safetensors"))


@pytest.fixture(scope="module")
def experts(golden_ckpt: Path) -> Dict[str, WanDiT]:
    return {name: load_dit(golden_ckpt / f"{name}_noise_model", dtype=torch.float32) for name in ("high", "low")}


def _grid(g: Dict[str, torch.Tensor]):
    return tuple(int(v) for v in g["grid"].reshape(-1))


def _seq_len(g: Dict[str, torch.Tensor]) -> int:
    # The golden forward ran with seq_len = L = f*h*w (meta.json dit_shape [3, 6, 8] -> 144).
    f, h, w = _grid(g)
    return f * h * w


# --------------------------------------------------------------------------- RoPE
def test_rope_tables_match_golden(dit_golden):
    g = dit_golden
    seq_len, head_dim = _seq_len(g), g["rope_in"].shape[-1]
    assert g["rope_in"].shape[1] == seq_len
    cos, sin = rope_cos_sin(_grid(g), seq_len, head_dim)
    assert cos.shape == sin.shape == (1, seq_len, 1, head_dim) and cos.dtype == torch.float32
    err = rel_err(kernels.rotary(g["rope_in"], cos, sin), g["rope_out"])
    assert err <= TOL, err


def test_rope_padding_is_identity_and_ranges_are_slices():
    grid, seq_len, head_dim = (2, 3, 4), 30, 64  # L = 24, 6 padding tokens
    cos, sin = rope_cos_sin(grid, seq_len, head_dim)
    assert torch.equal(cos[:, 24:], torch.ones_like(cos[:, 24:]))
    assert torch.equal(sin[:, 24:], torch.zeros_like(sin[:, 24:]))
    part_cos, part_sin = rope_cos_sin(grid, seq_len, head_dim, start=10, end=28)
    assert torch.equal(part_cos, cos[:, 10:28]) and torch.equal(part_sin, sin[:, 10:28])
    # each angle is repeated for both members of its pair
    assert torch.equal(cos[..., 0::2], cos[..., 1::2])
    # token (f=1, h=2, w=3) = index 1*12 + 2*4 + 3 = 23: frame group turns by 1, rows by 2, cols by 3
    frames, rows, _ = axis_pair_counts(head_dim)
    angle = torch.atan2(sin[0, 23, 0, 0::2].double(), cos[0, 23, 0, 0::2].double())
    assert angle[0] == pytest.approx(1.0, abs=1e-6)
    assert angle[frames] == pytest.approx(2.0, abs=1e-6)
    assert angle[frames + rows] == pytest.approx(3.0, abs=1e-6)


def test_rope_group_sizes():
    assert axis_pair_counts(128) == (22, 21, 21)
    assert axis_pair_counts(64) == (12, 10, 10)
    assert sum(axis_pair_counts(80)) == 40


def test_rope_tables_are_cached_per_key(experts):
    model = experts["low"]
    first = model.rope_tables((3, 6, 8), 144, "cpu")
    assert model.rope_tables((3, 6, 8), 144, "cpu")[0] is first[0]
    other = model.rope_tables((3, 6, 8), 160, "cpu")
    assert other[0].shape[1] == 160 and other[0] is not first[0]


# --------------------------------------------------------------------------- embeddings and block 0
def test_time_embedding_matches_block0_modulation(experts, dit_golden):
    g = dit_golden
    per_token = g["block0_e"]  # [1, L, 6, D]: the reference's per-token copy
    assert torch.equal(per_token, per_token[:, :1].expand_as(per_token)), "golden rows should all be equal"
    e, e0 = experts["low"].embed_time(g["t"])
    assert e.shape == (1, per_token.shape[-1]) and e0.shape == (1, 6, per_token.shape[-1])
    assert e.dtype == e0.dtype == torch.float32
    assert rel_err(e0, per_token[:, 0]) <= TOL


def test_sinusoidal_embedding_is_cos_then_sin():
    emb = sinusoidal_embedding(torch.tensor([0.0, 937.0]), 256)
    assert emb.shape == (2, 256) and emb.dtype == torch.float32
    assert torch.equal(emb[0, :128], torch.ones(128)) and torch.equal(emb[0, 128:], torch.zeros(128))
    assert emb[1, 0].item() == pytest.approx(torch.cos(torch.tensor(937.0, dtype=torch.float64)).item(), abs=1e-7)


def test_text_embedding_matches_golden(experts, dit_golden):
    g = dit_golden
    model = experts["low"]
    assert rel_err(model.embed_text([g["context"]]), g["block0_context"]) <= TOL
    # an already padded [B, 512, 4096] tensor gives the same rows
    padded = torch.cat((g["context"], torch.zeros(512 - g["context"].shape[0], 4096)))[None]
    assert torch.equal(model.embed_text(padded), model.embed_text([g["context"]]))


def test_block0_matches_golden(experts, dit_golden):
    g = dit_golden
    model, seq_len = experts["low"], _seq_len(g)
    e0 = g["block0_e"][:, 0]  # [1, 6, D] per-sample modulation (all rows checked equal above)
    cos, sin = model.rope_tables(_grid(g), seq_len, "cpu")
    with torch.no_grad():
        out = model.blocks[0](g["block0_in"], e0, g["block0_context"], cos, sin, torch.tensor([seq_len]))
    err = rel_err(out, g["block0_out"])
    assert err <= TOL, err


def test_block_accepts_a_token_chunk(experts, dit_golden):
    """A sequence-parallel wrapper passes its chunk of tokens and rows of cos/sin and overrides
    `attend`; with a full-sequence attend that gathers K/V, chunks reproduce the whole block."""
    g = dit_golden
    model, seq_len = experts["low"], _seq_len(g)
    block, e0 = model.blocks[0], g["block0_e"][:, 0]
    cos, sin = model.rope_tables(_grid(g), seq_len, "cpu")
    k_lens = torch.tensor([seq_len])
    with torch.no_grad():
        full = block(g["block0_in"], e0, g["block0_context"], cos, sin, k_lens)
        # gather: run q/k/v of the whole sequence once to hand each chunk the full K/V
        attn = block.self_attn
        x_mod = kernels.layer_norm_modulate(g["block0_in"], (block.modulation + e0)[:, 1:2],
                                            (block.modulation + e0)[:, 0:1], block.eps)
        heads = (1, seq_len, attn.num_heads, attn.head_dim)
        k_all = kernels.rotary(attn.norm_k(attn.k(x_mod)).view(heads), cos, sin)
        v_all = attn.v(x_mod).view(heads)
        attn.attend = lambda q, k, v, lens: kernels.attention(q, k_all, v_all, scale=attn.head_dim ** -0.5,
                                                               k_lens=lens)
        try:
            chunks = [block(g["block0_in"][:, s:s + 48], e0, g["block0_context"], cos[:, s:s + 48],
                            sin[:, s:s + 48], k_lens) for s in range(0, seq_len, 48)]
        finally:
            del attn.attend  # back to the class method
    assert rel_err(torch.cat(chunks, dim=1), full) <= BATCH_TOL


# --------------------------------------------------------------------------- full forward
@pytest.mark.parametrize("name", ["high", "low"])
def test_forward_matches_golden(experts, dit_golden, name):
    g = dit_golden
    with torch.no_grad():
        out = experts[name](g["x"][None], g["t"], [g["context"]], g["y"][None], _seq_len(g))
    assert out.shape == (1, *g["x"].shape) and out.dtype == torch.float32
    err = rel_err(out[0], g[f"out_{name}"])
    assert err <= TOL, f"{name}: {err}"


def test_padding_tokens_do_not_change_the_output(experts, dit_golden):
    g = dit_golden
    with torch.no_grad():
        out = experts["high"](g["x"][None], g["t"], [g["context"]], g["y"][None], _seq_len(g) + 16)
    assert rel_err(out[0], g["out_high"]) <= TOL


def test_batch_of_two_equals_two_single_forwards(experts, dit_golden):
    """CFG runs cond + uncond as one batch: per-sample t, context and latent must stay per sample."""
    g = dit_golden
    model, seq_len = experts["low"], _seq_len(g)
    x = torch.stack((g["x"], 0.5 * g["x"]))
    y = torch.stack((g["y"], g["y"]))
    t = torch.tensor([937.0, 500.0])
    contexts = [g["context"], g["context"][:3] * -1.0]
    with torch.no_grad():
        batched = model(x, t, contexts, y, seq_len)
        singles = [model(x[i:i + 1], t[i:i + 1], [contexts[i]], y[i:i + 1], seq_len)[0] for i in range(2)]
    assert rel_err(batched[0], g["out_low"]) <= TOL
    for i in range(2):
        assert rel_err(batched[i], singles[i]) <= BATCH_TOL, i
    assert rel_err(singles[0], singles[1]) > 1e-2  # the two samples really differ


def test_time_modulation_is_per_sample_not_per_token(experts, dit_golden, monkeypatch):
    """No [L, 6, D] tensor: the time projection runs once per sample and every modulated
    LayerNorm receives [B, 1, D] scale/shift that broadcast over tokens."""
    g = dit_golden
    model = experts["low"]
    seen_scales, projections = [], []
    real = kernels.layer_norm_modulate

    def spy(x, scale, shift, eps):
        seen_scales.append((tuple(scale.shape), tuple(shift.shape)))
        return real(x, scale, shift, eps)

    monkeypatch.setattr(kernels, "layer_norm_modulate", spy)
    hook = model.time_projection.register_forward_hook(lambda m, i, o: projections.append(tuple(o.shape)))
    try:
        with torch.no_grad():
            model(torch.stack((g["x"], g["x"])), 937, [g["context"]] * 2, torch.stack((g["y"], g["y"])))
    finally:
        hook.remove()
    dim = model.config.dim
    assert projections == [(2, 6 * dim)]
    assert seen_scales and all(s == ((2, 1, dim), (2, 1, dim)) for s in seen_scales)


@pytest.mark.parametrize("name", ["high", "low"])
def test_bfloat16_forward_against_float32_golden(golden_ckpt, dit_golden, name):
    g = dit_golden
    model = load_dit(golden_ckpt / f"{name}_noise_model", dtype=torch.bfloat16)
    assert model.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(g["x"][None], g["t"], [g["context"]], g["y"][None], _seq_len(g))
    assert out.dtype == torch.float32
    err = rel_err(out[0], g[f"out_{name}"])
    assert err <= BF16_TOL, f"{name}: {err}"


def test_unbatched_call_and_bad_inputs(experts, dit_golden):
    g = dit_golden
    model = experts["high"]
    with torch.no_grad():
        out = model(g["x"], g["t"], g["context"], g["y"], _seq_len(g))
    assert out.shape == g["x"].shape and rel_err(out, g["out_high"]) <= TOL
    with pytest.raises(ValueError, match="seq_len"):
        model(g["x"], g["t"], g["context"], g["y"], _seq_len(g) - 1)
    with pytest.raises(ValueError, match="context"):
        model(g["x"], g["t"], torch.zeros(513, 4096), g["y"])


# --------------------------------------------------------------------------- config
def _write_config(tmp_path: Path, **changes) -> Path:
    raw = {"_class_name": "WanModel", "_diffusers_version": "x", "dim": 256, "eps": 1e-6, "ffn_dim": 512,
           "freq_dim": 256, "in_dim": 36, "model_type": "i2v", "num_heads": 2, "num_layers": 2,
           "out_dim": 16, "text_len": 512}
    raw.update(changes)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({k: v for k, v in raw.items() if v is not None}))
    return path


def test_config_from_json(tmp_path, golden_ckpt):
    cfg = DiTConfig.from_json(golden_ckpt / "low_noise_model" / "config.json")
    assert (cfg.dim, cfg.num_heads, cfg.head_dim, cfg.num_layers, cfg.patch_size) == (256, 2, 128, 2, (1, 2, 2))
    assert DiTConfig.from_json(_write_config(tmp_path, _anything="ignored")) == cfg


@pytest.mark.parametrize("changes, match", [
    ({"model_type": "t2v"}, "model_type"),
    ({"model_type": None}, "model_type"),
    ({"num_heads": 3}, "divisible"),
    ({"dim": None}, "missing"),
    ({"patch_size": [1, 4, 4]}, "patch_size"),
])
def test_config_rejections_name_the_file(tmp_path, changes, match):
    path = _write_config(tmp_path, **changes)
    with pytest.raises(CheckpointError, match=match) as info:
        DiTConfig.from_json(path)
    assert str(path) in str(info.value)


def test_config_direct_validation():
    with pytest.raises(ConfigError):
        DiTConfig(dim=10, ffn_dim=8, freq_dim=256, in_dim=36, out_dim=16, num_heads=5, num_layers=1)
