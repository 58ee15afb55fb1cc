"""`kernels.linear8` on every backend (spec `formats.md` 3, `npu-ops.md` "8-bit matmul").

- reference: dequantize just before the matmul -- in float32 exactly the layer with the
  dequantized weight stored in full precision (compared bitwise).
- cuda: fp8 weights as `torch._scaled_mm` with per-token activation scales. The GEMM path is
  exercised on the CPU (torch's CPU `_scaled_mm`) by opening its device gate to "cpu"; on a
  real GPU (compute capability >= 8.9) the same check runs on the device, otherwise it is
  skipped with the reason. int8 weights and misaligned shapes dequantize (exact).
- npu: int8 as `npu_dynamic_quant` + `npu_quant_matmul(output_dtype=bf16)` through the
  contract-enforcing `torch_npu` double; fp8 dequantizes (A2 has no fp8 matmul).

Bounds of the 8-bit-activation paths vs. dequantize + matmul in float32 (rel_err, seen in
brackets, K = 5120): fp8 activations (3 mantissa bits) 3e-2 [~1.2e-2]; int8 per-token
activations 1.5e-2 [~5e-3] (bf16 output rounding included).
"""
from __future__ import annotations

import sys
from types import ModuleType
from typing import Iterator

import pytest
import torch
import torch.nn.functional as F

import fake_torch_npu as fake
from helpers import rel_err
from wanengine import kernels
from wanengine.kernels import cuda, dispatch, reference
from wanengine.quant import dequantize, quantize_rows

FP8 = torch.float8_e4m3fn
K, N, M = 5120, 256, 24  # the real model width as K, a few tokens


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _layer(qdtype: torch.dtype, k: int = K, n: int = N):
    weight = _randn(n, k, seed=1) * 0.02
    q, scale = quantize_rows(weight, qdtype)
    return q, scale, _randn(n, seed=2) * 0.1


def _dequantized_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), dequantize(q, scale), bias.float())


@pytest.mark.parametrize("qdtype", [torch.int8, FP8], ids=["int8", "fp8"])
def test_reference_is_the_dequantized_layer_exactly(qdtype: torch.dtype) -> None:
    q, scale, bias = _layer(qdtype)
    x = _randn(2, M, K, seed=3)
    assert torch.equal(reference.linear8(x, q, scale, bias), F.linear(x, q.float() * scale, bias))


def test_per_token_fp8_against_a_hand_written_reference() -> None:
    x = _randn(7, 96, seed=4) * 3
    x[2] = 0  # an all-zero token: scale 1, q 0
    q, scale = cuda.per_token_fp8(x)
    for row in range(x.shape[0]):
        absmax = max(abs(v) for v in x[row].tolist())
        expected_scale = absmax / 448 if absmax > 0 else 1.0
        assert scale[row, 0].item() == pytest.approx(expected_scale, rel=1e-7)
        expected = torch.tensor([v / scale[row, 0].item() for v in x[row].tolist()]).to(FP8)
        assert torch.equal(q[row].float(), expected.float()), row
    assert scale.shape == (7, 1) and q.dtype == FP8 and q.float().abs().amax(1)[0] == 448


