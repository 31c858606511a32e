"""The lab's data plane in C (``forward.c``), compiled with the machine's C compiler once per version of the
source and kept (as root, which the lab is, in the lab's own directory ``/run/geotrain-netlab``; otherwise in
the user's cache). The Python router replaces itself with it once the sites' devices are open
(``geotrain.netlab.router``); without a compiler the lab forwards in Python, at less than half the rate
(``ROUTER_MEASURED_BPS``)."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

__all__ = ["SOURCE", "ForwarderUnavailable", "build", "cache_dir"]

SOURCE = Path(__file__).with_name("forward.c")
CFLAGS = ("-O2", "-ffp-contract=off", "-std=gnu11", "-Wall")
"""No fused multiply-adds: the C forwarder's arithmetic must match the Python router's to the last bit."""
BUILD_TIMEOUT_S = 120.0


class ForwarderUnavailable(RuntimeError):
    """The C forwarder cannot be built here (no compiler, or it failed); the message says why."""


def cache_dir() -> Path:
    """Where the binary is kept. As root, the lab's directory, which is root's alone: under ``sudo`` the home
    directory may still be the user's, and root must not run a binary that another user could replace."""
    if os.geteuid() == 0:
        from geotrain.netlab.lab import STATE_DIR

        return STATE_DIR
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "geotrain"


def _private(path: Path) -> bool:
    """Owned by this user and writable by no one else."""
    st = path.stat()
    return st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def build(cache: Path | None = None) -> Path:
    """The compiled forwarder, built now if this version of the source has not been built before. Raises
    :class:`ForwarderUnavailable` with the reason when it cannot be."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise ForwarderUnavailable(f"no C compiler ({os.environ.get('CC', 'cc')!r} is not on PATH)")
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join(CFLAGS).encode() + compiler.encode()).hexdigest()[:16]
    cache = cache_dir() if cache is None else cache
    binary = cache / f"netlab-forward-{tag}"
    try:
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _private(cache):
            raise ForwarderUnavailable(f"{cache} is not this user's alone: a binary kept there could be replaced")
        if binary.is_file() and os.access(binary, os.X_OK) and _private(binary):
            return binary
        fd, tmp = tempfile.mkstemp(prefix=".forward-", dir=cache)
        os.close(fd)
    except OSError as e:
        raise ForwarderUnavailable(f"cannot write to {cache} ({e.strerror or e})") from None
    try:
        done = subprocess.run([compiler, *CFLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise ForwarderUnavailable(f"{compiler} failed: {(done.stderr or done.stdout).strip()[:500]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, binary)  # atomic: two labs building at once both end with a whole binary
    except subprocess.TimeoutExpired:
        raise ForwarderUnavailable(f"{compiler} took over {BUILD_TIMEOUT_S:g} s") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return binary
