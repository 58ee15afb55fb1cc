"""Service counters and their Prometheus text exposition (format 0.0.4), without a client library.

Exposed: queue depth; jobs by status (gauges over the current records); submissions accepted
and rejected by reason; per-stage seconds of finished jobs (`text encode`, `VAE encode`,
`denoise`, `VAE decode`, `write`); denoising step seconds and whole-job seconds as summaries
(`_sum` / `_count`, so `rate(sum) / rate(count)` is the mean).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping

from .jobs import STATUSES


@dataclass
class Summary:
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float, count: int = 1) -> None:
        self.total += seconds
        self.count += count


@dataclass
class Metrics:
    """Counters the service updates under its lock."""

    accepted: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason -> count
    stage_seconds: Dict[str, float] = field(default_factory=dict)
    step_seconds: Summary = field(default_factory=Summary)
    job_seconds: Summary = field(default_factory=Summary)

    def job_finished(self, timings_s: Mapping[str, float], steps: int, seconds: float) -> None:
        for stage, value in timings_s.items():
            if stage != "load":
                self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + float(value)
        if "denoise" in timings_s and steps:
            self.step_seconds.observe(float(timings_s["denoise"]), steps)
        self.job_seconds.observe(seconds)

    def render(self, queue_depth: int, statuses: Iterable[str], max_queue: int) -> str:
        by_status = Counter(statuses)
        lines: List[str] = []

        def metric(name: str, kind: str, doc: str, samples: Iterable[tuple]) -> None:
            lines.extend([f"# HELP {name} {doc}", f"# TYPE {name} {kind}"])
            lines.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

        metric("wanengine_queue_depth", "gauge", "Jobs waiting to run.", [("", queue_depth)])
        metric("wanengine_queue_capacity", "gauge", "Most jobs that may wait (--max-queue).", [("", max_queue)])
        metric("wanengine_jobs", "gauge", "Jobs known to the service, by status.",
               [(f'{{status="{s}"}}', by_status.get(s, 0)) for s in STATUSES])
        metric("wanengine_submissions_accepted_total", "counter", "Jobs accepted.", [("", self.accepted)])
        metric("wanengine_submissions_rejected_total", "counter", "Submissions refused, by reason.",
               [(f'{{reason="{r}"}}', n) for r, n in sorted(self.rejected.items())])
        metric("wanengine_stage_seconds_total", "counter", "Seconds spent per stage by finished jobs.",
               [(f'{{stage="{s}"}}', v) for s, v in sorted(self.stage_seconds.items())])
        for name, summary, doc in (("wanengine_step_seconds", self.step_seconds, "Denoising step seconds."),
                                   ("wanengine_job_seconds", self.job_seconds, "Seconds from start to finish.")):
            lines.extend([f"# HELP {name} {doc}", f"# TYPE {name} summary",
                          f"{name}_sum {_number(summary.total)}", f"{name}_count {summary.count}"])
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)
