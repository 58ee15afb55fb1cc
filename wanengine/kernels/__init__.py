"""The kernels layer: one public function per hot operation.

Models call only these functions (never `torch_npu` or `flash_attn` directly). The
implementation behind them -- `reference`, `cuda` or `npu` -- is chosen once, by
`configure()` (the engine calls it from `EngineConfig.kernel_backend`) or, failing that,
on first use from the `WANENGINE_KERNEL_BACKEND` environment variable (default `auto`)
and the device of the first tensor seen.
"""
from .dispatch import (
    BACKEND_NAMES,
    attention,
    configure,
    current_backend,
    layer_norm,
    layer_norm_modulate,
    linear8,
    resolve_backend,
    rms_norm,
    rotary,
)

__all__ = [
    "BACKEND_NAMES",
    "attention",
    "configure",
    "current_backend",
    "layer_norm",
    "layer_norm_modulate",
    "linear8",
    "resolve_backend",
    "rms_norm",
    "rotary",
]
