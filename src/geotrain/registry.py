"""A registry of named definitions (algorithms, codecs): one lower-case name each, and a lookup whose error
names the choices and the closest one. Pure Python."""

from __future__ import annotations

import difflib
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Definitions by name, in registration order."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        """Make ``item`` known as ``name`` (replacing one of that name)."""
        if not name or name != name.strip().lower():
            raise ValueError(f"{self.what} needs a lower-case name without spaces, got {name!r}")
        self._items[name] = item
        return item

    def names(self) -> list[str]:
        return list(self._items)

    def find(self, name: str) -> T | None:
        return self._items.get(name.strip().lower())

    def unknown(self, name: object) -> str:
        """The message for a name that is not registered: the choices and the closest one."""
        close = difflib.get_close_matches(str(name).strip().lower(), list(self._items), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.what} {name!r}; choose one of {', '.join(self._items)}{hint}"

    def copy(self) -> Registry[T]:
        """A registry holding the same definitions (tests extend a copy and restore the original)."""
        other: Registry[T] = Registry(self.what)
        other._items = dict(self._items)
        return other
