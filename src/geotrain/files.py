"""Writing files so that a reader, or a crash at any moment, sees the old version or the new one, never a part.

A new version is written under a unique temporary name beside the target, flushed to disk (``fsync``), renamed
over the target (``os.replace`` is atomic on POSIX and Windows), and the directory is flushed too, so that the
rename itself survives a power loss. The temporary name is unique, so two processes writing the same target
never write into each other's file; the last rename wins.

Used for every file a run leaves behind: the corpus cache, ``config.json``, ``summary.json``, ``metrics.jsonl``,
the reports, the final ``model.safetensors`` and the checkpoints (``checkpoint.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["atomic_write", "fsync_dir", "fsync_file", "replacing", "temporary_name", "write_json_atomic",
           "write_text_atomic"]


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to disk (whoever wrote it: fsync applies to the file, not to one handle)."""
    with open(path, "r+b") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Flush ``path``'s directory entries to disk, so that files created, renamed or removed in it stay so
    after a power loss. A no-op where directories cannot be opened (Windows)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: Path) -> Path:
    """A fresh, hidden name beside ``path`` (same directory, so a rename to ``path`` is atomic)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for the block to write (by any means: ``save_file``, ``open``).

    When the block ends normally, the temporary file is fsynced, given the permissions of the file it replaces
    (if any), and renamed over ``path``; then the directory is fsynced. When it raises, the temporary file is
    removed and ``path`` is left as it was.
    """
    tmp = temporary_name(path)
    try:
        yield tmp
        fsync_file(tmp)
        with contextlib.suppress(FileNotFoundError):  # a replaced file keeps its permissions
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Replace ``path`` with what ``write`` writes to the binary file it is given (see :func:`replacing`)."""
    with replacing(path) as tmp, open(tmp, "xb") as f:
        write(f)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in UTF-8 (see :func:`replacing`)."""
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as indented JSON (see :func:`replacing`)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
