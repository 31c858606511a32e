"""The world a run lives in: sites and the wide-area links between them.

A *link* is a bandwidth (bits per second) and a one-way latency (seconds). Links are written the way
network engineers write them for ``tc``: ``10mbit/50ms``, ``1gbit/30ms``, ``2.5gbit/0.08s``. The string
``none`` means "no emulated link": collectives run at the speed of the real transport.

This module is pure Python so that the planner, the WAN emulation and the configuration share one parser
and one notion of a link without importing torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

__all__ = [
    "Link",
    "Topology",
    "format_bandwidth",
    "format_latency",
    "parse_bandwidth",
    "parse_latency",
    "parse_link",
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

_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
_BW_RE = re.compile(_NUMBER + r"\s*([a-zA-Z]+)$")
_LAT_RE = re.compile(_NUMBER + r"\s*([a-zA-Z]*)$")


def parse_bandwidth(text: str) -> float:
    """Parse ``10mbit``/``1gbit``/``500kbit`` into bits per second. Raises ValueError with the fix."""
    s = str(text).strip().lower()
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
    return bps


def parse_latency(text: str) -> float:
    """Parse ``50ms``/``0.05s``/``200us`` into seconds (one way). A bare number means milliseconds."""
    s = str(text).strip().lower()
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


@dataclass(frozen=True, slots=True)
class Link:
    """One wide-area link: a rate in bits per second and a one-way latency in seconds."""

    bandwidth_bps: float
    """Usable rate of the link, in bits per second."""
    latency_s: float
    """One-way propagation delay, in seconds."""

    def __post_init__(self) -> None:
        if not (self.bandwidth_bps > 0 and math.isfinite(self.bandwidth_bps)):
            raise ValueError(f"link bandwidth must be positive, got {self.bandwidth_bps!r} bit/s")
        if not (self.latency_s >= 0 and math.isfinite(self.latency_s)):
            raise ValueError(f"link latency must be zero or positive, got {self.latency_s!r} s")

    def transfer_seconds(self, nbytes: float) -> float:
        """Time for one message of ``nbytes`` to cross this link: latency plus serialisation."""
        return self.latency_s + 8.0 * nbytes / self.bandwidth_bps

    def __str__(self) -> str:
        return f"{format_bandwidth(self.bandwidth_bps)}/{format_latency(self.latency_s)}"


def parse_link(text: str) -> Link | None:
    """Parse ``BANDWIDTH/LATENCY`` (``10mbit/50ms``) into a Link, or ``none`` into None (no emulation)."""
    s = str(text).strip()
    if s.lower() in ("none", "off", ""):
        return None
    if "/" not in s:
        raise ValueError(
            f"cannot parse link {text!r}; write BANDWIDTH/LATENCY such as '10mbit/50ms', or 'none' to turn emulation off"
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
