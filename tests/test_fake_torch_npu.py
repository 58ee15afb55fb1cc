"""The `torch_npu` double enforces every contract of spec/npu-ops.md ("Testing without an NPU").

Each operator gets a valid baseline call and a table of calls that each break one rule; every
one of them must fail (TypeError for a signature the registered schema rejects,
`ContractViolation` for a documented rule). The double's math is checked against the
reference where the rule is about semantics (mask polarity, full attention without a mask,
the band with one, lse). The 8-bit operators are in tests/test_fake_torch_npu_quant.py.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict

import pytest
import torch

import fake_torch_npu as fake
from helpers import rel_err
from wanengine.kernels import reference


@pytest.fixture(autouse=True)
def fresh_double():
    """A fresh process's state with the compile mode set as the engine sets it (interleave needs it)."""
    fake.reset()
    fake.npu.set_compile_mode(jit_compile=False)
    yield
    fake.reset()


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _bsnd(dtype: torch.dtype = torch.bfloat16, batch: int = 1, seq: int = 8, heads: int = 2, head_dim: int = 64):
    return tuple(_randn(batch, seq, heads, head_dim, seed=s).to(dtype) for s in (20, 21, 22))


# ----------------------------------------------------------------------------- signatures


def test_signatures_are_the_registered_schemas() -> None:
    fa = inspect.signature(fake.npu_fusion_attention).parameters
    assert list(fa)[:5] == ["query", "key", "value", "head_num", "input_layout"]
    assert {n: p.default for n, p in fa.items() if p.default is not inspect.Parameter.empty} == {
        "pse": None, "padding_mask": None, "atten_mask": None, "scale": 1.0, "keep_prob": 1.0,
        "pre_tockens": 2147483647, "next_tockens": 2147483647, "inner_precise": 0, "prefix": None,
        "actual_seq_qlen": None, "actual_seq_kvlen": None, "sparse_mode": 0,
        "gen_mask_parallel": True, "sync": False,
    }
    fia = inspect.signature(fake.npu_fused_infer_attention_score).parameters
    assert [n for n, p in fia.items() if p.kind is not inspect.Parameter.KEYWORD_ONLY] == ["query", "key", "value"]
    assert {n: fia[n].default for n in ("num_heads", "scale", "pre_tokens", "next_tokens", "input_layout",
                                        "num_key_value_heads", "sparse_mode", "softmax_lse_flag")} == {
        "num_heads": 1, "scale": 1.0, "pre_tokens": 2147483647, "next_tokens": 2147483647, "input_layout": "BSH",
        "num_key_value_heads": 0, "sparse_mode": 0, "softmax_lse_flag": False,
    }
    assert str(inspect.signature(fake.npu_rotary_mul)) == "(input, r1, r2, rotary_mode='half')"
    assert str(inspect.signature(fake.npu_rms_norm)) == "(input, gamma, epsilon=1e-06)"
    assert str(inspect.signature(fake.npu_layer_norm_eval)) == "(input, normalized_shape, weight=None, bias=None, eps=1e-05)"


SIGNATURE_VIOLATIONS: Dict[str, Callable[[], Any]] = {
    "fa layout misspelled": lambda: fake.npu_fusion_attention(*_bsnd(), head_num=2, layout="BSND", scale=0.1),
    "fa pre_tokens (FA spells it pre_tockens)": lambda: fake.npu_fusion_attention(
        *_bsnd(), head_num=2, input_layout="BSND", scale=0.1, pre_tokens=10),
    "fia option by position": lambda: fake.npu_fused_infer_attention_score(
        *_bsnd(), None, num_heads=2, scale=0.1, input_layout="BSND"),
    "fia pre_tockens (FIA spells it pre_tokens)": lambda: fake.npu_fused_infer_attention_score(
        *_bsnd(), num_heads=2, scale=0.1, input_layout="BSND", pre_tockens=10),
    "rms_norm x= (registered name is input)": lambda: fake.npu_rms_norm(x=torch.ones(2, 4), gamma=torch.ones(4)),
    "rms_norm eps= (registered name is epsilon)": lambda: fake.npu_rms_norm(torch.ones(2, 4), torch.ones(4), eps=1e-6),
    "rotary x= (registered name is input)": lambda: fake.npu_rotary_mul(x=torch.ones(1, 2, 1, 4), r1=torch.ones(1, 2, 1, 4),
                                                                        r2=torch.ones(1, 2, 1, 4)),
    "layer_norm_eval epsilon=": lambda: fake.npu_layer_norm_eval(torch.ones(2, 4), [4], epsilon=1e-5),
}


