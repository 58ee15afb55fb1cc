"""A contract-enforcing test double of the `torch_npu` module (CPU only).

Written from `spec/npu-ops.md` (the contracts read from the published torch_npu wheels
2.1.0.post12, 2.7.1.post2 and 2.14.0). Tests install it as `sys.modules["torch_npu"]` so that
the `npu` kernels backend runs on CPU. The double is at least as strict as the real module:
- every operator has the registered schema's Python signature (argument names, order,
  keyword-only parts, defaults), so an unknown or misspelled keyword, or a keyword-only
  argument passed by position, is a TypeError -- as "Unknown keyword argument" is on a device;
- every documented rule (dtypes per operator, layouts, head counts, head-dim limits, B*N
  limits, rotary table shapes per mode, mask dtype/shape per operator, contiguity, the
  compile mode needed by interleaved RoPE) is checked and a violation raises
  `ContractViolation`, never silently computing something else. Where the real operator
  silently computes something else (a 1-D length list passed alone, layer-norm parameters of
  another shape), the double refuses too, so such a call fails the test;
- the operator's math is computed in float32 (float64 for the int8 matmul) and returned in
  the documented form (FA's 7-tuple, FIA's `(out, lse)` with `lse = zeros(1)` unless
  `softmax_lse_flag`, `npu_rms_norm`'s `(y, rstd)`); without a mask, attention is full
  whatever `pre_tokens`/`next_tokens` say, as on the device.
- features of an operator the engine does not use (quantized FIA, paged KV, pse, dropout,
  sparse modes other than 0) are refused as "not implemented by the double".

Every operator call is appended to `calls` (a `Call`), so a test can assert which operators
ran with what; `torch_npu.npu.set_compile_mode` and writes to
`torch_npu.npu.config.allow_internal_format` are recorded in `runtime` (and `calls`).
`reset()` forgets both.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__version__ = "0.0.0+contract-double"

MAX_TOKENS = 2147483647
HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class ContractViolation(AssertionError):
    """A call the real operator would reject, or would answer with something else."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ContractViolation(message)


@dataclass
class Call:
    """One operator call: its name, all arguments (defaults filled in) and those passed explicitly."""

    op: str
    args: Dict[str, Any]
    explicit: FrozenSet[str] = field(default_factory=frozenset)


@dataclass
class RuntimeSettings:
    """What the process set through `torch_npu.npu` (None: never set)."""

    jit_compile: Optional[bool] = None
    allow_internal_format: Optional[bool] = None
    compile_mode_calls: int = 0


calls: List[Call] = []
runtime = RuntimeSettings()


def reset() -> None:
    """Forget recorded calls and runtime settings (a fresh process)."""
    global runtime
    calls.clear()
    runtime = RuntimeSettings()


def ops_called() -> List[str]:
    return [c.op for c in calls]


