"""The service behind the HTTP routes: a bounded queue of jobs, one worker thread that runs them
on the loaded engine (and, under torchrun, on every rank), cancellation, deletion, TTL removal
and shutdown. Everything shared is guarded by one lock; no HTTP code here.

Job lifecycle: `queued` -> `in_progress` (progress: step / steps / stage) -> `completed` |
`failed` | `cancelled`. Outputs are written atomically as `<id>.<format>` in the output
directory and the record is saved at every change of status, so a crash never leaves a
half-written file or an unlisted one.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Deque, List, Optional, Tuple

from ..errors import GenerationCancelled, UserInputError
from .jobs import CANCELLED, COMPLETED, FAILED, IN_PROGRESS, QUEUED, Job, JobStore, new_job_id
from .metrics import Metrics
from .ranks import HEARTBEAT_S, IDLE, JOB, STOP, LocalChannel, RankMessage, generate_on_every_rank, say
from .submission import MAX_IMAGE_PIXELS, RequestError, Submission, check_for_engine

SHUTDOWN_GRACE_S = 20.0  # how long shutdown waits for the running job to reach a step boundary


@dataclass(frozen=True)
class ServiceSettings:
    """`wanengine serve`'s service options (see `wanengine serve --help`)."""

    output_dir: Path
    max_queue: int = 8
    max_upload_mb: float = 32.0
    job_ttl_s: float = 86400.0
    api_key: Optional[str] = None
    max_image_pixels: int = MAX_IMAGE_PIXELS

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


