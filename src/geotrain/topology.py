"""The world a run lives in: sites, the wide-area links between them, and what a collective costs over them.

A *link* is a bandwidth (bits per second) and a one-way latency (seconds). Links are written the way
network engineers write them for ``tc``: ``10mbit/50ms``, ``1gbit/30ms``, ``2.5gbit/0.08s``. The string
``none`` means "no emulated link": collectives run at the speed of the real transport.

What a collective costs over those links (K sites, payload S bytes per site) is what geotrain's collectives
(``comm.transport.GlooTransport``: gloo's point-to-point messages over TCP) take, as the network lab measured
it (``benchmarks/netlab_bench.py``; the README's "Rehearsing a deployment in the network lab"):

* every message waits for its receiver to announce a buffer (one latency) before its bytes leave; they go on
  the wire with one set of TCP/IP headers per 1448-byte segment, and the last arrives a latency later;
* all-to-all of S cut into one chunk per site (the first half of geotrain's reduce-scatter pattern): every
  pair exchanges its chunks over its own link at the same time, so it lasts one message of S/K over the
  slowest pair; each site sends (K-1)/K * S bytes;
* ring all-gather of one payload per site: K-1 steps, each payload sent in two halves, every receive
  announced at the start, and a half passed on as soon as it has arrived; each site sends (K-1) * S bytes.
  geotrain's compressed all-reduce is an all-to-all of the encoded payload followed by an all-gather of one
  reduced chunk per site;
* geotrain's connections are paced (``geotrain.comm.pacing``), so what a site writes at once leaves over a
  quarter of a round trip at least (:data:`PACED_BURST_RTTS`, :func:`burst_seconds`).

``streams`` is the number of parallel workers of one site that share that site's link (workers per site):
each stream gets ``bandwidth / streams``.

What the model leaves out (the README's lab section has the figures): the rest of TCP's window. It assumes the
window lets every burst leave at the link's rate (or its paced quarter round trip), which holds for a
connection that kept its window over the idle before a sync and is paced: in the lab, with one round trip's
queue, 69 of 72 syncs of 16 KB-16 MB came within 10% (0.90-1.34x). Unpaced, a small burst leaves at once
(down to 0.82x) and a large one overflows the queue when both directions of a link carry a sync (up to 2.1x
at 100 Mbit/s, 1.5x at 10 Mbit/s, 3.6x after a retransmission timeout); a window that restarts after idle
(cubic's default) adds round trips of slow start.

This module is pure Python so that the planner, the WAN emulation, the transport's byte accounting and the
configuration share one parser, one notion of a link and one cost model without importing torch: emulation
and prediction cannot drift apart.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "CollectiveCost",
    "HEADER_BYTES",
    "LINK_PRESETS",
    "MSS_BYTES",
    "PACED_BURST_RTTS",
    "Link",
    "Topology",
    "all_to_all",
    "burst_seconds",
    "format_bandwidth",
    "format_latency",
    "message_seconds",
    "parse_bandwidth",
    "parse_latency",
    "parse_link",
    "point_to_point",
    "ring_all_gather",
    "serialise_seconds",
    "wire_bytes",
]

# Multipliers to bits per second. Only bit-based units: "bps" is ambiguous (tc reads it as bytes/s,
# most people read it as bits/s), so it is refused with a hint rather than guessed.
_BANDWIDTH_UNITS = {
    "bit": 1.0,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "tbit": 1e12,
}
_LATENCY_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}

# One way to match each number (no nested or overlapping repeats), so a long string that does not parse
# fails in linear time.
_NUMBER = r"((?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)"
_MAX_TEXT = 64
"""Longest link, bandwidth or latency text read (anything longer is no link)."""
_BW_RE = re.compile(_NUMBER + r"\s*([a-zA-Z]+)$")
_LAT_RE = re.compile(_NUMBER + r"\s*([a-zA-Z]*)$")


def parse_bandwidth(text: str | float, *, bare_bits: bool = False) -> float:
    """Parse ``10mbit``/``1gbit``/``500kbit`` (a trailing ``/s`` is allowed) into bits per second; a number, or
    with ``bare_bits`` a string without a unit (``1e10``), is bits per second. Raises ValueError with the fix."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not (math.isfinite(text) and text > 0):
            raise ValueError(f"bandwidth {text!r} must be a positive number of bits per second")
        return _in_range(float(text), text)
    s = str(text).strip().lower()
    if len(s) > _MAX_TEXT:
        raise ValueError(f"bandwidth {s[:20]!r}... is {len(s)} characters long; write one such as '100mbit'")
    if s.endswith("/s"):
        s = s[:-2]
    try:
        bare = float(s)
    except ValueError:
        bare = None
    if bare is not None:
        if not bare_bits:
            raise ValueError(f"bandwidth {text!r} has no unit; write one such as '100mbit' or '1gbit'")
        return parse_bandwidth(bare)
    if s.startswith("-"):
        raise ValueError(f"bandwidth {text!r} is negative; give a positive rate such as '100mbit'")
    m = _BW_RE.match(s)
    if not m:
        raise ValueError(
            f"cannot parse bandwidth {text!r}; write a number and a unit such as '100mbit', '1gbit' or '500kbit'"
        )
    value, unit = float(m.group(1)), m.group(2)
    if unit not in _BANDWIDTH_UNITS:
        hint = " ('bps' is ambiguous: write 'mbit' for megabits per second)" if unit.endswith("bps") else ""
        raise ValueError(
            f"unknown bandwidth unit {unit!r} in {text!r}{hint}; use one of {', '.join(_BANDWIDTH_UNITS)}"
        )
    bps = value * _BANDWIDTH_UNITS[unit]
    if not math.isfinite(bps) or bps <= 0:
        raise ValueError(f"bandwidth {text!r} must be positive, for example '100mbit'")
    return _in_range(bps, text)


