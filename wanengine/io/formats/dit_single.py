"""Single-file DiT experts (ComfyUI, LightX2V): one `.safetensors` per expert, released tensor
names bare or under a `model.diffusion_model.` / `diffusion_model.` prefix, and no config.json
-- the configuration follows from the tensor shapes (spec `formats.md`, section 2).

`strip_prefix` is this format's naming table; `infer_dit_config` its config.json.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping, Optional, Sequence, Tuple

from ...errors import CheckpointError, ConfigError

# Longest first, so `model.diffusion_model.x` loses the whole prefix.
PREFIXES: Tuple[str, ...] = ("model.diffusion_model.", "diffusion_model.")
HEAD_DIM = 128  # the Wan family's attention head width; num_heads = dim / 128

_BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")


def find_prefix(names: Sequence[str]) -> Optional[str]:
    """The prefix the file's tensor names carry (the one most names start with), or None."""
    counts = {p: sum(n.startswith(p) for n in names) for p in PREFIXES}
    best = max(PREFIXES, key=lambda p: counts[p])
    return best if counts[best] else None


def strip_prefix(prefix: Optional[str]) -> Callable[[str], str]:
    """Renaming function removing `prefix`; names without it are left as they are, so a stray
    tensor is reported by the strict name check rather than silently dropped."""
    if not prefix:
        return lambda name: name
    return lambda name: name[len(prefix):] if name.startswith(prefix) else name


def infer_dit_config(shapes: Mapping[str, Tuple[int, ...]], source: str):
    """DiTConfig from released tensor names' shapes:
    `dim, in_dim = patch_embedding.weight[:2]`, `ffn_dim = blocks.0.ffn.0.weight[0]`,
    `num_layers = 1 + max block index`, `out_dim = head.head.weight[0] / patch volume`,
    `freq_dim = time_embedding.0.weight[1]`, `num_heads = dim / 128`."""
    from ...models.dit import DiTConfig

    def need(name: str, rank: int) -> Tuple[int, ...]:
        if name not in shapes:
            raise CheckpointError.worded(lambda words: (
                f"{source}: tensor {name} missing (needed to infer the expert's configuration; give its "
                f"config.json as {words.name('dit_config')})"))
        shape = tuple(int(s) for s in shapes[name])
        if len(shape) != rank:
            raise CheckpointError(f"{source}: tensor {name} has shape {list(shape)}, expected {rank} dimensions")
        return shape

    patch = need("patch_embedding.weight", 5)
    dim, in_dim = patch[0], patch[1]
    patch_volume = patch[2] * patch[3] * patch[4]
    indices = [int(m.group(1)) for m in map(_BLOCK_INDEX.match, shapes) if m]
    if not indices:
        raise CheckpointError(f"{source}: no transformer blocks found (expected tensors named blocks.<i>.*)")
    head_rows = need("head.head.weight", 2)[0]
    if dim % HEAD_DIM:
        raise CheckpointError.worded(lambda words: (
            f"{source}: width {dim} is not a multiple of the head dim {HEAD_DIM}, so the head count cannot be "
            f"inferred; give the expert's config.json as {words.name('dit_config')}"))
    try:
        return DiTConfig(dim=dim, in_dim=in_dim, ffn_dim=need("blocks.0.ffn.0.weight", 2)[0],
                         freq_dim=need("time_embedding.0.weight", 2)[1], out_dim=head_rows // patch_volume,
                         num_heads=dim // HEAD_DIM, num_layers=max(indices) + 1)
    except ConfigError as exc:
        raise CheckpointError(f"{source}: {exc} (configuration inferred from tensor shapes)") from exc
