"""A contract-enforcing test double of the `torch_npu` module (CPU only).

Tests install it as `sys.modules["torch_npu"]` (see `install` in tests/test_kernels_npu.py)
so that the `npu` kernels backend runs on CPU. Each operator:
- has the Python signature documented in `spec/npu-ops.md` (names, order, defaults), so a
  misspelled or unknown argument is a TypeError exactly as with the real module;
- checks the documented contract (layouts, dtypes, head counts, head-dim and mask rules,
  table shapes, tuple returns) and raises AssertionError on a violation, never silently
  computing something else;
- computes the operator's math in float32 on CPU and returns the documented tuple;
- appends a `Call` to `calls`, so a test can assert which operators ran with what.

Knobs a test may set: `SUPPORTS_FP32_ATTENTION` (behave like a newer release that accepts
float32 q/k/v). `reset()` clears the record and restores the knobs.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__version__ = "0.0.0+contract-double"

SUPPORTS_FP32_ATTENTION = False

ATTENTION_LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")
FIA_LAYOUTS = ("BSH", "BSND", "BNSD")
ROTARY_MODES = ("half", "interleave")
MAX_TOKENS = 2147483647


@dataclass
class Call:
    """One operator call: its name, all arguments (defaults filled in) and those passed explicitly."""

    op: str
    args: Dict[str, Any]
    explicit: FrozenSet[str] = field(default_factory=frozenset)


calls: List[Call] = []


def reset() -> None:
    """Forget recorded calls and restore the default knobs."""
    global SUPPORTS_FP32_ATTENTION
    calls.clear()
    SUPPORTS_FP32_ATTENTION = False


def ops_called() -> List[str]:
    return [c.op for c in calls]


def _recorded(required_explicit: Sequence[str] = ()) -> Callable:
    """Record each call and insist that `required_explicit` arguments were passed, not defaulted.

    The wrapper keeps the documented signature (`functools.wraps` sets `__wrapped__`, which
    `inspect.signature` follows), and binding the call to it raises TypeError for unknown or
    missing arguments just as calling the real operator would.
    """

    def decorate(func: Callable) -> Callable:
        signature = inspect.signature(func)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            explicit = frozenset(bound.arguments)
            bound.apply_defaults()
            calls.append(Call(func.__name__, dict(bound.arguments), explicit))
            for name in required_explicit:
                assert name in explicit, (
                    f"{func.__name__}: `{name}` must be passed explicitly (its default "
                    f"{signature.parameters[name].default!r} is wrong for this use)"
                )
            return func(*args, **kwargs)

        return wrapper

    return decorate


# ----------------------------------------------------------------------------- attention


def _attention_dtypes() -> Tuple[torch.dtype, ...]:
    base = (torch.float16, torch.bfloat16)
    return base + (torch.float32,) if SUPPORTS_FP32_ATTENTION else base


def _check_qkv(op: str, query: Any, key: Any, value: Any) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        assert isinstance(t, torch.Tensor), f"{op}: {name} must be a tensor, got {type(t).__name__}"
        assert t.dtype in _attention_dtypes(), (
            f"{op}: {name} dtype {t.dtype} not supported (fp16/bf16"
            f"{'/fp32' if SUPPORTS_FP32_ATTENTION else '; fp32 only on newer releases'})"
        )
    assert query.dtype == key.dtype == value.dtype, f"{op}: q/k/v dtypes differ"


def _check_head_dim(op: str, head_dim: int) -> None:
    assert head_dim % 16 == 0 and 0 < head_dim <= 512, (
        f"{op}: head dim {head_dim} must be a multiple of 16 and at most 512"
    )


def _to_bnsd(t: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    """Any of BSH/SBH/BSND/BNSD -> [B, N, S, D] float32."""
    if layout == "BSND":
        t = t.transpose(1, 2)
    elif layout == "BSH":
        t = t.unflatten(-1, (heads, -1)).transpose(1, 2)
    elif layout == "SBH":
        t = t.unflatten(-1, (heads, -1)).permute(1, 2, 0, 3)
    return t.float()


def _from_bnsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "BSND":
        return t.transpose(1, 2)
    if layout == "BSH":
        return t.transpose(1, 2).flatten(2)
    if layout == "SBH":
        return t.permute(2, 0, 1, 3).flatten(2)
    return t


def _layout_dims(op: str, t: torch.Tensor, layout: str, heads: Optional[int], name: str) -> Tuple[int, int, int, int]:
    """(B, N, S, D) of a tensor in `layout`; `heads` is required for the H layouts."""
    if layout in ("BSND", "BNSD"):
        assert t.dim() == 4, f"{op}: {name} must be 4-D for layout {layout}, got {tuple(t.shape)}"
        b, x1, x2, d = t.shape
        return (b, x2, x1, d) if layout == "BSND" else (b, x1, x2, d)
    assert t.dim() == 3, f"{op}: {name} must be 3-D for layout {layout}, got {tuple(t.shape)}"
    assert heads is not None and t.shape[-1] % heads == 0, f"{op}: {name} hidden {t.shape[-1]} not divisible by heads"
    b, s = (t.shape[0], t.shape[1]) if layout == "BSH" else (t.shape[1], t.shape[0])
    return b, heads, s, t.shape[-1] // heads


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            masked: Optional[torch.Tensor], pre_tokens: int, next_tokens: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """[B, N, S, D] float32 attention with GQA; `masked` True = excluded. Returns (out, lse)."""
    if k.shape[1] != q.shape[1]:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, N, Sq, Sk]
    sq, sk = scores.shape[-2:]
    offset = torch.arange(sk)[None, :] - torch.arange(sq)[:, None]  # key index - query index
    outside_band = (offset > next_tokens) | (-offset > pre_tokens)  # sparse_mode 0 band
    excluded = outside_band if masked is None else (masked | outside_band)
    scores = scores.masked_fill(excluded, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    return torch.matmul(torch.softmax(scores, dim=-1), v), lse


def _check_mask(op: str, atten_mask: Any, batch: int, heads: int, sq: int, sk: int) -> Optional[torch.Tensor]:
    if atten_mask is None:
        return None
    assert isinstance(atten_mask, torch.Tensor) and atten_mask.dtype == torch.bool, (
        f"{op}: atten_mask must be a bool tensor (True = masked out), got "
        f"{getattr(atten_mask, 'dtype', type(atten_mask).__name__)}"
    )
    allowed = [(batch, heads, sq, sk), (batch, 1, sq, sk), (1, 1, sq, sk), (sq, sk)]
    assert tuple(atten_mask.shape) in allowed, (
        f"{op}: atten_mask shape {tuple(atten_mask.shape)} not one of {allowed}"
    )
    return atten_mask if atten_mask.dim() == 4 else atten_mask[None, None]


@_recorded(required_explicit=("scale",))
def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                         atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=2147483647,
                         next_tockens=2147483647, inner_precise=0, prefix=None,
                         actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                         gen_mask_parallel=True, sync=False):
    op = "npu_fusion_attention"
    _check_qkv(op, query, key, value)
    assert input_layout in ATTENTION_LAYOUTS, f"{op}: input_layout {input_layout!r} not in {ATTENTION_LAYOUTS}"
    assert isinstance(head_num, int) and head_num > 0, f"{op}: head_num must be a positive int"
    assert isinstance(scale, float), f"{op}: scale must be a Python float, got {type(scale).__name__}"
    assert keep_prob == 1.0, f"{op}: keep_prob={keep_prob}; inference needs 1.0 (no dropout)"
    assert pse is None and padding_mask is None and prefix is None, f"{op}: pse/padding_mask/prefix unsupported by the double"
    assert sparse_mode == 0, f"{op}: the double implements sparse_mode=0 only"
    if input_layout == "TND":
        return _fusion_attention_tnd(query, key, value, head_num, atten_mask, scale,
                                     actual_seq_qlen, actual_seq_kvlen)
    assert actual_seq_qlen is None and actual_seq_kvlen is None, f"{op}: actual_seq_*len only with layout TND"
    b, n, sq, d = _layout_dims(op, query, input_layout, head_num, "query")
    assert n == head_num, f"{op}: head_num={head_num} but the {input_layout} query has {n} heads"
    kb, kn, sk, kd = _layout_dims(op, key, input_layout, None if input_layout in ("BSND", "BNSD") else key.shape[-1] // d, "key")
    vb, vn, sv, vd = _layout_dims(op, value, input_layout, None if input_layout in ("BSND", "BNSD") else value.shape[-1] // d, "value")
    assert kb == vb == b and sk == sv and kn == vn and n % kn == 0, f"{op}: key/value shapes do not match query"
    assert kd == vd == d, f"{op}: q/k/v head dims differ ({d}, {kd}, {vd})"
    _check_head_dim(op, d)
    masked = _check_mask(op, atten_mask, b, n, sq, sk)
    q, k, v = (_to_bnsd(t, input_layout, h) for t, h in ((query, n), (key, kn), (value, kn)))
    out, lse = _attend(q, k, v, scale, masked, pre_tockens, next_tockens)
    softmax_max = lse.expand(b, n, sq, 8).contiguous()  # shape of the real op's statistics
    softmax_sum = torch.ones_like(softmax_max)
    return (_from_bnsd(out, input_layout).to(query.dtype), softmax_max, softmax_sum,
            torch.empty(0, dtype=query.dtype), 0, 0, 0)


def _fusion_attention_tnd(query, key, value, head_num, atten_mask, scale, actual_seq_qlen, actual_seq_kvlen):
    op = "npu_fusion_attention(TND)"
    assert actual_seq_qlen is not None and actual_seq_kvlen is not None, f"{op}: needs actual_seq_qlen/actual_seq_kvlen"
    assert atten_mask is None, f"{op}: the double does not implement masks with TND"
    assert query.dim() == 3 and query.shape[1] == head_num, f"{op}: query must be [T, head_num, D]"
    _check_head_dim(op, query.shape[-1])
    q_ends, k_ends = list(actual_seq_qlen), list(actual_seq_kvlen)
    assert len(q_ends) == len(k_ends), f"{op}: actual_seq_qlen/kvlen lengths differ"
    assert q_ends == sorted(q_ends) and k_ends == sorted(k_ends), f"{op}: lengths must be cumulative"
    assert q_ends[-1] == query.shape[0] and k_ends[-1] == key.shape[0], f"{op}: cumulative lengths must end at T"
    outs, q_start, k_start = [], 0, 0
    for q_end, k_end in zip(q_ends, k_ends):
        q = query[q_start:q_end].float().transpose(0, 1)[None]
        k = key[k_start:k_end].float().transpose(0, 1)[None]
        v = value[k_start:k_end].float().transpose(0, 1)[None]
        out, _ = _attend(q, k, v, scale, None, MAX_TOKENS, MAX_TOKENS)
        outs.append(out[0].transpose(0, 1))
        q_start, k_start = q_end, k_end
    out = torch.cat(outs).to(query.dtype)
    stats = torch.zeros(query.shape[0], head_num, 8)
    return out, stats, stats.clone(), torch.empty(0, dtype=query.dtype), 0, 0, 0


@_recorded(required_explicit=("scale", "num_heads", "input_layout"))
def npu_fused_infer_attention_score(query, key, value, *, pse_shift=None, atten_mask=None,
                                    actual_seq_lengths=None, actual_seq_lengths_kv=None,
                                    num_heads=1, scale=1.0, pre_tokens=2147483647,
                                    next_tokens=2147483647, input_layout="BSH",
                                    num_key_value_heads=0, sparse_mode=0, inner_precise=0,
                                    softmax_lse_flag=False):
    op = "npu_fused_infer_attention_score"
    _check_qkv(op, query, key, value)
    assert input_layout in FIA_LAYOUTS, f"{op}: input_layout {input_layout!r} not in {FIA_LAYOUTS}"
    assert isinstance(scale, float), f"{op}: scale must be a Python float, got {type(scale).__name__}"
    assert pse_shift is None and sparse_mode == 0, f"{op}: the double implements pse_shift=None, sparse_mode=0 only"
    kv_heads = num_key_value_heads or num_heads
    b, n, sq, d = _layout_dims(op, query, input_layout, num_heads, "query")
    assert n == num_heads, f"{op}: num_heads={num_heads} but the {input_layout} query has {n} heads"
    kb, kn, sk, kd = _layout_dims(op, key, input_layout, kv_heads, "key")
    vb, vn, sv, vd = _layout_dims(op, value, input_layout, kv_heads, "value")
    assert kn == vn == kv_heads and n % kv_heads == 0, f"{op}: num_key_value_heads={kv_heads} does not match key/value"
    assert kb == vb == b and sk == sv and kd == vd == d, f"{op}: key/value shapes do not match query"
    _check_head_dim(op, d)
    masked = _check_mask(op, atten_mask, b, n, sq, sk)
    for name, lens, limit in (("actual_seq_lengths", actual_seq_lengths, sq), ("actual_seq_lengths_kv", actual_seq_lengths_kv, sk)):
        if lens is not None:
            assert isinstance(lens, (list, tuple)) and all(isinstance(x, int) for x in lens), f"{op}: {name} must be a list of ints"
            assert len(lens) in (1, b) and all(0 <= x <= limit for x in lens), f"{op}: {name}={lens} invalid for batch {b}, length {limit}"
    if actual_seq_lengths_kv is not None:
        lens_kv = torch.tensor(list(actual_seq_lengths_kv)).expand(b)
        beyond = torch.arange(sk)[None, :] >= lens_kv[:, None]  # [B, Sk]
        beyond = beyond[:, None, None, :]
        masked = beyond if masked is None else (masked | beyond)
    q, k, v = (_to_bnsd(t, input_layout, h) for t, h in ((query, n), (key, kv_heads), (value, kv_heads)))
    out, lse = _attend(q, k, v, scale, masked, pre_tokens, next_tokens)
    return _from_bnsd(out, input_layout).to(query.dtype), lse


# ----------------------------------------------------------------------------- rotary


def _rotary_table_shapes(x_shape: Tuple[int, ...]) -> List[Tuple[int, ...]]:
    """Documented r1/r2 shapes, for whichever of BSND / BNSD / SBND the input is read as."""
    a, b, c, d = x_shape
    return [
        (1, b, 1, d), (a, b, 1, d), (a, b, c, d),  # BSND: 1S1D, BS1D, BSND
        (1, 1, c, d), (a, 1, c, d),  # BNSD: 11SD, B1SD (BNSD covered above)
        (a, 1, 1, d),  # SBND: S11D (SB1D, SBND covered above)
    ]


@_recorded()
def npu_rotary_mul(input, r1, r2, rotary_mode="half"):
    op = "npu_rotary_mul"
    assert rotary_mode in ROTARY_MODES, f"{op}: rotary_mode {rotary_mode!r} not in {ROTARY_MODES}"
    for name, t in (("input", input), ("r1", r1), ("r2", r2)):
        assert isinstance(t, torch.Tensor) and t.dim() == 4, f"{op}: {name} must be a 4-D tensor"
    assert input.dtype in (torch.float16, torch.bfloat16, torch.float32), f"{op}: dtype {input.dtype} unsupported"
    assert r1.dtype == r2.dtype == input.dtype, f"{op}: r1/r2 dtype ({r1.dtype}, {r2.dtype}) must equal input's {input.dtype}"
    d = input.shape[-1]
    assert d % 2 == 0 and d < 896, f"{op}: last dim {d} must be even and < 896"
    assert r1.shape == r2.shape, f"{op}: r1 {tuple(r1.shape)} and r2 {tuple(r2.shape)} differ"
    allowed = _rotary_table_shapes(tuple(input.shape))
    assert tuple(r1.shape) in allowed, f"{op}: table shape {tuple(r1.shape)} not broadcastable as documented for input {tuple(input.shape)}"
    x = input.float()
    if rotary_mode == "half":
        x1, x2 = x.chunk(2, dim=-1)
        rot = torch.cat((-x2, x1), dim=-1)
    else:
        pairs = x.unflatten(-1, (-1, 2))
        rot = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (r1.float() * x + r2.float() * rot).to(input.dtype)


# ----------------------------------------------------------------------------- norms


@_recorded()
def npu_rms_norm(x, gamma, epsilon=1e-6):
    op = "npu_rms_norm"
    assert isinstance(x, torch.Tensor) and isinstance(gamma, torch.Tensor), f"{op}: x and gamma must be tensors"
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), f"{op}: dtype {x.dtype} unsupported"
    assert gamma.dtype == x.dtype, f"{op}: gamma dtype {gamma.dtype} must equal x dtype {x.dtype}"
    g = gamma.dim()
    assert 0 < g <= x.dim() and tuple(x.shape[-g:]) == tuple(gamma.shape), (
        f"{op}: gamma shape {tuple(gamma.shape)} must equal the last dims of x {tuple(x.shape)}"
    )
    dims = tuple(range(-g, 0))
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(x.dtype), rstd


@_recorded()
def npu_layer_norm_eval(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    op = "npu_layer_norm_eval"
    assert isinstance(input, torch.Tensor), f"{op}: input must be a tensor"
    assert input.dtype in (torch.float16, torch.bfloat16, torch.float32), f"{op}: dtype {input.dtype} unsupported"
    assert isinstance(normalized_shape, (list, tuple)) and all(isinstance(n, int) for n in normalized_shape), (
        f"{op}: normalized_shape must be a list of ints, got {normalized_shape!r}"
    )
    shape = tuple(normalized_shape)
    assert tuple(input.shape[-len(shape):]) == shape, f"{op}: normalized_shape {shape} != trailing dims of {tuple(input.shape)}"
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            assert tuple(t.shape) == shape, f"{op}: {name} shape {tuple(t.shape)} != normalized_shape {shape}"
            assert t.dtype == input.dtype, f"{op}: {name} dtype {t.dtype} must equal input dtype {input.dtype}"
    out = F.layer_norm(input.float(), shape, weight.float() if weight is not None else None,
                       bias.float() if bias is not None else None, eps)
    return out.to(input.dtype)


# ----------------------------------------------------------------------------- 8-bit matmul

_INT8_MAX_DIM = 65535


@_recorded()
def npu_dynamic_quant(input, *, smooth_scales=None, group_index=None, dst_type=None):
    """Per-token symmetric int8 quantization: `scale = amax|x| / 127` over the last dim."""
    op = "npu_dynamic_quant"
    assert isinstance(input, torch.Tensor), f"{op}: input must be a tensor"
    assert input.dtype in (torch.float16, torch.bfloat16), f"{op}: input dtype {input.dtype} unsupported (fp16/bf16 only)"
    assert input.dim() >= 2, f"{op}: input must be at least 2-D, got {tuple(input.shape)}"
    assert group_index is None, f"{op}: group_index (MoE) is not implemented by the double"
    assert dst_type in (None, torch.int8), f"{op}: the double implements dst_type=None/int8 only, got {dst_type}"
    x = input.float()
    if smooth_scales is not None:
        assert isinstance(smooth_scales, torch.Tensor) and smooth_scales.dtype == input.dtype, (
            f"{op}: smooth_scales must be a tensor of input's dtype {input.dtype}"
        )
        assert tuple(smooth_scales.shape) == (input.shape[-1],), f"{op}: smooth_scales shape must be ({input.shape[-1]},)"
        x = x * smooth_scales.float()
    scale = x.abs().amax(dim=-1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows quantize to 0
    y = torch.round(x / safe[..., None]).clamp(-128, 127).to(torch.int8)
    return y, scale


@_recorded()
def npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None):
    """`(x1 @ x2) * scale * pertoken_scale + bias` with int8 x1 `[M, K]`, x2 `[K, N]`."""
    op = "npu_quant_matmul"
    for name, t in (("x1", x1), ("x2", x2)):
        assert isinstance(t, torch.Tensor) and t.dtype == torch.int8, (
            f"{op}: {name} must be an int8 tensor, got {getattr(t, 'dtype', type(t).__name__)}"
        )
        assert t.dim() == 2, f"{op}: {name} must be 2-D, got {tuple(t.shape)} (flatten tokens first)"
    m, k = x1.shape
    k2, n = x2.shape
    assert k == k2, f"{op}: x1 [M, K]={tuple(x1.shape)} and x2 [K, N]={tuple(x2.shape)} disagree on K"
    assert k <= _INT8_MAX_DIM and n <= _INT8_MAX_DIM, f"{op}: K={k} and N={n} must be at most {_INT8_MAX_DIM}"
    assert output_dtype in (None, torch.int8, torch.float16, torch.bfloat16), f"{op}: output_dtype {output_dtype} unsupported"
    result_dtype = torch.int8 if output_dtype is None else output_dtype
    assert isinstance(scale, torch.Tensor) and scale.dim() == 1 and scale.shape[0] in (1, n), (
        f"{op}: scale must be 1-D (N,)=({n},) or (1,), got {tuple(getattr(scale, 'shape', ()))}"
    )
    assert scale.dtype in (torch.float32, torch.bfloat16), f"{op}: scale dtype {scale.dtype} unsupported (float32/bf16)"
    assert scale.dtype != torch.bfloat16 or result_dtype == torch.bfloat16, f"{op}: a bf16 scale needs output_dtype=torch.bfloat16"
    assert offset is None, f"{op}: offset is not implemented by the double"
    acc = x1.double() @ x2.double()  # exact: |sum| <= 127 * 128 * 65535 < 2^53
    if bias is not None:
        assert isinstance(bias, torch.Tensor) and tuple(bias.shape) == (n,), f"{op}: bias must have shape ({n},)"
        assert bias.dtype in (torch.bfloat16, torch.float32, torch.int32), f"{op}: bias dtype {bias.dtype} unsupported"
        if bias.dtype == torch.int32:  # an int32 bias is added to the int32 accumulator
            acc = acc + bias.double()
    out = acc * scale.double()
    if pertoken_scale is not None:
        assert result_dtype in (torch.float16, torch.bfloat16), f"{op}: pertoken_scale needs output_dtype float16/bfloat16"
        assert isinstance(pertoken_scale, torch.Tensor) and pertoken_scale.dtype == torch.float32, (
            f"{op}: pertoken_scale must be float32"
        )
        assert tuple(pertoken_scale.shape) == (m,), f"{op}: pertoken_scale must be 1-D (M,)=({m},), got {tuple(pertoken_scale.shape)}"
        out = out * pertoken_scale.double()[:, None]
    if bias is not None and bias.dtype != torch.int32:
        out = out + bias.double()
    if result_dtype == torch.int8:
        return torch.round(out).clamp(-128, 127).to(torch.int8)
    return out.to(result_dtype)
