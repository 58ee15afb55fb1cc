"""End-to-end `Engine.i2v` on the CPU (float32) with the step cache at a few thresholds against
no cache, in the same run, on the mid-size random checkpoint of `bench_e2e_cpu.py`.

One engine is loaded once; each variant attaches its own `StepCache` to it (as `Engine` does
for a config that asks for one) and calls alternate (no cache, variant 1, variant 2, ...,
no cache, ...) so machine noise hits all alike; figures are medians over `--repeats` calls.
The `mag` variants use a table recorded with `calibrate` on the same call (the
`wanengine calibrate-cache` code path), once, and kept beside the checkpoint. The call is `bench_e2e_cpu.CALL` with `--steps`
steps (default 12, so each expert has steps the cache may skip).

Random weights: how many steps a threshold skips, and what it costs in fidelity, differ on
real weights -- this measures the mechanism's time saving per skipped step, not quality.

    python benchmarks/bench_step_cache_cpu.py [--repeats 2] [--steps 12]
        [--first-block 0.05,0.1,0.2] [--mag 0.05,0.2]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from wanengine import Engine, EngineConfig
from wanengine.cache.apply import StepCache
from wanengine.cache.calibrate import calibrate
from wanengine.cache.table import save_table
from wanengine.config import GenerationOptions
from wanengine.demo import DEMO_PROMPT, default_cache_dir, demo_image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e_cpu import CALL, CKPT_VERSION, mid_checkpoint  # noqa: E402

Variant = Tuple[str, Optional[dict]]  # label, EngineConfig cache fields (None: no cache)


def run_once(engine: Engine, fields: Optional[dict], opts: GenerationOptions):
    if fields is not None:
        engine.step_cache = StepCache.from_config(replace(engine.cfg, **fields).validate(), engine.dtype)
        engine.step_cache.attach(engine.experts.experts, engine.cache_layout())
    values: List[float] = []
    try:
        start = time.perf_counter()
        video = engine.generate(demo_image(), opts)
        wall = time.perf_counter() - start
    finally:
        if fields is not None:
            run = engine.step_cache.last_run  # per step: the cond branch's distance (first-block) / ratio (mag)
            values = [round(r.values[0], 4) for r in run.records if r.values] if run is not None else []
            engine.step_cache.detach()
            engine.step_cache = None
    return video, wall, values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--first-block", default="0.05,0.1,0.2")
    parser.add_argument("--mag", default="0.05,0.2")
    parser.add_argument("--ckpt-dir", type=Path, default=default_cache_dir() / f"bench-ckpt-{CKPT_VERSION}")
    args = parser.parse_args()
    ckpt = mid_checkpoint(args.ckpt_dir)
    call = {**CALL, "steps": args.steps}
    opts = GenerationOptions(prompt=DEMO_PROMPT, **call).validate()

    start = time.perf_counter()
    engine = Engine(EngineConfig(ckpt_dir=str(ckpt), device="cpu", dtype="float32", progress=False))
    print(f"# loaded in {time.perf_counter() - start:.2f} s (kernel backend {engine.kernel_backend})", flush=True)
    variants: List[Variant] = [("no cache", None)]
    variants += [(f"first-block {t}", {"step_cache": "first-block", "cache_threshold": float(t)})
                 for t in args.first_block.split(",") if t]
    if args.mag:
        table_path = ckpt / f"mag-table-{args.steps}-steps.json"  # kept beside the checkpoint: recorded once
        if not table_path.is_file():
            start = time.perf_counter()
            save_table(calibrate(engine, demo_image(), opts, source=str(table_path)), table_path)
            print(f"# calibrated {table_path} in {time.perf_counter() - start:.2f} s", flush=True)
        variants += [(f"mag {t}", {"step_cache": "mag", "cache_threshold": float(t), "cache_table": str(table_path)})
                     for t in args.mag.split(",") if t]

    walls: Dict[str, List[float]] = {label: [] for label, _ in variants}
    denoise: Dict[str, List[float]] = {label: [] for label, _ in variants}
    results = {}
    for rep in range(args.repeats):
        for label, fields in variants:
            video, wall, values = run_once(engine, fields, opts)
            walls[label].append(wall)
            denoise[label].append(video.metadata["timings_s"]["denoise"])
            results.setdefault(label, video)
            print(f"# run {rep + 1}/{args.repeats} {label}: i2v {wall:.2f} s, denoise "
                  f"{video.metadata['timings_s']['denoise']:.2f} s, skipped "
                  f"{video.metadata.get('cache', {}).get('skipped_steps', [])}; decision inputs {values}", flush=True)

    print(f"\n# Engine.i2v, CPU float32, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads); {args.steps} steps, median of "
          f"{args.repeats} interleaved runs (s); video difference against no cache")
    base_wall, base_denoise = statistics.median(walls["no cache"]), statistics.median(denoise["no cache"])
    reference = results["no cache"].tensor
    print("| variant | skipped steps | skipped fraction | i2v total | denoise | no cache / variant (i2v) "
          "| (denoise) | max abs video diff | mean abs video diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, _ in variants:
        video = results[label]
        cache = video.metadata.get("cache", {"skipped_steps": [], "skipped_fraction": 0.0})
        wall, den = statistics.median(walls[label]), statistics.median(denoise[label])
        diff = (video.tensor - reference).abs()
        print(f"| {label} | {', '.join(str(s) for s in cache['skipped_steps']) or '-'} | "
              f"{cache['skipped_fraction']:.2f} | {wall:.2f} | {den:.2f} | {base_wall / wall:.2f}x | "
              f"{base_denoise / den:.2f}x | {float(diff.max()):.3g} | {float(diff.mean()):.3g} |")


if __name__ == "__main__":
    main()
