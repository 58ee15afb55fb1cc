"""Ascend NPU kernels backend: the hot operations routed to `torch_npu` fused operators.

Imported only when the `npu` backend is selected (`kernels.select("npu")`, `configure("npu")`
or `WANENGINE_KERNEL_BACKEND=npu`), so the top-level `import torch_npu` is deliberate.
Importing it applies the Ascend runtime settings once per process
(`device.configure_ascend_runtime`: `set_compile_mode(jit_compile=False)`, which interleaved
RoPE needs, and `allow_internal_format = False`) -- whichever way the backend was chosen.
Contracts of the operators are in `spec/npu-ops.md`; `tests/fake_torch_npu.py` enforces them.

Choices made once, at import, from the environment:
- `WANENGINE_NPU_ATTENTION` = `fa` (default): `npu_fusion_attention` (FA) in layout `BSND`;
  `fia`: `npu_fused_infer_attention_score` (FIA) in layout `BSND` (what later Ascend ports
  of Wan use for inference). Anything else is a ConfigError.
- `WANENGINE_NPU_FP32_ATTENTION` = `1` (default): float32 q/k/v go to FA as float32
  (documented since torch_npu 2.1.0.post12); `0`: cast to bfloat16 for FA and back, for a
  stack whose kernel lacks float32. FIA never takes float32: there float32 q/k/v are always
  cast to bfloat16 (no overflow, unlike float16) and the output is cast back.

Per-operator head-dim rules (`Dq == Dk == Dv = D` here):
- FA: 1 <= D <= 768, no alignment; heads 1..256 per call (more heads: split, exact).
- FIA: D <= 512 after zero-padding D to a multiple of 16 (exact: zero channels add nothing to
  q.k, produce zero output channels that are sliced off, and the scale is passed explicitly).
- A head dim the chosen operator cannot take goes to the other one if it can, else to the
  reference math.

Precision relative to `reference.py` (the semantics):
- attention: the fused ops accumulate in float32; inputs are fp16/bf16 as passed, float32 as
  described above.
- rotary: `npu_rotary_mul(rotary_mode="interleave")` in x's dtype with the cos/sin tables cast
  to x's dtype (for bf16 x the tables are rounded to bf16; the reference rounds only the
  result). The op needs `B * N < 1000`: larger batches are split into calls of at most
  `999 // N` samples (exact: samples are independent).
- rms_norm: one `npu_rms_norm` with gamma cast to x's dtype (the fused op rounds once where
  the reference rounds the normalised value and then the product).
- layer_norm / layer_norm_modulate: run on float32 input with float32 weight/bias exactly
  where the reference computes in float32 (the model's residual stream is float32, so
  `x.float()` is free there).
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
import torch_npu  # noqa: F401  -- this module exists to call it; absent -> backend not selectable

from ..device import configure_ascend_runtime
from ..errors import ConfigError
from . import reference

ATTENTION_ENV_VAR = "WANENGINE_NPU_ATTENTION"
FP32_ATTENTION_ENV_VAR = "WANENGINE_NPU_FP32_ATTENTION"
ATTENTION_OPS = ("fa", "fia")


def _env_choice(name: str, default: str, choices: tuple) -> str:
    value = os.environ.get(name, default).strip().lower() or default
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: choose one of {', '.join(choices)}")
    return value


ATTENTION_OP = _env_choice(ATTENTION_ENV_VAR, "fa", ATTENTION_OPS)
FUSION_ATTENTION_FP32 = _env_choice(FP32_ATTENTION_ENV_VAR, "1", ("1", "0")) == "1"

configure_ascend_runtime()  # once per process; rotary's interleave mode raises without it

_HALF_DTYPES = (torch.float16, torch.bfloat16)
FA_MAX_HEAD_DIM = 768
FA_MAX_HEADS = 256
FIA_MAX_HEAD_DIM = 512
FIA_HEAD_DIM_MULTIPLE = 16
ROTARY_MAX_DIM = 896  # exclusive
ROTARY_MAX_BATCH_TIMES_HEADS = 999  # interleave mode: B * N < 1000


# ----------------------------------------------------------------------------- attention


def _kept_key_counts(k_lens: Optional[torch.Tensor], num_keys: int) -> Optional[List[int]]:
    """Per-sample key counts clamped to `num_keys`, or None when no key is dropped."""
    if k_lens is None:
        return None
    lens = [min(max(int(n), 0), num_keys) for n in k_lens.tolist()]
    return None if all(n == num_keys for n in lens) else lens


def _fia_head_dim(head_dim: int) -> int:
    return head_dim + (-head_dim % FIA_HEAD_DIM_MULTIPLE)


def _operator_for(head_dim: int) -> Optional[str]:
    """The attention operator to run for `head_dim`: the chosen one if it can, else the other, else None."""
    fits = {"fa": 1 <= head_dim <= FA_MAX_HEAD_DIM, "fia": _fia_head_dim(head_dim) <= FIA_MAX_HEAD_DIM}
    other = "fia" if ATTENTION_OP == "fa" else "fa"
    for op in (ATTENTION_OP, other):
        if fits[op]:
            return op
    return None


def _ragged_mask(lens: List[int], seq_q: int, seq_k: int, device: torch.device) -> torch.Tensor:
    """`[B, 1, Sq, Skv]` bool, True = masked out (the opposite of SDPA's boolean mask)."""
    key_pos = torch.arange(seq_k, device=device)
    dropped = key_pos[None, :] >= torch.tensor(lens, device=device)[:, None]  # [B, Skv]
    return dropped[:, None, None, :].expand(len(lens), 1, seq_q, seq_k).contiguous()


def _fusion_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      lens: Optional[List[int]]) -> torch.Tensor:
    """FA on `[B, S, N, D]` (layout BSND), heads split into calls of at most 256."""
    dtype = q.dtype if (q.dtype in _HALF_DTYPES or FUSION_ATTENTION_FP32) else torch.bfloat16
    q, k, v = (t.to(dtype) for t in (q, k, v))
    mask = _ragged_mask(lens, q.shape[1], k.shape[1], q.device) if lens is not None else None

    def run(qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
        return torch_npu.npu_fusion_attention(
            qh, kh, vh, head_num=qh.shape[2], input_layout="BSND", scale=scale, atten_mask=mask, keep_prob=1.0,
        )[0]

    if q.shape[2] <= FA_MAX_HEADS:
        return run(q, k, v)
    chunks = zip(*(t.split(FA_MAX_HEADS, dim=2) for t in (q, k, v)))
    return torch.cat([run(qh, kh, vh) for qh, kh, vh in chunks], dim=2)


def _fused_infer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           lens: Optional[List[int]]) -> torch.Tensor:
    """FIA on `[B, S, N, D]` (layout BSND): fp16/bf16 only, contiguous, D padded to a multiple
    of 16; ragged key lengths as `actual_seq_lengths_kv`."""
    dtype = q.dtype if q.dtype in _HALF_DTYPES else torch.bfloat16
    head_dim = q.shape[-1]
    pad = _fia_head_dim(head_dim) - head_dim
    q, k, v = (F.pad(t.to(dtype), (0, pad)).contiguous() for t in (q, k, v))
    out, _lse = torch_npu.npu_fused_infer_attention_score(
        q, k, v, num_heads=q.shape[2], num_key_value_heads=k.shape[2], scale=scale, input_layout="BSND",
        actual_seq_lengths_kv=lens,
    )
    return out[..., :head_dim] if pad else out


