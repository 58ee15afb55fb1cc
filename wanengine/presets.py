"""Named bundles of sampling options (`--preset`); explicitly given options override them.

`distill-4step` is how step-distilled Wan2.2-I2V-A14B weights (the Lightning / LightX2V 4-step
LoRA adapters or full distilled experts) are sampled: flow Euler on 1000, 750, 500, 250 with
shift 5.0 and guidance off (1.0 on both experts), i.e. 4 DiT forwards per video instead of 80.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

from .errors import InvalidArgument

# Values keyed by `GenerationOptions` field names (also `Engine.i2v` keyword names).
PRESETS: Dict[str, Dict[str, Any]] = {
    "distill-4step": {"solver": "euler", "steps": 4, "shift": 5.0, "guide_scale": (1.0, 1.0)},
}


def preset_values(name: str) -> Dict[str, Any]:
    """The options preset `name` sets, e.g. `engine.i2v(img, prompt, **preset_values("distill-4step"))`."""
    key = name.strip().lower()
    if key not in PRESETS:
        raise InvalidArgument("preset", f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[key])


def resolve_with_preset(name: str, explicit: Mapping[str, Any], defaults: Mapping[str, Any]) -> Dict[str, Any]:
    """Per option: the explicitly given value, else the preset's, else the default."""
    preset = preset_values(name) if name else {}
    return {k: explicit[k] if k in explicit else preset.get(k, defaults[k]) for k in defaults}
