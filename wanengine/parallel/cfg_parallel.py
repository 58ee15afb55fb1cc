"""CFG parallelism (spec `parallel.md`): the two guidance branches on two groups of ranks.

CFG branch 0 (ranks `[0, U)`) evaluates the conditional prediction, branch 1 (`[U, 2U)`) the
unconditional one, from the same latent and `y`; each CFG pair `{u, U + u}` then all-gathers
the two predictions and every rank forms `uncond + g * (cond - uncond)` with the same
operands in the same order, so all ranks step the sampler identically (bit for bit) and
never need to re-synchronise the latent.

A step whose guide scale is 1.0 (guidance off for that expert, e.g. `--guide-scale 1.0,3.5`)
needs the conditional branch only: branch 0 computes it and the pair exchanges it the same
way (branch 1 sends an empty-valued placeholder and does no DiT work), so both branches
still step the sampler with bit-identical operands. With guidance off on every step the
engine refuses `--cfg-size 2` up front (nothing to split).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ..pipeline import Expert, Guidance, Timestep, guidance_off


def make_cfg_parallel_guidance(cfg_rank: int, group: Optional[dist.ProcessGroup]) -> Guidance:
    """A `pipeline.Guidance` for a rank of CFG branch `cfg_rank` (0: cond, 1: uncond) whose
    pair partner sits in `group` (group rank order = branch order)."""
    if cfg_rank not in (0, 1):
        raise ValueError(f"cfg_rank must be 0 (conditional) or 1 (unconditional), got {cfg_rank}")

    def cfg_parallel(expert: Expert, latent: torch.Tensor, t: Timestep, contexts: Sequence[torch.Tensor],
                     y: torch.Tensor, seq_len: int, scale: float) -> torch.Tensor:
        timestep = torch.full((1,), t, dtype=torch.float32)  # host-side, as in `pipeline` (no sync)
        off = guidance_off(scale)
        if off and cfg_rank == 1:  # the conditional branch alone: branch 0's work
            mine = torch.zeros_like(latent, dtype=torch.float32)
        else:
            mine = expert(latent[None], timestep, [contexts[cfg_rank]], y[None], seq_len)[0].contiguous()
        both = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(both, mine, group=group)
        cond, uncond = both
        return cond if off else uncond + scale * (cond - uncond)

    return cfg_parallel
