"""Read a run directory (``summary.json`` + ``metrics.jsonl``) into plain Python, tolerantly.

A run directory may come from a run that finished, one stopped with Ctrl+C, or one that crashed mid-write, so
everything here degrades instead of raising:

- ``summary.json`` may be missing, unparsable or lack any key: :attr:`Run.summary` is then ``{}`` or partial,
  and :func:`derived_summary` rebuilds the headline figures from the metrics log.
- ``metrics.jsonl`` may end in a truncated line (the writer was killed mid-line) or contain garbage: such lines
  are counted in :attr:`Run.bad_lines` and skipped. Records of unknown ``kind`` are kept but never used.

Record kinds (one JSON object per line; see the report package docstring for the full field lists):
``step`` (per site, ``tokens``/``wan_bytes`` cumulative for that site), ``eval`` (global, ``tokens``/``wan_bytes``
cumulative over all sites) and ``sync`` (one per cross-site collective, ``bytes`` for that collective); for
membership, ``start`` (a site's process started), ``done``, ``rejected``, ``fault`` and ``error``.

:func:`membership_of` gathers what happened to the run's membership (the coordinator's events, rejected
updates, injected faults, failures) on one clock: seconds since the launch, ``summary.started_at``. A site
that left and came back starts its own ``wall_s`` again from zero, so only that clock can place it.

Series helpers return numpy arrays sorted by their x value, with non-finite y values dropped.

A run that models its sites' power adds figures to its ``step`` records (``power_mw``, ``cap_mw``,
``energy_mwh``, ``throttled_s``, ``grid_hours``, ``active``, ``speed``) and the kinds ``power_off`` and
``power_on``; :func:`power_series` gathers them per site, for the report's power figures and for anything else
that checks a run's energy (it takes records grouped by site, as ``geotrain.summary.read_site_records`` reads
them, so it needs no run directory).
"""

from __future__ import annotations

import copy
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "EVENT_KINDS",
    "Membership",
    "PowerSeries",
    "Run",
    "SiteTimes",
    "derived_summary",
    "eval_series",
    "global_tokens_at_steps",
    "logged_energy_mwh",
    "membership_of",
    "merged_summary",
    "power_series",
    "read_run",
    "records_by_site",
    "run_clock_series",
    "run_power",
    "run_status",
    "site_times",
    "sites_in",
    "step_series",
    "summed_curves",
    "total_wan_series",
    "wan_series",
]

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"

Status = Literal["ok", "partial", "failed"]


