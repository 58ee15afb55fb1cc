"""Adapter key spellings -> (released tensor name of the expert, role) (spec `distill.md`).

A key is prefix + module path + suffix:
- prefixes: none, `diffusion_model.`, `model.diffusion_model.` (released module names),
  `transformer.` (diffusers module names, renamed with `to_wan_name`), kohya/musubi
  `lora_unet_` (the module path with `_` for `.`, released or diffusers names);
- suffixes: the four low-rank pair spellings (`lora_down/lora_up`, `lora_A/lora_B`,
  `lora.down/lora.up`, `lora_A.default/lora_B.default`, each `.weight`), `alpha`, and the
  full deltas `diff` (-> `M.weight`), `diff_b` (-> `M.bias`), `diff_m` (-> `M.modulation`)
  and diffusers' bias delta `lora_B.bias` (-> `M.bias`).

The Wan2.1 CLIP image branch (`cross_attn.k_img / v_img / norm_k_img`, `img_emb.*`; in
diffusers `attn2.add_k_proj / add_v_proj / norm_added_k`, `condition_embedder.image_embedder`)
does not exist in Wan2.2-I2V: such keys are recognised as skippable, not as errors.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

from ..io.formats.dit_diffusers import is_diffusers_layout, to_diffusers_name, to_wan_name

DOWN, UP, ALPHA, DIFF, DIFF_B, DIFF_M = "down", "up", "alpha", "diff", "diff_b", "diff_m"

# (suffix, role, leaf of the target tensor); longest spellings first.
_SUFFIXES: Tuple[Tuple[str, str, str], ...] = (
    (".lora_A.default.weight", DOWN, "weight"), (".lora_B.default.weight", UP, "weight"),
    (".lora.down.weight", DOWN, "weight"), (".lora.up.weight", UP, "weight"),
    (".lora_down.weight", DOWN, "weight"), (".lora_up.weight", UP, "weight"),
    (".lora_A.weight", DOWN, "weight"), (".lora_B.weight", UP, "weight"),
    (".lora_B.bias", DIFF_B, "bias"),
    (".alpha", ALPHA, "weight"),
    (".diff_b", DIFF_B, "bias"), (".diff_m", DIFF_M, "modulation"), (".diff", DIFF, "weight"),
)
_RELEASED_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
DIFFUSERS_PREFIX = "transformer."
KOHYA_PREFIX = "lora_unet_"

_CLIP_MODULE = re.compile(
    r"^(blocks\.\d+\.(cross_attn\.(k_img|v_img|norm_k_img)|attn2\.(add_k_proj|add_v_proj|norm_added_k))"
    r"|img_emb|condition_embedder\.image_embedder)(\.|$)")
_CLIP_KOHYA = re.compile(
    r"^(blocks_\d+_(cross_attn_(k_img|v_img|norm_k_img)|attn2_(add_k_proj|add_v_proj|norm_added_k))"
    r"|img_emb|condition_embedder_image_embedder)(_|$)")


@dataclass(frozen=True)
class ParsedKey:
    """One adapter key: `target` is the expert tensor it changes (released name), or None for
    a recognised Wan2.1 CLIP key (`clip`) or a key of no known form."""

    key: str
    role: Optional[str]
    target: Optional[str]
    clip: bool = False

    @property
    def module(self) -> Optional[str]:
        return self.target.rpartition(".")[0] if self.target else None


def _split_suffix(name: str) -> Optional[Tuple[str, str, str]]:
    for suffix, role, leaf in _SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], role, leaf
    return None


def _strip_prefix(key: str) -> Tuple[str, str]:
    """(naming, rest): naming is 'released', 'diffusers' or 'kohya'."""
    for prefix in _RELEASED_PREFIXES:
        if key.startswith(prefix):
            return "released", key[len(prefix):]
    if key.startswith(DIFFUSERS_PREFIX):
        return "diffusers", key[len(DIFFUSERS_PREFIX):]
    if key.startswith(KOHYA_PREFIX):
        return "kohya", key[len(KOHYA_PREFIX):]
    return "released", key


def kohya_table(tensor_names: Iterable[str]) -> Dict[str, str]:
    """kohya module spelling (`blocks_0_self_attn_q`, also of the diffusers name) -> released
    module path, for every module of the expert."""
    table: Dict[str, str] = {}
    for name in tensor_names:
        module = name.rpartition(".")[0]
        if not module:
            continue
        table.setdefault(module.replace(".", "_"), module)
        diffusers_module = to_diffusers_name(name).rpartition(".")[0]
        table.setdefault(diffusers_module.replace(".", "_"), module)
    return table


class KeyResolver:
    """Resolves the keys of one adapter file against one expert's tensor names."""

    def __init__(self, keys: Iterable[str], tensor_names: Iterable[str]) -> None:
        keys = list(keys)
        names = list(tensor_names)
        self._kohya = kohya_table(names)
        stripped = [_strip_prefix(k) for k in keys]
        # A file is in diffusers naming when it says so (prefix) or spells a diffusers module.
        self.diffusers = any(naming == "diffusers" for naming, _ in stripped) or is_diffusers_layout(
            rest for naming, rest in stripped if naming != "kohya")

    def parse(self, key: str) -> ParsedKey:
        naming, rest = _strip_prefix(key)
        split = _split_suffix(rest)
        if split is None:
            return ParsedKey(key, None, None, clip=bool(_CLIP_MODULE.match(rest) or _CLIP_KOHYA.match(rest)))
        module, role, leaf = split
        if naming == "kohya":
            if _CLIP_KOHYA.match(module):
                return ParsedKey(key, role, None, clip=True)
            resolved = self._kohya.get(module)
            return ParsedKey(key, role, f"{resolved}.{leaf}" if resolved else None)
        if _CLIP_MODULE.match(module):
            return ParsedKey(key, role, None, clip=True)
        target = f"{module}.{leaf}"
        if self.diffusers:
            target = to_wan_name(target)
        return ParsedKey(key, role, target)
