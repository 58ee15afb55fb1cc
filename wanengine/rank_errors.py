"""How ranks 1.. of a torchrun job leave on an error, so that the job prints it once.

Every rank checks the same inputs, so a user error is found by all of them, and rank 0 prints
it. But torchrun ends the whole job as soon as any rank exits, killing the others: a rank 1
that exited first would have rank 0 killed before its line was out, and the error would be
lost. So a rank other than 0 does not exit at once: it waits up to a grace period
(`WANENGINE_RANK_ERROR_GRACE_S`, default 10 s) for rank 0 to report and end the job -- when
torchrun's SIGTERM (or SIGINT / SIGHUP) arrives it leaves quietly with its own exit code. If
the grace period passes, rank 0 has not failed the same way (the error is this rank's alone),
and the rank prints it with its rank number before exiting. `--verbose` prints it at once.
Torch-free.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

GRACE_ENV = "WANENGINE_RANK_ERROR_GRACE_S"
DEFAULT_GRACE_S = 10.0
_ENDING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))


def grace_seconds() -> float:
    """The wait for rank 0 (0 disables it: the rank exits at once, quietly)."""
    try:
        return max(0.0, float(os.environ.get(GRACE_ENV, DEFAULT_GRACE_S)))
    except ValueError:
        return DEFAULT_GRACE_S


def rank_line(message: str) -> str:
    return f"wanengine: rank {os.environ.get('RANK')}: error: {message}"


def leave_to_lead_rank(message: str, code: int, verbose: bool = False) -> None:
    """On a rank other than 0: wait for rank 0 to end the job (then exit `code` quietly), or
    print `message` with the rank's number once the grace period is over; then return."""
    if verbose:
        print(rank_line(message), file=sys.stderr, flush=True)
    grace = grace_seconds()
    if grace <= 0:
        return
    if threading.current_thread() is not threading.main_thread():
        return  # signals can only be caught on the main thread: do not wait
    previous = {signum: signal.getsignal(signum) for signum in _ENDING_SIGNALS}
    try:
        for signum in _ENDING_SIGNALS:
            signal.signal(signum, lambda *_: os._exit(code))  # torchrun ending the job: rank 0 reported
        time.sleep(grace)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if not verbose:
        print(rank_line(message) + f" (rank 0 did not end the job within {grace:g} s)", file=sys.stderr, flush=True)
