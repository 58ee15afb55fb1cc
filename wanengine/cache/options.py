"""Step-cache options and their validation, without importing torch (`config.py` calls
`validate_cache_options` from `EngineConfig.validate`).

Every problem is one `InvalidArgument` naming the `EngineConfig` field (the CLI prints the flag).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import InvalidArgument

POLICIES = ("off", "first-block", "mag")
RECORD = "record"  # internal policy of `wanengine calibrate-cache`: never skips, records the mag table


@dataclass(frozen=True)
class CacheSettings:
    """What a step cache does; see `wanengine.cache` for the rules.

    Attributes:
        policy: "first-block", "mag" (or the internal "record" of calibrate-cache).
        threshold: skip while the accumulated change stays below this (0 never skips).
        warmup: steps computed in full after each expert switch (the state is reset there).
        max_skips: at most this many consecutive skipped steps (None: no limit).
        table: path of the mag table (policy "mag").
    """

    policy: str
    threshold: float = 0.0
    warmup: int = 1
    max_skips: Optional[int] = None
    table: Optional[str] = None


def validate_cache_options(cfg: Any) -> None:
    """Check the step-cache fields of an `EngineConfig` (duck-typed to keep this torch-free)."""
    policy, threshold = cfg.step_cache, cfg.cache_threshold
    if policy not in POLICIES:
        raise InvalidArgument("step_cache", f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if policy == "off":
        for field, value in (("cache_threshold", threshold), ("cache_max_skips", cfg.cache_max_skips),
                             ("cache_table", cfg.cache_table)):
            if value is not None:
                raise InvalidArgument.for_argument(field, lambda words: (
                    f"only used by a step cache; set {words.setting('step_cache', 'first-block')} or "
                    f"{words.setting('step_cache', 'mag')}"))
        return
    if threshold is None:
        raise InvalidArgument.for_argument("cache_threshold", lambda words: (
            f"required with {words.setting('step_cache', policy)} (0 never skips; the README gives starting values)"))
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
            or threshold < 0:
        raise InvalidArgument("cache_threshold", f"must be a finite number >= 0, got {threshold!r}")
    warmup = cfg.cache_warmup
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise InvalidArgument("cache_warmup", f"must be an integer >= 0, got {warmup!r}")
    skips = cfg.cache_max_skips
    if skips is not None and (isinstance(skips, bool) or not isinstance(skips, int) or skips < 1):
        raise InvalidArgument("cache_max_skips", f"must be an integer >= 1, got {skips!r}")
    if policy == "mag" and not cfg.cache_table:
        raise InvalidArgument.for_argument("cache_table", lambda words: (
            f"{words.setting('step_cache', 'mag')} needs a table (record one with `wanengine calibrate-cache`)"))
    if policy != "mag" and cfg.cache_table:
        raise InvalidArgument.for_argument("cache_table", lambda words: (
            f"only used by {words.setting('step_cache', 'mag')}, not {policy}"))
    if not cfg.cfg_batch and cfg.cfg_size == 1:
        raise InvalidArgument.for_argument("step_cache", lambda words: (
            f"the cache decides once per step for both guidance branches, so they must run in one forward "
            f"(batched CFG, the default) or on two groups ({words.setting('cfg_size', 2)}); drop "
            f"{words.setting('cfg_batch', False)}"))


def settings_from_config(cfg: Any) -> Optional[CacheSettings]:
    """The `CacheSettings` of a validated `EngineConfig`, or None when the cache is off."""
    if cfg.step_cache == "off":
        return None
    return CacheSettings(policy=cfg.step_cache, threshold=float(cfg.cache_threshold), warmup=cfg.cache_warmup,
                         max_skips=cfg.cache_max_skips, table=cfg.cache_table)
