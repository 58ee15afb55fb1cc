"""LoRA / delta adapters on 8-bit experts: merged into the dequantized weight and re-quantized,
while the expert streams in (chosen over applying the low-rank pairs unmerged at run time,
which would cost two extra matmuls per layer per step and keep the adapters in memory).

For each block linear an adapter targets:
- stored 8-bit (a published int8/fp8 expert): `W' = Q(dequantize(q, scale) + delta)` with the
  engine's per-row rule `Q`. The weight is held until its scale has streamed past (at most one
  layer's 8-bit weight), then merged in float32 and re-quantized.
- quantized at load (`--quantize`): the delta is added to the full-precision weight in float32
  and the sum quantized once -- exactly what quantizing a pre-merged checkpoint gives.
- any other target (full precision): merged as the adapter merger does it.

Accuracy (stated, tested): the re-quantization adds one rounding of the merged weight, within
the format's bound of `dequantize(q, scale) + delta` -- int8 `|err| <= scale' / 2` per element
(scale' the merged row's absmax / 127), fp8 `<= max(|W'| / 16, scale' * 2^-10)`; in a float32
run the result equals the same run on `Q(W + delta)` stored dequantized (seen: 0.0). Strength 0
reads nothing and leaves the expert bit-identical (the merger skips such adapters).

The merger is any object with `targets` (tensor names with deltas) and `merge_(name, tensor)`
(adds the deltas in place, float32 math) -- `adapters.merge.AdapterMerger` is one.
"""
from __future__ import annotations

from typing import Dict, Iterable, Mapping, Protocol, Sequence, Tuple

import torch

from .detect import CANONICAL_SCALE
from .schemes import dequantize, is_eight_bit, quantize_rows

Stream = Iterable[Tuple[str, torch.Tensor]]


class Merger(Protocol):
    targets: Sequence[str]

    def merge_(self, name: str, tensor: torch.Tensor, start: int = 0) -> bool:
        """Add the deltas for tensor `name` to `tensor` in place."""


def merge_stream(tensors: Stream, merger: Merger, stored_8bit: Mapping[str, torch.dtype],
                 to_quantize: Mapping[str, torch.dtype]) -> Stream:
    """The expert's tensors (in `Linear8` names) with the adapter deltas merged in (module doc).

    Args:
        tensors: the canonical stream (stored 8-bit weights with their `weight_scale`s).
        merger: the adapter deltas for this expert.
        stored_8bit: module -> 8-bit dtype of the layers stored 8-bit.
        to_quantize: module -> 8-bit dtype of the layers quantized after this transform.
    """
    targets = set(merger.targets)
    pending: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, tensor in tensors:
        module, _, leaf = name.rpartition(".")
        weight = f"{module}.weight"
        if module in stored_8bit and weight in targets and leaf in ("weight", CANONICAL_SCALE):
            parts = pending.setdefault(module, {})
            parts[leaf] = tensor
            if len(parts) == 2:  # weight and scale both here: dequantize, merge, re-quantize
                del pending[module]
                merged = dequantize(parts["weight"], parts[CANONICAL_SCALE])
                merger.merge_(weight, merged)
                q, scale = quantize_rows(merged, stored_8bit[module])
                yield weight, q
                yield f"{module}.{CANONICAL_SCALE}", scale
            continue
        if name in targets and not is_eight_bit(tensor.dtype):
            if module in to_quantize and leaf == "weight":
                tensor = tensor.to(torch.float32)  # merged in float32, quantized once afterwards
            merger.merge_(name, tensor)  # in place: a streamed read owns its memory
        yield name, tensor
    if pending:  # pragma: no cover - the layout check guarantees every 8-bit weight has a scale
        raise RuntimeError(f"8-bit weights without their scales in the stream: {', '.join(pending)}")
