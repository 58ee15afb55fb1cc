"""`wanengine info`: describe a checkpoint in any layout -- each component's source and layout,
parameter counts, dtypes, bytes, configs -- from headers alone (safetensors headers;
memory-mapped `.pth` pickles), without reading weights."""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import asdict
from typing import Any, Dict, Optional

from .checkpoint import EXPERTS, Component, preflight_checkpoint


def _expert(part: Component, dit_config) -> Dict[str, Any]:
    from ..quant.loading import describe_8bit, inspect_expert_8bit

    quant_plan = inspect_expert_8bit(part.path, config_file=dit_config)  # inspect_expert + the 8-bit layout
    plan = quant_plan.plan
    dtypes: Counter = Counter()
    for record in plan.records:
        dtypes[str(record.dtype).replace("torch.", "")] += math.prod(record.shape)
    return {"path": str(part.path), "from": part.origin, "layout": plan.layout,
            "shards": len({r.shard for r in plan.records}), "tensors": len(plan.records),
            "parameters": plan.parameters, "bytes": plan.nbytes, "dtypes": dict(dtypes),
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(plan.config).items()},
            "eight_bit": describe_8bit(quant_plan.layout)}


def _component(part: Component, opener) -> Dict[str, Any]:
    _, tensors, _ = opener(part.path)
    dtypes = Counter(str(d).replace("torch.", "") for d in tensors.dtypes.values())
    files = {r.shard for r in tensors.records} if tensors.records is not None else {part.path}
    return {"path": str(part.path), "from": part.origin, "layout": tensors.layout, "tensors": len(tensors.shapes),
            "parameters": tensors.parameters, "bytes": tensors.nbytes, "dtypes": dict(dtypes),
            "file_bytes": sum(os.path.getsize(f) for f in files), **_eight_bit(tensors)}


def _eight_bit(tensors) -> Dict[str, Any]:
    from ..quant.loading import describe_8bit

    layout = getattr(tensors, "eight_bit", None)  # set by the 8-bit-aware opener (quant.loading.open_t5)
    return {"eight_bit": describe_8bit(layout)} if layout is not None else {}


def describe_checkpoint(ckpt_dir: Optional[str] = None, *, high_noise_model: Optional[str] = None,
                        low_noise_model: Optional[str] = None, t5: Optional[str] = None, vae: Optional[str] = None,
                        tokenizer: Optional[str] = None, dit_config: Optional[str] = None) -> Dict[str, Any]:
    """Everything `info` prints, as a dict; the same preflight (and errors) as a run."""
    from ..models.vae import open_vae
    from ..quant.loading import open_t5  # models.t5.open_t5, plus 8-bit block linears

    overrides = {"high_noise_model": high_noise_model, "low_noise_model": low_noise_model, "t5": t5, "vae": vae,
                 "tokenizer": tokenizer}
    layout = preflight_checkpoint(ckpt_dir, overrides, dit_config)
    description: Dict[str, Any] = {"ckpt_dir": str(layout.root) if layout.root else None,
                                   "ckpt_layout": layout.kind, "notes": list(layout.notes)}
    for name in EXPERTS:
        description[name] = _expert(layout.components[name], layout.dit_config)
    description["t5"] = _component(layout.components["t5"], open_t5)
    description["vae"] = _component(layout.components["vae"], open_vae)
    tok = layout.components["tokenizer"]
    description["tokenizer"] = {"path": str(tok.path), "from": tok.origin, "layout": tok.layout}
    return description


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1000 or unit == "TB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1000
    return f"{nbytes} B"


def format_description(description: Dict[str, Any]) -> str:
    kind = description.get("ckpt_layout")
    root = description["ckpt_dir"]
    head = f"checkpoint: {root} ({'diffusers repository' if kind == 'diffusers' else 'released layout'})" \
        if root else "checkpoint: per-component sources (no --ckpt-dir)"
    lines = [head, "", f"{'component':<18} {'parameters':>15} {'size':>10}  dtypes"]
    for name in (*EXPERTS, "t5", "vae"):
        part = description[name]
        dtypes = ", ".join(f"{k}" for k in part["dtypes"])
        lines.append(f"{name:<18} {part['parameters']:>15,} {_human(part['bytes']):>10}  {dtypes}")
    lines.append("")
    for name in (*EXPERTS, "t5", "vae", "tokenizer"):
        part = description[name]
        lines.append(f"{name:<18} {part['layout']}: {part['path']} (from {part['from']})")
    for name in EXPERTS:
        config = description[name]["config"]
        lines.append(f"\n{name}: {description[name]['shards']} file(s); " +
                     ", ".join(f"{k}={v}" for k, v in config.items()))
        lines.extend(_eight_bit_line(description[name]))
    t5_line = _eight_bit_line(description["t5"])
    if t5_line:
        lines.extend(["", "t5:", *t5_line])
    return "\n".join(lines)


def _eight_bit_line(part: Dict[str, Any]) -> list:
    """`  8-bit: <format>: N block linears (N int8), e.g. ...` when the component has any."""
    eight_bit = part.get("eight_bit")
    if not eight_bit or not eight_bit["layers"]:
        return []
    dtypes = ", ".join(f"{n} {d}" for d, n in eight_bit["dtypes"].items())
    return [f"  8-bit: {eight_bit['format']}: {eight_bit['layers']} block linears ({dtypes}), "
            f"e.g. {', '.join(eight_bit['examples'])}"]
