"""Ascend NPU kernels backend: the four hot operations routed to `torch_npu` fused operators.

Imported only when the `npu` backend is selected (`kernels.configure("npu")`), so the
top-level `import torch_npu` is deliberate. Contracts of the operators used here are in
`spec/npu-ops.md`; `tests/fake_torch_npu.py` enforces them on CPU.

Choices made once, at import, from the environment:
- `WANENGINE_NPU_ATTENTION` = `fa` (default): `npu_fusion_attention` in layout `BSND`;
  `fia`: `npu_fused_infer_attention_score` in layout `BNSD` (what later Ascend ports of Wan
  use for inference). Anything else is a ConfigError.
- `WANENGINE_NPU_FP32_ATTENTION` = `1`: the installed torch_npu accepts float32 q/k/v
  ("fp32 on newer releases"). Default off: float32 q/k/v are cast to bfloat16 for the fused
  op and the output is cast back -- the reference release does the same for float32 inputs
  to its fused attention, and bfloat16 (unlike float16) cannot overflow on large activations.

Precision relative to `reference.py` (the semantics):
- attention: the fused op accumulates in float32; inputs are fp16/bf16 as passed (or bf16
  for float32, see above). Head dims that are not a multiple of 16 are zero-padded (exact:
  zero channels add nothing to q.k and produce zero output channels, and the scale is
  passed explicitly); head dims above 512 fall back to the reference math.
- rotary: `npu_rotary_mul` in x's dtype with the cos/sin tables cast to x's dtype (for
  bf16 x the tables are rounded to bf16; the reference rounds only the result).
- rms_norm: one `npu_rms_norm` with gamma cast to x's dtype (the fused op rounds once where
  the reference rounds the normalised value and then the product).
- layer_norm / layer_norm_modulate: run on float32 input with float32 weight/bias exactly
  where the reference computes in float32 (the model's residual stream is float32, so
  `x.float()` is free there).
"""
from __future__ import annotations

import os
from typing import List, Optional

import torch
import torch.nn.functional as F
import torch_npu  # noqa: F401  -- this module exists to call it; absent -> backend not selectable

from ..errors import ConfigError
from . import reference

ATTENTION_ENV_VAR = "WANENGINE_NPU_ATTENTION"
FP32_ATTENTION_ENV_VAR = "WANENGINE_NPU_FP32_ATTENTION"
ATTENTION_OPS = ("fa", "fia")


def _attention_op_from_env() -> str:
    choice = os.environ.get(ATTENTION_ENV_VAR, "fa").strip().lower() or "fa"
    if choice not in ATTENTION_OPS:
        raise ConfigError(f"{ATTENTION_ENV_VAR}={choice!r}: choose one of {', '.join(ATTENTION_OPS)}")
    return choice


ATTENTION_OP = _attention_op_from_env()
FUSION_ATTENTION_SUPPORTS_FP32 = os.environ.get(FP32_ATTENTION_ENV_VAR, "0").strip() == "1"

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_HEAD_DIM_MULTIPLE = 16
_MAX_HEAD_DIM = 512
_MAX_ROTARY_DIM = 896  # exclusive


# ----------------------------------------------------------------------------- attention


def _kept_key_counts(k_lens: Optional[torch.Tensor], num_keys: int) -> Optional[List[int]]:
    """Per-sample key counts clamped to `num_keys`, or None when no key is dropped."""
    if k_lens is None:
        return None
    lens = [min(max(int(n), 0), num_keys) for n in k_lens.tolist()]
    return None if all(n == num_keys for n in lens) else lens


def _fusion_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      lens: Optional[List[int]]) -> torch.Tensor:
    """`npu_fusion_attention` on `[B, S, N, D]` (layout BSND); ragged key lengths as a mask."""
    batch, seq_q, heads, _ = q.shape
    mask = None
    if lens is not None:
        # The op's mask convention is inverted w.r.t. SDPA: True = masked out. It documents
        # [B, 1, Sq, Skv] (among others) and gets the dense bool tensor, B * Sq * Skv bytes.
        key_pos = torch.arange(k.shape[1], device=k.device)
        dropped = key_pos[None, :] >= torch.tensor(lens, device=k.device)[:, None]  # [B, Skv]
        mask = dropped[:, None, None, :].expand(batch, 1, seq_q, k.shape[1]).contiguous()
    out = torch_npu.npu_fusion_attention(
        q, k, v, head_num=heads, input_layout="BSND", scale=scale, atten_mask=mask, keep_prob=1.0,
    )
    return out[0]


