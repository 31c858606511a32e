"""WAN emulation as a wrapper around the cross-site transport.

The wrapped collective runs for real (gloo on loopback); the wrapper then holds the caller until the
collective has taken as long as the emulated links need for its traffic pattern (see ``geotrain.topology``):
the link adds whatever the real transfer did not already take. Moving the bytes over loopback stands for the
same bytes crossing the link, so it is not charged twice. Utilization measured under emulation is therefore
measured, not assumed. Transfers on one site's link are serialised: the transport is driven by one communication thread,
so a second transfer starts only when the first has left the link.

There is no netem on our machines, so delay is added in user space rather than by the kernel; the model is
per-collective: gloo's messages over the links, each waiting for its receiver's announcement and carrying its
TCP/IP headers, the all-to-all's pairs at once on their own links and the all-gather around the ring
(``geotrain.topology``, calibrated in the network lab: ``benchmarks/netlab_bench.py``). The hold
runs on a :class:`geotrain.clock.Clock`: the real one in a run, a virtual one in tests, where a transfer
then lasts exactly its analytic time.

Emulated transfers obey the same deadlines as real ones: a transfer whose emulated time would pass its
deadline (a link slowed far below the one the deadlines assume) is held until the deadline and then fails,
as a real one would. The links come from ``topology()`` at each call, so a fault that slows a site's links
takes effect on the next transfer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from geotrain.clock import REAL_CLOCK, Clock
from geotrain.comm.transport import Deadline, Traffic, Transport
from geotrain.topology import CollectiveCost, Topology, all_to_all, point_to_point, ring_all_gather

__all__ = ["EmulatedWan", "TransferDeadlineExceeded"]


class TransferDeadlineExceeded(TimeoutError):
    """An emulated transfer would have outlasted its deadline."""


class EmulatedWan:
    """A Transport that adds the emulated links' time to every accounted collective."""

    def __init__(self, inner: Transport, *, topology: Callable[[], Topology], streams: int = 1,
                 clock: Clock = REAL_CLOCK, deadline: Deadline | None = None) -> None:
        self.inner = inner
        self.rank = inner.rank
        self.size = inner.size
        self.members = list(inner.members)
        self.topology = topology
        self.streams = streams
        self.clock = clock
        self.deadline = deadline

    @property
    def links(self) -> list:
        return self.topology().ring(self.members)

    def _hold(self, traffic: Traffic, t0: float, cost: CollectiveCost) -> Traffic:
        # The real transfer already took real_seconds of the link's time; the link adds the rest.
        seconds = max(cost.seconds, traffic.real_seconds)
        limit = None if self.deadline is None else self.deadline(traffic.pattern, traffic.payload_bytes)
        if limit is not None and seconds > limit:
            self.clock.sleep_until(t0 + limit)
            raise TransferDeadlineExceeded(
                f"a {traffic.pattern} of {traffic.payload_bytes:,} bytes over the emulated links would take "
                f"{seconds:.3g} s, past its deadline of {limit:.3g} s")
        traffic.emulated_seconds = max(0.0, cost.seconds - traffic.real_seconds)
        self.clock.sleep_until(t0 + seconds)
        return traffic

    def all_gather(self, payload: torch.Tensor) -> tuple[list[torch.Tensor], Traffic]:
        t0 = self.clock.now()
        out, traffic = self.inner.all_gather(payload)
        cost = ring_all_gather(traffic.payload_bytes, self.links, streams=self.streams)
        return out, self._hold(traffic, t0, cost)

    def all_to_all(self, payload: torch.Tensor) -> tuple[torch.Tensor, Traffic]:
        t0 = self.clock.now()
        out, traffic = self.inner.all_to_all(payload)
        cost = all_to_all(traffic.payload_bytes, self.topology().pairs(self.members), sites=self.size,
                          streams=self.streams)
        return out, self._hold(traffic, t0, cost)

    def _p2p(self, traffic: Traffic, t0: float, peer: int) -> Traffic:
        link = self.topology().link(self.members[self.rank], self.members[peer])
        return self._hold(traffic, t0, point_to_point(traffic.payload_bytes, link, streams=self.streams))

    def send(self, tensor: torch.Tensor, dst: int) -> Traffic:
        t0 = self.clock.now()
        return self._p2p(self.inner.send(tensor, dst), t0, dst)

    def recv(self, tensor: torch.Tensor, src: int) -> Traffic:
        t0 = self.clock.now()
        return self._p2p(self.inner.recv(tensor, src), t0, src)
