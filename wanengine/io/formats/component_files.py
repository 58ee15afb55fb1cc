"""The files of a text encoder or VAE in any known layout, as one set of tensors under the
released names: a `.pth` state dict (memory-mapped, weights_only), one `.safetensors` file,
or a directory with `<name>.safetensors` or `<name>.safetensors.index.json` + shards
(transformers' `text_encoder/`, diffusers' `vae/`). The naming (released, or the format's
own) is detected from the tensor names and mapped with the table in this package.

Opening reads headers only (safetensors) or the pickle with memory-mapped storages (.pth);
`stream()` then yields one tensor at a time, so loading keeps the streaming memory bound.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch

from ...errors import CheckpointError
from .safetensors_files import TensorRecord, file_records, index_records, stream_tensors
from .umt5_transformers import is_transformers_umt5, to_released_t5_name
from .vae_diffusers import is_diffusers_vae, to_released_namer

PathLike = Union[str, "os.PathLike[str]"]
Namer = Callable[[List[str]], Callable[[str], Optional[str]]]  # names -> (stored -> released, None = drop)


def _t5_namer(names: List[str]) -> Callable[[str], Optional[str]]:
    both = "shared.weight" in names  # tied copy `encoder.embed_tokens.weight` then dropped
    return lambda n: None if (both and n == "encoder.embed_tokens.weight") else to_released_t5_name(n)


def _vae_namer(names: List[str]) -> Callable[[str], Optional[str]]:
    return to_released_namer(names)


@dataclass(frozen=True)
class ComponentKind:
    """How one component is laid out in a directory, and its non-released naming."""

    what: str  # used in messages
    dir_stem: str  # `<stem>.safetensors` or `<stem>.safetensors.index.json` in a directory
    other_naming: str  # the name of the format's naming, for `info`
    is_other: Callable[[Iterable[str]], bool]
    namer: Namer


T5_KIND = ComponentKind("text encoder", "model", "transformers", is_transformers_umt5, _t5_namer)
VAE_KIND = ComponentKind("VAE", "diffusion_pytorch_model", "diffusers", is_diffusers_vae, _vae_namer)


class ComponentTensors:
    """Every tensor of one component, under the released names, not yet read."""

    def __init__(self, source: str, layout: str, shapes: Dict[str, Tuple[int, ...]], dtypes: Dict[str, torch.dtype],
                 records: Optional[List[TensorRecord]] = None, state: Optional[Dict[str, torch.Tensor]] = None):
        self.source, self.layout, self.shapes, self.dtypes = source, layout, shapes, dtypes
        self._records, self._state = records, state

    @property
    def parameters(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) * torch.empty(0, dtype=self.dtypes[n]).element_size() for n, s in self.shapes.items())

    @property
    def records(self) -> Optional[List[TensorRecord]]:
        """Safetensors records (None for a .pth)."""
        return self._records

    def stream(self) -> Iterator[Tuple[str, torch.Tensor]]:
        """Yield `(released name, tensor)` one at a time; a .pth's entries are dropped as they go."""
        if self._records is not None:
            yield from stream_tensors(self._records)
            return
        from ...models.loading import iter_state_dict

        state, self._state = self._state, None
        if state is None:
            raise RuntimeError(f"{self.source}: tensors already streamed")
        yield from iter_state_dict(state)


def _files_of(path: Path, kind: ComponentKind) -> Tuple[str, str, List[TensorRecord]]:
    """(file named in messages, where, records named as stored) for a safetensors file or directory."""
    if path.is_dir():
        index, single = path / f"{kind.dir_stem}.safetensors.index.json", path / f"{kind.dir_stem}.safetensors"
        if index.is_file():
            records = index_records(index)
            return str(index), f"directory, {len({r.shard for r in records})} shard(s)", records
        if single.is_file():
            return str(single), "directory, 1 file", file_records(single)
        raise CheckpointError(f"{path}: no {index.name} or {single.name} found (a {kind.what} directory holds "
                              "one of them)")
    return str(path), "single file", file_records(path)


def open_component(path: PathLike, kind: ComponentKind) -> ComponentTensors:
    """The component's tensors under released names, from headers (no weights read);
    CheckpointError naming the file when it is missing, unreadable or two names collide."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: {kind.what} not found (a .pth, a .safetensors file or a directory)")
    if path.is_file() and path.suffix not in (".pth", ".pt", ".safetensors"):
        raise CheckpointError(f"{path}: the {kind.what} must be a .pth or .safetensors file, or a directory")
    if path.is_file() and path.suffix in (".pth", ".pt"):
        from ...models.loading import load_pth_state_dict  # weights_only, memory-mapped

        source, where, state = str(path), ".pth", load_pth_state_dict(path)
        stored = {n: (tuple(t.shape), t.dtype) for n, t in state.items()}
        records = None
    else:
        source, where, records = _files_of(path, kind)
        stored = {r.name: (r.shape, r.dtype) for r in records}
        state = None
    other = kind.is_other(stored)
    rename = kind.namer(list(stored)) if other else (lambda n: n)
    mapping: Dict[str, str] = {}
    for name in stored:
        released = rename(name)
        if released is None:
            continue
        if released in mapping:
            raise CheckpointError(f"{source}: tensors {mapping[released]!r} and {name!r} both map to {released}")
        mapping[released] = name
    shapes = {released: stored[name][0] for released, name in mapping.items()}
    dtypes = {released: stored[name][1] for released, name in mapping.items()}
    if records is not None:
        by_stored = {r.name: r for r in records}
        records = [replace(by_stored[name], name=released) for released, name in mapping.items()]
    else:
        state = {released: state[name] for released, name in mapping.items()}
    layout = f"{kind.other_naming if other else 'released'} names, {where}"
    return ComponentTensors(source, layout, shapes, dtypes, records=records, state=state)