def _in_range(bps: float, text: object) -> float:
    if not MIN_BANDWIDTH <= bps <= MAX_BANDWIDTH:
        raise ValueError(f"bandwidth {text!r} must lie between 1bit and 1000tbit (1 Pbit/s)")
    return bps


def parse_latency(text: str) -> float:
    """Parse ``50ms``/``0.05s``/``200us`` into seconds (one way). A bare number means milliseconds."""
    s = str(text).strip().lower()
    if len(s) > _MAX_TEXT:
        raise ValueError(f"latency {s[:20]!r}... is {len(s)} characters long; write one such as '50ms'")
    if s.startswith("-"):
        raise ValueError(f"latency {text!r} is negative; give a delay such as '50ms' (or '0ms')")
    m = _LAT_RE.match(s)
    if not m:
        raise ValueError(f"cannot parse latency {text!r}; write a delay such as '50ms', '0.05s' or '200us'")
    value, unit = float(m.group(1)), m.group(2) or "ms"
    if unit not in _LATENCY_UNITS:
        raise ValueError(f"unknown latency unit {unit!r} in {text!r}; use one of {', '.join(_LATENCY_UNITS)}")
    seconds = value * _LATENCY_UNITS[unit]
    if not math.isfinite(seconds):
        raise ValueError(f"latency {text!r} is not finite")
    return seconds


MIN_BANDWIDTH = 1.0
"""Slowest link read, bit/s: below it a sync's time overflows any useful figure."""
MAX_BANDWIDTH = 1e15
"""Fastest link read, bit/s (1 Pbit/s)."""
MAX_LATENCY = 3600.0
"""Longest one-way latency read, seconds."""


@dataclass(frozen=True, slots=True)
class Link:
    """One wide-area link: a rate in bits per second and a one-way latency in seconds."""

    bandwidth_bps: float
    """Usable rate of the link, in bits per second."""
    latency_s: float
    """One-way propagation delay, in seconds."""

    def __post_init__(self) -> None:
        if not (MIN_BANDWIDTH <= self.bandwidth_bps <= MAX_BANDWIDTH):
            raise ValueError(f"link bandwidth must lie between {MIN_BANDWIDTH:g} bit/s and {MAX_BANDWIDTH:g} bit/s "
                             f"(1 Pbit/s), got {self.bandwidth_bps!r} bit/s")
        if not (0 <= self.latency_s <= MAX_LATENCY):
            raise ValueError(f"link latency must lie between 0 and {MAX_LATENCY:g} s, got {self.latency_s!r} s")

    def __str__(self) -> str:
        return f"{format_bandwidth(self.bandwidth_bps)}/{format_latency(self.latency_s)}"


