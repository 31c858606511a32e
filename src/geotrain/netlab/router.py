"""The lab's router: one process that forwards IP packets between the sites' TUN devices and applies each link.

Every site namespace has a TUN device ``wan0`` created by this process (so the devices vanish with it). A
packet read from site ``a``'s device and addressed to site ``b`` goes through the directed link ``a -> b``:

* a FIFO queue of ``queue_bytes``: a packet that finds the queue full is dropped (tail drop, as a router does);
* serialisation at ``bandwidth_bps``: the link carries one packet after another, each for ``8 x size / rate``;
* propagation: the packet is written to ``b``'s device ``latency_s`` after it left the queue;
* optionally random loss (``loss``, a probability per packet, from a seeded generator).

The kernel has no netem here, so delay is applied in user space: the packet sits in a heap ordered by its
delivery time. Sizes are IP packet sizes (headers included; the MTU bounds them), so TCP/IP header overhead,
acknowledgements and TCP's slow start all cost what they cost on a real link.

Faults act on the links here (``Conditions``): a partition drops every packet to or from a site, a slow site's
links carry a fraction of their rate. The owner sends them as lines on the router's stdin (``partition K``,
``heal K``, ``slow K FACTOR``).

This loop is the reference and the fallback: where a C compiler is found, the router opens the devices and then
replaces itself with ``forward.c`` (``geotrain.netlab.cforward``), which applies the same links with the same
arithmetic at over twice the rate (``lab.ROUTER_MEASURED_BPS``).

The router stops by itself when its owner process is gone (it polls at least every ``OWNER_POLL_S``, and the
end of its stdin says so at once) and on SIGTERM. It is started by :class:`geotrain.netlab.lab.Lab`; run as
``python -m geotrain.netlab.router CONFIG`` where CONFIG is a JSON file (see ``Lab._router_config``; its
``forwarder``, when set, is the compiled C data plane to hand over to). It prints
``ready`` once every device exists.
"""

from __future__ import annotations

import ctypes
import heapq
import json
import os
import random
import select
import signal
import sys
import time
from dataclasses import dataclass

from geotrain.netlab.ns import open_tun, setns

__all__ = ["forward", "main"]

OWNER_POLL_S = 0.5
"""Longest time between two checks that the owner still lives."""
MAX_READS_PER_WAKE = 256
"""Packets read from one device before the others get their turn (a bound on each pass)."""
MAX_WAIT_S = 0.2
"""Longest poll when nothing is due: the loop wakes at least this often."""
POLL_RESOLUTION_S = 0.001
"""epoll's timeout is whole milliseconds, rounded up; the last millisecond before a delivery is slept instead."""


@dataclass(slots=True)
class _Pipe:
    """One directed link: its settings, when its transmitter is next free, and counters."""

    bandwidth_bps: float
    latency_s: float
    loss: float
    queue_bytes: int
    busy_until: float = 0.0
    nominal_bps: float = 0.0
    """The link's configured rate (``bandwidth_bps`` is it divided by a ``slow`` factor)."""
    cut: bool = False
    """A partition: every packet offered is dropped."""
    packets: int = 0
    bytes: int = 0
    dropped: int = 0

    def admit(self, now: float, size: int, rng: random.Random) -> float | None:
        """The delivery time of a ``size``-byte packet offered at ``now``, or None when it is dropped."""
        backlog = max(0.0, self.busy_until - now) * self.bandwidth_bps / 8.0  # bytes still queued
        if self.cut or backlog + size > self.queue_bytes or (self.loss and rng.random() < self.loss):
            self.dropped += 1
            return None
        start = max(now, self.busy_until)
        self.busy_until = start + 8.0 * size / self.bandwidth_bps
        self.packets += 1
        self.bytes += size
        return self.busy_until + self.latency_s


