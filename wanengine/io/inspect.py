"""`wanengine info`: describe a checkpoint -- components, parameter counts, dtypes, bytes,
configs -- from headers alone (safetensors headers; memory-mapped `.pth` pickles), without
reading weights."""
from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Union

from .checkpoint import EXPERTS, preflight_checkpoint, read_expert_config, safetensors_header, expert_shards

_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_ST_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32"}


def _expert(expert_dir: Path) -> Dict[str, Any]:
    params, nbytes, dtypes, tensors = 0, 0, Counter(), 0
    shards = expert_shards(expert_dir)
    for shard in shards:
        for name, entry in safetensors_header(shard).items():
            if name == "__metadata__":
                continue
            count = math.prod(entry["shape"])
            params += count
            nbytes += count * _ST_BYTES.get(entry["dtype"], 0)
            dtypes[_ST_NAMES.get(entry["dtype"], entry["dtype"].lower())] += count
            tensors += 1
    config = {k: v for k, v in read_expert_config(expert_dir).items() if not k.startswith("_")}
    return {"path": str(expert_dir), "shards": len(shards), "tensors": tensors, "parameters": params,
            "bytes": nbytes, "dtypes": dict(dtypes), "config": config}


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
    return "\n".join(lines)
