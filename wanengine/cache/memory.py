"""Device memory a step cache keeps (for `wanengine plan`; no torch import).

Per guidance branch on a device, in the run dtype, for this rank's `L/sp` token rows: `mag`
keeps one `[L/sp, D]` residual (all blocks); `first-block` two (the residual of blocks
1..L-1 and block 0's residual it compares against). The state is reset at the expert switch,
so only the active expert's tensors are held. At 720p (L = 75,600, D = 5120) in bf16 one such
tensor is 0.77 GB.
"""
from __future__ import annotations

from ..errors import InvalidArgument

TENSORS_PER_BRANCH = {"off": 0, "first-block": 2, "mag": 1}


def cache_bytes(policy: str, tokens_per_rank: int, dim: int, dtype_bytes: int, branches: int) -> float:
    """Bytes of saved residuals on one device for `branches` guidance branches."""
    if policy not in TENSORS_PER_BRANCH:
        raise InvalidArgument("step_cache", f"unknown policy {policy!r}; choose one of {', '.join(TENSORS_PER_BRANCH)}")
    return float(TENSORS_PER_BRANCH[policy] * branches * tokens_per_rank * dim * dtype_bytes)


def cache_assumption(policy: str) -> str:
    count = TENSORS_PER_BRANCH[policy]
    return (f"step cache {policy}: {count} [L/sp, D] tensor{'s' if count > 1 else ''} per guidance branch in the "
            "run dtype, the active expert's only (reset at the switch); the time estimate assumes no skipped "
            "steps (how many are skipped depends on the content)")