@pytest.mark.parametrize("case", list(SIGNATURE_VIOLATIONS))
def test_calls_the_registered_schema_rejects_are_type_errors(case: str) -> None:
    with pytest.raises(TypeError):
        SIGNATURE_VIOLATIONS[case]()


# ----------------------------------------------------------------------------- npu_fusion_attention


def _fa(**changes):
    """A valid FA call (bf16 BSND, 2 heads of 64, 8 tokens) with `changes` applied."""
    q, k, v = _bsnd()
    args: Dict[str, Any] = dict(query=q, key=k, value=v, head_num=2, input_layout="BSND", scale=0.125)
    args.update(changes)
    return fake.npu_fusion_attention(**args)


FA_VIOLATIONS: Dict[str, Dict[str, Any]] = {
    "int8 q/k/v": dict(zip(("query", "key", "value"), (t.to(torch.int8) for t in _bsnd()))),
    "mixed dtypes": dict(value=_bsnd()[2].half()),
    "unknown layout": dict(input_layout="BNDS"),
    "head_num not the query's": dict(head_num=4),
    "head_num over 256": dict(zip(("query", "key", "value", "head_num"), (*_bsnd(heads=257, head_dim=8, seq=2), 257))),
    "head dim over 768": dict(zip(("query", "key", "value"), _bsnd(head_dim=776, seq=2))),
    "Dk differs from Dq": dict(key=_bsnd(head_dim=32)[1]),
    "Dv above Dq": dict(value=_bsnd(head_dim=80)[2]),
    "float mask": dict(atten_mask=torch.zeros(1, 1, 8, 8)),
    "mask without the query axis": dict(atten_mask=torch.zeros(1, 1, 1, 8, dtype=torch.bool)),
    "mask of 3 dims": dict(atten_mask=torch.zeros(1, 8, 8, dtype=torch.bool)),
    "scale left at 1.0 (usage guard)": dict(scale=None),
    "scale as a tensor": dict(scale=torch.tensor(0.125)),
    "dropout": dict(keep_prob=0.9),
    "actual_seq_qlen alone (silently ignored on a device)": dict(actual_seq_qlen=[8]),
    "actual_seq_kvlen alone (silently ignored on a device)": dict(actual_seq_kvlen=[8]),
    "varlen lengths with a non-TND layout": dict(actual_seq_qlen=[8], actual_seq_kvlen=[8]),
    "sparse mode other than 0 with a mask": dict(atten_mask=torch.zeros(8, 8, dtype=torch.bool), sparse_mode=2),
}


@pytest.mark.parametrize("case", list(FA_VIOLATIONS))
def test_fusion_attention_rejects(case: str) -> None:
    changes = dict(FA_VIOLATIONS[case])
    if changes.get("scale", 0) is None:  # "left at its default": not passed at all
        q, k, v = _bsnd()
        with pytest.raises(fake.ContractViolation):
            fake.npu_fusion_attention(q, k, v, 2, "BSND")
        return
    with pytest.raises(fake.ContractViolation):
        _fa(**changes)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_fusion_attention_valid_calls(dtype: torch.dtype) -> None:
    """The baseline of the table (each row breaks one rule of a valid call), float32 included,
    every documented mask shape (bool and uint8) and head dims without alignment."""
    q, k, v = _bsnd(dtype)
    result = _fa(query=q, key=k, value=v)
    assert isinstance(result, tuple) and len(result) == 7 and result[0].shape == q.shape and result[0].dtype == dtype
    for shape in ((1, 2, 8, 8), (1, 1, 8, 8), (8, 8)):
        for mask_dtype in (torch.bool, torch.uint8):
            _fa(query=q, key=k, value=v, atten_mask=torch.zeros(shape, dtype=mask_dtype))
    q, k, v = _bsnd(dtype, head_dim=24)
    assert _fa(query=q, key=k, value=v)[0].shape == q.shape  # 24: not a multiple of 16, fine for FA
    q, k, v = _bsnd(dtype, head_dim=32)
    assert _fa(query=q, key=k, value=v[..., :16])[0].shape == (1, 8, 2, 16)  # Dv < Dq


