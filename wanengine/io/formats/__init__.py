"""Checkpoint formats as naming tables, in one place (spec `formats.md`).

Every format holds the same modules as the released layout; loading one is renaming its
tensors to the released names while streaming, never a second model definition.

- `safetensors_files`: per-tensor records from safetensors headers, streamed reads.
- `dit_diffusers`: DiT experts in diffusers' `WanTransformer3DModel` names (`to_wan_name`).
- `dit_single`: single-file experts (ComfyUI / LightX2V): prefixes, config from shapes.
- `vae_diffusers`: the VAE in diffusers' `AutoencoderKLWan` names.
- `umt5_transformers`: the text encoder in transformers' `UMT5EncoderModel` names.
- `component_files`: a text encoder or VAE as `.pth`, one `.safetensors` or a directory,
  under the released names (naming detected and mapped with the tables above).

Where the layouts are told apart (released directory, diffusers repository, per-component
options): `wanengine.io.checkpoint`.
"""
from __future__ import annotations

from .dit_diffusers import is_diffusers_layout, to_diffusers_name, to_wan_name

__all__ = ["is_diffusers_layout", "to_diffusers_name", "to_wan_name"]
