"""Check the `npu` kernels on an Ascend device against the reference math (a few minutes).

    python benchmarks/ascend_kernel_check.py                 # --device npu, both attention operators

Runs every kernel the DiT uses at Wan's real dims (D 5120, 40 heads of 128; short sequences)
on the device through `torch_npu`, for `WANENGINE_NPU_ATTENTION` = `fa` and `fia` and for
float32 / bfloat16 / float16, and compares each result with `kernels.reference` computed in
float32 on the CPU from the same rounded inputs. The bounds are those of
tests/test_kernels_npu.py (met there through the CPU test double of torch_npu); a failed
bound or a raising operator is printed and makes the exit code 1.

This is not a timing script. It has been run only on the CPU through the test double
(`--device cpu` with tests/fake_torch_npu.py installed as torch_npu), not on Ascend hardware.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, List, Tuple

import torch

DIM, HEADS, HEAD_DIM = 5120, 40, 128
ATTN_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
ATTN_TOL_BF16_COMPUTE = 1.5e-2  # float32 through FIA (or WANENGINE_NPU_FP32_ATTENTION=0): bf16 inside
ROTARY_TOL = {torch.float32: 1e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
NORM_TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def rope_tables(seq: int) -> Tuple[torch.Tensor, torch.Tensor]:
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(HEAD_DIM // 2) / (HEAD_DIM // 2))
    return (angles.cos().repeat_interleave(2, -1).float()[None, :, None],
            angles.sin().repeat_interleave(2, -1).float()[None, :, None])


def cases(dtype: torch.dtype, op: str) -> List[Tuple[str, Callable, Callable, float]]:
    """(name, npu call on device tensors, reference call on CPU float32 tensors, bound)."""
    from wanengine.kernels import reference

    attn_tol = ATTN_TOL_BF16_COMPUTE if (dtype == torch.float32 and op == "fia") else ATTN_TOL[dtype]
    out: List[Tuple[str, Callable, Callable, float]] = []
    for name, batch, seq_q, seq_k, lens in (("self 1x1024", 1, 1024, 1024, None), ("self ragged 2x257", 2, 257, 257, [257, 200]),
                                            ("cross 1x1024x512", 1, 1024, 512, None)):
        q, k, v = (randn(batch, s, HEADS, HEAD_DIM, seed=i).to(dtype) for i, s in ((1, seq_q), (2, seq_k), (3, seq_k)))
        k_lens = torch.tensor(lens) if lens is not None else None
        out.append((f"attention {name}",
                    lambda kn, d, q=q, k=k, v=v, kl=k_lens: kn.attention(q.to(d), k.to(d), v.to(d), scale=HEAD_DIM ** -0.5,
                                                                        k_lens=kl),
                    lambda q=q, k=k, v=v, kl=k_lens: reference.attention(q.float(), k.float(), v.float(),
                                                                         scale=HEAD_DIM ** -0.5, k_lens=kl),
                    attn_tol))
    cos, sin = rope_tables(64)
    for batch in (1, 25):  # 25 x 40 heads: split into calls with B * N < 1000
        x = randn(batch, 64, HEADS, HEAD_DIM, seed=4).to(dtype)
        out.append((f"rotary batch {batch}", lambda kn, d, x=x: kn.rotary(x.to(d), cos.to(d), sin.to(d)),
                    lambda x=x: reference.rotary(x.float(), cos, sin), ROTARY_TOL[dtype]))
    x = (randn(1, 256, DIM, seed=5, scale=3.0) + 0.5).to(dtype)
    w, b = (1 + 0.2 * randn(DIM, seed=6)).to(dtype), (0.1 * randn(DIM, seed=7)).to(dtype)
    scale, shift = 0.3 * randn(1, 1, DIM, seed=8), 0.3 * randn(1, 1, DIM, seed=9)
    out += [
        ("rms_norm", lambda kn, d: kn.rms_norm(x.to(d), w.to(d), 1e-6),
         lambda: reference.rms_norm(x.float(), w.float(), 1e-6), NORM_TOL[dtype]),
        ("layer_norm affine", lambda kn, d: kn.layer_norm(x.to(d), w.to(d), b.to(d), 1e-6),
         lambda: reference.layer_norm(x.float(), w.float(), b.float(), 1e-6), NORM_TOL[dtype]),
        ("layer_norm_modulate", lambda kn, d: kn.layer_norm_modulate(x.to(d), scale.to(d), shift.to(d), 1e-6),
         lambda: reference.layer_norm_modulate(x.float(), scale, shift, 1e-6), NORM_TOL[dtype]),
    ]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="npu")
    parser.add_argument("--attention", default="fa,fia", help="comma-separated WANENGINE_NPU_ATTENTION choices")
    args = parser.parse_args(argv)

    import torch_npu  # registers the "npu" device type

    from wanengine import kernels

    backend = kernels.select("npu", args.device)  # applies set_compile_mode / allow_internal_format once
    module = backend.module

    print(f"torch {torch.__version__}, torch_npu {getattr(torch_npu, '__version__', '?')}, device {args.device}")
    failures = 0
    for op in args.attention.split(","):
        module.ATTENTION_OP = op  # what WANENGINE_NPU_ATTENTION sets at import
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for name, run, want, bound in cases(dtype, op):
                label = f"{op:3s} {str(dtype).replace('torch.', ''):8s} {name:22s}"
                try:
                    got = run(module, args.device)
                    if args.device.startswith("npu"):
                        torch.npu.synchronize()  # type: ignore[attr-defined]
                    err = rel_err(got, want())
                except Exception as exc:  # a contract the device rejects: report it, keep checking
                    failures += 1
                    print(f"{label} RAISED {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
                    continue
                ok = err <= bound and got.dtype == dtype
                failures += not ok
                print(f"{label} rel_err {err:.2e} (bound {bound:.1e}) {'ok' if ok else 'FAIL'}")
    print("all within bounds" if not failures else f"{failures} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
