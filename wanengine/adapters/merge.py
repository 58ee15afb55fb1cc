"""Merging adapters into an expert, once at load, tensor by tensor (spec `distill.md`):

    W' = (W.float() + sum_i delta_i).to(W.dtype)
    delta = strength * scale * (up @ down),  scale = alpha / rank (1 without alpha)   low-rank pair
    delta = strength * diff                                                            full delta

in float32, in place, in the adapters' order. The float32 working copies exist for one tensor
at a time (the accumulator and one delta), so host memory stays near the weights; the
unmerged weights are never kept. An adapter of strength 0 is not read at all, so the expert
stays bit-identical.

Applied from outside the model: the engine hands an `AdapterMerger` to the expert loader
(`quant.loading.load_expert` / `parallel.fsdp.load_dit_sharded`, `merger=`), which merges each
tensor as it streams in, before it is installed (or, under FSDP, before each rank keeps its
rows); 8-bit layers are dequantized, merged and re-quantized there (`quant.lora`).
`merge_into_model` does the same on an already loaded model (then "stored dtype" is the loaded
parameter's dtype: for a bf16 checkpoint run in float32 it keeps the float32 sum, where the
engine's streamed merge rounds to bf16 like a pre-merged bf16 checkpoint would). `AdapterMerger.merge_` also takes
a row range of a tensor (`(up @ down)[rows] = up[rows] @ down`).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from .plan import AdapterPlan, Delta, StoredTensor


class AdapterMerger:
    """The deltas of every adapter planned for one expert; reads adapter tensors lazily.
    Use as a context manager (it keeps each adapter file open while merging)."""

    def __init__(self, plans: Sequence[AdapterPlan]) -> None:
        self._by_target: Dict[str, List[Tuple[AdapterPlan, Delta]]] = {}
        for plan in plans:
            if float(plan.spec.strength) == 0.0:
                continue  # adds nothing: the expert stays bit-identical
            for delta in plan.deltas:
                self._by_target.setdefault(delta.target, []).append((plan, delta))
        self._handles: Dict[str, object] = {}
        self.merged = 0

    @property
    def targets(self) -> List[str]:
        return list(self._by_target)

    def __bool__(self) -> bool:
        return bool(self._by_target)

    def __enter__(self) -> "AdapterMerger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    # ------------------------------------------------------------------ reading
    def _read(self, plan: AdapterPlan, stored: StoredTensor, device: torch.device) -> torch.Tensor:
        from ..io.formats.safetensors_files import TensorRecord, read_tensor

        key = str(plan.path)
        handle = self._handles.get(key)
        if handle is None:
            handle = self._handles[key] = open(plan.path, "rb", buffering=0)
        record = TensorRecord(plan.path, stored.key, stored.key, stored.dtype, stored.shape, stored.begin, stored.end)
        return read_tensor(handle, record).to(device=device, dtype=torch.float32)

    def _delta(self, plan: AdapterPlan, delta: Delta, start: int, stop: int, shape: torch.Size,
               device: torch.device) -> torch.Tensor:
        """float32 rows [start, stop) of `strength * delta`, shaped like those rows of the target."""
        strength = float(plan.spec.strength)
        if delta.kind == "full":
            return self._read(plan, delta.full, device)[start:stop].mul_(strength)
        up = self._read(plan, delta.up, device)
        up = up.reshape(up.shape[0], up.shape[1])[start:stop]  # [rows, r]
        down = self._read(plan, delta.down, device).flatten(1)  # [r, in...]
        scale = float(self._read(plan, delta.alpha, torch.device("cpu"))) / delta.rank if delta.alpha is not None else 1.0
        return torch.mm(up, down).mul_(strength * scale).reshape(shape)

    # ------------------------------------------------------------------ merging
    def merge_(self, name: str, tensor: torch.Tensor, start: int = 0) -> bool:
        """Add every delta for tensor `name` to `tensor` in place, where `tensor` holds rows
        [start, start + len) of the full tensor (all of it by default). Returns whether any
        delta applied."""
        entries = self._by_target.get(name)
        if not entries or tensor.numel() == 0:
            return False
        with torch.no_grad():
            total = tensor.to(torch.float32, copy=True)
            for plan, delta in entries:
                total.add_(self._delta(plan, delta, start, start + tensor.shape[0], tensor.shape, tensor.device))
            tensor.copy_(total)  # cast back to the stored dtype
            del total
        self.merged += 1
        return True


def merge_into_model(model: nn.Module, plans: Sequence[AdapterPlan]) -> int:
    """Merge `plans` (all for this expert, in order) into a loaded model's tensors in place;
    returns how many tensors changed."""
    merger = AdapterMerger(plans)
    if not merger:
        return 0
    tensors = model.state_dict(keep_vars=True)
    with merger:
        for name in merger.targets:
            merger.merge_(name, tensors[name].data)
    return merger.merged
