"""``summary.json``: its fields, built once from the sites' records, and the run's predicted utilization.

The launcher builds a run's summary from the record files the sites wrote (``OUT/sites/siteK.jsonl``); the
report rebuilds the same figures from ``metrics.jsonl`` when a summary is missing or partial. Both call
:func:`run_figures`, so the two cannot disagree. Works on whatever the sites managed to write, so an
interrupted or failed run still gets a valid partial summary (``ok: false``).

Every emulated run also checks the planner's timing model: ``predicted_utilization`` comes from the
algorithm's own definition (``geotrain.algorithms.timing.predict_run``) with the run's measured compute per
step, and the calibration benchmark compares it with the measured ``utilization``. A run with ``[grid]`` or
``run.site_speeds`` takes it from the planner's step-by-step prediction under its power and speeds
(``geotrain.planner.power``). No torch here.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from geotrain.files import write_text_atomic

__all__ = [
    "build_summary",
    "measured_jitter",
    "measured_site_step_seconds",
    "measured_step_seconds",
    "merge_metrics",
    "predict_from_summary",
    "read_site_records",
    "run_figures",
    "site_processes",
]

_DONE_KEYS = ("tokens", "steps", "wan_bytes", "compute_seconds", "comm_seconds", "link_seconds", "wall_seconds",
              "eval_seconds", "utilization", "outer_rounds", "collectives", "peak_bandwidth_bps",
              "max_transfer_bytes", "round_compute_cv", "coordination_seconds", "failed_attempts", "steps_trained")
# Step records name their figures by short keys: (record key, summary key).
_STEP_KEYS = (("tokens", "tokens"), ("wan_bytes", "wan_bytes"), ("compute_s", "compute_seconds"),
              ("comm_s", "comm_seconds"), ("wall_s", "wall_seconds"), ("utilization", "utilization"),
              ("outer_rounds", "outer_rounds"))
# A run that models its sites' power adds these (absent otherwise). From a process's ``done`` record:
_POWER_DONE_KEYS = ("energy_mwh", "peak_power_mw", "throttled_seconds", "carbon_kg", "smoothing_mwh", "idle_seconds",
                    "powered_off_seconds")
# and from its latest ``step`` record when it has none: (record key, summary key).
_POWER_STEP_KEYS = (("energy_mwh", "energy_mwh"), ("throttled_s", "throttled_seconds"))


def read_site_records(out: Path, sites: int) -> dict[int, list[dict[str, Any]]]:
    records: dict[int, list[dict[str, Any]]] = {}
    for k in range(sites):
        path = out / "sites" / f"site{k}.jsonl"
        rows: list[dict[str, Any]] = []
        if path.is_file():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a killed process
                if isinstance(row, dict):
                    rows.append(row)
        records[k] = rows
    return records


def _last(rows: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    for r in reversed(rows):
        if r.get("kind") == kind:
            return r
    return None


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _segments(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """A site's records cut at each ``start`` (a process that joined, was healed or resumed); a resumed start
    supersedes the segments before it (the checkpoint's trajectory continues; their later steps were redone)."""
    segments: list[list[dict[str, Any]]] = [[]]
    for r in rows:
        if r.get("kind") == "start" and segments[-1]:
            segments = [[]] if r.get("resumed") else segments + [[]]
        segments[-1].append(r)
    return [seg for seg in segments if seg]


def _segment_tokens(rows: list[dict[str, Any]]) -> int:
    done = _last(rows, "done")
    if done is not None and _is_number(done.get("tokens")):
        return int(done["tokens"])
    step = _last(rows, "step")
    return int(step.get("trained_tokens") or 0) if step is not None else 0


def _site_figures(k: int, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One site's figures: from its ``done`` record (``complete: true``), else its latest ``step`` record.
    Tokens add up every process the site ran (one killed and started again trained in both)."""
    segments = _segments(rows)
    if len(segments) > 1:
        tokens = sum(_segment_tokens(seg) for seg in segments)
        entry = _site_figures(k, segments[-1])
        if entry is not None:
            entry["tokens"] = tokens
            entry["incarnations"] = len(segments)
        return entry
    done = _last(rows, "done")
    if done is not None:
        return {"site": k, "complete": True, **{key: done.get(key) for key in _DONE_KEYS}}
    steps = [r for r in rows if r.get("kind") == "step" and _is_number(r.get("step"))]
    if not steps:
        return None
    step = max(steps, key=lambda r: r["step"])  # the latest, even if lines were written out of order
    entry: dict[str, Any] = {"site": k, "complete": False, "steps": int(step["step"]) + 1}
    for src, dst in _STEP_KEYS:
        if _is_number(step.get(src)):
            entry[dst] = step[src]
    if "utilization" not in entry and entry.get("wall_seconds") and "compute_seconds" in entry:
        entry["utilization"] = entry["compute_seconds"] / entry["wall_seconds"]
    return entry


def site_processes(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """A site's records cut where a new process starts. A ``start`` record begins a new process unless it
    names the same ``pid`` as the one before it (a site that rejoined, after its power came back or a
    partition healed, goes on in the same process); a start without a pid continues the process only after a
    ``power_on``. Unlike :func:`_segments`, a resume does not drop what came before: the energy spent stays
    spent."""
    processes: list[list[dict[str, Any]]] = [[]]
    pid: Any = None
    powered_on = False
    for r in rows:
        kind = r.get("kind")
        if kind == "start":
            same = r.get("pid") == pid if r.get("pid") is not None and pid is not None else powered_on
            if processes[-1] and not same:
                processes.append([])
            pid, powered_on = r.get("pid"), False
        elif kind == "power_on":
            powered_on = True
        processes[-1].append(r)
    return [p for p in processes if p]


def _power_figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One site's power figures, empty for a site whose records model no power: each process's ``done``
    figures (:data:`_POWER_DONE_KEYS`), else its latest step's energy and throttled seconds, added up over the
    processes the site ran (each counts its own from zero). ``peak_power_mw`` is the highest of them. A figure
    some process did not record is null."""
    per_process = []
    for proc in site_processes(rows):
        done = _last(proc, "done")
        if done is not None and any(key in done for key in _POWER_DONE_KEYS):
            per_process.append({key: done.get(key) for key in _POWER_DONE_KEYS})
            continue
        steps = [r for r in proc if r.get("kind") == "step" and _is_number(r.get("step"))
                 and any(_is_number(r.get(src)) for src, _ in _POWER_STEP_KEYS)]
        if steps:
            step = max(steps, key=lambda r: r["step"])
            per_process.append({dst: step.get(src) for src, dst in _POWER_STEP_KEYS})
    if not per_process:
        return {}
    out: dict[str, Any] = {}
    for key in (k for k in _POWER_DONE_KEYS if any(k in p for p in per_process)):
        values = [p.get(key) for p in per_process]
        if not all(_is_number(v) for v in values):
            out[key] = None
        else:
            out[key] = max(values) if key == "peak_power_mw" else sum(values)
    return out


def run_figures(records: Mapping[int, list[dict[str, Any]]]) -> dict[str, Any]:
    """The figures the sites' records support, and only those (a key is absent rather than guessed):
    ``per_site`` and the totals over sites. ``records`` maps each site to its records in file order; site 0's
    hold the ``eval`` records."""
    per_site = [e for k, rows in sorted(records.items()) if (e := _site_figures(k, rows)) is not None]
    for e in per_site:
        e.update(_power_figures(records[e["site"]]))
    out: dict[str, Any] = {}
    if per_site:
        out["per_site"] = per_site

    def values(key: str) -> list[Any]:
        return [e[key] for e in per_site if _is_number(e.get(key))]

    for key in ("tokens", "wan_bytes"):
        if per_site and len(values(key)) == len(per_site):
            out[key] = int(sum(values(key)))
    for key, reduce in (("wall_seconds", max), ("peak_bandwidth_bps", max), ("max_transfer_bytes", max),
                        ("outer_rounds", min)):
        if values(key):
            out[key] = reduce(values(key))
    power_offs = sum(1 for rows in records.values() for r in rows if r.get("kind") == "power_off")
    if power_offs or any("energy_mwh" in e for e in per_site):  # the run models power
        out["power_offs"] = power_offs
        for key in ("energy_mwh", "carbon_kg"):
            if per_site and len(values(key)) == len(per_site):
                out[key] = sum(values(key))
    if per_site and len(values("utilization")) == len(per_site):
        out["utilization"] = sum(values("utilization")) / len(per_site)
    if values("steps"):
        out["steps"] = int(max(values("steps")))
    # the sites that finished hold the same global model; the lowest of them speaks for the run
    dones = [d for _, rows in sorted(records.items()) if (d := _last(rows, "done")) is not None]
    done0 = dones[0] if dones else {}
    evals = [r for rows in records.values() for r in rows if r.get("kind") == "eval" and _is_number(r.get("eval_loss"))]
    if done0.get("eval_loss") is not None:
        out["eval_loss"] = done0["eval_loss"]
    elif evals:
        out["eval_loss"] = max(evals, key=lambda r: (r.get("tokens") or 0, r.get("step") or 0))["eval_loss"]
    if done0:
        out["params_sha256"] = done0.get("params_sha256")
        out["stopped_early"] = bool(done0.get("stopped_early"))
        out["sites_in_sync"] = len({d.get("params_sha256") for d in dones}) == 1
    return out


def _rejected_updates(records: Mapping[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Updates the guards left out: every member records the same decision; each is listed once."""
    seen: dict[tuple[Any, Any], dict[str, Any]] = {}
    for _, rows in sorted(records.items()):
        for r in rows:
            if r.get("kind") == "rejected":
                key = (r.get("sync"), r.get("rejected_site"))
                seen.setdefault(key, {"site": r.get("rejected_site"), "round": r.get("round"), "sync": r.get("sync"),
                                      "step": r.get("step"), "reason": r.get("reason"), "norm": r.get("norm")})
    return sorted(seen.values(), key=lambda e: (e["sync"] or 0, e["site"] or 0))


def _membership(events: list[dict[str, Any]], t0: float | None) -> list[dict[str, Any]]:
    """The coordinator's events, each with ``wall``: seconds since the run started."""
    out = []
    for e in events:
        if e.get("kind") not in ("joined", "left", "rejoined", "healed"):
            continue
        entry = {"site": e.get("site"), "kind": e.get("kind"), "round": e.get("round"),
                 "wall": None if t0 is None or not _is_number(e.get("time")) else e["time"] - t0,
                 "healed_from": e.get("healed_from"), "seconds": e.get("seconds")}
        if e.get("reason"):
            entry["reason"] = e["reason"]
        out.append(entry)
    return out


def build_summary(
    config: dict[str, Any],
    records: dict[int, list[dict[str, Any]]],
    *,
    elapsed_seconds: float,
    ok: bool,
    interrupted: bool = False,
    error: str | None = None,
    membership: list[dict[str, Any]] | None = None,
    faults: list[dict[str, Any]] | None = None,
    started_at: float | None = None,
) -> dict[str, Any]:
    """The run's summary. Field names are a contract (see docs/architecture.md); add, never redefine.
    ``membership``: the coordinator's events; ``faults``: the faults the launcher carried out; their ``wall``
    counts from ``started_at`` (Unix seconds; the first site's start record when not given)."""
    run = config["run"]
    figures = run_figures(records)
    starts = [r["time"] for rows in records.values() for r in rows if r.get("kind") == "start" and _is_number(r.get("time"))]
    t0 = started_at if started_at is not None else (min(starts) if starts else None)
    known = {e["site"]: e for e in figures.get("per_site") or []}
    per_site = [known.get(k) or {"site": k, "complete": False, "tokens": 0, "wan_bytes": 0, "steps": 0}
                for k in sorted(records)]  # every site, those that left before their first record too
    start = next((r for _, rows in sorted(records.items()) for r in rows if r.get("kind") == "start"), {})
    settings = start.get("settings") or _configured_settings(config)
    summary = {
        "ok": ok,
        "interrupted": interrupted,
        "error": error,
        "algorithm": run["algorithm"],
        "sites": run["sites"],
        "workers_per_site": run["workers_per_site"],
        "tokens": figures.get("tokens", sum(int(s.get("tokens") or 0) for s in per_site)),
        "tokens_budget": run["tokens"],
        "eval_loss": figures.get("eval_loss"),
        "outer_rounds": figures.get("outer_rounds", 0),
        "wan_bytes": figures.get("wan_bytes", sum(int(s.get("wan_bytes") or 0) for s in per_site)),
        "wall_seconds": figures.get("wall_seconds"),
        "elapsed_seconds": elapsed_seconds,
        "utilization": figures.get("utilization"),
        "peak_bandwidth_bps": figures.get("peak_bandwidth_bps"),
        "max_transfer_bytes": figures.get("max_transfer_bytes", 0),
        "params_sha256": figures.get("params_sha256"),
        "stopped_early": figures.get("stopped_early", False),
        "steps": figures.get("steps", 0),
        # The algorithm's settings as the run used them (its start record), chosen ones included.
        "sync_every": settings.get("sync_every"),
        "fragments": settings.get("fragments"),
        "overlap_steps": settings.get("overlap_steps"),
        "overlap": settings.get("overlap"),
        "auto_settings": start.get("auto") or [],
        "codec": start.get("codec") or config["comm"]["codec"],  # the algorithm may choose it (sparseloco)
        "collective": start.get("collective"),
        "link": config["wan"]["link"],
        # "emulated": the WAN emulator charged each collective its modelled time; "netlab": the links were real
        # (geotrain run --network netlab), the emulator off.
        "network": start.get("network", "emulated"),
        "param_bytes": start.get("param_bytes"),
        "payload_bytes_per_sync": start.get("payload_bytes_per_sync"),
        "sync_payloads": start.get("sync_payloads"),
        "model_params": (start.get("meta") or {}).get("model_params"),
        "data": (start.get("meta") or {}).get("data"),
        "seed": run["seed"],
        "device": run.get("device", "cpu"),
        "precision": run.get("precision", "fp32"),
        "fsdp": run.get("fsdp", False),
        # The most device memory any site's worker 0 allocated at once (CUDA only; null on CPU).
        "peak_memory_bytes": max((d["peak_memory_bytes"] for rows in records.values() for d in rows
                                  if d.get("kind") == "done" and _is_number(d.get("peak_memory_bytes"))), default=None),
        # TensorBoard event files of the run, relative to its output directory (None without --tensorboard)
        "tensorboard": "tensorboard" if run.get("tensorboard") else None,
        "sites_in_sync": figures.get("sites_in_sync"),
        # A run that models its sites' power: energy and carbon of all sites (null unless every site has its
        # figure; per site in per_site) and how many times a site left because its power went to zero.
        "energy_mwh": figures.get("energy_mwh"),
        "carbon_kg": figures.get("carbon_kg"),
        "power_offs": figures.get("power_offs", 0),
        # Unix seconds at which every ``wall`` below starts counting (the report puts records on this clock).
        "started_at": t0,
        "membership": _membership(membership or [], t0),
        "rejected_updates": _rejected_updates(records),
        "failures": [{"site": r.get("site"), "message": r.get("message"),
                      "wall": None if t0 is None or not _is_number(r.get("time")) else r["time"] - t0}
                     for _, rows in sorted(records.items()) for r in rows if r.get("kind") == "error"],
        "warnings": [{"site": r.get("site"), "message": r.get("message")}
                     for _, rows in sorted(records.items()) for r in rows if r.get("kind") == "warning"],
        "faults": [{**{k: f.get(k) for k in ("spec", "action", "site")},
                    "wall": None if t0 is None or not _is_number(f.get("time")) else f["time"] - t0}
                   for f in faults or []],
        "per_site": per_site,
        "config": config,
    }
    timing = predict_from_summary(summary)
    summary["predicted_utilization"] = None if timing is None else timing.utilization
    return summary


def _configured_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The algorithm's settings as the configuration gives them (a run that never started has no record of
    the ones it would have chosen)."""
    from geotrain.config import load_config
    from geotrain.errors import ConfigError

    try:
        cfg = load_config(values=dict(config))
    except (ConfigError, TypeError, ValueError):
        return {}
    return cfg.algorithm().describe(cfg)


# -- the run checks the planner's timing model -------------------------------------------------------------------


def measured_step_seconds(summary: Mapping[str, Any], *, per_site: bool = False) -> float | list[float]:
    """Compute seconds per inner step (``per_site[*].compute_seconds / steps``): the mean over the run's
    sites, or with ``per_site=True`` one figure per site."""
    from geotrain.errors import ConfigError

    sites = summary.get("per_site") or []
    steps = int(summary.get("steps") or 0)
    times = [float(s["compute_seconds"]) / steps for s in sites if steps > 0 and _is_number(s.get("compute_seconds"))]
    if not times or len(times) != len(sites):
        raise ConfigError("the run summary has no per-site compute times or no steps", field="per_site")
    return times if per_site else sum(times) / len(times)


def measured_jitter(summary: Mapping[str, Any]) -> float:
    """The run's spread of compute time between sync points: the mean over sites of
    ``per_site[*].round_compute_cv`` (0 when no site measured one)."""
    cvs = [float(s["round_compute_cv"]) for s in summary.get("per_site") or [] if _is_number(s.get("round_compute_cv"))]
    return sum(cvs) / len(cvs) if cvs else 0.0


def measured_site_step_seconds(summary: Mapping[str, Any]) -> list[float]:
    """Each site's compute seconds per inner step at full speed: ``per_site[k].compute_seconds`` over the steps
    that site's last process trained (``per_site[k].steps_trained``; its ``steps``, or the run's ``steps``,
    when the summary has no such figure). A site healed after an outage counts its compute and its steps from
    its return, so the quotient holds for it too. Held-back (throttled) time is not compute."""
    from geotrain.errors import ConfigError

    sites = summary.get("per_site") or []
    out = []
    for s in sites:
        steps = next((int(v) for v in (s.get("steps_trained"), s.get("steps"), summary.get("steps"))
                      if _is_number(v) and v > 0), 0)
        if steps < 1 or not _is_number(s.get("compute_seconds")) or s["compute_seconds"] <= 0:
            raise ConfigError("the run summary has no compute time or no steps for a site", field="per_site")
        out.append(float(s["compute_seconds"]) / steps)
    if not out:
        raise ConfigError("the run summary has no per-site compute times", field="per_site")
    return out


def predict_from_summary(summary: Mapping[str, Any], *, step_seconds: list[float] | None = None,
                         jitter: float | None = None) -> Any:
    """What the planner predicts for the emulated run ``summary`` describes: the one entry point for setting a
    finished run beside its prediction. Both predictions take from the summary the run's configuration
    (``config``), the settings it chose itself (``auto_settings``), the values of each sync as its strategy sent
    them (``sync_payloads``) and its inner steps (``steps``).

    * A run whose configuration paces its sites (``[grid]`` on, or ``run.site_speeds``) is played step by step
      under its power and speeds (``geotrain.planner.power.predict_power_run``), from each site's measured
      compute per inner step at full speed (:func:`measured_site_step_seconds`:
      ``per_site[k].compute_seconds / per_site[k].steps_trained``). It returns a
      ``geotrain.planner.power.PowerPrediction``: ``wall_seconds``, ``utilization``, ``tokens``, and per site
      ``tokens``, ``throttled_seconds``, ``utilization``, ``energy_mwh``, ``peak_mw``, ``carbon_kg``, to set beside
      the summary's ``wall_seconds``, ``utilization``, ``tokens``, ``energy_mwh`` and ``per_site``. This covers
      one site and runs without an emulated link too; an algorithm it does not cover (Streaming DiLoCo) falls
      back to the timing model below.
    * Otherwise the timing model (``geotrain.algorithms.timing.predict_run``) from each site's measured
      compute per step (``per_site[*].compute_seconds / steps``, the slowest gating every synchronous point)
      and the spread between sync points (``jitter``: the mean of ``per_site[*].round_compute_cv``), and
      whether a wall-time budget stopped the run (``stopped_early``): a ``RunTiming``, or None for a run
      without an emulated link or with one site.

    ``step_seconds`` and ``jitter`` replace the measured figures. None also when the summary lacks the
    measurements (a run that failed early)."""
    from geotrain.algorithms.timing import predict_run
    from geotrain.config import load_config
    from geotrain.errors import ConfigError

    tree = summary.get("config")
    if not isinstance(tree, dict):
        return None
    try:
        config = load_config(values={k: v for k, v in tree.items()})
        # the settings the run chose itself, as its start record says
        chosen = {a["key"]: a["value"] for a in summary.get("auto_settings") or [] if isinstance(a, dict)}
        config = config.updated(chosen) if chosen else config
        steps = int(summary.get("steps") or 0)
        if steps < 1:
            return None
        from geotrain.planner.power import models_power, predict_power_run

        if models_power(config):
            per_site = step_seconds if step_seconds is not None else measured_site_step_seconds(summary)
            try:
                return predict_power_run(config, step_seconds=per_site, payloads=summary.get("sync_payloads"),
                                         steps=steps)
            except ConfigError as e:
                if e.field != "run.algorithm":
                    raise
        if (summary.get("sites") or 0) < 2 or not config.topology().emulated:
            return None
        per_site = step_seconds if step_seconds is not None else measured_step_seconds(summary, per_site=True)
        return predict_run(config, payloads=summary.get("sync_payloads"), steps=steps, step_seconds=per_site,
                           jitter=measured_jitter(summary) if jitter is None else jitter,
                           stopped_early=bool(summary.get("stopped_early")))
    except ConfigError:
        return None  # a run without the measurements (one that failed early)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a summary from another version: no prediction
        print(f"warning: no predicted utilization for this run ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def merge_metrics(out: Path, records: dict[int, list[dict[str, Any]]]) -> None:
    """All sites' records in one file, ordered by time."""
    rows = [r for site_rows in records.values() for r in site_rows]
    rows.sort(key=lambda r: r.get("time", 0.0))
    write_text_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
