"""The reference release's constants (`constants.json`, shipped with the package): default
negative prompt, VAE latent statistics, sizes and defaults. One place knows them."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict

_PATH = Path(__file__).with_name("constants.json")


@lru_cache(maxsize=1)
def constants() -> Dict[str, Any]:
    """The parsed constants.json (cached)."""
    return json.loads(_PATH.read_text(encoding="utf-8"))


def defaults() -> Dict[str, Any]:
    return constants()["defaults"]
