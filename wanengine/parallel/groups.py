"""Process groups of a multi-card run (spec `parallel.md`), started from torchrun's environment.

Layout for `world = cfg_size * ulysses_size` ranks: Ulysses groups are contiguous blocks of
ranks (`[g*U, (g+1)*U)` for CFG branch `g`), because their all-to-alls move the most data
and neighbouring ranks share the fastest links; the CFG pairs are `{u, U + u}` (one rank of
each branch at the same sequence position), which exchange only one latent-sized prediction
per step. FSDP and the VAE split use the whole world.

    ranks (cfg 2 x ulysses 4):   branch 0 (cond):   0 1 2 3   <- one Ulysses group
                                 branch 1 (uncond): 4 5 6 7   <- another
                                 CFG pairs: (0,4) (1,5) (2,6) (3,7)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import List, Optional

import torch
import torch.distributed as dist

from ..errors import ConfigError
from ..runtime_env import failed

BACKEND_BY_DEVICE = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))


def backend_for(device_type: str) -> str:
    """hccl on Ascend, nccl on NVIDIA, gloo on the CPU."""
    return BACKEND_BY_DEVICE.get(device_type, "gloo")


def rank_device(device_type: str, local_rank: int) -> torch.device:
    """The device this rank computes on: `npu:<local_rank>`, `cuda:<local_rank>` or `cpu`;
    also makes it the current device, so collectives and default allocations land there."""
    if device_type == "cpu":
        return torch.device("cpu")
    device = torch.device(device_type, local_rank)
    if device_type == "cuda":
        torch.cuda.set_device(device)
    elif device_type == "npu":
        torch.npu.set_device(device)  # type: ignore[attr-defined]
    return device


@dataclass(frozen=True)
class ParallelState:
    """Who this rank is and the groups it talks in.

    Attributes:
        rank, world_size: global position.
        cfg_size, ulysses_size: the layout (world_size = cfg_size * ulysses_size).
        cfg_rank: which guidance branch this rank computes (0: conditional, 1: unconditional).
        ulysses_rank: this rank's chunk of the token sequence inside its Ulysses group.
        ulysses_group: the ranks sharing one branch (None when ulysses_size == 1).
        cfg_group: the pair exchanging the two branch predictions (None when cfg_size == 1).
        world_group: every rank (FSDP, VAE split, seed broadcast); None means the default group.
        device: this rank's compute device.
    """

    rank: int
    world_size: int
    cfg_size: int
    ulysses_size: int
    device: torch.device
    ulysses_group: Optional[dist.ProcessGroup] = None
    cfg_group: Optional[dist.ProcessGroup] = None
    world_group: Optional[dist.ProcessGroup] = None

    @property
    def cfg_rank(self) -> int:
        return self.rank // self.ulysses_size

    @property
    def ulysses_rank(self) -> int:
        return self.rank % self.ulysses_size

    @property
    def is_writer(self) -> bool:
        return self.rank == 0


def ulysses_ranks(cfg_rank: int, ulysses_size: int) -> List[int]:
    return list(range(cfg_rank * ulysses_size, (cfg_rank + 1) * ulysses_size))


def cfg_pair_ranks(ulysses_rank: int, cfg_size: int, ulysses_size: int) -> List[int]:
    return [g * ulysses_size + ulysses_rank for g in range(cfg_size)]


def init_parallel(cfg_size: int, ulysses_size: int, device_type: str = "cpu", *,
                  timeout_s: float = 1800.0) -> ParallelState:
    """Join (or reuse) the default process group from torchrun's RANK / WORLD_SIZE /
    LOCAL_RANK / MASTER_ADDR / MASTER_PORT and build the Ulysses and CFG groups.

    Every rank must call this with the same layout (`new_group` is collective)."""
    world = env_world_size() if not dist.is_initialized() else dist.get_world_size()
    if world != cfg_size * ulysses_size:
        raise ConfigError.worded(lambda words: (
            f"{words.setting('cfg_size', cfg_size)} x {words.setting('ulysses_size', ulysses_size)} = "
            f"{cfg_size * ulysses_size} ranks, but the job has {world}; they must be equal"))
    local_rank = env_local_rank()
    device = rank_device(device_type, local_rank)
    if not dist.is_initialized():
        kwargs = {}
        if device.type == "cuda":  # lets NCCL bind its communicator eagerly (not passed to HCCL)
            kwargs["device_id"] = device
        try:
            dist.init_process_group(backend_for(device_type), rank=env_rank(), world_size=world,
                                    timeout=timedelta(seconds=timeout_s), **kwargs)
        except TypeError:  # torch < 2.3 has no device_id
            dist.init_process_group(backend_for(device_type), rank=env_rank(), world_size=world,
                                    timeout=timedelta(seconds=timeout_s))
    rank = dist.get_rank()

    # new_group is collective: every rank creates every group, in the same order.
    ulysses_group = cfg_group = None
    if ulysses_size > 1:
        for g in range(cfg_size):
            group = dist.new_group(ulysses_ranks(g, ulysses_size))
            if rank // ulysses_size == g:
                ulysses_group = group
    if cfg_size > 1:
        for u in range(ulysses_size):
            group = dist.new_group(cfg_pair_ranks(u, cfg_size, ulysses_size))
            if rank % ulysses_size == u:
                cfg_group = group
    return ParallelState(rank=rank, world_size=world, cfg_size=cfg_size, ulysses_size=ulysses_size,
                         device=device, ulysses_group=ulysses_group, cfg_group=cfg_group,
                         world_group=dist.group.WORLD)


def comm_device(group: Optional[dist.ProcessGroup] = None) -> torch.device:
    """Where tensors handed to collectives of `group` must live (gloo: CPU; nccl/hccl: the
    current accelerator)."""
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "hccl":
        return torch.device("npu", torch.npu.current_device())  # type: ignore[attr-defined]
    return torch.device("cpu")


def broadcast_int(value: int, src: int = 0, group: Optional[dist.ProcessGroup] = None) -> int:
    """Rank `src`'s integer on every rank (e.g. the seed: noise must be identical everywhere)."""
    if not dist.is_initialized():
        return int(value)
    box = torch.tensor([int(value)], dtype=torch.int64, device=comm_device(group))
    dist.broadcast(box, src=src, group=group)
    return int(box.item())


def all_reduce_int(value: int, group: Optional[dist.ProcessGroup] = None) -> int:
    """The sum of every rank's integer in `group` (e.g. the DiT forwards each CFG branch ran)."""
    if not dist.is_initialized():
        return int(value)
    box = torch.tensor([int(value)], dtype=torch.int64, device=comm_device(group))
    dist.all_reduce(box, group=group)
    return int(box.item())


def shutdown() -> None:
    """Leave the process group (call once at the end of a run). The ranks first meet at a
    barrier, so none tears its connections down while another (rank 0 writing the video) is
    still using the group: a rank leaving early made gloo abort at exit now and then
    ("terminate called without an active exception"). A process leaving with an error
    (`runtime_env.failed`) skips the barrier: its peers may be failing elsewhere, or waiting
    for it to end the job."""
    if dist.is_initialized():
        if not failed():
            try:
                dist.barrier()
            except Exception:  # a peer is already gone: nothing left to wait for
                pass
        dist.destroy_process_group()