def _fused_infer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           lens: Optional[List[int]]) -> torch.Tensor:
    """`npu_fused_infer_attention_score` in layout BNSD; ragged key lengths as actual_seq_lengths_kv."""
    heads = q.shape[2]
    q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # [B, N, S, D]
    out, _lse = torch_npu.npu_fused_infer_attention_score(
        q, k, v, num_heads=heads, num_key_value_heads=heads, scale=scale, input_layout="BNSD",
        actual_seq_lengths_kv=lens,
    )
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
              k_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q k^T * scale) v over `[B, S, N, D]`; keys at index >= k_lens[b] are ignored."""
    head_dim = q.shape[-1]
    if head_dim > _MAX_HEAD_DIM:  # beyond what the fused operators support
        return reference.attention(q, k, v, scale=scale, k_lens=k_lens)
    lens = _kept_key_counts(k_lens, k.shape[1])
    if lens is not None and len(set(lens)) == 1:
        # Same prefix of keys for every sample (always so for batch 1): slice, no mask needed.
        k, v, lens = k[:, : lens[0]], v[:, : lens[0]], None
    out_dtype = q.dtype
    if q.dtype in _HALF_DTYPES or (q.dtype == torch.float32 and FUSION_ATTENTION_SUPPORTS_FP32):
        compute_dtype = q.dtype
    else:
        compute_dtype = torch.bfloat16
    q, k, v = (t.to(compute_dtype) for t in (q, k, v))
    pad = -head_dim % _HEAD_DIM_MULTIPLE
    if pad:
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    run = _fused_infer_attention if ATTENTION_OP == "fia" else _fusion_attention
    out = run(q, k, v, float(scale), lens)  # the operators take a Python float (a double)
    if pad:
        out = out[..., :head_dim]
    return out.to(out_dtype)


# ----------------------------------------------------------------------------- rotary


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pairs RoPE of `x [B, S, N, D]` with `[1, S, 1, D]` tables via `npu_rotary_mul`."""
    head_dim = x.shape[-1]
    if x.dim() != 4 or head_dim % 2 or head_dim >= _MAX_ROTARY_DIM:  # outside the op's contract
        return reference.rotary(x, cos, sin)
    return torch_npu.npu_rotary_mul(x, cos.to(x.dtype), sin.to(x.dtype), rotary_mode="interleave")