def test_fusion_attention_mask_true_means_masked_out() -> None:
    q, k, v = _bsnd(torch.float16)
    dropped = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    dropped[..., 5:] = True
    out = _fa(query=q, key=k, value=v, atten_mask=dropped)[0]
    want = reference.attention(q.float(), k.float(), v.float(), scale=0.125, k_lens=torch.tensor([5]))
    assert rel_err(out, want) <= 2e-3
    wrong = _fa(query=q, key=k, value=v, atten_mask=~dropped)[0]  # SDPA's convention passed by mistake
    assert rel_err(wrong, want) > 0.1


def test_fusion_attention_without_a_mask_is_full_whatever_the_band_says() -> None:
    q, k, v = _bsnd(torch.float32)
    full = reference.attention(q, k, v, scale=0.125)
    out = _fa(query=q, key=k, value=v, pre_tockens=0, next_tockens=0)[0]
    assert rel_err(out, full) <= 1e-6
    banded = _fa(query=q, key=k, value=v, pre_tockens=0, next_tockens=0, atten_mask=torch.zeros(8, 8, dtype=torch.bool))[0]
    assert rel_err(banded, v) <= 1e-6  # with a mask, a zero band leaves each query its own key


def test_fusion_attention_varlen_tnd() -> None:
    q, k, v = (_randn(12, 2, 16, seed=s) for s in (1, 2, 3))  # [T, N, D], samples of 5 and 7 tokens
    out = fake.npu_fusion_attention(q, k, v, 2, "TND", scale=0.25, actual_seq_qlen=[5, 12], actual_seq_kvlen=[5, 12])[0]
    first = reference.attention(q[None, :5], k[None, :5], v[None, :5], scale=0.25)[0]
    assert rel_err(out[:5], first) <= 1e-6
    with pytest.raises(fake.ContractViolation):  # not cumulative
        fake.npu_fusion_attention(q, k, v, 2, "TND", scale=0.25, actual_seq_qlen=[5, 7], actual_seq_kvlen=[5, 7])
    with pytest.raises(fake.ContractViolation):  # TND needs both
        fake.npu_fusion_attention(q, k, v, 2, "TND", scale=0.25)


# ----------------------------------------------------------------------------- npu_fused_infer_attention_score


def _fia(**changes):
    """A valid FIA call (bf16 BSND, 2 heads of 64, 8 tokens) with `changes` applied."""
    q, k, v = _bsnd()
    args: Dict[str, Any] = dict(query=q, key=k, value=v, num_heads=2, scale=0.125, input_layout="BSND")
    args.update(changes)
    query, key, value = args.pop("query"), args.pop("key"), args.pop("value")
    return fake.npu_fused_infer_attention_score(query, key, value, **args)


FIA_VIOLATIONS: Dict[str, Dict[str, Any]] = {
    "float32 q/k/v": dict(zip(("query", "key", "value"), _bsnd(torch.float32))),
    "int8 (quantized) q": dict(query=_bsnd()[0].to(torch.int8)),
    "mixed dtypes": dict(value=_bsnd()[2].half()),
    "non-contiguous query": dict(query=_bsnd(heads=4)[0][:, :, ::2]),
    "non-contiguous mask": dict(atten_mask=torch.zeros(8, 16, dtype=torch.bool)[:, ::2]),
    "layout SBH (FA only)": dict(input_layout="SBH"),
    "head dim not a multiple of 16": dict(zip(("query", "key", "value"), _bsnd(head_dim=24))),
    "head dim over 512": dict(zip(("query", "key", "value"), _bsnd(head_dim=528, seq=2))),
    "num_heads not the query's": dict(num_heads=4),
    "num_key_value_heads not the key's": dict(num_key_value_heads=1),
    "mask BNSS (not documented for FIA)": dict(atten_mask=torch.zeros(1, 2, 8, 8, dtype=torch.bool)),
    "float mask": dict(atten_mask=torch.zeros(8, 8)),
    "lengths as a tensor": dict(actual_seq_lengths_kv=torch.tensor([5])),
    "lengths beyond the keys": dict(actual_seq_lengths_kv=[9]),
    "lengths for fewer samples than the batch": dict(zip(("query", "key", "value", "actual_seq_lengths_kv"),
                                                         (*_bsnd(batch=3), [8, 8]))),
    "paged attention arguments": dict(block_table=torch.zeros(1, 1, dtype=torch.int32)),
    "scale left at 1.0 (usage guard)": dict(scale=None),
}


@pytest.mark.parametrize("case", list(FIA_VIOLATIONS))
def test_fused_infer_attention_rejects(case: str) -> None:
    changes = dict(FIA_VIOLATIONS[case])
    if changes.get("scale", 0) is None:
        q, k, v = _bsnd()
        with pytest.raises(fake.ContractViolation):
            fake.npu_fused_infer_attention_score(q, k, v, num_heads=2, input_layout="BSND")
        return
    with pytest.raises(fake.ContractViolation):
        _fia(**changes)


