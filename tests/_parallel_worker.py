"""One rank of a multi-process test, and `launch()` that starts all ranks (gloo on CPU).

Run as `python tests/_parallel_worker.py CASE OUT_DIR [options]` with torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); `launch()` sets it up. Each rank
writes `OUT_DIR/rank<r>.json` with what it measured; tensors worth comparing in the parent go
to `OUT_DIR/*.safetensors`. The parent test asserts -- workers only measure.

Cases:
  attention  Ulysses all-to-all attention vs single-device attention (random, padded), and the
             golden DiT forward with `apply_ulysses` (incl. a seq_len that needs padding).
  vae        `SplitVAE` encode / decode vs the golden VAE data and the unsplit VAE.
  fsdp       sharded loading: parameter bytes per rank, golden DiT and T5 outputs, bf16 parity.
  e2e        `ParallelEngine` on the golden image-to-video case; rank 0 saves the video.
  cache      the step cache under the layouts of `--layouts`, one engine after the other.
  fewstep    4-step Euler runs: CFG parallel with mixed guidance, Ulysses x FSDP with LoRA adapters.
  device     by hand on an accelerator host (`torchrun --nproc_per_node=N tests/_parallel_worker.py
             device OUT`): the device-specific paths against the golden data.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- parent side
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rank_env(rank: int, world: int, port: int) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]))
    return env


def launch(world: int, case: str, out_dir: Path, extra: Sequence[str] = (), timeout: float = 120.0) -> List[dict]:
    """Start `world` ranks of CASE, wait, and return each rank's JSON report; raises with the
    ranks' stderr tails if any rank fails or the job times out."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, str(HERE / "_parallel_worker.py"), case, str(out_dir), *extra],
                              env=rank_env(rank, world, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for rank in range(world)]
    deadline, logs, failed = time.monotonic() + timeout, [], False
    for rank, proc in enumerate(procs):
        try:
            out, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            out, _ = proc.communicate()
            failed = True
        logs.append(out.decode(errors="replace"))
        failed = failed or proc.returncode != 0
    if failed:
        tails = "\n".join(f"--- rank {r} (exit {p.returncode}) ---\n{log[-3000:]}"
                          for r, (p, log) in enumerate(zip(procs, logs)))
        raise RuntimeError(f"{case} on {world} ranks failed:\n{tails}")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


