"""Placement of the two MoE experts on the run device.

Without offload both experts stay on the device. With offload only the active expert sits on
the accelerator; the other waits in host memory. Each expert's host copy is kept for the whole
run: weights are read-only at inference, so moving an expert *off* the device is just dropping
its device tensors (no device -> host copy), and moving one *on* is one host -> device copy.

Asynchronous prefetch: the denoising loop knows every timestep up front and calls
`prefetch(name)` a few steps before the MoE boundary (`pipeline.denoise(prefetch=...)`). If the
device has room for both experts -- free memory covers the incoming expert, the activation
peak seen so far and a margin -- the incoming expert's tensors are copied on a side stream
while the last high-noise steps compute. The host copies are page-locked once, when the
switcher is built (at engine load): pinning inside the loop was measured on an H200 to cost
~6 s per 7.5 GB during the step that started the prefetch, more than the ~1 s boundary stall
it removes. At the boundary `get(name)` only makes
the compute stream wait for that copy (no host stall) and drops the outgoing expert. Without
room, `prefetch` does nothing and `get` swaps synchronously at the boundary.

All stream and memory calls go through a small `DeviceOps` object (`AcceleratorOps` for CUDA
and Ascend NPU), so the scheduling can be tested on the CPU with a fake.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Protocol, Tuple

import torch
from torch import nn

from .device import empty_cache

MARGIN_BYTES = 1 << 30  # kept free beyond the incoming expert and the activation peak


class DeviceOps(Protocol):
    """What the switcher needs from an accelerator runtime."""

    def free_bytes(self) -> int:
        """Bytes new tensors can take now (free device memory plus the allocator's unused cache)."""

    def transient_bytes(self) -> int:
        """Peak memory seen above what is allocated now (the activations of a step)."""

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` in page-locked host memory (or itself where that is impossible)."""

    def copy_in(self, tensors: List[torch.Tensor]) -> Tuple[List[torch.Tensor], Any]:
        """Start host -> device copies on a side stream; returns the device tensors and an event."""

    def wait(self, event: Any, tensors: List[torch.Tensor]) -> None:
        """Make the compute stream wait for `event` and hand `tensors` over to it."""


class AcceleratorOps:
    """`DeviceOps` for `torch.cuda` and `torch.npu` (torch_npu mirrors the CUDA stream API)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.runtime = getattr(torch, device.type)
        self._stream = None

    def free_bytes(self) -> int:
        free, _total = self.runtime.mem_get_info(self.device)
        cached = self.runtime.memory_reserved(self.device) - self.runtime.memory_allocated(self.device)
        return int(free + cached)

    def transient_bytes(self) -> int:
        return int(self.runtime.max_memory_allocated(self.device) - self.runtime.memory_allocated(self.device))

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.is_pinned():
            return tensor
        try:
            return tensor.pin_memory()
        except RuntimeError:  # e.g. a locked-memory limit: the copy is then not asynchronous
            return tensor

    def copy_in(self, tensors: List[torch.Tensor]) -> Tuple[List[torch.Tensor], Any]:
        if self._stream is None:
            self._stream = self.runtime.Stream(self.device)
        with self.runtime.stream(self._stream):
            moved = [t.to(self.device, non_blocking=True) for t in tensors]
            event = self._stream.record_event()
        return moved, event

    def wait(self, event: Any, tensors: List[torch.Tensor]) -> None:
        compute = self.runtime.current_stream(self.device)
        compute.wait_event(event)
        for tensor in tensors:  # allocated on the side stream, used (and freed) on the compute stream
            tensor.record_stream(compute)


@dataclass
class _Slot:
    """One parameter or buffer of an expert: where it lives in the module and its host copy."""

    owner: nn.Module
    name: str
    is_param: bool
    host: torch.Tensor

    def assign(self, tensor: torch.Tensor) -> None:
        if self.is_param:
            self.owner._parameters[self.name].data = tensor
        else:
            self.owner._buffers[self.name] = tensor


def _slots(module: nn.Module) -> List[_Slot]:
    slots = []
    for owner in module.modules():
        for name, param in owner._parameters.items():
            if param is not None:
                slots.append(_Slot(owner, name, True, param.data.cpu()))
        for name, buf in owner._buffers.items():
            if buf is not None:
                slots.append(_Slot(owner, name, False, buf.cpu()))
    return slots


class ExpertSwitcher:
    """`get(name)` returns the expert on the run device; `prefetch(name)` starts moving one in
    early when the device has room for both (see the module docstring).

    Args:
        experts: name -> module (on the host when `offload`).
        device: the run device.
        offload: keep only the active expert on the device.
        ops: the device runtime (default: `AcceleratorOps` for cuda/npu devices, none for the CPU,
            where `prefetch` is a no-op).
        margin_bytes: device memory left free beyond the incoming expert and the activation peak.
    """

    def __init__(self, experts: Dict[str, nn.Module], device: torch.device, offload: bool, *,
                 ops: Optional[DeviceOps] = None, margin_bytes: int = MARGIN_BYTES) -> None:
        self.experts = experts
        self.device = torch.device(device)
        self.offload = offload
        self.margin_bytes = margin_bytes
        self.swaps = 0  # experts moved in synchronously
        self.prefetches = 0  # experts moved in by an asynchronous prefetch
        if ops is None and offload and self.device.type in ("cuda", "npu"):
            ops = AcceleratorOps(self.device)
        self.ops = ops
        self._slots = {name: _slots(module) for name, module in experts.items()} if offload else {}
        if self.ops is not None:  # page-locked host copies: asynchronous copies later, paid at load
            for slots in self._slots.values():
                for slot in slots:
                    slot.host = self.ops.pin(slot.host)
                    slot.assign(slot.host)  # the module lets go of its pageable copy: no double host memory
        self._staged: Dict[str, Tuple[List[torch.Tensor], Any]] = {}
        self._resident: Optional[str] = None

    def nbytes(self, name: str) -> int:
        return sum(slot.host.numel() * slot.host.element_size() for slot in self._slots.get(name, []))

    # ------------------------------------------------------------------ prefetch
    def prefetch(self, name: str) -> bool:
        """Start copying `name` to the device on a side stream if there is room for it next to
        the resident expert; True when a copy is (or already was) in flight or resident."""
        if not self.offload or name == self._resident or name in self._staged:
            return True  # already on the device, or on its way
        if self.ops is None:
            return False
        needed = self.nbytes(name) + self.ops.transient_bytes() + self.margin_bytes
        if self.ops.free_bytes() < needed:
            return False  # no room for both: `get` swaps synchronously at the boundary
        self._staged[name] = self.ops.copy_in([slot.host for slot in self._slots[name]])
        return True

    # ------------------------------------------------------------------ get
    def get(self, name: str) -> nn.Module:
        expert = self.experts[name]
        if not self.offload or self._resident == name:
            return expert
        staged = self._staged.pop(name, None)
        for other in list(self._staged):  # an unused prefetch is dropped (stream-ordered frees)
            del self._staged[other]
        if self._resident is not None:
            self._release(self._resident)
        if staged is not None:
            tensors, event = staged
            self.ops.wait(event, tensors)
            for slot, tensor in zip(self._slots[name], tensors):
                slot.assign(tensor)
            self.prefetches += 1
        else:
            empty_cache(self.device)
            for slot in self._slots[name]:
                slot.assign(slot.host.to(self.device, non_blocking=slot.host.is_pinned()))
            self.swaps += 1
        self._resident = name
        return expert

    __call__ = get

    def release(self) -> None:
        """Move the resident module off the device (its device tensors are dropped; the host
        copy stays), e.g. the text encoder once the prompts are encoded."""
        if self.offload and self._resident is not None:
            self._release(self._resident)

    def _release(self, name: str) -> None:
        """Point the expert back at its host copy; its device tensors are freed (no copy back)."""
        for slot in self._slots[name]:
            slot.assign(slot.host)
        self._resident = None
