"""`StepCache`: the engine's step cache, applied from outside to the unchanged experts.

`attach` replaces each expert's `run_blocks` (per instance, as `parallel.ulysses` replaces
`forward`) with a function that runs the policy's block loop while a `CacheRun` is active and
the original method otherwise. Ulysses' forward calls `run_blocks` on its sequence chunk, so
the cache sees exactly the rows the rank computes; FSDP units are still called through
`__call__` (a skipped block simply never gathers its weights); offload moves parameters, not
the patch.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional

import torch
from torch import nn

from .options import CacheSettings, settings_from_config
from .policies import BLOCK_LOOPS
from .state import CacheLayout, CacheRun
from .table import MagTable, load_table


class StepCache:
    """Settings, the mag table and the patched experts of one engine; `begin(steps)` starts
    the state of one generation.

    Args:
        settings: policy, threshold, warm-up, consecutive-skip limit.
        table: the mag table (policy "mag").
        dtype: the run dtype the saved residuals are kept in.
    """

    def __init__(self, settings: CacheSettings, table: Optional[MagTable] = None,
                 dtype: torch.dtype = torch.float32) -> None:
        if settings.policy not in BLOCK_LOOPS:
            raise ValueError(f"unknown step-cache policy {settings.policy!r}")
        if settings.policy == "mag" and table is None:
            raise ValueError("the mag policy needs a table")
        self.settings, self.table, self.dtype = settings, table, dtype
        self.layout = CacheLayout()
        self.active: Optional[CacheRun] = None
        self.last_run: Optional[CacheRun] = None
        self._models: Dict[str, nn.Module] = {}

    @classmethod
    def from_config(cls, cfg: Any, dtype: torch.dtype) -> Optional["StepCache"]:
        """The cache an `EngineConfig` asks for (None when off); reads and checks the mag table,
        so a bad table fails before any weight is loaded."""
        settings = settings_from_config(cfg)
        if settings is None:
            return None
        table = load_table(settings.table) if settings.policy == "mag" else None
        return cls(settings, table, dtype)

    # ------------------------------------------------------------------ the patch
    def attach(self, experts: Dict[str, nn.Module], layout: CacheLayout = CacheLayout()) -> None:
        """Patch every expert's `run_blocks`; `layout` says where this rank sits."""
        self.layout = layout
        for name, model in experts.items():
            apply_step_cache(model, name, self)
            self._models[name] = model

    def detach(self) -> None:
        for model in self._models.values():
            remove_step_cache(model)
        self._models.clear()

    # ------------------------------------------------------------------ one generation
    def check_steps(self, steps: int) -> None:
        """A table is valid for the step count it was recorded with only (ConfigError)."""
        if self.table is not None:
            self.table.check_steps(steps)

    def begin(self, steps: int, cond_only: Iterable[str] = ()) -> CacheRun:
        """The state of a generation of `steps` steps; use it as a context manager around the
        denoising loop and pass the expert provider through `run.track`. `cond_only`: experts
        whose steps run the conditional branch only (guidance off) -- under CFG parallel only
        group 0 computes those, so their decisions are agreed there."""
        self.check_steps(steps)
        if self.active is not None:
            raise RuntimeError("step cache: a generation is already running on this engine")
        self.active = CacheRun(self.settings, self.table, self.layout, steps, self.dtype, self._closed,
                               frozenset(cond_only))
        return self.active

    def _closed(self, run: CacheRun) -> None:
        if self.active is run:
            self.active, self.last_run = None, run


def apply_step_cache(model: nn.Module, expert: str, cache: StepCache) -> nn.Module:
    """Replace `model.run_blocks` (this instance only) by the cache's block loop for `expert`."""
    original = model.run_blocks
    block_loop = BLOCK_LOOPS[cache.settings.policy]

    def run_blocks(tokens: torch.Tensor, inputs, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        run = cache.active
        if run is None:  # outside a generation (e.g. a direct model call): the model as it is
            return original(tokens, inputs, cos, sin)
        if run.expert != expert:
            raise RuntimeError(f"step cache: {expert} called in a step announced for {run.expert}")
        return block_loop(run, model, tokens, inputs, cos, sin)

    model.run_blocks = run_blocks
    return model


def remove_step_cache(model: nn.Module) -> nn.Module:
    """Undo `apply_step_cache`."""
    model.__dict__.pop("run_blocks", None)
    return model
