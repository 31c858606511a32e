"""Predict the utilization of one of geotrain's own emulated runs, to check the planner against measurements.

An emulated run charges every cross-site collective the analytic time of ``geotrain.wan.model`` over the
run's link, with the workers of a site sharing that site's link (``streams = workers_per_site``). Given the
demo model's measured compute time per inner step, the planner predicts the run's utilization with the same
timing rules it uses for datacenters (``geotrain.planner.model.sync_period``):

* ddp: one all-reduce of ``param_bytes`` per inner step;
* diloco (arXiv 2311.08105): one all-reduce of ``payload_bytes_per_sync`` every H inner steps;
* streaming (arXiv 2501.18512): one all-reduce of ``payload_bytes_per_sync / fragments`` per fragment,
  each fragment once every H inner steps.

Predicted utilization = mean site compute / (slowest site compute + exposed communication + straggler
waits), with the end of the run included: an overlapped transfer still on the link when the run stops is
exposed, and Streaming DiLoCo's last step syncs every fragment at once.

Straggler waits: at a blocking sync (every ddp step, every DiLoCo round without overlap, every Streaming
DiLoCo fragment with tau = 0) every site waits for the slowest *in that round*, and a site's compute time
varies from round to round even when its average matches the others'. With each site's round time lognormal
around its mean with the run's measured spread (``round_compute_cv``, the planner simulation's ``jitter``),
a blocking round costs E[max over sites] rather than the largest mean. Overlapped syncs absorb that spread
(a site that is ahead runs on within the overlap window), so they are charged the largest mean only. The
overhead of the real transport under the emulation (gloo on loopback, codec time) is left out, so
predictions are slightly optimistic for tiny steps.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import numpy as np

from geotrain.errors import ConfigError
from geotrain.planner.model import AlgorithmSpec, lognormal_sigma, sync_period
from geotrain.topology import Topology, parse_link
from geotrain.wan.model import ring_all_gather, ring_all_reduce

__all__ = ["SUMMARY_KEYS", "expected_slowest", "measured_jitter", "measured_step_seconds", "predict_run"]

SUMMARY_KEYS = (
    "algorithm",
    "sites",
    "workers_per_site",
    "sync_every",
    "fragments",
    "overlap_steps",
    "overlap",
    "link",
    "param_bytes",
    "payload_bytes_per_sync",
    "steps",
)
"""Keys of ``summary.json`` that ``predict_run`` reads; it also reads ``outer_rounds`` (diloco) and ``utilization``
when present."""


def _get(summary: Mapping, key: str, default=None):
    if key in summary and summary[key] is not None:
        return summary[key]
    if default is None:
        raise ConfigError(f"the run summary has no {key!r}; predict_run needs {', '.join(SUMMARY_KEYS)}", field=key)
    return default


def measured_step_seconds(summary: Mapping, *, per_site: bool = False) -> float | list[float]:
    """Compute seconds per inner step (``per_site[*].compute_seconds / steps``): the mean over the run's
    sites, or with ``per_site=True`` one figure per site."""
    sites = _get(summary, "per_site")
    steps = int(_get(summary, "steps"))
    if not sites or steps < 1:
        raise ConfigError("the run summary has no per-site compute times or no steps", field="per_site")
    times = [float(s["compute_seconds"]) / steps for s in sites]
    return times if per_site else sum(times) / len(times)


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def measured_jitter(summary: Mapping) -> float:
    """The run's spread of compute time between sync points: the mean over sites of
    ``per_site[*].round_compute_cv`` (0 when no site measured one)."""
    cvs = [float(s["round_compute_cv"]) for s in summary.get("per_site") or [] if s.get("round_compute_cv") is not None]
    return sum(cvs) / len(cvs) if cvs else 0.0


def expected_slowest(means: Sequence[float], cv: float) -> float:
    """E[max_k X_k] for independent lognormal X_k with means ``means`` and one coefficient of variation ``cv``:
    the expected wall time of a round that waits for the slowest of several sites; ``cv = 0`` gives
    ``max(means)``, and the result is never below it.

    E[max] is the integral over x > 0 of 1 - prod_k F_k(x). Below ``lo`` (9 sigma under the largest mean, in
    log space) the slowest site has not finished, so the integrand is 1; above ``hi`` (9 sigma over it) every
    site has. In between the integral is taken over u = log x on a uniform grid, which keeps its accuracy
    (about 1e-8 relative) from tiny spreads to cv of several."""
    top = max(means)
    if cv <= 0 or len(means) < 2 or top <= 0:
        return float(top)
    sigma = lognormal_sigma(cv)
    mid = math.log(top) - sigma * sigma / 2
    u = np.linspace(mid - 9 * sigma, mid + 9 * sigma, 4001)
    cdf = np.ones_like(u)
    for m in means:
        if m > 0:
            z = (u - (math.log(m) - sigma * sigma / 2)) / (sigma * math.sqrt(2.0))
            cdf *= 0.5 * (1.0 + _ERF(z).astype(float))
    f = (1.0 - cdf) * np.exp(u)
    integral = (u[1] - u[0]) * (f.sum() - 0.5 * (f[0] + f[-1]))
    return max(float(top), math.exp(u[0]) + float(integral))


_ERF = np.frompyfunc(math.erf, 1, 1)


def predict_run(summary: Mapping, *, step_seconds: float | Sequence[float], jitter: float = 0.0) -> dict:
    """Predict the utilization of the emulated run described by ``summary`` from its compute time per step.

    ``step_seconds`` is one figure for every site, or one per site (``measured_step_seconds(summary,
    per_site=True)``): the mean site computes the mean of them, and the slowest sets the pace of every
    synchronous point, as the planner's heterogeneous sites do. ``jitter`` is the coefficient of variation of a
    site's compute time between sync points (``measured_jitter(summary)``); blocking syncs pay for it. Returns
    the prediction and its parts: ``predicted_utilization``, ``step_seconds`` (mean), ``slowest_step_seconds``,
    ``compute_seconds`` (per site), ``comm_seconds_per_sync``, ``syncs``, ``exposed_comm_seconds``,
    ``straggler_seconds``, ``predicted_wall_seconds``, and, when the summary holds a measured ``utilization``,
    ``measured_utilization`` and ``difference_points`` (predicted minus measured, in percentage points).
    """
    per_site = list(step_seconds) if isinstance(step_seconds, (list, tuple)) else [step_seconds]
    if not per_site:
        raise ConfigError("needs at least one step time", field="step_seconds")
    for value in per_site:
        if not _real(value) or not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"must be a positive number of seconds, got {value!r}", field="step_seconds")
    if not _real(jitter) or not (jitter >= 0 and math.isfinite(jitter)):
        raise ConfigError(f"must be zero or positive, got {jitter!r}", field="jitter")
    per_site = [float(v) for v in per_site]
    mean_step = sum(per_site) / len(per_site)
    gate = max(per_site)
    name = str(_get(summary, "algorithm")).lower()
    sites = int(_get(summary, "sites"))
    streams = int(_get(summary, "workers_per_site", 1))
    steps = int(_get(summary, "steps"))
    h = int(_get(summary, "sync_every", 1)) if name != "ddp" else 1
    fragments = int(_get(summary, "fragments", 1)) if name == "streaming" else 1
    tau = int(_get(summary, "overlap_steps", 0)) if name == "streaming" else 0
    overlap = bool(_get(summary, "overlap", False))
    try:
        link = parse_link(str(_get(summary, "link", "none")))
    except ValueError as exc:
        raise ConfigError(str(exc), field="link") from None
    alg = AlgorithmSpec(name=name, sync_every=h, fragments=fragments, overlap_steps=tau, overlap=overlap)

    if name == "ddp":
        payload = float(_get(summary, "param_bytes"))
    else:
        payload = float(_get(summary, "payload_bytes_per_sync")) / fragments
    ring = Topology(sites=sites, default=link).ring()
    # The run's collective, as the emulator charged it: a ring all-reduce for fp32, and for a lossy codec
    # either an all-gather of whole encoded payloads or a reduce-scatter of encoded chunks followed by an
    # all-gather of one chunk, which costs exactly a ring all-reduce of the encoded payload. Summaries
    # written before the "collective" field existed used the all-gather for every lossy codec.
    collective = summary.get("collective") or ("all_reduce" if str(summary.get("codec", "fp32")) == "fp32"
                                               else "all_gather")
    pattern = ring_all_gather if collective == "all_gather" else ring_all_reduce
    comm = pattern(int(round(payload)), ring, streams=streams).seconds

    # Sync periods in the run: every step (ddp), every H steps (diloco), every H/P steps (streaming).
    if sites < 2:
        syncs = 0
    elif name == "ddp":
        syncs = steps
    elif name == "diloco" and summary.get("outer_rounds") is not None:
        syncs = int(summary["outer_rounds"])  # what the run did, final partial round included if it synced
    else:
        syncs = steps * fragments // h
    compute = steps * mean_step
    period_compute = alg.period_steps * gate
    exposed_per_sync = float(sync_period(alg, step_seconds=gate, comm_seconds=comm)) - period_compute
    exposed = syncs * exposed_per_sync
    # A blocking sync waits for the slowest site of that round; its spread, not only its mean, costs time.
    blocking = name == "ddp" or (name == "diloco" and not overlap) or (name == "streaming" and tau == 0)
    straggler = 0.0
    if blocking and syncs > 0 and jitter > 0:
        # The spread is measured between the loop's sync points (H steps for streaming); a fragment's period
        # is H/P steps, whose spread is sqrt(P) times larger if steps vary independently. A short last round
        # (DiLoCo's partial round) is left out.
        cv = jitter * math.sqrt(fragments) if name == "streaming" else jitter
        means = [alg.period_steps * t for t in per_site] if len(per_site) == sites else [period_compute] * sites
        full_periods = min(syncs, int(steps // alg.period_steps))
        straggler = full_periods * (expected_slowest(means, cv) - period_compute)
    if syncs > 0 and ((name == "diloco" and overlap) or (name == "streaming" and summary.get("stopped_early"))):
        # A run ends on a synchronised model: the transfer started at its last sync point has nothing left
        # to hide behind (DiLoCo's overlapped round; the fragment a time-budget stop finds on the link).
        exposed += comm - exposed_per_sync
    elif syncs > 0 and name == "streaming":
        # At the last step every fragment is synchronised at once, one after another, to end on one model.
        exposed += fragments * comm
    wall = steps * gate + exposed + straggler
    out = {
        "algorithm": name,
        "step_seconds": mean_step,
        "slowest_step_seconds": gate,
        "jitter": float(jitter),
        "compute_seconds": compute,
        "comm_seconds_per_sync": comm,
        "syncs": syncs,
        "exposed_comm_seconds": exposed,
        "straggler_seconds": straggler,
        "predicted_wall_seconds": wall,
        "predicted_utilization": min(1.0, compute / wall) if wall > 0 else 1.0,
    }
    measured = summary.get("utilization")
    if measured is not None:
        out["measured_utilization"] = float(measured)
        out["difference_points"] = 100.0 * (out["predicted_utilization"] - float(measured))
    return out
