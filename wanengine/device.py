"""Device and dtype resolution shared by the engine and the CLI."""
from __future__ import annotations

import importlib.util
from typing import Callable, Optional

import torch

from .errors import ConfigError

DTYPE_BY_NAME = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


from .runtime_env import ASCEND_ENV, ascend_environment_defaults  # noqa: E402,F401 (torch-free, re-exported)


_ascend_runtime_configured = False


def configure_ascend_runtime() -> None:
    """Inference settings of the reference Ascend port, applied once per process: no JIT
    compilation of operators (binary kernels; `npu_rotary_mul`'s interleave mode raises
    without it), and no private NPU tensor formats leaking into user tensors.

    Called when an NPU device is prepared and when the `npu` kernels backend is imported, so
    the settings hold whichever way the npu kernels were chosen."""
    global _ascend_runtime_configured
    if _ascend_runtime_configured:
        return
    ascend_environment_defaults()
    import torch_npu

    torch_npu.npu.set_compile_mode(jit_compile=False)
    # `torch.npu` is `torch_npu.npu` once torch_npu is imported; the setting is write-only.
    npu_module = getattr(torch, "npu", None) or torch_npu.npu
    npu_module.config.allow_internal_format = False
    _ascend_runtime_configured = True


def npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    ascend_environment_defaults()
    import torch_npu  # noqa: F401  (registers torch.npu)

    return bool(getattr(torch, "npu", None) and torch.npu.is_available())


def resolve_device(name: Optional[str]) -> torch.device:
    """None -> npu if available, else cuda if available, else cpu; a named accelerator that is
    not available is a ConfigError."""
    if name is None:
        if npu_available():
            return torch.device("npu")
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    # Checked on the name: torch only knows the "npu" device type once torch_npu is imported.
    if name.split(":")[0] == "npu" and not npu_available():
        raise ConfigError(f"--device {name}: no Ascend NPU (torch_npu) is available on this machine")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return device


def prepare_device(device: torch.device) -> None:
    """One-time runtime settings for the chosen device."""
    if device.type == "npu":
        configure_ascend_runtime()


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPE_BY_NAME[name]
    except KeyError:
        raise ConfigError(f"--dtype: {name!r} is not one of {', '.join(DTYPE_BY_NAME)}") from None


def synchronizer(device: torch.device) -> Optional[Callable[[], None]]:
    """A function that waits for queued work on `device` (None on the CPU)."""
    if device.type == "cuda":
        return torch.cuda.synchronize
    if device.type == "npu":
        return torch.npu.synchronize  # type: ignore[attr-defined]
    return None


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "npu":
        torch.npu.empty_cache()  # type: ignore[attr-defined]
