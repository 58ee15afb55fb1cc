"""Backend selection for the kernels layer: chosen once per engine, bound per call.

Backends (modules of this package):
- `reference` (`reference.py`): plain torch math, the accuracy baseline.
- the torch-fused backend (`cuda.py`): SDPA attention (flash-attn on CUDA when installed),
  `F.rms_norm`, one-pass LayerNorm+modulate, complex-multiply RoPE. It is the fast path on
  the CPU too, so it is reported for what it is on the device: `cuda` on a CUDA device,
  `torch` elsewhere. `torch` and `cuda` are accepted as names for it on any device.
- `npu` (`npu_backend.py`): `torch_npu` fused operators.

`auto` resolves from the device and what is importable: an `npu` device with `torch_npu`
importable -> `npu`; any other device -> the torch-fused backend. `reference` is only ever
chosen explicitly. When no backend is given (None or `auto`), `WANENGINE_KERNEL_BACKEND`
decides if it is set; an unknown value there is a ConfigError naming the variable.

Who uses which backend:
- `select()` resolves a backend once and returns it as a `KernelBackend`; `use()` binds it to
  the calling context (a `contextvars.ContextVar`, so it is per thread and per asyncio task).
  Each `Engine` selects its own and binds it around its own work (`using_own_kernels`), so
  two engines in one process -- or one in a worker thread -- never switch each other's kernels.
- Outside any binding (library users calling models directly, benchmarks), calls use the
  process default set by `configure()`, or, failing that, chosen on first use from the
  environment variable and the device of the first tensor seen.

Every public kernel function looks its implementation up with `_impl(tensor)`; a new kernel
is one more function of that form here plus the same-named function in each backend module.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Iterator, Optional, TypeVar, Union

import torch

from ..errors import ConfigError, InvalidArgument

BACKEND_NAMES = ("auto", "reference", "torch", "cuda", "npu")
ENV_VAR = "WANENGINE_KERNEL_BACKEND"

# Requested name -> module of this package implementing it.
_MODULE_BY_NAME = {"reference": "reference", "torch": "cuda", "cuda": "cuda", "npu": "npu_backend"}

DeviceLike = Union[str, torch.device, None]


@dataclass(frozen=True)
class KernelBackend:
    """A resolved backend: the name it is reported by and the module implementing the kernels."""

    name: str
    module: ModuleType


_bound: "contextvars.ContextVar[Optional[KernelBackend]]" = contextvars.ContextVar("wanengine_kernels", default=None)
_default: Optional[KernelBackend] = None  # the process default, for calls outside any binding


def _torch_npu_importable() -> bool:
    return importlib.util.find_spec("torch_npu") is not None


def _device_type(device: DeviceLike) -> str:
    """`"npu"` for "npu:0" without `torch.device` (which only knows "npu" once torch_npu is imported)."""
    if device is None:
        return "cpu"
    return device.split(":")[0] if isinstance(device, str) else device.type


def requested_backend(name: Optional[str]) -> str:
    """The backend asked for: `name`, or for None/`auto` the environment variable if set.

    Raises ConfigError for an unknown name, naming the environment variable when it came from there.
    """
    name = (name or "auto").strip().lower()
    if name not in BACKEND_NAMES:
        raise InvalidArgument("kernel_backend", f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if name == "auto":
        from_env = os.environ.get(ENV_VAR, "").strip().lower()
        if from_env:
            if from_env not in BACKEND_NAMES:
                raise ConfigError(f"{ENV_VAR}={from_env!r}: not a kernel backend; choose one of {', '.join(BACKEND_NAMES)}")
            name = from_env
    return name


def resolve_backend(name: Optional[str], device: DeviceLike = None) -> str:
    """Map a requested backend name (None/`auto` included) to the name of a concrete one.

    The torch-fused backend comes back as `cuda` on a CUDA device and `torch` elsewhere.
    """
    name = requested_backend(name)
    device_type = _device_type(device)
    if name == "npu" and not _torch_npu_importable():
        raise InvalidArgument("kernel_backend", "npu: torch_npu is not importable (install the 'npu' extra on an "
                                                "Ascend host)")
    if name == "auto":
        name = "npu" if device_type == "npu" and _torch_npu_importable() else "torch"
    if name in ("torch", "cuda"):
        # On the CPU too it beats the reference math (SDPA's flash kernel instead of
        # materialised scores, one-pass norms) at float32 parity (~1e-6).
        return "cuda" if device_type == "cuda" else "torch"
    return name


def select(name: Optional[str] = None, device: DeviceLike = None) -> KernelBackend:
    """Resolve `name` for `device` and import its module (once per process, by Python's cache)."""
    concrete = resolve_backend(name, device)
    return KernelBackend(concrete, importlib.import_module(f"{__package__}.{_MODULE_BY_NAME[concrete]}"))


@contextlib.contextmanager
def use(backend: KernelBackend) -> Iterator[KernelBackend]:
    """Run the kernels of `backend` for every kernel call made in this context (thread/task)."""
    token = _bound.set(backend)
    try:
        yield backend
    finally:
        _bound.reset(token)


Method = TypeVar("Method", bound=Callable[..., Any])


def using_own_kernels(method: Method) -> Method:
    """Decorate a method of an object holding a `kernel_set: KernelBackend` (an `Engine`):
    the method's kernel calls run on that object's backend, whatever else runs in the process."""

    @functools.wraps(method)
    def bound_method(self: Any, *args: Any, **kwargs: Any) -> Any:
        with use(self.kernel_set):
            return method(self, *args, **kwargs)

    return bound_method  # type: ignore[return-value]


def configure(name: Optional[str] = "auto", device: DeviceLike = None) -> str:
    """Set the process default backend (used outside any `use()` binding); returns its name."""
    global _default
    _default = select(name, device)
    return _default.name


def current_backend() -> Optional[str]:
    """The backend kernel calls made here would use: the bound one, else the process default
    (None before the first configure/call)."""
    backend = _bound.get() or _default
    return backend.name if backend is not None else None


def _impl(sample: torch.Tensor) -> ModuleType:
    backend = _bound.get()
    if backend is None:
        if _default is None:
            configure(None, sample.device)
        backend = _default
    assert backend is not None
    return backend.module


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
