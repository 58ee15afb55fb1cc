"""Placement of the two MoE experts: with offload on, only the active expert sits on the
accelerator; the other waits in host memory and is swapped in once, at the MoE boundary."""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from .device import empty_cache


class ExpertSwitcher:
    """`get(name)` returns the expert, on the run device. Weights are never duplicated: a swap
    moves the inactive expert's parameters to the host before the next one moves in."""

    def __init__(self, experts: Dict[str, nn.Module], device: torch.device, offload: bool) -> None:
        self.experts = experts
        self.device = device
        self.offload = offload
        self.swaps = 0
        self._resident = None if offload else set(experts)

    def get(self, name: str) -> nn.Module:
        expert = self.experts[name]
        if not self.offload:
            return expert
        if self._resident != {name}:
            for other, module in self.experts.items():
                if other != name:
                    module.to("cpu")
            empty_cache(self.device)
            expert.to(self.device)
            self._resident = {name}
            self.swaps += 1
        return expert

    __call__ = get
