"""Where a run writes when no output directory is given: a fresh directory per run, and a link to the newest.

``geotrain run`` without ``--out`` (and without ``run.out`` in its config) writes to ``runs/YYYYMMDD-HHMMSS``
(local time; ``-2``, ``-3``... when several runs start in the same second) and points ``runs/latest`` at it, so
no run deletes an earlier one's files and ``geotrain report runs/latest`` or ``geotrain run --resume`` find
the newest. The link is relative (the ``runs`` directory can be moved or copied whole) and is replaced in one
rename, so a reader sees the old target or the new one, never no link. An explicit ``--out`` is used as given
and leaves the link alone. No torch here: the command line reads it before anything heavy is imported.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import uuid
from pathlib import Path

__all__ = ["LATEST", "RUNS", "fresh_run_dir", "follow_latest", "point_latest"]

RUNS = Path("runs")
"""The directory fresh runs go under, relative to where geotrain is started."""
LATEST = "latest"
"""The name of the link to the newest fresh run, inside ``RUNS``."""
MAX_SAME_SECOND = 1000
"""Most runs started in one second under one ``runs`` directory (each gets a suffix)."""


def fresh_run_dir(root: Path = RUNS, *, now: float | None = None) -> Path:
    """Create and return a new, empty ``root/YYYYMMDD-HHMMSS[-N]`` (``now``: seconds since the epoch, default
    the current time), and point ``root/latest`` at it. ``mkdir`` fails when the name exists, so two runs that
    start in the same second, even in two processes, get two directories."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    for n in range(1, MAX_SAME_SECOND + 1):
        path = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        point_latest(root, path)
        return path
    raise FileExistsError(f"{MAX_SAME_SECOND} runs already started at {stamp} under {root}")


def point_latest(root: Path, target: Path) -> bool:
    """Make ``root/latest`` a relative link to ``target`` (a directory inside ``root``), atomically. Returns
    False, with a warning, when ``root/latest`` is a real directory (left by an older geotrain): it is not
    replaced, since it holds a run."""
    link = Path(root) / LATEST
    if link.is_dir() and not link.is_symlink():
        print(f"warning: {link} is a directory, not a link, so it was left as it is and does not point to the "
              f"new run {target}; move it away to have {link} follow the newest run", file=sys.stderr)
        return False
    tmp = Path(root) / f".{LATEST}-{uuid.uuid4().hex}"
    os.symlink(Path(target).name, tmp, target_is_directory=True)
    try:
        os.replace(tmp, link)  # a rename over the old link: atomic
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return True


def follow_latest(path: Path) -> Path:
    """``path`` with a link at its end followed one step (``runs/latest`` gives ``runs/20261201-093000``), so
    that a run resumed through the link records, and keeps writing to, the directory itself."""
    path = Path(path)
    if not path.is_symlink():
        return path
    return path.parent / os.readlink(path)
