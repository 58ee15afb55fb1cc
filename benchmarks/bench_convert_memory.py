"""Peak host memory of `wanengine convert` relative to the size of what it writes.

Writes synthetic bf16 sources into a temp dir -- one ~1 GB expert as a diffusers
`transformer/` directory (used for both experts) and a ~1 GB text encoder as one
`.safetensors` in transformers UMT5 names (the golden VAE and tokenizer complete the set)
-- then, in a FRESH subprocess, runs `convert_checkpoint` and reports the rise of peak RSS
(VmHWM, reset after imports) and of anonymous memory (RssAnon, sampled every 5 ms: memory
the process owns, as opposed to file pages it maps, which the kernel can drop at will).

    python benchmarks/bench_convert_memory.py [--golden ../shared/golden]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict

import torch

from _memory import reset_peak, status_kib  # benchmarks/ is on sys.path when run as a script
from bench_load_memory import CONFIG, write_expert

T5_SHAPES = {"vocab": 32000, "dim": 4096, "ffn": 10240, "heads": 64, "layers": 2}


def write_t5(path: Path) -> int:
    """Synthetic bf16 UMT5 encoder in transformers names, one file; returns its bytes."""
    from safetensors.torch import save_file

    v, d, f, h = (T5_SHAPES[k] for k in ("vocab", "dim", "ffn", "heads"))
    shapes = {"shared.weight": (v, d), "encoder.final_layer_norm.weight": (d,)}
    for i in range(T5_SHAPES["layers"]):
        block = f"encoder.block.{i}.layer."
        shapes.update({block + "0.layer_norm.weight": (d,), block + "1.layer_norm.weight": (d,),
                       block + "0.SelfAttention.relative_attention_bias.weight": (32, h),
                       **{block + f"0.SelfAttention.{p}.weight": (d, d) for p in "qkvo"},
                       block + "1.DenseReluDense.wi_0.weight": (f, d), block + "1.DenseReluDense.wi_1.weight": (f, d),
                       block + "1.DenseReluDense.wo.weight": (d, f)})
    generator = torch.Generator().manual_seed(0)
    tensors = {n: (torch.rand(s, generator=generator) - 0.5).to(torch.bfloat16) for n, s in shapes.items()}
    save_file(tensors, str(path))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def measure(sources: Dict[str, str], out: str) -> Dict:
    from wanengine.io.convert import convert_checkpoint

    reset = reset_peak()
    base_rss, base_hwm, base_anon = status_kib("VmRSS"), status_kib("VmHWM"), status_kib("RssAnon")
    peak_anon = [base_anon]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], status_kib("RssAnon"))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    convert_checkpoint(out, **sources, shard_bytes=256 * 2**20)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    written = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    return {"written_bytes": written, "peak_rise_kib": status_kib("VmHWM") - (base_rss if reset else base_hwm),
            "anon_rise_kib": peak_anon[0] - base_anon, "seconds": seconds, "hwm_reset": reset}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--golden", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "golden")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # child mode: JSON of (sources, out)
    args = parser.parse_args()
    if args.measure:
        job = json.loads(args.measure)
        print(json.dumps(measure(job["sources"], job["out"])))
        return
    with tempfile.TemporaryDirectory(prefix="wan_convert_bench_") as tmp:
        root = Path(tmp)
        expert_bytes = write_expert(root / "transformer", dict(CONFIG), "diffusers")
        t5_bytes = write_t5(root / "umt5_xxl_bf16.safetensors")
        ckpt = args.golden / "ckpt"
        sources = {"high_noise_model": str(root / "transformer"), "low_noise_model": str(root / "transformer"),
                   "t5": str(root / "umt5_xxl_bf16.safetensors"), "vae": str(ckpt / "Wan2.1_VAE.pth"),
                   "tokenizer": str(ckpt / "google" / "umt5-xxl")}
        job = json.dumps({"sources": sources, "out": str(root / "released")})
        child = subprocess.run([sys.executable, __file__, "--measure", job], check=True, capture_output=True, text=True)
        result = json.loads(child.stdout.strip().splitlines()[-1])
    largest = max(expert_bytes, t5_bytes)
    print(f"sources: expert {expert_bytes / 2**20:.1f} MiB (diffusers names, x2), text encoder "
          f"{t5_bytes / 2**20:.1f} MiB (transformers names, one file), golden VAE")
    print(f"written                        : {result['written_bytes'] / 2**20:9.1f} MiB in {result['seconds']:.1f} s")
    print(f"peak RSS rise (incl. mapped)   : {result['peak_rise_kib'] / 1024:9.1f} MiB  (VmHWM reset: {result['hwm_reset']})")
    print(f"peak anonymous memory rise     : {result['anon_rise_kib'] / 1024:9.1f} MiB")
    print(f"anonymous peak / largest part  : {result['anon_rise_kib'] * 1024 / largest:9.3f} x")


if __name__ == "__main__":
    main()
