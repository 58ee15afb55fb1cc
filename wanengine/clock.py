"""The process clock: seconds since the operating system started this process, on the same
time base as `time.perf_counter()`, so a run's stage table can add up to its wall time
(interpreter start-up and imports included)."""
from __future__ import annotations

import os
import time


def _age_from_proc() -> float:
    """Seconds this process has existed, from Linux's /proc (10 ms resolution); raises elsewhere."""
    with open("/proc/self/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()  # after "(comm)": fields[0] is field 3
    start_ticks = int(fields[19])  # field 22: start time in clock ticks after boot
    with open("/proc/uptime", encoding="ascii") as handle:
        uptime = float(handle.read().split()[0])
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def _process_start() -> float:
    now = time.perf_counter()
    try:
        return now - _age_from_proc()
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux: from the first import on
        return now


PROCESS_START = _process_start()  # a perf_counter() reading


def process_age() -> float:
    """Seconds since the process started (since this module was imported where /proc is missing)."""
    return time.perf_counter() - PROCESS_START
