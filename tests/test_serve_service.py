"""The service's worker without HTTP or weights: a fake engine and a recording rank channel show
what rank 0 tells the other ranks -- the job, a stop decision at every step boundary (true from
the step after a cancel), heartbeats while idle, `stop` at shutdown -- and that a cancelled job
writes nothing; finished jobs expire after the TTL."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from PIL import Image

from wanengine.config import EngineConfig
from wanengine.io.video import Video
from wanengine.pipeline import StepInfo
from wanengine.serve.ranks import IDLE, JOB, STOP
from wanengine.serve.service import Service, ServiceSettings
from wanengine.serve.submission import RequestError, build_submission


class FakeEngine:
    device = torch.device("cpu")
    kernel_backend = "reference"
    cfg = EngineConfig(ckpt_dir="unused")

    def __init__(self) -> None:
        self.step_gate = threading.Event()
        self.step_gate.set()

    def generate(self, image, opts, *, on_step=None):
        for index in range(opts.steps):
            self.step_gate.wait(5)
            on_step(StepInfo(index, 999 - index, "low_noise_model"), None)
        return Video(tensor=torch.zeros(3, 1, 16, 16), latent=torch.zeros(16, 1, 2, 2), seed=opts.seed,
                     metadata={"timings_s": {"denoise": 0.01}})


class RecordingChannel:
    rank = 0

    def __init__(self) -> None:
        self.messages, self.decisions = [], []

    def announce(self, message) -> None:
        self.messages.append(message.kind)

    def decide_stop(self, stop: bool) -> bool:
        self.decisions.append(stop)
        return stop


def submission(steps: int):
    fields = {"prompt": "p", "image": Image.new("RGB", (64, 48)), "max_area": 1024, "frame_num": 1,
              "sample_steps": steps, "seed": 3, "output_format": "safetensors"}
    return build_submission(fields, decode=lambda image: image)


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_rank_zero_announces_jobs_step_decisions_heartbeats_and_stop(tmp_path):
    channel, engine = RecordingChannel(), FakeEngine()
    service = Service(engine, ServiceSettings(output_dir=tmp_path), channel, heartbeat_s=0.02)
    service.start()
    done = service.submit(submission(steps=3))["id"]
    wait_until(lambda: service.get(done).finished)
    assert service.get(done).status == "completed" and (tmp_path / f"{done}.safetensors").is_file()
    assert channel.decisions == [False, False, False]  # one shared decision per step boundary

    engine.step_gate.clear()  # hold the next job inside a step
    running = service.submit(submission(steps=50))["id"]
    wait_until(lambda: service.get(running).status == "in_progress")
    status, body = service.delete(running)
    assert status == 202 and body["cancel_requested"] is True
    engine.step_gate.set()
    wait_until(lambda: service.get(running).finished)
    job = service.get(running)
    assert job.status == "cancelled" and job.step == 1 and "stopped after step 1/50" in job.error
    assert channel.decisions[3:] == [True]  # the very next boundary stopped every rank
    assert not (tmp_path / f"{running}.safetensors").exists()

    wait_until(lambda: channel.messages.count(IDLE) >= 2)  # heartbeats while idle
    service.stop("test")
    assert [kind for kind in channel.messages if kind != IDLE] == [JOB, JOB, STOP]


def test_shutdown_fails_queued_and_running_jobs_with_the_reason(tmp_path):
    engine = FakeEngine()
    service = Service(engine, ServiceSettings(output_dir=tmp_path), RecordingChannel())
    service.start()
    engine.step_gate.clear()
    running = service.submit(submission(steps=5))["id"]
    queued = service.submit(submission(steps=5))["id"]
    wait_until(lambda: service.get(running).status == "in_progress")
    threading.Timer(0.05, engine.step_gate.set).start()
    service.stop("SIGTERM")
    assert service.get(running).status == "failed" and "SIGTERM" in service.get(running).error
    assert service.get(queued).status == "failed" and "before this job started" in service.get(queued).error
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".json"]


def test_job_ttl_removes_finished_jobs_and_their_files(tmp_path):
    service = Service(FakeEngine(), ServiceSettings(output_dir=tmp_path, job_ttl_s=0.3), RecordingChannel())
    service.start()
    done = service.submit(submission(steps=1))["id"]
    wait_until(lambda: service.get(done) is None)  # removed by the sweeper within the TTL + its interval
    service.stop("test")
    assert list(tmp_path.iterdir()) == []


def test_a_worker_that_cannot_go_on_fails_its_jobs_and_says_so(tmp_path):
    class DeadChannel(RecordingChannel):
        def announce(self, message) -> None:  # as when another rank has died mid-collective
            if message.kind == JOB:
                raise RuntimeError("gloo: connection closed by peer")

    service = Service(FakeEngine(), ServiceSettings(output_dir=tmp_path), DeadChannel())
    service.start()
    job = service.submit(submission(steps=1))["id"]
    wait_until(lambda: service.get(job).finished)
    assert service.get(job).status == "failed" and "connection closed by peer" in service.get(job).error
    status, body = service.health()
    assert status == 503 and body["status"] == "broken" and "connection closed" in body["error"]
    with pytest.raises(RequestError) as refused:
        service.submit(submission(steps=1))
    assert refused.value.status == 503
    service.stop("test")
