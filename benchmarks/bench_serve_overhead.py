"""Per-job overhead of `wanengine serve` against the library call on the same case, in one run.

Baseline (in this process): `Engine.i2v(...)` then `video.save(...)` -- what a script does.
Service: a `wanengine serve` subprocess on 127.0.0.1 with the same checkpoint and options;
one job = POST /v1/videos (JSON, base64 image) -> poll GET /v1/videos/{id} every
`--poll-ms` until completed -> GET .../content (the file's bytes). Both sides run with one
CPU thread (the box may be shared) and alternate call by call, so machine noise hits both
alike; the figures are medians over `--repeats` jobs. The job's own server-side stage times
(from its record) split the overhead into generation vs. HTTP, queueing, polling and transfer.

    python benchmarks/bench_serve_overhead.py [--ckpt-dir ../shared/golden/ckpt] [--repeats 10]
        [--output-format safetensors|mp4] [--poll-ms 5]

Defaults: the golden case (`../shared/golden`, 128x96, 5 frames, 6 UniPC steps, float32).
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO.parent / "shared" / "golden"


def start_server(ckpt_dir: Path, out_dir: Path) -> tuple:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "wanengine.cli", "serve", "--ckpt-dir", str(ckpt_dir),
                             "--device", "cpu", "--dtype", "float32", "--port", "0", "--output-dir", str(out_dir),
                             "--max-queue", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 300
    for line in proc.stdout:
        if line.startswith("listening on "):
            return proc, line.split()[-1]
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError("the server did not start")


def service_job(client: httpx.Client, url: str, fields: dict, poll_s: float) -> tuple:
    start = time.perf_counter()
    job = client.post(f"{url}/v1/videos", json=fields).json()
    while job["status"] not in ("completed", "failed", "cancelled"):
        time.sleep(poll_s)
        job = client.get(f"{url}/v1/videos/{job['id']}").json()
    assert job["status"] == "completed", job
    content = client.get(f"{url}/v1/videos/{job['id']}/content").content
    return time.perf_counter() - start, job["id"], len(content)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt-dir", type=Path, default=GOLDEN / "ckpt")
    parser.add_argument("--image", type=Path, default=GOLDEN / "input.png")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--output-format", default="safetensors", choices=("safetensors", "mp4"))
    parser.add_argument("--poll-ms", type=float, default=5.0)
    args = parser.parse_args()

    from wanengine import Engine, EngineConfig

    meta = json.loads((GOLDEN / "meta.json").read_text())["i2v"]
    call = dict(max_area=meta["max_area"], frame_num=meta["frame_num"], steps=meta["steps"], shift=meta["shift"],
                solver=meta["solver"], guide_scale=tuple(meta["guide_scale"]), seed=meta["seed"])
    fields = {"prompt": meta["prompt"], "image": base64.b64encode(args.image.read_bytes()).decode(),
              "max_area": call["max_area"], "frame_num": call["frame_num"], "sample_steps": call["steps"],
              "sample_shift": call["shift"], "sample_solver": call["solver"], "guide_scale": list(call["guide_scale"]),
              "seed": call["seed"], "output_format": args.output_format}

    torch.set_num_threads(1)
    engine = Engine(EngineConfig(ckpt_dir=str(args.ckpt_dir), device="cpu", dtype="float32", progress=False))
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp) / "jobs"
        proc, url = start_server(args.ckpt_dir, out_dir)
        library, service, generation = [], [], []
        try:
            with httpx.Client(timeout=300) as client:
                for rep in range(args.repeats + 1):  # the first pair warms both sides and is not counted
                    start = time.perf_counter()
                    video = engine.i2v(args.image, meta["prompt"], **call)
                    video.save(Path(tmp) / f"library.{args.output_format}")
                    library_s = time.perf_counter() - start
                    service_s, job_id, size = service_job(client, url, fields, args.poll_ms / 1000)
                    timings = json.loads((out_dir / f"{job_id}.json").read_text())["timings_s"]
                    if rep:
                        library.append(library_s)
                        service.append(service_s)
                        generation.append(sum(v for k, v in timings.items() if k != "load"))
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    lib, srv, gen = (statistics.median(x) for x in (library, service, generation))
    print(f"# wanengine serve vs Engine.i2v + save, CPU float32, 1 thread, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"# case: {args.image.name} -> {meta['max_area']} px area, {meta['frame_num']} frames, {meta['steps']} steps, "
          f"{args.output_format} ({size} bytes); medians of {args.repeats} alternating jobs; poll every {args.poll_ms} ms")
    print(f"library call + save          {lib * 1000:9.1f} ms")
    print(f"service job (submit->file)   {srv * 1000:9.1f} ms")
    print(f"  of which generation+write  {gen * 1000:9.1f} ms (server-side stage times)")
    print(f"overhead per job             {(srv - lib) * 1000:9.1f} ms ({100 * (srv - lib) / lib:+.1f} %)")
    print(f"  HTTP + queue + poll + transfer (service - server-side stages) {(srv - gen) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
