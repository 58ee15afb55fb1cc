"""GPU benchmark of one Wan2.2 expert at the real dimensions (D=5120, 40 heads, FFN 13824,
40 blocks) with random bf16 weights: one block and the full forward at the 480p (32,760
tokens) and 720p (75,600 tokens) sequence lengths, attention backends compared, TFLOP/s,
MFU against 989 TFLOP/s dense bf16, and peak memory.

Baseline, measured in the same run: the same block with the reference design's waste put
back -- a per-token `[L, 6, D]` float32 modulation and RoPE recomputed every call in float64
complex arithmetic (spec dit.md describes both) -- so the speed-up is ours vs that design on
the same card.

    python benchmarks/gpu_dit.py [--json out.json] [--layers 40] [--quick]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from wanengine import kernels
from wanengine.models.dit import DiTConfig, WanDiT

from reference_design import rope_float64_complex  # benchmarks/ is on sys.path when run as a script

PEAK_TFLOPS = 989.0
D, HEADS, FFN = 5120, 40, 13824
SIZES = {"480p": (21, 60, 104), "720p": (21, 90, 160)}  # latent F', h, w


def block_flops(tokens: int) -> float:
    return 12 * tokens * D * D + 4 * tokens * D * FFN + 4 * tokens * tokens * D


DEV = "cuda"


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int) -> float:
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - start) / reps


def build(layers: int) -> WanDiT:
    cfg = DiTConfig(dim=D, ffn_dim=FFN, freq_dim=256, in_dim=36, out_dim=16, num_heads=HEADS, num_layers=layers,
                    text_len=512, eps=1e-6)
    with torch.device("meta"):
        model = WanDiT(cfg)
    model = model.to_empty(device=DEV)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.zero_()
    keep32 = ("modulation", "time_embedding", "time_projection")
    for name, p in model.named_parameters():
        if not any(k in name for k in keep32):
            p.data = p.data.to(torch.bfloat16)
    return model.eval().requires_grad_(False)


def baseline_block(block, x, e0_tokens, context, grid):
    """The block with a per-token modulation tensor and per-call float64 RoPE."""
    mod = (block.modulation.float()[:, None] + e0_tokens).unbind(2)  # each [1, L, D]
    shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = mod
    a = F.layer_norm(x, (D,), eps=1e-6) * (1 + scale_msa) + shift_msa
    sa = block.self_attn
    ab = a.to(torch.bfloat16)
    heads = (1, x.shape[1], HEADS, D // HEADS)
    q = rope_float64_complex(sa.norm_q(sa.q(ab)).view(heads), grid, x.shape[1])
    k = rope_float64_complex(sa.norm_k(sa.k(ab)).view(heads), grid, x.shape[1])
    v = sa.v(ab).view(heads)
    attn = sa.o(F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
                .transpose(1, 2).flatten(2))
    x = x + attn.float() * gate_msa
    x = x + block.cross_attn(block.norm3(x).to(torch.bfloat16), context).float()
    b = F.layer_norm(x, (D,), eps=1e-6) * (1 + scale_ffn) + shift_ffn
    return x + block.ffn(b.to(torch.bfloat16)).float() * gate_ffn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="720p only for the full forward")
    parser.add_argument("--reps", type=int, default=1, help="timed repetitions of the full forward")
    parser.add_argument("--smoke", action="store_true", help="tiny dims on the CPU: checks the script runs")
    args = parser.parse_args()
    global DEV, D, HEADS, FFN, SIZES
    if args.smoke:
        DEV, D, HEADS, FFN, SIZES = "cpu", 256, 2, 512, {"tiny": (2, 8, 12)}
        torch.cuda.get_device_name = lambda: "cpu (smoke)"
        torch.cuda.reset_peak_memory_stats = lambda: None
        torch.cuda.max_memory_allocated = lambda: 0
    torch.backends.cuda.matmul.allow_tf32 = True
    kernels.configure("cuda", DEV)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "flash_attn": __import__("wanengine.kernels.cuda", fromlist=["x"]).FLASH_ATTN_AVAILABLE, "rows": []}
    print(f"# {results['device']}, torch {torch.__version__}", flush=True)
    model = build(args.layers)
    block = model.blocks[0]
    text = model.embed_text([torch.randn(120, 4096, device=DEV)])
    e, e0 = model.embed_time(torch.tensor([900.0]))

    def row(**kw):
        results["rows"].append(kw)
        print(json.dumps(kw), flush=True)

    for name, (f, h, w) in SIZES.items():
        grid = (f, h // 2, w // 2)
        tokens = f * (h // 2) * (w // 2)
        x = torch.randn(1, tokens, D, device=DEV)
        cos, sin = model.rope_tables(grid, tokens, DEV)
        flops = block_flops(tokens)
        # attention backends on the block's attention core
        q = torch.randn(1, HEADS, tokens, D // HEADS, device=DEV, dtype=torch.bfloat16)
        for backend_name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            backend = getattr(torch.nn.attention.SDPBackend, backend_name, None)
            if backend is None:
                continue
            try:
                with torch.nn.attention.sdpa_kernel([backend]):
                    secs = timed(lambda: F.scaled_dot_product_attention(q, q, q), 3)
                row(size=name, what=f"attention sdpa {backend_name.lower()}", seconds=secs,
                    tflops=4 * tokens * tokens * D / secs / 1e12)
            except RuntimeError as exc:
                row(size=name, what=f"attention sdpa {backend_name.lower()}", error=str(exc)[:100])
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            secs = timed(lambda: block(x, e0, text, cos, sin, None), 3)
        row(size=name, what="block (wanengine)", tokens=tokens, seconds=secs, tflops=flops / secs / 1e12,
            mfu=flops / secs / 1e12 / PEAK_TFLOPS, peak_gb=torch.cuda.max_memory_allocated() / 1e9)
        e0_tokens = e0[:, None].expand(1, tokens, 6, D).contiguous()  # the reference's per-token copy
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            base = timed(lambda: baseline_block(block, x, e0_tokens, text, grid), 3)
        row(size=name, what="block (reference-design baseline)", tokens=tokens, seconds=base,
            tflops=flops / base / 1e12, mfu=flops / base / 1e12 / PEAK_TFLOPS,
            peak_gb=torch.cuda.max_memory_allocated() / 1e9, speedup_of_ours=base / secs)
        e0_tokens = None  # free the 9 GB per-token copy before the full forward
        if args.quick and name == "480p":
            continue
        lat = torch.randn(1, 16, f, h, w, device=DEV)
        y = torch.randn(1, 20, f, h, w, device=DEV)
        ctx = [torch.randn(120, 4096, device=DEV)]
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            secs = timed(lambda: model(lat, torch.tensor([900.0]), ctx, y, tokens), args.reps)
        total = flops * args.layers
        row(size=name, what=f"full forward ({args.layers} blocks, mean of {args.reps})", tokens=tokens, seconds=secs,
            tflops=total / secs / 1e12, mfu=total / secs / 1e12 / PEAK_TFLOPS,
            peak_gb=torch.cuda.max_memory_allocated() / 1e9)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
