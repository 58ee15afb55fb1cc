"""`LoraSpec`: which LoRA adapter file to merge into which expert, and how strongly; and the
`PATH[:STRENGTH]` parsing of the `--lora`, `--lora-high` and `--lora-low` flags."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterable, List, Sequence, Tuple

from ..errors import InvalidArgument

EXPERT_CHOICES = ("high", "low", "both")
EXPERT_DIRS = {"high": ("high_noise_model",), "low": ("low_noise_model",),
               "both": ("high_noise_model", "low_noise_model")}


@dataclass(frozen=True)
class LoraSpec:
    """One adapter: a `.safetensors` file of weight deltas merged into `expert` ("high" for the
    high-noise expert, "low", or "both") with `strength` (0 leaves the expert bit-identical)."""

    path: str
    strength: float = 1.0
    expert: str = "both"

    def validate(self, argument: str = "loras") -> "LoraSpec":
        if self.expert not in EXPERT_CHOICES:
            raise InvalidArgument(argument, f"expert {self.expert!r} is not one of {', '.join(EXPERT_CHOICES)}")
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)) \
                or not math.isfinite(self.strength):
            raise InvalidArgument(argument, f"{self.path}: strength must be a finite number, got {self.strength!r}")
        if not os.fspath(self.path):
            raise InvalidArgument(argument, "empty adapter path")
        return self

    @property
    def experts(self) -> Tuple[str, ...]:
        """The expert directory names this adapter applies to."""
        return EXPERT_DIRS[self.expert]


def parse_lora_flag(value: str, expert: str, argument: str) -> LoraSpec:
    """`PATH[:STRENGTH]` -> LoraSpec. The strength is the text after the LAST colon when it is
    a number (so `C:\\x.safetensors` and `a:b.safetensors` stay paths)."""
    path, strength = value, 1.0
    head, sep, tail = value.rpartition(":")
    if sep and head:
        try:
            strength = float(tail)
            path = head
        except ValueError:
            pass
    return LoraSpec(path=path, strength=strength, expert=expert).validate(argument)


def lora_specs_from_flags(both: Iterable[str] = (), high: Iterable[str] = (), low: Iterable[str] = ()) -> List[LoraSpec]:
    """The adapters of `--lora` (both experts), `--lora-high` and `--lora-low`, in that order."""
    return ([parse_lora_flag(v, "both", "lora") for v in both]
            + [parse_lora_flag(v, "high", "lora_high") for v in high]
            + [parse_lora_flag(v, "low", "lora_low") for v in low])


def validate_specs(specs: Sequence[LoraSpec]) -> Tuple[LoraSpec, ...]:
    out = []
    for spec in specs:
        if not isinstance(spec, LoraSpec):
            raise InvalidArgument("loras", f"expected LoraSpec entries, got {type(spec).__name__}")
        out.append(spec.validate())
    return tuple(out)
