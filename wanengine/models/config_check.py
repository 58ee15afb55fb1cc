"""A DiT expert's `config.json` against its checkpoint's tensors, before any module is built.

Building a `WanDiT` -- even on the meta device -- costs time and memory in proportion to the
configured sizes, so a config with `num_layers` 1e9 or `dim` 1e18 must be refused from the
index and the safetensors headers alone: the layer count is the number of `blocks.<i>` the
checkpoint holds, the widths are the shapes of a few tensors every expert has. Values no
tensor shows (`text_len`) get the documented bound of `wanengine.limits`.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, Tuple

from ..errors import CheckpointError
from ..limits import MAX_TEXT_LEN

_BLOCK = re.compile(r"blocks\.(\d+)\.")
# tensor -> ((config field, axis), ...): the widths a tensor's shape fixes
_SHAPE_FIELDS = {
    "patch_embedding.weight": (("dim", 0), ("in_dim", 1)),
    "time_embedding.0.weight": (("dim", 0), ("freq_dim", 1)),
    "text_embedding.0.weight": (("dim", 0), ("text_dim", 1)),
    "blocks.0.ffn.0.weight": (("ffn_dim", 0), ("dim", 1)),
}


def check_dit_config(config, shapes: Dict[str, Tuple[int, ...]], config_path: str, source: str) -> None:
    """Raise one CheckpointError naming `config_path` if `config` (a DiTConfig) disagrees with
    the tensor `shapes` listed by `source` (the index or the single file)."""
    if config.text_len > MAX_TEXT_LEN:
        raise CheckpointError(f"{config_path}: text_len {config.text_len} is above the limit of {MAX_TEXT_LEN}")
    blocks = _block_indices(shapes)
    if blocks and config.num_layers > len(blocks):  # fewer: the strict check names the stray tensors
        raise CheckpointError(f"{source}: holds {len(blocks)} block(s) (blocks.{min(blocks)} .. blocks.{max(blocks)}), "
                              f"but {config_path} says num_layers {config.num_layers}")
    for name, fields in _SHAPE_FIELDS.items():
        shape = shapes.get(name)
        if shape is None:
            continue  # the strict name check after this reports the missing tensor
        for field, axis in fields:
            if axis < len(shape) and getattr(config, field) != shape[axis]:
                raise CheckpointError(f"{source}: tensor {name} has shape {list(shape)}, expected {field} "
                                      f"{getattr(config, field)} on axis {axis} as {config_path} says")


def _block_indices(names: Iterable[str]) -> set:
    return {int(m.group(1)) for m in map(_BLOCK.match, names) if m}
