"""Exception types that carry a one-line, user-facing message.

`UserInputError` and its subclasses are mistakes the user can fix (bad flag, missing or
corrupt file): the CLI prints the message alone and exits 2. Anything else is a runtime
failure (exit 1). Invalid argument values raise `InvalidArgument`, a `ValueError` naming the
library argument (the CLI maps it to the flag).
"""
from __future__ import annotations

from typing import Optional


class WanEngineError(Exception):
    """Base class of every error wanengine raises on purpose."""


class UserInputError(WanEngineError):
    """A problem with what the user asked for or pointed at; fixable without code changes."""


class ConfigError(UserInputError, ValueError):
    """An invalid option or combination of options (also a `ValueError`)."""


class InvalidArgument(ConfigError):
    """One argument has an invalid value. The message starts with the argument's name in the
    library API (`frame_num: 80 is not of the form 4n+1`); `argument` and `detail` hold the
    two parts, so the CLI can print its flag instead (`--frame-num: ...`)."""

    def __init__(self, argument: str, detail: str, cli_detail: Optional[str] = None) -> None:
        super().__init__(f"{argument}: {detail}")
        self.argument = argument
        self.detail = detail
        self.cli_detail = cli_detail  # the detail in flag words, when it names other arguments too

    def __reduce__(self):  # picklable across processes despite the constructor's parts
        return type(self), (self.argument, self.detail, self.cli_detail)


class CheckpointError(UserInputError):
    """A missing, corrupt, truncated or mismatched checkpoint file; the message names the file."""


class NumericalError(WanEngineError):
    """A NaN/Inf appeared during sampling (names the step, timestep and expert)."""


class GenerationCancelled(WanEngineError):
    """Raised from an `on_step` callback (or by the engine on a cancellation request) to stop a
    generation at the next step boundary; nothing is written and the engine stays usable."""
