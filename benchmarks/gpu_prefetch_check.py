"""GPU check of the asynchronous expert prefetch (`wanengine.experts.ExpertSwitcher`): the same
denoising loop with offload on, once with the prefetch and once without, on two random bf16
experts; prints per-step seconds, the boundary stall, and whether both runs agree. ~1 min on one
H100/H200; needs CUDA (or an Ascend NPU with --device npu).

    python benchmarks/gpu_prefetch_check.py [--layers 10] [--device cuda]
"""
from __future__ import annotations

import argparse
import time

import torch

from wanengine import kernels
from wanengine.device import synchronizer
from wanengine.experts import ExpertSwitcher
from wanengine.models.dit import DiTConfig, WanDiT
from wanengine.pipeline import HIGH, LOW, batched_cfg, denoise
from wanengine.schedulers import make_sampler


def random_expert(cfg: DiTConfig, seed: int, device: torch.device) -> WanDiT:
    """Random bf16 weights, drawn on the device (fast) and parked on the host (offload)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = WanDiT(cfg)
    model = model.to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.zero_()
    return model.to("cpu").eval().requires_grad_(False)


def run(device: torch.device, experts, use_prefetch: bool, steps: int):
    switcher = ExpertSwitcher(experts, device, offload=True)
    sampler = make_sampler("unipc", steps, 5.0, device=device)
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(16, 9, 60, 104, generator=gen).to(device)  # 480p, 33 frames: 14,040 tokens
    y = torch.randn(20, 9, 60, 104, generator=gen).to(device)
    contexts = (torch.randn(60, 4096, generator=gen).to(device, torch.bfloat16),
                torch.randn(90, 4096, generator=gen).to(device, torch.bfloat16))
    sync = synchronizer(device) or (lambda: None)
    marks = [time.perf_counter()]

    def on_step(info, lat):
        sync()
        marks.append(time.perf_counter())

    out = denoise(get_expert=switcher.get, sampler=sampler, latent=latent, y=y, contexts=contexts,
                  seq_len=9 * 30 * 52, guide_scale=(3.5, 3.5), guidance=batched_cfg, on_step=on_step,
                  prefetch=switcher.prefetch if use_prefetch else None)
    seconds = [b - a for a, b in zip(marks, marks[1:])]
    return out.float().cpu(), seconds, switcher, [str(t) for t in sampler.timesteps.tolist()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    kernels.configure("auto", device)
    cfg = DiTConfig(dim=5120, ffn_dim=13824, freq_dim=256, in_dim=36, out_dim=16, num_heads=40,
                    num_layers=args.layers)
    experts = {HIGH: random_expert(cfg, 1, device), LOW: random_expert(cfg, 2, device)}
    size_gb = sum(p.numel() * p.element_size() for p in experts[HIGH].parameters()) / 1e9
    print(f"# {device}, two random bf16 experts of {size_gb:.1f} GB ({args.layers} blocks), offload on")
    results = {}
    for use in (False, True, False, True):  # twice each: the first pass also pays one-time costs
        results[use] = run(device, experts, use, args.steps)
        out, seconds, switcher, timesteps = results[use]
        print(f"prefetch {'on ' if use else 'off'}: steps {' '.join(f'{s:.2f}' for s in seconds)} s "
              f"(timesteps {' '.join(timesteps)}), sync swaps {switcher.swaps}, prefetched {switcher.prefetches}")
    (a, sa, _, _), (b, sb, _, _) = results[False], results[True]
    boundary = next(i for i, t in enumerate(results[True][3]) if int(t) < 900)
    print(f"boundary step {boundary}: {sa[boundary]:.2f} s without prefetch, {sb[boundary]:.2f} s with "
          f"(stall removed: {sa[boundary] - sb[boundary]:.2f} s); outputs equal: {torch.equal(a, b)}")


if __name__ == "__main__":
    main()
