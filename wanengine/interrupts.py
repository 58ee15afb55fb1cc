"""One signal path for the command line: SIGINT, SIGTERM and SIGHUP all stop a run the same way.

`install()` is called first thing in `cli.main` -- before torch or typer's command modules
are imported -- so an interrupt at any moment (start-up included) ends in one line and an
exit code, never a traceback:

- The first signal raises `Interrupted` in the main thread at the next Python bytecode (so at
  the latest when the current step's kernel or the current write returns). It unwinds through
  every `finally`/`except BaseException`, which remove the temporary files of `io.atomic`, and
  `cli.main` prints one line: "interrupted (SIGTERM); no output was written" or, when an output
  was already committed, "interrupted (SIGTERM) after writing out.mp4". Exit code 128 + signal
  number: 130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP.
- A second signal exits at once with the first signal's code, quietly (the one line is printed
  only if the first signal's has not been yet), after removing the registered temporary files.
- A watchdog thread (woken through `signal.set_wakeup_fd`, which works while the main thread
  is stuck in C code, e.g. a collective waiting for a rank that is gone) does the same after
  `GRACE_S` seconds if the main thread has not finished by then. So under torchrun every rank
  exits when one is interrupted or killed: the survivors get torchrun's SIGTERM and leave
  within the grace period even when blocked in a collective.

Library code (`Engine`) is unaffected unless the CLI installed the handlers; `uninstall()`
restores the previous handlers (used when `cli.main` runs inside another program, e.g. tests).
"""
from __future__ import annotations

import os
import shutil
import signal
import threading
from typing import Dict, List, Optional, Set, Union

from .runtime_env import is_lead_rank

GRACE_S = 5.0
HANDLED = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
PathLike = Union[str, "os.PathLike[str]"]


class Interrupted(BaseException):
    """A handled signal arrived. BaseException (like KeyboardInterrupt) so that `except
    Exception` handlers do not swallow it; not a KeyboardInterrupt, so that click/typer do not
    turn it into their own message."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal_name(signum))
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:  # pragma: no cover - only handled signals get here
        return f"signal {signum}"


def exit_code(signum: int) -> int:
    return 128 + int(signum)


class _State:
    lock = threading.RLock()
    first: Optional[int] = None
    reported = False
    raising = False  # False until cli.main's try block is entered: exit at once instead
    finishing = False
    installed = False
    previous: Dict[int, object] = {}
    previous_wakeup = -1
    wake_write: Optional[int] = None
    temp_files: Set[str] = set()
    temp_dirs: Set[str] = set()
    written: List[str] = []


# --------------------------------------------------------------------------- bookkeeping
def track_temp(path: PathLike, directory: bool = False) -> None:
    """Register a temporary file (or directory) to delete if the process is interrupted."""
    with _State.lock:
        (_State.temp_dirs if directory else _State.temp_files).add(os.fspath(path))


def untrack_temp(path: PathLike) -> None:
    with _State.lock:
        _State.temp_files.discard(os.fspath(path))
        _State.temp_dirs.discard(os.fspath(path))


def note_written(path: PathLike) -> None:
    """Record that `path` now holds a complete output (the interrupt message names it)."""
    with _State.lock:
        _State.written.append(os.fspath(path))


def written() -> List[str]:
    return list(_State.written)


def remove_temp_files() -> None:
    with _State.lock:
        files, dirs = list(_State.temp_files), list(_State.temp_dirs)
        _State.temp_files.clear()
        _State.temp_dirs.clear()
    for name in files:
        try:
            os.unlink(name)
        except OSError:
            pass
    for name in dirs:
        shutil.rmtree(name, ignore_errors=True)


def report_line(signum: int) -> str:
    """The one line an interrupt prints."""
    outputs = written()
    if outputs:
        return f"wanengine: interrupted ({signal_name(signum)}) after writing {', '.join(outputs)}"
    return f"wanengine: interrupted ({signal_name(signum)}); no output was written"


def report(signum: int) -> int:
    """Print the interrupt's line (once) and return its exit code."""
    with _State.lock:
        if _State.first is None:
            _State.first = signum
        first = _State.first
        if not _State.reported:
            _State.reported = True
            if is_lead_rank():  # one line for a torchrun job: rank 0's
                _write_stderr(report_line(first) + "\n")
    return exit_code(first)


