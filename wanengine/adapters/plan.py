"""An adapter file checked against one expert before anything is loaded (the preflight).

`plan_adapter(spec, path, expert_name, shapes)` reads the adapter's safetensors header only
(names, dtypes, shapes, byte ranges) and the expert's tensor shapes (from its own headers),
and returns an `AdapterPlan`: every delta it will add, to which tensor, with which rank.
Recognised Wan2.1 CLIP keys are counted as skipped. Any other key that names no tensor of
the expert, a low-rank half without its partner, or a shape that does not fit is a
`CheckpointError` naming the file and the first offending keys: an adapter that silently
does not apply is the failure users report most.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import CheckpointError
from .keys import ALPHA, DIFF, DIFF_B, DIFF_M, DOWN, UP, KeyResolver
from .spec import LoraSpec

_SHOW = 3


@dataclass(frozen=True)
class StoredTensor:
    """Where an adapter tensor lives in its file (from the header)."""

    key: str
    dtype: object  # torch.dtype
    shape: Tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Delta:
    """One change to tensor `target`: a low-rank pair (`down`, `up`, optional `alpha`) or a
    full delta `full` (diff / diff_b / diff_m) of the target's shape."""

    target: str
    kind: str  # "lora" or "full"
    down: Optional[StoredTensor] = None
    up: Optional[StoredTensor] = None
    alpha: Optional[StoredTensor] = None
    full: Optional[StoredTensor] = None

    @property
    def rank(self) -> Optional[int]:
        return self.down.shape[0] if self.down is not None else None


@dataclass(frozen=True)
class AdapterPlan:
    spec: LoraSpec
    path: Path
    expert: str
    deltas: Tuple[Delta, ...]
    skipped_clip: Tuple[str, ...] = field(default=())

    @property
    def targets(self) -> List[str]:
        return sorted({d.target for d in self.deltas})

    def summary(self) -> str:
        line = (f"lora {self.path.name} (strength {self.spec.strength:g}) -> {self.expert}: "
                f"{len(self.deltas)} delta(s) on {len(self.targets)} tensor(s)")
        if self.skipped_clip:
            line += (f"; {len(self.skipped_clip)} Wan2.1 CLIP key(s) skipped "
                     f"(the image branch Wan2.2-I2V does not have)")
        return line


