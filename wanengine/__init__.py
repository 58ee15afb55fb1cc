"""wanengine: a layered inference engine for Wan2.2-I2V-A14B image-to-video.

    from wanengine import Engine, EngineConfig
    video = Engine(EngineConfig(ckpt_dir="Wan2.2-I2V-A14B")).i2v("image.jpg", "a prompt")
    video.save("out.mp4")
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Engine", "EngineConfig", "GenerationOptions", "Video", "StepInfo", "GenerationCancelled",
           "InvalidArgument", "__version__"]


def __getattr__(name: str) -> Any:  # lazy: `import wanengine` must not import torch eagerly
    if name == "Engine":
        from .engine import Engine
        return Engine
    if name in ("EngineConfig", "GenerationOptions"):
        from . import config
        return getattr(config, name)
    if name == "Video":
        from .io.video import Video
        return Video
    if name == "StepInfo":  # what on_step receives
        from .pipeline import StepInfo
        return StepInfo
    if name in ("GenerationCancelled", "InvalidArgument"):
        from . import errors
        return getattr(errors, name)
    raise AttributeError(f"module 'wanengine' has no attribute {name!r}")
