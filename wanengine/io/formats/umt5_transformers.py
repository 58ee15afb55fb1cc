"""Text encoder naming table: transformers' `UMT5EncoderModel` names <-> the released
`models_t5_umt5-xxl-enc-bf16.pth` names (spec `formats.md`, section 1). Pure renames.

transformers ties `shared.weight` and `encoder.embed_tokens.weight`; a file may hold
either or both (the same values), so the second is dropped (`DUPLICATES`).
"""
from __future__ import annotations

import re
from typing import Iterable

EMBEDDING = "token_embedding.weight"
DUPLICATES = ("encoder.embed_tokens.weight",)  # dropped when `shared.weight` is present too

_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.layer\.([01])\.(.*)$")
_LAYER0 = {"layer_norm.weight": "norm1.weight",
           **{f"SelfAttention.{p}.weight": f"attn.{p}.weight" for p in "qkvo"},
           "SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight"}
_LAYER1 = {"layer_norm.weight": "norm2.weight", "DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
           "DenseReluDense.wi_1.weight": "ffn.fc1.weight", "DenseReluDense.wo.weight": "ffn.fc2.weight"}
_TOP = {"shared.weight": EMBEDDING, "encoder.embed_tokens.weight": EMBEDDING,
        "encoder.final_layer_norm.weight": "norm.weight"}
_RELEASED_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")
_INVERSE = {0: {v: k for k, v in _LAYER0.items()}, 1: {v: k for k, v in _LAYER1.items()}}


def is_transformers_umt5(names: Iterable[str]) -> bool:
    """True when the names are transformers' (`shared.weight`, `encoder.block.*`, ...)."""
    return any(name in _TOP or name.startswith("encoder.") for name in names)


def to_released_t5_name(name: str) -> str:
    """transformers name -> released name; unknown names pass through (the strict check names them)."""
    if name in _TOP:
        return _TOP[name]
    match = _BLOCK.match(name)
    if match:
        table = _LAYER0 if match.group(2) == "0" else _LAYER1
        if match.group(3) in table:
            return f"blocks.{match.group(1)}.{table[match.group(3)]}"
    return name


def to_transformers_t5_name(name: str) -> str:
    """Released name -> transformers name (the inverse; used to write transformers copies)."""
    if name == EMBEDDING:
        return "shared.weight"
    if name == "norm.weight":
        return "encoder.final_layer_norm.weight"
    match = _RELEASED_BLOCK.match(name)
    if match:
        for layer, table in _INVERSE.items():
            if match.group(2) in table:
                return f"encoder.block.{match.group(1)}.layer.{layer}.{table[match.group(2)]}"
    return name
