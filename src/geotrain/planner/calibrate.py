"""Predict the utilization of one of geotrain's own emulated runs, to check the planner against measurements.

An emulated run charges every cross-site collective the analytic time of ``geotrain.wan.model`` over the
run's link, with the workers of a site sharing that site's link (``streams = workers_per_site``). Given the
demo model's measured compute time per inner step, the planner predicts the run's utilization with the same
timing rules it uses for datacenters (``geotrain.planner.model.sync_period``):

* ddp: one all-reduce of ``param_bytes`` per inner step;
* diloco (arXiv 2311.08105): one all-reduce of ``payload_bytes_per_sync`` every H inner steps;
* streaming (arXiv 2501.18512): one all-reduce of ``payload_bytes_per_sync / fragments`` per fragment,
  each fragment once every H inner steps.

Predicted utilization = mean site compute / (slowest site compute + exposed communication), with the end of
the run included: an overlapped transfer still on the link when the run stops is exposed, and Streaming
DiLoCo's last step syncs every fragment at once. The overhead of the real transport under the emulation (gloo
on loopback, codec time) is left out, so predictions are slightly optimistic for tiny steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from geotrain.errors import ConfigError
from geotrain.planner.model import AlgorithmSpec, sync_period
from geotrain.topology import Topology, parse_link
from geotrain.wan.model import ring_all_gather, ring_all_reduce

__all__ = ["SUMMARY_KEYS", "measured_step_seconds", "predict_run"]

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


def measured_step_seconds(summary: Mapping, *, slowest: bool = False) -> float:
    """Compute seconds per inner step (``per_site[*].compute_seconds / steps``): the mean over the run's
    sites, or with ``slowest=True`` the slowest site's, which gates every synchronous point."""
    per_site = _get(summary, "per_site")
    steps = int(_get(summary, "steps"))
    if not per_site or steps < 1:
        raise ConfigError("the run summary has no per-site compute times or no steps", field="per_site")
    computes = [float(s["compute_seconds"]) for s in per_site]
    return (max(computes) if slowest else sum(computes) / len(computes)) / steps


def predict_run(summary: Mapping, *, step_seconds: float, slowest_step_seconds: float | None = None) -> dict:
    """Predict the utilization of the emulated run described by ``summary`` at ``step_seconds`` per inner step.

    ``slowest_step_seconds`` (default ``step_seconds``) is the slowest site's step time: every synchronous
    point waits for that site, so it sets the wall time, and the mean site computes ``step_seconds`` of it,
    as the planner's heterogeneous sites do. Returns the prediction and its parts: ``predicted_utilization``, ``compute_seconds`` (per site),
    ``comm_seconds_per_sync``, ``syncs``, ``exposed_comm_seconds``, ``predicted_wall_seconds``, and, when the
    summary holds a measured ``utilization``, ``measured_utilization`` and ``difference_points``
    (predicted minus measured, in percentage points).
    """
    times = {"step_seconds": step_seconds}
    if slowest_step_seconds is not None:
        times["slowest_step_seconds"] = slowest_step_seconds
    for field_name, value in times.items():
        if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
            raise ConfigError(f"must be a positive number of seconds, got {value!r}", field=field_name)
    gate = max(times.values())
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
    compute = steps * step_seconds
    period_compute = alg.period_steps * gate
    exposed_per_sync = float(sync_period(alg, step_seconds=gate, comm_seconds=comm)) - period_compute
    exposed = syncs * exposed_per_sync
    if syncs > 0 and ((name == "diloco" and overlap) or (name == "streaming" and summary.get("stopped_early"))):
        # A run ends on a synchronised model: the transfer started at its last sync point has nothing left
        # to hide behind (DiLoCo's overlapped round; the fragment a time-budget stop finds on the link).
        exposed += comm - exposed_per_sync
    elif syncs > 0 and name == "streaming":
        # At the last step every fragment is synchronised at once, one after another, to end on one model.
        exposed += fragments * comm
    wall = steps * gate + exposed
    out = {
        "algorithm": name,
        "step_seconds": step_seconds,
        "slowest_step_seconds": gate,
        "compute_seconds": compute,
        "comm_seconds_per_sync": comm,
        "syncs": syncs,
        "exposed_comm_seconds": exposed,
        "predicted_wall_seconds": wall,
        "predicted_utilization": min(1.0, compute / wall) if wall > 0 else 1.0,
    }
    measured = summary.get("utilization")
    if measured is not None:
        out["measured_utilization"] = float(measured)
        out["difference_points"] = 100.0 * (out["predicted_utilization"] - float(measured))
    return out
