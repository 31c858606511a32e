"""Errors that the command line turns into exit codes.

``ConfigError`` is a user's mistake (bad config, flag, data path, link string): the CLI prints its message as
one paragraph, without a traceback, and exits with code 2. Anything else exits with code 1.
"""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """Bad input from the user. The message names the field and says how to fix it."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)
