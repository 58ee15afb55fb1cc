"""The 8-bit operators of the `torch_npu` double keep their documented contracts.

`npu_dynamic_quant` and `npu_quant_matmul` (spec npu-ops.md, "8-bit matmul"): the double
computes the documented math and rejects every call the real operators would reject, so
an 8-bit linear tested through it cannot rely on a call that fails on an Ascend device.
"""
from __future__ import annotations

import pytest
import torch

import fake_torch_npu as fake
from helpers import rel_err


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _int8(*shape: int, seed: int) -> torch.Tensor:
    return torch.randint(-127, 128, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


def test_dynamic_quant_is_per_token_symmetric() -> None:
    x = (_randn(3, 5, 64, seed=1) * 4).bfloat16()
    y, scale = fake.npu_dynamic_quant(x)
    assert y.dtype == torch.int8 and y.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (3, 5)
    assert torch.equal(scale, x.float().abs().amax(-1) / 127)
    assert y.abs().amax(-1).eq(127).all()  # each token's largest value maps to +-127
    assert rel_err(y.float() * scale[..., None], x.float()) <= 0.5 / 127 + 1e-6  # half a step at most


def test_quant_matmul_computes_the_dequantized_product() -> None:
    x = _randn(6, 96, seed=2).bfloat16()
    w = _randn(40, 96, seed=3)  # [N, K] weight
    w_scale = w.abs().amax(-1) / 127
    w_q = torch.round(w / w_scale[:, None]).to(torch.int8)
    bias = _randn(40, seed=4).bfloat16()
    x_q, x_scale = fake.npu_dynamic_quant(x)
    out = fake.npu_quant_matmul(x_q, w_q.t(), w_scale, pertoken_scale=x_scale, bias=bias, output_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == (6, 40)
    want = (x_q.double() * x_scale.double()[:, None]) @ (w_q.double() * w_scale.double()[:, None]).t() + bias.double()
    assert rel_err(out, want) <= 2 ** -8  # one bf16 rounding of the exact result


def test_quant_matmul_without_output_dtype_returns_int8() -> None:
    out = fake.npu_quant_matmul(_int8(4, 32, seed=5), _int8(32, 8, seed=6), torch.full((1,), 1e-3))
    assert out.dtype == torch.int8 and out.shape == (4, 8)


def test_quant_matmul_int32_bias_joins_the_accumulator() -> None:
    x1, x2 = _int8(2, 16, seed=7), _int8(16, 3, seed=8)
    bias = torch.tensor([100, -50, 7], dtype=torch.int32)
    scale = torch.full((3,), 0.5)
    out = fake.npu_quant_matmul(x1, x2, scale, bias=bias, output_dtype=torch.bfloat16)
    want = ((x1.double() @ x2.double()) + bias.double()) * 0.5
    assert torch.equal(out, want.bfloat16())


DQ_VIOLATIONS = {
    "float32_input": lambda: fake.npu_dynamic_quant(_randn(2, 8, seed=0)),
    "one_d_input": lambda: fake.npu_dynamic_quant(_randn(8, seed=0).bfloat16()),
    "int4_dst": lambda: fake.npu_dynamic_quant(_randn(2, 8, seed=0).bfloat16(), dst_type=torch.quint4x2),
    "smooth_scales_shape": lambda: fake.npu_dynamic_quant(_randn(2, 8, seed=0).bfloat16(),
                                                          smooth_scales=torch.ones(4, dtype=torch.bfloat16)),
}


@pytest.mark.parametrize("violation", list(DQ_VIOLATIONS))
def test_dynamic_quant_rejects(violation: str) -> None:
    with pytest.raises(AssertionError):
        DQ_VIOLATIONS[violation]()


def test_dynamic_quant_options_are_keyword_only() -> None:
    x = _randn(2, 8, seed=0).bfloat16()
    with pytest.raises(TypeError):
        fake.npu_dynamic_quant(x, torch.ones(8, dtype=torch.bfloat16))
    with pytest.raises(TypeError):
        fake.npu_dynamic_quant(x, smooth_scale=torch.ones(8, dtype=torch.bfloat16))


def _qmm(**overrides):
    """A valid bf16-output call of `npu_quant_matmul` with one argument replaced."""
    m, k, n = 4, 32, 8
    args = dict(x1=_int8(m, k, seed=1), x2=_int8(k, n, seed=2), scale=torch.full((n,), 1e-2),
                pertoken_scale=torch.full((m,), 1e-2), bias=torch.zeros(n, dtype=torch.bfloat16),
                output_dtype=torch.bfloat16)
    args.update(overrides)
    x1, x2, scale = args.pop("x1"), args.pop("x2"), args.pop("scale")
    return fake.npu_quant_matmul(x1, x2, scale, **args)


QMM_VIOLATIONS = {
    "x1_bf16": dict(x1=_randn(4, 32, seed=0).bfloat16()),
    "x2_float": dict(x2=_randn(32, 8, seed=0)),
    "x1_three_d": dict(x1=_int8(1, 4, 32, seed=0)),
    "k_mismatch": dict(x2=_int8(16, 8, seed=0)),
    "weight_not_transposed": dict(x2=_int8(8, 32, seed=0)),
    "scale_2d": dict(scale=torch.full((1, 8), 1e-2)),
    "scale_wrong_length": dict(scale=torch.full((4,), 1e-2)),
    "scale_float16": dict(scale=torch.full((8,), 1e-2, dtype=torch.float16)),
    "bf16_scale_fp16_out": dict(scale=torch.full((8,), 1e-2, dtype=torch.bfloat16), output_dtype=torch.float16,
                                bias=None),
    "pertoken_bf16": dict(pertoken_scale=torch.full((4,), 1e-2, dtype=torch.bfloat16)),
    "pertoken_2d": dict(pertoken_scale=torch.full((4, 1), 1e-2)),
    "pertoken_with_int8_output": dict(output_dtype=None),
    "bias_shape": dict(bias=torch.zeros(1, 8, dtype=torch.bfloat16)),
    "bias_float16": dict(bias=torch.zeros(8, dtype=torch.float16)),
    "float32_output": dict(output_dtype=torch.float32),
    "n_over_65535": dict(x2=torch.zeros(32, 65536, dtype=torch.int8), scale=torch.full((1,), 1e-2), bias=None),
}


@pytest.mark.parametrize("violation", list(QMM_VIOLATIONS))
def test_quant_matmul_rejects(violation: str) -> None:
    with pytest.raises(AssertionError):
        _qmm(**QMM_VIOLATIONS[violation])


def test_quant_matmul_valid_call_passes() -> None:
    """The baseline of the violation table is itself a valid call (so each row tests one rule)."""
    assert _qmm().shape == (4, 8)


def test_quant_matmul_options_are_keyword_only() -> None:
    x1, x2, scale = _int8(4, 32, seed=1), _int8(32, 8, seed=2), torch.full((8,), 1e-2)
    with pytest.raises(TypeError):
        fake.npu_quant_matmul(x1, x2, scale, None, torch.full((4,), 1e-2))
    with pytest.raises(TypeError):
        fake.npu_quant_matmul(x1, x2, scale, out_dtype=torch.bfloat16)
