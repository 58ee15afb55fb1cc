"""Recording a mag table (`wanengine calibrate-cache`): one real generation with every step
computed, recording per expert and guidance branch the ratio of the blocks' residual
magnitude at each step to the expert's previous step (see `table`)."""
from __future__ import annotations

from typing import Any

import torch

from .. import __version__
from .apply import StepCache
from .options import RECORD, CacheSettings
from .table import BRANCHES, MagTable, empty_ratios


def calibrate(engine: Any, image: Any, opts: Any, *, source: str = "calibrate-cache") -> MagTable:
    """Run `opts` on `image` (an opened RGB PIL image) with `engine` (an `Engine` built without a
    step cache) and return the recorded table. The video is not decoded: only the ratios count."""
    if engine.step_cache is not None:
        raise ValueError("calibrate needs an engine built without a step cache (step_cache='off')")
    cache = StepCache(CacheSettings(policy=RECORD), dtype=engine.dtype)
    cache.attach(engine.experts.experts, engine.cache_layout())
    engine.step_cache = cache
    engine.decode = _no_pixels  # per instance: a calibration needs no decoded frames
    try:
        video = engine.generate(image, opts)
    finally:
        del engine.decode
        engine.step_cache = None
        cache.detach()
    run = cache.last_run
    ratios = empty_ratios(run.steps)
    for expert, by_slot in run.recorded.items():
        for slot, values in by_slot.items():
            if slot < len(BRANCHES):
                ratios[expert][BRANCHES[slot]] = [None if v is None else round(float(v), 8) for v in values]
    settings = video.metadata["settings"]
    info = {"recorded_with": f"wanengine {__version__}", "experts": [r.expert for r in run.records],
            **{key: settings[key] for key in ("solver", "shift", "guide_scale", "frame_num", "seed", "prompt")},
            "frame_size": [8 * video.latent.shape[-1], 8 * video.latent.shape[-2]], "dtype": engine.cfg.dtype}
    return MagTable(run.steps, ratios, info, source)


def _no_pixels(latent: torch.Tensor) -> torch.Tensor:
    _, frames, lat_h, lat_w = latent.shape
    return torch.empty(3, 0, 8 * lat_h, 8 * lat_w, dtype=torch.float32, device=latent.device)
