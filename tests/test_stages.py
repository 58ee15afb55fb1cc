"""Every stage of a CLI run is announced on stderr, the stage table adds up to the wall time
since the process started, and -q silences all of it."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time

import pytest

from helpers import REPO_ROOT
from wanengine.stage_log import StageLog
from wanengine.timing import StageTimer

SMALL = ["--max-area", str(64 * 48), "--frame_num", "1", "--sample_steps", "2", "--device", "cpu", "--dtype", "float32"]
ANNOUNCED = ("load tokenizer", "load text encoder", "load VAE", "load experts", "text encode", "VAE encode",
             "VAE decode", "write")
ROWS = ("start-up", "import torch", "check inputs", "read image", *ANNOUNCED, "denoise", "other")


def test_stage_log_lines():
    stream = io.StringIO()
    timer = StageTimer(log=StageLog(stream=stream))
    with timer.stage("load VAE", "(2.0 GB)", nbytes=2e9):
        pass
    with timer.stage("denoise", announce=False):
        pass
    with pytest.raises(RuntimeError):
        with timer.stage("VAE decode"):
            raise RuntimeError("boom")
    lines = stream.getvalue().splitlines()
    assert re.fullmatch(r"wanengine: load VAE \(2\.0 GB\) \.\.\. \d+\.\d\d s \(.+B/s\)", lines[0]), lines[0]
    assert re.fullmatch(r"wanengine: VAE decode \.\.\. stopped after \d+\.\d\d s", lines[1]), lines[1]
    assert len(lines) == 2 and set(timer.seconds) == {"load VAE", "denoise", "VAE decode"}
    table = timer.table(wall=timer.total + 1.0)
    assert re.search(r"other\s+1\.00", table) and re.search(rf"total\s+{timer.total + 1.0:.2f}", table)
    silent = io.StringIO()
    with StageTimer(log=StageLog(enabled=False, stream=silent)).stage("load VAE"):
        pass
    assert silent.getvalue() == ""


def test_step_progress_is_a_bar_on_a_terminal_and_lines_elsewhere():
    from wanengine.pipeline import StepInfo
    from wanengine.progress import StepProgress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, bar in ((io.StringIO(), False), (Terminal(), True)):
        with StepProgress(3, stream=stream) as progress:
            for index, expert in enumerate(("high_noise_model", "low_noise_model", "low_noise_model")):
                progress.update(StepInfo(index, 999 - 100 * index, expert, 3))
        text = stream.getvalue()
        if bar:
            assert "\r" in text and "3/3" in text and "expert=low-noise" in text
        else:  # first and last step (the middle one came within LINE_INTERVAL_S)
            lines = text.splitlines()
            assert len(lines) == 2 and "\r" not in text
            assert lines[0].startswith("wanengine: denoise 1/3 (t=999, high-noise) ")
            assert re.fullmatch(r"wanengine: denoise 3/3 \(t=799, low-noise\) \d+\.\d s, ETA 0\.0 s", lines[1])
    silent = io.StringIO()
    with StepProgress(1, enabled=False, stream=silent) as progress:
        progress.update(StepInfo(0, 999, "high_noise_model", 1))
    assert silent.getvalue() == ""


def test_vae_encode_and_decode_report_their_chunks(monkeypatch):
    import torch

    from wanengine import progress as progress_mod
    from wanengine.models.vae import VAEConfig, WanVAE

    assert progress_mod.causal_chunk_frames(9) == [1, 4, 4] and progress_mod.causal_chunk_frames(1) == [1]
    monkeypatch.setattr(progress_mod, "LINE_INTERVAL_S", 0.0)  # a line at the start of every chunk but the first
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(dim=8)).eval()
    stream = io.StringIO()
    chunks = progress_mod.ChunkProgress("VAE decode", progress_mod.causal_chunk_frames(9), StageLog(stream=stream))
    with torch.no_grad(), progress_mod.vae_chunks(vae, "decoder", chunks):
        vae.decode(torch.zeros(16, 3, 2, 2), tile_rows=1)  # tiled: frames still counted once each
    assert chunks.started == 3
    lines = stream.getvalue().splitlines()
    # Frames *done* when the next chunk starts (the first chunk is one frame, the others four).
    assert [line.split(",")[0] for line in lines] == ["wanengine: VAE decode 1/9 frames",
                                                       "wanengine: VAE decode 5/9 frames"]
    assert all(re.search(r", \d+\.\d s, ETA \d+\.\d s$", line) for line in lines), lines
    with torch.no_grad():
        vae.decode(torch.zeros(16, 1, 2, 2))
    assert chunks.started == 3  # the hook is gone after the stage
    stream = io.StringIO()
    encoding = progress_mod.ChunkProgress("VAE encode", progress_mod.causal_chunk_frames(9), StageLog(stream=stream))
    with torch.no_grad(), progress_mod.vae_chunks(vae, "encoder", encoding):
        vae.encode(torch.zeros(3, 9, 16, 16))  # 9 frames: chunks of 1, 4, 4
    assert encoding.started == 3
    assert [line.split(",")[0] for line in stream.getvalue().splitlines()] == [
        "wanengine: VAE encode 1/9 frames", "wanengine: VAE encode 5/9 frames"]


def test_a_two_chunk_stage_reports_its_first_chunk(monkeypatch):
    """5 frames at a large size: two chunks, the second four times the first. Its line comes when
    the second starts, with the ETA weighed by frames (elapsed x 4), not by chunks (elapsed x 1)."""
    from wanengine import progress as progress_mod

    clock = iter([0.0, 0.0, 6.0])  # construction, the first chunk, the second 6 s later
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: next(clock))
    stream = io.StringIO()
    chunks = progress_mod.ChunkProgress("VAE decode", progress_mod.causal_chunk_frames(5), StageLog(stream=stream))
    chunks.tick()  # the first chunk starts (nothing done yet: no line)
    chunks.tick()  # the second starts, 6 s in
    assert stream.getvalue() == "wanengine: VAE decode 1/5 frames, 6.0 s, ETA 24.0 s\n"


def _args(golden, out):
    return ["i2v", "--ckpt_dir", str(golden / "ckpt"), "--image", str(golden / "input.png"), "--prompt", "a cat",
            *SMALL, "--out", str(out)]


@pytest.mark.slow
def test_every_stage_announced_and_the_table_adds_up_to_the_wall_time(golden, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "cli.py"), *_args(golden, tmp_path / "o.mp4")],
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, cwd=tmp_path)
    lines, total_seen_at = [], None
    for line in process.stderr:
        lines.append(line.rstrip("\n"))
        if line.startswith("total ") and total_seen_at is None:
            total_seen_at = time.perf_counter() - start  # the run is over; interpreter teardown is not part of it
    assert process.wait(timeout=300) == 0, "\n".join(lines)
    text = "\n".join(lines)
    for stage in ANNOUNCED:  # a line when the stage starts, completed with its time when it ends
        assert re.search(rf"^wanengine: {stage}\b.*(\.\.\.|:) \d+\.\d\d s", text, re.M), stage
    assert re.search(r"^wanengine: load text encoder \(.+\) \.\.\. \d+\.\d\d s \(.+B/s\)", text, re.M)
    assert re.search(r"^wanengine: denoise 2/2 \(t=\d+, \S+\) \d+\.\d s, ETA 0\.0 s$", text, re.M)  # no bar in a pipe
    rows = dict(re.findall(r"^(\S(?:.*\S)?)\s{2,}(\d+\.\d\d)\s+\d+\.\d%$", text, re.M))
    assert set(ROWS) <= set(rows), rows
    total = float(rows["total"])
    assert abs(sum(float(v) for k, v in rows.items() if k != "total") - total) < 0.05 * total
    assert total_seen_at is not None and abs(total - total_seen_at) <= 0.10 * total_seen_at, (total, total_seen_at)


def test_quiet_after_the_command_prints_nothing(golden, tmp_path, capsys):
    from wanengine import cli

    with pytest.raises(SystemExit) as info:
        cli.main([*_args(golden, tmp_path / "o.mp4"), "-q"])
    assert (info.value.code or 0) == 0 and (tmp_path / "o.mp4").is_file()
    captured = capsys.readouterr()
    assert captured.out == ""
    # No progress line, bar or table: only the one line that records the output and the seed.
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("wrote ") and "seed " in lines[0], lines
