"""Kernels layer: every op of every backend available here against the reference math.

Backends: `reference` and `cuda` on CPU tensors, plus `cuda` on a CUDA device when one is
present. Real Wan dims (D = 5120, 40 heads, head dim 128) at small sequence lengths.
Each output is compared with the reference computed in float32 from the same (rounded)
inputs -- `rel_err = max|a - b| / max|b|` -- with these bounds (observed values in brackets,
CPU, torch 2.13):

| dtype    | attention        | rotary          | norms            |
|----------|------------------|-----------------|------------------|
| float32  | 1e-5  [1.3e-6]   | 1e-6 [0]        | 1e-5 [7.5e-8]    |
| bfloat16 | 1e-2  [3.4e-3]   | 8e-3 [3.1e-3]   | 1.6e-2 [6.3e-3]  |
| float16  | 2e-3  [3.7e-4]   | 1e-3 [3.9e-4]   | 2e-3 [7.8e-4]    |

The bf16/fp16 bounds are a few output roundings (2^-8 resp. 2^-11 relative) -- what a
computation that rounds its result to that dtype can honestly meet.
"""
from __future__ import annotations

import functools
import sys
import threading
from types import ModuleType
from typing import Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

from helpers import rel_err
from wanengine import kernels
from wanengine.errors import ConfigError
from wanengine.kernels import cuda as cuda_backend
from wanengine.kernels import dispatch
from wanengine.kernels import reference

DIM, HEADS, HEAD_DIM = 5120, 40, 128
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ATTN_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
ROTARY_TOL = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}
NORM_TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}

# (backend module, device) pairs available on this machine.
BACKENDS: Dict[str, Tuple[ModuleType, str]] = {
    "reference": (reference, "cpu"),
    "cuda-on-cpu": (cuda_backend, "cpu"),
}
if torch.cuda.is_available():
    BACKENDS["cuda"] = (cuda_backend, "cuda")


@pytest.fixture(autouse=True)
def restore_dispatch(monkeypatch: pytest.MonkeyPatch):
    """Leave the process default backend as it was found (monkeypatch restores it)."""
    monkeypatch.setattr(dispatch, "_default", dispatch._default)


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)) * scale


# ----------------------------------------------------------------------------- attention

# name -> (batch, query length, key length, k_lens or None)
ATTENTION_CASES: Dict[str, Tuple[int, int, int, Optional[List[int]]]] = {
    "self_1024": (1, 1024, 1024, None),
    "self_odd_klens_equal": (1, 257, 257, [257]),
    "self_klens_shorter": (1, 333, 333, [301]),
    "self_b2_ragged_klens": (2, 129, 129, [129, 77]),
    "self_b2_equal_short_klens": (2, 96, 96, [80, 80]),
    "cross_512": (1, 513, 512, None),
    "cross_512_b2": (2, 200, 512, None),
}
# The 1k-token case costs ~1 s per backend in low precision on 2 cores: float32 only.
ATTENTION_PARAMS = [
    (case, dtype)
    for case in ATTENTION_CASES
    for dtype in DTYPES
    if not (case == "self_1024" and dtype != torch.float32)
]


def _attention_inputs(case: str, dtype: torch.dtype):
    batch, seq_q, seq_k, k_lens = ATTENTION_CASES[case]
    q = _randn(batch, seq_q, HEADS, HEAD_DIM, seed=1).to(dtype)
    k = _randn(batch, seq_k, HEADS, HEAD_DIM, seed=2).to(dtype)
    v = _randn(batch, seq_k, HEADS, HEAD_DIM, seed=3).to(dtype)
    return q, k, v, (torch.tensor(k_lens) if k_lens is not None else None)


@functools.lru_cache(maxsize=None)
def _attention_expected(case: str, dtype: torch.dtype) -> torch.Tensor:
    """float32 reference from the rounded inputs, computed once per case for all backends."""
    q, k, v, lens = _attention_inputs(case, dtype)
    return reference.attention(q.float(), k.float(), v.float(), scale=HEAD_DIM ** -0.5, k_lens=lens)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize(
    "case,dtype", ATTENTION_PARAMS, ids=[f"{c}-{_dtype_id(d)}" for c, d in ATTENTION_PARAMS]
)
def test_attention_matches_reference(backend: str, case: str, dtype: torch.dtype) -> None:
    module, device = BACKENDS[backend]
    batch, seq_q, _, _ = ATTENTION_CASES[case]
    q, k, v, lens = _attention_inputs(case, dtype)
    expected = _attention_expected(case, dtype)
    out = module.attention(q.to(device), k.to(device), v.to(device), scale=HEAD_DIM ** -0.5, k_lens=lens)
    assert out.shape == (batch, seq_q, HEADS, HEAD_DIM) and out.dtype == dtype
    assert rel_err(out, expected) <= ATTN_TOL[dtype]