def _write_stderr(text: str) -> None:
    try:
        os.write(2, text.encode("utf-8", "replace"))  # no Python buffering: safe inside a handler
    except OSError:
        pass


def _exit_now() -> None:
    """Second interrupt or grace period over: clean up and leave without unwinding."""
    remove_temp_files()
    code = report(_State.first if _State.first is not None else signal.SIGINT)
    os._exit(code)


# --------------------------------------------------------------------------- handlers
def _handler(signum: int, frame) -> None:
    with _State.lock:
        first = _State.first is None
        if first:
            _State.first = signum
    if first and _State.raising and not _State.finishing:
        raise Interrupted(signum)
    _exit_now()


def finishing() -> None:
    """The run is over (its outcome reported): a signal now exits at once instead of raising
    into the interpreter's shutdown."""
    _State.finishing = True


def _watchdog(read_fd: int) -> None:
    seen = 0
    timer: Optional[threading.Timer] = None
    while True:
        try:
            data = os.read(read_fd, 64)
        except OSError:
            return
        if not data:  # uninstall() closed the write end
            if timer is not None:
                timer.cancel()
            os.close(read_fd)
            return
        seen += sum(1 for byte in data if byte in HANDLED)
        if seen >= 2:
            _exit_now()
        elif seen == 1 and timer is None:
            timer = threading.Timer(GRACE_S, _exit_now)
            timer.daemon = True
            timer.start()


def install(raising: bool = True) -> None:
    """Route SIGINT/SIGTERM/SIGHUP through `_handler` (main thread only; idempotent).
    `raising`: the first signal raises `Interrupted` (cli.main catches it); False (the early,
    import-time install) exits at once, as nothing exists yet to clean up or report."""
    if threading.current_thread() is not threading.main_thread():
        return
    if _State.installed:
        _State.raising = _State.raising or raising
        return
    _State.raising = raising
    with _State.lock:  # a fresh run (cli.main may run several times inside one test process)
        _State.first, _State.reported, _State.finishing, _State.written = None, False, False, []
    for signum in HANDLED:
        try:
            _State.previous[signum] = signal.signal(signum, _handler)
        except (OSError, ValueError):  # pragma: no cover - e.g. a signal this platform refuses
            continue
    try:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        _State.previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        _State.wake_write = write_fd
        threading.Thread(target=_watchdog, args=(read_fd,), name="wanengine-interrupts", daemon=True).start()
    except (OSError, ValueError, AttributeError):  # pragma: no cover - no wakeup fd: the handler still works
        _State.wake_write = None
    _State.installed = True


def uninstall() -> None:
    """Restore the handlers `install` replaced and forget this run's bookkeeping."""
    if not _State.installed:
        return
    for signum, previous in _State.previous.items():
        try:
            signal.signal(signum, previous)  # type: ignore[arg-type]
        except (OSError, ValueError, TypeError):  # pragma: no cover
            pass
    if _State.wake_write is not None:
        try:
            signal.set_wakeup_fd(_State.previous_wakeup)
        except (OSError, ValueError):  # pragma: no cover
            pass
        os.close(_State.wake_write)
        _State.wake_write = None
    with _State.lock:
        _State.previous, _State.installed = {}, False
        _State.first, _State.reported, _State.finishing, _State.raising = None, False, False, False
        _State.written = []
        _State.temp_files, _State.temp_dirs = set(), set()


def install_if_cli_process() -> None:
    """`install()` when this process is the `wanengine` command (console script, `cli.py`,
    `python -m wanengine.cli`, torchrun of either), so that even the imports before `main`
    runs are covered; a program that merely imports the CLI module keeps its own handlers."""
    import sys

    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if os.path.basename(sys.argv[0] if sys.argv else "") in ("wanengine", "cli.py") or (
            spec is not None and spec.name == "wanengine.cli"):
        install(raising=False)


__all__ = ["Interrupted", "install", "uninstall", "track_temp", "untrack_temp", "note_written", "report",
           "report_line", "remove_temp_files", "exit_code", "GRACE_S"]
