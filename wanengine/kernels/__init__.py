"""The kernels layer: one public function per hot operation.

Models call only these functions (never `torch_npu` or `flash_attn` directly). The
implementation behind them -- `reference`, the torch-fused backend (reported as `torch`, or
`cuda` on a CUDA device) or `npu` -- is chosen once per engine (`select()`, from
`EngineConfig.kernel_backend`, or `WANENGINE_KERNEL_BACKEND` when that is `auto`) and bound
around the engine's work (`use()`), so engines in one process keep their own kernels.
Outside any binding the process default applies (`configure()`, else the environment
variable and the device of the first tensor seen). See `dispatch.py`.
"""
from .dispatch import (
    BACKEND_NAMES,
    ENV_VAR,
    KernelBackend,
    attention,
    configure,
    current_backend,
    layer_norm,
    layer_norm_modulate,
    linear8,
    requested_backend,
    resolve_backend,
    rms_norm,
    rotary,
    select,
    use,
    using_own_kernels,
)

__all__ = [
    "BACKEND_NAMES",
    "ENV_VAR",
    "KernelBackend",
    "attention",
    "configure",
    "current_backend",
    "layer_norm",
    "layer_norm_modulate",
    "linear8",
    "requested_backend",
    "resolve_backend",
    "rms_norm",
    "rotary",
    "select",
    "use",
    "using_own_kernels",
]