# --------------------------------------------------------------------------- worker side
def _max_abs(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


def _rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def case_attention(args, rank: int, world: int) -> dict:
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    from helpers import golden_dir
    from wanengine import kernels
    from wanengine.models.dit_loading import load_dit
    from wanengine.parallel.ulysses import apply_ulysses, heads_to_sequence, make_ulysses_attend, sequence_to_heads

    dist.init_process_group("gloo")
    report: dict = {}
    # random attention: 4 heads per rank... 2 at sp 4; 13 real tokens padded to a multiple of sp
    gen = torch.Generator().manual_seed(0)
    batch, heads, dim, real = 2, 2 * world, 16, 13
    seq = -(-real // world) * world + world  # some padding on top of the rounding
    q, k, v = (torch.randn(batch, seq, heads, dim, generator=gen) for _ in range(3))
    k_lens = torch.tensor([real, real - 3], dtype=torch.int32)
    want = kernels.attention(q, k, v, scale=dim ** -0.5, k_lens=k_lens)
    chunk = seq // world
    rows = slice(rank * chunk, (rank + 1) * chunk)
    attend = make_ulysses_attend(dim, world, None)
    got = attend(q[:, rows], k[:, rows], v[:, rows], k_lens)
    report["attention_max_abs"] = _max_abs(got, want[:, rows])  # padded query rows included
    there = sequence_to_heads(q[:, rows], world, None)
    back = heads_to_sequence(there, world, None)
    report["roundtrip_exact"] = bool(torch.equal(back, q[:, rows]))
    report["scatter_heads_exact"] = bool(torch.equal(there, q[:, :, rank * (heads // world):(rank + 1) * (heads // world)]))

    # the golden DiT forward (2 heads: only sp <= 2)
    if world > 2:
        return report
    golden = load_file(str(golden_dir() / "dit.safetensors"))
    model = load_dit(golden_dir() / "ckpt" / "low_noise_model", device="cpu", dtype=torch.float32)
    x, y, t = golden["x"], golden["y"], golden["t"]
    context = [golden["context"]] if golden["context"].dim() == 2 else list(golden["context"])
    calls = []
    real_all_to_all = dist.all_to_all_single

    def counting_all_to_all(*a, **kw):
        calls.append(1)
        return real_all_to_all(*a, **kw)

    dist.all_to_all_single = counting_all_to_all  # proves the split path ran: 2 per block
    with torch.no_grad():
        single = model(x, t, context, y)
        apply_ulysses(model, dist.group.WORLD)
        split = model(x, t, context, y)
        report["all_to_alls_per_forward"] = len(calls)
        tokens = x.shape[-3] * (x.shape[-2] // 2) * (x.shape[-1] // 2)
        padded = model(x, t, context, y, seq_len=tokens + 1)  # rounds up to a multiple of sp: padding
    report["dit_rel_vs_golden"] = _rel(split, golden["out_low"])
    report["dit_rel_vs_single"] = _rel(split, single)
    report["dit_padded_rel_vs_golden"] = _rel(padded, golden["out_low"])
    return report


def case_vae(args, rank: int, world: int) -> dict:
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    from helpers import golden_dir
    from wanengine.models.vae import load_vae
    from wanengine.parallel.vae_split import apply_vae_split, tile_grid

    dist.init_process_group("gloo")
    golden = load_file(str(golden_dir() / "vae.safetensors"))
    vae = load_vae(golden_dir() / "ckpt" / "Wan2.1_VAE.pth", device="cpu", dtype=torch.float32)
    split = apply_vae_split(vae)
    exchanges = []
    real_batch = dist.batch_isend_irecv

    def counting_batch(ops):
        exchanges.append(len(ops))
        return real_batch(ops)

    dist.batch_isend_irecv = counting_batch  # proves halos travelled
    start = time.perf_counter()
    mu = split.encode(golden["video"])
    decoded = split.decode(golden["z"])
    seconds = time.perf_counter() - start
    report = {"encode_rel_vs_golden": _rel(mu, golden["mu"]), "decode_rel_vs_golden": _rel(decoded, golden["decoded"]),
              "decode_max_abs_vs_golden": _max_abs(decoded, golden["decoded"]), "seconds": seconds,
              "grid": list(tile_grid(world, *golden["z"].shape[-2:])), "halo_exchanges": len(exchanges)}
    # uneven tiles (5 x 7 latent rows x columns), against the unsplit VAE
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(16, 2, 5, 7, generator=gen)
    video = torch.rand(3, 5, 40, 56, generator=gen) * 2 - 1
    report["uneven_decode_max_abs_vs_single"] = _max_abs(split.decode(z), vae.decode(z))
    report["uneven_encode_max_abs_vs_single"] = _max_abs(split.encode(video), vae.encode(video))
    report["golden_decode_max_abs_vs_single"] = _max_abs(decoded, vae.decode(golden["z"]))
    report["golden_encode_max_abs_vs_single"] = _max_abs(mu, vae.encode(golden["video"]))
    return report


def case_fsdp(args, rank: int, world: int) -> dict:
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    from helpers import golden_dir
    from wanengine.models.dit_loading import load_dit
    from wanengine.parallel.fsdp import (full_parameter_bytes, load_dit_sharded, load_t5_sharded,
                                         local_parameter_bytes, reshard, world_mesh)

    dist.init_process_group("gloo")
    mesh = world_mesh("cpu")
    ckpt = golden_dir() / "ckpt"
    golden = load_file(str(golden_dir() / "dit.safetensors"))
    x, y, t = golden["x"], golden["y"], golden["t"]
    context = [golden["context"]] if golden["context"].dim() == 2 else list(golden["context"])
    report: dict = {}
    with torch.no_grad():
        sharded = load_dit_sharded(ckpt / "low_noise_model", device=torch.device("cpu"), dtype=torch.float32, mesh=mesh)
        report["dit_local_fraction"] = local_parameter_bytes(sharded) / full_parameter_bytes(sharded)
        report["dit_rel_vs_golden"] = _rel(sharded(x, t, context, y), golden["out_low"])
        reshard(sharded)
        report["dit_local_fraction_after_forward"] = local_parameter_bytes(sharded) / full_parameter_bytes(sharded)
        # bf16 (with the float32 modulation / time MLPs in the same units): same numbers as unsharded bf16
        bf16 = load_dit_sharded(ckpt / "high_noise_model", device=torch.device("cpu"), dtype=torch.bfloat16, mesh=mesh)
        plain = load_dit(ckpt / "high_noise_model", device="cpu", dtype=torch.bfloat16)
        report["dit_bf16_max_abs_vs_unsharded"] = _max_abs(bf16(x, t, context, y), plain(x, t, context, y))
        t5_golden = load_file(str(golden_dir() / "t5.safetensors"))
        t5 = load_t5_sharded(ckpt / "models_t5_umt5-xxl-enc-bf16.pth", device=torch.device("cpu"),
                             dtype=torch.float32, mesh=mesh)
        rows = t5.encode(t5_golden["ids"], t5_golden["mask"])
        reshard(t5)
        report["t5_local_fraction"] = local_parameter_bytes(t5) / full_parameter_bytes(t5)
        out = t5_golden["out"]
        report["t5_rel_vs_golden"] = max(_rel(r, out[i, :r.shape[0]]) for i, r in enumerate(rows))
    return report


def case_e2e(args, rank: int, world: int) -> dict:
    from safetensors.torch import save_file

    from helpers import golden_dir
    from wanengine.config import EngineConfig
    from wanengine.parallel import is_writer, make_engine

    meta = json.loads((golden_dir() / "meta.json").read_text())["i2v"]
    meta.update({k: getattr(args, k) for k in ("frame_num", "steps", "max_area") if getattr(args, k) is not None})
    cfg = EngineConfig(ckpt_dir=str(golden_dir() / "ckpt"), device="cpu", dtype="float32", progress=False,
                       ulysses_size=args.ulysses_size, cfg_size=args.cfg_size, dit_fsdp=args.dit_fsdp,
                       t5_fsdp=args.t5_fsdp, vae_parallel=args.vae_parallel, cfg_batch=not args.sequential_cfg,
                       quantize=args.quantize, quantize_t5=args.quantize)
    start = time.perf_counter()
    engine = make_engine(cfg)
    loaded = time.perf_counter()
    video = engine.i2v(golden_dir() / "input.png", meta["prompt"], negative_prompt=meta["n_prompt"],
                       max_area=meta["max_area"], frame_num=meta["frame_num"], steps=meta["steps"],
                       shift=meta["shift"], solver=meta["solver"], guide_scale=tuple(meta["guide_scale"]),
                       seed=meta["seed"] if rank == 0 else 7)  # other ranks' seeds must be overridden
    report = {"load_s": loaded - start, "run_s": time.perf_counter() - loaded, "seed": video.seed,
              "frames": video.num_frames, "writer": is_writer()}
    if is_writer():
        save_file({"video": video.tensor.contiguous(), "latent": video.latent.contiguous()},
                  str(Path(args.out_dir) / "video.safetensors"))
    return report


def case_device(args, rank: int, world: int) -> dict:
    """Accelerator smoke check (run by hand under torchrun on a GPU / NPU host, not in CI):
    the device-specific paths -- backend init, per-rank device, FSDP2 and the forced FSDP1
    fallback on the device, Ulysses collectives, the whole ParallelEngine -- against the golden."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    from helpers import golden_dir
    from dataclasses import replace

    from wanengine.config import EngineConfig
    from wanengine.parallel import fsdp, make_engine
    from wanengine.parallel.ulysses import apply_ulysses

    device_type = args.device_type
    meta = json.loads((golden_dir() / "meta.json").read_text())["i2v"]
    report: dict = {}
    for dtype in ("float32", "bfloat16"):
        cfg = EngineConfig(ckpt_dir=str(golden_dir() / "ckpt"), device=device_type, dtype=dtype, progress=False,
                           ulysses_size=world, dit_fsdp=True, t5_fsdp=True, vae_parallel=True)
        start = time.perf_counter()
        engine = make_engine(cfg)
        video = engine.i2v(golden_dir() / "input.png", meta["prompt"], negative_prompt=meta["n_prompt"],
                           max_area=meta["max_area"], frame_num=meta["frame_num"], steps=meta["steps"],
                           shift=meta["shift"], solver=meta["solver"], guide_scale=tuple(meta["guide_scale"]),
                           seed=meta["seed"])
        report[f"engine_{dtype}_seconds"] = time.perf_counter() - start
        report["device"] = str(engine.device)
        del engine
        # the accelerator's generator draws other noise than the CPU golden: compare with the
        # single-device engine on the same device instead
        from wanengine.engine import Engine

        single = Engine(replace(cfg, ulysses_size=1, dit_fsdp=False, t5_fsdp=False, vae_parallel=False))
        base = single.i2v(golden_dir() / "input.png", meta["prompt"], negative_prompt=meta["n_prompt"],
                          max_area=meta["max_area"], frame_num=meta["frame_num"], steps=meta["steps"],
                          shift=meta["shift"], solver=meta["solver"], guide_scale=tuple(meta["guide_scale"]),
                          seed=meta["seed"])
        report[f"engine_{dtype}_video_max_abs_vs_single"] = _max_abs(video.tensor, base.tensor)
        report[f"engine_{dtype}_latent_rel_vs_single"] = _rel(video.latent, base.latent)
        del single
    if device_type == "cpu":  # FSDP1 needs an accelerator
        return report
    device = torch.device(device_type, int(os.environ.get("LOCAL_RANK", "0")))
    golden = load_file(str(golden_dir() / "dit.safetensors"))
    x, y, t = (golden[k].to(device) for k in ("x", "y", "t"))
    context = [golden["context"].to(device)]
    ckpt = golden_dir() / "ckpt"
    with torch.no_grad():
        fsdp._fully_shard, saved = None, fsdp._fully_shard  # the FSDP1 fallback of older torch
        try:
            model = fsdp.load_dit_sharded(ckpt / "low_noise_model", device=device, dtype=torch.float32, mesh=None,
                                          prepare=lambda m: apply_ulysses(m, dist.group.WORLD))
            report["fsdp1_ulysses_dit_rel"] = _rel(model(x, t, context, y).cpu(), golden["out_low"])
            t5 = fsdp.load_t5_sharded(ckpt / "models_t5_umt5-xxl-enc-bf16.pth", device=device,
                                      dtype=torch.float32, mesh=None)
            t5_golden = load_file(str(golden_dir() / "t5.safetensors"))
            rows = t5.encode(t5_golden["ids"], t5_golden["mask"])
            report["fsdp1_t5_rel"] = max(_rel(r.cpu(), t5_golden["out"][i, :r.shape[0]]) for i, r in enumerate(rows))
        finally:
            fsdp._fully_shard = saved
    return report


def case_fewstep(args, rank: int, world: int) -> dict:
    """`ParallelEngine` with 4 Euler steps (test_fewstep_parallel.py): `--cfg-size 2` with guidance
    off on the low-noise expert only, or Ulysses x FSDP with the LoRA files the parent put in
    OUT_DIR (`lora_*.safetensors`, merged as the tensors stream in, before each rank keeps its rows). Every rank saves its latent;
    with FSDP each rank also compares its merged shards with a single-process merge."""
    import torch
    from safetensors.torch import save_file

    from helpers import golden_dir
    from wanengine.adapters import LoraSpec
    from wanengine.config import EngineConfig
    from wanengine.parallel import make_engine

    out_dir = Path(args.out_dir)
    loras = [LoraSpec(str(p), 0.8 if "both" in p.name else 1.0, "both" if "both" in p.name else "high")
             for p in sorted(out_dir.glob("lora_*.safetensors"))]
    cfg = EngineConfig(ckpt_dir=str(golden_dir() / "ckpt"), device="cpu", dtype="float32", progress=False,
                       ulysses_size=args.ulysses_size, cfg_size=args.cfg_size, dit_fsdp=args.dit_fsdp, loras=loras)
    engine = make_engine(cfg)
    guide = (1.0, 3.5) if args.cfg_size == 2 else (1.0, 1.0)
    video = engine.i2v(golden_dir() / "input.png", "a cat", max_area=12288, frame_num=5, steps=4, shift=5.0,
                       solver="euler", guide_scale=guide, seed=3)
    save_file({"latent": video.latent.contiguous()}, str(out_dir / f"latent{rank}.safetensors"))
    report = {"dit_forwards": video.metadata["dit_forwards"], "adapters": video.metadata.get("adapters", [])}
    if args.dit_fsdp:
        from wanengine.adapters.merge import AdapterMerger
        from wanengine.quant.loading import load_expert

        equal = []
        for name, sharded in engine.experts.experts.items():
            with AdapterMerger(engine.adapter_plans[name]) as merger:  # the single-process load
                want = load_expert(golden_dir() / "ckpt" / name, device="cpu", dtype=torch.float32,
                                   merger=merger).state_dict()
            for key, param in sharded.named_parameters():
                full = param.full_tensor() if hasattr(param, "full_tensor") else param
                equal.append(bool(torch.equal(full, want[key])))
        report["fsdp_params_equal_single_merge"] = all(equal) and len(equal) > 0
    return report


def case_fsdp8(args, rank: int, world: int) -> dict:
    """An fp8 expert (quantized at load) under FSDP: sharded vs. the same load unsharded, and the
    bytes each rank holds (int8 and the text encoder are covered by `e2e --quantize int8`)."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file

    from helpers import golden_dir
    from wanengine.parallel.fsdp import full_parameter_bytes, load_dit_sharded, local_parameter_bytes, world_mesh
    from wanengine.quant.loading import load_expert

    dist.init_process_group("gloo")
    expert = golden_dir() / "ckpt" / "low_noise_model"
    golden = load_file(str(golden_dir() / "dit.safetensors"))
    x, y, t = golden["x"], golden["y"], golden["t"]
    context = [golden["context"]] if golden["context"].dim() == 2 else list(golden["context"])
    fp8 = torch.float8_e4m3fn
    with torch.no_grad():
        sharded = load_dit_sharded(expert, device=torch.device("cpu"), dtype=torch.float32, mesh=world_mesh("cpu"),
                                   quantize=fp8)
        plain = load_expert(expert, device="cpu", dtype=torch.float32, quantize=fp8)
        return {"local_fraction": local_parameter_bytes(sharded) / full_parameter_bytes(sharded),
                "fp8_parameters": sum(p.dtype == fp8 for p in sharded.parameters()),
                "max_abs_vs_unsharded": _max_abs(sharded(x, t, context, y), plain(x, t, context, y))}


CACHE_LAYOUTS = {"ulysses2_dit_fsdp": {"ulysses_size": 2, "dit_fsdp": True}, "cfg2": {"cfg_size": 2},
                 "cfg2_x_ulysses2": {"cfg_size": 2, "ulysses_size": 2}}


def case_cache(args, rank: int, world: int) -> dict:
    """The step cache under each layout named in `--layouts` (one engine after the other in this
    launch), on the golden case with `--steps` and a first-block `--cache-threshold`:
    every rank reports its skipped steps; rank 0 saves `video_<layout>.safetensors`."""
    from safetensors.torch import save_file

    from helpers import golden_dir
    from wanengine.config import EngineConfig
    from wanengine.parallel import make_engine

    meta = json.loads((golden_dir() / "meta.json").read_text())["i2v"]
    report: dict = {}
    for layout in args.layouts.split(","):
        cfg = EngineConfig(ckpt_dir=str(golden_dir() / "ckpt"), device="cpu", dtype="float32", progress=False,
                           step_cache="first-block", cache_threshold=args.cache_threshold, **CACHE_LAYOUTS[layout])
        engine = make_engine(cfg)
        video = engine.i2v(golden_dir() / "input.png", meta["prompt"], negative_prompt=meta["n_prompt"],
                           max_area=meta["max_area"], frame_num=meta["frame_num"], steps=args.steps or meta["steps"],
                           shift=meta["shift"], solver=meta["solver"], guide_scale=tuple(meta["guide_scale"]),
                           seed=meta["seed"])
        report[layout] = video.metadata["cache"]
        if rank == 0:
            save_file({"video": video.tensor.contiguous()}, str(Path(args.out_dir) / f"video_{layout}.safetensors"))
        del engine
    return report


CASES = {"attention": case_attention, "vae": case_vae, "fsdp": case_fsdp, "e2e": case_e2e, "device": case_device,
         "fsdp8": case_fsdp8, "cache": case_cache, "fewstep": case_fewstep}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("case", choices=sorted(CASES))
    parser.add_argument("out_dir")
    parser.add_argument("--ulysses-size", type=int, default=1)
    parser.add_argument("--cfg-size", type=int, default=1)
    parser.add_argument("--dit-fsdp", action="store_true")
    parser.add_argument("--t5-fsdp", action="store_true")
    parser.add_argument("--vae-parallel", action="store_true")
    parser.add_argument("--sequential-cfg", action="store_true")
    parser.add_argument("--device-type", default="cuda")
    parser.add_argument("--quantize", default=None, help="int8 / fp8 block linears of the experts and T5 (e2e)")
    parser.add_argument("--frame-num", type=int, default=None, help="e2e: instead of the golden case's")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--max-area", type=int, default=None)
    parser.add_argument("--layouts", default="")  # case cache
    parser.add_argument("--cache-threshold", type=float, default=0.0)
    args = parser.parse_args(argv)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    report = CASES[args.case](args, rank, world)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    Path(args.out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