def test_fused_infer_attention_valid_calls_and_lse() -> None:
    out, lse = _fia()
    assert out.shape == (1, 8, 2, 64) and out.dtype == torch.bfloat16
    assert lse.shape == (1,) and lse.dtype == torch.float32 and not lse.any()  # zeros(1) without the flag
    _, lse = _fia(softmax_lse_flag=True)
    assert lse.shape == (1, 2, 8, 1) and lse.dtype == torch.float32 and lse.abs().sum() > 0
    for shape in ((8, 8), (1, 8, 8), (1, 1, 8, 8)):
        for mask_dtype in (torch.bool, torch.int8, torch.uint8):
            _fia(atten_mask=torch.zeros(shape, dtype=mask_dtype))
    q, k, v = (t.transpose(1, 2).contiguous() for t in _bsnd())  # BNSD in, BSND out
    out, _ = _fia(query=q, key=k, value=v, input_layout="BNSD_BSND")
    assert out.shape == (1, 8, 2, 64)


def test_fused_infer_attention_lengths_and_full_attention() -> None:
    q, k, v = _bsnd(torch.float16)
    qf, kf, vf = (t.float() for t in (q, k, v))
    out, _ = _fia(query=q, key=k, value=v, actual_seq_lengths_kv=[5])
    assert rel_err(out, reference.attention(qf, kf, vf, scale=0.125, k_lens=torch.tensor([5]))) <= 2e-3
    full, _ = _fia(query=q, key=k, value=v, pre_tokens=0, next_tokens=0)  # no mask: the band is ignored
    assert rel_err(full, reference.attention(qf, kf, vf, scale=0.125)) <= 2e-3
    banded, _ = _fia(query=q, key=k, value=v, pre_tokens=0, next_tokens=0, atten_mask=torch.zeros(8, 8, dtype=torch.bool))
    assert rel_err(banded, vf) <= 2e-3


# ----------------------------------------------------------------------------- npu_rotary_mul


def _rotary(x_shape=(2, 6, 3, 8), table_shape=(1, 6, 1, 8), mode="interleave", **changes):
    args: Dict[str, Any] = dict(input=_randn(*x_shape, seed=1), r1=_randn(*table_shape, seed=2).clamp(-1, 1),
                                r2=_randn(*table_shape, seed=3).clamp(-1, 1), rotary_mode=mode)
    args.update(changes)
    return fake.npu_rotary_mul(**args)


ROTARY_VIOLATIONS: Dict[str, Dict[str, Any]] = {
    "unknown mode": dict(mode="pairs"),
    "3-D input": dict(x_shape=(6, 3, 8), table_shape=(6, 1, 8)),
    "odd head dim": dict(x_shape=(2, 6, 3, 7), table_shape=(1, 6, 1, 7)),
    "head dim 896": dict(x_shape=(1, 2, 1, 896), table_shape=(1, 2, 1, 896)),
    "int dtype": dict(input=torch.ones(2, 6, 3, 8, dtype=torch.int32)),
    "r1/r2 shapes differ": dict(r2=torch.zeros(1, 6, 1, 8).expand(2, 6, 1, 8)),
    "interleave with a BS1D table": dict(table_shape=(2, 6, 1, 8)),
    "interleave with a BSND table": dict(table_shape=(2, 6, 3, 8)),
    "undocumented table (half)": dict(mode="half", table_shape=(1, 6, 3, 8)),
    "interleave B * N = 1000": dict(x_shape=(25, 1, 40, 8), table_shape=(1, 1, 1, 8)),
    "half N = 1000": dict(mode="half", x_shape=(1, 1, 1000, 2), table_shape=(1, 1, 1, 2)),
    "table values beyond [-1, 1]": dict(r1=torch.full((1, 6, 1, 8), 1.5)),
}


@pytest.mark.parametrize("case", list(ROTARY_VIOLATIONS))
def test_rotary_rejects(case: str) -> None:
    with pytest.raises(fake.ContractViolation):
        _rotary(**ROTARY_VIOLATIONS[case])


