"""What the process environment says, read without torch: the Ascend runtime's defaults (set
by the CLI at start-up, before anything imports torch or torch_npu -- they only take effect
then) and whether this process is rank 0 of a torchrun job."""
from __future__ import annotations

import os

# What the reference Ascend port sets (spec npu-ops.md); user-set values win.
ASCEND_ENV = {
    "PYTORCH_NPU_ALLOC_CONF": "expandable_segments:True",
    "TASK_QUEUE_ENABLE": "2",
    "CPU_AFFINITY_CONF": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def ascend_environment_defaults() -> None:
    """Set the Ascend runtime's environment defaults; they only take effect if this runs
    before `torch_npu` is first imported (the CLI calls it at start-up)."""
    for key, value in ASCEND_ENV.items():
        os.environ.setdefault(key, value)


_failed = False


def mark_failed() -> None:
    """This process is leaving with an error: the other ranks may never reach a final barrier
    (`parallel.groups.shutdown` then skips it; rank 0 would otherwise wait on a rank that
    waits for it -- see `rank_errors`)."""
    global _failed
    _failed = True


def failed() -> bool:
    return _failed


def is_lead_rank() -> bool:
    """False on ranks 1.. of a torchrun job (they leave messages to rank 0), True otherwise."""
    return os.environ.get("RANK", "0") in ("", "0")
