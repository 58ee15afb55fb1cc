"""DiT forward time against token count on the CPU (float32), optimised default against the
reference design in the same run; prints a table, asserts nothing.

One expert at a mid size (width 1024, 8 heads, FFN 4096, 4 blocks, random weights built in
memory), batch 1 (one guidance branch), a 60-row prompt, at latent grids of 256 to 4096 tokens.
Columns:
- `optimised`: the engine's default on the CPU (kernel backend `auto` = torch-fused: SDPA
  attention, one-pass norms; text MLP and cross-attention k/v on distinct text rows).
- `reference design`: the same weights run as the reference runs them: kernel backend
  `reference` (matmul + softmax attention) and `benchmarks/reference_design.py` (time
  embedding and modulation per token, float64 complex RoPE per call, text on all 512 rows).
FLOP/s counts the linear layers (self q,k,v,o; cross q,o and k,v over 512 rows; FFN) and both
attentions. Each figure is the median of `--repeats` runs after one warm-up.

    python benchmarks/bench_dit_cpu.py [--repeats 3] [--tokens 256,512,1024,2048,4096]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List, Tuple

import torch

from wanengine import kernels
from wanengine.models.dit import DiTConfig, WanDiT

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_design import apply_reference_design, remove_reference_design  # noqa: E402

CONFIG = DiTConfig(dim=1024, ffn_dim=4096, freq_dim=256, in_dim=36, out_dim=16, num_heads=8, num_layers=4)
TEXT_ROWS = 60
# latent (F', H, W) per token count: tokens = F' * (H / 2) * (W / 2)
GRIDS = {256: (1, 32, 32), 512: (2, 32, 32), 1024: (4, 32, 32), 2048: (4, 64, 32), 4096: (4, 64, 64)}


def forward_flops(tokens: int, cfg: DiTConfig = CONFIG) -> float:
    d, f, text = cfg.dim, cfg.ffn_dim, cfg.text_len
    linear = 2 * (4 * tokens * d * d + 2 * tokens * d * d + 2 * text * d * d + 2 * tokens * d * f)
    attention = 4 * tokens * tokens * d + 4 * tokens * text * d
    return cfg.num_layers * (linear + attention)


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: RoPE tables, allocator, oneDNN kernel selection
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def run(token_counts: List[int], repeats: int) -> List[Tuple[int, float, float]]:
    torch.manual_seed(0)
    model = WanDiT(CONFIG).eval().requires_grad_(False)
    context = [torch.randn(TEXT_ROWS, CONFIG.text_dim)]
    rows = []
    for tokens in token_counts:
        frames, height, width = GRIDS[tokens]
        x = torch.randn(1, 16, frames, height, width)
        y = torch.randn(1, 20, frames, height, width)
        t = torch.tensor([900.0])

        def optimised() -> torch.Tensor:
            kernels.configure("auto", "cpu")
            remove_reference_design(model)
            return model(x, t, context, y)

        def reference() -> torch.Tensor:
            kernels.configure("reference", "cpu")
            apply_reference_design(model)
            return model(x, t, context, y)

        with torch.no_grad():
            diff = float((optimised() - reference()).abs().max())
            fast, slow = median_seconds(optimised, repeats), median_seconds(reference, repeats)
        rows.append((tokens, fast, slow))
        print(f"# {tokens} tokens: optimised {fast:.3f} s, reference design {slow:.3f} s, max |diff| {diff:.2g}",
              flush=True)
    remove_reference_design(model)
    return rows


def print_table(rows: List[Tuple[int, float, float]], repeats: int) -> None:
    print(f"\n# DiT forward, CPU float32 ({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads), width {CONFIG.dim}, {CONFIG.num_layers} blocks, batch 1; "
          f"median of {repeats}")
    header = ("tokens", "optimised s", "ms / token", "GFLOP/s", "reference design s", "speed-up")
    lines: List[Tuple[str, ...]] = [header]
    for tokens, fast, slow in rows:
        lines.append((str(tokens), f"{fast:.3f}", f"{1e3 * fast / tokens:.3f}",
                      f"{forward_flops(tokens) / fast / 1e9:.0f}", f"{slow:.3f}", f"{slow / fast:.2f}x"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print(" | ".join(cell.rjust(w) for cell, w in zip(line, widths)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", default=",".join(str(n) for n in GRIDS))
    args = parser.parse_args()
    counts = [int(n) for n in args.tokens.split(",")]
    unknown = [n for n in counts if n not in GRIDS]
    if unknown:
        raise SystemExit(f"--tokens: choose from {sorted(GRIDS)}, not {unknown}")
    print_table(run(counts, args.repeats), args.repeats)


if __name__ == "__main__":
    main()
