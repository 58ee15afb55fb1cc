"""`load_dit(source)`: one Wan2.2 expert, from any layout users have (spec `checkpoint.md`,
`formats.md`):

- a directory: `config.json` plus either `diffusion_pytorch_model.safetensors.index.json` and
  the shards it names (any count), or a single `diffusion_pytorch_model.safetensors` -- the
  released layout, or diffusers' `transformer/` (diffusers tensor and config names);
- one `.safetensors` file (ComfyUI / LightX2V): released names bare or prefixed
  `model.diffusion_model.` / `diffusion_model.` (diffusers names are understood too), no
  config: it is inferred from the shapes, or read from `config_file` (`--dit-config`).

Names are mapped to the released ones by the tables in `wanengine.io.formats`, so there is
one model definition. Order of work, so that a bad checkpoint fails fast and cheaply:
1. the configuration and the model on the meta device (no memory);
2. every file's *header* (`safe_open`, which also rejects truncated/corrupt files), names
   and shapes checked against the model -- no tensor data has been read yet;
3. stream: each file is opened once and only the tensors it maps are read, one at a time,
   into a freshly allocated tensor, converted to the target device/dtype and installed
   (`assign_streaming`); peak host memory is the loaded weights plus one tensor.

Dtype policy: floating tensors are converted to `dtype`, except `FLOAT32_PARAMS` -- the
per-block and head `modulation` offsets and the time embedding/projection MLPs -- which are
kept float32 because the spec computes the whole time embedding and all modulation in
float32 (a bf16 checkpoint's values are exact in float32; the cost is ~0.4 GB per 14B expert).

Hook for formats with extra tensors (8-bit weights and their scales): `inspect_expert(...,
split_extra=f)` calls `f(records)` on the renamed records before any check; it returns
`(model_records, extra_records)`, the extras skip the strict name check and are kept in
`ExpertPlan.extra` (their data is read with `stream_tensors`).
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch

from ..errors import CheckpointError
from ..io.formats.dit_diffusers import is_diffusers_layout, to_wan_name
from ..io.formats.dit_single import find_prefix, infer_dit_config, strip_prefix
from ..io.formats.safetensors_files import (TensorRecord, file_records, index_records, rename_records,
                                            stream_tensors)
from .dit import DiTConfig, WanDiT
from .loading import assign_streaming, check_names_and_shapes, expected_shapes

CONFIG_NAME = "config.json"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SINGLE_NAME = "diffusion_pytorch_model.safetensors"
FLOAT32_PARAMS: Tuple[str, ...] = ("modulation", "time_embedding.", "time_projection.")
_LAYOUT = (f"expected a directory with {CONFIG_NAME} plus {INDEX_NAME} and its shards or {SINGLE_NAME}, "
           "or one .safetensors file")

PathLike = Union[str, "os.PathLike[str]"]
SplitExtra = Callable[[List[TensorRecord]], Tuple[List[TensorRecord], List[TensorRecord]]]
_TensorRecord = TensorRecord  # the name earlier code used
__all__ = ["ExpertPlan", "expert_records", "inspect_expert", "load_dit", "stream_tensors", "FLOAT32_PARAMS"]


@dataclass(frozen=True)
class ExpertPlan:
    """What loading an expert will read, fully validated: config, the file named in messages,
    the layout found (for `info`), every tensor's location, dtype and shape, and the extra
    tensors a `split_extra` hook set aside."""

    config: DiTConfig
    source: str
    records: List[TensorRecord]
    layout: str = "released"
    extra: List[TensorRecord] = field(default_factory=list)

    @property
    def parameters(self) -> int:
        return sum(math.prod(r.shape) for r in self.records)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.records + self.extra)


def expert_records(source: PathLike) -> Tuple[str, str, List[TensorRecord]]:
    """(file named in messages, layout description, every tensor renamed to the released
    names) for an expert directory or single file -- headers only, no checks against a model."""
    path = Path(source)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: a single-file expert must be a .safetensors file ({_LAYOUT})")
        records, where = file_records(path), "single file"
        message_source = str(path)
    elif path.is_dir():
        if (path / INDEX_NAME).is_file():
            records, message_source = index_records(path / INDEX_NAME), str(path / INDEX_NAME)
        elif (path / SINGLE_NAME).is_file():
            records, message_source = file_records(path / SINGLE_NAME), str(path / SINGLE_NAME)
        else:
            raise CheckpointError(f"{path}: no {INDEX_NAME} or {SINGLE_NAME} found ({_LAYOUT})")
        where = "directory"
    else:
        raise CheckpointError(f"{path}: expert not found ({_LAYOUT})")
    names = [r.name for r in records]
    prefix = find_prefix(names)
    records = rename_records(records, strip_prefix(prefix), message_source)
    diffusers = is_diffusers_layout(r.name for r in records)
    if diffusers:
        records = rename_records(records, to_wan_name, message_source)
    layout = f"{'diffusers' if diffusers else 'released'} names, {where}"
    if where == "single file":
        layout += f", prefix {prefix!r}" if prefix else ", no prefix"
    return message_source, layout, records


def _expert_config(path: Path, records: List[TensorRecord], source: str,
                   config_file: Optional[PathLike]) -> Tuple[DiTConfig, str]:
    """The expert's own config.json if it is a directory; else `config_file`; else the shapes."""
    if path.is_dir():
        return DiTConfig.from_json(path / CONFIG_NAME), "config.json"
    if config_file is not None:
        return DiTConfig.from_json(config_file), f"config {config_file}"
    return infer_dit_config({r.name: r.shape for r in records}, source), "config inferred from shapes"


