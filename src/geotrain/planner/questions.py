"""Answers to the questions a planner asks, built on ``geotrain.planner.model.plan``.

* What bandwidth does each algorithm need to reach a target utilization? With its settings fixed, utilization
  never falls when every link gets faster (the collective's time only shrinks), so a bisection on
  log-bandwidth finds the smallest rate that reaches the target, or reports that latency alone keeps the
  target out of reach. Settings the plan chooses (overlap, tau) are chosen once, at the plan's own links, and
  held: chosen anew at every bandwidth, overlap would switch off where a sync gets cheap and utilization
  could dip as the link gets faster.
* The smallest H (sync_every) or the mildest codec (most bits) that reaches the target at the given links.
* Utilization against bandwidth for each algorithm (a sweep), the data behind the plot.

The algorithm variants compared side by side follow DiLoCo (arXiv 2311.08105) and Streaming DiLoCo
(arXiv 2501.18512): ddp, diloco, diloco with the outer all-reduce overlapped with the next round, and
streaming with overlapped fragment syncs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from geotrain.config import RunConfig
from geotrain.errors import ConfigError
from geotrain.planner.model import PlanSpec, plan, resolve
from geotrain.topology import Link, Topology, parse_bandwidth

__all__ = [
    "Sweep",
    "bandwidth_needed",
    "compare_variants",
    "mildest_codec",
    "parse_sweep",
    "smallest_sync_every",
    "sweep",
    "with_bandwidth",
]

_DEFAULT_ALGORITHM = next(f.default for f in dataclasses.fields(RunConfig) if f.name == "algorithm")

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
        raise ConfigError(f"must be in (0, 1], got {target!r}", field="plan.target_utilization")
    spec, _ = resolve(spec)  # hold the chosen settings while the bandwidth moves
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


def smallest_sync_every(spec: PlanSpec, *, target: float, candidates: Iterable[int] | None = None) -> int | None:
    """Smallest H among ``candidates`` (``plan.sync_every_candidates``) at which the plan reaches ``target``
    at its own links.

    A plan whose algorithm has no H (ddp) is asked with the default algorithm; a streaming plan keeps its
    fragments and skips candidates it cannot use (fewer steps than fragments, or not more than tau).
    """
    config = spec.config
    candidates = config.plan.sync_every_candidates if candidates is None else candidates
    for h in sorted(set(candidates)):
        values: dict = {"outer.sync_every": h}
        if "outer.sync_every" not in spec.algorithm.settings:
            values |= {"run.algorithm": _DEFAULT_ALGORITHM, "comm.overlap": None}
        try:
            trial = spec.with_config(values)
        except ConfigError:
            continue  # an H this algorithm cannot take
        if plan(trial).utilization >= target:
            return h
    return None


def mildest_codec(spec: PlanSpec, *, target: float, candidates: Iterable[str] | None = None) -> str | None:
    """The codec with the most bits (the least compression) among ``candidates`` (``plan.codec_candidates``)
    that reaches ``target`` at the plan's links."""
    if spec.algorithm.own_codec:  # the method's payloads are its own (sparseloco): the only candidate
        return spec.codec.name if plan(spec).utilization >= target else None
    names = spec.config.plan.codec_candidates if candidates is None else list(candidates)
    bits = {name: spec.with_config({"comm.codec": name}).codec.bits_per_value() for name in names}
    for name in sorted(names, key=lambda n: -bits[n]):
        if plan(spec.with_config({"comm.codec": name})).utilization >= target:
            return name
    return None


def compare_variants(spec: PlanSpec) -> dict[str, PlanSpec]:
    """Every registered algorithm side by side, in the forms its definition lists
    (``Algorithm.compare_variants``: ddp with bf16 gradients, diloco with and without overlap, streaming with
    its fragments and tau), each with the plan's H, codec and links. A form the plan's settings cannot take
    (streaming with H below its fragments) is left out."""
    from geotrain.algorithms import algorithm_names, get_algorithm

    variants: dict[str, PlanSpec] = {}
    for name in algorithm_names():
        for label, values in get_algorithm(name).compare_variants(spec.config).items():
            try:
                variant = spec.with_config({"run.algorithm": name, **values})
                variant.algorithm.pattern(variant.config, variant.model.layout)  # fits the model
            except ConfigError:
                continue
            variants[label] = variant
    return variants


def parse_sweep(value: str | Sequence[object]) -> list[float]:
    """Bandwidths in bit/s from ``1gbit,10gbit,100gbit``, a list, or ``START:STOP:POINTS`` (log-spaced)."""
    if isinstance(value, str) and value.count(":") == 2:
        start_s, stop_s, n_s = value.split(":")
        start, stop = _bandwidth(start_s), _bandwidth(stop_s)
        try:
            n = int(n_s)
        except ValueError:
            n = 0
        if n < 2 or n > 1000:
            raise ConfigError(f"the number of points in {value!r} must be an integer from 2 to 1000", field="plan.sweep")
        if stop <= start:
            raise ConfigError(f"in {value!r} the stop bandwidth must exceed the start", field="plan.sweep")
        return [float(x) for x in np.geomspace(start, stop, n)]
    items = value.split(",") if isinstance(value, str) else list(value)
    points = [_bandwidth(str(v).strip() if isinstance(v, str) else v) for v in items if v != ""]
    if len(points) > 1000:
        raise ConfigError(f"holds {len(points)} bandwidths; give at most 1000", field="plan.sweep")
    if not points:
        raise ConfigError("give bandwidths such as '1gbit,10gbit' or a range '100mbit:1tbit:50'", field="plan.sweep")
    return sorted(points)


def _bandwidth(value: object) -> float:
    try:
        return parse_bandwidth(value, bare_bits=True)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ConfigError(str(exc), field="plan.sweep") from None


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
        spec, _ = resolve(spec)  # chosen settings held across the sweep (see bandwidth_needed)
        results = [plan(with_bandwidth(spec, bandwidth_bps=bw)) for bw in bandwidths_bps]
        util[name] = [r.utilization for r in results]
        ttt[name] = [r.time_to_train_seconds for r in results]
    return Sweep(bandwidths_bps=list(bandwidths_bps), utilization=util, time_to_train_seconds=ttt)
