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
``SO_MAX_PACING_RATE`` does. :func:`paced` sets it on the TCP connections a function opens (gloo's, which
Python cannot reach otherwise). Uncapped, the kernel sends at 1.2x the window per round trip (2x in slow
start), which smooths the bursts without limiting the rate, but a window larger than the link's round trip and
queue still overflows the queue: the lab's grid lost hundreds of packets per link and setting. Capped at the
link's rate less a share for the other direction's acknowledgements (``comm.tcp_pacing = "link"``, the default,
on real links: ``geotrain.topology.pacing_rate``), a connection never outruns its link and the lab lost none;
the cost model charges a link's bytes at that share of its rate. The cap needs to know which member is at the
other end of each connection: the members publish their connections' endpoints in the group's store. BBR
paces anyway; there the cap still applies. Elsewhere (another system, no ``/proc``) it does nothing.

Pacing has a price for a sync smaller than the link's bandwidth-delay product: unpaced, it leaves as one burst
that the bottleneck's queue holds; paced, it is spread over a quarter of a round trip (16-256 KB between 2 sites
over 100mbit/50ms: 1.11-1.25x the time at the link's rate, against 1.01x unpaced), which the cost model
charges (``geotrain.topology.PACED_BURST_RTTS``). Pacing only the transfers of one such product or more, over a
second, paced group, measured no better over the lab's grid (60 of 72 points within 10%, against 61 with every
connection paced, before the model had the burst: each size's connections then start cold; docs/LOG.md).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import struct
import sys
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from geotrain.clock import REAL_CLOCK, Clock

__all__ = ["MODES", "SO_MAX_PACING_RATE", "UNCAPPED", "pace", "paced", "tcp_connections"]

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


MODES = ("link", "uncapped", "off")
"""How a run paces its connections between sites (``comm.tcp_pacing``): each at ``PACED_LINK_SHARE`` of its
link's rate, where the link is real and known (else uncapped); uncapped; or not at all."""

PEER_WAIT_S = 10.0
"""How long :func:`paced` waits, in all, for the other members' endpoints before it leaves the connections to
the missing ones uncapped."""


def _endpoints(fds: Iterable[int]) -> dict[int, tuple[str, tuple]]:
    """For each connected TCP socket among ``fds``: its own endpoint as text, and its peer's (host, port)."""
    found = {}
    for fd in fds:
        s = _connection(fd)
        if s is None:
            continue
        with s, contextlib.suppress(OSError):
            found[fd] = (json.dumps(list(s.getsockname()[:2])), tuple(s.getpeername()[:2]))
    return found


def _owners(store: Any, key: str, me: int, size: int, clock: Clock) -> dict[tuple, int]:
    """Which member owns each connection endpoint the others published under ``key``/``j``; members that have
    not published within ``PEER_WAIT_S`` are left out."""
    owners: dict[tuple, int] = {}
    deadline = clock.now() + PEER_WAIT_S
    for j in range(size):
        if j == me:
            continue
        try:
            store.wait([f"{key}/{j}"], datetime.timedelta(seconds=max(0.0, deadline - clock.now())))
            mine = json.loads(store.get(f"{key}/{j}"))
        except Exception:  # a member that left before publishing: its connections stay uncapped
            continue
        owners.update({tuple(endpoint): j for endpoint in mine})
    return owners


def paced(open_connections: Callable[[], T], *, mode: str = "uncapped", rate_to: Callable[[int], int | None] | None
          = None, store: Any = None, key: str = "pacing", me: int = 0, size: int = 1, clock: Clock = REAL_CLOCK) -> T:
    """Call ``open_connections`` (which connects a process group of ``size`` members, say) and pace the TCP
    connections it opened: the sockets among this process's descriptors after the call that were not there
    before it. ``mode`` (:data:`MODES`): with "link", member ``me`` publishes its connections' endpoints in
    ``store`` under ``key``/``me``, learns which member is at the other end of each connection from the others'
    (it waits up to ``PEER_WAIT_S`` for them), and caps a connection to member ``j`` at ``rate_to(j)`` bytes per
    second (None: uncapped). Every member of the group must call it with the same mode and key."""
    if mode not in MODES:
        raise ValueError(f"pacing mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off":
        return open_connections()
    before = _fds()
    result = open_connections()
    opened = _fds() - before
    if mode == "uncapped" or rate_to is None or store is None:
        pace(opened)
        return result
    ends = _endpoints(opened)
    store.set(f"{key}/{me}", json.dumps([json.loads(local) for local, _ in ends.values()]))
    owners = _owners(store, key, me, size, clock)
    for fd, (_, peer) in ends.items():
        j = owners.get(peer)
        rate = rate_to(j) if j is not None else None
        pace([fd], UNCAPPED if rate is None else min(int(rate), UNCAPPED))
    return result