@dataclass(slots=True)
class Conditions:
    """Faults on the lab's links: sites cut off (a partition) and sites whose links are slowed."""

    cut: set[int]
    slow: dict[int, float]

    def apply(self, command: str, pipes: dict[tuple[int, int], _Pipe]) -> None:
        """Take one command, ``partition K``, ``heal K`` or ``slow K FACTOR``, and set every pipe: a pipe is cut
        when either end is, and carries its rate divided by the larger factor of its ends (as
        ``Topology.slowed``). A packet already on the wire still arrives. ``forward.c`` takes the same commands."""
        words = command.split()
        if len(words) not in (2, 3) or not words[1].lstrip("-").isdigit():
            raise ValueError(f"expected OP SITE [FACTOR], got {command!r}")
        op, site = words[0], int(words[1])
        if op == "partition":
            self.cut.add(site)
        elif op == "heal":
            self.cut.discard(site)
        elif op == "slow":
            factor = float(words[2]) if len(words) == 3 else float("nan")
            if not factor >= 1.0:
                raise ValueError(f"a slow factor must be at least 1, got {command!r}")
            self.slow[site] = factor
        else:
            raise ValueError(f"unknown op {op!r}")
        for (a, b), pipe in pipes.items():
            pipe.cut = a in self.cut or b in self.cut
            pipe.bandwidth_bps = pipe.nominal_bps / max(self.slow.get(a, 1.0), self.slow.get(b, 1.0))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def forward(fds: list[int], pipes: dict[tuple[int, int], _Pipe], *, prefix: bytes, owner: int,
            seed: int = 0, stop: list[bool] | None = None, control: int | None = None) -> None:
    """Forward packets between the sites' devices until ``owner`` is gone or ``stop[0]`` is set.

    ``prefix``: the first three bytes of every site's address; site ``k`` is ``prefix + bytes([k + 1])``.
    ``control``: a descriptor of commands, one a line (``Conditions.apply``); each is answered on stdout with
    ``ok`` or ``error: ...``. Its end (the owner closed it) stops the router."""
    stop = [False] if stop is None else stop
    rng = random.Random(seed)
    conditions = Conditions(cut=set(), slow={})
    pending = b""
    poller = select.epoll()
    if control is not None:
        poller.register(control, select.EPOLLIN)
    site_of = {}
    for k, fd in enumerate(fds):
        poller.register(fd, select.EPOLLIN)
        site_of[fd] = k
    due: list[tuple[float, int, int, bytes]] = []  # (delivery time, sequence, destination site, packet)
    seq = 0
    next_owner_check = time.monotonic() + OWNER_POLL_S
    n = len(fds)
    try:
        while not stop[0]:
            now = time.monotonic()
            while due and due[0][0] <= now:
                _, _, dst, packet = heapq.heappop(due)
                try:
                    os.write(fds[dst], packet)
                except OSError:  # the device is down or its queue is full: the packet is lost
                    pass
            if now >= next_owner_check:
                if not _alive(owner):
                    return
                next_owner_check = now + OWNER_POLL_S
            wait = MAX_WAIT_S if not due else min(MAX_WAIT_S, max(0.0, due[0][0] - now))
            if 0.0 < wait < POLL_RESOLUTION_S:  # epoll counts whole milliseconds, rounded up: sleep the rest
                events = poller.poll(0)
                if not events:
                    time.sleep(wait)
                    continue
            else:
                events = poller.poll(max(0.0, wait - POLL_RESOLUTION_S) if due else wait)
            for fd, _ in events:
                if fd == control:
                    chunk = os.read(control, 4096)
                    if not chunk:
                        return
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in filter(None, lines):
                        try:
                            conditions.apply(line.decode(errors="replace"), pipes)
                            print("ok", flush=True)
                        except ValueError as e:
                            print(f"error: {e}", flush=True)
                    continue
                src = site_of[fd]
                for _ in range(MAX_READS_PER_WAKE):
                    try:
                        packet = os.read(fd, 65535)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    if len(packet) < 20 or packet[0] >> 4 != 4 or packet[16:19] != prefix:
                        continue  # not IPv4 to a site (IPv6 neighbour discovery, say): not forwarded
                    dst = packet[19] - 1
                    if not 0 <= dst < n or dst == src:
                        continue
                    at = pipes[(src, dst)].admit(time.monotonic(), len(packet), rng)
                    if at is not None:
                        seq += 1
                        heapq.heappush(due, (at, seq, dst, packet))
    finally:
        poller.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0], encoding="utf-8") as f:
        cfg = json.load(f)
    owner = int(cfg["owner"])
    if sys.platform.startswith("linux"):  # die with the lab's owner even if it is SIGKILLed
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if not _alive(owner):
        return 1
    stop = [False]

    def on_term(signum: int, frame: object) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    fds = []
    for ns in cfg["namespaces"]:
        nsfd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            setns(nsfd)
            fds.append(open_tun(cfg["device"]))
        finally:
            os.close(nsfd)
            setns(home)
    os.close(home)
    if cfg.get("forwarder"):  # the C data plane takes over this process, its descriptors and its stdin/stdout
        for fd in fds:
            os.set_inheritable(fd, True)
        args = [cfg["forwarder"], str(owner), str(int(cfg.get("seed", 0))), *map(str, cfg["prefix"]), str(len(fds)),
                *map(str, fds), str(len(cfg["links"]))]
        for a, b, bw, lat, loss, queue in cfg["links"]:
            args += [str(int(a)), str(int(b)), repr(float(bw)), repr(float(lat)), repr(float(loss)), str(int(queue))]
        os.execv(args[0], args)
    pipes = {}
    for a, b, bw, lat, loss, queue in cfg["links"]:
        pipes[(a, b)] = _Pipe(bandwidth_bps=float(bw), latency_s=float(lat), loss=float(loss), queue_bytes=int(queue),
                              nominal_bps=float(bw))
    print("ready", flush=True)
    forward(fds, pipes, prefix=bytes(cfg["prefix"]), owner=owner, seed=int(cfg.get("seed", 0)), stop=stop,
            control=sys.stdin.fileno())
    stats = {f"{a}->{b}": {"packets": p.packets, "bytes": p.bytes, "dropped": p.dropped} for (a, b), p in pipes.items()}
    print(json.dumps({"router_stats": stats}), flush=True)
    for fd in fds:
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
