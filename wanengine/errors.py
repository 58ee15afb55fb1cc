"""Exception types that carry a one-line, user-facing message.

`UserInputError` and its subclasses are mistakes the user can fix (bad flag, missing or
corrupt file): the CLI prints the message alone and exits 2. Anything else is a runtime
failure (exit 1).
"""
from __future__ import annotations


class WanEngineError(Exception):
    """Base class of every error wanengine raises on purpose."""


class UserInputError(WanEngineError):
    """A problem with what the user asked for or pointed at; fixable without code changes."""


class ConfigError(UserInputError):
    """An invalid option or combination of options."""


class CheckpointError(UserInputError):
    """A missing, corrupt, truncated or mismatched checkpoint file; the message names the file."""


class NumericalError(WanEngineError):
    """A NaN/Inf appeared during sampling (names the step, timestep and expert)."""


class GenerationCancelled(WanEngineError):
    """Raised from an `on_step` callback (or by the engine on a cancellation request) to stop a
    generation at the next step boundary; nothing is written and the engine stays usable."""