@dataclass(kw_only=True, slots=True)
class Run:
    """What a run directory holds, as read from disk. Treat it as read-only: indexes are cached on first use."""

    path: Path
    """The run directory."""
    summary: dict[str, Any] = field(default_factory=dict)
    """``summary.json`` as written; ``{}`` when it is missing or unreadable."""
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Metrics records grouped by ``kind``, each list in file order."""
    bad_lines: int = 0
    """Lines of ``metrics.jsonl`` that were not a JSON object (a truncated last line counts here)."""
    problems: list[str] = field(default_factory=list)
    """Human-readable notes on what was missing or unreadable, for the report to show."""
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)
    """Indexes and columns built on first use (a long run has millions of lines and the plots ask per site)."""

    def of_site(self, kind: str, site: int) -> list[dict[str, Any]]:
        """Records of ``kind`` for one site, in file order."""
        index = self._cache.get("by_site")
        if index is None:
            index = defaultdict(list)
            for k, recs in self.records.items():
                for rec in recs:
                    s = _site_of(rec)
                    if s is not None:
                        index[(k, s)].append(rec)
            index = self._cache["by_site"] = dict(index)
        return index.get((kind, site), [])

    def column(self, kind: str, site: int | None, key: str) -> np.ndarray:
        """Field ``key`` of the records of ``kind`` (of one site, or all when ``site`` is None) as floats.

        Missing and non-numeric values are NaN, so columns of one kind and site line up row by row.
        """
        cache_key = ("column", kind, site, key)
        col = self._cache.get(cache_key)
        if col is None:
            recs = self.records.get(kind, []) if site is None else self.of_site(kind, site)
            col = np.fromiter((_num_or_nan(r.get(key)) for r in recs), dtype=float, count=len(recs))
            self._cache[cache_key] = col
        return col

    @property
    def steps(self) -> list[dict[str, Any]]:
        return self.records.get("step", [])

    @property
    def evals(self) -> list[dict[str, Any]]:
        return self.records.get("eval", [])

    @property
    def syncs(self) -> list[dict[str, Any]]:
        return self.records.get("sync", [])


def read_run(run_dir: str | Path) -> Run:
    """Read ``run_dir``. Never raises for missing or damaged files; see :attr:`Run.problems`."""
    path = Path(run_dir)
    run = Run(path=path)

    summary_path = path / SUMMARY_FILE
    if summary_path.is_file():
        try:
            loaded = json.loads(summary_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            run.problems.append(f"{SUMMARY_FILE} could not be read ({exc.__class__.__name__}: {exc})")
        else:
            if isinstance(loaded, dict):
                run.summary = loaded
            else:
                run.problems.append(f"{SUMMARY_FILE} is not a JSON object")
    else:
        run.problems.append(f"{SUMMARY_FILE} is missing")

    metrics_path = path / METRICS_FILE
    records: dict[str, list[dict[str, Any]]] = defaultdict(list)
    if metrics_path.is_file():
        # errors="replace": a line cut inside a multi-byte character must not lose the whole file.
        with metrics_path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    run.bad_lines += 1
                    continue
                if not isinstance(obj, dict) or not isinstance(obj.get("kind"), str):
                    run.bad_lines += 1
                    continue
                records[obj["kind"]].append(obj)
        if run.bad_lines:
            run.problems.append(f"{METRICS_FILE}: skipped {run.bad_lines} unreadable line(s) (a truncated last line is normal after a crash)")
    else:
        run.problems.append(f"{METRICS_FILE} is missing")
    run.records = dict(records)
    return run


def _num(record: dict[str, Any], key: str) -> float | None:
    """A numeric field of a record, or None (bools and strings are not numbers here)."""
    v = record.get(key)
    if v is None or isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


def _site_of(record: dict[str, Any]) -> int | None:
    site = record.get("site")
    return site if isinstance(site, int) and not isinstance(site, bool) else None


def _num_or_nan(v: Any) -> float:
    if v is None or isinstance(v, bool) or not isinstance(v, int | float):
        return math.nan
    return float(v)


def sites_in(run: Run) -> list[int]:
    """Site indices that appear anywhere: in the summary's ``per_site``, or in step/sync records."""
    if "sites" in run._cache:
        return list(run._cache["sites"])
    found: set[int] = set()
    for entry in _per_site(run.summary):
        if isinstance(entry.get("site"), int):
            found.add(entry["site"])
    run.of_site("step", 0)  # builds the per-site index
    found.update(site for kind, site in run._cache["by_site"] if kind in ("step", "sync"))
    if not found:
        n = run.summary.get("sites")
        if isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 4096:
            found.update(range(n))
    run._cache["sites"] = sorted(found)
    return list(run._cache["sites"])


def _per_site(summary: dict[str, Any]) -> list[dict[str, Any]]:
    per_site = summary.get("per_site")
    if not isinstance(per_site, list):
        return []
    return [e for e in per_site if isinstance(e, dict)]


def _xy(pairs: list[tuple[float, float]], *, finite_y: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Pairs to two float arrays sorted by x (stable, so equal x keep file order)."""
    if finite_y:
        pairs = [(x, y) for x, y in pairs if math.isfinite(x) and math.isfinite(y)]
    if not pairs:
        return np.empty(0), np.empty(0)
    arr = np.asarray(pairs, dtype=float)
    order = np.argsort(arr[:, 0], kind="stable")
    return arr[order, 0], arr[order, 1]


def step_series(run: Run, site: int, *, x: str = "tokens", y: str = "loss") -> tuple[np.ndarray, np.ndarray]:
    """``y`` against ``x`` over one site's step records (for example loss against that site's tokens)."""
    return _sorted_finite(run.column("step", site, x), run.column("step", site, y))


def _sorted_finite(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows where both are finite, sorted by x (stable, so equal x keep file order)."""
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    order = np.argsort(x, kind="stable")
    return x[order], y[order]