def _recorded(required_explicit: Sequence[str] = ()) -> Callable:
    """Record each call and insist that `required_explicit` arguments were passed, not defaulted.

    Binding the call to the documented signature raises TypeError for unknown, missing or
    misplaced (keyword-only by position) arguments, as calling the real operator does.
    `required_explicit` is a usage guard beyond the operator's contract: a default that is
    valid for the operator but wrong for Wan (`scale=1.0`, `num_heads=1`, layout `BSH`).
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
                _require(name in explicit, f"{func.__name__}: `{name}` must be passed explicitly (its default "
                                           f"{signature.parameters[name].default!r} is wrong for this use)")
            return func(*args, **kwargs)

        return wrapper

    return decorate


# ----------------------------------------------------------------------------- runtime settings


class _NpuConfig:
    """`torch.npu.config` (= `torch_npu.npu.config`): `allow_internal_format` is write-only."""

    def __setattr__(self, name: str, value: Any) -> None:
        _require(name == "allow_internal_format", f"torch.npu.config.{name}: not a setting of this double")
        _require(isinstance(value, bool), f"torch.npu.config.allow_internal_format must be a bool, got {value!r}")
        runtime.allow_internal_format = value
        calls.append(Call("npu.config.allow_internal_format", {"value": value}, frozenset({"value"})))

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"torch.npu.config.{name} cannot be read (write-only)")


class _NpuNamespace:
    """`torch_npu.npu`, as far as the engine uses it."""

    config = _NpuConfig()

    @staticmethod
    def set_compile_mode(jit_compile: bool) -> None:
        _require(isinstance(jit_compile, bool), f"set_compile_mode: jit_compile must be a bool, got {jit_compile!r}")
        runtime.jit_compile = jit_compile
        runtime.compile_mode_calls += 1
        calls.append(Call("npu.set_compile_mode", {"jit_compile": jit_compile}, frozenset({"jit_compile"})))

    @staticmethod
    def is_available() -> bool:
        return False  # there is no NPU behind the double


npu = _NpuNamespace()


# ----------------------------------------------------------------------------- attention (shared)


def _check_qkv(op: str, query: Any, key: Any, value: Any, dtypes: Tuple[torch.dtype, ...]) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        _require(isinstance(t, torch.Tensor), f"{op}: {name} must be a tensor, got {type(t).__name__}")
        _require(t.dtype in dtypes, f"{op}: {name} dtype {t.dtype} not supported (only {', '.join(map(str, dtypes))})")
    _require(query.dtype == key.dtype == value.dtype, f"{op}: q/k/v dtypes differ ({query.dtype}, {key.dtype}, {value.dtype})")


def _layout_dims(op: str, t: torch.Tensor, layout: str, head_dim: Optional[int], name: str) -> Tuple[int, int, int, int]:
    """(B, N, S, D) of a tensor in `layout`; for the H layouts N = H / `head_dim`."""
    if layout in ("BSND", "BNSD", "BNSD_BSND"):
        _require(t.dim() == 4, f"{op}: {name} must be 4-D for layout {layout}, got {tuple(t.shape)}")
        b, x1, x2, d = t.shape
        return (b, x2, x1, d) if layout == "BSND" else (b, x1, x2, d)
    _require(t.dim() == 3, f"{op}: {name} must be 3-D for layout {layout}, got {tuple(t.shape)}")
    assert head_dim is not None
    _require(t.shape[-1] % head_dim == 0, f"{op}: {name} hidden size {t.shape[-1]} not a multiple of the head dim {head_dim}")
    b, s = (t.shape[0], t.shape[1]) if layout == "BSH" else (t.shape[1], t.shape[0])
    return b, t.shape[-1] // head_dim, s, head_dim


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
    if layout in ("BSND", "BNSD_BSND"):
        return t.transpose(1, 2)
    if layout == "BSH":
        return t.transpose(1, 2).flatten(2)
    if layout == "SBH":
        return t.permute(2, 0, 1, 3).flatten(2)
    return t


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            excluded: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """[B, N, S, D] float32 attention with grouped KV heads; `excluded` True = masked out."""
    if k.shape[1] != q.shape[1]:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, N, Sq, Sk]
    if excluded is not None:
        scores = scores.masked_fill(excluded, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    return torch.matmul(torch.softmax(scores, dim=-1), v), lse


def _band(sq: int, sk: int, pre_tokens: int, next_tokens: int) -> torch.Tensor:
    """sparse_mode 0 with a mask: keys more than `pre_tokens` before / `next_tokens` after the query are excluded."""
    offset = torch.arange(sk)[None, :] - torch.arange(sq)[:, None]  # key index - query index
    return (offset > next_tokens) | (-offset > pre_tokens)


def _check_mask(op: str, atten_mask: Any, dtypes: Tuple[torch.dtype, ...],
                shapes: List[Tuple[int, ...]]) -> Optional[torch.Tensor]:
    """The mask as a bool tensor broadcastable to [B, N, Sq, Sk] (True = masked out), or None."""
    if atten_mask is None:
        return None
    _require(isinstance(atten_mask, torch.Tensor) and atten_mask.dtype in dtypes,
             f"{op}: atten_mask must be a {'/'.join(map(str, dtypes))} tensor (1 = masked out), got "
             f"{getattr(atten_mask, 'dtype', type(atten_mask).__name__)}")
    _require(tuple(atten_mask.shape) in shapes, f"{op}: atten_mask shape {tuple(atten_mask.shape)} not one of {shapes}")
    mask = atten_mask.bool()
    if mask.dim() == 3:  # (1|B, Sq, Sk): one row per sample, broadcast over heads
        mask = mask[:, None]
    while mask.dim() < 4:
        mask = mask[None]
    return mask


# ----------------------------------------------------------------------------- npu_fusion_attention

FA_LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")
FA_MAX_HEAD_DIM = 768
FA_MAX_HEADS = 256


@_recorded(required_explicit=("scale",))
def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                         atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=2147483647,
                         next_tockens=2147483647, inner_precise=0, prefix=None,
                         actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                         gen_mask_parallel=True, sync=False):
    op = "npu_fusion_attention"
    _check_qkv(op, query, key, value, FLOAT_DTYPES)  # fp32 documented since 2.1.0.post12
    _require(input_layout in FA_LAYOUTS, f"{op}: input_layout {input_layout!r} not in {FA_LAYOUTS}")
    _require(isinstance(head_num, int) and 1 <= head_num <= FA_MAX_HEADS, f"{op}: head_num {head_num!r} must be an int in 1..{FA_MAX_HEADS}")
    _require(isinstance(scale, float), f"{op}: scale must be a Python float, got {type(scale).__name__}")
    _require(keep_prob == 1.0, f"{op}: keep_prob={keep_prob}: dropout is not implemented by the double (inference uses 1.0)")
    _require(pse is None and padding_mask is None and prefix is None, f"{op}: pse/padding_mask/prefix are not implemented by the double")
    _require((actual_seq_qlen is None) == (actual_seq_kvlen is None),
             f"{op}: actual_seq_qlen and actual_seq_kvlen must be given together (one alone is silently ignored)")
    if input_layout == "TND":
        return _fusion_attention_tnd(query, key, value, head_num, atten_mask, scale, actual_seq_qlen, actual_seq_kvlen)
    _require(actual_seq_qlen is None, f"{op}: actual_seq_qlen/kvlen select the varlen path of layout TND only")
    h_layout = input_layout in ("BSH", "SBH")
    head_dim = query.shape[-1] // head_num if h_layout else None
    b, n, sq, d = _layout_dims(op, query, input_layout, head_dim, "query")
    _require(n == head_num, f"{op}: head_num={head_num} but the {input_layout} query has {n} heads")
    kb, kn, sk, kd = _layout_dims(op, key, input_layout, d, "key")
    vb, vn, sv, vd = _layout_dims(op, value, input_layout, d, "value")
    _require(kb == vb == b and sk == sv and kn == vn, f"{op}: key/value shapes do not match each other or the query's batch")
    _require(n % kn == 0, f"{op}: {n} query heads are not a multiple of {kn} key/value heads")
    _require(1 <= d <= FA_MAX_HEAD_DIM and kd == d and vd <= d,
             f"{op}: head dims q {d}, k {kd}, v {vd}: need Dq == Dk >= Dv, 1..{FA_MAX_HEAD_DIM}")
    mask = _check_mask(op, atten_mask, (torch.bool, torch.uint8), [(b, n, sq, sk), (b, 1, sq, sk), (1, 1, sq, sk), (sq, sk)])
    excluded = None
    if mask is not None:  # without a mask sparse_mode / pre_tockens / next_tockens have no effect
        _require(sparse_mode == 0, f"{op}: sparse_mode {sparse_mode} with a mask is not implemented by the double")
        excluded = mask | _band(sq, sk, pre_tockens, next_tockens)
    q, k, v = (_to_bnsd(t, input_layout, h) for t, h in ((query, n), (key, kn), (value, kn)))
    out, lse = _attend(q, k, v, scale, excluded)
    softmax_max = lse.expand(b, n, sq, 8).contiguous()  # the real op's per-row statistics shape
    return (_from_bnsd(out, input_layout).to(query.dtype).contiguous(), softmax_max, torch.ones_like(softmax_max),
            torch.empty(0, dtype=query.dtype), 0, 0, 0)


def _cumulative(op: str, name: str, lengths: Any, total: int) -> List[int]:
    _require(isinstance(lengths, (list, tuple)) and all(type(x) is int for x in lengths),
             f"{op}: {name} must be a list of Python ints, got {type(lengths).__name__}")
    ends = list(lengths)
    _require(len(ends) > 0 and ends == sorted(ends) and ends[0] >= 0, f"{op}: {name}={ends} must be cumulative (non-decreasing)")
    _require(ends[-1] == total, f"{op}: {name} must end at T={total}, got {ends[-1]}")
    return ends


def _fusion_attention_tnd(query, key, value, head_num, atten_mask, scale, actual_seq_qlen, actual_seq_kvlen):
    op = "npu_fusion_attention(TND)"
    _require(actual_seq_qlen is not None, f"{op}: layout TND needs actual_seq_qlen and actual_seq_kvlen")
    _require(atten_mask is None, f"{op}: masks with TND are not implemented by the double")
    for name, t in (("query", query), ("key", key), ("value", value)):
        _require(t.dim() == 3, f"{op}: {name} must be [T, N, D], got {tuple(t.shape)}")
    _require(query.shape[1] == head_num, f"{op}: query must be [T, head_num={head_num}, D], got {tuple(query.shape)}")
    d = query.shape[-1]
    _require(1 <= d <= FA_MAX_HEAD_DIM and key.shape[-1] == d and value.shape[-1] <= d, f"{op}: head dims invalid")
    _require(key.shape[1] == value.shape[1] and head_num % key.shape[1] == 0, f"{op}: key/value heads invalid")
    q_ends = _cumulative(op, "actual_seq_qlen", actual_seq_qlen, query.shape[0])
    k_ends = _cumulative(op, "actual_seq_kvlen", actual_seq_kvlen, key.shape[0])
    _require(len(q_ends) == len(k_ends), f"{op}: actual_seq_qlen/kvlen have different lengths")
    outs, q_start, k_start = [], 0, 0
    for q_end, k_end in zip(q_ends, k_ends):
        q, k, v = (t.float().transpose(0, 1)[None] for t in (query[q_start:q_end], key[k_start:k_end], value[k_start:k_end]))
        out, _ = _attend(q, k, v, scale, None)
        outs.append(out[0].transpose(0, 1))
        q_start, k_start = q_end, k_end
    stats = torch.zeros(query.shape[0], head_num, 8)
    return torch.cat(outs).to(query.dtype), stats, stats.clone(), torch.empty(0, dtype=query.dtype), 0, 0, 0


# ----------------------------------------------------------------------------- npu_fused_infer_attention_score

FIA_LAYOUTS = ("BSH", "BSND", "BNSD", "BNSD_BSND", "TND")
FIA_MAX_HEAD_DIM = 512
FIA_HEAD_DIM_MULTIPLE = 16
# Accepted by the signature (they are in the schema) but only as None: quantized, paged,
# shared-prefix and pse attention are not implemented by the double.
_FIA_NOT_IMPLEMENTED = (
    "pse_shift", "dequant_scale1", "quant_scale1", "dequant_scale2", "quant_scale2", "quant_offset2",
    "antiquant_scale", "antiquant_offset", "block_table", "query_padding_size", "kv_padding_size",
    "key_antiquant_scale", "key_antiquant_offset", "value_antiquant_scale", "value_antiquant_offset",
    "key_shared_prefix", "value_shared_prefix", "actual_shared_prefix_len",
)


@_recorded(required_explicit=("scale", "num_heads", "input_layout"))
def npu_fused_infer_attention_score(query, key, value, *, pse_shift=None, atten_mask=None,
                                    actual_seq_lengths=None, actual_seq_lengths_kv=None,
                                    dequant_scale1=None, quant_scale1=None, dequant_scale2=None,
                                    quant_scale2=None, quant_offset2=None, antiquant_scale=None,
                                    antiquant_offset=None, block_table=None, query_padding_size=None,
                                    kv_padding_size=None, key_antiquant_scale=None,
                                    key_antiquant_offset=None, value_antiquant_scale=None,
                                    value_antiquant_offset=None, key_shared_prefix=None,
                                    value_shared_prefix=None, actual_shared_prefix_len=None,
                                    num_heads=1, scale=1.0, pre_tokens=2147483647,
                                    next_tokens=2147483647, input_layout="BSH",
                                    num_key_value_heads=0, sparse_mode=0, inner_precise=0,
                                    block_size=0, antiquant_mode=0, key_antiquant_mode=0,
                                    value_antiquant_mode=0, softmax_lse_flag=False):
    arguments = dict(locals())
    op = "npu_fused_infer_attention_score"
    _require(isinstance(query, torch.Tensor) and query.dtype in HALF_DTYPES + (torch.int8,),
             f"{op}: query dtype {getattr(query, 'dtype', None)} not supported (fp16/bf16/int8 only, never fp32)")
    _require(query.dtype != torch.int8, f"{op}: int8 (quantized) attention is not implemented by the double")
    _check_qkv(op, query, key, value, HALF_DTYPES)
    given = [name for name in _FIA_NOT_IMPLEMENTED if arguments[name] is not None]
    _require(not given and block_size == 0 and antiquant_mode == key_antiquant_mode == value_antiquant_mode == 0,
             f"{op}: {given or 'paged/antiquant modes'} not implemented by the double")
    _require(input_layout in FIA_LAYOUTS, f"{op}: input_layout {input_layout!r} not in {FIA_LAYOUTS}")
    _require(input_layout != "TND", f"{op}: layout TND is not implemented by the double")
    _require(isinstance(scale, float), f"{op}: scale must be a Python float, got {type(scale).__name__}")
    tensors = [("query", query), ("key", key), ("value", value)] + ([("atten_mask", atten_mask)] if atten_mask is not None else [])
    for name, t in tensors:
        _require(t.is_contiguous(), f"{op}: {name} must be contiguous")
    _require(isinstance(num_heads, int) and num_heads >= 1, f"{op}: num_heads must be a positive int")
    head_dim = query.shape[-1] // num_heads if input_layout == "BSH" else None
    b, n, sq, d = _layout_dims(op, query, input_layout, head_dim, "query")
    _require(n == num_heads, f"{op}: num_heads={num_heads} but the {input_layout} query has {n} heads")
    kb, kn, sk, kd = _layout_dims(op, key, input_layout, d, "key")
    vb, vn, sv, vd = _layout_dims(op, value, input_layout, d, "value")
    _require(num_key_value_heads in (0, kn), f"{op}: num_key_value_heads={num_key_value_heads} must be 0 or the key's {kn} heads")
    _require(kn == vn and n % kn == 0, f"{op}: {n} query heads vs {kn}/{vn} key/value heads")
    _require(kb == vb == b and sk == sv and kd == vd == d, f"{op}: key/value shapes do not match the query")
    _require(d <= FIA_MAX_HEAD_DIM and d % FIA_HEAD_DIM_MULTIPLE == 0,
             f"{op}: head dim {d} must be a multiple of {FIA_HEAD_DIM_MULTIPLE} and at most {FIA_MAX_HEAD_DIM} (fp16/bf16)")
    mask = _check_mask(op, atten_mask, (torch.bool, torch.int8, torch.uint8),
                       [(sq, sk), (1, sq, sk), (b, sq, sk), (b, 1, sq, sk), (1, 1, sq, sk)])
    excluded = None
    if mask is not None:  # without a mask pre_tokens / next_tokens are ignored
        _require(sparse_mode == 0, f"{op}: sparse_mode {sparse_mode} with a mask is not implemented by the double")
        excluded = mask | _band(sq, sk, pre_tokens, next_tokens)
    q_lens = _per_batch_lengths(op, "actual_seq_lengths", actual_seq_lengths, b, sq)
    kv_lens = _per_batch_lengths(op, "actual_seq_lengths_kv", actual_seq_lengths_kv, b, sk)
    if kv_lens is not None:
        beyond = (torch.arange(sk)[None, :] >= torch.tensor(kv_lens)[:, None])[:, None, None, :]  # [B, 1, 1, Sk]
        excluded = beyond if excluded is None else (excluded | beyond)
    q, k, v = (_to_bnsd(t, input_layout, h) for t, h in ((query, n), (key, kn), (value, kn)))
    out, lse = _attend(q, k, v, scale, excluded)
    if q_lens is not None:  # query rows beyond a sample's length are not computed
        valid = torch.arange(sq)[None, :] < torch.tensor(q_lens)[:, None]  # [B, Sq]
        out = out * valid[:, None, :, None]
    lse_out = lse if softmax_lse_flag else torch.zeros(1, dtype=torch.float32)
    return _from_bnsd(out, input_layout).to(query.dtype).contiguous(), lse_out


def _per_batch_lengths(op: str, name: str, lengths: Any, batch: int, limit: int) -> Optional[List[int]]:
    """Per-sample lengths (a length-1 list is shared by all samples), validated; None when not given."""
    if lengths is None:
        return None
    _require(isinstance(lengths, (list, tuple)) and all(type(x) is int for x in lengths),
             f"{op}: {name} must be a list of Python ints, got {type(lengths).__name__}")
    _require(len(lengths) == 1 or len(lengths) >= batch, f"{op}: {name} has {len(lengths)} entries for batch {batch} (1 or >= B)")
    _require(all(0 <= x <= limit for x in lengths), f"{op}: {name}={list(lengths)} outside 0..{limit}")
    return [lengths[0]] * batch if len(lengths) == 1 else list(lengths[:batch])


# ----------------------------------------------------------------------------- npu_rotary_mul

ROTARY_MODES = ("half", "interleave")
ROTARY_MAX_DIM = 896  # exclusive


def _rotary_layout(x_shape: Tuple[int, ...], table_shape: Tuple[int, ...], mode: str) -> Tuple[str, int, int]:
    """(layout, B, N) under which `table_shape` is a documented table for `x_shape`, else a violation."""
    a, b, c, d = x_shape
    layouts = {  # layout: (B, N, {mode: allowed table shapes}) -- first match wins
        "BSND": (a, c, {"half": [(1, b, 1, d), (a, b, 1, d), (a, b, c, d)], "interleave": [(1, b, 1, d)]}),
        "BNSD": (a, b, {"half": [(1, 1, c, d), (a, 1, c, d), (a, b, c, d)], "interleave": [(1, 1, c, d)]}),
        "SBND": (b, c, {"half": [(a, 1, 1, d), (a, b, 1, d), (a, b, c, d)], "interleave": [(a, 1, 1, d)]}),
    }
    for layout, (batch, heads, tables) in layouts.items():
        if table_shape in tables[mode]:
            return layout, batch, heads
    raise ContractViolation(f"npu_rotary_mul: table shape {table_shape} is not a documented {mode!r} table for input {x_shape} "
                            f"({'only 1S1D / 11SD / S11D' if mode == 'interleave' else '1S1D/BS1D/BSND and the BNSD/SBND forms'})")


@_recorded()
def npu_rotary_mul(input, r1, r2, rotary_mode="half"):
    op = "npu_rotary_mul"
    _require(rotary_mode in ROTARY_MODES, f"{op}: rotary_mode {rotary_mode!r} not in {ROTARY_MODES}")
    for name, t in (("input", input), ("r1", r1), ("r2", r2)):
        _require(isinstance(t, torch.Tensor) and t.dim() == 4, f"{op}: {name} must be a 4-D tensor")
        _require(t.dtype in FLOAT_DTYPES, f"{op}: {name} dtype {t.dtype} unsupported")
    d = input.shape[-1]
    _require(d % 2 == 0 and d < ROTARY_MAX_DIM, f"{op}: last dim {d} must be even and < {ROTARY_MAX_DIM}")
    _require(r1.shape == r2.shape, f"{op}: r1 {tuple(r1.shape)} and r2 {tuple(r2.shape)} differ")
    layout, batch, heads = _rotary_layout(tuple(input.shape), tuple(r1.shape), rotary_mode)
    if rotary_mode == "interleave":
        if runtime.jit_compile is not False:  # the real op raises this RuntimeError
            raise ContractViolation(f"{op}: aclop only support rotary_mode with half "
                                    "(call torch_npu.npu.set_compile_mode(jit_compile=False) first)")
        _require(batch * heads < 1000, f"{op}: interleave needs B * N < 1000, got {batch} * {heads} ({layout})")
    else:
        _require(batch < 1000 and heads < 1000, f"{op}: half mode needs B < 1000 and N < 1000, got {batch}, {heads}")
    c1, c2 = r1.to(input.dtype).float(), r2.to(input.dtype).float()  # tables are cast to the input's dtype
    _require(bool(c1.abs().max() <= 1) and bool(c2.abs().max() <= 1), f"{op}: r1/r2 values must lie in [-1, 1]")
    x = input.float()
    if rotary_mode == "half":
        x1, x2 = x.chunk(2, dim=-1)
        rot = torch.cat((-x2, x1), dim=-1)
    else:
        pairs = x.unflatten(-1, (-1, 2))
        rot = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (c1 * x + c2 * rot).to(input.dtype)


# ----------------------------------------------------------------------------- norms


@_recorded()
def npu_rms_norm(input, gamma, epsilon=1e-6):
    op = "npu_rms_norm"
    _require(isinstance(input, torch.Tensor) and isinstance(gamma, torch.Tensor), f"{op}: input and gamma must be tensors")
    _require(input.dtype in FLOAT_DTYPES, f"{op}: dtype {input.dtype} unsupported")
    _require(2 <= input.dim() <= 8, f"{op}: input must have 2..8 dims, got {input.dim()}")
    _require(gamma.dtype == input.dtype, f"{op}: gamma dtype {gamma.dtype} must equal input dtype {input.dtype} (2.1.0.post12)")
    g = gamma.dim()
    _require(0 < g < input.dim() and tuple(input.shape[-g:]) == tuple(gamma.shape),
             f"{op}: gamma shape {tuple(gamma.shape)} must equal the trailing dims of input {tuple(input.shape)}")
    dims = tuple(range(-g, 0))
    xf = input.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(input.dtype), rstd


@_recorded()
def npu_layer_norm_eval(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    op = "npu_layer_norm_eval"
    _require(isinstance(input, torch.Tensor), f"{op}: input must be a tensor")
    _require(input.dtype in FLOAT_DTYPES, f"{op}: dtype {input.dtype} unsupported")
    _require(isinstance(normalized_shape, (list, tuple)) and all(type(n) is int for n in normalized_shape),
             f"{op}: normalized_shape must be a list of ints, got {normalized_shape!r}")
    shape = tuple(normalized_shape)
    _require(tuple(input.shape[-len(shape):]) == shape, f"{op}: normalized_shape {shape} != trailing dims of {tuple(input.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            # The real operator silently uses the first elements of a parameter of another shape.
            _require(tuple(t.shape) == shape, f"{op}: {name} shape {tuple(t.shape)} != normalized_shape {shape}")
            _require(t.dtype == input.dtype, f"{op}: {name} dtype {t.dtype} must equal input dtype {input.dtype}")
    out = F.layer_norm(input.float(), shape, weight.float() if weight is not None else None,
                       bias.float() if bias is not None else None, eps)
    return out.to(input.dtype)

# ----------------------------------------------------------------------------- 8-bit matmul

_INT8_MAX_DIM = 65535


@_recorded()
def npu_dynamic_quant(input, *, smooth_scales=None, group_index=None, dst_type=None):
    """Per-token symmetric int8 quantization: `scale = amax|x| / 127` over the last dim."""
    op = "npu_dynamic_quant"
    _require(isinstance(input, torch.Tensor), f"{op}: input must be a tensor")
    _require(input.dtype in (torch.float16, torch.bfloat16), f"{op}: input dtype {input.dtype} unsupported (fp16/bf16 only)")
    _require(input.dim() >= 2, f"{op}: input must be at least 2-D, got {tuple(input.shape)}")
    _require(group_index is None, f"{op}: group_index (MoE) is not implemented by the double")
    _require(dst_type in (None, torch.int8), f"{op}: the double implements dst_type=None/int8 only, got {dst_type}")
    x = input.float()
    if smooth_scales is not None:
        _require(isinstance(smooth_scales, torch.Tensor) and smooth_scales.dtype == input.dtype, f"{op}: smooth_scales must be a tensor of input's dtype {input.dtype}")
        _require(tuple(smooth_scales.shape) == (input.shape[-1],), f"{op}: smooth_scales shape must be ({input.shape[-1]},)")
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
        _require(isinstance(t, torch.Tensor) and t.dtype == torch.int8, f"{op}: {name} must be an int8 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        _require(t.dim() == 2, f"{op}: {name} must be 2-D, got {tuple(t.shape)} (flatten tokens first)")
    m, k = x1.shape
    k2, n = x2.shape
    _require(k == k2, f"{op}: x1 [M, K]={tuple(x1.shape)} and x2 [K, N]={tuple(x2.shape)} disagree on K")
    _require(k <= _INT8_MAX_DIM and n <= _INT8_MAX_DIM, f"{op}: K={k} and N={n} must be at most {_INT8_MAX_DIM}")
    _require(output_dtype in (None, torch.int8, torch.float16, torch.bfloat16), f"{op}: output_dtype {output_dtype} unsupported")
    result_dtype = torch.int8 if output_dtype is None else output_dtype
    _require(isinstance(scale, torch.Tensor) and scale.dim() == 1 and scale.shape[0] in (1, n), f"{op}: scale must be 1-D (N,)=({n},) or (1,), got {tuple(getattr(scale, 'shape', ()))}")
    _require(scale.dtype in (torch.float32, torch.bfloat16), f"{op}: scale dtype {scale.dtype} unsupported (float32/bf16)")
    _require(scale.dtype != torch.bfloat16 or result_dtype == torch.bfloat16, f"{op}: a bf16 scale needs output_dtype=torch.bfloat16")
    _require(offset is None, f"{op}: offset is not implemented by the double")
    acc = x1.double() @ x2.double()  # exact: |sum| <= 127 * 128 * 65535 < 2^53
    if bias is not None:
        _require(isinstance(bias, torch.Tensor) and tuple(bias.shape) == (n,), f"{op}: bias must have shape ({n},)")
        _require(bias.dtype in (torch.bfloat16, torch.float32, torch.int32), f"{op}: bias dtype {bias.dtype} unsupported")
        if bias.dtype == torch.int32:  # an int32 bias is added to the int32 accumulator
            acc = acc + bias.double()
    out = acc * scale.double()
    if pertoken_scale is not None:
        _require(result_dtype in (torch.float16, torch.bfloat16), f"{op}: pertoken_scale needs output_dtype float16/bfloat16")
        _require(isinstance(pertoken_scale, torch.Tensor) and pertoken_scale.dtype == torch.float32, f"{op}: pertoken_scale must be float32")
        _require(tuple(pertoken_scale.shape) == (m,), f"{op}: pertoken_scale must be 1-D (M,)=({m},), got {tuple(pertoken_scale.shape)}")
        out = out * pertoken_scale.double()[:, None]
    if bias is not None and bias.dtype != torch.int32:
        out = out + bias.double()
    if result_dtype == torch.int8:
        return torch.round(out).clamp(-128, 127).to(torch.int8)
    return out.to(result_dtype)