_OPERATORS: dict = {"fa": _fusion_attention, "fia": _fused_infer_attention}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
              k_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q k^T * scale) v over `[B, S, N, D]`; keys at index >= k_lens[b] are ignored."""
    op = _operator_for(q.shape[-1])
    if op is None:  # beyond what either fused operator supports
        return reference.attention(q, k, v, scale=scale, k_lens=k_lens)
    lens = _kept_key_counts(k_lens, k.shape[1])
    if lens is not None and len(set(lens)) == 1:
        # Same prefix of keys for every sample (always so for batch 1): slice, no mask needed.
        k, v, lens = k[:, : lens[0]], v[:, : lens[0]], None
    run: Callable[..., torch.Tensor] = _OPERATORS[op]
    out = run(q, k, v, float(scale), lens)  # the operators take a Python float (a double)
    return out.to(q.dtype)


# ----------------------------------------------------------------------------- rotary


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pairs RoPE of `x [B, S, N, D]` with `[1, S, 1, D]` tables via `npu_rotary_mul`."""
    if x.dim() != 4:
        return reference.rotary(x, cos, sin)
    batch, seq, heads, head_dim = x.shape
    table = (1, seq, 1, head_dim)  # 1S1D: the only interleave table shape for BSND input
    if (head_dim % 2 or head_dim >= ROTARY_MAX_DIM or heads > ROTARY_MAX_BATCH_TIMES_HEADS
            or tuple(cos.shape) != table or tuple(sin.shape) != table):
        return reference.rotary(x, cos, sin)  # outside the op's contract
    r1, r2 = cos.to(x.dtype), sin.to(x.dtype)
    per_call = ROTARY_MAX_BATCH_TIMES_HEADS // heads
    if batch <= per_call:
        return torch_npu.npu_rotary_mul(x, r1, r2, rotary_mode="interleave")
    return torch.cat([torch_npu.npu_rotary_mul(part, r1, r2, rotary_mode="interleave") for part in x.split(per_call)])


# ----------------------------------------------------------------------------- norms


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * (x * rsqrt(mean(x^2) + eps))` via `npu_rms_norm` (gamma must have x's dtype)."""
    if not 2 <= x.dim() <= 8:  # the op takes 2-8 dims
        return reference.rms_norm(x, weight, eps)
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
