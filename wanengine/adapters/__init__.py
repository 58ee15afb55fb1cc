"""LoRA adapters and full weight deltas (spec `distill.md`), applied from outside the model.

- `spec`: `LoraSpec` and the `PATH[:STRENGTH]` flag parsing (no torch import: the CLI and
  `EngineConfig` use it).
- `keys`: every published key spelling normalised to a released tensor name of the expert.
- `plan`: an adapter file checked against an expert from the safetensors header and the
  expert's tensor shapes alone (the preflight; nothing is loaded).
- `merge`: the merge itself, once at load, float32 tensor by tensor, into a loaded model's
  parameters or into the rows of an FSDP shard.
"""
from .spec import LoraSpec, lora_specs_from_flags, parse_lora_flag

__all__ = ["LoraSpec", "lora_specs_from_flags", "parse_lora_flag"]
