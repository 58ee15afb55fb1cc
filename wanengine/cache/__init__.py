"""Step caches: skip most of a DiT forward on denoising steps whose result barely changes,
applied from outside to the unchanged experts (the model never learns about it).

- `options`: the policies (`off`, `first-block`, `mag`) and their validation (torch-free).
- `table`: the mag table format (JSON per expert and guidance branch), load / save.
- `state`: one generation's state: steps, expert switches, per-branch tensors, the report.
- `policies`: the block loops that decide and skip; parallel-safe statistics.
- `apply`: `StepCache`, which the engine attaches to its experts.
- `calibrate`: records a mag table from a real run (`wanengine calibrate-cache`).
- `memory`: the bytes a cache keeps, for `plan`.

Never skipped: the first `warmup` steps after each expert switch (the state is reset there),
the last step, and any step of a branch with nothing saved. Heavy imports are deferred so
that the CLI can import this package cheaply.
"""
from __future__ import annotations

from .options import POLICIES, CacheSettings, validate_cache_options

__all__ = ["POLICIES", "CacheSettings", "validate_cache_options"]
