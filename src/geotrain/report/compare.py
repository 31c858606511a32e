"""Compare named runs side by side: a markdown table, its JSON, a figure and an HTML page.

This is what a researcher reads after running DDP, DiLoCo and Streaming DiLoCo at equal tokens under one link
(DiLoCo: arXiv 2311.08105; Streaming DiLoCo: arXiv 2501.18512). Ratios are taken against the first run of the
baseline algorithm (the definition marked ``baseline``: DDP, the fully synchronous method those papers compare
against):

- ``eval_loss_ratio`` = eval_loss(run) / eval_loss(ddp): below 1 is better than DDP;
- ``bytes_ratio`` = wan_bytes(ddp) / wan_bytes(run): how many times fewer bytes the run sent.

A ratio is ``None`` when there is no baseline run or either figure is missing or zero. The ``settings`` column
shows each run's H, overlap and tau as the run used them, marking the ones it chose itself. Figures a partial run's
summary lacks are rebuilt from its ``metrics.jsonl`` (as in the HTML report) and its ``status`` says so.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from pathlib import Path
from typing import Any

from geotrain.files import write_text_atomic
from geotrain.report.html import CSS, esc, png_data_uri
from geotrain.report.metrics import Run, merged_summary, read_run, run_status
from geotrain.report.units import (
    MISSING,
    as_float,
    fmt_bytes,
    fmt_loss,
    fmt_percent,
    fmt_ratio,
    fmt_seconds,
    fmt_tokens,
)

__all__ = ["COLUMNS", "comparison_rows", "write_comparison"]

# (row key, markdown header, formatter) in table order.
COLUMNS: list[tuple[str, str, Any]] = [
    ("name", "name", str),
    ("algorithm", "algorithm", lambda v: MISSING if v is None else str(v)),
    ("codec", "codec", lambda v: MISSING if v is None else str(v)),
    ("H", "H", lambda v: MISSING if v is None else str(v)),
    ("settings", "settings", lambda v: v or MISSING),
    ("tokens", "tokens", fmt_tokens),
    ("eval_loss", "eval loss", fmt_loss),
    ("eval_loss_ratio", "loss / ddp", fmt_ratio),
    ("wan_bytes", "WAN bytes", fmt_bytes),
    ("bytes_ratio", "bytes ddp / run", fmt_ratio),
    ("wall_seconds", "wall", fmt_seconds),
    ("utilization", "utilization", fmt_percent),
    ("status", "status", str),
]


def _finite(value: Any) -> float | None:
    v = as_float(value)
    return v if v is not None and math.isfinite(v) else None


def _ratio(numerator: Any, denominator: Any) -> float | None:
    n, d = _finite(numerator), _finite(denominator)
    if n is None or d is None or d == 0:
        return None
    return n / d


def _json_safe(value: Any) -> Any:
    """NaN and infinities are not JSON; a diverged run's loss becomes null (its status still tells the story)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def comparison_rows(runs: list[tuple[str, Run]]) -> tuple[list[dict[str, Any]], str | None]:
    """One row per run and the name of the reference run (or None)."""
    rows: list[dict[str, Any]] = []
    for name, run in runs:
        merged, filled = merged_summary(run)
        status, reason = run_status(run.summary)
        rows.append({
            "name": name,
            "algorithm": merged.get("algorithm"),
            "codec": merged.get("codec"),
            "H": merged.get("sync_every"),
            "settings": _settings(merged),
            "tokens": merged.get("tokens"),
            "eval_loss": _json_safe(as_float(merged.get("eval_loss"))),
            "eval_loss_ratio": None,
            "wan_bytes": merged.get("wan_bytes"),
            "bytes_ratio": None,
            "wall_seconds": merged.get("wall_seconds"),
            "utilization": merged.get("utilization"),
            "status": status,
            "status_reason": reason,
            "rebuilt_from_metrics": sorted(k for k in filled if k != "per_site"),
            "params_sha256": merged.get("params_sha256"),
            "path": str(run.path),
        })
    reference = next((r for r in rows if _is_baseline(r["algorithm"])), None)
    if reference is not None:
        for row in rows:
            row["eval_loss_ratio"] = _ratio(row["eval_loss"], reference["eval_loss"])
            row["bytes_ratio"] = _ratio(reference["wan_bytes"], row["wan_bytes"])
    return rows, (reference["name"] if reference is not None else None)


def _is_baseline(algorithm: Any) -> bool:
    from geotrain.algorithms import get_algorithm
    from geotrain.errors import ConfigError

    try:
        return bool(get_algorithm(algorithm).baseline)
    except ConfigError:
        return False


