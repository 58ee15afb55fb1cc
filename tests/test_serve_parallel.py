"""`wanengine serve` as a 2-rank torchrun job (gloo, Ulysses 2): rank 0 serves HTTP, both ranks
run every job. The golden case gives the single-process result; a job whose latent overflows
fails on both ranks and the service keeps serving; a cancel and a shutdown stop both ranks
after the same step (rank 0's decision is broadcast at each step boundary)."""
from __future__ import annotations

import json
import re

import pytest
import torch.distributed as dist
from safetensors.torch import load

from _parallel_worker import free_port
from _serve_helpers import LONG, TINY, Server, golden_request, png_bytes
from helpers import rel_err
from test_parallel_e2e import LATENT_REL, VIDEO_MAX_ABS, torchrun_command

pytest.importorskip("uvicorn", reason="wanengine serve needs the [serve] extra")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")]


def stopped_steps(log: str, job_id: str) -> dict:
    """rank -> the step after which that rank stopped `job_id`."""
    found = re.findall(rf"job {job_id}: stopped after step (\d+)/\d+ \(rank (\d+)\)", log)
    return {int(rank): int(step) for step, rank in found}


def test_two_rank_service_matches_single_process_and_stops_ranks_together(golden, tmp_path):
    out_dir, image = tmp_path / "jobs", png_bytes()
    launcher = [*torchrun_command(), "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    server = Server(["--ckpt-dir", str(golden / "ckpt"), "--device", "cpu", "--dtype", "float32",
                     "--ulysses-size", "2", "--output-dir", str(out_dir)], torchrun=launcher)
    server.start()
    try:
        job = server.submit(golden_request(golden), (golden / "input.png").read_bytes()).json()
        assert server.wait(job["id"])["status"] == "completed"
        got = load(server.request("GET", f"/v1/videos/{job['id']}/content").content)
        want = load((golden / "i2v.safetensors").read_bytes())
        assert float((got["video"] - want["video"]).abs().max()) <= VIDEO_MAX_ABS
        assert rel_err(got["latent"], want["latents"][-1]) <= LATENT_REL

        nan = server.submit({**TINY, "sample_steps": 2, "guide_scale": 1e38}, image).json()["id"]
        assert "non-finite" in server.wait(nan)["error"]
        cancelled = server.submit(LONG, image).json()["id"]
        server.wait(cancelled, ("in_progress",), min_step=2)
        assert server.request("DELETE", f"/v1/videos/{cancelled}").status_code == 202
        assert server.wait(cancelled)["status"] == "cancelled"
        after = server.submit(TINY, image).json()["id"]
        assert server.wait(after)["status"] == "completed"  # the service kept serving
        running = server.submit(LONG, image).json()["id"]
        server.wait(running, ("in_progress",), min_step=2)
    finally:
        server.stop()  # SIGTERM to torchrun, which forwards it to both ranks
    log = server.output()
    assert f"job {nan} failed on rank 1: NumericalError" in log, log[-5000:]
    for job_id in (cancelled, running):
        steps = stopped_steps(log, job_id)
        assert set(steps) == {0, 1} and steps[0] == steps[1], (job_id, steps)
    record = json.loads((out_dir / f"{running}.json").read_text())
    assert record["status"] == "failed" and "SIGTERM" in record["error"]
    assert not (out_dir / f"{running}.mp4").exists()
