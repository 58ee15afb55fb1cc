"""Time the kernels backends against the reference math; prints a table, asserts nothing.

    python benchmarks/bench_kernels.py                  # (package installed, or PYTHONPATH=.)
    python benchmarks/bench_kernels.py                  # CPU: reference vs cuda-backend code on CPU
    python benchmarks/bench_kernels.py --device cuda    # on a GPU (adds bf16 rows)

Shapes are Wan2.2-A14B's (D = 5120, 40 heads, head dim 128) at a few sequence lengths.
The rotary rows add the reference release's way of applying RoPE as a baseline: the
pairs viewed as float64 complex numbers, multiplied by complex128 rotations, cast back.
Each figure is the median of `--repeats` timed runs after one warm-up.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, List, Optional, Tuple

import torch

from wanengine.kernels import cuda as cuda_backend
from wanengine.kernels import reference

DIM, HEADS, HEAD_DIM = 5120, 40, 128


def _time_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up (allocations, kernel selection)
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def rotary_float64_complex(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """The reference release's RoPE: float64 complex pairs times complex128 rotations, back to x's dtype."""
    pairs = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


def _rope_tables(seq_len: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * 10000.0 ** (
        -2.0 * torch.arange(HEAD_DIM // 2, dtype=torch.float64) / HEAD_DIM)
    rotation = torch.polar(torch.ones_like(angles), angles)[None, :, None, :].to(device)  # complex128
    cos = angles.cos().repeat_interleave(2, -1).float()[None, :, None, :].to(device)
    sin = angles.sin().repeat_interleave(2, -1).float()[None, :, None, :].to(device)
    return cos, sin, rotation


Row = Tuple[str, str, str, float, float, Optional[float]]


def run(device: torch.device, repeats: int) -> List[Row]:
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    big = 4 if device.type == "cuda" else 1  # longer sequences where the hardware allows
    rows: List[Row] = []

    def bench(op: str, shape: str, dtype: torch.dtype, ref: Callable, fast: Callable,
              baseline: Optional[Callable] = None) -> None:
        rows.append((
            op, shape, str(dtype).replace("torch.", ""),
            _time_ms(ref, device, repeats), _time_ms(fast, device, repeats),
            _time_ms(baseline, device, repeats) if baseline is not None else None,
        ))

    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    for dtype in dtypes:
        scale = HEAD_DIM ** -0.5
        for seq_q, seq_k, kind in ((256 * big, 256 * big, "self"), (1024 * big, 1024 * big, "self"),
                                   (1024 * big, 512, "cross")):
            q = randn(1, seq_q, HEADS, HEAD_DIM, dtype=dtype)
            k, v = randn(1, seq_k, HEADS, HEAD_DIM, dtype=dtype), randn(1, seq_k, HEADS, HEAD_DIM, dtype=dtype)
            bench(f"attention ({kind})", f"[1,{seq_q},40,128] x {seq_k}", dtype,
                  lambda: reference.attention(q, k, v, scale=scale),
                  lambda: cuda_backend.attention(q, k, v, scale=scale))
        k_lens = torch.tensor([1000 * big])
        bench("attention (k_lens)", f"[1,{1024 * big},40,128] L={1000 * big}", dtype,
              lambda: reference.attention(q, q, q, scale=scale, k_lens=k_lens),
              lambda: cuda_backend.attention(q, q, q, scale=scale, k_lens=k_lens))

        for seq in (1024 * big, 4096 * big):
            x = randn(1, seq, HEADS, HEAD_DIM, dtype=dtype)
            cos, sin, rotation = _rope_tables(seq, device)
            bench("rotary", f"[1,{seq},40,128]", dtype,
                  lambda: reference.rotary(x, cos, sin), lambda: cuda_backend.rotary(x, cos, sin),
                  lambda: rotary_float64_complex(x, rotation))

        for seq in (1024 * big, 4096 * big):
            x = randn(1, seq, DIM, dtype=dtype)
            w, b = randn(DIM, dtype=dtype), randn(DIM, dtype=dtype)
            mod_scale, mod_shift = randn(1, 1, DIM, dtype=torch.float32), randn(1, 1, DIM, dtype=torch.float32)
            shape = f"[1,{seq},5120]"
            bench("rms_norm", shape, dtype, lambda: reference.rms_norm(x, w, 1e-6),
                  lambda: cuda_backend.rms_norm(x, w, 1e-6))
            bench("layer_norm (affine)", shape, dtype, lambda: reference.layer_norm(x, w, b, 1e-6),
                  lambda: cuda_backend.layer_norm(x, w, b, 1e-6))
            bench("layer_norm_modulate", shape, dtype,
                  lambda: reference.layer_norm_modulate(x, mod_scale, mod_shift, 1e-6),
                  lambda: cuda_backend.layer_norm_modulate(x, mod_scale, mod_shift, 1e-6))
    return rows


def print_table(rows: List[Row], device: torch.device) -> None:
    header = ("op", "shape", "dtype", "reference ms", "cuda-backend ms", "speedup", "f64-complex ms")
    lines = [header] + [
        (op, shape, dtype, f"{ref:.2f}", f"{fast:.2f}", f"{ref / fast:.2f}x",
         f"{base:.2f}" if base is not None else "")
        for op, shape, dtype, ref, fast, base in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# kernels benchmark on {name}, torch {torch.__version__}, "
          f"flash-attn {'yes' if cuda_backend.FLASH_ATTN_AVAILABLE else 'no'}")
    for i, line in enumerate(lines):
        print(" | ".join(cell.ljust(w) if j < 3 else cell.rjust(w) for j, (cell, w) in enumerate(zip(line, widths))))
        if i == 0:
            print("-+-".join("-" * w for w in widths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    with torch.inference_mode():
        rows = run(device, args.repeats)
    print_table(rows, device)


if __name__ == "__main__":
    main()
