"""DiT expert naming table: the released Wan names <-> diffusers' `WanTransformer3DModel`
names (spec `checkpoint.md`, "Diffusers-format checkpoints"): pure renames, no reshapes.

The loader maps diffusers names to Wan names at load time (`to_wan_name`), so there is one
model definition. `to_diffusers_name` is the inverse (used by tests to write a diffusers
copy of a checkpoint). Per block, diffusers' `norm2` is Wan's `norm3` (the affine
cross-attention pre-norm) and vice versa. The head's `modulation` is diffusers' top-level
`scale_shift_table` (a `head.scale_shift_table` spelling is accepted too).
"""
from __future__ import annotations

import re
from typing import Iterable, List, Tuple

# (wan prefix, diffusers prefix) inside `blocks.{i}.`; a prefix matches a whole name or a
# name continuing with "." (so `self_attn.q` never matches `self_attn.qx`).
_BLOCK_RULES: List[Tuple[str, str]] = [
    *[(f"{wan}.{p}", f"{diff}.to_{p}") for wan, diff in (("self_attn", "attn1"), ("cross_attn", "attn2"))
      for p in ("q", "k", "v")],
    ("self_attn.o", "attn1.to_out.0"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("self_attn.norm_q", "attn1.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
    ("norm3", "norm2"),  # the affine cross-attention pre-norm
    ("norm2", "norm3"),  # parameter-free in both; listed so the swap is a bijection
    ("modulation", "scale_shift_table"),
]

_TOP_RULES: List[Tuple[str, str]] = [
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.head", "proj_out"),
    ("head.modulation", "scale_shift_table"),
    ("patch_embedding", "patch_embedding"),
]

# Accepted on input only (not produced by to_diffusers_name).
_EXTRA_TO_WAN: List[Tuple[str, str]] = [("head.modulation", "head.scale_shift_table")]

_BLOCK = re.compile(r"^(blocks\.\d+\.)(.*)$")
_DIFFUSERS_MARKERS = ("condition_embedder.", "scale_shift_table", ".attn1.", ".attn2.", "proj_out.")


def _swap(name: str, rules: Iterable[Tuple[str, str]], to_wan: bool) -> str:
    for wan, diff in rules:
        src, dst = (diff, wan) if to_wan else (wan, diff)
        if name == src or name.startswith(src + "."):
            return dst + name[len(src):]
    return name


def to_wan_name(name: str) -> str:
    """Diffusers tensor name -> released Wan name (names already in Wan form are unchanged
    unless they collide with a diffusers spelling, e.g. `blocks.0.norm2`)."""
    block = _BLOCK.match(name)
    if block:
        return block.group(1) + _swap(block.group(2), _BLOCK_RULES, to_wan=True)
    return _swap(name, _TOP_RULES + _EXTRA_TO_WAN, to_wan=True)


def to_diffusers_name(name: str) -> str:
    """Released Wan tensor name -> diffusers name (the inverse of `to_wan_name`)."""
    block = _BLOCK.match(name)
    if block:
        return block.group(1) + _swap(block.group(2), _BLOCK_RULES, to_wan=False)
    return _swap(name, _TOP_RULES, to_wan=False)


def is_diffusers_layout(names: Iterable[str]) -> bool:
    """True when any tensor name is spelled the diffusers way."""
    return any(marker in name for name in names for marker in _DIFFUSERS_MARKERS)
