"""Multi-card execution, applied from outside the unchanged models (spec `parallel.md`).

- `groups`: process groups from torchrun's environment (hccl / nccl / gloo), CFG x Ulysses layout.
- `ulysses`: `apply_ulysses(model, group)`, sequence-parallel DiT self-attention.
- `cfg_parallel`: the two guidance branches on two groups of ranks.
- `fsdp`: `apply_fsdp`, and sharded loading of the experts / UMT5 (no full copy on any rank).
- `vae_split`: `apply_vae_split(vae, group)`, exact spatial split of VAE encode / decode.
- `engine`: `ParallelEngine`, the `Engine` of one rank of a torchrun job.

Heavy imports are deferred so that `import wanengine.parallel` stays cheap for the CLI.
"""
from __future__ import annotations

import os


def is_writer() -> bool:
    """Only rank 0 writes files."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    except ImportError:  # pragma: no cover
        pass
    return int(os.environ.get("RANK", "0")) == 0


def make_engine(cfg, layout=None):
    """The engine for this rank of a torchrun job (`cfg.distributed` is true); `layout`: the
    checkpoint as the preflight checked it (see `Engine`)."""
    from .engine import ParallelEngine

    return ParallelEngine(cfg, layout=layout)


__all__ = ["is_writer", "make_engine"]
