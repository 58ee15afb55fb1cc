"""Job records and their persistence: one `<id>.json` beside the job's `<id>.<format>` output in
`--output-dir`, rewritten atomically at every change of status.

A restarted service reloads the records, so finished jobs and their files stay listed; a record
still `queued` or `in_progress` on disk belonged to a service that died without shutting down,
and becomes `failed` with that reason. Half-written temporaries (`.*.partial.*`) are removed.
`sweep` removes finished jobs (record and file) older than the TTL.
"""
from __future__ import annotations

import contextlib
import json
import re
import secrets
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from ..io.video import atomic_path

QUEUED, IN_PROGRESS, COMPLETED, FAILED, CANCELLED = "queued", "in_progress", "completed", "failed", "cancelled"
STATUSES = (QUEUED, IN_PROGRESS, COMPLETED, FAILED, CANCELLED)
FINISHED = (COMPLETED, FAILED, CANCELLED)
JOB_ID = re.compile(r"video_[0-9a-f]{24}")


def new_job_id() -> str:
    return f"video_{secrets.token_hex(12)}"


@dataclass
class Job:
    """One video job. `settings` are the request's options as run (seed included); `image` and
    `opts` live only in memory while the job waits or runs."""

    id: str
    status: str
    created_at: float
    output_format: str
    settings: Dict[str, Any]
    frame_size: List[int]
    seed: int
    step: int = 0
    steps: int = 0
    stage: str = QUEUED
    error: Optional[str] = None
    started_at: Optional[float] = None
    completed_at: Optional[float] = None
    file: Optional[str] = None
    timings_s: Dict[str, float] = field(default_factory=dict)
    cancel_requested: bool = field(default=False, metadata={"transient": True})
    opts: Any = field(default=None, repr=False, metadata={"transient": True})
    image: Any = field(default=None, repr=False, metadata={"transient": True})

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def record(self) -> Dict[str, Any]:
        """What is persisted (everything but the in-memory inputs)."""
        data = asdict(self)
        for name in ("cancel_requested", "opts", "image"):
            data.pop(name)
        return data

    def public(self) -> Dict[str, Any]:
        """The API's view of the job."""
        width, height = self.frame_size
        return {"id": self.id, "object": "video", "status": self.status,
                "progress": {"step": self.step, "steps": self.steps, "stage": self.stage},
                "seed": self.seed, "error": self.error, "created_at": self.created_at,
                "completed_at": self.completed_at, "output_format": self.output_format,
                "size": f"{width}x{height}", "frame_num": self.settings.get("frame_num"),
                "settings": self.settings}

    def finish(self, status: str, error: Optional[str] = None, stage: Optional[str] = None) -> None:
        self.status, self.error, self.completed_at = status, error, time.time()
        self.stage = stage or status
        self.opts = self.image = None  # the inputs are not needed any more: free them


class JobStore:
    """The records of one output directory (not thread-safe: the service holds its lock)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.jobs: Dict[str, Job] = {}

    def path_of(self, job_id: str) -> Path:
        return self.directory / f"{job_id}.json"

    def output_of(self, job: Job) -> Path:
        return self.directory / f"{job.id}.{job.output_format}"

    def add(self, job: Job) -> None:
        self.jobs[job.id] = job
        self.save(job)

    def save(self, job: Job) -> None:
        if job.id not in self.jobs:  # deleted meanwhile: do not resurrect it on disk
            return
        with atomic_path(self.path_of(job.id)) as tmp:
            tmp.write_text(json.dumps(job.record(), indent=1), encoding="utf-8")

    def get(self, job_id: str) -> Optional[Job]:
        return self.jobs.get(job_id) if JOB_ID.fullmatch(job_id or "") else None

    def remove(self, job: Job) -> None:
        """Delete the job's file and record."""
        self.jobs.pop(job.id, None)
        for path in (self.output_of(job), self.path_of(job.id)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def load(self) -> int:
        """Read the records left by an earlier service; returns how many were marked failed."""
        for stale in self.directory.glob(".*.partial.*"):
            with contextlib.suppress(OSError):
                stale.unlink()
        interrupted = 0
        for path in sorted(self.directory.glob("video_*.json")):
            job = _read_record(path)
            if job is None:
                continue
            self.jobs[job.id] = job
            if not job.finished:
                job.finish(FAILED, "the service stopped before this job finished (found at restart); "
                                   "no output was written")
                self.save(job)
                interrupted += 1
            elif job.status == COMPLETED and not self.output_of(job).is_file():
                job.finish(FAILED, f"output file {job.id}.{job.output_format} is missing (found at restart)")
                self.save(job)
        return interrupted

    def sweep(self, ttl_s: float, now: Optional[float] = None) -> List[str]:
        """Remove finished jobs whose completion is older than `ttl_s` (0: keep forever)."""
        if ttl_s <= 0:
            return []
        now = time.time() if now is None else now
        expired = [job for job in self.jobs.values() if job.finished and (job.completed_at or 0) + ttl_s <= now]
        for job in expired:
            self.remove(job)
        return [job.id for job in expired]

    def __iter__(self) -> Iterator[Job]:
        return iter(sorted(self.jobs.values(), key=lambda job: job.created_at))


def _read_record(path: Path) -> Optional[Job]:
    known = {name for name in Job.__dataclass_fields__ if not Job.__dataclass_fields__[name].metadata.get("transient")}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not JOB_ID.fullmatch(str(data.get("id"))) or data["id"] != path.stem or data.get("status") not in STATUSES:
            raise ValueError("not a job record")
        return Job(**{k: v for k, v in data.items() if k in known})
    except (OSError, ValueError, TypeError, KeyError) as exc:
        print(f"wanengine serve: skipping unreadable job record {path.name}: {exc}", file=sys.stderr, flush=True)
        return None