# One link between two sites: usable bandwidth of the pair and one-way latency. Each is a round figure for a
# link you can buy, chosen so the presets span the 1-400 Gbit/s and 1-75 ms range of links between datacenters.
LINK_PRESETS: dict[str, str] = {
    # Two datacenters in one metro area (< 100 km of fibre, ~5 us/km): a leased DWDM 400G wavelength.
    # 1 ms one-way covers the fibre and the optical/switching equipment.
    "metro": "400gbit/1ms",
    # Coast to coast in one country (~4,500 km of routed fibre): a leased 100G wave; ~30 ms one-way is the
    # usual half of a 60 ms round trip.
    "cross-country": "100gbit/30ms",
    # Across an ocean: a 10G wavelength or transit share on a submarine cable; ~75 ms one-way is half a
    # transatlantic-to-transpacific round trip.
    "intercontinental": "10gbit/75ms",
    # Public internet between two sites that buy commodity transit: a 1G port, ~50 ms one-way between regions.
    "internet": "1gbit/50ms",
}


def parse_link(text: str, *, presets: dict[str, str] | None = None) -> Link | None:
    """Parse ``BANDWIDTH/LATENCY`` (``10mbit/50ms``) or a preset name (``metro``, see ``LINK_PRESETS``) into a
    Link, or ``none`` into None (no emulation)."""
    presets = LINK_PRESETS if presets is None else presets
    s = str(text).strip()
    if len(s) > 2 * _MAX_TEXT:
        raise ValueError(f"link {s[:20]!r}... is {len(s)} characters long; write one such as '10mbit/50ms'")
    if s.lower() in ("none", "off", ""):
        return None
    if s.lower() in presets:
        return parse_link(presets[s.lower()], presets={})
    if "/" not in s:
        close = difflib.get_close_matches(s.lower(), list(presets), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"cannot parse link {text!r}{hint}; write BANDWIDTH/LATENCY such as '10mbit/50ms', a preset "
            f"({', '.join(presets)}), or 'none' to turn emulation off"
        )
    bw, _, lat = s.partition("/")
    return Link(bandwidth_bps=parse_bandwidth(bw), latency_s=parse_latency(lat))