class Service:
    """Owns the job records, the queue and the worker thread for one loaded engine."""

    def __init__(self, engine, settings: ServiceSettings, channel=None, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.engine = engine
        self.settings = settings
        self.channel = channel if channel is not None else LocalChannel()
        self.heartbeat_s = heartbeat_s
        self.lock = threading.Lock()
        self.wakeup = threading.Condition(self.lock)
        self.store = JobStore(settings.output_dir)
        self.metrics = Metrics()
        self.queue: Deque[str] = deque()
        self.running: Optional[Job] = None
        self.stopping = False
        self.stop_reason = ""
        self.broken: Optional[str] = None  # why the worker stopped, if it did
        with self.lock:
            recovered = self.store.load()
            self.store.sweep(settings.job_ttl_s)
        if recovered:
            say(f"{recovered} job(s) were still running when the last service stopped; marked failed")
        self._sweeper_stop = threading.Event()
        self.worker = threading.Thread(target=self._work, name="wanengine-serve-worker", daemon=True)
        self.sweeper = threading.Thread(target=self._sweep_loop, name="wanengine-serve-ttl", daemon=True)

    def start(self) -> None:
        self.worker.start()
        self.sweeper.start()

    # ------------------------------------------------------------------ requests
    def check_capacity(self) -> None:
        """429 when the queue is full (checked again, atomically, in `submit`)."""
        with self.lock:
            self._check_capacity_locked()

    def _check_capacity_locked(self) -> None:
        if self.stopping:
            raise RequestError(503, "the service is shutting down; no new jobs")
        if self.broken is not None:
            raise RequestError(503, f"the service cannot run jobs: {self.broken}")
        if len(self.queue) >= self.settings.max_queue:
            self.metrics.rejected["queue_full"] += 1
            raise RequestError(429, f"queue full: {len(self.queue)} jobs waiting (--max-queue "
                                    f"{self.settings.max_queue}); retry later")

    def submit(self, submission: Submission) -> dict:
        """Queue a validated submission; returns the job's view as queued (422 if the loaded
        engine would refuse it when it runs, 429 / 503 if refused)."""
        opts = submission.opts
        check_for_engine(opts, self.engine)
        settings = {**asdict(opts), "guide_scale": list(opts.guidance)}
        job = Job(id=new_job_id(), status=QUEUED, created_at=time.time(), output_format=submission.output_format,
                  settings=settings, frame_size=list(submission.frame_size), seed=opts.seed, steps=opts.steps,
                  opts=opts, image=submission.image)
        with self.lock:
            self._check_capacity_locked()
            self.store.add(job)
            self.queue.append(job.id)
            self.metrics.accepted += 1
            self.wakeup.notify_all()
            return job.public()

    def reject(self, reason: str) -> None:
        with self.lock:
            self.metrics.rejected[reason] += 1

    def get(self, job_id: str) -> Optional[Job]:
        with self.lock:
            return self.store.get(job_id)

    def view(self, job_id: str) -> Optional[dict]:
        with self.lock:
            job = self.store.get(job_id)
            return job.public() if job is not None else None

    def list(self) -> List[dict]:
        with self.lock:
            return [job.public() for job in self.store]

    def content(self, job_id: str) -> Path:
        """The finished output file, or a RequestError (404 unknown / no output, 409 not yet)."""
        with self.lock:
            job = self.store.get(job_id)
            if job is None:
                raise RequestError(404, f"no job {job_id!r}")
            if job.status in (QUEUED, IN_PROGRESS):
                raise RequestError(409, f"job {job.id} is {job.status} (step {job.step}/{job.steps}); "
                                        "its content exists once it is completed")
            if job.status != COMPLETED:
                raise RequestError(404, f"job {job.id} is {job.status} and has no content: {job.error}")
            path = self.store.output_of(job)
        if not path.is_file():
            raise RequestError(404, f"job {job_id}: output file is missing")
        return path

    def delete(self, job_id: str) -> Tuple[int, dict]:
        """Queued: dropped (status cancelled). Running: stops at the next step boundary, no
        output (202). Finished: record and file deleted."""
        with self.lock:
            job = self.store.get(job_id)
            if job is None:
                raise RequestError(404, f"no job {job_id!r}")
            if job.status == QUEUED:
                self.queue.remove(job.id)
                job.finish(CANCELLED, "cancelled before it started; no output was written")
                self.store.save(job)
                return 200, job.public()
            if job.status == IN_PROGRESS:
                job.cancel_requested = True
                return 202, {**job.public(), "cancel_requested": True}
            self.store.remove(job)
            return 200, {"id": job.id, "object": "video.deleted", "deleted": True}

    def health(self) -> Tuple[int, dict]:
        with self.lock:
            state = "stopping" if self.stopping else ("broken" if self.broken else "ok")
            body = {"status": state, "error": self.broken, "queue_depth": len(self.queue),
                    "running": self.running.id if self.running is not None else None,
                    "device": str(self.engine.device), "kernel_backend": getattr(self.engine, "kernel_backend", None),
                    "world_size": self.engine.cfg.world_size}
        return (200 if state == "ok" else 503), body

    def metrics_text(self) -> str:
        with self.lock:
            return self.metrics.render(len(self.queue), [job.status for job in self.store], self.settings.max_queue)

    # ------------------------------------------------------------------ shutdown
    def stop(self, reason: str, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Refuse new jobs, fail the queued ones, stop the running one at its next step boundary
        (it is marked failed with `reason`), tell the other ranks to stop, and wait for the worker."""
        with self.lock:
            if self.stopping:
                return
            self.stopping, self.stop_reason = True, reason
            for job_id in self.queue:
                job = self.store.get(job_id)
                job.finish(FAILED, f"the service shut down ({reason}) before this job started; no output was written")
                self.store.save(job)
            self.queue.clear()
            self.wakeup.notify_all()
        self._sweeper_stop.set()
        if self.worker.ident is None:  # never started: the worker cannot tell the other ranks
            self.channel.announce(RankMessage(STOP))
        elif self.worker.is_alive():
            self.worker.join(grace_s)
        with self.lock:
            job = self.running
            if job is not None and not job.finished:  # still inside one step after the grace period
                job.finish(FAILED, f"the service shut down ({reason}) while this job was running; "
                                   "no output was written")
                self.store.save(job)

    # ------------------------------------------------------------------ the worker
    def _next(self) -> Tuple[str, Optional[Job]]:
        """(STOP, None), (IDLE, None) after a heartbeat interval without work, or (JOB, job)."""
        with self.lock:
            if not self.queue and not self.stopping:
                self.wakeup.wait(timeout=self.heartbeat_s)
            if self.stopping:
                return STOP, None
            if not self.queue:
                return IDLE, None
            job = self.store.get(self.queue.popleft())
            job.status, job.started_at, job.stage = IN_PROGRESS, time.time(), "encode"
            self.running = job
            return JOB, job

    def _work(self) -> None:
        bind_thread_to(self.engine.device)
        try:
            while True:
                kind, job = self._next()
                if kind == STOP:
                    self.channel.announce(RankMessage(STOP))
                    return
                if kind == IDLE:
                    self.channel.announce(RankMessage(IDLE))  # a heartbeat for the waiting ranks
                    continue
                self._run(job)
        except Exception as exc:  # e.g. a collective failed because another rank died: nothing can run now
            reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
            say(f"the worker stopped: {reason}")
            with self.lock:
                self.broken = reason
                stranded = [self.running] if self.running is not None else []
                stranded += [self.store.get(job_id) for job_id in self.queue]
                self.queue.clear()
                self.running = None
                for job in stranded:
                    if not job.finished:
                        job.finish(FAILED, f"the service's worker stopped: {reason}")
                        with contextlib.suppress(OSError):
                            self.store.save(job)

    def _run(self, job: Job) -> None:
        opts, image = job.opts, job.image
        with self.lock:
            self.store.save(job)  # in_progress on disk: a crash from here on is found at restart
        self.channel.announce(RankMessage(JOB, job.id, opts, image))

        def on_step(info) -> None:
            with self.lock:
                job.step = info.index + 1
                job.stage = "denoise" if job.step < job.steps else "decode"

        outcome: Tuple[str, Optional[str]]
        try:
            video = generate_on_every_rank(self.engine, self.channel, opts, image, job.id, on_step=on_step,
                                           wants_stop=lambda: job.cancel_requested or self.stopping)
            with self.lock:
                job.stage = "write"
            start = time.perf_counter()
            path = video.save(self.store.output_of(job))
            video.metadata["timings_s"]["write"] = round(time.perf_counter() - start, 4)
            job.file, job.timings_s = path.name, dict(video.metadata["timings_s"])
            outcome = (COMPLETED, None)
        except GenerationCancelled as exc:
            if self.stopping:
                outcome = (FAILED, f"the service shut down ({self.stop_reason}) while this job was running; "
                                   f"{exc}; no output was written")
            else:
                outcome = (CANCELLED, f"cancelled: {exc}; no output was written")
        except UserInputError as exc:
            outcome = (FAILED, str(exc))
        except Exception as exc:  # this job fails; the service keeps serving
            outcome = (FAILED, f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}")
        with self.lock:
            job.finish(*outcome)
            self.running = None
            if job.status == COMPLETED:
                self.metrics.job_finished(job.timings_s, job.steps, job.completed_at - job.started_at)
            try:
                self.store.save(job)
            except OSError as exc:  # e.g. a full disk: the job stays listed in memory, the worker goes on
                say(f"job {job.id}: its record could not be saved: {exc}")
        if job.status == FAILED:
            say(f"job {job.id} failed: {job.error}")

    def _sweep_loop(self) -> None:
        ttl = self.settings.job_ttl_s
        if ttl <= 0:
            return
        interval = min(60.0, max(ttl / 4, 0.25))
        while not self._sweeper_stop.wait(interval):
            with self.lock:
                self.store.sweep(ttl)


def bind_thread_to(device) -> None:
    """The current CUDA / NPU device is per thread: make the worker thread's the engine's, so
    allocations, synchronisations and collectives without an explicit device land there."""
    import torch

    if device.index is None:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif device.type == "npu":
        torch.npu.set_device(device)  # type: ignore[attr-defined]
