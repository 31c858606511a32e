"""Read a run directory (``summary.json`` + ``metrics.jsonl``) into plain Python, tolerantly.

A run directory may come from a run that finished, one stopped with Ctrl+C, or one that crashed mid-write, so
everything here degrades instead of raising:

- ``summary.json`` may be missing, unparsable or lack any key: :attr:`Run.summary` is then ``{}`` or partial,
  and :func:`derived_summary` rebuilds the headline figures from the metrics log.
- ``metrics.jsonl`` may end in a truncated line (the writer was killed mid-line) or contain garbage: such lines
  are counted in :attr:`Run.bad_lines` and skipped. Records of unknown ``kind`` are kept but never used.

Record kinds (one JSON object per line; see the report package docstring for the full field lists):
``step`` (per site, ``tokens``/``wan_bytes`` cumulative for that site), ``eval`` (global, ``tokens``/``wan_bytes``
cumulative over all sites) and ``sync`` (one per cross-site collective, ``bytes`` for that collective).

Series helpers return numpy arrays sorted by their x value, with non-finite y values dropped.
"""

from __future__ import annotations

import copy
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "Run",
    "SiteTimes",
    "derived_summary",
    "eval_series",
    "global_tokens_at_steps",
    "merged_summary",
    "read_run",
    "run_status",
    "site_times",
    "sites_in",
    "step_series",
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


def wan_series(run: Run, site: int) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative WAN bytes sent by one site against wall time.

    Sync records are preferred when the log has any: they are written at each collective, so the curve
    steps exactly when bytes moved. Otherwise the cumulative ``wan_bytes`` of step records is used.
    """
    if run.syncs:
        x, y = _sorted_finite(run.column("sync", site, "wall_s"), run.column("sync", site, "bytes"))
        if x.size:
            return x, np.cumsum(y)
    x, y = step_series(run, site, x="wall_s", y="wan_bytes")
    if x.size:
        y = np.maximum.accumulate(y)
    return x, y


def total_wan_series(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative WAN bytes over all sites against wall time (the sum of the per-site step curves)."""
    curves = {s: wan_series(run, s) for s in sites_in(run)}
    curves = {s: c for s, c in curves.items() if c[0].size}
    if not curves:
        return np.empty(0), np.empty(0)
    times = np.unique(np.concatenate([c[0] for c in curves.values()]))
    total = np.zeros_like(times)
    for x, y in curves.values():
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
        )
        if have is None:
            out[site] = from_log
            continue
        # A partial summary entry keeps its own figures; only the gaps come from the log.
        for name in ("compute_seconds", "comm_seconds", "wall_seconds", "utilization"):
            if getattr(have, name) is None:
                setattr(have, name, getattr(from_log, name))
    for st in out.values():
        # The contract defines utilization as compute / wall; derive it when only the parts were written.
        if st.utilization is None and st.compute_seconds is not None and st.wall_seconds:
            st.utilization = st.compute_seconds / st.wall_seconds
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


def derived_summary(run: Run) -> dict[str, Any]:
    """Headline figures rebuilt from the metrics log, for a run whose summary is missing or partial: the same
    figures the launcher builds the summary from (``geotrain.summary.run_figures``), read from
    ``metrics.jsonl`` instead of the sites' record files.

    Only figures the log actually supports are returned; a key is absent rather than guessed.
    """
    if "derived" in run._cache:
        return copy.deepcopy(run._cache["derived"])
    from geotrain.summary import run_figures

    by_site: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for kind, recs in run.records.items():
        for rec in recs:
            site = _site_of(rec)
            if site is None and kind == "eval":
                site = 0  # site 0 evaluates the global model; older logs do not say so
            if site is not None:
                by_site[site].append(rec)
    out = run_figures({s: sorted(rows, key=lambda r: _num(r, "time") or 0.0) for s, rows in by_site.items()})
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
