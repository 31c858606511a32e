"""How long a transfer may take: a deadline that follows its size and the links, not one figure for all.

``deadline = membership.transfer_floor_s + membership.transfer_margin x (predicted time over the links)``,
the prediction being the same collective cost the WAN emulator charges (``geotrain.topology``), over the run's
configured links (or ``membership.deadline_link`` where it emulates none: a real network). A 40 KB sync over
a fast link gets the floor; a 4 GB one over 1 Gbit/s gets minutes. Emulated transfers obey the same deadline.

The whole hierarchy, from the shortest wait to the longest (``MembershipConfig`` checks the order):

====================  =========================================================================
heartbeat_s           a worker tells the coordinator it is alive
heartbeat_timeout_s   a silent worker is dropped with its site (a closed connection: at once)
transfer deadline     a gloo transfer fails instead of waiting on a peer that hangs
quorum_timeout_s      members stop waiting at a sync for a site that is alive but stuck
join_timeout_s        a joiner waits to be admitted; every site waits for a coordinator to return
====================  =========================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from geotrain.topology import Topology, all_to_all, parse_link, point_to_point, ring_all_gather

__all__ = ["nominal_topology", "transfer_deadline"]


def nominal_topology(config: Any) -> Topology:
    """The links a run's deadlines and predictions assume: the configured ones, or ``membership.deadline_link``
    between every pair where none is emulated (a real network)."""
    topology = config.topology()
    if topology.emulated:
        return topology
    return Topology(topology.sites, default=parse_link(config.membership.deadline_link), names=topology.names)


def transfer_deadline(config: Any, members: list[int], *, streams: int = 1) -> Callable[[str, int], float]:
    """The deadline of a transfer of one pattern and payload size among ``members`` (site indices)."""
    topology = nominal_topology(config)
    ring, pairs = topology.ring(members), topology.pairs(members)
    floor, margin = config.membership.transfer_floor_s, config.membership.transfer_margin
    slowest = None
    for a in members:
        for b in members:
            link = topology.link(a, b) if a != b else None
            if link is not None and (slowest is None or link.bandwidth_bps < slowest.bandwidth_bps):
                slowest = link

    def deadline(pattern: str, nbytes: int) -> float:
        if pattern == "all_gather":
            seconds = ring_all_gather(nbytes, ring, streams=streams).seconds
        elif pattern == "point_to_point":
            seconds = point_to_point(nbytes, slowest, streams=streams).seconds
        else:
            seconds = all_to_all(nbytes, pairs, sites=len(members), streams=streams).seconds
        return floor + margin * seconds

    return deadline
