"""Shared weight-loading machinery: safe `.pth` reading, strict name/shape checks, and
streaming assignment of tensors into a model built on the meta device.

Every loader (T5, DiT, VAE) builds its module with `torch.device("meta")` (no memory),
checks the checkpoint's names and shapes against it, then moves tensors one at a time to
their target device and dtype (`assign_streaming`). So a bf16 expert never exists as a
float32 copy, and host memory stays near the size of the loaded weights.
"""
from __future__ import annotations

import inspect
import os
from typing import Callable, Dict, Iterable, Iterator, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..errors import CheckpointError

PathLike = Union[str, "os.PathLike[str]"]
_SHOW = 5  # how many offending names an error message lists


def _torch_load_supports_mmap() -> bool:
    return "mmap" in inspect.signature(torch.load).parameters


def load_pth_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """Read a flat `dict[str, Tensor]` saved with torch.save, safely (weights_only) and
    memory-mapped where this torch allows; any failure becomes one CheckpointError naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")
    kwargs = {"map_location": "cpu", "weights_only": True}
    if _torch_load_supports_mmap():
        kwargs["mmap"] = True
    try:
        state = torch.load(path, **kwargs)
    except Exception as exc:  # truncated zip, bad pickle, forbidden global, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable torch state dict (corrupt or truncated?): {reason[:200]}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a flat dict of tensors, found {type(state).__name__}")
    return dict(state)


def expected_shapes(model: nn.Module) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of every persistent tensor the model's state dict holds."""
    return {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}


def check_names_and_shapes(expected: Mapping[str, Tuple[int, ...]], found: Mapping[str, Tuple[int, ...]],
                           source: str) -> None:
    """Raise one CheckpointError naming `source` and the first offending tensors, if the
    checkpoint's tensors are not exactly the model's (names and shapes)."""
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected]
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} tensor(s) missing, e.g. {', '.join(missing[:_SHOW])}")
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} unexpected tensor(s), e.g. {', '.join(unexpected[:_SHOW])}")
    for name, shape in expected.items():
        if tuple(found[name]) != tuple(shape):
            raise CheckpointError(f"{source}: tensor {name} has shape {list(found[name])}, expected {list(shape)}")


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = value
    else:  # pragma: no cover - names were checked beforehand
        raise KeyError(name)


def assign_streaming(model: nn.Module, tensors: Iterable[Tuple[str, torch.Tensor]], *,
                     device: Union[str, torch.device], dtype: Optional[torch.dtype], source: str,
                     keep_float32: Iterable[str] = (),
                     dtype_of: Optional[Callable[[str, torch.Tensor], torch.dtype]] = None) -> nn.Module:
    """Move each `(name, tensor)` to `device`/`dtype` and install it in the meta-built `model`,
    one tensor at a time. Floating tensors whose name contains one of `keep_float32` stay
    float32 (small parameters the spec computes in float32); `dtype_of(name, tensor)`, when
    given, decides the dtype instead (a wrapper's own policy). Raises if any tensor stays on meta."""
    keep = tuple(keep_float32)
    for name, tensor in tensors:
        target = dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype
        if tensor.is_floating_point() and any(k in name for k in keep):
            target = torch.float32
        if dtype_of is not None:
            target = dtype_of(name, tensor)
        _set_tensor(model, name, tensor.to(device=device, dtype=target, copy=False))
        del tensor
    left = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if left:
        raise CheckpointError(f"{source}: {len(left)} tensor(s) never loaded, e.g. {', '.join(left[:_SHOW])}")
    return model.eval().requires_grad_(False)


def iter_state_dict(state: Dict[str, torch.Tensor]) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield and drop entries of a loaded state dict, so converted copies are freed as we go."""
    for name in list(state):
        yield name, state.pop(name)
