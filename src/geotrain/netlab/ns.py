"""Entering a network namespace and opening a TUN device: the two system calls the lab needs (no torch)."""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct

__all__ = ["CLONE_NEWNET", "open_tun", "setns"]

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace open at ``fd``."""
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def open_tun(name: str) -> int:
    """A TUN device ``name`` in the current network namespace (raw IP packets, no packet info), non-blocking.
    The device lives as long as the returned descriptor."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd
