"""End-to-end `Engine.i2v` on the CPU (float32), mid-size random checkpoint: the released
sampling (40 UniPC steps, guidance 3.5: 80 DiT forwards) against the step-distilled sampling
(`--preset distill-4step`: 4 Euler steps, guidance off: 4 forwards), in the same process on
the same engine, calls interleaved (A, B, A, B, ...); medians over `--repeats`.

Checkpoint and call as `bench_e2e_cpu.py` (DiT width 1024, 4 layers per expert; a 320x256
image at max area 256*256, 17 frames, 1190 DiT tokens; seed 42). Random weights: the videos
differ (the point is the cost of each sampling mode); the DiT forwards each run counted
(`video.metadata["dit_forwards"]`) are printed, with the FLOP ratio `wanengine plan` gives
for both modes at 1280x720x81.

    python benchmarks/bench_fewstep_cpu.py [--repeats 2] [--ckpt-dir DIR]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e_cpu import CALL, CKPT_VERSION, STAGES, mid_checkpoint  # noqa: E402

from wanengine import Engine, EngineConfig  # noqa: E402
from wanengine.demo import DEMO_PROMPT, default_cache_dir, demo_image  # noqa: E402
from wanengine.plan import make_plan  # noqa: E402
from wanengine.presets import preset_values  # noqa: E402

BASE = {k: v for k, v in CALL.items() if k not in ("steps", "solver", "guide_scale", "shift")}
MODES = {
    "guided-40": dict(steps=40, solver="unipc", shift=5.0, guide_scale=(3.5, 3.5)),
    "distill-4": preset_values("distill-4step"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ckpt-dir", type=Path, default=default_cache_dir() / f"bench-ckpt-{CKPT_VERSION}")
    args = parser.parse_args()
    ckpt = mid_checkpoint(args.ckpt_dir)
    engine = Engine(EngineConfig(ckpt_dir=str(ckpt), device="cpu", dtype="float32", progress=False))
    samples: Dict[str, List[Dict[str, float]]] = {m: [] for m in MODES}
    forwards = {}
    for rep in range(args.repeats):
        for mode, options in MODES.items():
            start = time.perf_counter()
            video = engine.i2v(demo_image(), DEMO_PROMPT, **BASE, **options)
            timings = {k: v for k, v in video.metadata["timings_s"].items() if k != "load"}
            timings["i2v total"] = time.perf_counter() - start
            samples[mode].append(timings)
            forwards[mode] = video.metadata["dit_forwards"]
            print(f"# run {rep + 1}/{args.repeats} {mode}: " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()),
                  flush=True)

    print(f"\n# Engine.i2v, CPU float32, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads); median of {args.repeats} runs (s)")
    names = [*STAGES, "i2v total"]
    med = {m: {n: statistics.median(s[n] for s in samples[m]) for n in names} for m in MODES}
    a, b = MODES
    rows = [["stage", a, b, f"{a} / {b}"]]
    rows += [[n, f"{med[a][n]:.2f}", f"{med[b][n]:.2f}", f"{med[a][n] / med[b][n]:.2f}x"] for n in names]
    rows.append(["DiT forwards", str(forwards[a]), str(forwards[b]), f"{forwards[a] / forwards[b]:.0f}x"])
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for i, r in enumerate(rows):
        print(" | ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    guided = make_plan(size="1280*720", frame_num=81, steps=40, solver="unipc", guide_scale=(3.5, 3.5))
    distilled = make_plan(size="1280*720", frame_num=81, steps=4, solver="euler", guide_scale=(1.0, 1.0))
    print(f"\nplan, 1280x720x81: DiT {guided.flops.per_video / 1e15:.0f} PFLOP ({guided.flops.dit_forwards} forwards) "
          f"vs {distilled.flops.per_video / 1e15:.1f} PFLOP ({distilled.flops.dit_forwards}): "
          f"{guided.flops.per_video / distilled.flops.per_video:.1f}x; whole video incl. T5 + VAE "
          f"{_total(guided) / _total(distilled):.1f}x")


def _total(plan) -> float:
    f = plan.flops
    return f.per_video + f.t5 + f.vae_encode + f.vae_decode


if __name__ == "__main__":
    main()