@pytest.fixture
def fp8_gemm_on_cpu(monkeypatch: pytest.MonkeyPatch):
    """Open the cuda backend's fp8 GEMM gate to CPU tensors (torch's CPU `_scaled_mm`)."""
    if not cuda.HAS_SCALED_MM:
        pytest.skip("this torch has no torch._scaled_mm / float8_e4m3fn")
    monkeypatch.setattr(cuda, "_FP8_MM_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(cuda, "_fp8_modes", {})
    return monkeypatch


@pytest.mark.parametrize("mode", ["rowwise", "tensorwise"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_cuda_fp8_gemm_matches_dequantize_then_matmul(fp8_gemm_on_cpu, mode: str, dtype: torch.dtype) -> None:
    fp8_gemm_on_cpu.setattr(cuda, "_fp8_mode", lambda device: mode)
    calls = []
    real = torch._scaled_mm
    fp8_gemm_on_cpu.setattr(torch, "_scaled_mm", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    q, scale, bias = _layer(FP8)
    x = _randn(2, M, K, seed=5).to(dtype)
    out = cuda.linear8(x, q, scale, bias)
    assert len(calls) == 1 and out.dtype == dtype and out.shape == (2, M, N)
    if mode == "rowwise" and dtype == torch.bfloat16:  # scales in the GEMM epilogue
        assert calls[0]["scale_a"].shape == (2 * M, 1) and calls[0]["scale_b"].shape == (1, N)
    assert rel_err(out, _dequantized_linear(x, q, scale, bias)) <= 3e-2


def test_cuda_backend_dequantizes_int8_and_misaligned_fp8_exactly(fp8_gemm_on_cpu) -> None:
    for qdtype, k in ((torch.int8, K), (FP8, K - 8)):  # int8: no fp8 GEMM; K % 16 != 0: _scaled_mm refuses
        q, scale, bias = _layer(qdtype, k=k)
        x = _randn(M, k, seed=6)
        assert torch.equal(cuda.linear8(x, q, scale, bias), reference.linear8(x, q, scale, bias))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (the fp8 GEMM needs compute capability >= 8.9)")
def test_cuda_fp8_gemm_on_the_device() -> None:
    device = torch.device("cuda")
    if torch.cuda.get_device_capability(device) < (8, 9):
        pytest.skip(f"compute capability {torch.cuda.get_device_capability(device)} < 8.9: no fp8 tensor cores")
    cuda._fp8_modes.clear()
    q, scale, bias = (t.to(device) for t in _layer(FP8))
    x = _randn(2, M, K, seed=7).to(device, torch.bfloat16)
    out = cuda.linear8(x, q, scale, bias)
    assert cuda._fp8_mode(device) is not None
    assert rel_err(out.float(), _dequantized_linear(x, q, scale, bias)) <= 3e-2


# --------------------------------------------------------------------------- npu, through the double
BACKEND_MODULE = "wanengine.kernels.npu_backend"


@pytest.fixture
def npu(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The double installed as torch_npu, the npu backend selected; all undone afterwards."""
    from wanengine import device as device_module

    fake.reset()
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    monkeypatch.setattr(device_module, "_ascend_runtime_configured", False)
    monkeypatch.setattr(dispatch, "_default", dispatch._default)  # restored at teardown
    sys.modules.pop(BACKEND_MODULE, None)
    assert kernels.configure("npu") == "npu"
    module = sys.modules[BACKEND_MODULE]
    assert module.torch_npu is fake
    yield module
    sys.modules.pop(BACKEND_MODULE, None)  # its import bound the double; never leak it
    fake.reset()


def _operator_calls():
    """Recorded operator calls, without the runtime settings made when the backend is selected."""
    return [c for c in fake.calls if c.op.startswith("npu_")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_npu_int8_is_w8a8_through_the_documented_operators(npu: ModuleType, dtype: torch.dtype) -> None:
    q, scale, bias = _layer(torch.int8)
    x = _randn(2, M, K, seed=8).to(dtype)
    out = kernels.linear8(x, q, scale, bias.to(dtype))
    assert [c.op for c in _operator_calls()] == ["npu_dynamic_quant", "npu_quant_matmul"]
    dyn, mm = _operator_calls()
    assert dyn.args["input"].shape == (2 * M, K) and dyn.args["input"].dtype in (torch.bfloat16, torch.float16)
    assert mm.args["x2"].shape == (K, N) and mm.args["scale"].shape == (N,)
    assert mm.args["pertoken_scale"].shape == (2 * M,) and mm.args["output_dtype"] == torch.bfloat16
    assert out.dtype == dtype and out.shape == (2, M, N)
    # the same W8A8 math written out: per-token int8 activations x the int8 weight, both scales
    xs = x.reshape(-1, K).to(dyn.args["input"].dtype).float()
    x_scale = xs.abs().amax(1, keepdim=True) / 127
    w8a8 = (torch.round(xs / x_scale).double() @ q.double().t()) * x_scale.double() * scale.double().t()
    w8a8 = (w8a8 + bias.to(dtype).double()).reshape(2, M, N)
    assert rel_err(out, w8a8) <= 8e-3  # bf16 output rounding only
    assert rel_err(out, _dequantized_linear(x, q, scale, bias.to(dtype))) <= 1.5e-2


def test_npu_fp8_weights_are_dequantized_on_the_device(npu: ModuleType) -> None:
    q, scale, bias = _layer(FP8)
    x = _randn(M, K, seed=9).bfloat16()
    assert torch.equal(kernels.linear8(x, q, scale, bias), reference.linear8(x, q, scale, bias))
    assert _operator_calls() == []


def test_tiny_int8_dit_forward_through_the_double(npu: ModuleType, golden, golden_ckpt) -> None:
    """The golden low-noise expert with int8 block linears (bf16 run) through the double vs. the
    same 8-bit model on the reference backend: the W8A8 activations cost ~1e-2 (bound 5e-2)."""
    from safetensors.torch import load_file

    from wanengine.quant.loading import load_expert

    data = load_file(str(golden / "dit.safetensors"))
    context = [data["context"]] if data["context"].dim() == 2 else list(data["context"])
    model = load_expert(golden_ckpt / "low_noise_model", dtype=torch.bfloat16, quantize=torch.int8)
    with torch.no_grad():
        out = model(data["x"], data["t"], context, data["y"])
        # per block: 4 self-attention + 2 cross q/o + 2 x 2 cross k/v (prompt rows and the one
        # padding row, `TextEmbedding.map`) + 2 ffn = 12 int8 matmuls
        assert fake.ops_called().count("npu_quant_matmul") == 2 * 12
        kernels.configure("reference")
        base = model(data["x"], data["t"], context, data["y"])
    assert rel_err(out, base) <= 5e-2
