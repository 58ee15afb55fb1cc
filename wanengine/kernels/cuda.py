"""The torch-fused kernels backend (named `cuda`; `auto` picks it on CUDA and on the CPU):
fused attention (flash-attn or PyTorch SDPA) and lean elementwise ops.

Same five functions and the same semantics as `reference.py`; every function runs on CPU
tensors as well (SDPA's CPU flash kernel, `F.rms_norm`, one-pass LayerNorm), only the
flash-attn path needs a CUDA device.

Choices made once, at import (no per-call `try/except ImportError`):
- `FLASH_ATTN_AVAILABLE`: `flash_attn` (v2 API: `flash_attn_func`, `flash_attn_varlen_func`)
  is importable. It is used for fp16/bf16 CUDA tensors with a head dim it supports;
  everything else goes to `torch.nn.functional.scaled_dot_product_attention`.
- `SDPA_HAS_SCALE`: SDPA accepts `scale=` (torch >= 2.1); otherwise q is pre-scaled so that
  SDPA's implicit `1/sqrt(D)` yields the requested scale.
- `HAS_F_RMS_NORM`: `torch.nn.functional.rms_norm` exists (torch >= 2.4; fused on CUDA).

Key lengths (`k_lens`): keys at index >= k_lens[b] are ignored. When every sample keeps the
same number of keys (always so for batch 1) the keys are sliced instead of masked -- exact,
cheaper, and keeps SDPA on its mask-free flash path. Only ragged batches use a boolean SDPA
mask (True = attend) or, with flash-attn, the varlen kernel.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from . import reference

try:  # availability decided once; the per-call gate below only looks at device/dtype/shape
    from flash_attn import flash_attn_func as _flash_attn_func
    from flash_attn import flash_attn_varlen_func as _flash_attn_varlen_func

    FLASH_ATTN_AVAILABLE = True
except ImportError:  # flash-attn is an optional extra
    _flash_attn_func = None
    _flash_attn_varlen_func = None
    FLASH_ATTN_AVAILABLE = False


def _torch_at_least(major: int, minor: int) -> bool:
    parts = torch.__version__.split("+")[0].split(".")
    return (int(parts[0]), int(parts[1])) >= (major, minor)


SDPA_HAS_SCALE = _torch_at_least(2, 1)
HAS_F_RMS_NORM = hasattr(F, "rms_norm")

# Device types on which the flash-attn path may run (a tuple so tests can point it at a double).
_FLASH_DEVICE_TYPES = ("cuda",)
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------- attention


def _kept_key_counts(k_lens: Optional[torch.Tensor], num_keys: int) -> Optional[List[int]]:
    """Per-sample key counts clamped to `num_keys`, or None when no key is dropped."""
    if k_lens is None:
        return None
    lens = [min(max(int(n), 0), num_keys) for n in k_lens.tolist()]  # one host sync at most
    return None if all(n == num_keys for n in lens) else lens


def _use_flash(q: torch.Tensor) -> bool:
    return (
        FLASH_ATTN_AVAILABLE
        and q.device.type in _FLASH_DEVICE_TYPES
        and q.dtype in _FLASH_DTYPES
        and q.shape[-1] <= _FLASH_MAX_HEAD_DIM
        and q.shape[-1] % 8 == 0
    )


def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     lens: Optional[List[int]]) -> torch.Tensor:
    """flash-attn on `[B, S, N, D]` (its native layout); ragged key lengths via the varlen kernel."""
    if lens is None:
        return _flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=scale, causal=False)
    batch, seq_q, heads, head_dim = q.shape
    # Pack: queries [B*Sq, N, D]; only the kept keys of each sample, concatenated [sum(lens), N, D].
    q_packed = q.reshape(batch * seq_q, heads, head_dim)
    k_packed = torch.cat([k[b, :n] for b, n in enumerate(lens)])
    v_packed = torch.cat([v[b, :n] for b, n in enumerate(lens)])
    cu_q = torch.arange(0, (batch + 1) * seq_q, seq_q, dtype=torch.int32, device=q.device)
    cu_k = torch.tensor([0] + lens, dtype=torch.int32, device=q.device).cumsum(0, dtype=torch.int32)
    out = _flash_attn_varlen_func(
        q_packed, k_packed, v_packed, cu_q, cu_k, seq_q, max(lens),
        dropout_p=0.0, softmax_scale=scale, causal=False,
    )
    return out.view(batch, seq_q, heads, head_dim)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
          mask: Optional[torch.Tensor]) -> torch.Tensor:
    """SDPA on `[B, N, S, D]` views of `[B, S, N, D]` inputs; returns `[B, S, N, D]`."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if SDPA_HAS_SCALE:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=scale)
    else:  # torch < 2.1: SDPA always scales by 1/sqrt(D); fold the ratio into q
        q = q * (scale * q.shape[-1] ** 0.5)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
              k_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q k^T * scale) v over `[B, S, N, D]`; keys at index >= k_lens[b] are ignored."""
    lens = _kept_key_counts(k_lens, k.shape[1])
    if lens is not None and len(set(lens)) == 1:
        # Every sample keeps the same prefix of keys: slicing is exact and needs no mask.
        k, v, lens = k[:, : lens[0]], v[:, : lens[0]], None
    if _use_flash(q):
        return _flash_attention(q, k, v, scale, lens)
    mask = None
    if lens is not None:
        key_pos = torch.arange(k.shape[1], device=k.device)
        keep = key_pos[None, :] < torch.tensor(lens, device=k.device)[:, None]  # [B, Sk]
        mask = keep[:, None, None, :]  # [B, 1, 1, Sk], True = attend (SDPA convention)
    # SDPA wants one dtype; the reference computes in float32 and casts back to q's dtype.
    dtype = q.dtype
    k, v = k.to(dtype), v.to(dtype)
    return _sdpa(q, k, v, scale, mask)


# ----------------------------------------------------------------------------- rotary


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pairs RoPE of `x [B, S, N, D]` with `[1, S, 1, D]` tables, float32 math.

    Contract (as the public `kernels.rotary`): each angle is repeated twice in the tables,
    so only the even entries are read. The pairs `(x[2k], x[2k+1])` are rotated as one complex
    multiply -- exactly `x * cos + rot(x) * sin` of the reference, in fewer passes.
    """
    pairs = x.float().unflatten(-1, (-1, 2)).contiguous()  # [B, S, N, D/2, 2]; no copy if fp32
    rotation = torch.complex(cos[..., 0::2].float(), sin[..., 0::2].float())  # [1, S, 1, D/2]
    rotated = torch.view_as_complex(pairs) * rotation
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)