def eval_series(run: Run, *, x: str = "tokens", y: str = "eval_loss") -> tuple[np.ndarray, np.ndarray]:
    """Held-out loss against ``x`` (``tokens`` over all sites, or ``wall_s``).

    A run whose log has no eval records but whose summary has a final ``eval_loss`` gets that one point,
    so a comparison still shows where it ended.
    """
    pairs = []
    for rec in run.evals:
        xv, yv = _num(rec, x), _num(rec, y)
        if xv is not None and yv is not None:
            pairs.append((xv, yv))
    if not pairs and y == "eval_loss":
        summary_x = {"tokens": "tokens", "wall_s": "wall_seconds"}.get(x)
        xv = _num(run.summary, summary_x) if summary_x else None
        yv = _num(run.summary, "eval_loss")
        if xv is not None and yv is not None:
            pairs.append((xv, yv))
    return _xy(pairs)


def global_tokens_at_steps(run: Run, site: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For one site's step records: (tokens over all sites at that moment, the site's loss, the site's wall_s).

    Step records carry the *site's* tokens while eval records carry tokens over *all* sites. To draw both on
    one axis, each step is placed at the sum over sites of the latest tokens each had logged by that wall time.
    Unlike multiplying by the number of sites, this stays right when sites run at different speeds. Without
    wall times it falls back to ``site tokens x sites``.
    """
    sites = sites_in(run)
    # Every site's (wall_s, tokens) history, sorted by time, to look up "latest tokens at time t".
    history = {s: step_series(run, s, x="wall_s", y="tokens") for s in sites}

    wall = run.column("step", site, "wall_s")
    tokens = run.column("step", site, "tokens")
    loss = run.column("step", site, "loss")
    keep = np.isfinite(tokens) & np.isfinite(loss)
    wall, tokens, loss = wall[keep], tokens[keep], loss[keep]
    if not tokens.size:
        return np.empty(0), np.empty(0), np.empty(0)

    if np.isnan(wall).any():
        total = tokens * max(len(sites), 1)
    else:
        total = np.zeros_like(tokens)
        for s, (hw, htok) in history.items():
            if s == site:
                total += tokens
                continue
            if hw.size == 0:
                continue
            # Keep the running maximum so an out-of-order line cannot make the total go backwards.
            htok = np.maximum.accumulate(htok)
            idx = np.searchsorted(hw, wall, side="right") - 1
            total += np.where(idx >= 0, htok[np.clip(idx, 0, None)], 0.0)
    order = np.argsort(total, kind="stable")
    return total[order], loss[order], wall[order]


def wan_series(run: Run, site: int, *, origin: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative WAN bytes sent by one site against wall time: the site's own ``wall_s``, or with ``origin``
    seconds since that Unix time (the run's clock, on which a site that started again goes on where it was).

    Sync records are preferred when the log has any: they are written at each collective, so the curve
    steps exactly when bytes moved. Otherwise the cumulative ``wan_bytes`` of step records is used.
    """
    if run.syncs:
        x, y = _sorted_finite(_clock(run, "sync", site, origin), run.column("sync", site, "bytes"))
        if x.size:
            return x, np.cumsum(y)
    x, y = _sorted_finite(_clock(run, "step", site, origin), run.column("step", site, "wan_bytes"))
    if x.size:
        y = np.maximum.accumulate(y)
    return x, y


def _clock(run: Run, kind: str, site: int | None, origin: float | None) -> np.ndarray:
    """The records' ``wall_s``, or with ``origin`` their ``time`` less it."""
    return run.column(kind, site, "wall_s") if origin is None else run.column(kind, site, "time") - origin


def run_clock_series(run: Run, kind: str, site: int | None, y: str, *, origin: float) -> tuple[np.ndarray, np.ndarray]:
    """``y`` of the records of ``kind`` (one site's, or all with ``site=None``) against seconds since ``origin``."""
    return _sorted_finite(_clock(run, kind, site, origin), run.column(kind, site, y))


def total_wan_series(run: Run, *, origin: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative WAN bytes over all sites against wall time (the sum of the per-site step curves)."""
    return summed_curves([wan_series(run, s, origin=origin) for s in sites_in(run)])


def summed_curves(curves: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The sum of cumulative curves (x sorted), at every x any of them has: each counts its latest value at
    that x, and nothing before its first."""
    curves = [c for c in curves if c[0].size]
    if not curves:
        return np.empty(0), np.empty(0)
    times = np.unique(np.concatenate([c[0] for c in curves]))
    total = np.zeros_like(times)
    for x, y in curves:
        idx = np.searchsorted(x, times, side="right") - 1
        total += np.where(idx >= 0, y[np.clip(idx, 0, None)], 0.0)
    return times, total


@dataclass(kw_only=True, slots=True)
class SiteTimes:
    """Where one site's wall time went."""

    site: int
    compute_seconds: float | None
    comm_seconds: float | None
    wall_seconds: float | None
    utilization: float | None
    source: Literal["summary", "metrics"]
    throttled_seconds: float | None = None
    """Steps held back to the speed of a slower or power-capped site (``train/pace.py``)."""
    """Whether the figures come from ``summary.json`` or from the site's last step record."""


def site_times(run: Run) -> list[SiteTimes]:
    """Compute / communication-wait / wall seconds per site, from the summary or else the metrics log."""
    out: dict[int, SiteTimes] = {}
    for entry in _per_site(run.summary):
        site = entry.get("site")
        if not isinstance(site, int):
            continue
        out[site] = SiteTimes(
            site=site,
            compute_seconds=_num(entry, "compute_seconds"),
            comm_seconds=_num(entry, "comm_seconds"),
            wall_seconds=_num(entry, "wall_seconds"),
            utilization=_num(entry, "utilization"),
            source="summary",
            throttled_seconds=_num(entry, "throttled_seconds"),
        )
    last = _last_step_per_site(run)
    for site in sites_in(run):
        rec = last.get(site)
        have = out.get(site)
        if rec is None:
            continue
        from_log = SiteTimes(
            site=site,
            compute_seconds=_num(rec, "compute_s"),
            comm_seconds=_num(rec, "comm_s"),
            wall_seconds=_num(rec, "wall_s"),
            utilization=_num(rec, "utilization"),
            source="metrics",
            throttled_seconds=_num(rec, "throttled_s"),
        )
        if have is None:
            out[site] = from_log
            continue
        # A partial summary entry keeps its own figures; only the gaps come from the log.
        for name in ("compute_seconds", "comm_seconds", "wall_seconds", "utilization", "throttled_seconds"):
            if getattr(have, name) is None:
                setattr(have, name, getattr(from_log, name))
    for st in out.values():
        # The contract defines utilization as (compute + throttled) / wall; derive it when only the parts were
        # written.
        if st.utilization is None and st.compute_seconds is not None and st.wall_seconds:
            st.utilization = (st.compute_seconds + (st.throttled_seconds or 0.0)) / st.wall_seconds
    return [out[s] for s in sorted(out)]


def _last_step_per_site(run: Run) -> dict[int, dict[str, Any]]:
    """Each site's step record with the highest step (the latest, even if lines were written out of order)."""
    if "last_step" in run._cache:
        return run._cache["last_step"]
    last: dict[int, dict[str, Any]] = {}
    for site in sites_in(run):
        recs = run.of_site("step", site)
        if not recs:
            continue
        steps = np.nan_to_num(run.column("step", site, "step"), nan=-1.0)
        # The last of the records with the highest step: argmax on the reversed array finds the last maximum.
        last[site] = recs[len(recs) - 1 - int(np.argmax(steps[::-1]))]
    run._cache["last_step"] = last
    return last


def records_by_site(run: Run) -> dict[int, list[dict[str, Any]]]:
    """Every record of the log that names its site, grouped by site in time order: what each site's own record
    file (``OUT/sites/siteK.jsonl``) held, as the launcher reads it. Eval records without a site are site 0's."""
    if "records_by_site" in run._cache:
        return run._cache["records_by_site"]
    by_site: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for kind, recs in run.records.items():
        for rec in recs:
            site = _site_of(rec)
            if site is None and kind == "eval":
                site = 0  # site 0 evaluates the global model; older logs do not say so
            if site is not None:
                by_site[site].append(rec)
    out = {s: sorted(rows, key=lambda r: _num(r, "time") or 0.0) for s, rows in sorted(by_site.items())}
    run._cache["records_by_site"] = out
    return out


@dataclass(frozen=True, kw_only=True, slots=True)
class PowerSeries:
    """One site's power over its training wall time, a point per ``step`` record that carries ``power_mw``, in
    the order the site wrote them. The lists line up; a figure a record left out (or wrote as null) is NaN."""

    site: int
    wall_s: list[float]
    """The run's training clock at each record (``run_s``, which goes on through an outage as the grid's time
    does; ``wall_s`` for records without it). A new process of the site (killed and started again) starts it
    again from zero."""
    grid_hours: list[float]
    """The grid trace's time at the step, hours."""
    power_mw: list[float]
    """The site's draw while the step computed, MW."""
    cap_mw: list[float]
    """Grid power available to the site at the step's start, MW."""
    energy_mwh: list[float]
    """The site's energy so far, MWh. Each process counts its own from zero (across rejoins of that process);
    here a later process's count goes on from the total of the ones before, so the last value is the site's
    ``energy_mwh`` in ``summary.json``."""
    off: list[tuple[float, float | None]]
    """Windows in which the site's power was off: (``wall_s`` of its ``power_off``, ``wall_s`` of the
    ``power_on`` after it, else the ``back_at_s`` the ``power_off`` announced, else None: off to the end)."""
    speed: float | None
    """The site's speed factor (its latest step's ``speed``), None when not recorded."""


def power_series(records_by_site: Mapping[int, Iterable[dict[str, Any]]]) -> dict[int, PowerSeries]:
    """Each site's :class:`PowerSeries`, for the sites whose step records carry ``power_mw`` (none in a run that
    does not model power). ``records_by_site``: each site's records in file order, as
    ``geotrain.summary.read_site_records`` or :func:`records_by_site` give them."""
    from geotrain.summary import site_processes

    out: dict[int, PowerSeries] = {}
    for site, rows in sorted(records_by_site.items()):
        columns: dict[str, list[float]] = {k: [] for k in ("wall_s", "grid_hours", "power_mw", "cap_mw", "energy_mwh")}
        off: list[tuple[float, float | None]] = []
        speed: float | None = None
        before = 0.0  # energy of the site's earlier processes
        waiting = False  # for the power_on that ends the latest power_off
        for proc in site_processes(list(rows)):
            latest = 0.0
            for r in proc:
                kind = r.get("kind")
                if kind == "step" and _num(r, "power_mw") is not None and _num(r, "wall_s") is not None:
                    for key, col in columns.items():
                        # the run's clock (run_s) when the record has it: a site's wall_s restarts when it
                        # comes back after an outage, and power_off/power_on are on the run's clock
                        col.append(_num_or_nan(r.get("run_s", r.get(key)) if key == "wall_s" else r.get(key)))
                    if (e := _num(r, "energy_mwh")) is not None:
                        latest = e
                        columns["energy_mwh"][-1] = before + e
                    speed = _num(r, "speed") if _num(r, "speed") is not None else speed
                elif kind == "power_off" and (w := _num(r, "wall_s")) is not None:
                    off.append((w, _num(r, "back_at_s")))
                    waiting = True
                elif kind == "power_on" and waiting and (w := _num(r, "wall_s")) is not None:
                    off[-1] = (off[-1][0], w)
                    waiting = False
            done = _last_of(proc, "done")
            before += _num(done, "energy_mwh") if done is not None and _num(done, "energy_mwh") is not None else latest
        if columns["power_mw"]:
            out[site] = PowerSeries(site=site, off=off, speed=speed, **columns)
    return out


def logged_energy_mwh(steps: list[dict[str, Any]], *, time_scale: float) -> float:
    """The energy a site's consecutive step records (``run.log_every = 1``, one stretch of training without a
    departure) account for, from what they log: each step's draw while it computed and was held back
    (``power_mw`` over the step's compute and throttled seconds) and while it waited (``wait_mw`` over the rest
    of its ``run_s``), in grid time. Set beside the energy the site reports, it checks the records against the
    controller's own integral."""
    total = 0.0
    for prev, r in zip(steps, steps[1:]):
        seconds = r["run_s"] - prev["run_s"]
        busy = (r["compute_s"] - prev["compute_s"]) + (r.get("throttled_s", 0.0) - prev.get("throttled_s", 0.0))
        busy = min(max(busy, 0.0), seconds)
        total += r["power_mw"] * busy + r.get("wait_mw", r["power_mw"]) * (seconds - busy)
    return total * time_scale / 3600.0


def run_power(run: Run) -> dict[int, PowerSeries]:
    """:func:`power_series` of the run's log; empty for a run that does not model power."""
    if "power" not in run._cache:
        run._cache["power"] = power_series(records_by_site(run))
    return run._cache["power"]


def _last_of(rows: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    return next((r for r in reversed(rows) if r.get("kind") == kind), None)


def derived_summary(run: Run) -> dict[str, Any]:
    """Headline figures rebuilt from the metrics log, for a run whose summary is missing or partial: the same
    figures the launcher builds the summary from (``geotrain.summary.run_figures``), read from
    ``metrics.jsonl`` instead of the sites' record files.

    Only figures the log actually supports are returned; a key is absent rather than guessed.
    """
    if "derived" in run._cache:
        return copy.deepcopy(run._cache["derived"])
    from geotrain.summary import run_figures

    out = run_figures(records_by_site(run))
    if out.get("per_site"):
        out["sites"] = len(sites_in(run))
    run._cache["derived"] = out
    return copy.deepcopy(out)


def merged_summary(run: Run) -> tuple[dict[str, Any], set[str]]:
    """The summary with missing figures filled in from the metrics log: (merged, keys that were filled in).

    ``per_site`` is filled in as a whole when the summary has none. Values the summary has are never replaced.
    """
    merged = dict(run.summary)
    filled: set[str] = set()
    for key, value in derived_summary(run).items():
        if merged.get(key) is None or (key == "per_site" and not _per_site(merged)):
            merged[key] = value
            filled.add(key)
    return merged, filled


def run_status(summary: dict[str, Any]) -> tuple[Status, str]:
    """(ok | partial | failed, a short reason) from the summary flags.

    ``failed`` needs evidence of failure (an error or ``ok: false`` without an interruption); a stopped run
    or a summary without ``ok`` is ``partial``: what it holds is real, just incomplete.
    """
    error = summary.get("error")
    if summary.get("ok") is True and not error:
        return "ok", "completed"
    if summary.get("interrupted") is True:
        return "partial", "interrupted"
    if error:
        return "failed", str(error)
    if summary.get("ok") is False:
        return "failed", "run reported ok = false"
    if not summary:
        return "partial", "no summary.json"
    return "partial", "summary has no ok flag"


# -- membership ---------------------------------------------------------------------------------------------------

EVENT_KINDS = ("joined", "left", "rejoined", "healed")
"""The coordinator's events that summary.json lists under ``membership``."""

Interval = tuple[float, float, str]
"""(from, to, state) in seconds since the launch; state: member, healing, out or partitioned."""


@dataclass(kw_only=True, slots=True)
class Membership:
    """What happened to a run's membership. Every ``wall`` counts seconds since the launch, None when unknown.

    Read from summary.json; the times the summary does not give (when each rejected update was decided, the
    faults the sites carried out themselves) come from metrics.jsonl.
    """

    recorded: bool
    """Whether summary.json records membership at all (runs from before elastic membership do not)."""
    sites: int | None
    events: list[dict[str, Any]]
    """The coordinator's events in time order: site, kind (one of :data:`EVENT_KINDS`), round, wall,
    healed_from, seconds (the healing transfer), reason (why a site left)."""
    rejected: list[dict[str, Any]]
    """Updates the guards left out: site, round, sync, step, reason, norm, wall (when the first member decided)."""
    faults: list[dict[str, Any]]
    """Injected faults in time order: spec, action, site (None: the coordinator), wall. The launcher's (kill,
    rejoin, partition, heal) from summary.json; the sites' own (slow, nan, outlier) from their fault records."""
    failures: list[dict[str, Any]]
    """Sites that failed: site, message, wall."""
    per_site: list[dict[str, Any]]
    """Per site, the membership figures it recorded (coordination_seconds, incarnations, failed_attempts; a
    site that did not finish has none)."""
    sites_in_sync: bool | None
    """Whether the sites that finished hold the same parameters."""
    origin: float | None
    """Unix seconds at which ``wall`` starts (see :func:`_origin`)."""
    origin_source: str | None
    """Where ``origin`` comes from: ``summary`` (exact), ``matched`` (to within a fraction of a second) or
    ``start`` (the first start record: the log's times may then sit some seconds off the summary's)."""
    end: float | None
    """The run's last moment on the same clock (its last record or event, or the launcher's elapsed time)."""
    finished: dict[int, float] = field(default_factory=dict)
    """When each site finished (its last ``done`` record), on the same clock."""

    @property
    def changes(self) -> list[dict[str, Any]]:
        """The events after the run formed: every site joining at the start is not a change."""
        return [e for e in self.events if not _formation(e)]

    @property
    def changed(self) -> bool:
        """Anything to show: a membership change, a rejected update, a fault, a failure, a site started again."""
        restarted = any((_num(e, "incarnations") or 1) > 1 for e in self.per_site)
        return bool(self.changes or self.rejected or self.faults or self.failures or restarted)

    def intervals(self) -> dict[int, list[Interval]]:
        """Each site's states over the run, from its events: ``member`` from joining (or being healed) to
        leaving, ``healing`` from being admitted again to holding the state it was sent, ``out`` from leaving
        to coming back (or the end), and ``partitioned`` between a partition fault and its heal."""
        end = self.end
        out: dict[int, list[Interval]] = defaultdict(list)
        if end is None:
            return {}
        state: dict[int, tuple[str, float]] = {}
        for e in self.events:
            site, wall, kind = e.get("site"), e.get("wall"), e.get("kind")
            if not isinstance(site, int) or wall is None:
                continue
            now = state.pop(site, None)
            if now is not None:
                out[site].append((now[1], wall, now[0]))
            if kind == "left":
                state[site] = ("out", wall)
            elif kind == "healed" or (kind == "joined" and e.get("healed_from") is None):
                state[site] = ("member", wall)
            else:  # admitted (again), healed from a peer: the state is on its way
                state[site] = ("healing", wall)
        for site, (name, since) in state.items():
            stop = self.finished.get(site, end) if name != "out" else end
            out[site].append((since, max(since, stop), name))
        cut: dict[int, float] = {}
        for f in self.faults:
            site, wall = f.get("site"), f.get("wall")
            if not isinstance(site, int) or wall is None:
                continue
            if f.get("action") == "partition":
                cut.setdefault(site, wall)
            elif f.get("action") == "heal" and site in cut:
                out[site].append((cut.pop(site), wall, "partitioned"))
        for site, since in cut.items():
            out[site].append((since, end, "partitioned"))
        return {site: sorted(v) for site, v in sorted(out.items())}


def _formation(event: dict[str, Any]) -> bool:
    """A site joining as the run forms (round 0, not healed from a peer) rather than later."""
    return event.get("kind") == "joined" and event.get("healed_from") is None and not event.get("round")


def _wall_of(entry: dict[str, Any]) -> float | None:
    v = _num(entry, "wall")
    return v if v is not None and math.isfinite(v) else None


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [e for e in value if isinstance(e, dict)] if isinstance(value, list) else []


def _by_wall(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stable sort by wall time, entries without one last."""
    return sorted(entries, key=lambda e: (e["wall"] is None, e["wall"] or 0.0))


def membership_of(run: Run) -> Membership:
    """The run's membership history (see :class:`Membership`), tolerant of old and partial run directories."""
    if "membership" in run._cache:
        return run._cache["membership"]
    s = run.summary
    origin, origin_source = _origin(run)

    def wall_at(record: dict[str, Any]) -> float | None:
        t = _num(record, "time")
        return None if t is None or origin is None else t - origin

    events = []
    for e in _dicts(s.get("membership")):
        if e.get("kind") not in EVENT_KINDS:
            continue
        entry = {k: e.get(k) for k in ("site", "kind", "round", "healed_from", "seconds", "reason")}
        entry["wall"] = _wall_of(e)
        events.append(entry)

    # A rejection is recorded by every member that took part in the sync; it happened when the first did.
    decided: dict[tuple[Any, Any], float] = {}
    logged: dict[tuple[Any, Any], dict[str, Any]] = {}
    for r in run.records.get("rejected", []):
        key = (r.get("sync"), r.get("rejected_site"))
        logged.setdefault(key, r)
        w = wall_at(r)
        if w is not None and (key not in decided or w < decided[key]):
            decided[key] = w
    if isinstance(s.get("rejected_updates"), list):
        rejected = [{k: e.get(k) for k in ("site", "round", "sync", "step", "reason", "norm")}
                    for e in _dicts(s["rejected_updates"])]
    else:  # a summary from before rejections were listed, or none at all: the log's own
        rejected = [{"site": r.get("rejected_site"), "round": r.get("round"), "sync": r.get("sync"),
                     "step": r.get("step"), "reason": r.get("reason"), "norm": r.get("norm")}
                    for r in logged.values()]
    for e in rejected:
        e["wall"] = decided.get((e.get("sync"), e.get("site")))

    faults = [{"spec": f.get("spec"), "action": f.get("action"), "site": f.get("site"), "wall": _wall_of(f)}
              for f in _dicts(s.get("faults"))]
    known = {f["spec"] for f in faults}
    for r in run.records.get("fault", []):  # slow, nan and outlier act inside the sites, at their step
        spec = r.get("fault")
        if not isinstance(spec, str) or spec in known:
            continue
        known.add(spec)
        faults.append({"spec": spec, **_fault_parts(spec), "wall": wall_at(r)})

    if isinstance(s.get("failures"), list):
        failures = [{"site": f.get("site"), "message": f.get("message"), "wall": _wall_of(f)}
                    for f in _dicts(s["failures"])]
    else:
        failures = [{"site": r.get("site"), "message": r.get("message"), "wall": wall_at(r)}
                    for r in run.records.get("error", [])]

    per_site = [{"site": e["site"], **{k: e[k] for k in ("coordination_seconds", "incarnations", "failed_attempts")
                                       if _num(e, k) is not None}}
                for e in _per_site(s) if isinstance(e.get("site"), int)]

    finished: dict[int, float] = {}
    for r in run.records.get("done", []):
        site, w = _site_of(r), wall_at(r)
        if site is not None and w is not None:
            finished[site] = max(w, finished.get(site, w))
    ends = [w for w in (wall_at(r) for recs in run.records.values() for r in recs) if w is not None]
    ends += [e["wall"] for e in events + faults + failures + rejected if e["wall"] is not None]
    if origin_source == "summary" and _num(s, "elapsed_seconds") is not None:
        ends.append(float(s["elapsed_seconds"]))
    sites = s.get("sites")
    m = Membership(
        recorded=isinstance(s.get("membership"), list),
        sites=sites if isinstance(sites, int) and not isinstance(sites, bool) else None,
        events=_by_wall(events), rejected=rejected, faults=_by_wall(faults), failures=_by_wall(failures),
        per_site=per_site, sites_in_sync=s.get("sites_in_sync") if isinstance(s.get("sites_in_sync"), bool) else None,
        origin=origin, origin_source=origin_source, end=max(ends) if ends else None, finished=finished,
    )
    run._cache["membership"] = m
    return m


def _origin(run: Run) -> tuple[float | None, str | None]:
    """The Unix time the summary's ``wall`` values count from, and how it is known.

    ``summary.started_at`` where the summary has it. An older summary counts from the launch too but does not
    say when that was; the offset then comes from something both files hold: a failure and its error record
    (the same record), a site healed and its own healed record, or a fault and the sites' note that it was
    due (the launcher carries a fault out as soon as it reads that note). Else the first start record.
    """
    s = run.summary
    if (t0 := _num(s, "started_at")) is not None:
        return t0, "summary"
    logged = run.records
    for failure in _dicts(s.get("failures")):
        for r in logged.get("error", []):
            if (r.get("site"), r.get("message")) == (failure.get("site"), failure.get("message")):
                if (w := _wall_of(failure)) is not None and (t := _num(r, "time")) is not None:
                    return t - w, "matched"
    for e in _dicts(s.get("membership")):
        if e.get("kind") != "healed":
            continue
        for r in logged.get("healed", []):
            if (r.get("site"), r.get("healed_from")) == (e.get("site"), e.get("healed_from")):
                if (w := _wall_of(e)) is not None and (t := _num(r, "time")) is not None:
                    return t - w, "matched"
    for f in _dicts(s.get("faults")):
        due = [t for r in logged.get("fault_due", [])
               if r.get("fault") == f.get("spec") and (t := _num(r, "time")) is not None]
        if due and (w := _wall_of(f)) is not None:
            return min(due) - w, "matched"
    starts = [t for r in logged.get("start", []) if (t := _num(r, "time")) is not None]
    return (min(starts), "start") if starts else (None, None)


def _fault_parts(spec: str) -> dict[str, Any]:
    """A fault's action and target site from its spec (``outlier:100:2@5``)."""
    from geotrain.errors import ConfigError
    from geotrain.faults import parse_fault

    try:
        f = parse_fault(spec)
    except ConfigError:
        return {"action": spec.split(":", 1)[0], "site": None}
    return {"action": f.action, "site": f.site}
