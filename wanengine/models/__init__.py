"""Models with the released tensor names, and their loaders.

`load_tokenizer(ckpt_dir)`, `load_t5(path, *, device, dtype)`, `load_dit(expert_dir, *, device,
dtype)` and `load_vae(path, *, device, dtype)` read the released Wan2.2-I2V-A14B layout as is;
`load_t5`, `load_dit` and `load_vae` also read the other layouts users have (diffusers,
transformers, single files), renamed by the tables in `wanengine.io.formats`.
Imports are lazy so that `import wanengine.models` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_tokenizer": ".tokenizer",
    "Tokenizer": ".tokenizer",
    "load_t5": ".t5",
    "UMT5Encoder": ".t5",
    "load_dit": ".dit_loading",
    "WanDiT": ".dit",
    "DiTConfig": ".dit",
    "load_vae": ".vae",
    "WanVAE": ".vae",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
