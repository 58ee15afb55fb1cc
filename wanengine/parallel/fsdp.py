"""FSDP for the DiT experts and the UMT5 encoder, applied from outside (spec `parallel.md`).

Every rank keeps `1/world` of each parameter (dim-0 shards) and all-gathers one block's
weights just before that block runs, freeing them right after. Sharding is applied to a
model built on the meta device, *before* any weight is read, and the checkpoint is then
streamed one tensor at a time, each rank copying only its own rows into its shard -- so no
rank ever holds a full expert, on the device or in host memory.

APIs by torch version: `torch.distributed.fsdp.fully_shard` (>= 2.6), the same function at
`torch.distributed._composable.fsdp` (2.4, 2.5), and FSDP1 `FullyShardedDataParallel` on
older torch (there a block is loaded on the host, wrapped -- which shards it -- and freed,
so the host peak is the root's tensors plus one block rather than a whole expert).
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, Iterator, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn

from ..errors import CheckpointError, ConfigError

try:  # torch >= 2.6
    from torch.distributed.fsdp import FSDPModule, fully_shard as _fully_shard  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - older torch
    try:  # torch 2.4, 2.5
        from torch.distributed._composable.fsdp import FSDPModule, fully_shard as _fully_shard  # type: ignore
    except ImportError:
        FSDPModule, _fully_shard = None, None

# DiT children sharded as their own units besides the blocks: big, and called through
# `__call__` (so their FSDP hooks fire), unlike the root whose gathered weights FSDP keeps
# after the forward.
DIT_UNITS = ("text_embedding", "time_embedding", "time_projection")


def fsdp2_available() -> bool:
    return _fully_shard is not None


def world_mesh(device_type: str, group: Optional[dist.ProcessGroup] = None):
    """A 1-D DeviceMesh over `group` (default: every rank)."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    if group is None or group == dist.group.WORLD:
        return init_device_mesh(device_type, (dist.get_world_size(),))
    return DeviceMesh.from_group(group, device_type)


def apply_fsdp(model: nn.Module, mesh, *, units: Iterable[str] = (), shard_root: bool = True) -> nn.Module:
    """Shard `model` with FSDP2: each of `model.blocks`, then each named child in `units`,
    then (if `shard_root`) the root for the parameters left over.

    Args:
        model: built on any device, typically meta (then `to_empty` + load shards).
        mesh: a 1-D DeviceMesh over the sharding ranks.
        units: names of further children to shard as their own unit.
        shard_root: also shard the root's remaining parameters. Use False for a model whose
            entry point calls `self.forward` directly (bypassing the root's FSDP hooks).
    """
    if _fully_shard is None:
        raise RuntimeError("FSDP2 (fully_shard) needs torch >= 2.4; use apply_fsdp1 instead")
    for block in model.blocks:
        _fully_shard(block, mesh=mesh)
    for name in units:
        _fully_shard(model.get_submodule(name), mesh=mesh)
    if shard_root:
        _fully_shard(model, mesh=mesh)
    return model


def reshard(model: nn.Module) -> None:
    """Free gathered weights FSDP kept after a forward (it keeps a root's, expecting a backward)."""
    if FSDPModule is None:
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def local_parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameter storage this rank holds (its shards; full tensors for unsharded ones)."""
    total = 0
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        total += local.numel() * local.element_size()
    return total


def full_parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# --------------------------------------------------------------------------- shard-wise loading
def copy_into_shards(model: nn.Module, tensors: Iterable[Tuple[str, torch.Tensor]], source: str) -> None:
    """Install full checkpoint tensors into a sharded model, keeping only this rank's rows
    (dim-0 `torch.chunk` shards, FSDP2's layout); unsharded parameters are copied whole."""
    params = dict(model.named_parameters())
    seen = set()
    with torch.no_grad():
        for name, full in tensors:
            param = params.get(name)
            if param is None:
                raise CheckpointError(f"{source}: unexpected tensor {name}")
            if tuple(full.shape) != tuple(param.shape):
                raise CheckpointError(f"{source}: tensor {name} has shape {list(full.shape)}, expected {list(param.shape)}")
            full = full.to(param.dtype)
            if hasattr(param, "to_local"):  # DTensor sharded on dim 0
                local = param.to_local()
                mesh = param.device_mesh
                chunks = torch.chunk(full, mesh.size(), dim=0)
                index = mesh.get_local_rank()
                part = chunks[index] if index < len(chunks) else full[:0]
                if tuple(part.shape) != tuple(local.shape):
                    raise RuntimeError(f"FSDP shard of {name}: expected {tuple(local.shape)}, got {tuple(part.shape)}")
                local.copy_(part)
            else:
                param.copy_(full)
            seen.add(name)
            del full
    missing = [n for n in params if n not in seen]
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} tensor(s) never loaded, e.g. {', '.join(missing[:5])}")