def test_attention_k_lens_really_drop_keys() -> None:
    """Masked keys must not matter: garbage beyond k_lens changes nothing, and differs from full."""
    q, k, v = (_randn(2, 40, 4, 64, seed=s) for s in (4, 5, 6))
    lens = torch.tensor([40, 23])
    k_garbage, v_garbage = k.clone(), v.clone()
    k_garbage[1, 23:] = 1e3
    v_garbage[1, 23:] = -1e3
    for module in (reference, cuda_backend):
        base = module.attention(q, k, v, scale=0.125, k_lens=lens)
        assert torch.allclose(module.attention(q, k_garbage, v_garbage, scale=0.125, k_lens=lens), base, atol=1e-6)
        full = module.attention(q, k, v, scale=0.125)
        assert torch.equal(base[0], full[0]) or rel_err(base[0], full[0]) < 1e-6
        assert rel_err(base[1], full[1]) > 1e-2


def test_cuda_attention_uses_no_mask_when_k_lens_cover_the_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    masks: List[Optional[torch.Tensor]] = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        masks.append(kwargs.get("attn_mask"))
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    q, k, v = (_randn(2, 16, 2, 32, seed=s) for s in (7, 8, 9))
    cuda_backend.attention(q, k, v, scale=0.2, k_lens=torch.tensor([16, 16]))
    cuda_backend.attention(q, k, v, scale=0.2, k_lens=torch.tensor([9, 9]))  # uniform: sliced
    cuda_backend.attention(q, k, v, scale=0.2, k_lens=torch.tensor([16, 9]))  # ragged: mask
    assert masks[0] is None and masks[1] is None
    assert masks[2] is not None and masks[2].dtype == torch.bool and masks[2].shape == (2, 1, 1, 16)
    assert masks[2][1, 0, 0, :9].all() and not masks[2][1, 0, 0, 9:].any()  # True = attend


def test_cuda_attention_without_sdpa_scale_kwarg(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch < 2.1 fallback: q pre-scaled so SDPA's implicit 1/sqrt(D) gives the wanted scale."""
    monkeypatch.setattr(cuda_backend, "SDPA_HAS_SCALE", False)
    q, k, v = (_randn(1, 33, 4, 64, seed=s) for s in (10, 11, 12))
    lens = torch.tensor([20])
    out = cuda_backend.attention(q, k, v, scale=0.05, k_lens=lens)
    assert rel_err(out, reference.attention(q, k, v, scale=0.05, k_lens=lens)) < 1e-5


def _fake_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    assert q.dtype in (torch.float16, torch.bfloat16) and dropout_p == 0.0 and not causal
    assert softmax_scale is not None, "softmax_scale must be passed"
    _fake_flash_attn_func.calls += 1
    return reference.attention(q, k, v, scale=softmax_scale)


def _fake_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 dropout_p=0.0, softmax_scale=None, causal=False):
    assert q.dim() == 3 and cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
    assert dropout_p == 0.0 and not causal and softmax_scale is not None
    out = torch.empty_like(q)
    for b in range(len(cu_seqlens_q) - 1):
        qs, qe, ks, ke = (int(x) for x in (cu_seqlens_q[b], cu_seqlens_q[b + 1], cu_seqlens_k[b], cu_seqlens_k[b + 1]))
        assert qe - qs <= max_seqlen_q and ke - ks <= max_seqlen_k
        out[qs:qe] = reference.attention(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], scale=softmax_scale)[0]
    _fake_flash_attn_varlen_func.calls += 1
    return out