def format_bandwidth(bps: float) -> str:
    for unit, scale in (("tbit", 1e12), ("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bps >= scale:
            return f"{bps / scale:g}{unit}"
    return f"{bps:g}bit"


def format_latency(seconds: float) -> str:
    if seconds == 0:
        return "0ms"
    if seconds < 1e-3:
        return f"{seconds * 1e6:g}us"
    return f"{seconds * 1e3:g}ms"


@dataclass(slots=True)
class Topology:
    """Sites and the links between them.

    Every pair of sites is joined by ``default`` unless ``overrides`` names that pair. ``default=None`` means
    the run is not emulated at all (real transport speed).
    """

    sites: int
    """Number of sites."""
    default: Link | None = None
    """Link used between any two sites without an override; None disables emulation."""
    overrides: dict[tuple[int, int], Link] = field(default_factory=dict)
    """Per-pair links, keyed by (lower site index, higher site index)."""
    names: list[str] = field(default_factory=list)
    """Human names of the sites ("site0", ... when not given)."""

    def __post_init__(self) -> None:
        if self.sites < 1:
            raise ValueError(f"a topology needs at least one site, got {self.sites}")
        if not self.names:
            self.names = [f"site{i}" for i in range(self.sites)]
        if len(self.names) != self.sites:
            raise ValueError(f"{len(self.names)} site names given for {self.sites} sites")
        normalised: dict[tuple[int, int], Link] = {}
        for (a, b), link in self.overrides.items():
            if a == b or not (0 <= a < self.sites and 0 <= b < self.sites):
                raise ValueError(f"link override ({a}, {b}) does not join two of the {self.sites} sites")
            normalised[(min(a, b), max(a, b))] = link
        self.overrides = normalised

    @property
    def emulated(self) -> bool:
        return self.default is not None or bool(self.overrides)

    def link(self, a: int, b: int) -> Link | None:
        """The link between sites ``a`` and ``b`` (symmetric)."""
        return self.overrides.get((min(a, b), max(a, b)), self.default)

    def ring(self, members: list[int] | None = None) -> list[Link | None]:
        """Links of the ring ``members[0] -> members[1] -> ... -> members[0]`` used by ring collectives."""
        order = list(range(self.sites)) if members is None else list(members)
        if len(order) < 2:
            return []
        return [self.link(order[i], order[(i + 1) % len(order)]) for i in range(len(order))]

    def pairs(self, members: list[int] | None = None) -> list[Link | None]:
        """The links between every two of ``members`` (all sites by default), as an all-to-all uses them."""
        order = list(range(self.sites)) if members is None else list(members)
        return [self.link(a, b) for i, a in enumerate(order) for b in order[i + 1:]]

    def slowed(self, factors: dict[int, float]) -> Topology:
        """This topology with the links of each site ``k`` in ``factors`` carrying ``factors[k]`` times fewer
        bits per second (a congested or throttled site; a pair of slowed sites takes the larger factor)."""
        factors = {k: f for k, f in factors.items() if f != 1.0}
        if not factors or not self.emulated:
            return self
        overrides = {}
        for a in range(self.sites):
            for b in range(a + 1, self.sites):
                link = self.link(a, b)
                f = max(factors.get(a, 1.0), factors.get(b, 1.0))
                if link is not None and f != 1.0:
                    link = Link(max(MIN_BANDWIDTH, link.bandwidth_bps / f), link.latency_s)
                if link is not None:
                    overrides[(a, b)] = link
        return Topology(self.sites, default=None, overrides=overrides, names=list(self.names))


# -- what a collective costs over the ring's links -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CollectiveCost:
    """What one collective costs a site: emulated seconds and payload bytes sent."""

    seconds: float
    """Emulated wall time of the collective over the links (0 when not emulated)."""
    bytes_sent: int
    """Bytes this site puts on the wire."""
    steps: int
    """Latency-bound steps of the pattern."""


MSS_BYTES = 1448
"""Payload bytes in one full TCP segment on an Ethernet-MTU path: 1500 less the IPv4 (20), TCP (20) and TCP
timestamp option (12) headers, Linux's default."""
HEADER_BYTES = 52
"""Headers each packet carries on the wire (IPv4, TCP, timestamps)."""
PACED_BURST_RTTS = 0.25
"""Round trips over which a paced connection spreads a burst, at least (geotrain paces its connections:
``geotrain.comm.pacing``). Linux paces a connection in slow start at twice its window per smoothed round trip,
and a connection that only ever sends bursts keeps a window of about twice the burst (it grows the window while
at least half of it is in use), so a burst leaves over a quarter of a round trip however small it is. In the
network lab (cubic, paced) this took the grid from 61 to 69 of 72 points within 10%; unpaced connections
send a small burst at once."""


PACED_LINK_SHARE = 0.95
"""Share of a link's rate at which ``comm.tcp_pacing = "link"`` has the kernel pace each connection over it, on a
real network. A sender that never outruns the link never overflows the bottleneck's queue; the 5% left free
carry the acknowledgements of the other direction's data (one 52-byte packet per one or two full segments) and
the timers' jitter. In the network lab (cubic, a one-round-trip queue) pacing at the full rate dropped no
packet either, yet the acknowledgements queued behind the data, cubic's hybrid slow start read the growing
round trip as congestion and left slow start early, and syncs of 16 KB-1 MB between 2 sites over 100mbit/10ms
took 1.31-2.15x; at 95% they took 0.99-1.06x (docs/LOG.md). The cost model charges the cap: a link carries
data at this share of its rate (:func:`serialise_seconds`), in emulated runs and plans too, as a deployment with
the default pacing would."""


def pacing_rate(link: Link, streams: int = 1) -> int:
    """Payload bytes per second at which a connection over ``link`` is paced when ``streams`` connections share
    it: ``PACED_LINK_SHARE`` of the link's rate less the headers (:func:`wire_bytes`), split evenly."""
    return max(1, int(PACED_LINK_SHARE * link.bandwidth_bps / 8 * MSS_BYTES / (MSS_BYTES + HEADER_BYTES) / streams))


def wire_bytes(nbytes: float) -> float:
    """What ``nbytes`` of payload occupy on the link: the payload and one set of headers per segment."""
    return nbytes + HEADER_BYTES * math.ceil(nbytes / MSS_BYTES)


def serialise_seconds(nbytes: float, link: Link, streams: int = 1) -> float:
    """Time a connection over ``link`` takes to put ``nbytes`` of payload (headers included) on the wire,
    ``streams`` sharing it, each paced at its share of ``PACED_LINK_SHARE`` of the link's rate."""
    return 8.0 * wire_bytes(nbytes) * streams / (PACED_LINK_SHARE * link.bandwidth_bps)


def burst_seconds(nbytes: float, link: Link, streams: int = 1) -> float:
    """Time a paced connection takes to put ``nbytes`` written at once on the wire: their serialisation, and at
    least ``PACED_BURST_RTTS`` of the link's round trip."""
    return max(serialise_seconds(nbytes, link, streams), PACED_BURST_RTTS * 2 * link.latency_s)


def message_seconds(nbytes: float, link: Link | None, *, streams: int = 1) -> float:
    """One gloo message of ``nbytes`` when sender and receiver post it at the same moment: gloo's TCP transport
    sends nothing until the receiver has announced its buffer, so the announcement crosses the link first (one
    latency), then the bytes leave as one paced burst (:func:`burst_seconds`) and the last one arrives a latency
    later."""
    if link is None or nbytes == 0:
        return 0.0
    return 2 * link.latency_s + burst_seconds(nbytes, link, streams)


def _ring_all_gather_seconds(nbytes: int, sites: int, link: Link, streams: int) -> float:
    """geotrain's ring all-gather (``GlooTransport.all_gather``): each payload travels in two halves, and every
    receive is announced at the start, so a neighbour may send from one latency on. Half ``i`` leaves once it is
    at the site (its own two at once, one paced burst: :func:`burst_seconds`; a forwarded one when it has
    arrived) and the half before it has left the link; it arrives a latency after it left."""
    halves = (nbytes // 2, nbytes - nbytes // 2)
    arrived: list[float] = []
    link_free = link.latency_s  # the neighbour's announcements
    for i in range(2 * (sites - 1)):
        start = max(arrived[i - 2] if i >= 2 else 0.0, link_free)
        link_free = start + serialise_seconds(halves[i & 1], link, streams)
        if i == 1:  # this site's own payload has left: no sooner than its burst allows
            link_free = max(link_free, link.latency_s + burst_seconds(nbytes, link, streams))
        arrived.append(link_free + link.latency_s)
    return arrived[-1]


def ring_all_gather(nbytes: int, links: Sequence[Link | None], *, streams: int = 1) -> CollectiveCost:
    """Ring all-gather where every site contributes a payload of ``nbytes``: K-1 steps, each site sending one
    payload per step to its ring neighbour, as geotrain runs it (:func:`_ring_all_gather_seconds`). A ring of
    unequal links lasts as long as it would with its slowest link everywhere."""
    k = len(links)
    if k < 2 or nbytes == 0:
        return CollectiveCost(0.0, 0, 0)
    steps = k - 1
    distinct = {link for link in links if link is not None}  # the recurrence once per kind of link
    seconds = max((_ring_all_gather_seconds(nbytes, k, link, streams) for link in distinct), default=0.0)
    return CollectiveCost(seconds, steps * nbytes, steps)


def all_to_all(nbytes: int, pairs: Sequence[Link | None], *, sites: int, streams: int = 1) -> CollectiveCost:
    """All-to-all of ``nbytes`` per site cut into one chunk per site (chunk j goes to site j): the first half of
    geotrain's reduce-scatter pattern. Every site announces all its receives, then sends every chunk, so each
    pair's chunks cross the pair's own link together, and the collective lasts as long as the slowest pair
    takes for one chunk.
    ``pairs``: the links between every two of the ``sites`` (``Topology.pairs``). Each site sends (K-1)/K x S."""
    if sites < 2 or nbytes == 0:
        return CollectiveCost(0.0, 0, 0)
    chunk = nbytes / sites
    seconds = max((message_seconds(chunk, link, streams=streams) for link in pairs), default=0.0)
    return CollectiveCost(seconds, int(round((sites - 1) * chunk)), 1)


def point_to_point(nbytes: int, link: Link | None, *, streams: int = 1) -> CollectiveCost:
    """One site sending ``nbytes`` to another over ``link`` (healing a joiner), ``streams`` sharing the link: one
    message (:func:`message_seconds`)."""
    if link is None or nbytes == 0:
        return CollectiveCost(0.0, nbytes, 1 if nbytes else 0)
    return CollectiveCost(message_seconds(nbytes, link, streams=streams), nbytes, 1)