def test_rotary_interleave_needs_the_compile_mode() -> None:
    fake.reset()  # a process that never called set_compile_mode(jit_compile=False)
    with pytest.raises(fake.ContractViolation, match="aclop only support rotary_mode with half"):
        _rotary()
    fake.npu.set_compile_mode(jit_compile=True)
    with pytest.raises(fake.ContractViolation):
        _rotary()
    _rotary(mode="half")  # half mode does not need it
    fake.npu.set_compile_mode(jit_compile=False)
    _rotary()


def test_rotary_valid_calls_and_math() -> None:
    x = _randn(2, 6, 3, 8, seed=1)
    angles = _randn(1, 6, 1, 4, seed=4)
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    assert torch.equal(fake.npu_rotary_mul(x, cos, sin, rotary_mode="interleave"), reference.rotary(x, cos, sin))
    half = fake.npu_rotary_mul(x, cos, sin)  # "half" pairs channel k with k + D/2, not 2k with 2k+1
    assert not torch.allclose(half, reference.rotary(x, cos, sin))
    out = fake.npu_rotary_mul(x.bfloat16(), cos, sin, rotary_mode="interleave")  # tables cast to the input's dtype
    assert out.dtype == torch.bfloat16
    for table in ((2, 6, 1, 8), (2, 6, 3, 8)):  # BS1D, BSND: half mode only
        _rotary(mode="half", table_shape=table)
    _rotary(x_shape=(2, 3, 6, 8), table_shape=(1, 1, 6, 8))  # BNSD input, 11SD table
    _rotary(x_shape=(24, 1, 41, 8), table_shape=(1, 1, 1, 8))  # B * N = 984


# ----------------------------------------------------------------------------- norms

NORM_VIOLATIONS: Dict[str, Callable[[], Any]] = {
    "rms gamma of another dtype": lambda: fake.npu_rms_norm(torch.ones(2, 16).bfloat16(), torch.ones(16)),
    "rms gamma of another shape": lambda: fake.npu_rms_norm(torch.ones(2, 16), torch.ones(8)),
    "rms 1-D input": lambda: fake.npu_rms_norm(torch.ones(16), torch.ones(16)),
    "rms 9-D input": lambda: fake.npu_rms_norm(torch.ones((1,) * 8 + (4,)), torch.ones(4)),
    "rms int input": lambda: fake.npu_rms_norm(torch.ones(2, 4, dtype=torch.int32), torch.ones(4, dtype=torch.int32)),
    "ln normalized_shape not trailing": lambda: fake.npu_layer_norm_eval(torch.ones(2, 16), [8]),
    "ln weight of another shape (silently truncated on a device)": lambda: fake.npu_layer_norm_eval(
        torch.ones(2, 16), [16], weight=torch.ones(32)),
    "ln bias [1, D]": lambda: fake.npu_layer_norm_eval(torch.ones(2, 16), [16], bias=torch.zeros(1, 16)),
    "ln weight of another dtype": lambda: fake.npu_layer_norm_eval(torch.ones(2, 16), [16], weight=torch.ones(16).half()),
    "ln normalized_shape as a tensor": lambda: fake.npu_layer_norm_eval(torch.ones(2, 16), torch.tensor([16])),
}


@pytest.mark.parametrize("case", list(NORM_VIOLATIONS))
def test_norms_reject(case: str) -> None:
    with pytest.raises(fake.ContractViolation):
        NORM_VIOLATIONS[case]()


def test_norm_valid_calls() -> None:
    x = _randn(2, 5, 16, seed=5)
    y, rstd = fake.npu_rms_norm(x, torch.ones(16))
    assert torch.allclose(y, reference.rms_norm(x, torch.ones(16), 1e-6)) and rstd.shape == (2, 5, 1)
    assert rstd.dtype == torch.float32
    out = fake.npu_layer_norm_eval(x, [16], weight=torch.ones(16), bias=torch.zeros(16), eps=1e-6)
    assert torch.allclose(out, reference.layer_norm(x, None, None, 1e-6), atol=1e-6)


# ----------------------------------------------------------------------------- runtime settings


def test_runtime_settings_are_recorded_and_write_only() -> None:
    fake.reset()
    assert fake.runtime.jit_compile is None and fake.runtime.allow_internal_format is None
    fake.npu.set_compile_mode(jit_compile=False)
    fake.npu.config.allow_internal_format = False
    assert fake.runtime == fake.RuntimeSettings(jit_compile=False, allow_internal_format=False, compile_mode_calls=1)
    with pytest.raises(AttributeError):
        _ = fake.npu.config.allow_internal_format  # write-only, as on the device
    with pytest.raises(fake.ContractViolation):
        fake.npu.config.allow_internal_format = "no"
