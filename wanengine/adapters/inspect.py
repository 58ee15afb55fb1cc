"""`wanengine info --lora FILE`: what an adapter file changes -- target modules, ranks, alphas,
delta kinds, and the Wan2.1 CLIP keys that would be skipped -- checked against the experts of
`--ckpt-dir` when given, else against the released Wan2.2-I2V-A14B shapes (`constants.json`).
Reads the safetensors header and the alpha scalars only."""
from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple, Union

from .plan import AdapterPlan, plan_adapter
from .spec import LoraSpec

_BLOCK = re.compile(r"^blocks\.\d+\.")


def released_expert_shapes() -> Dict[str, Tuple[int, ...]]:
    """Tensor shapes of one released A14B expert, from the model built on the meta device."""
    import torch

    from ..constants import constants
    from ..models.dit import DiTConfig, WanDiT
    from ..models.loading import expected_shapes

    dims = constants()["i2v_a14b_dit"]
    fields = {k: dims[k] for k in ("dim", "ffn_dim", "freq_dim", "in_dim", "out_dim", "num_heads", "num_layers",
                                   "text_len")}
    with torch.device("meta"):
        return expected_shapes(WanDiT(DiTConfig(**fields)))


def _alpha_values(plan: AdapterPlan) -> Counter:
    from safetensors import safe_open

    keys = [d.alpha.key for d in plan.deltas if d.alpha is not None]
    if not keys:
        return Counter()
    with safe_open(str(plan.path), framework="pt", device="cpu") as handle:
        return Counter(float(handle.get_tensor(k).float().reshape(-1)[0]) for k in keys)


def describe_plan(plan: AdapterPlan) -> Dict[str, Any]:
    kinds: Counter = Counter()
    modules: Counter = Counter()
    ranks: Counter = Counter()
    for delta in plan.deltas:
        kinds["low-rank pair" if delta.kind == "lora" else delta.full.key.rpartition(".")[2]] += 1
        modules[_BLOCK.sub("blocks.*.", delta.target)] += 1
        if delta.rank is not None:
            ranks[delta.rank] += 1
    alphas = _alpha_values(plan)
    return {"expert": plan.expert, "deltas": len(plan.deltas), "tensors_changed": len(plan.targets),
            "kinds": dict(kinds), "target_modules": dict(sorted(modules.items())),
            "ranks": {str(k): v for k, v in sorted(ranks.items())},
            "alphas": {f"{k:g}": v for k, v in sorted(alphas.items())},
            "pairs_without_alpha": sum(1 for d in plan.deltas if d.kind == "lora" and d.alpha is None),
            "skipped_clip_keys": len(plan.skipped_clip), "skipped_examples": list(plan.skipped_clip[:3])}


def describe_adapter(path: Union[str, "os.PathLike[str]"], layout=None) -> Dict[str, Any]:
    """The adapter checked against each expert of a preflighted checkpoint `layout`
    (`io.checkpoint.preflight_checkpoint`), or the released A14B shapes without one."""
    from .plan import checkpoint_expert_shapes, read_header

    path = Path(path)
    experts: Mapping[str, Mapping[str, Tuple[int, ...]]]
    if layout is not None:
        experts = checkpoint_expert_shapes(layout)
        against = str(layout.root) if layout.root is not None else "the given experts"
    else:
        experts = {"Wan2.2-I2V-A14B": released_expert_shapes()}
        against = "the released Wan2.2-I2V-A14B expert shapes"
    keys = len(read_header(path))
    spec = LoraSpec(str(path))
    return {"path": str(path), "keys": keys, "bytes": os.path.getsize(path), "checked_against": against,
            "experts": [describe_plan(plan_adapter(spec, name, shapes)) for name, shapes in experts.items()]}


def format_adapter(description: Dict[str, Any]) -> str:
    lines = [f"adapter: {description['path']} ({description['keys']} keys, {description['bytes'] / 1e6:.1f} MB)",
             f"checked against {description['checked_against']}: every key fits"]
    for part in description["experts"][:1] if _same(description["experts"]) else description["experts"]:
        if len(description["experts"]) > 1 and not _same(description["experts"]):
            lines.append(f"{part['expert']}:")
        lines.append(f"  {part['deltas']} delta(s) on {part['tensors_changed']} tensor(s): "
                     + ", ".join(f"{v} {k}" for k, v in part["kinds"].items()))
        if part["ranks"]:
            lines.append("  rank: " + ", ".join(f"{k} (x{v})" for k, v in part["ranks"].items()))
        if part["alphas"] or part["pairs_without_alpha"]:
            alphas = [f"{k} (x{v})" for k, v in part["alphas"].items()]
            if part["pairs_without_alpha"]:
                alphas.append(f"none (x{part['pairs_without_alpha']}, scale 1)")
            lines.append("  alpha: " + ", ".join(alphas))
        lines.append("  target modules:")
        lines.extend(f"    {name:<40} x{count}" for name, count in part["target_modules"].items())
        if part["skipped_clip_keys"]:
            lines.append(f"  skipped: {part['skipped_clip_keys']} Wan2.1 CLIP key(s) (Wan2.2-I2V has no image "
                         f"branch), e.g. {', '.join(part['skipped_examples'])}")
        else:
            lines.append("  skipped: nothing")
    return "\n".join(lines)


def _same(parts) -> bool:
    """Both experts see the same adapter summary (then it is printed once)."""
    strip = [{k: v for k, v in p.items() if k != "expert"} for p in parts]
    return all(s == strip[0] for s in strip)
