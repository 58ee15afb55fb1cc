"""Peak host memory of loading an 8-bit expert, against loading the same expert in bf16.

Writes a synthetic expert (released tensor names; by default dim 1536, ffn 8960, 12 heads,
10 layers: ~1 GB in bf16) twice -- in bf16 and as a LightX2V int8 file (block linears int8 +
per-row float32 `weight_scale`, the rest bf16) -- then, each in a FRESH subprocess, measures
the rise of peak RSS (VmHWM, reset after imports and one header-only inspection of the
expert, where the kernel allows) while loading:

  bf16      `load_dit(bf16 files, dtype=bf16)`                 -- the baseline
  int8      `load_expert(int8 files, dtype=bf16)`              -- a published 8-bit expert
  quantize  `load_expert(bf16 files, dtype=bf16, quantize=int8)` -- `--quantize int8` at load

Targets (issue 14): int8 peak <= 0.6 x the bf16 size; the spec's bound for a test model is
0.5 x (linears in bf16) + the rest, plus the loader's overhead (one tensor in flight).

    python benchmarks/bench_quant_memory.py [--layers 10] [--dim 1536 --ffn 8960 --heads 12]
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

BASE = {"_class_name": "WanModel", "eps": 1e-06, "freq_dim": 256, "in_dim": 36, "model_type": "i2v",
        "out_dim": 16, "text_len": 512}


def expert_config(dim: int, ffn: int, heads: int, layers: int) -> Dict:
    return dict(BASE, dim=dim, ffn_dim=ffn, num_heads=heads, num_layers=layers)


def write_experts(root: Path, config: Dict) -> Dict[str, int]:
    """`root/bf16` and `root/int8` (same weights; int8 by the engine's rule); returns sizes in bytes."""
    from bench_load_memory import write_expert
    from safetensors.torch import load_file, save_file

    from wanengine.quant.detect import DIT_QUANTIZABLE
    from wanengine.quant.schemes import quantize_rows

    sizes = {"bf16": write_expert(root / "bf16", config)}
    (root / "int8").mkdir()
    (root / "int8" / "config.json").write_text((root / "bf16" / "config.json").read_text())
    index = json.loads((root / "bf16" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    weight_map, total, linears = {}, 0, 0
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(root / "bf16" / shard))
        out = {}
        for name, tensor in tensors.items():
            module = name[: -len(".weight")]
            if name.endswith(".weight") and DIT_QUANTIZABLE.fullmatch(module):
                linears += tensor.numel() * tensor.element_size()
                out[name], out[f"{module}.weight_scale"] = quantize_rows(tensor, torch.int8)
            else:
                out[name] = tensor
        save_file(out, str(root / "int8" / shard))
        total += sum(t.numel() * t.element_size() for t in out.values())
        weight_map.update({n: shard for n in out})
        del tensors, out
    (root / "int8" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    sizes.update(int8=total, linears_bf16=linears)
    return sizes


def measure(expert_dir: str, mode: str) -> Dict:
    """(child) Load once, touch every page, report the peak RSS rise over the post-import RSS."""
    from wanengine.models.dit_loading import load_dit
    from wanengine.quant.loading import inspect_expert_8bit, load_expert

    # One-time costs before the baseline (lazy imports, the safetensors library's first header
    # parse, building a meta model: ~8 MiB seen), so that the peak counts the load itself.
    inspect_expert_8bit(expert_dir)
    reset = reset_peak()
    base_rss, base_hwm = status_kib("VmRSS"), status_kib("VmHWM")
    start = time.perf_counter()
    if mode == "bf16":
        model = load_dit(expert_dir, device="cpu", dtype=torch.bfloat16)
    else:
        model = load_expert(expert_dir, device="cpu", dtype=torch.bfloat16,
                            quantize=torch.int8 if mode == "quantize" else None)
    seconds = time.perf_counter() - start
    # touch every page: one byte in each 4 KiB, so no full-size temporary is made
    checksum = sum(int(p.detach().contiguous().view(torch.uint8).reshape(-1)[::4096].sum()) for p in model.parameters())
    peak = status_kib("VmHWM")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"weights_bytes": weights, "peak_rise_bytes": (peak - (base_rss if reset else base_hwm)) * 1024,
            "rss_held_bytes": (status_kib("VmRSS") - base_rss) * 1024, "load_seconds": seconds,
            "hwm_reset": reset, "checksum": checksum}


def run_child(expert_dir: Path, mode: str) -> Dict:
    child = subprocess.run([sys.executable, __file__, "--measure", str(expert_dir), "--mode", mode],
                           check=True, capture_output=True, text=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


def run(config: Dict, keep: Path = None) -> Dict:
    """Write the experts and measure the three loads; returns every figure."""
    with tempfile.TemporaryDirectory(prefix="wan_quant_bench_") as tmp:
        root = keep or Path(tmp)
        sizes = write_experts(root, config)
        results = {mode: run_child(root / ("bf16" if mode != "int8" else "int8"), mode)
                   for mode in ("bf16", "int8", "quantize")}
    return {"sizes": sizes, **results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--ffn", type=int, default=8960)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--keep", type=Path, help="write the experts here and keep them")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # child mode: expert dir
    parser.add_argument("--mode", default="bf16", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.mode)))
        return
    figures = run(expert_config(args.dim, args.ffn, args.heads, args.layers), args.keep)
    sizes, mib = figures["sizes"], 2 ** 20
    bf16 = figures["bf16"]["weights_bytes"]
    print(f"expert: dim {args.dim}, ffn {args.ffn}, {args.layers} layers; block linears {sizes['linears_bf16'] / mib:.1f} "
          f"MiB of {sizes['bf16'] / mib:.1f} MiB in bf16 on disk; int8 files {sizes['int8'] / mib:.1f} MiB")
    rest = bf16 - sizes["linears_bf16"]
    print(f"spec bound (0.5 x linears + the rest, as loaded): {(0.5 * sizes['linears_bf16'] + rest) / mib:9.1f} MiB "
          f"= {(0.5 * sizes['linears_bf16'] + rest) / bf16:.3f} x bf16")
    for mode in ("bf16", "int8", "quantize"):
        r = figures[mode]
        print(f"{mode:9s}: loaded {r['weights_bytes'] / mib:8.1f} MiB, peak RSS rise {r['peak_rise_bytes'] / mib:8.1f} MiB "
              f"= {r['peak_rise_bytes'] / bf16:.3f} x bf16 weights, load {r['load_seconds']:.2f} s "
              f"(VmHWM reset: {r['hwm_reset']})")


if __name__ == "__main__":
    main()