def load_dit_sharded(expert_dir: Union[str, "os.PathLike[str]"], *, device: torch.device, dtype: torch.dtype,
                     mesh, prepare: Optional[Callable[[nn.Module], nn.Module]] = None,
                     config_file: Optional[Union[str, "os.PathLike[str]"]] = None,
                     quantize: Optional[torch.dtype] = None, merger=None) -> nn.Module:
    """One expert, FSDP-sharded over `mesh` as it loads: meta build (8-bit block linears as
    `Linear8`, stored 8-bit or `quantize`d while streaming) -> `prepare` (e.g. the Ulysses
    patch) -> shard -> allocate the shards on `device` -> stream the checkpoint. 8-bit weights
    and their scales are sharded by rows like any parameter, so each rank holds 1/world of them.
    `merger`: adapter deltas merged into the full tensors as they stream (`quant.lora`), before
    each rank keeps its rows."""
    from ..models.dit_loading import FLOAT32_PARAMS
    from ..quant.loading import open_expert

    # every check load_dit makes, from the headers; the meta model already has its final dtypes
    model, tensors, source = open_expert(expert_dir, dtype=dtype, quantize=quantize, keep_float32=FLOAT32_PARAMS,
                                         config_file=config_file, merger=merger)
    if prepare is not None:
        model = prepare(model)
    if fsdp2_available():
        apply_fsdp(model, mesh, units=DIT_UNITS)
        model.to_empty(device=device)
        copy_into_shards(model, tensors, source)
        return model.eval().requires_grad_(False)
    _refuse_8bit_fsdp1(model)
    return _fsdp1_streamed(model, tensors, device, source, units=DIT_UNITS)


def load_t5_sharded(path: Union[str, "os.PathLike[str]"], *, device: torch.device, dtype: torch.dtype,
                    mesh, quantize: Optional[torch.dtype] = None) -> nn.Module:
    """The UMT5 encoder, FSDP-sharded over `mesh` as it loads (any layout `load_t5` reads,
    streamed one tensor at a time; block linears 8-bit as stored or with `quantize`). The token
    embedding and every block are their own units; the root is not sharded because
    `UMT5Encoder.encode` calls `self.forward` directly."""
    from ..quant.loading import open_t5

    model, tensors, source = open_t5(path, dtype=dtype, quantize=quantize)
    if fsdp2_available():
        apply_fsdp(model, mesh, units=("token_embedding",), shard_root=False)
        model.to_empty(device=device)
        copy_into_shards(model, tensors.stream(), source)
        return model.eval().requires_grad_(False)
    _refuse_8bit_fsdp1(model)
    return _fsdp1_streamed(model, tensors.stream(), device, source, units=("token_embedding",), shard_root=False)


def _refuse_8bit_fsdp1(model: nn.Module) -> None:
    """FSDP1 flattens a unit's parameters into one tensor of one dtype: no 8-bit weights there."""
    if any(not p.is_floating_point() or p.element_size() == 1 for p in model.parameters()):
        raise ConfigError.worded(lambda words: (
            f"{words.name('dit_fsdp')}/{words.name('t5_fsdp')} with 8-bit weights needs FSDP2 (torch >= 2.4; "
            f"this is {torch.__version__})"))


# --------------------------------------------------------------------------- FSDP1 (torch < 2.4)
def _fsdp1_streamed(model: nn.Module, tensors: Iterator[Tuple[str, torch.Tensor]], device: torch.device,
                    source: str, *, units: Iterable[str] = (), shard_root: bool = True) -> nn.Module:
    """FSDP1 fallback: materialise the meta-built model on the host, stream the tensors in, and
    wrap each unit (every block, then `units`) as soon as all its tensors have arrived --
    wrapping shards it onto `device` and frees the host copy. Then the root is wrapped
    (`shard_root`) or its few remaining parameters are moved to `device`."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    device_id = device if device.type != "cpu" else None
    prefixes = [f"blocks.{i}" for i in range(len(model.blocks))] + list(units)
    pending = {p: {n for n, _ in model.get_submodule(p).named_parameters()} for p in prefixes}
    model.to_empty(device="cpu")
    params = dict(model.named_parameters())

    def wrap(prefix: str) -> None:
        owner_name, _, leaf = prefix.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        setattr(owner, leaf, FSDP(owner.get_submodule(leaf), device_id=device_id, use_orig_params=True))

    with torch.no_grad():
        for name, full in tensors:
            if name not in params:
                raise CheckpointError(f"{source}: unexpected tensor {name}")
            params[name].copy_(full.to(params[name].dtype))
            for prefix in prefixes:
                if name.startswith(prefix + "."):
                    pending[prefix].discard(name[len(prefix) + 1:])
                    if not pending[prefix]:
                        wrap(prefix)
    model.eval().requires_grad_(False)
    if shard_root:
        return FSDP(model, device_id=device_id, use_orig_params=True)
    for prefix in prefixes:  # what is left outside the units (e.g. a final norm) goes to the device
        params = {n for n in params if not n.startswith(prefix + ".")}
    for name in params:
        param = model.get_parameter(name)
        param.data = param.data.to(device)
    return model
