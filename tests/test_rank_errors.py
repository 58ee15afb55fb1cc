"""Ranks 1.. of a torchrun job leave an error to rank 0: they wait for torchrun to end the job
(then exit quietly with the same code), and print their own line only when rank 0 did not end
it within the grace period. Under torchrun, a usage error found by every rank is printed once
whichever rank finishes its checks first."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BAD_CALL = ["-m", "wanengine.cli", "i2v", "--ckpt-dir", "c", "--image", "i", "--prompt", "p", "--frame-num", "80"]
MESSAGE = "--frame-num: 80 is not of the form 4n+1"


def rank_env(rank: str, grace: str) -> dict:
    return {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}, "RANK": rank,
            "WORLD_SIZE": "2", "WANENGINE_RANK_ERROR_GRACE_S": grace, "PYTHONPATH": str(REPO_ROOT)}


def test_a_rank_that_rank_0_does_not_outlive_prints_after_the_grace_period():
    started = time.monotonic()
    result = subprocess.run([sys.executable, *BAD_CALL], env=rank_env("1", "0.5"), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and time.monotonic() - started >= 0.5
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wanengine: rank 1: error: {MESSAGE}"), lines
    assert "rank 0 did not end the job within 0.5 s" in lines[0]


def test_ended_by_torchrun_within_the_grace_period_it_leaves_quietly_with_its_code():
    process = subprocess.Popen([sys.executable, *BAD_CALL], env=rank_env("1", "60"), stderr=subprocess.PIPE,
                               text=True)
    time.sleep(3.0)  # the CLI's checks are done well before this (they import no torch)
    assert process.poll() is None  # still waiting for rank 0
    process.send_signal(signal.SIGTERM)  # what torchrun does once rank 0 has exited
    assert process.wait(timeout=30) == 2
    assert process.stderr.read() == ""


def test_rank_0_prints_at_once():
    result = subprocess.run([sys.executable, *BAD_CALL], env=rank_env("0", "60"), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and result.stderr.strip() == f"wanengine: error: {MESSAGE} (e.g. 81, 49, 17, 5, 1)"


@pytest.mark.slow
def test_under_torchrun_a_usage_error_is_printed_once(tmp_path):
    from test_parallel_e2e import free_port, torchrun_command

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([*torchrun_command(), "--nproc_per_node=2", "--master_addr=127.0.0.1",
                             f"--master_port={free_port()}", *BAD_CALL], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.count(MESSAGE) == 1, result.stderr[-3000:]
    assert "rank 1: error" not in result.stderr


@pytest.mark.slow
def test_under_torchrun_an_error_after_joining_the_group_is_printed_once_and_at_once(golden, tmp_path):
    """Every rank fails after the process group is joined (the npu kernels asked for on a CPU
    host): rank 0 prints, and does not wait at the final barrier for ranks that wait for it."""
    from test_parallel_e2e import free_port, torchrun_command

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", WANENGINE_RANK_ERROR_GRACE_S="60")
    started = time.monotonic()
    result = subprocess.run([*torchrun_command(), "--nproc_per_node=2", "--master_addr=127.0.0.1",
                             f"--master_port={free_port()}", "-m", "wanengine.cli", "i2v", "--ckpt-dir",
                             str(golden / "ckpt"), "--image", str(golden / "input.png"), "--prompt", "p", "--size",
                             "64*48", "--frame-num", "1", "--sample-steps", "1", "--ulysses-size", "2", "--device",
                             "cpu", "--kernel-backend", "npu", "--out", str(tmp_path / "x.mp4")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and time.monotonic() - started < 50  # not the 60 s grace
    assert "wanengine: join process group" in result.stderr  # the error came after the group was joined
    assert result.stderr.count("torch_npu is not importable") == 1, result.stderr[-3000:]
    assert "--kernel-backend: npu: torch_npu is not importable" in result.stderr
    assert not (tmp_path / "x.mp4").exists()