def test_cuda_flash_attn_path_with_a_double(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flash-attn branch (dense and varlen packing) on CPU through signature-checking doubles."""
    _fake_flash_attn_func.calls = _fake_flash_attn_varlen_func.calls = 0
    monkeypatch.setattr(cuda_backend, "FLASH_ATTN_AVAILABLE", True)
    monkeypatch.setattr(cuda_backend, "_FLASH_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(cuda_backend, "_flash_attn_func", _fake_flash_attn_func)
    monkeypatch.setattr(cuda_backend, "_flash_attn_varlen_func", _fake_flash_attn_varlen_func)
    q, k, v = (_randn(2, 37, 4, 64, seed=s).bfloat16() for s in (13, 14, 15))
    for k_lens in (None, torch.tensor([37, 37]), torch.tensor([30, 30]), torch.tensor([37, 11])):
        out = cuda_backend.attention(q, k, v, scale=0.125, k_lens=k_lens)
        expected = reference.attention(q.float(), k.float(), v.float(), scale=0.125, k_lens=k_lens)
        assert out.dtype == torch.bfloat16 and rel_err(out, expected) <= ATTN_TOL[torch.bfloat16]
    assert (_fake_flash_attn_func.calls, _fake_flash_attn_varlen_func.calls) == (3, 1)
    # float32 never goes to flash-attn
    cuda_backend.attention(q.float(), k.float(), v.float(), scale=0.125)
    assert _fake_flash_attn_func.calls == 3


# ----------------------------------------------------------------------------- rotary


def rope_angles(grid: Tuple[int, int, int], head_dim: int) -> torch.Tensor:
    """Spec's 3-D RoPE angles in float64, `[f*h*w, head_dim/2]` (frame, row, column groups)."""
    c = head_dim // 2
    groups = (c - 2 * (c // 3), c // 3, c // 3)
    widths = (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))
    f, h, w = grid
    pos = torch.stack(torch.meshgrid(
        torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"), dim=-1).reshape(-1, 3).double()
    parts = []
    for axis, (pairs, width) in enumerate(zip(groups, widths)):
        freqs = 10000.0 ** (-2.0 * torch.arange(pairs, dtype=torch.float64) / width)
        parts.append(pos[:, axis, None] * freqs)
    return torch.cat(parts, dim=-1)


def rope_tables(angles: torch.Tensor, seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """`[1, S, 1, D]` float32 cos/sin with every angle repeated twice; rows >= L are identity."""
    length, half = angles.shape
    cos = torch.ones(seq_len, 2 * half, dtype=torch.float64)
    sin = torch.zeros(seq_len, 2 * half, dtype=torch.float64)
    cos[:length] = angles.cos().repeat_interleave(2, dim=-1)
    sin[:length] = angles.sin().repeat_interleave(2, dim=-1)
    return cos.float()[None, :, None, :], sin.float()[None, :, None, :]


def rope_complex64(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """The spec's rotation `(x[2k] + i x[2k+1]) * e^{i a}` in float64 complex; returns float32."""
    length = angles.shape[0]
    xd = x.double()
    pairs = torch.view_as_complex(xd[:, :length].unflatten(-1, (-1, 2)).contiguous())
    rotated = torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)[None, :, None, :])
    out = xd.clone()
    out[:, :length] = rotated.flatten(-2)
    return out.float()


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("head_dim,grid,pad", [(128, (4, 16, 16), 0), (128, (3, 7, 9), 5), (48, (2, 5, 6), 3)])
def test_rotary_matches_float64_complex_rope(backend: str, head_dim: int, grid: Tuple[int, int, int], pad: int) -> None:
    module, device = BACKENDS[backend]
    angles = rope_angles(grid, head_dim)
    seq_len = angles.shape[0] + pad
    x = _randn(1, seq_len, 8, head_dim, seed=16)
    cos, sin = rope_tables(angles, seq_len)
    out = module.rotary(x.to(device), cos.to(device), sin.to(device)).cpu()
    expected = rope_complex64(x, angles)
    assert out.dtype == torch.float32
    assert rel_err(out, expected) <= 1e-6
    if pad:  # padding tokens pass through unrotated
        assert torch.equal(out[:, -pad:], x[:, -pad:])


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("batch,seq_len", [(1, 1024), (2, 129)])
def test_rotary_matches_reference(backend: str, dtype: torch.dtype, batch: int, seq_len: int) -> None:
    module, device = BACKENDS[backend]
    angles = rope_angles((seq_len, 1, 1), HEAD_DIM)
    cos, sin = rope_tables(angles, seq_len)
    x = _randn(batch, seq_len, HEADS, HEAD_DIM, seed=17).to(dtype)
    expected = reference.rotary(x.float(), cos, sin)
    out = module.rotary(x.to(device), cos.to(device), sin.to(device))
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, expected) <= ROTARY_TOL[dtype]


def test_rotary_golden(golden) -> None:
    """The golden 3-D RoPE case (reference release, float32 out) through every backend."""
    from safetensors.torch import load_file

    data = load_file(str(golden / "dit.safetensors"))
    x, grid = data["rope_in"], tuple(int(n) for n in data["grid"][0])
    angles = rope_angles(grid, x.shape[-1])
    cos, sin = rope_tables(angles, x.shape[1])
    for module, device in BACKENDS.values():
        out = module.rotary(x.to(device), cos.to(device), sin.to(device))
        assert rel_err(out, data["rope_out"]) <= 1e-6


# ----------------------------------------------------------------------------- norms


def _norm_inputs(batch: int, seq_len: int, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Offset + spread like real activations, so float32 normalisation actually matters.
    x = (_randn(batch, seq_len, DIM, seed=20, scale=3.0) + 0.5).to(dtype)
    weight = (1 + 0.2 * _randn(DIM, seed=21)).to(dtype)
    bias = (0.1 * _randn(DIM, seed=22)).to(dtype)
    return x, weight, bias


NORM_SHAPES = [(1, 300), (2, 77)]


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("batch,seq_len", NORM_SHAPES)
def test_rms_norm_matches_reference(backend: str, dtype: torch.dtype, batch: int, seq_len: int) -> None:
    module, device = BACKENDS[backend]
    x, weight, _ = _norm_inputs(batch, seq_len, dtype)
    expected = reference.rms_norm(x.float(), weight.float(), 1e-6)
    out = module.rms_norm(x.to(device), weight.to(device), 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, expected) <= NORM_TOL[dtype]


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_layer_norm_matches_reference(backend: str, dtype: torch.dtype, affine: bool) -> None:
    module, device = BACKENDS[backend]
    x, weight, bias = _norm_inputs(2, 77, dtype)
    w, b = (weight, bias) if affine else (None, None)
    expected = reference.layer_norm(x.float(), *((t.float() if t is not None else None) for t in (w, b)), 1e-6)
    out = module.layer_norm(x.to(device), *((t.to(device) if t is not None else None) for t in (w, b)), 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, expected) <= NORM_TOL[dtype]


MODULATION_SHAPES = {
    "per_sample_b1": (1, 300, (1, 1, DIM)),
    "per_sample_b2": (2, 77, (2, 1, DIM)),
    "shared_vector_b2": (2, 77, (DIM,)),
    "per_token_b1": (1, 129, (1, 129, DIM)),
}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape", list(MODULATION_SHAPES))
def test_layer_norm_modulate_matches_reference(backend: str, dtype: torch.dtype, shape: str) -> None:
    module, device = BACKENDS[backend]
    batch, seq_len, mod_shape = MODULATION_SHAPES[shape]
    x, _, _ = _norm_inputs(batch, seq_len, dtype)
    scale = 0.3 * _randn(*mod_shape, seed=23)  # float32, as the model's modulation
    shift = 0.3 * _randn(*mod_shape, seed=24)
    expected = reference.layer_norm_modulate(x.float(), scale, shift, 1e-6)
    out = module.layer_norm_modulate(x.to(device), scale.to(device), shift.to(device), 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, expected) <= NORM_TOL[dtype]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_mixed_dtype_results_follow_the_reference(backend: str) -> None:
    """bf16 activations with float32 weights: same result dtype (type promotion) as the reference."""
    module, device = BACKENDS[backend]
    x, weight, bias = _norm_inputs(1, 33, torch.bfloat16)
    weight32, bias32 = weight.float(), bias.float()
    for name, args in (("rms_norm", (x, weight32, 1e-6)), ("layer_norm", (x, weight32, bias32, 1e-6))):
        expected = getattr(reference, name)(*args)
        out = getattr(module, name)(*(a.to(device) if isinstance(a, torch.Tensor) else a for a in args))
        assert out.dtype == expected.dtype == torch.float32, name
        # The normalised value is rounded to bf16 before the float32 weight multiply, so a device
        # whose float32 LN differs in the last bit can flip one bf16 rounding (seen on CUDA: 2e-4).
        assert rel_err(out, expected) <= (1e-5 if device == "cpu" else NORM_TOL[torch.bfloat16]), name


# ----------------------------------------------------------------------------- selection


def _unconfigure() -> None:
    dispatch._default = None


def test_auto_picks_the_torch_fused_backend_named_for_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert kernels.configure("auto", "cpu") == "torch"
    assert kernels.current_backend() == "torch"
    assert kernels.resolve_backend("auto", "cuda") == "cuda"
    assert kernels.resolve_backend("reference", "cpu") == "reference"  # only when asked for


@pytest.mark.parametrize("name", ["torch", "cuda", "TORCH"])
def test_torch_fused_backend_accepts_both_names_on_any_device(name: str) -> None:
    """`cuda` stays accepted (backward compatibility); on the CPU it is reported as `torch`."""
    assert kernels.configure(name, "cpu") == "torch"
    assert kernels.resolve_backend(name, "cuda") == "cuda"
    assert kernels.select(name, "cpu").module is cuda_backend
    x, weight, _ = _norm_inputs(1, 8, torch.float32)
    assert torch.equal(kernels.rms_norm(x, weight, 1e-6), cuda_backend.rms_norm(x, weight, 1e-6))


def test_env_var_chooses_on_first_call(monkeypatch: pytest.MonkeyPatch) -> None:
    _unconfigure()
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    x, weight, _ = _norm_inputs(1, 8, torch.float32)
    kernels.rms_norm(x, weight, 1e-6)
    assert kernels.current_backend() == "reference"


@pytest.mark.parametrize("given", [None, "auto"])
def test_env_var_decides_when_no_backend_is_given(monkeypatch: pytest.MonkeyPatch, given: Optional[str]) -> None:
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert kernels.select(given, "cpu").name == "reference"
    assert kernels.select("torch", "cpu").name == "torch"  # an explicit backend wins over the variable


def test_no_env_var_auto_resolves_from_the_first_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    _unconfigure()
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    kernels.layer_norm(torch.randn(2, 8), None, None, 1e-6)
    assert kernels.current_backend() == "torch"


def test_unknown_backend_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="unknown backend 'tpu'"):
        kernels.configure("tpu")
    _unconfigure()
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with pytest.raises(ConfigError, match="^WANENGINE_KERNEL_BACKEND='triton': not a kernel backend"):
        kernels.rms_norm(torch.randn(4), torch.ones(4), 1e-6)
    with pytest.raises(ConfigError, match="^WANENGINE_KERNEL_BACKEND="):
        kernels.select("auto", "cpu")


def test_npu_without_torch_npu_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # makes it unimportable even if installed
    with pytest.raises(ConfigError, match="torch_npu"):
        kernels.configure("npu")
    assert kernels.resolve_backend("auto", "cpu") == "torch"


def _spy_on_reference(monkeypatch: pytest.MonkeyPatch) -> List[str]:
    seen: List[str] = []
    for name in ("attention", "rotary", "rms_norm", "layer_norm", "layer_norm_modulate"):
        monkeypatch.setattr(reference, name, lambda *a, _n=name, **k: seen.append(_n))
    return seen


def test_public_functions_route_to_the_configured_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    kernels.configure("reference")
    seen = _spy_on_reference(monkeypatch)
    q = torch.randn(1, 4, 2, 16)
    kernels.attention(q, q, q, scale=0.25)
    kernels.rotary(q, q[:, :, :1], q[:, :, :1])
    kernels.rms_norm(q, q, 1e-6)
    kernels.layer_norm(q, None, None, 1e-6)
    kernels.layer_norm_modulate(q, q, q, 1e-6)
    assert seen == ["attention", "rotary", "rms_norm", "layer_norm", "layer_norm_modulate"]


def test_a_bound_backend_wins_over_the_process_default_and_is_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    kernels.configure("torch", "cpu")
    seen = _spy_on_reference(monkeypatch)
    x = torch.randn(2, 8)
    with kernels.use(kernels.select("reference", "cpu")):
        assert kernels.current_backend() == "reference"
        kernels.layer_norm(x, None, None, 1e-6)
        with kernels.use(kernels.select("torch", "cpu")):  # nested bindings: innermost wins
            kernels.layer_norm(x, None, None, 1e-6)
        kernels.rms_norm(x, torch.ones(8), 1e-6)
    kernels.layer_norm(x, None, None, 1e-6)
    assert seen == ["layer_norm", "rms_norm"] and kernels.current_backend() == "torch"


def test_bindings_are_per_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A binding made in one thread is invisible to another (the HTTP service runs engines in
    worker threads): each thread sees its own, or the process default."""
    kernels.configure("torch", "cpu")
    inside = threading.Event()
    release = threading.Event()
    seen: Dict[str, Optional[str]] = {}

    def worker() -> None:
        with kernels.use(kernels.select("reference", "cpu")):
            seen["worker"] = kernels.current_backend()
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    assert inside.wait(10)
    seen["main, while the worker is bound"] = kernels.current_backend()
    release.set()
    thread.join(10)
    assert seen == {"worker": "reference", "main, while the worker is bound": "torch"}


# ----------------------------------------------------------------------------- per-engine backends


def _small_run(engine) -> torch.Tensor:
    from helpers import golden_dir

    video = engine.i2v(golden_dir() / "input.png", "a cat", max_area=48 * 32, frame_num=5, steps=2, seed=11)
    return video.latent


@pytest.fixture(scope="module")
def two_engines(golden_ckpt):
    """A `reference` engine, and a `torch` engine built after it, in one process."""
    from wanengine import Engine, EngineConfig

    def build(backend: str):
        return Engine(EngineConfig(ckpt_dir=str(golden_ckpt), device="cpu", dtype="float32", kernel_backend=backend,
                                   progress=False))

    first = build("reference")
    first_alone = _small_run(first)  # the only engine so far
    second = build("torch")
    return first, first_alone, second, _small_run(second)


def test_each_engine_keeps_its_own_kernels(two_engines) -> None:
    first, first_alone, second, second_alone = two_engines
    assert (first.kernel_backend, second.kernel_backend) == ("reference", "torch")
    assert not torch.equal(first_alone, second_alone)  # the backends differ (~1e-6), so the test can see a switch
    assert torch.equal(_small_run(first), first_alone)  # building the second engine changed nothing
    assert torch.equal(_small_run(second), second_alone)


def test_engines_in_worker_threads_keep_their_own_kernels(two_engines) -> None:
    """Both engines at once, each in its own worker thread (as the HTTP service runs them)."""
    from concurrent.futures import ThreadPoolExecutor

    first, first_alone, second, second_alone = two_engines
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(_small_run, engine) for engine in (first, second, first, second)]
        results = [f.result(timeout=120) for f in futures]
    for got, want in zip(results, (first_alone, second_alone) * 2):
        assert torch.equal(got, want)
    assert dispatch._bound.get() is None


def test_engine_default_backend_follows_the_environment(golden_ckpt, monkeypatch: pytest.MonkeyPatch) -> None:
    from wanengine import Engine, EngineConfig

    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    engine = Engine(EngineConfig(ckpt_dir=str(golden_ckpt), device="cpu", dtype="float32", progress=False))
    assert engine.kernel_backend == "reference"
    assert engine.kernel_set.module is reference


def test_invalid_environment_backend_stops_the_cli_before_any_weight(golden, golden_ckpt, tmp_path,
                                                                     monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from wanengine import cli
    from wanengine.engine import Engine

    def no_loading(self) -> None:
        raise AssertionError("weights were loaded despite the invalid backend")

    monkeypatch.setattr(Engine, "_load", no_loading)
    monkeypatch.setenv(dispatch.ENV_VAR, "fastest")
    out = tmp_path / "never.mp4"
    with pytest.raises(SystemExit) as info:
        cli.main(["--quiet", "i2v", "--ckpt-dir", str(golden_ckpt), "--image", str(golden / "input.png"),
                  "--prompt", "a cat", "--max-area", str(48 * 32), "--frame-num", "5", "--device", "cpu",
                  "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["wanengine: error: WANENGINE_KERNEL_BACKEND='fastest': not a kernel backend; "
                   "choose one of auto, reference, torch, cuda, npu"]
    assert not out.exists()
