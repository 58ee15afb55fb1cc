"""A real `wanengine serve` subprocess for the service tests, and a small HTTP client for it.

`Server.start` launches the command (plain or under torchrun) with `--port 0`, waits (bounded)
for its `listening on http://HOST:PORT` line and returns; `stop` sends SIGTERM and waits,
killing the process group if it does not end. Every wait in here has a deadline.
"""
from __future__ import annotations

import base64
import io
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import httpx

from helpers import REPO_ROOT

START_TIMEOUT_S = 180.0


def png_bytes(width: int = 64, height: int = 48, color=(200, 90, 40)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def golden_request(golden: Path) -> dict:
    """The golden case (`meta.json` -> `i2v`) as request fields, safetensors output."""
    meta = json.loads((golden / "meta.json").read_text())["i2v"]
    return {"prompt": meta["prompt"], "negative_prompt": meta["n_prompt"] or None, "max_area": meta["max_area"],
            "frame_num": meta["frame_num"], "sample_steps": meta["steps"], "sample_shift": meta["shift"],
            "sample_solver": meta["solver"], "guide_scale": meta["guide_scale"], "seed": meta["seed"],
            "output_format": "safetensors"}


# A job that finishes in a fraction of a second on the golden checkpoint: 32x16, one frame.
TINY = {"prompt": "a tiny clip", "max_area": 1024, "frame_num": 1, "sample_steps": 1, "seed": 5}
# A job that runs until it is cancelled: 1000 steps (the most the validation allows) of 128x96.
LONG = {**TINY, "max_area": 12288, "sample_steps": 1000}


class Server:
    """One `wanengine serve` process (or a torchrun job of them) and a client for it."""

    def __init__(self, args: Sequence[str], *, api_key: Optional[str] = None, torchrun: Sequence[str] = (),
                 cwd: Optional[Path] = None) -> None:
        self.args, self.api_key, self.torchrun, self.cwd = list(args), api_key, list(torchrun), cwd
        self.proc: Optional[subprocess.Popen] = None
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.log: List[str] = []
        self.url = ""
        self.client = httpx.Client(timeout=30.0)  # thread-safe; keeps connections open between polls

    def start(self, timeout: float = START_TIMEOUT_S) -> "Server":
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
        if self.api_key is not None:
            env["WANENGINE_API_KEY"] = self.api_key
        launcher = self.torchrun or [sys.executable]
        cmd = [*launcher, "-m", "wanengine.cli", "serve", "--port", "0", *self.args]
        self.proc = subprocess.Popen(cmd, env=env, cwd=self.cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            match = re.match(r"listening on (http://\S+)", line)
            if match:
                self.url = match.group(1)
                return self
        self.stop()
        raise RuntimeError(f"server did not start:\n{self.output()[-4000:]}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)
            self.lines.put(line)

    def output(self) -> str:
        return "".join(self.log)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> Optional[int]:
        """Signal the server (the launcher) and wait; returns its exit code."""
        self.client.close()
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            raise RuntimeError(f"server did not stop within {timeout} s:\n{self.output()[-3000:]}")

    def pid(self) -> int:
        return self.proc.pid

    # ------------------------------------------------------------------ HTTP
    def headers(self, key: Optional[str] = None) -> Dict[str, str]:
        key = self.api_key if key is None else key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def request(self, method: str, path: str, *, key: Optional[str] = None, timeout: float = 30.0,
                **kwargs) -> httpx.Response:
        headers = {**self.headers(key), **kwargs.pop("headers", {})}
        return self.client.request(method, self.url + path, headers=headers, timeout=timeout, **kwargs)

    def submit(self, fields: Dict[str, Any], image: bytes) -> httpx.Response:
        return self.request("POST", "/v1/videos", json={**fields, "image": b64(image)})

    def job(self, job_id: str) -> Dict[str, Any]:
        response = self.request("GET", f"/v1/videos/{job_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def jobs(self) -> List[Dict[str, Any]]:
        response = self.request("GET", "/v1/videos")
        assert response.status_code == 200, response.text
        return response.json()["data"]

    def wait(self, job_id: str, statuses: Iterable[str] = ("completed", "failed", "cancelled"),
             timeout: float = 120.0, seen: Optional[list] = None, min_step: int = 0) -> Dict[str, Any]:
        """Poll until the job reaches one of `statuses` (and `min_step`); `seen` collects every view."""
        deadline = time.monotonic() + timeout
        while True:
            view = self.job(job_id)
            if seen is not None:
                seen.append(view)
            if view["status"] in statuses and view["progress"]["step"] >= min_step:
                return view
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {view} after {timeout} s")
            time.sleep(0.02)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def error_of(response: httpx.Response) -> str:
    """The one-line error of a refused request."""
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"], str) and body["error"] and "\n" not in body["error"], body
    return body["error"]


def read_json(path: Path) -> Dict[str, Any]:
    return json.loads(path.read_text())
