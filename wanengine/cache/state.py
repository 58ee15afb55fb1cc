"""Per-generation state of the step cache: which step and expert are running, each guidance
branch's saved tensors and accumulators, the step decisions and the report.

Slots: the samples of a step's forward are its guidance branches. On one process the forward
of a step holds all of them (batched CFG: sample 0 cond, 1 uncond; guidance off: one sample);
under CFG parallel, group `g` holds branch `g`. A sample's global slot is
`cfg_rank * batch + index`, the same numbering on every rank. Saved tensors live only with
the rank that computes that slot (its sequence chunk under Ulysses); the scalar accumulators
of every slot are kept on every rank, so all ranks take the same decision from the same
numbers (see `policies`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple, TypeVar

import torch

from .options import CacheSettings
from .table import MagTable

T = TypeVar("T")


@dataclass(frozen=True)
class CacheLayout:
    """Where this rank sits, for the statistics of a decision.

    Attributes:
        sp_rank, sp_size: this rank's chunk of the token sequence (Ulysses), 1 on one device.
        cfg_rank, cfg_size: which guidance branch group this rank computes (CFG parallel).
        world_group: the group every decision is agreed over (None: the default group).
        sp_group: this rank's Ulysses group (a step only CFG group 0 computes agrees there).
        distributed: False on one process (no collective at all).
    """

    sp_rank: int = 0
    sp_size: int = 1
    cfg_rank: int = 0
    cfg_size: int = 1
    world_group: Any = None
    distributed: bool = False
    sp_group: Any = None

    @classmethod
    def from_parallel(cls, state: Any) -> "CacheLayout":
        """From a `parallel.groups.ParallelState`."""
        return cls(sp_rank=state.ulysses_rank, sp_size=state.ulysses_size, cfg_rank=state.cfg_rank,
                   cfg_size=state.cfg_size, world_group=state.world_group, distributed=state.world_size > 1,
                   sp_group=state.ulysses_group)


@dataclass
class SlotTensors:
    """What one branch keeps from its last fully computed step (this rank's rows, run dtype)."""

    residual: Optional[torch.Tensor] = None  # first-block: blocks 1..L-1; mag / record: all blocks
    block0: Optional[torch.Tensor] = None    # first-block: block 0's residual


@dataclass
class SlotScalars:
    """Accumulators of one branch since its last fully computed step (kept on every rank)."""

    accumulated: float = 0.0  # first-block: sum of distances; mag: accumulated error
    ratio: float = 1.0        # mag: product of the table's ratios


@dataclass
class StepRecord:
    step: int
    expert: str
    skipped: bool
    candidate: bool
    values: List[float] = field(default_factory=list)  # per slot: distance (first-block) / ratio (mag)


class CacheRun:
    """One generation's cache state. Created by `StepCache.begin`, used as a context manager
    around the denoising loop (leaving it frees every saved tensor)."""

    def __init__(self, settings: CacheSettings, table: Optional[MagTable], layout: CacheLayout, steps: int,
                 dtype: torch.dtype, on_close: Callable[["CacheRun"], None],
                 cond_only: FrozenSet[str] = frozenset()) -> None:
        self.settings, self.table, self.layout = settings, table, layout
        self.steps, self.dtype = steps, dtype
        self.cond_only = frozenset(cond_only)  # experts whose steps run the conditional branch only
        self._on_close = on_close
        self.step = -1
        self.expert: Optional[str] = None
        self.expert_step = 0          # steps of the current expert before this one
        self.forwards = 0             # forwards in the current step
        self.consecutive = 0          # skipped steps since the last full one
        self.tensors: Dict[int, SlotTensors] = {}
        self.scalars: Dict[int, SlotScalars] = {}
        self.records: List[StepRecord] = []
        self.recorded: Dict[str, Dict[int, List[Optional[float]]]] = {}  # policy "record": expert -> slot -> ratios

    # ------------------------------------------------------------------ steps
    def track(self, get_expert: Callable[[str], T]) -> Callable[[str], T]:
        """Wrap the denoising loop's expert provider: the loop asks for the expert once at the
        start of every step (`pipeline.denoise`), which is where a step begins."""

        def get(name: str) -> T:
            self.begin_step(name)
            return get_expert(name)

        return get

    def begin_step(self, expert: str) -> None:
        self.step += 1
        if self.step >= self.steps:
            raise RuntimeError(f"step cache: step {self.step + 1} of a run announced as {self.steps} steps")
        if expert != self.expert:  # the other expert's residuals mean nothing here
            self.tensors.clear()
            self.scalars.clear()
            self.expert, self.expert_step, self.consecutive = expert, 0, 0
        else:
            self.expert_step += 1
        self.forwards = 0

    def slots_for(self, batch: int) -> List[int]:
        """Global slots of this forward's samples; one forward per step is the contract."""
        if self.step < 0:
            raise RuntimeError("step cache: a DiT forward outside a tracked step")
        self.forwards += 1
        if self.forwards > 1:
            raise RuntimeError(f"step cache: a second DiT forward in step {self.step + 1}; the cache needs all "
                               "guidance branches of a step in one forward (batched CFG or --cfg-size 2)")
        base = self.layout.cfg_rank * batch
        if base >= self.branch_groups * batch:
            raise RuntimeError(f"step cache: CFG group {self.layout.cfg_rank} ran a forward in step {self.step + 1}, "
                               f"which {self.expert} runs on the conditional branch only")
        return list(range(base, base + batch))

    @property
    def branch_groups(self) -> int:
        """CFG groups that compute the current step: 1 for a conditional-only (guidance off) expert."""
        return 1 if self.expert in self.cond_only else self.layout.cfg_size

    def all_slots(self, batch: int) -> List[int]:
        return list(range(self.branch_groups * batch))

    def decision_group(self) -> Tuple[bool, Any]:
        """(collective needed, group) for agreeing on the current step: every rank when all CFG
        groups compute it; CFG group 0's Ulysses group when only the conditional branch runs
        (the other group does no DiT work then and must not be waited for)."""
        layout = self.layout
        if not layout.distributed:
            return False, None
        if self.branch_groups == layout.cfg_size:
            return True, layout.world_group
        return layout.sp_size > 1, layout.sp_group

    def may_skip(self, slots: List[int]) -> bool:
        """Never skipped: the last step, the first `warmup` steps of each expert, a step of a
        branch with nothing saved, and beyond `max_skips` consecutive skips. Every input here
        is the same on every rank, so no collective is needed for this part."""
        limit = self.settings.max_skips
        return (self.step != self.steps - 1 and self.expert_step >= self.settings.warmup
                and all(self.tensors.get(s) is not None and self.tensors[s].residual is not None for s in slots)
                and (limit is None or self.consecutive < limit))

    def slot_scalars(self, slot: int) -> SlotScalars:
        return self.scalars.setdefault(slot, SlotScalars())

    def slot_tensors(self, slot: int) -> SlotTensors:
        return self.tensors.setdefault(slot, SlotTensors())

    def decided(self, skipped: bool, candidate: bool, values: List[float]) -> None:
        self.consecutive = self.consecutive + 1 if skipped else 0
        self.records.append(StepRecord(self.step, self.expert or "", skipped, candidate, values))

    # ------------------------------------------------------------------ results
    @property
    def skipped_steps(self) -> List[int]:
        return [r.step for r in self.records if r.skipped]

    def report(self) -> Dict[str, Any]:
        """The `"cache"` entry of a video's metadata (steps are 0-based, as `StepInfo.index`)."""
        skipped = self.skipped_steps
        out: Dict[str, Any] = {"policy": self.settings.policy, "threshold": self.settings.threshold,
                               "warmup": self.settings.warmup, "max_skips": self.settings.max_skips,
                               "steps": self.steps, "skipped_steps": skipped,
                               "skipped_fraction": round(len(skipped) / self.steps, 6) if self.steps else 0.0}
        if self.settings.table:
            out["table"] = self.settings.table
        return out

    def close(self) -> None:
        self.tensors.clear()
        self.scalars.clear()
        self._on_close(self)

    def __enter__(self) -> "CacheRun":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
