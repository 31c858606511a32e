"""Answers to the questions a planner asks, built on ``geotrain.planner.model.plan``.

* What bandwidth does each algorithm need to reach a target utilization? Utilization never falls when every
  link gets faster (the collective's time only shrinks), so a bisection on log-bandwidth finds the smallest
  rate that reaches the target, or reports that latency alone keeps the target out of reach.
* The smallest H (sync_every) or the mildest codec (most bits) that reaches the target at the given links.
* Utilization against bandwidth for each algorithm (a sweep), the data behind the plot.

The algorithm variants compared side by side follow DiLoCo (arXiv 2311.08105) and Streaming DiLoCo
(arXiv 2501.18512): ddp, diloco, diloco with the outer all-reduce overlapped with the next round, and
streaming with overlapped fragment syncs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from geotrain.errors import ConfigError
from geotrain.planner.model import AlgorithmSpec, PlanSpec, plan
from geotrain.planner.presets import CODECS, Codec, parse_bandwidth_text, parse_codec
from geotrain.topology import Link, Topology

__all__ = [
    "DEFAULT_CODEC_CANDIDATES",
    "DEFAULT_SYNC_EVERY_CANDIDATES",
    "Sweep",
    "bandwidth_needed",
    "compare_variants",
    "mildest_codec",
    "parse_sweep",
    "smallest_sync_every",
    "sweep",
    "with_bandwidth",
]

DEFAULT_SYNC_EVERY_CANDIDATES = (1, 5, 10, 25, 50, 100, 250, 500, 1000)
DEFAULT_CODEC_CANDIDATES = ("fp32", "bf16", "int8", "int4")

# Search range of the bisection: 1 kbit/s to 1 Pbit/s covers everything from a modem to a fibre bundle.
_BW_LO, _BW_HI = 1e3, 1e15


def with_bandwidth(spec: PlanSpec, *, bandwidth_bps: float) -> PlanSpec:
    """The same plan with every link set to ``bandwidth_bps``; each link keeps its own latency."""
    topo = spec.topology

    def relink(link: Link | None) -> Link:
        return Link(bandwidth_bps=bandwidth_bps, latency_s=0.0 if link is None else link.latency_s)

    new_topo = Topology(
        sites=topo.sites,
        default=relink(topo.default),
        overrides={pair: relink(link) for pair, link in topo.overrides.items()},
        names=list(topo.names),
    )
    return replace(spec, topology=new_topo)


def bandwidth_needed(spec: PlanSpec, *, target: float, rel_tol: float = 1e-4) -> float | None:
    """Smallest per-link bandwidth (bit/s) at which ``spec`` reaches ``target`` utilization.

    None when even 1 Pbit/s falls short: then latency or a slow site, not bandwidth, is the limit.
    """
    if not (0 < target <= 1):
        raise ConfigError(f"must be in (0, 1], got {target!r}", field="target_utilization")
    if len(spec.sites) < 2:
        return 0.0 if plan(spec).utilization >= target else None

    def reaches(bps: float) -> bool:
        return plan(with_bandwidth(spec, bandwidth_bps=bps)).utilization >= target * (1 - 1e-12)

    if not reaches(_BW_HI):
        return None
    if reaches(_BW_LO):
        return _BW_LO
    lo, hi = math.log(_BW_LO), math.log(_BW_HI)
    # Invariant: reaches(exp(hi)) and not reaches(exp(lo)).
    while hi - lo > rel_tol:
        mid = 0.5 * (lo + hi)
        if reaches(math.exp(mid)):
            hi = mid
        else:
            lo = mid
    return math.exp(hi)


def smallest_sync_every(
    spec: PlanSpec, *, target: float, candidates: Iterable[int] = DEFAULT_SYNC_EVERY_CANDIDATES
) -> int | None:
    """Smallest H among ``candidates`` at which the plan reaches ``target`` at its own links.

    A ddp plan is asked as diloco (H has no meaning for ddp); a streaming plan keeps its fragments and skips
    candidates smaller than them.
    """
    alg = spec.algorithm
    for h in sorted(set(candidates)):
        if alg.name == "streaming":
            if h < alg.fragments or h <= alg.overlap_steps:
                continue
            trial = replace(alg, sync_every=h)
        else:
            trial = AlgorithmSpec(name="diloco", sync_every=h, overlap=alg.overlap if alg.name == "diloco" else False)
        if plan(replace(spec, algorithm=trial)).utilization >= target:
            return h
    return None


def mildest_codec(
    spec: PlanSpec, *, target: float, candidates: Iterable[str | Codec] = DEFAULT_CODEC_CANDIDATES
) -> Codec | None:
    """The codec with the most bits (the least compression) that reaches ``target`` at the plan's links."""
    codecs = [c if isinstance(c, Codec) else parse_codec(c) for c in candidates]
    for codec in sorted(codecs, key=lambda c: -c.bits):
        if plan(replace(spec, codec=codec)).utilization >= target:
            return codec
    return None


