"""Backend selection for the kernels layer, done once rather than per call.

Backends: `reference` (plain torch math, the accuracy baseline), `cuda` (torch's fused
operators -- SDPA attention, `F.rms_norm`, one-pass LayerNorm+modulate, complex-multiply
RoPE -- plus flash-attn on CUDA when installed; despite its name it is the fast path on the
CPU too) and `npu` (`torch_npu` fused operators).

`auto` resolves from the device and what is importable: an `npu` device with `torch_npu`
importable -> `npu`; any other device (CUDA or CPU) -> `cuda`. `reference` is only ever
chosen explicitly. The choice can be forced (`configure("npu")`, or
`WANENGINE_KERNEL_BACKEND=npu`), which is how tests drive the NPU path on CPU tensors through
a `torch_npu` test double.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType
from typing import Optional, Union

import torch

from ..errors import ConfigError

BACKEND_NAMES = ("auto", "reference", "cuda", "npu")
ENV_VAR = "WANENGINE_KERNEL_BACKEND"

_active: Optional[ModuleType] = None
_active_name: Optional[str] = None


def _torch_npu_importable() -> bool:
    return importlib.util.find_spec("torch_npu") is not None


def resolve_backend(name: str, device: Union[str, torch.device, None] = None) -> str:
    """Map a requested backend name (possibly `auto`) to a concrete one, or raise ConfigError."""
    name = (name or "auto").lower()
    if name not in BACKEND_NAMES:
        raise ConfigError(f"kernel_backend: unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if name != "auto":
        if name == "npu" and not _torch_npu_importable():
            raise ConfigError("kernel_backend=npu: torch_npu is not importable (install the 'npu' extra on an Ascend host)")
        return name
    device_type = torch.device(device).type if device is not None else "cpu"
    if device_type == "npu" and _torch_npu_importable():
        return "npu"
    # The torch-fused backend: on the CPU too it beats the reference math (SDPA's flash kernel
    # instead of materialised scores, one-pass norms) at float32 parity (~1e-6).
    return "cuda"


def configure(name: str = "auto", device: Union[str, torch.device, None] = None) -> str:
    """Choose the backend for all later kernel calls; returns the concrete backend name."""
    global _active, _active_name
    concrete = resolve_backend(name, device)
    _active = importlib.import_module(f"{__package__}.{'npu_backend' if concrete == 'npu' else concrete}")
    _active_name = concrete
    return concrete


def current_backend() -> Optional[str]:
    """The concrete backend in use, or None before the first configure/call."""
    return _active_name


def _impl(sample: torch.Tensor) -> ModuleType:
    if _active is None:
        configure(os.environ.get(ENV_VAR, "auto"), sample.device)
    assert _active is not None
    return _active


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
              k_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q k^T * scale) v on `[B, S, N, D]`; keys at index >= k_lens[b] are ignored."""
    return _impl(q).attention(q, k, v, scale=scale, k_lens=k_lens)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pairs rotary embedding of `x [B, S, N, D]` with `[1, S, 1, D]` tables."""
    return _impl(x).rotary(x, cos, sin)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: normalise in float32, cast back, multiply by weight."""
    return _impl(x).rms_norm(x, weight, eps)


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """LayerNorm over the last dim (optionally affine), normalised in float32."""
    return _impl(x).layer_norm(x, weight, bias, eps)


def layer_norm_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """Parameter-free LayerNorm followed by `* (1 + scale) + shift` (per-sample scale/shift)."""
    return _impl(x).layer_norm_modulate(x, scale, shift, eps)


def linear8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
            bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`x W^T + bias` for an 8-bit weight: `W = qweight.float() * scale` (`qweight [N, K]` int8 or
    float8_e4m3fn, `scale [N, 1]` float32); `x [..., K]`, result `[..., N]` in x's dtype."""
    return _impl(x).linear8(x, qweight, scale, bias)
