"""Build ``summary.json`` and ``metrics.jsonl`` from the sites' record files.

Works on whatever the sites managed to write, so an interrupted or failed run still gets a valid partial
summary (``ok: false``). No torch here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["read_site_records", "build_summary", "write_json_atomic", "merge_metrics"]


def read_site_records(out: Path, sites: int) -> dict[int, list[dict[str, Any]]]:
    records: dict[int, list[dict[str, Any]]] = {}
    for k in range(sites):
        path = out / "sites" / f"site{k}.jsonl"
        rows: list[dict[str, Any]] = []
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by a killed process
        records[k] = rows
    return records


def _last(rows: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    for r in reversed(rows):
        if r.get("kind") == kind:
            return r
    return None


def _site_figures(k: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    done = _last(rows, "done")
    if done is not None:
        keys = ("tokens", "steps", "wan_bytes", "compute_seconds", "comm_seconds", "link_seconds", "wall_seconds",
                "eval_seconds", "utilization", "outer_rounds", "collectives", "peak_bandwidth_bps",
                "max_transfer_bytes", "round_compute_cv")
        return {"site": k, "complete": True, **{key: done.get(key) for key in keys}}
    step = _last(rows, "step")
    if step is None:
        return {"site": k, "complete": False, "tokens": 0, "wan_bytes": 0, "steps": 0}
    return {
        "site": k,
        "complete": False,
        "tokens": step.get("tokens"),
        "steps": (step.get("step") or 0) + 1,
        "wan_bytes": step.get("wan_bytes"),
        "compute_seconds": step.get("compute_s"),
        "comm_seconds": step.get("comm_s"),
        "wall_seconds": step.get("wall_s"),
        "utilization": step.get("utilization"),
        "outer_rounds": step.get("outer_rounds"),
    }


def build_summary(
    config: dict[str, Any],
    records: dict[int, list[dict[str, Any]]],
    *,
    elapsed_seconds: float,
    ok: bool,
    interrupted: bool = False,
    error: str | None = None,
) -> dict[str, Any]:
    """The run's summary. Field names are a contract (see docs/architecture.md); add, never redefine."""
    run = config["run"]
    per_site = [_site_figures(k, rows) for k, rows in sorted(records.items())]
    site0 = records.get(0, [])
    start = _last(site0, "start") or {}
    done0 = _last(site0, "done") or {}
    last_eval = _last(site0, "eval")
    utils = [s["utilization"] for s in per_site if s.get("utilization") is not None]
    walls = [s["wall_seconds"] for s in per_site if s.get("wall_seconds") is not None]
    peaks = [s["peak_bandwidth_bps"] for s in per_site if s.get("peak_bandwidth_bps") is not None]
    eval_loss = done0.get("eval_loss") if done0 else (last_eval or {}).get("eval_loss")
    summary = {
        "ok": ok,
        "interrupted": interrupted,
        "error": error,
        "algorithm": run["algorithm"],
        "sites": run["sites"],
        "workers_per_site": run["workers_per_site"],
        "tokens": sum(int(s.get("tokens") or 0) for s in per_site),
        "tokens_budget": run["tokens"],
        "eval_loss": eval_loss,
        "outer_rounds": min((s.get("outer_rounds") or 0) for s in per_site) if per_site else 0,
        "wan_bytes": sum(int(s.get("wan_bytes") or 0) for s in per_site),
        "wall_seconds": max(walls) if walls else None,
        "elapsed_seconds": elapsed_seconds,
        "utilization": sum(utils) / len(utils) if utils else None,
        "peak_bandwidth_bps": max(peaks) if peaks else None,
        "max_transfer_bytes": max((s.get("max_transfer_bytes") or 0) for s in per_site) if per_site else 0,
        "params_sha256": done0.get("params_sha256"),
        "stopped_early": bool(done0.get("stopped_early")),
        "steps": done0.get("steps") or (per_site[0].get("steps") if per_site else 0),
        "sync_every": config["outer"]["sync_every"] if run["algorithm"] != "ddp" else 1,
        "fragments": config["streaming"]["fragments"] if run["algorithm"] == "streaming" else 1,
        "overlap_steps": config["streaming"]["overlap_steps"] if run["algorithm"] == "streaming" else 0,
        "overlap": bool(config["comm"]["overlap"]),
        "codec": config["comm"]["codec"],
        "collective": start.get("collective"),
        "link": config["wan"]["link"],
        "param_bytes": start.get("param_bytes"),
        "payload_bytes_per_sync": start.get("payload_bytes_per_sync"),
        "model_params": (start.get("meta") or {}).get("model_params"),
        "data": (start.get("meta") or {}).get("data"),
        "seed": run["seed"],
        "per_site": per_site,
        "config": config,
    }
    summary["predicted_utilization"] = _planner_prediction(summary)
    return summary


def _planner_prediction(summary: dict[str, Any]) -> float | None:
    """What the planner predicts for this run from its configuration and measured step times, so that every
    emulated run checks the planner (None without an emulated link or a finished measurement)."""
    if summary["link"] == "none" or summary["sites"] < 2 or not summary.get("steps"):
        return None
    if any(s.get("compute_seconds") is None for s in summary["per_site"]):
        return None
    from geotrain.errors import ConfigError
    from geotrain.planner.calibrate import measured_jitter, measured_step_seconds, predict_run

    try:
        return predict_run(summary, step_seconds=measured_step_seconds(summary, per_site=True),
                           jitter=measured_jitter(summary))["predicted_utilization"]
    except ConfigError:
        return None


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def merge_metrics(out: Path, records: dict[int, list[dict[str, Any]]]) -> None:
    """All sites' records in one file, ordered by time."""
    rows = [r for site_rows in records.values() for r in site_rows]
    rows.sort(key=lambda r: r.get("time", 0.0))
    tmp = out / "metrics.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, out / "metrics.jsonl")
