"""The command-line options of adapters and the step cache, shared by `i2v` and `serve`
(torch-free, like `cli_weights` and `cli_quant`), and the `EngineConfig` fields they set."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import typer

ADAPTERS = "Few-step and LoRA"
STEP_CACHE = "Step cache"
_ADAPTER = "<path[:strength]>"


def lora_option(panel: str = ADAPTERS):
    return typer.Option(None, "--lora", rich_help_panel=panel, metavar=_ADAPTER,
                        help="Adapter for both experts (repeatable; adapters add up).")


def lora_high_option(panel: str = ADAPTERS):
    return typer.Option(None, "--lora-high", rich_help_panel=panel, metavar=_ADAPTER,
                        help="Adapter for the high-noise expert (repeatable).")


def lora_low_option(panel: str = ADAPTERS):
    return typer.Option(None, "--lora-low", rich_help_panel=panel, metavar=_ADAPTER,
                        help="Adapter for the low-noise expert (repeatable).")


def step_cache_option(panel: str = STEP_CACHE):
    return typer.Option("off", "--step-cache", rich_help_panel=panel,
                        help="off, first-block or mag: skip DiT blocks on steps that change little.")


def cache_threshold_option(panel: str = STEP_CACHE):
    return typer.Option(None, "--cache-threshold", rich_help_panel=panel, show_default="required with a cache",
                        help="Skip while the accumulated change stays below this (0 never skips).")


def cache_warmup_option(panel: str = STEP_CACHE):
    return typer.Option(1, "--cache-warmup", rich_help_panel=panel,
                        help="Steps always computed after each expert switch.")


def cache_max_skips_option(panel: str = STEP_CACHE):
    return typer.Option(None, "--cache-max-skips", rich_help_panel=panel, show_default="no limit",
                        help="At most this many consecutive skipped steps.")


def cache_table_option(panel: str = STEP_CACHE):
    return typer.Option(None, "--cache-table", rich_help_panel=panel,
                        help="Mag table JSON (from `wanengine calibrate-cache`); it fixes the step count.")


def runtime_fields(lora: Optional[Sequence[str]], lora_high: Optional[Sequence[str]],
                   lora_low: Optional[Sequence[str]], step_cache: str, cache_threshold: Optional[float],
                   cache_warmup: int, cache_max_skips: Optional[int], cache_table: Optional[Path]) -> Dict[str, Any]:
    """The `EngineConfig` fields of these options (adapter flags parsed into `LoraSpec`s)."""
    from .adapters.spec import lora_specs_from_flags

    return {"loras": tuple(lora_specs_from_flags(lora or (), lora_high or (), lora_low or ())),
            "step_cache": step_cache, "cache_threshold": cache_threshold, "cache_warmup": cache_warmup,
            "cache_max_skips": cache_max_skips, "cache_table": str(cache_table) if cache_table else None}
