"""`wanengine info`: describe a checkpoint -- components, parameter counts, dtypes, bytes,
configs -- from headers alone (safetensors headers; memory-mapped `.pth` pickles), without
reading weights."""
from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Union

from .checkpoint import EXPERTS, preflight_checkpoint

def _expert(expert_dir: Path) -> Dict[str, Any]:
    from dataclasses import asdict

    from ..quant.loading import describe_8bit, inspect_expert_8bit

    quant_plan = inspect_expert_8bit(expert_dir)  # inspect_expert, plus the 8-bit layout
    plan = quant_plan.plan
    dtypes: Counter = Counter()
    for record in plan.records:
        dtypes[str(record.dtype).replace("torch.", "")] += math.prod(record.shape)
    return {"path": str(expert_dir), "shards": len({r.shard for r in plan.records}), "tensors": len(plan.records),
            "parameters": plan.parameters, "bytes": plan.nbytes, "dtypes": dict(dtypes),
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(plan.config).items()},
            "eight_bit": describe_8bit(quant_plan.layout)}


def _pth(path: Path) -> Dict[str, Any]:
    from ..models.loading import load_pth_state_dict  # mmap: shapes without reading data

    state = load_pth_state_dict(path)
    dtypes = Counter(str(t.dtype).replace("torch.", "") for t in state.values())
    params = sum(t.numel() for t in state.values())
    return {"path": str(path), "tensors": len(state), "parameters": params,
            "bytes": sum(t.numel() * t.element_size() for t in state.values()), "dtypes": dict(dtypes),
            "file_bytes": os.path.getsize(path)}


def describe_checkpoint(ckpt_dir: Union[str, "os.PathLike[str]"]) -> Dict[str, Any]:
    layout = preflight_checkpoint(ckpt_dir)
    description: Dict[str, Any] = {"ckpt_dir": str(layout.root)}
    for name in EXPERTS:
        description[name] = _expert(layout.expert(name))
    description["t5"] = _pth(layout.t5)
    description["vae"] = _pth(layout.vae)
    description["tokenizer"] = {"path": str(layout.tokenizer_dir / "spiece.model")}
    return description


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1000
    return f"{nbytes} B"


def format_description(description: Dict[str, Any]) -> str:
    lines = [f"checkpoint: {description['ckpt_dir']}", "",
             f"{'component':<18} {'parameters':>15} {'size':>10}  dtypes"]
    for name in (*EXPERTS, "t5", "vae"):
        part = description[name]
        dtypes = ", ".join(f"{k}" for k in part["dtypes"])
        lines.append(f"{name:<18} {part['parameters']:>15,} {_human(part['bytes']):>10}  {dtypes}")
    for name in EXPERTS:
        config = description[name]["config"]
        lines.append(f"\n{name}: {description[name]['shards']} shard(s); " +
                     ", ".join(f"{k}={v}" for k, v in config.items()))
        eight_bit = description[name].get("eight_bit")
        if eight_bit and eight_bit["layers"]:
            lines.append(f"  8-bit: {eight_bit['format']}: {eight_bit['layers']} block linears "
                         f"({', '.join(f'{n} {d}' for d, n in eight_bit['dtypes'].items())}), e.g. "
                         f"{', '.join(eight_bit['examples'])}")
    return "\n".join(lines)