def _settings(summary: dict[str, Any]) -> str:
    """Overlap and tau as the run used them, ``(chosen)`` after those it chose itself."""
    chosen = {str(a.get("key")).rpartition(".")[2] for a in summary.get("auto_settings") or [] if isinstance(a, dict)}
    parts = []
    if summary.get("overlap") is not None:
        parts.append(("overlap" if summary["overlap"] else "no overlap") + (" (chosen)" if "overlap" in chosen else ""))
    if summary.get("fragments") not in (None, 1):
        parts.append(f"P={summary['fragments']}")
    if summary.get("overlap_steps") not in (None, 0) or "overlap_steps" in chosen:
        parts.append(f"tau={summary.get('overlap_steps')}" + (" (chosen)" if "overlap_steps" in chosen else ""))
    return ", ".join(parts)


def _md_cell(text: str) -> str:
    # A pipe would end the cell; a newline would end the row.
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _markdown(rows: list[dict[str, Any]], reference: str | None) -> str:
    header = "| " + " | ".join(h for _k, h, _f in COLUMNS) + " |"
    align = "|" + "|".join("---:" if k not in ("name", "algorithm", "codec", "status") else "---" for k, _h, _f in COLUMNS) + "|"
    lines = [header, align]
    for row in rows:
        cells = []
        for key, _h, fmt in COLUMNS:
            text = fmt(row[key])
            if key == "status" and row["rebuilt_from_metrics"]:
                text += " (figures from metrics)"
            cells.append(_md_cell(text))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if reference is not None:
        lines.append(
            f"Ratios against `{reference}`: loss / ddp = eval loss of the run / eval loss of ddp (below 1 is better); "
            "bytes ddp / run = how many times fewer WAN bytes the run sent. H = inner steps between syncs."
        )
    else:
        lines.append("No run is named `ddp`, so no ratios. H = inner steps between syncs.")
    return "\n".join(lines) + "\n"


def _html(rows: list[dict[str, Any]], reference: str | None, png: bytes, out_dir: Path) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for _k, h, _f in COLUMNS)
    body = []
    for row in rows:
        cells = []
        for key, _h, fmt in COLUMNS:
            text = esc(fmt(row[key]))
            if key == "name":
                report = Path(row["path"]) / "report.html"
                if report.is_file():
                    # Relative, so the comparison and its runs can be moved together.
                    href = os.path.relpath(report, out_dir)
                    text = f'<a href="{esc(Path(href).as_posix())}">{text}</a>'
            if key == "status":
                text = f'<span class="badge {esc(row["status"])}" title="{esc(row["status_reason"])}">{text}</span>'
            num = ' class="num"' if key not in ("name", "algorithm", "codec", "status") else ""
            cells.append(f"<td{num}>{text}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    note = (
        f"Ratios against <code>{esc(reference)}</code>: loss / ddp below 1 is better than DDP; "
        "bytes ddp / run is how many times fewer WAN bytes the run sent."
        if reference is not None
        else "No run is named <code>ddp</code>, so no ratios are shown."
    )
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>geotrain comparison</title>",
        f"<style>{CSS} main {{ max-width: 1180px; }}</style></head><body><main>",
        f"<header><h1>geotrain comparison</h1><p class=\"meta\">{len(rows)} runs</p></header>",
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>",
        f'<p class="footnote">{note} H = inner steps between syncs.</p>',
        "<h2>Eval loss</h2>",
        f'<figure><img src="{png_data_uri(png)}" alt="Eval loss vs tokens and vs wall time" width="1200">'
        "<figcaption>Held-out loss of each run against tokens trained over all sites (top) "
        "and against wall time (bottom).</figcaption></figure>",
        f"<footer>Generated by geotrain.report on {esc(stamp)}.</footer>",
        "</main></body></html>",
    ])


def write_comparison(out_dir: str | Path, runs: list[tuple[str, Path]]) -> dict[str, Any]:
    """Write ``compare.md``, ``compare.json``, ``compare.png`` and ``compare.html`` to ``out_dir``.

    ``runs`` are (name, run directory) pairs in the order the table should list them. Returns the dict written
    to ``compare.json``: ``{"reference", "columns", "runs": [row, ...], "generated_at"}``.
    """
    from geotrain.report.plots import comparison_png

    if not runs:
        raise ValueError("write_comparison needs at least one (name, run directory) pair")
    names = [name for name, _ in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique, got {names}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = [(name, read_run(path)) for name, path in runs]
    rows, reference = comparison_rows(loaded)
    png = comparison_png(loaded)

    result: dict[str, Any] = {
        "reference": reference,
        "columns": [key for key, _h, _f in COLUMNS],
        "definitions": {
            "eval_loss_ratio": "eval_loss / eval_loss of the reference run",
            "bytes_ratio": "wan_bytes of the reference run / wan_bytes",
            "H": "sync_every: inner steps between cross-site syncs",
        },
        "runs": rows,
        "generated_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_text_atomic(out / "compare.md", _markdown(rows, reference))
    write_text_atomic(out / "compare.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    (out / "compare.png").write_bytes(png)
    write_text_atomic(out / "compare.html", _html(rows, reference, png, out))
    return result
