"""Every parallel mode end to end on the golden image-to-video case (`meta.json` -> `i2v`),
in real multi-process runs (gloo on CPU): each must reproduce the single-process golden video
within 1e-3 max abs (golden README) and the final latent within 1e-4 relative.

Every mode runs twice: through the CLI under torchrun, and calling `ParallelEngine` directly
(`_parallel_worker.py e2e`), where rank 1 asks for another seed to prove rank 0's wins."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from safetensors.torch import load_file

from _parallel_worker import free_port, launch
from helpers import rel_err

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")]

VIDEO_MAX_ABS = 1e-3
LATENT_REL = 1e-4


def assert_matches_golden(golden: Path, out_file: Path) -> None:
    want = load_file(str(golden / "i2v.safetensors"))
    got = load_file(str(out_file))
    assert got["video"].shape == want["video"].shape
    assert float((got["video"] - want["video"]).abs().max()) <= VIDEO_MAX_ABS
    assert rel_err(got["latent"], want["latents"][-1]) <= LATENT_REL


CASES = {
    "cfg2": (2, ["--cfg-size", "2"]),
    "ulysses2_vae_parallel": (2, ["--ulysses-size", "2", "--vae-parallel"]),
    "ulysses2_dit_fsdp_t5_fsdp": (2, ["--ulysses-size", "2", "--dit-fsdp", "--t5-fsdp"]),
    "cfg2_x_ulysses2_vae_parallel": (4, ["--cfg-size", "2", "--ulysses-size", "2", "--vae-parallel"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parallel_engine_reproduces_the_golden_video(golden: Path, tmp_path: Path, case: str) -> None:
    world, flags = CASES[case]
    reports = launch(world, "e2e", tmp_path, flags, timeout=240)
    assert [r["seed"] for r in reports] == [1234] * world  # rank 0's seed, broadcast
    assert [r["writer"] for r in reports] == [True] + [False] * (world - 1)
    vae_parallel = "--vae-parallel" in flags  # then every rank holds the decoded video
    assert [r["frames"] for r in reports] == [5] + [5 if vae_parallel else 0] * (world - 1)
    assert_matches_golden(golden, tmp_path / "video.safetensors")
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["video.safetensors"]


def torchrun_command() -> list:
    beside = Path(sys.executable).with_name("torchrun")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("torchrun")
    return [found] if found else [sys.executable, "-m", "torch.distributed.run"]


CLI_CASES = {"ulysses2": (2, ["--ulysses-size", "2"]), **CASES}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_under_torchrun(golden: Path, tmp_path: Path, case: str) -> None:
    import json

    world, flags = CLI_CASES[case]
    meta = json.loads((golden / "meta.json").read_text())["i2v"]
    out = tmp_path / "x.safetensors"
    cmd = [*torchrun_command(), f"--nproc_per_node={world}", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "-m", "wanengine.cli", "i2v", "--ckpt-dir", str(golden / "ckpt"), "--image", str(golden / "input.png"),
           "--prompt", meta["prompt"], "--max-area", str(meta["max_area"]), "--frame-num", str(meta["frame_num"]),
           "--sample-steps", str(meta["steps"]), "--sample-shift", str(meta["shift"]),
           "--sample-solver", meta["solver"], "--guide-scale", ",".join(str(g) for g in meta["guide_scale"]),
           "--seed", str(meta["seed"]), *flags, "--dtype", "float32", "--device", "cpu", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (result.stdout + result.stderr).count("wrote ") == 1  # only rank 0 writes
    # Joining the process group is a stage of its own (announced once, a row of the table).
    assert result.stderr.count("wanengine: join process group (") == 1, result.stderr[-3000:]
    assert re.search(r"^join process group\s+\d+\.\d\d\s", result.stderr, re.M), result.stderr[-3000:]
    assert_matches_golden(golden, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]  # no stray or partial files


def test_cli_rejects_a_world_that_does_not_match_the_layout(golden: Path, tmp_path: Path) -> None:
    cmd = [*torchrun_command(), "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "-m", "wanengine.cli", "i2v", "--ckpt-dir", str(golden / "ckpt"), "--image", str(golden / "input.png"),
           "--prompt", "p", "--max-area", "12288", "--frame-num", "5", "--sample-steps", "1",
           "--cfg-size", "2", "--ulysses-size", "2", "--dtype", "float32", "--device", "cpu",
           "--out", str(tmp_path / "x.safetensors")]
    result = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0
    assert "4 ranks, but torchrun started 2" in result.stdout + result.stderr
    assert not (tmp_path / "x.safetensors").exists()
