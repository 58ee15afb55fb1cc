"""Exception types that carry a one-line, user-facing message.

`UserInputError` and its subclasses are mistakes the user can fix (bad flag, missing or
corrupt file): the CLI prints the message alone and exits 2. Anything else is a runtime
failure (exit 1). Invalid argument values raise `InvalidArgument`, a `ValueError` naming the
library argument (the CLI maps it to the flag).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

# Library argument names whose CLI flag is not "--" + the name in kebab case.
# (`path` is `Video.save`'s, which the CLI's `--out` feeds.)
CLI_FLAGS = {"steps": "--sample-steps", "shift": "--sample-shift", "solver": "--sample-solver", "path": "--out"}


def flag_for(argument: str) -> str:
    """The CLI flag of a library argument (`frame_num` -> `--frame-num`)."""
    return CLI_FLAGS.get(argument, "--" + argument.replace("_", "-"))


class ArgumentWords:
    """How a message names other arguments: as the library's keywords (`cfg_size=2`) or as the
    CLI's flags (`--cfg-size 2`). A message that mentions several arguments is written once, as
    a function of the words, and rendered both ways (`InvalidArgument.worded`)."""

    def __init__(self, cli: bool) -> None:
        self.cli = cli

    def name(self, argument: str) -> str:
        return flag_for(argument) if self.cli else argument

    def setting(self, argument: str, value: Any = True) -> str:
        """`argument` set to `value`, as the user writes it (a flag alone for True)."""
        if not self.cli:
            return f"{argument}={value!r}"
        flag = flag_for(argument)
        if value is True:
            return flag
        if value is False:
            return "--no-" + flag[2:]
        return f"{flag} {value}"


LIBRARY_WORDS = ArgumentWords(cli=False)
CLI_WORDS = ArgumentWords(cli=True)


class WanEngineError(Exception):
    """Base class of every error wanengine raises on purpose."""


class UserInputError(WanEngineError):
    """A problem with what the user asked for or pointed at; fixable without code changes.

    The message is worded for the library (it names arguments as `cfg_size`); `cli_message`,
    when set, is the same message in the CLI's words (`--cfg-size`), which the CLI prints."""

    def __init__(self, message: str, cli_message: Optional[str] = None) -> None:
        super().__init__(message)
        self.cli_message = cli_message

    @classmethod
    def worded(cls, render: Callable[[ArgumentWords], str]) -> "UserInputError":
        """An error whose message names arguments: `render(words)` is called with the library's
        words (the message) and with the CLI's (`cli_message`)."""
        return cls(render(LIBRARY_WORDS), render(CLI_WORDS))

    def __reduce__(self):  # picklable across processes (ranks) with both wordings
        return type(self), (str(self), self.cli_message)


class ConfigError(UserInputError, ValueError):
    """An invalid option or combination of options (also a `ValueError`)."""


class InvalidArgument(ConfigError):
    """One argument has an invalid value. The message starts with the argument's name in the
    library API (`frame_num: 80 is not of the form 4n+1`); `argument` and `detail` hold the
    two parts, so the CLI can print its flag instead (`--frame-num: ...`); `cli_detail` is the
    detail in the CLI's words when it names other arguments too (see `for_argument`)."""

    def __init__(self, argument: str, detail: str, cli_detail: Optional[str] = None) -> None:
        super().__init__(f"{argument}: {detail}", f"{flag_for(argument)}: {cli_detail or detail}")
        self.argument = argument
        self.detail = detail
        self.cli_detail = cli_detail

    @classmethod
    def for_argument(cls, argument: str, render: Callable[[ArgumentWords], str]) -> "InvalidArgument":
        """An error about `argument` whose detail names other arguments: `render(words)` is
        called with the library's words and with the CLI's."""
        return cls(argument, render(LIBRARY_WORDS), render(CLI_WORDS))

    def __reduce__(self):
        return type(self), (self.argument, self.detail, self.cli_detail)


class CheckpointError(UserInputError):
    """A missing, corrupt, truncated or mismatched checkpoint file; the message names the file."""


class CheckpointSourceError(InvalidArgument, CheckpointError):
    """A checkpoint source argument (`ckpt_dir`, `vae`, `dit_config`, ...) points at something
    missing or incomplete: both an `InvalidArgument` and a `CheckpointError`."""


class NumericalError(WanEngineError):
    """A NaN/Inf appeared during sampling (names the step, timestep and expert)."""


class GenerationCancelled(WanEngineError):
    """Raised from an `on_step` callback (or by the engine on a cancellation request) to stop a
    generation at the next step boundary; nothing is written and the engine stays usable."""