# ----------------------------------------------------------------------------- norms


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * (x * rsqrt(mean(x^2) + eps))`: normalised in float32, cast back, then weighted."""
    if x.dtype == torch.float32 and HAS_F_RMS_NORM:
        # float32 in: the weight multiply is float32 in the reference too -> one fused call.
        return F.rms_norm(x, x.shape[-1:], weight.float(), eps=eps)
    xf = x.float()
    if HAS_F_RMS_NORM:
        normed = F.rms_norm(xf, xf.shape[-1:], eps=eps)
    else:
        normed = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float) -> torch.Tensor:
    """LayerNorm over the last dim: normalised in float32, cast back, then the affine part."""
    if x.dtype == torch.float32:
        # float32 in: normalising and the affine part share one dtype, so one fused call suffices.
        # (A weight/bias of a lower precision is cast up exactly, as the reference's promotion does.)
        w = weight.float() if weight is not None else None
        b = bias.float() if bias is not None else None
        return F.layer_norm(x, x.shape[-1:], w, b, eps)
    # Lower precision in: keep the reference's rounding order (normalise, cast, then affine).
    return reference.layer_norm(x, weight, bias, eps)


def _single_row(t: torch.Tensor, x: torch.Tensor) -> bool:
    """True when `t` is one `[D]` row broadcast to every token of `x` (e.g. `[1, 1, D]` at batch 1)."""
    return t.dim() <= x.dim() and t.shape[-1] == x.shape[-1] and t.numel() == x.shape[-1]


def layer_norm_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """`LN(x) * (1 + scale) + shift`, parameter-free LN, all float32; result in x's dtype."""
    dim = x.shape[-1]
    if _single_row(scale, x) and _single_row(shift, x):
        # One modulation row for all tokens (batch 1, one timestep): it is an affine LayerNorm,
        # a single pass over the activations.
        weight = 1 + scale.reshape(dim).float()
        return F.layer_norm(x.float(), (dim,), weight, shift.reshape(dim).float(), eps).to(x.dtype)
    normed = F.layer_norm(x.float(), (dim,), eps=eps)
    # addcmul: the multiply and add in one pass over the [B, L, D] activations.
    return torch.addcmul(shift.float(), normed, 1 + scale.float()).to(x.dtype)


# ----------------------------------------------------------------------------- 8-bit linear
# fp8 weights run as a scaled fp8 GEMM (`torch._scaled_mm`) with dynamic per-token activation
# scales where the device has fp8 tensor cores (compute capability >= 8.9); everything else
# (int8 weights, older GPUs, shapes _scaled_mm rejects, the CPU) dequantizes the weight just
# before the matmul, exactly as `reference.linear8`.
_FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)
HAS_SCALED_MM = hasattr(torch, "_scaled_mm") and _FP8_DTYPE is not None
# Device types on which the fp8 GEMM may run (a tuple so tests can point it at the CPU, where
# torch._scaled_mm also exists).
_FP8_MM_DEVICE_TYPES = ("cuda",)
_FP8_MIN_CAPABILITY = (8, 9)
_ROWWISE_MIN_CAPABILITY = (9, 0)  # row-wise scales in one _scaled_mm call (Hopper and later)
_fp8_modes: dict = {}


def per_token_fp8(x2d: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
    """Dynamic symmetric per-token quantization of `[M, K]` activations to float8_e4m3fn:
    `scale = row_absmax / 448` (1 for an all-zero row), `q = (x / scale)` cast -> (q, scale [M, 1]):
    the weights' row rule (`quant.schemes.quantize_rows`, one float32 working copy) on tokens."""
    from ..quant.schemes import quantize_rows

    return quantize_rows(x2d, _FP8_DTYPE)


def _fp8_mode(device: torch.device) -> Optional[str]:
    """'rowwise', 'tensorwise' or None (no fp8 GEMM) for `device`, decided once per device."""
    key = str(device)
    if key not in _fp8_modes:
        mode = None
        if HAS_SCALED_MM and device.type in _FP8_MM_DEVICE_TYPES:
            capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else _ROWWISE_MIN_CAPABILITY
            if capability >= _ROWWISE_MIN_CAPABILITY:
                mode = "rowwise"
            elif capability >= _FP8_MIN_CAPABILITY:
                mode = "tensorwise"
        _fp8_modes[key] = mode
    return _fp8_modes[key]


def linear8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
            bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`x W^T + bias` with `W = qweight * scale`; fp8 GEMM where available, else dequantize.

    fp8 GEMM: `x` is quantized per token (`per_token_fp8`), then `_scaled_mm(xq, qweight^T)`
    with the token scales `[M, 1]` and the weight's channel scales `[1, N]` -- in the GEMM's
    epilogue ('rowwise', bf16 output, for bf16 inputs on compute capability >= 9.0) or, on 8.9
    and for other input dtypes, as a float32 GEMM result multiplied by both scales afterwards.
    The bias is added after the GEMM. Error vs. the dequantized weight: the activation rounding
    to e4m3 (relative 2^-4 per element, averaging out over K).
    """
    mode = _fp8_mode(x.device) if qweight.dtype == _FP8_DTYPE else None
    out_features, in_features = qweight.shape
    if mode is None or in_features % 16 or out_features % 16:
        return reference.linear8(x, qweight, scale, bias)
    lead = x.shape[:-1]
    xq, x_scale = per_token_fp8(x.reshape(-1, in_features))
    w_scale = scale.to(torch.float32).reshape(1, out_features)
    if mode == "rowwise" and x.dtype == torch.bfloat16:
        out = torch._scaled_mm(xq, qweight.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=torch.bfloat16)
    else:
        one = torch.ones((), dtype=torch.float32, device=x.device)
        out = torch._scaled_mm(xq, qweight.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        out = out * x_scale * w_scale
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.reshape(*lead, out_features).to(x.dtype)