def compare_variants(spec: PlanSpec) -> dict[str, PlanSpec]:
    """The four algorithms side by side, each with the plan's H, codec and links.

    ddp sends gradients in bf16 (the usual mixed-precision all-reduce) unless the plan itself is ddp.
    Streaming keeps the plan's fragments and tau when it is streaming, and otherwise uses 4 fragments and
    tau = 1, a setting Streaming DiLoCo reports as loss-neutral.
    """
    alg = spec.algorithm
    h = alg.sync_every if alg.name != "ddp" else 100
    ddp_codec = spec.codec if alg.name == "ddp" else CODECS["bf16"]
    if alg.name == "streaming":
        fragments, tau = alg.fragments, max(1, alg.hide_steps)
    else:
        fragments, tau = min(4, h), 1
    variants = {
        "ddp": replace(spec, algorithm=AlgorithmSpec(name="ddp"), codec=ddp_codec),
        "diloco": replace(spec, algorithm=AlgorithmSpec(name="diloco", sync_every=h)),
        "diloco+overlap": replace(spec, algorithm=AlgorithmSpec(name="diloco", sync_every=h, overlap=True)),
    }
    if tau < h:
        variants["streaming+overlap"] = replace(
            spec, algorithm=AlgorithmSpec(name="streaming", sync_every=h, fragments=fragments, overlap_steps=tau)
        )
    return variants


def parse_sweep(value: str | Sequence[object]) -> list[float]:
    """Bandwidths in bit/s from ``1gbit,10gbit,100gbit``, a list, or ``START:STOP:POINTS`` (log-spaced)."""
    if isinstance(value, str) and value.count(":") == 2:
        start_s, stop_s, n_s = value.split(":")
        start, stop = parse_bandwidth_text(start_s, field="sweep"), parse_bandwidth_text(stop_s, field="sweep")
        try:
            n = int(n_s)
        except ValueError:
            n = 0
        if n < 2 or n > 10_000:
            raise ConfigError(f"the number of points in {value!r} must be an integer from 2 to 10000", field="sweep")
        if stop <= start:
            raise ConfigError(f"in {value!r} the stop bandwidth must exceed the start", field="sweep")
        return [float(x) for x in np.geomspace(start, stop, n)]
    items = value.split(",") if isinstance(value, str) else list(value)
    points = [parse_bandwidth_text(str(v).strip() if isinstance(v, str) else v, field="sweep") for v in items if v != ""]
    if not points:
        raise ConfigError("give bandwidths such as '1gbit,10gbit' or a range '100mbit:1tbit:50'", field="sweep")
    return sorted(points)


@dataclass(kw_only=True, slots=True)
class Sweep:
    """Utilization of each algorithm variant at each bandwidth."""

    bandwidths_bps: list[float]
    utilization: dict[str, list[float]]
    """Variant name -> utilization at each bandwidth."""
    time_to_train_seconds: dict[str, list[float]]

    def to_dict(self) -> dict:
        return {
            "bandwidths_bps": list(self.bandwidths_bps),
            "utilization": {k: list(v) for k, v in self.utilization.items()},
            "time_to_train_seconds": {k: list(v) for k, v in self.time_to_train_seconds.items()},
        }


def sweep(variants: dict[str, PlanSpec], *, bandwidths_bps: Sequence[float]) -> Sweep:
    """Plan every variant at every bandwidth."""
    util: dict[str, list[float]] = {}
    ttt: dict[str, list[float]] = {}
    for name, spec in variants.items():
        results = [plan(with_bandwidth(spec, bandwidth_bps=bw)) for bw in bandwidths_bps]
        util[name] = [r.utilization for r in results]
        ttt[name] = [r.time_to_train_seconds for r in results]
    return Sweep(bandwidths_bps=list(bandwidths_bps), utilization=util, time_to_train_seconds=ttt)
