"""VAE decode time and peak host memory on the CPU by resolution: whole frame against exact
row bands (`vae.decode(latent, tile_rows=n)`), and the CPU fast path against torch's plain
execution; prints a table, asserts nothing.

The VAE is the released architecture (base width 96, 127 M parameters) with random weights built
in memory, float32. Every configuration runs in a FRESH subprocess that builds the model and the
latent, resets the peak-RSS mark (VmHWM, via /proc/self/clear_refs), decodes once, and reports
the wall time and the peak RSS rise over the RSS before the decode (weights excluded, the float32
output video included). Frame counts are small (latent frames F' = 1..3, i.e. 1, 5, 9 frames):
one 4-frame chunk of 720p at width 96 is ~30 TFLOP, minutes on a small CPU.

Memory does not grow with the number of frames beyond the output video: the decoder runs one
latent frame at a time with fixed-size causal caches (the `frames` rows show it).

    python benchmarks/bench_vae.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

from _memory import reset_peak, status_kib  # benchmarks/ is on sys.path when run as a script

# (label, width, height, latent frames, tile_rows or None, fast path)
Config = Tuple[str, int, int, int, Optional[int], bool]
CONFIGS: List[Config] = [
    ("frames", 416, 240, 1, None, True),
    ("frames", 416, 240, 2, None, True),
    ("frames", 416, 240, 3, None, True),
    ("480p", 832, 480, 1, None, False),
    ("480p", 832, 480, 1, None, True),
    ("480p", 832, 480, 1, 15, True),
    ("480p", 832, 480, 1, 8, True),
    ("720p", 1280, 720, 1, None, True),
    ("720p", 1280, 720, 1, 23, True),
    ("720p", 1280, 720, 1, 12, True),
]
QUICK = [c for c in CONFIGS if c[0] != "720p" and c[3] < 3]




def measure(width: int, height: int, frames: int, tile_rows: Optional[int], fast: bool) -> Dict:
    """Child process: one decode, timed, with the peak RSS rise."""
    from wanengine.models import vae_blocks
    from wanengine.models.vae import VAEConfig, WanVAE

    vae_blocks.CPU_FAST_PATH = fast and vae_blocks.CPU_FAST_PATH
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(dim=96)).eval().requires_grad_(False)
    latent = torch.randn(16, frames, height // 8, width // 8)
    reset = reset_peak()
    base = status_kib("VmRSS") if reset else status_kib("VmHWM")
    start = time.perf_counter()
    with torch.no_grad():
        video = vae.decode(latent, tile_rows=tile_rows)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rise_kib": status_kib("VmHWM") - base, "hwm_reset": reset,
            "video_bytes": video.numel() * video.element_size(), "frames": int(video.shape[1]),
            "fast_path": vae_blocks.CPU_FAST_PATH}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip 720p and the 3-latent-frame row")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*json.loads(args.child))))
        return
    rows = []
    for label, width, height, frames, tile_rows, fast in (QUICK if args.quick else CONFIGS):
        spec = json.dumps([width, height, frames, tile_rows, fast])
        child = subprocess.run([sys.executable, __file__, "--child", spec], check=True, capture_output=True, text=True)
        result = json.loads(child.stdout.strip().splitlines()[-1])
        bands = 1 if tile_rows is None else -(-(height // 8) // tile_rows)
        rows.append((label, f"{width}x{height}", str(result["frames"]), "-" if tile_rows is None else str(tile_rows),
                     str(bands), "fast" if result["fast_path"] else "plain", f"{result['seconds']:.2f}",
                     f"{result['peak_rise_kib'] / 2**20:.2f}", f"{result['video_bytes'] / 2**30:.3f}"))
        print("# " + " ".join(rows[-1]), flush=True)
    print(f"\n# VAE decode, CPU float32, random width-96 weights ({platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}); one run each, fresh process")
    header = ("case", "size", "frames", "tile_rows", "bands", "path", "seconds", "peak RSS rise GiB", "output GiB")
    lines = [header, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print(" | ".join(cell.rjust(w) for cell, w in zip(line, widths)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
