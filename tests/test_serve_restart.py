"""Nothing lost across restarts (real `wanengine serve` subprocesses on one output directory):
a job running at SIGTERM is marked failed with the reason and leaves no file; a restarted
service lists the finished job and serves its file; a record a killed service left
`in_progress` becomes failed; a second service on the same directory is refused. (`--job-ttl`
is tested on the service itself, `test_serve_service.py`.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from _serve_helpers import LONG, TINY, Server, png_bytes
from wanengine import cli
from wanengine.serve import server as server_module

pytest.importorskip("uvicorn", reason="wanengine serve needs the [serve] extra")
pytestmark = pytest.mark.slow


def start(golden_ckpt: Path, out_dir: Path, *extra: str) -> Server:
    return Server(["--ckpt-dir", str(golden_ckpt), "--device", "cpu", "--dtype", "float32",
                   "--output-dir", str(out_dir), *extra]).start()


def test_restart_keeps_finished_jobs_and_fails_interrupted_ones(golden_ckpt, tmp_path, monkeypatch, capsys):
    out_dir, image = tmp_path / "jobs", png_bytes()
    first = start(golden_ckpt, out_dir)
    try:
        done = first.submit({**TINY, "output_format": "safetensors"}, image).json()["id"]
        assert first.wait(done)["status"] == "completed"
        content = first.request("GET", f"/v1/videos/{done}/content").content
        running = first.submit(LONG, image).json()["id"]
        first.wait(running, ("in_progress",), min_step=1)
        queued = first.submit(TINY, image).json()["id"]
    finally:
        assert first.stop() == 0, first.output()[-3000:]
    assert "stopped after step" in first.output()

    records = {p.stem: json.loads(p.read_text()) for p in out_dir.glob("video_*.json")}
    assert records[running]["status"] == "failed" and "SIGTERM" in records[running]["error"]
    assert records[queued]["status"] == "failed" and "before this job started" in records[queued]["error"]
    assert sorted(p.name for p in out_dir.iterdir() if not p.name.endswith(".json")) == \
        [".wanengine-serve.lock", f"{done}.safetensors"]  # no partial file, no output of a stopped job

    # a service killed without shutting down leaves a record in progress: it becomes failed
    killed = {**records[queued], "id": "video_" + "0" * 24, "status": "in_progress", "error": None,
              "completed_at": None}
    (out_dir / f"{killed['id']}.json").write_text(json.dumps(killed))
    second = start(golden_ckpt, out_dir)
    try:
        listed = {job["id"]: job for job in second.jobs()}
        assert set(listed) == {done, running, queued, killed["id"]}
        assert listed[done]["status"] == "completed"
        assert second.request("GET", f"/v1/videos/{done}/content").content == content
        assert listed[killed["id"]]["status"] == "failed" and "found at restart" in listed[killed["id"]]["error"]

        # one service per output directory, refused before any weight is read
        monkeypatch.setattr(server_module, "load_engine", lambda cfg: pytest.fail("the engine was loaded"))
        with pytest.raises(SystemExit) as refused:
            cli.main(["serve", "--ckpt-dir", str(golden_ckpt), "--port", "0", "--output-dir", str(out_dir)])
        err = capsys.readouterr().err
        assert refused.value.code == 2 and "in use by another wanengine serve" in err
        assert len(err.strip().splitlines()) == 1
    finally:
        assert second.stop() == 0
