"""Environment defaults of the Ascend runtime, kept free of torch so the CLI can set them at
start-up, before anything imports torch or torch_npu (they only take effect then)."""
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
