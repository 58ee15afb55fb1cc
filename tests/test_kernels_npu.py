"""The `npu` kernels backend on CPU, through the contract-enforcing `torch_npu` double.

`fake_torch_npu` is installed as `sys.modules["torch_npu"]`, the backend is forced with
`kernels.configure("npu")`, and every op is compared with the reference math while the
recorded operator calls prove the work really went through `torch_npu` with the
documented arguments. The second half proves the double rejects contract violations, so
a backend that broke a contract would fail here rather than pass silently.

Bounds (rel_err vs the float32 reference from the same rounded inputs; observed in brackets):
attention bf16 1e-2 [3.4e-3], fp16 2e-3 [2.3e-4]; float32 q/k/v run in bf16 unless the
installed torch_npu takes fp32 -> 1.5e-2 [6.5e-3] (q/k/v and the output rounded to bf16),
with fp32 support 1e-5 [~1e-6]. rotary bf16 1.6e-2 [4.2e-3] (the cos/sin tables are
rounded to bf16 too), fp16 2e-3 [5.8e-4], fp32 1e-6 [0]. Norms as in test_kernels.py
(bf16 [5.8e-3], fp16 [7.9e-4], fp32 [7.5e-8]).
"""
from __future__ import annotations

import inspect
import sys
from types import ModuleType
from typing import Iterator

import pytest
import torch

import fake_torch_npu as fake
from helpers import rel_err
from wanengine import kernels
from wanengine.errors import ConfigError
from wanengine.kernels import dispatch, reference

