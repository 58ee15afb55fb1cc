"""Peak host memory of loading an expert and merging a LoRA adapter into it, relative to the
size of the loaded weights (target: peak <= 1.3 x weights).

Writes a synthetic bf16 expert (released names, sharded + index; default dim 1536, ffn 8960,
12 heads, 10 layers: ~1 GB) and a bf16 LoRA file (every block linear: self/cross q, k, v, o,
ffn.0, ffn.2; rank 64, alpha 64; `diffusion_model.` prefix) into a temp dir, then, in a FRESH
subprocess, measures with /proc (VmHWM reset after imports where the kernel allows):
- the peak RSS rise over the post-import RSS across `load_dit` + `merge_into_model`,
- the peak rise during the merge alone over the RSS the loaded model holds,
and the merge time. The merge keeps one float32 accumulator and one float32 delta of the
tensor being merged, so the merge's own extra is ~8 bytes x the largest tensor.

    python benchmarks/bench_lora_merge_memory.py [--layers 10] [--rank 64] [--dim 1536 --ffn 8960] [--json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict

import torch

from _memory import reset_peak, status_kib  # benchmarks/ is on sys.path when run as a script
from bench_load_memory import CONFIG, _shapes, write_expert

LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
           "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def write_lora(path: Path, config: Dict, rank: int) -> int:
    """bf16 low-rank pairs on every block linear; returns the bytes written."""
    from safetensors.torch import save_file

    shapes = _shapes(config)
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for block in range(config["num_layers"]):
        for linear in LINEARS:
            out_dim, in_dim = shapes[f"blocks.{block}.{linear}.weight"]
            key = f"diffusion_model.blocks.{block}.{linear}"
            tensors[key + ".lora_down.weight"] = (torch.randn(rank, in_dim, generator=generator) * 0.01).bfloat16()
            tensors[key + ".lora_up.weight"] = (torch.randn(out_dim, rank, generator=generator) * 0.01).bfloat16()
            tensors[key + ".alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def measure(expert_dir: str, lora_path: str) -> Dict:
    from wanengine.adapters import LoraSpec
    from wanengine.adapters.merge import merge_into_model
    from wanengine.adapters.plan import plan_adapter
    from wanengine.models.dit_loading import inspect_expert, load_dit

    shapes = {r.name: r.shape for r in inspect_expert(expert_dir).records}
    plan = plan_adapter(LoraSpec(lora_path), "expert", shapes)  # the preflight: headers only
    reset = reset_peak()
    base_rss, base_hwm = status_kib("VmRSS"), status_kib("VmHWM")
    model = load_dit(expert_dir, device="cpu", dtype=torch.bfloat16)
    for param in model.parameters():  # touch every page before the merge
        param.sum()
    loaded_rss = status_kib("VmRSS")
    reset_peak()
    start = time.perf_counter()
    changed = merge_into_model(model, [plan])
    seconds = time.perf_counter() - start
    peak_merge = status_kib("VmHWM")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters())
    baseline = base_rss if reset else base_hwm
    return {"weights_bytes": weights, "largest_tensor_elements": largest, "tensors_merged": changed,
            "peak_rise_kib": peak_merge - baseline, "merge_extra_kib": peak_merge - loaded_rss,
            "loaded_rss_rise_kib": loaded_rss - base_rss, "hwm_reset": reset, "merge_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=CONFIG["num_layers"])
    parser.add_argument("--dim", type=int, default=CONFIG["dim"])
    parser.add_argument("--ffn", type=int, default=CONFIG["ffn_dim"])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)  # child mode: expert dir, lora file
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return

    config = dict(CONFIG, num_layers=args.layers, dim=args.dim, ffn_dim=args.ffn, num_heads=max(args.dim // 128, 1))
    with tempfile.TemporaryDirectory(prefix="wan_lora_bench_") as tmp:
        expert, lora = Path(tmp) / "expert", Path(tmp) / "lora.safetensors"
        written = write_expert(expert, config)
        lora_bytes = write_lora(lora, config, args.rank)
        child = subprocess.run([sys.executable, __file__, "--measure", str(expert), str(lora)],
                               check=True, capture_output=True, text=True)
        result = json.loads(child.stdout.strip().splitlines()[-1])
    weights = result["weights_bytes"]
    result.update(checkpoint_bytes=written, lora_bytes=lora_bytes, rank=args.rank,
                  peak_over_weights=result["peak_rise_kib"] * 1024 / weights,
                  merge_extra_over_largest_tensor=result["merge_extra_kib"] * 1024 / (4 * result["largest_tensor_elements"]))
    if args.json:
        print(json.dumps(result))
        return
    print(f"expert on disk (bf16)          : {written / 2**20:9.1f} MiB; LoRA rank {args.rank}: {lora_bytes / 2**20:.1f} MiB")
    print(f"loaded weights (bf16)          : {weights / 2**20:9.1f} MiB  (modulation + time MLPs kept float32)")
    print(f"tensors merged                 : {result['tensors_merged']:9d}  in {result['merge_seconds']:.2f} s")
    print(f"peak RSS rise, load + merge    : {result['peak_rise_kib'] / 1024:9.1f} MiB  (VmHWM reset: {result['hwm_reset']})")
    print(f"merge's own extra over loaded  : {result['merge_extra_kib'] / 1024:9.1f} MiB  "
          f"= {result['merge_extra_over_largest_tensor']:.2f} x one float32 copy of the largest tensor")
    print(f"peak / loaded weights          : {result['peak_over_weights']:9.3f} x   (target <= 1.3)")


if __name__ == "__main__":
    main()
