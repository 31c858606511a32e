"""WAN emulation as a wrapper around the cross-site transport.

The wrapped collective runs for real (gloo on loopback); the wrapper then holds the caller until the
collective has taken as long as the emulated links need for its traffic pattern (see ``geotrain.topology``):
the link adds whatever the real transfer did not already take. Moving the bytes over loopback stands for the
same bytes crossing the link, so it is not charged twice. Utilization measured under emulation is therefore
measured, not assumed. Transfers on one site's link are serialised: the transport is driven by one communication thread,
so a second transfer starts only when the first has left the link.

There is no netem on our machines, so delay is added in user space rather than by the kernel; the model is
per-collective (latency-bound steps plus serialisation of each chunk on the slowest ring link). The hold
runs on a :class:`geotrain.clock.Clock`: the real one in a run, a virtual one in tests, where a transfer
then lasts exactly its analytic time.
"""

from __future__ import annotations

import torch

from geotrain.clock import REAL_CLOCK, Clock
from geotrain.comm.transport import Traffic, Transport
from geotrain.topology import Topology, ring_all_gather, ring_all_reduce, ring_reduce_scatter

__all__ = ["EmulatedWan"]


class EmulatedWan:
    """A Transport that adds the emulated links' time to every accounted collective."""

    def __init__(self, inner: Transport, *, topology: Topology, members: list[int], streams: int = 1,
                 clock: Clock = REAL_CLOCK) -> None:
        self.inner = inner
        self.rank = inner.rank
        self.size = inner.size
        self.links = topology.ring(members)
        self.streams = streams
        self.clock = clock

    def _hold(self, traffic: Traffic, t0: float, seconds: float) -> Traffic:
        # The real transfer already took real_seconds of the link's time; the link adds the rest.
        traffic.emulated_seconds = max(0.0, seconds - traffic.real_seconds)
        self.clock.sleep_until(t0 + max(seconds, traffic.real_seconds))
        return traffic

    def all_reduce_sum(self, tensor: torch.Tensor) -> Traffic:
        t0 = self.clock.now()
        traffic = self.inner.all_reduce_sum(tensor)
        cost = ring_all_reduce(traffic.payload_bytes, self.links, streams=self.streams)
        return self._hold(traffic, t0, cost.seconds)

    def all_gather(self, payload: torch.Tensor) -> tuple[list[torch.Tensor], Traffic]:
        t0 = self.clock.now()
        out, traffic = self.inner.all_gather(payload)
        cost = ring_all_gather(traffic.payload_bytes, self.links, streams=self.streams)
        return out, self._hold(traffic, t0, cost.seconds)

    def all_to_all(self, payload: torch.Tensor) -> tuple[torch.Tensor, Traffic]:
        t0 = self.clock.now()
        out, traffic = self.inner.all_to_all(payload)
        cost = ring_reduce_scatter(traffic.payload_bytes, self.links, streams=self.streams)
        return out, self._hold(traffic, t0, cost.seconds)

    def control_sum(self, tensor: torch.Tensor) -> None:
        self.inner.control_sum(tensor)
