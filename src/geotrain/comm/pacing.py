"""TCP pacing of the connections between sites.

Without pacing, a TCP sender writes what its congestion window allows in bursts at the speed of its own
interface, and the bottleneck's queue absorbs them. When a sync loads both directions of a link at once (every
all-gather between 2 sites, every all-to-all), each side's acknowledgements wait behind the other side's data,
arrive in clumps, and release bursts that overflow the queue. In the network lab (2 sites, cubic, a queue of one
round trip's bandwidth-delay product) such syncs of 1-16 MB took up to 1.47x as long as their bytes need at the
link's rate over 10 Mbit/s and 1.58x over 100 Mbit/s, and a burst that overflowed the queue cost a
retransmission timeout (256 KB over 100mbit/10ms: 3.13x; 64 KB over 2mbit/50ms: 3.64x). With the kernel pacing
each connection (spreading its window over the round trip), the same syncs over 2 and 10 Mbit/s took
1.01-1.05x, and the grid's worst point was 1.34x (``benchmarks/results/2026-12-02-netlab-real-vs-emulated-paced.md``).

Linux paces a TCP connection itself (since 4.13) once the socket asks for pacing, which setting
``SO_MAX_PACING_RATE`` does. :func:`paced` sets it, with no cap on the rate, on the TCP connections a
function opens (gloo's, which Python cannot reach otherwise): the kernel then sends at 1.2x the window per
round trip (2x in slow start), so pacing smooths the bursts without limiting the rate. BBR paces anyway;
there it changes nothing. Elsewhere (another system, no ``/proc``) it does nothing.

Pacing has a price for a sync smaller than the link's bandwidth-delay product: unpaced, it leaves as one burst
that the bottleneck's queue holds; paced, it is spread over a quarter of a round trip (16-256 KB between 2 sites
over 100mbit/50ms: 1.11-1.25x the time at the link's rate, against 1.01x unpaced), which the cost model
charges (``geotrain.topology.PACED_BURST_RTTS``). Pacing only the transfers of one such product or more, over a
second, paced group, measured no better over the lab's grid (60 of 72 points within 10%, against 61 with every
connection paced, before the model had the burst: each size's connections then start cold; docs/LOG.md).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import sys
from collections.abc import Callable, Iterable
from typing import TypeVar

__all__ = ["SO_MAX_PACING_RATE", "UNCAPPED", "pace", "paced", "tcp_connections"]

T = TypeVar("T")

SO_MAX_PACING_RATE = getattr(socket, "SO_MAX_PACING_RATE", 47)
"""The socket option (Linux's asm-generic value; Python's socket module does not name it)."""
_RATE = struct.Struct("@L")  # the kernel reads an unsigned long when given one
UNCAPPED = (1 << (8 * _RATE.size)) - 2
"""Pacing on, rate not capped: the kernel's "no cap" value (all ones) would leave pacing off, one less does not."""


def _fds() -> set[int]:
    """This process's open descriptors that are sockets (empty where ``/proc`` does not list them)."""
    found = set()
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError, ValueError):
                if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                    found.add(int(name))
    return found


def _connection(fd: int) -> socket.socket | None:
    """A duplicate of ``fd`` if it is a connected TCP socket (IPv4 or IPv6), else None."""
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        if s.family in (socket.AF_INET, socket.AF_INET6) and s.type == socket.SOCK_STREAM:
            s.getpeername()  # a listening or unconnected socket has no peer
            return s
    except OSError:
        pass
    s.close()
    return None


def tcp_connections(fds: Iterable[int] | None = None) -> list[int]:
    """The descriptors among ``fds`` (all of this process's sockets by default) that are connected TCP sockets."""
    found = []
    for fd in sorted(_fds() if fds is None else fds):
        s = _connection(fd)
        if s is not None:
            s.close()
            found.append(fd)
    return found


def pace(fds: Iterable[int], rate: int = UNCAPPED) -> int:
    """Ask the kernel to pace the TCP connections ``fds`` at no more than ``rate`` bytes per second (default:
    pacing on, uncapped); how many it set. A descriptor that is no connected TCP socket is left alone."""
    done = 0
    if not sys.platform.startswith("linux"):
        return done
    for fd in fds:
        s = _connection(fd)
        if s is None:
            continue
        with s, contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, _RATE.pack(rate))
            done += 1
    return done


def paced(open_connections: Callable[[], T], *, enabled: bool = True) -> T:
    """Call ``open_connections`` (which connects a process group, say) and pace the TCP connections it opened:
    the sockets among this process's descriptors after the call that were not there before it."""
    if not enabled:
        return open_connections()
    before = _fds()
    result = open_connections()
    pace(_fds() - before)
    return result