# ----------------------------------------------------------------------------- norms


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * (x * rsqrt(mean(x^2) + eps))` via `npu_rms_norm` (gamma must have x's dtype)."""
    y = torch_npu.npu_rms_norm(x, weight.to(x.dtype), epsilon=eps)[0]
    # The reference's result dtype is the promotion of x and weight (e.g. bf16 x, fp32 weight).
    return y.to(torch.promote_types(x.dtype, weight.dtype))


def _layer_norm_eval(x: torch.Tensor, weight: Optional[torch.Tensor] = None,
                     bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    return torch_npu.npu_layer_norm_eval(x, normalized_shape=[x.shape[-1]], weight=weight, bias=bias, eps=eps)


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """LayerNorm over the last dim via `npu_layer_norm_eval`, normalised in float32."""
    if x.dtype == torch.float32:
        # float32 in: the affine part is float32 in the reference too, so fuse it.
        return _layer_norm_eval(
            x, weight.float() if weight is not None else None, bias.float() if bias is not None else None, eps
        )
    # Lower precision: normalise in float32, round, then the affine part in x's dtype -- the
    # reference's rounding order, which one fused low-precision call would not reproduce.
    normed = _layer_norm_eval(x.float(), eps=eps).to(x.dtype)
    if weight is not None:
        normed = normed * weight
    if bias is not None:
        normed = normed + bias
    return normed


def _rows_per_sample(t: torch.Tensor, x: torch.Tensor) -> Optional[torch.Tensor]:
    """`t` as `[b, D]` (b = 1 or B) when it broadcasts against `x` the same for every token, else None.

    For `x [B, L, D]` (or more dims) the sample axis is dim 0: `[D]`, `[1, D]`, `[1, 1, D]`,
    `[B, 1, D]` qualify. For `x [L, D]` only a single row does. Plain broadcasting rules,
    exactly as the reference applies them.
    """
    if t.dim() > x.dim() or t.shape[-1] != x.shape[-1]:
        return None
    lead = (1,) * (x.dim() - t.dim()) + tuple(t.shape[:-1])
    if x.dim() >= 3:
        if any(n != 1 for n in lead[1:]) or lead[0] not in (1, x.shape[0]):
            return None
        return t.reshape(lead[0], x.shape[-1])
    if any(n != 1 for n in lead):
        return None
    return t.reshape(1, x.shape[-1])


def layer_norm_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """`LN(x) * (1 + scale) + shift` as `npu_layer_norm_eval(weight=1 + scale, bias=shift)`.

    The fusion needs one `[D]` weight per call, so it applies when scale/shift are the same for
    every token of a sample (one timestep per sample, this task's case): one call per distinct
    row (a single call when all samples share it). Per-token scale/shift fall back to a
    parameter-free fused LN followed by the modulation in float32.
    """
    xf = x.float()  # the reference computes all of it in float32; free for the float32 residual
    scale_rows, shift_rows = _rows_per_sample(scale, x), _rows_per_sample(shift, x)
    if scale_rows is None or shift_rows is None:
        normed = _layer_norm_eval(xf, eps=eps)
        return torch.addcmul(shift.float(), normed, 1 + scale.float()).to(x.dtype)
    rows = max(scale_rows.shape[0], shift_rows.shape[0])
    weight_rows = (1 + scale_rows.float()).expand(rows, -1)  # [b, D]
    bias_rows = shift_rows.float().expand(rows, -1)
    if rows == 1:
        return _layer_norm_eval(xf, weight_rows[0], bias_rows[0], eps).to(x.dtype)
    outs = [_layer_norm_eval(xf[b : b + 1], weight_rows[b], bias_rows[b], eps) for b in range(rows)]
    return torch.cat(outs).to(x.dtype)


# ----------------------------------------------------------------------------- 8-bit linear
_QUANT_MATMUL_MAX_DIM = 65535  # K and N limit of npu_quant_matmul


def linear8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
            bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`x W^T + bias` with `W = qweight * scale`: int8 W8A8 on the NPU, fp8 dequantized.

    int8: tokens flattened to `[M, K]` (fp16/bf16; float32 is cast to bf16, the operator takes
    no float32), `npu_dynamic_quant` gives int8 activations and per-token float32 scales `(M,)`,
    then `npu_quant_matmul(xq, qweight^T [K, N], scale (N,), pertoken_scale=(M,), bias,
    output_dtype=bf16)` -- without `output_dtype` the operator would return int8. Atlas A2 has
    no fp8 matmul, so fp8 weights (and shapes beyond the operator's limits) are dequantized
    just before the matmul, as `reference.linear8`.
    """
    out_features, in_features = qweight.shape
    if qweight.dtype != torch.int8 or max(in_features, out_features) > _QUANT_MATMUL_MAX_DIM:
        return reference.linear8(x, qweight, scale, bias)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, in_features)
    if x2d.dtype not in _HALF_DTYPES:
        x2d = x2d.to(torch.bfloat16)
    xq, token_scale = torch_npu.npu_dynamic_quant(x2d)
    if bias is not None and bias.dtype not in (torch.bfloat16, torch.float32):
        bias = bias.to(torch.float32)
    out = torch_npu.npu_quant_matmul(xq, qweight.t(), scale.to(torch.float32).reshape(out_features),
                                     pertoken_scale=token_scale.reshape(-1), bias=bias,
                                     output_dtype=torch.bfloat16)
    return out.reshape(*lead, out_features).to(x.dtype)