@functools.lru_cache(maxsize=4)
def _expected_shapes(config: DiTConfig) -> Dict[str, Tuple[int, ...]]:
    """The model's tensor names and shapes; cached because building even a meta 14B model
    takes ~0.6 s, and both experts (and every preflight) share one configuration."""
    with torch.device("meta"):
        return expected_shapes(WanDiT(config))


def inspect_expert(source: PathLike, *, config_file: Optional[PathLike] = None,
                   split_extra: Optional[SplitExtra] = None) -> ExpertPlan:
    """Every check `load_dit` makes, from config.json, the index and the safetensors headers
    alone (no tensor data is read): the engine's preflight and `wanengine info` use it.

    `config_file` configures a single-file expert (a directory uses its own config.json);
    `split_extra` is the hook for formats with tensors the model does not have (module doc)."""
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"{path}: expert not found ({_LAYOUT})")
    if path.is_dir() and not (path / CONFIG_NAME).is_file():
        DiTConfig.from_json(path / CONFIG_NAME)  # the one clear "config.json not found" message
    message_source, layout, records = expert_records(path)
    extra: List[TensorRecord] = []
    if split_extra is not None:
        records, extra = split_extra(records)
    config, config_origin = _expert_config(path, records, message_source, config_file)
    check_names_and_shapes(_expected_shapes(config), {r.name: r.shape for r in records}, message_source)
    if split_extra is None:  # with a hook, the caller owns the dtypes (e.g. int8 weights + scales)
        bad = [r for r in records if not r.dtype.is_floating_point]
        if bad:
            raise CheckpointError(f"{bad[0].shard}: tensor {bad[0].stored_name} has non-floating dtype {bad[0].dtype}")
    return ExpertPlan(config, message_source, records, f"{layout}, {config_origin}", extra)


def load_dit(source: PathLike, *, device: Union[str, torch.device] = "cpu",
             dtype: Optional[torch.dtype] = torch.bfloat16, keep_float32: Iterable[str] = FLOAT32_PARAMS,
             config_file: Optional[PathLike] = None, plan: Optional[ExpertPlan] = None) -> WanDiT:
    """Load one expert (e.g. `<ckpt>/low_noise_model` or `wan2.2_i2v_low_noise_14B_fp16.safetensors`)
    onto `device`, floating tensors in `dtype` (None keeps the stored dtype) except the
    float32-critical `keep_float32` ones. `plan`: an `inspect_expert` result to reuse.

    Raises CheckpointError (one line naming the file) for a missing config/index/shard, an index
    naming a missing shard or a tensor its shard lacks, a corrupt or truncated file,
    missing/unexpected/mis-shaped tensors, or a model_type other than i2v."""
    plan = plan if plan is not None else inspect_expert(source, config_file=config_file)
    with torch.device("meta"):
        model = WanDiT(plan.config)
    return assign_streaming(model, stream_tensors(plan.records), device=device, dtype=dtype, source=plan.source,
                            keep_float32=keep_float32)
