"""Analytic time and traffic of cross-site collectives over wide-area links.

Pure Python: the WAN emulation charges these times to real collectives, and the planner uses the same
functions to predict runs, so emulation and prediction cannot drift apart.

Traffic patterns (K sites, payload S bytes per site):

* ring all-reduce (reduce-scatter then all-gather): 2(K-1) steps; in each step every site sends one chunk of
  S/K bytes to its ring neighbour. Each site sends 2(K-1)/K * S bytes. A step lasts as long as the slowest
  link of the ring takes to carry one chunk: latency + chunk / bandwidth.
* ring all-gather of one payload per site: K-1 steps of one payload each; each site sends (K-1) * S bytes.
* reduce-scatter of a payload cut into K equal chunks (chunk j goes to site j): K-1 steps of one chunk each,
  as the first half of the ring all-reduce; each site sends (K-1)/K * S bytes. geotrain's compressed
  all-reduce is this followed by an all-gather of one reduced chunk per site, so it costs exactly what a ring
  all-reduce of the encoded payload costs.

``streams`` is the number of parallel workers of one site that share that site's link (workers per site):
each stream gets ``bandwidth / streams``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from geotrain.topology import Link

__all__ = ["CollectiveCost", "ring_all_reduce", "ring_all_gather", "ring_reduce_scatter"]


@dataclass(frozen=True, slots=True)
class CollectiveCost:
    """What one collective costs a site: emulated seconds and payload bytes sent."""

    seconds: float
    """Emulated wall time of the collective over the links (0 when not emulated)."""
    bytes_sent: int
    """Bytes this site puts on the wire."""
    steps: int
    """Latency-bound steps of the pattern."""


def _step_seconds(links: Sequence[Link | None], chunk_bytes: float, streams: int) -> float:
    worst = 0.0
    for link in links:
        if link is None:
            continue
        worst = max(worst, link.latency_s + 8.0 * chunk_bytes * streams / link.bandwidth_bps)
    return worst


def ring_all_reduce(nbytes: int, links: Sequence[Link | None], *, streams: int = 1) -> CollectiveCost:
    """Ring all-reduce of ``nbytes`` per site over the ring ``links`` (one link per ring hop)."""
    k = len(links)
    if k < 2 or nbytes == 0:
        return CollectiveCost(0.0, 0, 0)
    chunk = nbytes / k
    steps = 2 * (k - 1)
    sent = int(round(steps * chunk))
    return CollectiveCost(steps * _step_seconds(links, chunk, streams), sent, steps)


def ring_all_gather(nbytes: int, links: Sequence[Link | None], *, streams: int = 1) -> CollectiveCost:
    """Ring all-gather where every site contributes a payload of ``nbytes``."""
    k = len(links)
    if k < 2 or nbytes == 0:
        return CollectiveCost(0.0, 0, 0)
    steps = k - 1
    return CollectiveCost(steps * _step_seconds(links, nbytes, streams), steps * nbytes, steps)


def ring_reduce_scatter(nbytes: int, links: Sequence[Link | None], *, streams: int = 1) -> CollectiveCost:
    """Reduce-scatter of ``nbytes`` per site, cut into one chunk per site: K-1 steps of one chunk each."""
    k = len(links)
    if k < 2 or nbytes == 0:
        return CollectiveCost(0.0, 0, 0)
    chunk = nbytes / k
    steps = k - 1
    return CollectiveCost(steps * _step_seconds(links, chunk, streams), int(round(steps * chunk)), steps)
