"""Errors that the command line turns into exit codes.

``ConfigError`` is a user's mistake (bad config, flag, data path, link string): the CLI prints its message as
one paragraph, without a traceback, and exits with code 2. Anything else exits with code 1.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "SettingConflict", "one_line"]


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped, so that a message about a name that
    holds them (a key, a path) stays one line."""
    return "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in str(text))


class ConfigError(ValueError):
    """Bad input from the user. The message names the field and says how to fix it, on one line."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(one_line(f"{field}: {message}" if field else message))


class SettingConflict(ConfigError):
    """A setting that the chosen algorithm cannot take (overlap for ddp, say), as opposed to a bad value.

    On the command line such a setting from a configuration file is dropped when the flags choose another
    algorithm (``geotrain.config.config_from_tree``'s ``fit``); given for the run itself, it is bad input."""


class CheckpointError(ConfigError):
    """A checkpoint on disk that cannot be used: missing, truncated, corrupt, or written by a newer geotrain.

    Bad input from disk, like a bad data path, so the command line exits with code 2. The message names the
    file and what is wrong with it, on one line."""

    def __init__(self, message: str) -> None:
        super().__init__(message, field="checkpoint")
