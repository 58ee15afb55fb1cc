"""Peak host memory of `load_dit` relative to the size of the weights it loads.

Writes a ~1 GB synthetic bf16 expert (dim 1536, ffn 8960, 12 heads, 10 layers) into a temp dir
in one of three layouts (`--layout`): `released` (released names, 6 shards + index),
`diffusers` (diffusers names and config, 6 shards + index) or `single-file` (ComfyUI style:
one .safetensors, names prefixed `model.diffusion_model.`, no config -- inferred from the
shapes), then, in a FRESH subprocess, measures the rise
of peak RSS (VmHWM from /proc/self/status, reset after imports via /proc/self/clear_refs
where the kernel allows, minus the RSS after imports) while `load_dit(..., device="cpu")`
runs and after every parameter has been touched. Target: peak <= 1.25 x weights.

    python benchmarks/bench_load_memory.py [--layout released|diffusers|single-file]
                                           [--dtype bfloat16|float32] [--layers 10] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

from _memory import reset_peak, status_kib  # benchmarks/ is on sys.path when run as a script

CONFIG = {"_class_name": "WanModel", "dim": 1536, "eps": 1e-06, "ffn_dim": 8960, "freq_dim": 256,
          "in_dim": 36, "model_type": "i2v", "num_heads": 12, "num_layers": 10, "out_dim": 16, "text_len": 512}
BLOCKS_PER_SHARD = 2
SINGLE_FILE = "wan2.2_i2v_high_noise_bench_bf16.safetensors"
LAYOUTS = ("released", "diffusers", "single-file")




# --------------------------------------------------------------------------- writer (parent)
def _shapes(config: Dict) -> Dict[str, tuple]:
    from wanengine.models.dit import DiTConfig, WanDiT
    from wanengine.models.loading import expected_shapes

    with torch.device("meta"):
        model = WanDiT(DiTConfig(**{k: v for k, v in config.items() if not k.startswith("_") and k != "model_type"}))
    return expected_shapes(model)


def write_expert(root: Path, config: Dict, layout: str = "released") -> int:
    """Synthetic bf16 expert in `layout` (module docstring); returns the bytes written (load it
    from `expert_path(root, layout)`)."""
    from safetensors.torch import save_file

    from wanengine.io.formats.dit_diffusers import to_diffusers_name

    shapes = _shapes(config)
    rename = to_diffusers_name if layout == "diffusers" else (
        (lambda n: "model.diffusion_model." + n) if layout == "single-file" else (lambda n: n))
    groups: List[List[str]] = [[n for n in shapes if not n.startswith("blocks.")]]
    for first in range(0, config["num_layers"], BLOCKS_PER_SHARD):
        prefixes = tuple(f"blocks.{i}." for i in range(first, min(first + BLOCKS_PER_SHARD, config["num_layers"])))
        groups.append([n for n in shapes if n.startswith(prefixes)])
    if layout == "single-file":
        groups = [[n for group in groups for n in group]]
    root.mkdir(parents=True, exist_ok=True)
    if layout == "diffusers":
        (root / "config.json").write_text(json.dumps({
            "_class_name": "WanTransformer3DModel", "attention_head_dim": config["dim"] // config["num_heads"],
            "num_attention_heads": config["num_heads"], "ffn_dim": config["ffn_dim"], "freq_dim": config["freq_dim"],
            "in_channels": config["in_dim"], "out_channels": config["out_dim"], "num_layers": config["num_layers"],
            "eps": config["eps"], "patch_size": [1, 2, 2], "text_dim": 4096, "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads"}))
    elif layout == "released":
        (root / "config.json").write_text(json.dumps(config))
    weight_map, total = {}, 0
    generator = torch.Generator().manual_seed(0)
    for i, names in enumerate(groups):
        file_name = (SINGLE_FILE if layout == "single-file"
                     else f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors")
        tensors = {rename(n): (torch.rand(shapes[n], generator=generator) - 0.5).to(torch.bfloat16) for n in names}
        save_file(tensors, str(root / file_name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({n: file_name for n in tensors})
        del tensors
    if layout != "single-file":
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (root / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return total


def expert_path(root: Path, layout: str) -> Path:
    return root / SINGLE_FILE if layout == "single-file" else root


# --------------------------------------------------------------------------- measurement (child)
def measure(expert_dir: str, dtype_name: str) -> Dict:
    from wanengine.models.dit_loading import load_dit

    dtype = getattr(torch, dtype_name)
    reset = reset_peak()
    base_rss = status_kib("VmRSS")
    base_hwm = status_kib("VmHWM")
    start = time.perf_counter()
    model = load_dit(expert_dir, device="cpu", dtype=dtype)
    seconds = time.perf_counter() - start
    peak_load = status_kib("VmHWM")
    checksum = 0.0
    for param in model.parameters():  # touch every page of every parameter
        checksum += float(param.sum())
    peak_touch = status_kib("VmHWM")
    rss_after = status_kib("VmRSS")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    baseline = base_rss if reset else base_hwm  # without a reset, the import peak is the floor
    return {"weights_bytes": weights, "peak_rise_load_kib": peak_load - baseline,
            "peak_rise_touched_kib": peak_touch - baseline, "rss_rise_after_kib": rss_after - base_rss,
            "hwm_reset": reset, "load_seconds": seconds, "checksum": checksum}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--layout", default="released", choices=LAYOUTS)
    parser.add_argument("--layers", type=int, default=CONFIG["num_layers"])
    parser.add_argument("--keep", type=Path, help="write the expert here and keep it")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # child mode: expert dir
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.dtype)))
        return

    config = dict(CONFIG, num_layers=args.layers)
    with tempfile.TemporaryDirectory(prefix="wan_bench_") as tmp:
        root = args.keep or Path(tmp) / "expert"
        written = write_expert(root, config, args.layout)
        child = subprocess.run([sys.executable, __file__, "--measure", str(expert_path(root, args.layout)),
                                "--dtype", args.dtype],
                               check=True, capture_output=True, text=True)
        result = json.loads(child.stdout.strip().splitlines()[-1])
    weights = result["weights_bytes"]
    peak = max(result["peak_rise_load_kib"], result["peak_rise_touched_kib"]) * 1024
    print(f"layout                        : {args.layout}")
    print(f"checkpoint on disk (bf16)     : {written / 2**20:9.1f} MiB")
    print(f"loaded weights ({args.dtype:8s})   : {weights / 2**20:9.1f} MiB  (modulation + time MLPs kept float32)")
    print(f"peak RSS rise during load     : {result['peak_rise_load_kib'] / 1024:9.1f} MiB")
    print(f"peak RSS rise after touching  : {result['peak_rise_touched_kib'] / 1024:9.1f} MiB")
    print(f"RSS rise held by the model    : {result['rss_rise_after_kib'] / 1024:9.1f} MiB")
    print(f"load time                     : {result['load_seconds']:9.2f} s   (VmHWM reset: {result['hwm_reset']})")
    print(f"peak / loaded weights         : {peak / weights:9.3f} x   (target <= 1.25)")
    print(f"peak / checkpoint size        : {peak / written:9.3f} x")


if __name__ == "__main__":
    main()