def check_adapter_file(path: Path) -> None:
    """CheckpointError unless the adapter file exists (torch-free: checked before torch loads)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: adapter file not found")


def read_header(path: Path) -> Dict[str, StoredTensor]:
    """key -> StoredTensor from a safetensors header (validates the file; no data read)."""
    from ..io.formats.safetensors_files import read_header as read_safetensors_header

    check_adapter_file(path)
    return {key: StoredTensor(key, dtype, shape, begin, end)
            for key, (dtype, shape, begin, end) in read_safetensors_header(path).items()}


def _fits_pair(down: Sequence[int], up: Sequence[int], target: Sequence[int]) -> bool:
    """down [r, in...], up [out, r, 1...] against a weight [out, in...] (a linear layer, or the
    patch-embedding convolution with its kernel dims after `in`)."""
    if len(down) < 2 or len(up) < 2 or len(target) < 2:
        return False
    return (up[0] == target[0] and up[1] == down[0] and math.prod(up[2:]) == 1
            and tuple(down[1:]) == tuple(target[1:]))


def plan_adapter(spec: LoraSpec, expert: str, shapes: Mapping[str, Tuple[int, ...]]) -> AdapterPlan:
    """Check `spec.path` against the expert whose tensors have `shapes`; see module doc."""
    path = Path(os.fspath(spec.path))
    header = read_header(path)
    if not header:
        raise CheckpointError(f"{path}: the adapter file holds no tensors")
    resolver = KeyResolver(header, shapes)
    pairs: Dict[str, Dict[str, StoredTensor]] = {}
    full: List[Delta] = []
    unmatched, clip, misfit = [], [], []
    for key in sorted(header):
        parsed = resolver.parse(key)
        if parsed.clip:
            clip.append(key)
            continue
        if parsed.target is None or parsed.target not in shapes:
            unmatched.append(key)
            continue
        stored, target_shape = header[key], tuple(shapes[parsed.target])
        if parsed.role in (DOWN, UP, ALPHA):
            slot = pairs.setdefault(parsed.target, {})
            if parsed.role in slot:
                raise CheckpointError(f"{path}: keys {slot[parsed.role].key} and {key} are both the "
                                      f"{parsed.role} half for {parsed.target}")
            slot[parsed.role] = stored
        elif parsed.role in (DIFF, DIFF_B, DIFF_M):
            if tuple(stored.shape) != target_shape:
                misfit.append(f"{key} {list(stored.shape)} vs {parsed.target} {list(target_shape)}")
            full.append(Delta(parsed.target, "full", full=stored))
    if unmatched:
        raise CheckpointError(f"{path}: {len(unmatched)} key(s) match no tensor of the {expert} expert, e.g. "
                              f"{', '.join(unmatched[:_SHOW])} (an adapter for another model, or a misspelt key?)")
    deltas: List[Delta] = []
    for target, slot in sorted(pairs.items()):
        if DOWN not in slot or UP not in slot:
            have = next(iter(slot.values())).key
            raise CheckpointError(f"{path}: {have} has no matching "
                                  f"{'up' if DOWN in slot else 'down'} half (low-rank pairs need both)")
        down, up, alpha = slot[DOWN], slot[UP], slot.get(ALPHA)
        if not _fits_pair(down.shape, up.shape, shapes[target]):
            misfit.append(f"{down.key} {list(down.shape)} x {up.key} {list(up.shape)} vs {target} "
                          f"{list(shapes[target])}")
        if alpha is not None and math.prod(alpha.shape) != 1:
            misfit.append(f"{alpha.key} {list(alpha.shape)} (alpha must be a scalar)")
        deltas.append(Delta(target, "lora", down=down, up=up, alpha=alpha))
    if misfit:
        raise CheckpointError(f"{path}: {len(misfit)} tensor(s) do not fit the {expert} expert, e.g. "
                              f"{'; '.join(misfit[:_SHOW])}")
    deltas.extend(full)
    return AdapterPlan(spec, path, expert, tuple(deltas), tuple(clip))


def plan_adapters(specs: Sequence[LoraSpec], expert_shapes: Mapping[str, Mapping[str, Tuple[int, ...]]]
                  ) -> Dict[str, List[AdapterPlan]]:
    """Every adapter checked against every expert it applies to: expert name -> plans in order."""
    plans: Dict[str, List[AdapterPlan]] = {name: [] for name in expert_shapes}
    for spec in specs:
        for expert in spec.experts:
            plans[expert].append(plan_adapter(spec, expert, expert_shapes[expert]))
    return plans


def checkpoint_expert_shapes(layout) -> Dict[str, Dict[str, Tuple[int, ...]]]:
    """Each expert's tensor names and shapes in the model's naming -- 8-bit experts included
    (their weights keep the model's names and shapes; scales are set aside) -- as the preflight
    read them from the headers (`io.checkpoint.preflight_checkpoint`, `expert_shapes`)."""
    if not layout.expert_shapes:
        raise ValueError("adapters are planned against a checked layout (io.checkpoint.preflight_checkpoint)")
    return layout.expert_shapes


def plan_checkpoint_adapters(specs: Sequence[LoraSpec], layout) -> Dict[str, List[AdapterPlan]]:
    """`plan_adapters` for the experts of a checkpoint layout (their shapes from the headers)."""
    from ..io.checkpoint import EXPERTS

    if not specs:
        return {name: [] for name in EXPERTS}
    return plan_adapters(specs, checkpoint_expert_shapes(layout))