DIM, HEADS, HEAD_DIM = 5120, 40, 128
SCALE = HEAD_DIM ** -0.5
BACKEND_MODULE = "wanengine.kernels.npu_backend"
ATTN_TOL = {torch.float32: 1.5e-2, torch.bfloat16: 1e-2, torch.float16: 2e-3}
ROTARY_TOL = {torch.float32: 1e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
NORM_TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _load_backend(monkeypatch: pytest.MonkeyPatch, **env: str) -> ModuleType:
    """Import the npu backend afresh (its import-time choices read `env`) and select it."""
    for name in ("WANENGINE_NPU_ATTENTION", "WANENGINE_NPU_FP32_ATTENTION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    sys.modules.pop(BACKEND_MODULE, None)
    assert kernels.configure("npu") == "npu"
    module = sys.modules[BACKEND_MODULE]
    assert module.torch_npu is fake
    return module


@pytest.fixture
def npu(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The double installed as torch_npu, the npu backend selected; all undone afterwards."""
    saved = (dispatch._active, dispatch._active_name)
    fake.reset()
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    yield _load_backend(monkeypatch)
    dispatch._active, dispatch._active_name = saved
    sys.modules.pop(BACKEND_MODULE, None)  # its import bound the double; never leak it
    fake.reset()


def _qkv(batch: int, seq_q: int, seq_k: int, dtype: torch.dtype, head_dim: int = HEAD_DIM, heads: int = HEADS):
    return tuple(_randn(batch, s, heads, head_dim, seed=i).to(dtype) for i, s in ((1, seq_q), (2, seq_k), (3, seq_k)))


# ----------------------------------------------------------------------------- every op through torch_npu


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
def test_every_op_goes_through_torch_npu(npu: ModuleType, dtype: torch.dtype) -> None:
    batch, seq = 1, 257
    q, k, v = _qkv(batch, seq, seq, dtype)
    out = kernels.attention(q, k, v, scale=SCALE)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, reference.attention(q.float(), k.float(), v.float(), scale=SCALE)) <= ATTN_TOL[dtype]

    angles = torch.arange(seq, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(64) / 64)
    cos = angles.cos().repeat_interleave(2, -1).float()[None, :, None]
    sin = angles.sin().repeat_interleave(2, -1).float()[None, :, None]
    rot = kernels.rotary(q, cos, sin)
    assert rot.dtype == dtype and rel_err(rot, reference.rotary(q.float(), cos, sin)) <= ROTARY_TOL[dtype]

    x = (_randn(batch, seq, DIM, seed=4, scale=3.0) + 0.5).to(dtype)
    weight, bias = (1 + 0.2 * _randn(DIM, seed=5)).to(dtype), (0.1 * _randn(DIM, seed=6)).to(dtype)
    scale, shift = 0.3 * _randn(batch, 1, DIM, seed=7), 0.3 * _randn(batch, 1, DIM, seed=8)
    xf, wf, bf = x.float(), weight.float(), bias.float()
    for got, want in (
        (kernels.rms_norm(x, weight, 1e-6), reference.rms_norm(xf, wf, 1e-6)),
        (kernels.layer_norm(x, weight, bias, 1e-6), reference.layer_norm(xf, wf, bf, 1e-6)),
        (kernels.layer_norm(x, None, None, 1e-6), reference.layer_norm(xf, None, None, 1e-6)),
        (kernels.layer_norm_modulate(x, scale, shift, 1e-6), reference.layer_norm_modulate(xf, scale, shift, 1e-6)),
    ):
        assert got.dtype == dtype and got.shape == x.shape
        assert rel_err(got, want) <= NORM_TOL[dtype]

    assert fake.ops_called() == [
        "npu_fusion_attention", "npu_rotary_mul", "npu_rms_norm",
        "npu_layer_norm_eval", "npu_layer_norm_eval", "npu_layer_norm_eval",
    ]
    fa, rotary, rms, ln_affine, ln_plain, ln_mod = fake.calls
    half = dtype if dtype != torch.float32 else torch.bfloat16  # fp32 q/k/v -> bf16 by default
    assert fa.args["query"].dtype == half and fa.args["input_layout"] == "BSND"
    assert fa.args["head_num"] == HEADS and fa.args["keep_prob"] == 1.0 and fa.args["atten_mask"] is None
    assert "scale" in fa.explicit and fa.args["scale"] == pytest.approx(SCALE)
    assert rotary.args["rotary_mode"] == "interleave"
    assert rotary.args["r1"].shape == (1, seq, 1, HEAD_DIM) and rotary.args["r1"].dtype == dtype
    assert rms.args["gamma"].dtype == dtype and rms.args["epsilon"] == 1e-6
    for call in (ln_affine, ln_plain, ln_mod):
        assert call.args["normalized_shape"] == [DIM] and call.args["eps"] == 1e-6
    if dtype == torch.float32:  # affine fused into the op only where the reference is float32 throughout
        assert ln_affine.args["weight"] is not None
    assert torch.allclose(ln_mod.args["weight"], 1 + scale[0, 0]) and torch.equal(ln_mod.args["bias"], shift[0, 0])
    assert ln_mod.args["input"].dtype == torch.float32  # the reference modulates in float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_dtype_id)
def test_attention_key_lengths(npu: ModuleType, dtype: torch.dtype) -> None:
    # batch 1, shorter k_lens: keys sliced, no mask
    q, k, v = _qkv(1, 333, 333, dtype)
    lens = torch.tensor([301])
    out = kernels.attention(q, k, v, scale=SCALE, k_lens=lens)
    assert rel_err(out, reference.attention(q.float(), k.float(), v.float(), scale=SCALE, k_lens=lens)) <= ATTN_TOL[dtype]
    call = fake.calls[-1]
    assert call.args["key"].shape[1] == 301 and call.args["atten_mask"] is None

    # k_lens equal to the key length: no mask, nothing sliced
    kernels.attention(q, k, v, scale=SCALE, k_lens=torch.tensor([333]))
    assert fake.calls[-1].args["key"].shape[1] == 333 and fake.calls[-1].args["atten_mask"] is None

    # batch 2, ragged: the inverted bool mask [B, 1, Sq, Skv], True = masked out
    q, k, v = _qkv(2, 129, 129, dtype)
    lens = torch.tensor([129, 77])
    out = kernels.attention(q, k, v, scale=SCALE, k_lens=lens)
    assert rel_err(out, reference.attention(q.float(), k.float(), v.float(), scale=SCALE, k_lens=lens)) <= ATTN_TOL[dtype]
    mask = fake.calls[-1].args["atten_mask"]
    assert mask.dtype == torch.bool and mask.shape == (2, 1, 129, 129)
    assert not mask[0].any() and mask[1, :, :, 77:].all() and not mask[1, :, :, :77].any()

    # cross attention: 512 keys, batch 2
    q, k, v = _qkv(2, 200, 512, dtype)
    out = kernels.attention(q, k, v, scale=SCALE)
    assert rel_err(out, reference.attention(q.float(), k.float(), v.float(), scale=SCALE)) <= ATTN_TOL[dtype]


def test_float32_attention_with_a_newer_torch_npu(npu: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.SUPPORTS_FP32_ATTENTION = True
    module = _load_backend(monkeypatch, WANENGINE_NPU_FP32_ATTENTION="1")
    assert module.FUSION_ATTENTION_SUPPORTS_FP32
    q, k, v = _qkv(1, 65, 65, torch.float32)
    out = kernels.attention(q, k, v, scale=SCALE, k_lens=torch.tensor([50]))
    assert fake.calls[-1].args["query"].dtype == torch.float32
    assert rel_err(out, reference.attention(q, k, v, scale=SCALE, k_lens=torch.tensor([50]))) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=_dtype_id)
def test_fused_infer_attention_selected_by_env(npu: ModuleType, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    module = _load_backend(monkeypatch, WANENGINE_NPU_ATTENTION="fia")
    assert module.ATTENTION_OP == "fia"
    q, k, v = _qkv(2, 129, 129, dtype)
    lens = torch.tensor([129, 77])
    out = kernels.attention(q, k, v, scale=SCALE, k_lens=lens)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, reference.attention(q.float(), k.float(), v.float(), scale=SCALE, k_lens=lens)) <= ATTN_TOL[dtype]
    call = fake.calls[-1]
    assert call.op == "npu_fused_infer_attention_score" and call.args["input_layout"] == "BNSD"
    assert call.args["num_heads"] == HEADS and call.args["query"].shape == (2, HEADS, 129, HEAD_DIM)
    assert call.args["actual_seq_lengths_kv"] == [129, 77] and call.args["scale"] == pytest.approx(SCALE)


def test_unknown_attention_choice_is_a_config_error(npu: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="WANENGINE_NPU_ATTENTION"):
        _load_backend(monkeypatch, WANENGINE_NPU_ATTENTION="flash")


def test_head_dims_outside_the_op_contract(npu: ModuleType) -> None:
    # head dim 24 (not a multiple of 16): zero-padded to 32 for the op, exact after slicing
    q, k, v = _qkv(1, 40, 40, torch.bfloat16, head_dim=24, heads=2)
    out = kernels.attention(q, k, v, scale=24 ** -0.5, k_lens=torch.tensor([30]))
    assert out.shape == q.shape and fake.calls[-1].args["query"].shape[-1] == 32
    want = reference.attention(q.float(), k.float(), v.float(), scale=24 ** -0.5, k_lens=torch.tensor([30]))
    assert rel_err(out, want) <= ATTN_TOL[torch.bfloat16]
    # head dim 576 (> 512): reference math, the op is not called
    fake.calls.clear()
    q, k, v = _qkv(1, 8, 8, torch.bfloat16, head_dim=576, heads=1)
    out = kernels.attention(q, k, v, scale=0.05)
    assert fake.calls == [] and rel_err(out, reference.attention(q, k, v, scale=0.05)) == 0.0


@pytest.mark.parametrize("mod_shape,expected_calls,weighted", [
    ((2, 1, DIM), 2, True),  # per-sample rows: one fused call per sample
    ((DIM,), 1, True),  # shared by all samples: one fused call
    ((2, 77, DIM), 1, False),  # per-token: plain LN on the NPU, modulation in torch
])
def test_layer_norm_modulate_fusion_cases(npu: ModuleType, mod_shape, expected_calls: int, weighted: bool) -> None:
    x = _randn(2, 77, DIM, seed=9, scale=2.0)
    scale, shift = 0.3 * _randn(*mod_shape, seed=10), 0.3 * _randn(*mod_shape, seed=11)
    out = kernels.layer_norm_modulate(x, scale, shift, 1e-6)
    assert rel_err(out, reference.layer_norm_modulate(x, scale, shift, 1e-6)) <= 1e-5
    assert fake.ops_called() == ["npu_layer_norm_eval"] * expected_calls
    assert all((c.args["weight"] is not None) == weighted for c in fake.calls)


def test_rms_norm_with_float32_weight_on_bf16(npu: ModuleType) -> None:
    """gamma is cast to x's dtype for the op; the result keeps the reference's promoted dtype."""
    x = _randn(1, 33, DIM, seed=12).bfloat16()
    weight = 1 + 0.2 * _randn(DIM, seed=13)
    out = kernels.rms_norm(x, weight, 1e-6)
    want = reference.rms_norm(x, weight, 1e-6)
    assert out.dtype == want.dtype == torch.float32 and rel_err(out, want) <= NORM_TOL[torch.bfloat16]
    assert fake.calls[-1].args["gamma"].dtype == torch.bfloat16


@pytest.mark.parametrize("fp32_attention,tol", [(True, 1e-4), (False, 5e-3)], ids=["fp32-attention", "bf16-attention"])
def test_tiny_dit_forward_through_the_double(npu: ModuleType, monkeypatch: pytest.MonkeyPatch, golden,
                                             fp32_attention: bool, tol: float) -> None:
    """The golden tiny DiT expert, float32, end to end on the npu backend (padded sequence: k_lens).

    With a torch_npu that takes float32 q/k/v the golden bound (1e-4) holds; on an older one
    attention runs in bf16 (7.6e-4 observed through 2 blocks).
    """
    from safetensors.torch import load_file

    from wanengine.models.dit_loading import load_dit

    if fp32_attention:
        fake.SUPPORTS_FP32_ATTENTION = True
        _load_backend(monkeypatch, WANENGINE_NPU_FP32_ATTENTION="1")
    g = load_file(str(golden / "dit.safetensors"))
    model = load_dit(golden / "ckpt" / "low_noise_model", dtype=torch.float32)
    seq_len = int(g["grid"].prod()) + 16  # 16 padding tokens: attention gets k_lens < S
    with torch.no_grad():
        out = model(g["x"][None], g["t"], [g["context"]], g["y"][None], seq_len)
    assert rel_err(out[0], g["out_low"]) <= tol
    assert set(fake.ops_called()) == {"npu_fusion_attention", "npu_rotary_mul", "npu_rms_norm", "npu_layer_norm_eval"}


# ----------------------------------------------------------------------------- the double enforces the contracts


def _bsnd(dtype: torch.dtype = torch.bfloat16, heads: int = 2, head_dim: int = 64, seq: int = 8):
    return tuple(_randn(1, seq, heads, head_dim, seed=s).to(dtype) for s in (20, 21, 22))


def test_double_signatures_are_the_documented_ones() -> None:
    params = inspect.signature(fake.npu_fusion_attention).parameters
    assert list(params)[:5] == ["query", "key", "value", "head_num", "input_layout"]
    assert {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty} == {
        "pse": None, "padding_mask": None, "atten_mask": None, "scale": 1.0, "keep_prob": 1.0,
        "pre_tockens": 2147483647, "next_tockens": 2147483647, "inner_precise": 0, "prefix": None,
        "actual_seq_qlen": None, "actual_seq_kvlen": None, "sparse_mode": 0,
        "gen_mask_parallel": True, "sync": False,
    }
    assert str(inspect.signature(fake.npu_rotary_mul)) == "(input, r1, r2, rotary_mode='half')"
    assert str(inspect.signature(fake.npu_rms_norm)) == "(x, gamma, epsilon=1e-06)"
    assert str(inspect.signature(fake.npu_layer_norm_eval)) == "(input, normalized_shape, weight=None, bias=None, eps=1e-05)"


def test_double_returns_the_documented_tuples() -> None:
    q, k, v = _bsnd()
    result = fake.npu_fusion_attention(q, k, v, 2, "BSND", scale=0.125)
    assert isinstance(result, tuple) and len(result) == 7 and result[0].shape == q.shape
    out, lse = fake.npu_fused_infer_attention_score(
        *(t.transpose(1, 2) for t in (q, k, v)), num_heads=2, scale=0.125, input_layout="BNSD")
    assert torch.allclose(out.transpose(1, 2).float(), result[0].float(), atol=1e-2) and lse.shape == (1, 2, 8, 1)
    y, rstd = fake.npu_rms_norm(torch.randn(3, 16), torch.ones(16))
    assert y.shape == (3, 16) and rstd.shape == (3, 1)


def test_double_computes_with_true_meaning_masked_out() -> None:
    q, k, v = _bsnd(torch.float16)
    dropped = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    dropped[..., 5:] = True
    out = fake.npu_fusion_attention(q, k, v, 2, "BSND", atten_mask=dropped, scale=0.125)[0]
    want = reference.attention(q.float(), k.float(), v.float(), scale=0.125, k_lens=torch.tensor([5]))
    assert rel_err(out, want) <= 2e-3
    # The SDPA convention (True = attend) passed by mistake gives a visibly different answer.
    wrong = fake.npu_fusion_attention(q, k, v, 2, "BSND", atten_mask=~dropped, scale=0.125)[0]
    assert rel_err(wrong, want) > 0.1


@pytest.mark.parametrize("violation", [
    "float_mask", "mask_shape", "missing_scale", "bad_layout", "head_num_mismatch",
    "head_dim_not_multiple_of_16", "head_dim_over_512", "fp32_on_old_release", "mixed_dtypes", "dropout",
])
def test_double_rejects_fusion_attention_violations(violation: str) -> None:
    fake.reset()
    q, k, v = _bsnd()
    kwargs = dict(head_num=2, input_layout="BSND", scale=0.125)
    if violation == "float_mask":
        kwargs["atten_mask"] = torch.zeros(1, 1, 8, 8)
    elif violation == "mask_shape":
        kwargs["atten_mask"] = torch.zeros(1, 1, 1, 8, dtype=torch.bool)  # needs [.., Sq, Skv]
    elif violation == "missing_scale":
        del kwargs["scale"]
    elif violation == "bad_layout":
        kwargs["input_layout"] = "BNDS"
    elif violation == "head_num_mismatch":
        kwargs["head_num"] = 8
    elif violation == "head_dim_not_multiple_of_16":
        q, k, v = _bsnd(head_dim=24)
    elif violation == "head_dim_over_512":
        q, k, v = _bsnd(head_dim=528)
    elif violation == "fp32_on_old_release":
        q, k, v = _bsnd(torch.float32)
    elif violation == "mixed_dtypes":
        v = v.half()
    elif violation == "dropout":
        kwargs["keep_prob"] = 0.9
    with pytest.raises(AssertionError):
        fake.npu_fusion_attention(q, k, v, **kwargs)


def test_double_rejects_unknown_or_misspelled_arguments() -> None:
    q, k, v = _bsnd()
    with pytest.raises(TypeError):
        fake.npu_fusion_attention(q, k, v, head_num=2, layout="BSND", scale=0.125)
    with pytest.raises(TypeError):
        fake.npu_fusion_attention(q, k, v, head_num=2, input_layout="BSND", scale=0.125, pre_tokens=10)
    with pytest.raises(TypeError):  # fused_infer's options are keyword-only
        fake.npu_fused_infer_attention_score(q, k, v, None, num_heads=2, scale=0.125, input_layout="BSND")
    with pytest.raises(TypeError):
        fake.npu_rms_norm(torch.ones(4), torch.ones(4), eps=1e-6)


def test_double_rejects_fused_infer_violations() -> None:
    q, k, v = (t.transpose(1, 2) for t in _bsnd())  # BNSD
    with pytest.raises(AssertionError):  # scale left at its default
        fake.npu_fused_infer_attention_score(q, k, v, num_heads=2, input_layout="BNSD")
    with pytest.raises(AssertionError):  # num_heads does not match the layout
        fake.npu_fused_infer_attention_score(q, k, v, num_heads=4, scale=0.1, input_layout="BNSD")
    with pytest.raises(AssertionError):  # lengths must be a list of ints, one per sample
        fake.npu_fused_infer_attention_score(q, k, v, num_heads=2, scale=0.1, input_layout="BNSD",
                                             actual_seq_lengths_kv=torch.tensor([5]))
    with pytest.raises(AssertionError):  # length beyond the keys
        fake.npu_fused_infer_attention_score(q, k, v, num_heads=2, scale=0.1, input_layout="BNSD",
                                             actual_seq_lengths_kv=[9])


@pytest.mark.parametrize("violation", ["mode", "three_d", "table_dtype", "table_shape", "odd_dim", "dim_896"])
def test_double_rejects_rotary_violations(violation: str) -> None:
    x = torch.randn(1, 6, 2, 8)
    r1 = r2 = torch.randn(1, 6, 1, 8)
    mode = "interleave"
    if violation == "mode":
        mode = "pairs"
    elif violation == "three_d":
        x, r1, r2 = x[0], r1[0], r2[0]
    elif violation == "table_dtype":
        x = x.bfloat16()
    elif violation == "table_shape":
        r1 = r2 = torch.randn(2, 6, 1, 8)  # batch 2 tables for a batch-1 input
    elif violation == "odd_dim":
        x, r1 = torch.randn(1, 6, 2, 7), torch.randn(1, 6, 1, 7)
        r2 = r1
    elif violation == "dim_896":
        x, r1 = torch.randn(1, 2, 1, 896), torch.randn(1, 2, 1, 896)
        r2 = r1
    with pytest.raises(AssertionError):
        fake.npu_rotary_mul(x, r1, r2, rotary_mode=mode)


def test_double_rejects_norm_violations() -> None:
    x = torch.randn(2, 5, 16).bfloat16()
    with pytest.raises(AssertionError, match="gamma dtype"):
        fake.npu_rms_norm(x, torch.ones(16))
    with pytest.raises(AssertionError, match="gamma shape"):
        fake.npu_rms_norm(x, torch.ones(8, dtype=torch.bfloat16))
    with pytest.raises(AssertionError, match="normalized_shape"):
        fake.npu_layer_norm_eval(x, [8])
    with pytest.raises(AssertionError, match="weight dtype"):
        fake.npu_layer_norm_eval(x, [16], weight=torch.ones(16))
    with pytest.raises(AssertionError, match="bias shape"):
        fake.npu_layer_norm_eval(x, [16], bias=torch.zeros(1, 16, dtype=torch.bfloat16))
