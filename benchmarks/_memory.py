"""Host memory readings for the benchmarks (Linux /proc): current and peak RSS, peak reset."""
from __future__ import annotations


def status_kib(field: str) -> int:
    """A `/proc/self/status` field in KiB, e.g. `VmRSS` or `VmHWM` (the peak)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False
