"""How the command line ends: an exit code and at most one line on stderr, whatever happens.

`guarded(body)` runs the CLI's body and turns an interrupt (`interrupts.Interrupted`, or a
KeyboardInterrupt raised before the handlers were installed) into `interrupts.report` --
one line, 128 + signal; library warnings (PIL, ...) meanwhile are shown as one line each.
`exit_with(code)` leaves (without the interpreter's slow teardown when `fast`), after which a
signal exits at once. `usage_message` is the one line of a usage error.
"""
from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import warnings
from typing import Callable, Optional

from . import interrupts

PROG = "wanengine"


def usage_message(exc) -> str:
    """One line for a click usage error naming the flag the user typed (its first spelling),
    without click's "(Possible options: ...)" guesses."""
    try:
        from typer._click import exceptions as errors
    except ImportError:  # older typer runs on click itself
        from click import exceptions as errors  # type: ignore[no-redef]
    param = getattr(exc, "param", None)
    opts = list(getattr(param, "opts", None) or [])
    if isinstance(exc, errors.NoSuchOption):
        return f"no such option: {exc.option_name}"
    if isinstance(exc, errors.MissingParameter) and opts:
        return f"{opts[0]}: missing (required)"
    if isinstance(exc, errors.BadParameter) and opts:
        return f"{opts[0]}: {' '.join(str(exc.message).split())}"
    return " ".join(exc.format_message().split())


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = " ".join(str(message).split())
    print(f"{PROG}: warning: {text}", file=sys.stderr if file is None else file, flush=True)


def guarded(body: Callable[[], Optional[int]]) -> int:
    """`body()`'s exit code; an interrupt at any point inside is reported and its code returned."""
    previous_showwarning = warnings.showwarning
    warnings.showwarning = _one_line_warning
    try:
        result = body()
        return int(result) if isinstance(result, int) else 0
    except interrupts.Interrupted as exc:
        return interrupts.report(exc.signum)
    except KeyboardInterrupt:  # raised before the handlers were installed, or by a library
        return interrupts.report(signal.SIGINT)
    finally:
        warnings.showwarning = previous_showwarning


def exit_with(code: Optional[int], fast: bool = False) -> None:
    """`sys.exit`, with stdout flushed first (a closed pipe is not an error worth a traceback);
    a signal from here on exits at once (there is nothing left to stop).

    `fast` (the console script, never a caller that goes on): after the atexit handlers, leave
    with `os._exit` instead of tearing the interpreter down module by module -- 0.5-1 s with
    torch loaded, which no stage table can show. Every output is already complete (written
    atomically and fsynced), so nothing is lost; with a non-daemon thread still running the
    ordinary exit (which waits for it) is kept."""
    interrupts.finishing()
    _flush(sys.stdout)
    if fast and all(t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        atexit._run_exitfuncs()
        _flush(sys.stdout)
        _flush(sys.stderr)
        os._exit(code or 0)
    sys.exit(code or 0)


def _flush(stream) -> None:
    try:
        stream.flush()
    except (AttributeError, OSError, ValueError):  # closed, or a closed pipe
        pass
