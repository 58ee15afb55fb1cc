"""End-to-end `Engine.i2v` on the CPU (float32) on a mid-size random checkpoint: the optimised
default against a baseline configured like the reference design, in the same run.

The checkpoint (written once, in the released layout, by `wanengine.demo.write_random_checkpoint`):
DiT width 1024, 8 heads, FFN 4096, 4 layers per expert; UMT5 with 2 layers, attention width
512, FFN 1024, 8 heads (model width 4096, fixed by the DiT's text input); VAE base width 32.
The call: a 320x256 image at max area 256*256 (17 frames of 224x272, 5 latent frames, 1190 DiT
tokens), 4 UniPC steps, guidance 3.5, seed 42.

Variants (each loads its own `Engine` once; calls alternate A, B, C, A, B, C, ... so machine
noise hits all alike; the figures are medians over `--repeats` calls):

- `reference` -- the reference design's execution on the same weights: everything in
  `config-baseline` below, plus the DiT run as the reference runs it (time embedding and
  modulation per token, `[B, L, 6, D]`; RoPE rebuilt on every call in float64 complex
  arithmetic), see `benchmarks/reference_design.py`. The closest stand-in for the reference
  pipeline that a clean-room engine can run.
- `config-baseline` -- this engine configured like the reference design, nothing patched into
  the DiT: `kernel_backend="reference"` (matmul + softmax attention, un-fused norms, RoPE as
  separate multiplies), `cfg_batch=False` (two DiT forwards per step, one per guidance branch),
  UMT5 over all 512 padded positions (the encoder's `encode` is swapped for this variant), and
  the VAE on torch's own conv dispatch in the plain layout
  (`wanengine.models.vae_blocks.CPU_FAST_PATH = False`).
- `optimised` -- `EngineConfig` defaults (kernel backend `auto` = torch-fused, batched CFG,
  UMT5 over the prompt's tokens only, the VAE's channels-last oneDNN path).

Both produce the same video up to float32 summation order; the max |difference| is printed.

    python benchmarks/bench_e2e_cpu.py [--repeats 3] [--ckpt-dir DIR] [--variants reference,config-baseline,optimised]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Dict, List

import torch

from wanengine import Engine, EngineConfig
from wanengine.demo import DEMO_PROMPT, default_cache_dir, demo_image, write_random_checkpoint
from wanengine.models import vae_blocks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_design import apply_reference_design, encode_all_positions  # noqa: E402

CKPT_VERSION = "mid-v1"
T5_SIZES = dict(dim=4096, dim_attn=512, dim_ffn=1024, num_heads=8, num_layers=2, num_buckets=32)
DIT_SIZES = dict(dim=1024, ffn_dim=4096, freq_dim=256, in_dim=36, out_dim=16, num_heads=8, num_layers=4,
                 text_len=512, eps=1e-6)
VAE_BASE_WIDTH = 32
CALL = dict(max_area=256 * 256, frame_num=17, steps=4, shift=5.0, solver="unipc", guide_scale=(3.5, 3.5), seed=42)
STAGES = ("text encode", "VAE encode", "denoise", "VAE decode")


def mid_checkpoint(ckpt_dir: Path) -> Path:
    if not (ckpt_dir / "configuration.json").is_file():
        print(f"# writing the mid-size random checkpoint to {ckpt_dir} ...", flush=True)
        write_random_checkpoint(ckpt_dir, t5_sizes=T5_SIZES, dit_sizes=DIT_SIZES, vae_base_width=VAE_BASE_WIDTH)
    return ckpt_dir


def build(variant: str, ckpt: Path) -> Engine:
    common = dict(ckpt_dir=str(ckpt), device="cpu", dtype="float32", progress=False)
    if variant in ("reference", "config-baseline"):
        engine = Engine(EngineConfig(kernel_backend="reference", cfg_batch=False, **common))
        engine.t5.encode = types.MethodType(encode_all_positions, engine.t5)
        engine.vae_cpu_fast_path = False
        if variant == "reference":
            for expert in engine.experts.experts.values():
                apply_reference_design(expert)
    elif variant == "optimised":
        engine = Engine(EngineConfig(**common))
        engine.vae_cpu_fast_path = getattr(vae_blocks, "CPU_FAST_PATH", False)
    else:
        raise SystemExit(f"unknown variant {variant!r} (reference, config-baseline, optimised)")
    return engine


def run_once(engine: Engine):
    # The VAE switch is process-wide: set it for the engine about to run (each engine binds its
    # own kernel backend itself).
    vae_blocks.CPU_FAST_PATH = engine.vae_cpu_fast_path
    start = time.perf_counter()
    video = engine.i2v(demo_image(), DEMO_PROMPT, **CALL)
    wall = time.perf_counter() - start
    timings = dict(video.metadata["timings_s"])
    timings.pop("load", None)
    timings["i2v total"] = wall
    return video, timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ckpt-dir", type=Path, default=default_cache_dir() / f"bench-ckpt-{CKPT_VERSION}")
    parser.add_argument("--variants", default="reference,config-baseline,optimised")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    ckpt = mid_checkpoint(args.ckpt_dir)

    engines = {}
    for variant in variants:
        start = time.perf_counter()
        engines[variant] = build(variant, ckpt)
        print(f"# {variant}: loaded in {time.perf_counter() - start:.2f} s "
              f"(kernel backend {engines[variant].kernel_backend})", flush=True)
    samples: Dict[str, List[Dict[str, float]]] = {v: [] for v in variants}
    videos = {}
    for rep in range(args.repeats):
        for variant in variants:
            video, timings = run_once(engines[variant])
            samples[variant].append(timings)
            videos.setdefault(variant, video)
            print(f"# run {rep + 1}/{args.repeats} {variant}: " +
                  ", ".join(f"{k} {v:.2f}" for k, v in timings.items()), flush=True)

    print(f"\n# Engine.i2v, CPU float32, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"python {sys.version.split()[0]}; median of {args.repeats} runs (s)")
    names = [*STAGES, "i2v total"]
    medians = {v: {n: statistics.median(s[n] for s in samples[v]) for n in names} for v in variants}
    fast = variants[-1]
    others = variants[:-1]
    header = ["stage", *variants] + [f"{o} / {fast}" for o in others]
    rows = [header]
    for n in names:
        rows.append([n, *(f"{medians[v][n]:.2f}" for v in variants),
                     *(f"{medians[o][n] / medians[fast][n]:.2f}x" for o in others)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, r in enumerate(rows):
        print(" | ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    print()
    for other in others:
        a, b = videos[other], videos[fast]
        print(f"max |video {other} - video {fast}| = {float((a.tensor - b.tensor).abs().max()):.3g}, "
              f"max |latent diff| = {float((a.latent - b.latent).abs().max()):.3g} "
              f"(latent max |value| {float(b.latent.abs().max()):.3g})")


if __name__ == "__main__":
    main()
