"""The bytes the engine will hold for each weight component of a given checkpoint, known before
any weight is read -- what the memory preflight (`memory_check`) feeds to `plan`'s model.

Each expert and the text encoder is opened by the loader's own first steps (`quant.loading.
open_expert` / `open_t5`): the safetensors headers (names, dtypes, shapes; for ComfyUI's
`comfy_quant` records a few bytes of JSON) -> the 8-bit layout -> the model on the meta device
with `Linear8` in place and every tensor in the dtype it will be installed in. The tensor
stream is never started, so no weight is read; summing the meta model's tensors then gives
exactly what the load allocates:

- a published 8-bit block linear: its 8-bit weight (1 byte per element) and a float32 scale per
  output row (a ComfyUI per-tensor scale is repeated per row, as the loader stores it);
- `--quantize` / `--quantize-t5`: the block linears still in full precision the same way;
- everything else at the run dtype, except the DiT tensors the loader keeps in float32
  (`dit_loading.FLOAT32_PARAMS`); scale-input and format records are dropped, as the loader
  drops them.

Adapters (LoRA) merge into the tensors as they stream and leave their sizes unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple


@dataclass(frozen=True)
class HeldWeights:
    """Bytes of each expert (in `io.checkpoint.EXPERTS` order), of the largest DiT block (the
    unit an FSDP rank gathers) and of the text encoder, as the engine will hold them."""

    experts: Tuple[int, ...]
    largest_block: int
    t5: int


def module_bytes(module: Any) -> int:
    """Bytes of a module's parameters and buffers (on the meta device too: dtype x shape)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def expert_bytes(path, *, dtype, quantize=None, config_file=None) -> Tuple[int, int]:
    """(bytes of the expert at `path`, bytes of its largest block) as `quant.loading.load_expert`
    will hold them with this run dtype and `quantize` (a torch 8-bit dtype or None)."""
    from .quant.loading import open_expert

    model, tensors, _ = open_expert(path, dtype=dtype, quantize=quantize, config_file=config_file)
    tensors.close()  # never started: no file was opened for data
    return module_bytes(model), max((module_bytes(block) for block in model.blocks), default=0)


def open_t5_on_meta(path, *, dtype, quantize=None):
    """The text encoder on the meta device as `quant.loading.load_t5` will install it (its
    `cfg` gives the sizes, `module_bytes` the bytes)."""
    from .quant.loading import open_t5

    model, _, _ = open_t5(path, dtype=dtype, quantize=quantize)
    return model


def load_dtypes(cfg) -> Tuple[Any, Any, Any]:
    """(run dtype, `--quantize` dtype or None, `--quantize-t5` dtype or None) of an `EngineConfig`,
    as the engine resolves them."""
    from .device import resolve_dtype
    from .quant.schemes import config_quant_dtype

    return resolve_dtype(cfg.dtype), config_quant_dtype(cfg, "quantize"), config_quant_dtype(cfg, "quantize_t5")


def t5_for_config(layout, cfg):
    """The checkpoint's text encoder on the meta device as this `EngineConfig` will load it."""
    dtype, _, quantize_t5 = load_dtypes(cfg)
    return open_t5_on_meta(layout.t5, dtype=dtype, quantize=quantize_t5)


def held_weights(layout, cfg, t5_model: Optional[Any] = None) -> HeldWeights:
    """The weights an `EngineConfig` (`cfg`: dtype, quantize, quantize_t5) will hold for the
    checked checkpoint `layout` (`io.checkpoint.preflight_checkpoint`). `t5_model`: the encoder
    already opened by `t5_for_config` (saves opening it twice)."""
    from .io.checkpoint import EXPERTS

    dtype, quantize, _ = load_dtypes(cfg)
    sizes = [expert_bytes(layout.expert(name), dtype=dtype, quantize=quantize, config_file=layout.dit_config)
             for name in EXPERTS]
    if t5_model is None:
        t5_model = t5_for_config(layout, cfg)
    return HeldWeights(tuple(total for total, _ in sizes), max(block for _, block in sizes), module_bytes(t5_model))
