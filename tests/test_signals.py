"""SIGINT, SIGTERM and SIGHUP through the real CLI: at start-up, during denoising, during the
write, twice, and after the output was committed. Each ends in one line (no traceback), exit
128 + signal, no temporary file, and an existing output left as it was.

Timing without sleeps-and-hope: "start-up" is the moment /proc shows the process catching
SIGTERM (the handlers are installed before torch is imported); "denoising" is the first
progress bar on stderr; "the write" is a stand-in ffmpeg (IMAGEIO_FFMPEG_EXE) that touches a
marker and waits, so the signal lands while the video is being written.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO_ROOT

PREVIOUS = b"previous video"
pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc to time signals")


def _catches(pid: int, signum: int) -> bool:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except OSError:
        pass
    return False


def _start(args, tmp_path: Path, env=None) -> subprocess.Popen:
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}, **(env or {})}
    return subprocess.Popen([sys.executable, str(REPO_ROOT / "cli.py"), *args], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, cwd=tmp_path, env=env)


def _wait_until(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the process")
        time.sleep(0.01)


def _read_until(process: subprocess.Popen, marker: bytes, timeout: float = 300.0) -> bytes:
    """stderr up to and including `marker` (progress bars end with \\r, so read bytes)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        chunk = process.stderr.read1(4096) if hasattr(process.stderr, "read1") else process.stderr.read(1)
        if not chunk or time.monotonic() > deadline:
            raise AssertionError(f"no {marker!r} on stderr: {seen.decode(errors='replace')}")
        seen += chunk
    return seen


def _finish(process: subprocess.Popen, seen: bytes = b"") -> str:
    rest = process.communicate(timeout=120)[1]
    return (seen + rest).decode(errors="replace")


def _i2v_args(golden, out: Path, steps: int = 2):
    return ["i2v", "--ckpt-dir", str(golden / "ckpt"), "--image", str(golden / "input.png"), "--prompt", "a cat",
            "--max-area", "12288", "--frame-num", "5", "--sample-steps", str(steps), "--device", "cpu",
            "--dtype", "float32", "--out", str(out), "--seed", "1"]


def _assert_clean(process, stderr: str, signum, out_dir: Path, wrote: bool = False) -> None:
    """`signum`: the signal sent, or a tuple of those sent at once (the first handled one counts)."""
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    sent = signum if isinstance(signum, tuple) else (signum,)
    assert process.returncode in [128 + s for s in sent], stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    interrupted = [line for line in lines if "interrupted" in line]
    assert len(interrupted) == 1, stderr
    assert signal.Signals(process.returncode - 128).name in interrupted[0], stderr
    assert ("after writing" in interrupted[0]) == wrote, stderr
    assert not [p.name for p in out_dir.iterdir() if ".partial" in p.name], list(out_dir.iterdir())
    if not wrote:
        assert (out_dir / "out.mp4").read_bytes() == PREVIOUS


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_at_start_up(golden, tmp_path, signum):
    (tmp_path / "out.mp4").write_bytes(PREVIOUS)
    process = _start(_i2v_args(golden, tmp_path / "out.mp4"), tmp_path)
    _wait_until(lambda: _catches(process.pid, signal.SIGTERM) or process.poll() is not None)
    process.send_signal(signum)  # right after the handlers are installed: typer and torch still importing
    _assert_clean(process, _finish(process), signum, tmp_path)


def test_sighup_while_torch_imports(golden, tmp_path):
    (tmp_path / "out.mp4").write_bytes(PREVIOUS)
    process = _start(_i2v_args(golden, tmp_path / "out.mp4"), tmp_path)
    _wait_until(lambda: _catches(process.pid, signal.SIGTERM) or process.poll() is not None)
    time.sleep(0.3)
    process.send_signal(signal.SIGHUP)
    _assert_clean(process, _finish(process), signal.SIGHUP, tmp_path)


@pytest.mark.slow
def test_sigterm_during_denoising_then_a_second_signal(golden, tmp_path):
    (tmp_path / "out.mp4").write_bytes(PREVIOUS)
    process = _start(_i2v_args(golden, tmp_path / "out.mp4", steps=400), tmp_path)
    seen = _read_until(process, b"denoise ")
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGINT)  # a second one at once: quiet, the code of the one handled first
    _assert_clean(process, _finish(process, seen), (signal.SIGTERM, signal.SIGINT), tmp_path)


@pytest.mark.slow
def test_sigterm_during_the_write_kills_the_writer_and_removes_the_temp_file(golden, tmp_path):
    marker = tmp_path / "writer-started"
    fake = tmp_path / "fake-ffmpeg"
    fake.write_text(f"#!/bin/sh\ntouch {marker}\nexec sleep 120\n")
    fake.chmod(0o755)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "out.mp4").write_bytes(PREVIOUS)
    process = _start(_i2v_args(golden, out_dir / "out.mp4"), tmp_path, env={"IMAGEIO_FFMPEG_EXE": str(fake)})
    _wait_until(lambda: marker.exists() or process.poll() is not None)
    assert [p for p in out_dir.iterdir() if ".partial" in p.name]  # the write is in progress
    process.send_signal(signal.SIGTERM)
    _assert_clean(process, _finish(process), signal.SIGTERM, out_dir)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "sleep 120" not in ps  # the writer was killed, not orphaned


def test_interrupt_after_the_output_was_committed_says_so(golden, tmp_path, monkeypatch, capfd):
    from wanengine import cli, interrupts, run

    def interrupted_metrics(path, metadata, out):
        raise interrupts.Interrupted(signal.SIGINT)

    monkeypatch.setattr(run, "write_metrics", interrupted_metrics)
    out = tmp_path / "clip.safetensors"
    args = _i2v_args(golden, out)
    args[args.index("--out") + 1] = str(out)
    with pytest.raises(SystemExit) as info:
        cli.main(args + ["--metrics-json", str(tmp_path / "m.json")])
    assert info.value.code == 130
    lines = [line for line in capfd.readouterr().err.replace("\r", "\n").splitlines() if "interrupted" in line]
    assert lines == [f"wanengine: interrupted (SIGINT) after writing {out}"]
    assert out.is_file() and not (tmp_path / "m.json").exists()


def _children(pid: int) -> list:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_under_torchrun_every_rank_exits_when_one_is_terminated(golden, tmp_path):
    """SIGTERM to the rank that does not write, mid-denoising: the other rank (waiting in the
    CFG exchange) must not hang -- torchrun's SIGTERM or the watchdog ends it, and torchrun
    returns a failure with no worker left and no partial file."""
    from test_parallel_e2e import free_port, torchrun_command

    args = _i2v_args(golden, tmp_path / "out.mp4", steps=400)[1:]
    command = [*torchrun_command(), "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               "-m", "wanengine.cli", "i2v", *args, "--cfg-size", "2"]
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO_ROOT)}
    launcher = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    seen = _read_until(launcher, b"denoise ")
    workers = _children(launcher.pid)
    assert len(workers) == 2, workers
    ranks = {}
    for pid in workers:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        ranks[int(next(e for e in environ if e.startswith(b"RANK=")).split(b"=")[1])] = pid
    os.kill(ranks[1], signal.SIGTERM)
    start = time.monotonic()
    stderr = _finish(launcher, seen)
    assert time.monotonic() - start < 60, "the other rank hung"
    assert launcher.returncode != 0
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "a worker is still running"
    assert "wanengine: interrupted (SIGTERM)" in stderr or "wanengine: error:" in stderr, stderr[-2000:]  # rank 0's line
    assert not [p.name for p in tmp_path.iterdir() if ".partial" in p.name]
