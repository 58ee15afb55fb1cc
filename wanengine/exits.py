"""How the command line ends: every outcome is an exit code and at most one line on stderr.

`run_app(app, args)` runs the typer app without click's standalone handling and maps:
usage errors (bad value, unknown or missing option) -> one line naming the flag, exit 2 (no
box, no "Possible options" list); `UserInputError` raised outside a command (e.g. the
reference-flag translation) -> one line, exit 2; an interrupt -> `interrupts.report`
(130 / 143 / 129). Library warnings (PIL, ...) are shown as one line each.
"""
from __future__ import annotations

import signal
import sys
import warnings
from typing import Callable, List, Optional

from . import interrupts
from .errors import UserInputError

PROG = "wanengine"


def _click_exceptions():
    """The exception module of the click typer runs on: recent typer vendors its own copy
    (`typer._click`), older ones use click itself."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def _abort_type() -> type:
    import typer

    return getattr(typer, "Abort", None) or _click_exceptions().Abort


def usage_line(exc) -> str:
    """One line for a click usage error, naming the flag the user typed (its first spelling)."""
    errors = _click_exceptions()
    param = getattr(exc, "param", None)
    opts = list(getattr(param, "opts", None) or [])
    if isinstance(exc, errors.NoSuchOption):
        message = f"no such option: {exc.option_name}"
    elif isinstance(exc, errors.MissingParameter) and opts:
        message = f"{opts[0]}: missing (required)"
    elif isinstance(exc, errors.BadParameter) and opts:
        message = f"{opts[0]}: {' '.join(str(exc.message).split())}"
    else:
        message = " ".join(exc.format_message().split())
    command = exc.ctx.command_path if getattr(exc, "ctx", None) is not None else PROG
    return f"{PROG}: error: {message} (see '{command} --help')"


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = " ".join(str(message).split())
    print(f"{PROG}: warning: {text}", file=sys.stderr if file is None else file, flush=True)


def run_app(app, args: Callable[[], List[str]], prog_name: str = PROG,
            debug: Callable[[], bool] = lambda: False) -> int:
    """Run `app` on the arguments `args()` returns (computed inside, so that its errors and
    interrupts are handled too); returns the process exit code (the caller exits with it).
    With `debug()` true, errors propagate with their traceback (interrupts stay one line)."""
    click_errors = _click_exceptions()
    previous_showwarning = warnings.showwarning
    warnings.showwarning = _one_line_warning
    try:
        result = app(args=args(), prog_name=prog_name, standalone_mode=False)
        return int(result) if isinstance(result, int) else 0
    except interrupts.Interrupted as exc:
        return interrupts.report(exc.signum)
    except KeyboardInterrupt:  # raised before the handlers were installed, or by a library
        return interrupts.report(signal.SIGINT)
    except getattr(click_errors, "NoArgsIsHelpError", ()) as exc:  # bare `wanengine`: the help (click >= 8.2)
        exc.show()
        return exc.exit_code
    except click_errors.UsageError as exc:
        if debug():
            raise
        print(usage_line(exc), file=sys.stderr, flush=True)
        return 2
    except _abort_type():
        return interrupts.report(signal.SIGINT)  # click's Abort is its own Ctrl-C / EOF at a prompt
    except click_errors.ClickException as exc:
        print(f"{PROG}: error: {' '.join(exc.format_message().split())}", file=sys.stderr, flush=True)
        return exc.exit_code
    except UserInputError as exc:
        if debug():
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        warnings.showwarning = previous_showwarning


def exit_with(code: Optional[int]) -> None:
    """`sys.exit`, with stdout flushed first (a closed pipe is not an error worth a traceback);
    a signal from here on exits at once (there is nothing left to stop)."""
    interrupts.finishing()
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    sys.exit(code or 0)
