"""The run report: one self-contained ``report.html`` per run directory.

The file has no scripts and no external assets (figures are PNGs inlined as base64 data URIs, the CSS is
inline), so it can be mailed, attached to an issue or opened from a cluster's scratch disk as it is.

It shows a header (algorithm, sites, link, codec and an ok / partial / failed badge), the headline figures in
human units, a per-site table, what happened to the run's membership (only when something did: sites that
left, came back and were healed, updates the guards rejected, injected faults, failures; otherwise one line),
the four figures of :mod:`geotrain.report.plots`, for a run that models its sites' power a Power section
(energy, peak draw, throttled and idle time, carbon per site; the draw against the grid's cap and the energy
used over time), and the resolved config and raw summary in collapsed ``<details>``. A run stopped by Ctrl+C
or a crash still gets a report: figures the summary lacks are rebuilt from ``metrics.jsonl`` where the log
supports them, and marked as such.

Every string that comes from a run (names, error messages, config values) is passed through ``html.escape``.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from geotrain.files import write_text_atomic
from geotrain.report.metrics import (
    Membership,
    Run,
    derived_summary,
    membership_of,
    merged_summary,
    read_run,
    run_power,
    run_status,
    sites_in,
)
from geotrain.report.units import (
    MISSING,
    as_float,
    fmt_bandwidth,
    fmt_bytes,
    fmt_float,
    fmt_loss,
    fmt_percent,
    fmt_quantity,
    fmt_seconds,
    fmt_tokens,
)

__all__ = ["REPORT_FILE", "esc", "png_data_uri", "render_report", "toml_ish", "write_report"]

REPORT_FILE = "report.html"


def esc(value: Any) -> str:
    """Any value as escaped HTML text (quotes too, so the result is also safe inside an attribute)."""
    return html.escape(str(value), quote=True)


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


CSS = """
:root { --fg:#1a202c; --muted:#4a5568; --line:#e2e8f0; --bg-alt:#f7fafc;
        --ok:#276749; --ok-bg:#c6f6d5; --partial:#975a16; --partial-bg:#fefcbf; --failed:#9b2c2c; --failed-bg:#fed7d7; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
       font: 15px/1.5 -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 960px; margin: 0 auto; padding: 24px 20px 48px; }
header { border-bottom: 2px solid var(--line); margin-bottom: 20px; padding-bottom: 12px; }
h1 { font-size: 24px; margin: 0 0 6px; display: flex; align-items: center; gap: 12px; flex-wrap: wrap; }
h2 { font-size: 18px; margin: 28px 0 10px; }
.meta { color: var(--muted); margin: 0; }
.meta span + span::before { content: " · "; color: #a0aec0; }
.path { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px; color: var(--muted); }
.badge { font-size: 13px; font-weight: 700; letter-spacing: .04em; text-transform: uppercase;
         padding: 2px 10px; border-radius: 999px; }
.badge.ok { color: var(--ok); background: var(--ok-bg); }
.badge.partial { color: var(--partial); background: var(--partial-bg); }
.badge.failed { color: var(--failed); background: var(--failed-bg); }
.note { border-left: 4px solid; padding: 8px 12px; margin: 12px 0; border-radius: 4px; }
.note.partial { border-color: #d69e2e; background: #fffff0; }
.note.failed { border-color: #e53e3e; background: #fff5f5; }
.note pre { margin: 6px 0 0; white-space: pre-wrap; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { padding: 6px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { font-weight: 600; color: var(--muted); font-size: 13px; }
td.num, th.num { text-align: right; }
tbody tr:nth-child(even) { background: var(--bg-alt); }
table.kv { width: auto; min-width: 60%; }
table.kv th { width: 16em; }
.derived { color: var(--partial); font-weight: 700; }
.footnote { color: var(--muted); font-size: 13px; margin-top: 6px; }
figure { margin: 18px 0 26px; }
figure img { display: block; width: 100%; max-width: 900px; height: auto; border: 1px solid var(--line); border-radius: 6px; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 6px; }
details { margin: 14px 0; border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px; }
summary { cursor: pointer; font-weight: 600; }
pre { font: 12.5px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; overflow-x: auto; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px; }
footer { margin-top: 36px; color: #a0aec0; font-size: 12px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
.kind { font-weight: 600; }
.kind.left, .kind.kill { color: #c53030; }
.kind.joined, .kind.rejoined, .kind.rejoin { color: #2f855a; }
.kind.healed, .kind.heal { color: #2b6cb0; }
.kind.partition { color: #c05621; }
.kind.rejected, .kind.nan, .kind.outlier { color: #b83280; }
.kind.coordinator { color: #6b46c1; }
tr.formation td { color: var(--muted); }
td.msg { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; word-break: break-word; }
"""

FIGURE_CAPTIONS = {
    "loss_tokens": (
        "Train loss per site (thin: EMA-smoothed; faint: raw) and held-out eval loss (bold markers) against tokens "
        "trained over all sites. A site's point sits at the total tokens all sites had trained when it logged."
    ),
    "loss_wall": "The same losses against wall time, which includes time spent waiting on the WAN.",
    "wan_bytes": "Cumulative payload bytes sent over cross-site links, per site and in total (decimal units: 1 MB = 10⁶ B).",
    "utilization": (
        "Where each site's wall time went: compute, throttled (steps held back to the speed of a slower or "
        "power-capped site), waiting on cross-site communication, and the rest. Utilization = (compute + "
        "throttled) / wall time."
    ),
}


# The Power section's figures (plots.power_figures), shown there rather than under Plots.
POWER_CAPTIONS = {
    "power": (
        "Each site's electrical draw while its logged steps computed (solid, in the site's colour) and the power "
        "the grid made available to it (dashed, shaded below), against the site's training wall time; the grid "
        "trace's own time runs along the top. Hatched red: the site's power was off and it was out of the run, "
        "until its power came back and it rejoined."
    ),
    "energy": (
        "Energy each site has used, cumulative, against its training wall time, and all sites together (each "
        "site counted at its latest logged value). A flat stretch is a site drawing nothing: its power was off."
    ),
}

# With membership marked (plots.loss_vs_wall_png draws it only for a run whose membership changed).
MEMBERSHIP_CAPTIONS = {
    "loss_wall": (
        "Top: each site's membership: solid while in the run, hatched while being healed (receiving the state "
        "from a peer), hatched red while out, a dashed box while partitioned; triangles from above are injected "
        "faults. Below: the losses against time since the run started, each record placed by the moment it was "
        "written, so a site that came back goes on where it was. Vertical lines: membership events (solid), "
        "injected faults (dashed), rejected updates (dotted)."
    ),
    "wan_bytes": (
        "Cumulative payload bytes sent over cross-site links, per site and in total (decimal units: 1 MB = 10⁶ B), "
        "against time since the run started; the vertical lines are the membership marks of the loss plot."
    ),
}


def _int_title(value: Any) -> str:
    """The exact number, for a tooltip behind a rounded one."""
    v = as_float(value)
    if v is None:
        return ""
    return f"{int(v):,}" if v == int(v) else f"{v:,}"


def _seconds_title(value: Any) -> str:
    v = as_float(value)
    return "" if v is None else f"{v:,.3f} s"


def _plain(value: Any) -> str:
    if value is None or value == "":
        return MISSING
    return str(value)


def _chosen(value: Any) -> str:
    """The settings a run chose itself, ``key = value``, one after another."""
    if not isinstance(value, list) or not value:
        return MISSING
    return "; ".join(f"{a.get('key')} = {a.get('value')}" for a in value if isinstance(a, dict)) or MISSING


def _chosen_title(value: Any) -> str:
    if not isinstance(value, list):
        return ""
    return " ".join(str(a.get("reason")) for a in value if isinstance(a, dict))


# (label, summary key, formatter, tooltip) for the headline table, in display order.
_Row = tuple[str, str, Callable[[Any], str], Callable[[Any], str] | None]
SUMMARY_ROWS: list[_Row] = [
    ("Algorithm", "algorithm", _plain, None),
    ("Sites", "sites", _plain, None),
    ("Workers per site", "workers_per_site", _plain, None),
    ("Link", "link", _plain, None),
    ("Codec", "codec", _plain, None),
    ("Sync every (H inner steps)", "sync_every", _plain, None),
    ("Overlap (diloco)", "overlap", _plain, None),
    ("Fragments P (streaming)", "fragments", _plain, None),
    ("Overlap steps tau (streaming)", "overlap_steps", _plain, None),
    ("Chosen by the run (hover for why)", "auto_settings", _chosen, _chosen_title),
    ("Tokens trained", "tokens", fmt_tokens, _int_title),
    ("Eval loss (final)", "eval_loss", fmt_loss, lambda v: fmt_float(v, digits=8)),
    ("Steps", "steps", _plain, None),
    ("Outer rounds", "outer_rounds", _plain, None),
    ("WAN bytes sent", "wan_bytes", fmt_bytes, _int_title),
    ("Payload per sync", "payload_bytes_per_sync", fmt_bytes, _int_title),
    ("Parameter bytes", "param_bytes", fmt_bytes, _int_title),
    ("Peak WAN bandwidth", "peak_bandwidth_bps", fmt_bandwidth, _int_title),
    ("Wall time", "wall_seconds", fmt_seconds, _seconds_title),
    ("Utilization (mean over sites)", "utilization", fmt_percent, lambda v: fmt_float(v, digits=6)),
    ("Predicted utilization (planner)", "predicted_utilization", fmt_percent, lambda v: fmt_float(v, digits=6)),
    ("Parameters SHA-256", "params_sha256", _plain, None),
]

# (header, per_site key, formatter, tooltip) for the per-site table.
SITE_COLUMNS: list[_Row] = [
    ("Site", "site", _plain, None),
    ("Tokens", "tokens", fmt_tokens, _int_title),
    ("Steps", "steps", _plain, None),
    ("Outer rounds", "outer_rounds", _plain, None),
    ("WAN sent", "wan_bytes", fmt_bytes, _int_title),
    ("Compute", "compute_seconds", fmt_seconds, _seconds_title),
    ("Comm. wait", "comm_seconds", fmt_seconds, _seconds_title),
    ("Wall", "wall_seconds", fmt_seconds, _seconds_title),
    ("Utilization", "utilization", fmt_percent, None),
]

def _mw(value: Any) -> str:
    return fmt_quantity(value, "MW")


def _mwh(value: Any) -> str:
    return fmt_quantity(value, "MWh")


def _kg(value: Any) -> str:
    return fmt_quantity(value, "kg")


def _exact_title(unit: str) -> Callable[[Any], str]:
    return lambda v: "" if as_float(v) is None else f"{as_float(v):,.6g} {unit}"


# (header, per_site key, formatter, tooltip) for the Power section's table.
POWER_COLUMNS: list[_Row] = [
    ("Speed", "speed", lambda v: fmt_float(v, digits=3), None),
    ("Energy", "energy_mwh", _mwh, _exact_title("MWh")),
    ("Peak draw", "peak_power_mw", _mw, _exact_title("MW")),
    ("Throttled", "throttled_seconds", fmt_seconds, _seconds_title),
    ("Idle on network", "idle_seconds", fmt_seconds, _seconds_title),
    ("Smoothing", "smoothing_mwh", _mwh, _exact_title("MWh")),
    ("Carbon", "carbon_kg", _kg, _exact_title("kg")),
]

_NUMERIC_KEYS = {
    "tokens", "eval_loss", "steps", "outer_rounds", "wan_bytes", "payload_bytes_per_sync", "param_bytes",
    "peak_bandwidth_bps", "wall_seconds", "utilization", "predicted_utilization", "compute_seconds", "comm_seconds",
    # the membership tables
    "wall", "seconds", "coordination_seconds", "incarnations", "failed_attempts",
    # the power table
    "speed", "energy_mwh", "peak_power_mw", "throttled_seconds", "idle_seconds", "smoothing_mwh", "carbon_kg",
}


def _cell(value: Any, fmt: Callable[[Any], str], tip: Callable[[Any], str] | None, *, derived: bool, tag: str = "td",
          key: str = "") -> str:
    text = fmt(value) if value is not None else MISSING
    if text == MISSING and value is not None:
        text = str(value)  # not a number where one was expected: show what was written rather than hide it
    title = tip(value) if tip is not None and value is not None else ""
    attrs = ' class="num"' if key in _NUMERIC_KEYS else ""
    if title:
        attrs += f' title="{esc(title)}"'
    mark = '<span class="derived" title="rebuilt from metrics.jsonl">*</span>' if derived else ""
    if key == "params_sha256" and value:
        # A full hash is 64 characters; show enough to compare by eye and keep the rest in the tooltip.
        text = str(value)[:16] + "…" if len(str(value)) > 16 else str(value)
        return f'<{tag} title="{esc(value)}"><code>{esc(text)}</code>{mark}</{tag}>'
    return f"<{tag}{attrs}>{esc(text)}{mark}</{tag}>"


def toml_ish(config: Any, *, _prefix: str = "") -> str:
    """A nested dict as TOML-like text: scalars first, then one ``[section]`` per nested dict.

    Not a TOML writer (null has no TOML spelling; it is shown as a comment), only a readable rendering.
    """
    if not isinstance(config, dict):
        return json.dumps(config, indent=2, default=str)
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for key, value in config.items():
        name = str(key)
        if isinstance(value, dict):
            tables.append((f"{_prefix}{name}", value))
        elif value is None:
            lines.append(f"# {name} = (unset)")
        else:
            lines.append(f"{name} = {_toml_value(value)}")
    for name, table in tables:
        body = toml_ish(table, _prefix=f"{name}.")
        if lines:
            lines.append("")
        lines.append(f"[{name}]")
        if body:
            lines.append(body)
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return json.dumps(value, ensure_ascii=False, default=str)


def _merge_per_site(run: Run) -> tuple[list[dict[str, Any]], set[tuple[int, str]]]:
    """Per-site entries of the summary with gaps filled from the log: (entries, {(site, key) filled}).

    A site the summary lacks entirely is marked once, on its ``site`` cell, rather than on every cell.
    """
    listed = run.summary.get("per_site")
    listed = listed if isinstance(listed, list) else []
    from_summary = {e["site"]: dict(e) for e in listed if isinstance(e, dict) and e.get("site") is not None}
    from_log = {e["site"]: e for e in derived_summary(run).get("per_site", [])}
    filled: set[tuple[int, str]] = set()
    for site, entry in from_log.items():
        if site not in from_summary:
            from_summary[site] = dict(entry)
            filled.add((site, "site"))
            continue
        target = from_summary[site]
        for key, value in entry.items():
            if target.get(key) is None:
                target[key] = value
                filled.add((site, key))
    # Integer sites in numeric order; anything odd a hand-edited summary may hold goes last, as text.
    ordered = sorted(
        from_summary.values(),
        key=lambda e: (0, e["site"], "") if isinstance(e.get("site"), int) else (1, 0, str(e.get("site"))),
    )
    return ordered, filled


def _summary_table(merged: dict[str, Any], filled: set[str]) -> str:
    rows = []
    for label, key, fmt, tip in SUMMARY_ROWS:
        value = merged.get(key)
        if value is None and key in ("workers_per_site", "payload_bytes_per_sync", "param_bytes", "peak_bandwidth_bps", "steps"):
            continue  # optional detail: leave the row out rather than show a dash
        rows.append(f"<tr><th>{esc(label)}</th>{_cell(value, fmt, tip, derived=key in filled, key=key)}</tr>")
    return f'<table class="kv"><tbody>{"".join(rows)}</tbody></table>'


def _site_table(entries: list[dict[str, Any]], filled: set[tuple[int, str]]) -> str:
    if not entries:
        return '<p class="footnote">No per-site figures were recorded.</p>'
    columns = [c for c in SITE_COLUMNS if any(e.get(c[1]) is not None for e in entries)]
    head = "".join(f'<th class="num">{esc(c[0])}</th>' if c[1] in _NUMERIC_KEYS else f"<th>{esc(c[0])}</th>" for c in columns)
    body = []
    for e in entries:
        cells = "".join(_cell(e.get(key), fmt, tip, derived=(e.get("site"), key) in filled, key=key)
                        for _label, key, fmt, tip in columns)
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _kind(text: str, css: str) -> str:
    return f'<span class="kind {esc(css)}">{esc(text)}</span>'


def _site_name(site: Any) -> str:
    return MISSING if site is None else f"site {site}"


def _fmt_wall(value: Any) -> str:
    """Seconds since the run started, in one unit all down a column so the rows compare at a glance."""
    v = as_float(value)
    return MISSING if v is None or not math.isfinite(v) else f"{v:,.1f} s"


def _wall_cell(wall: Any) -> str:
    return _cell(wall, _fmt_wall, _seconds_title, derived=False, key="wall")


def _table(head: list[tuple[str, bool]], rows: list[str]) -> str:
    """A table with ``head`` as (header, numeric) and ``rows`` of ready cells."""
    cells = "".join(f'<th class="num">{esc(h)}</th>' if num else f"<th>{esc(h)}</th>" for h, num in head)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _events_table(m: Membership) -> str:
    reasons = any(e.get("reason") for e in m.events)
    head = [("Wall", True), ("Round", True), ("Site", False), ("Event", False), ("Healed from", False),
            ("Healing took", True)] + ([("Reason", False)] if reasons else [])
    changes = {id(e) for e in m.changes}
    rows = []
    for e in m.events:
        kind = str(e.get("kind"))
        cells = [
            _wall_cell(e.get("wall")),
            f'<td class="num">{esc(_plain(e.get("round")))}</td>',
            f"<td>{esc(_site_name(e.get('site')))}</td>",
            f"<td>{_kind(kind, kind)}</td>",
            f"<td>{esc(_site_name(e.get('healed_from')))}</td>",
            _cell(e.get("seconds"), fmt_seconds, _seconds_title, derived=False, key="seconds"),
        ]
        if reasons:
            cells.append(f'<td class="msg">{esc(e.get("reason") or "")}</td>')
        formation = "" if id(e) in changes else ' class="formation" title="the run forming"'
        rows.append(f"<tr{formation}>{''.join(cells)}</tr>")
    return _table(head, rows)


def _rejected_table(m: Membership) -> str:
    rows = [
        f"<tr>{_wall_cell(r.get('wall'))}<td class=\"num\">{esc(_plain(r.get('round')))}</td>"
        f"<td>{esc(_site_name(r.get('site')))}</td><td class=\"msg\">{esc(_plain(r.get('reason')))}</td></tr>"
        for r in m.rejected
    ]
    return _table([("Wall", True), ("Round", True), ("Site", False), ("Reason", False)], rows)


def _faults_table(m: Membership) -> str:
    rows = []
    for f in m.faults:
        action, site = str(f.get("action")), f.get("site")
        target = "coordinator" if site is None else _site_name(site)
        css = "coordinator" if site is None else action
        rows.append(f"<tr>{_wall_cell(f.get('wall'))}<td>{_kind(action, css)}</td><td>{esc(target)}</td>"
                    f"<td><code>{esc(_plain(f.get('spec')))}</code></td></tr>")
    return _table([("Wall", True), ("Fault", False), ("Target", False), ("As given", False)], rows)


def _failures_table(m: Membership) -> str:
    rows = [f"<tr>{_wall_cell(f.get('wall'))}<td>{esc(_site_name(f.get('site')))}</td>"
            f"<td class=\"msg\">{esc(_plain(f.get('message')))}</td></tr>" for f in m.failures]
    return _table([("Wall", True), ("Site", False), ("Message", False)], rows)


# (header, key, formatter, tooltip) for the per-site membership figures.
MEMBERSHIP_COLUMNS: list[_Row] = [
    ("Coordination", "coordination_seconds", fmt_seconds, _seconds_title),
    ("Processes run", "incarnations", _plain, None),
    ("Failed sync attempts", "failed_attempts", _plain, None),
]


def _coordination_table(m: Membership) -> str:
    columns = [c for c in MEMBERSHIP_COLUMNS if any(e.get(c[1]) is not None for e in m.per_site)]
    rows = []
    for e in m.per_site:
        # summary.json counts processes only for a site that ran more than one, and only for one that finished
        values = {"incarnations": 1, **e} if "coordination_seconds" in e else e
        cells = "".join(_cell(values.get(key), fmt, tip, derived=False, key=key) for _label, key, fmt, tip in columns)
        rows.append(f"<tr><td>{esc(_site_name(e['site']))}</td>{cells}</tr>")
    return _table([("Site", False), *((label, True) for label, *_ in columns)], rows)


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _membership_section(run: Run) -> list[str]:
    """The Membership section, or one line for a run whose membership never changed, or nothing for a run
    from before membership was recorded."""
    m = membership_of(run)
    sites = m.sites if m.sites is not None else len(sites_in(run))
    if not m.changed:
        if not m.recorded:
            return []
        return [f'<p class="footnote">Membership: {_count(sites, "site")}, no changes.</p>']
    kinds: dict[str, int] = {}
    for e in m.changes:
        kinds[str(e.get("kind"))] = kinds.get(str(e.get("kind")), 0) + 1
    said = [_count(sites, "site")] if sites else []
    if kinds:
        said.append(", ".join(f"{n} {esc(k)}" for k, n in kinds.items()))
    for items, word in ((m.rejected, "rejected update"), (m.faults, "injected fault"), (m.failures, "failure")):
        if items:
            said.append(_count(len(items), word))
    if m.sites_in_sync is not None:
        said.append("the sites that finished hold " + ("the same parameters" if m.sites_in_sync else
                                                        "<strong>different parameters</strong>"))
    parts = ["<h2>Membership</h2>", f'<p class="meta">{"".join(f"<span>{x}</span>" for x in said)}</p>']
    if m.events:
        parts += ["<h3>Events</h3>", _events_table(m)]
    if m.rejected:
        parts += ["<h3>Rejected updates</h3>", _rejected_table(m)]
    if m.faults:
        parts += ["<h3>Injected faults</h3>", _faults_table(m)]
    if m.failures:
        parts += ["<h3>Failures</h3>", _failures_table(m)]
    if any(len(e) > 1 for e in m.per_site):
        parts += ["<h3>Per site</h3>", _coordination_table(m),
                  '<p class="footnote">Coordination: time each site spent waiting on the coordinator (quorums, '
                  "votes, admissions), over its last process.</p>"]
    note = {
        "matched": "summary.json does not say when the run started (an older run); its times were matched with "
                   "the records of metrics.jsonl, to within a fraction of a second.",
        "start": "summary.json does not say when the run started (an older run); times from metrics.jsonl count "
                 "from the first site's start, and may sit some seconds off those from summary.json.",
    }.get(m.origin_source or "")
    parts.append('<p class="footnote">Wall: seconds since the run started. Round: the coordinator&#x27;s, when it '
                 f'logged the event (the latest any site had reported to it).{" " + esc(note) if note else ""}</p>')
    return parts


def _figure(key: str, png: bytes, caption: str) -> str:
    from geotrain.report.plots import PLOT_TITLES

    label = PLOT_TITLES.get(key, key)
    return (f'<figure id="fig-{esc(key)}"><img src="{png_data_uri(png)}" alt="{esc(label)}" width="1200">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def _power_section(run: Run, merged: dict[str, Any], per_site: list[dict[str, Any]], filled: set[tuple[int, str]],
                   figures: dict[str, bytes]) -> list[str]:
    """The Power section of a run that models its sites' power (step records with ``power_mw``, or per-site
    energy in the summary); nothing for one that does not."""
    series = run_power(run)
    keys = [c[1] for c in POWER_COLUMNS]
    if not series and not any(e.get(k) is not None for e in per_site for k in keys if k != "speed"):
        return []
    entries = [{**e, "speed": series[e["site"]].speed} if isinstance(e.get("site"), int) and e["site"] in series
               else e for e in per_site]
    said = []
    if merged.get("energy_mwh") is not None:
        said.append(f"{esc(_mwh(merged['energy_mwh']))} used by all sites")
    if merged.get("carbon_kg") is not None:
        said.append(f"carbon {esc(_kg(merged['carbon_kg']))}")
    offs = merged.get("power_offs")
    if isinstance(offs, int) and not isinstance(offs, bool):
        said.append(_count(offs, "power-off") if offs else "no site lost its power")
    columns = [c for c in POWER_COLUMNS if any(e.get(c[1]) is not None for e in entries)]
    rows = []
    for e in entries:
        cells = "".join(_cell(e.get(key), fmt, tip, derived=(e.get("site"), key) in filled, key=key)
                        for _label, key, fmt, tip in columns)
        rows.append(f"<tr><td>{esc(_site_name(e.get('site')))}</td>{cells}</tr>")
    parts = ['<h2 id="power">Power</h2>']
    if said:
        parts.append(f'<p class="meta">{"".join(f"<span>{x}</span>" for x in said)}</p>')
    parts += [_table([("Site", False), *((label, True) for label, *_ in columns)], rows),
              '<p class="footnote">Throttled: training seconds a site&#x27;s compute was held back by its power cap '
              "or its speed factor. Idle on network: seconds it was powered but waiting on the network. Smoothing: "
              "energy spent holding its draw flat through those waits. Figures add up every process a site ran.</p>"]
    parts += [_figure(key, figures[key], caption) for key, caption in POWER_CAPTIONS.items() if key in figures]
    return parts


def _meta_items(merged: dict[str, Any]) -> Iterable[str]:
    if merged.get("algorithm"):
        yield f"<span><strong>{esc(merged['algorithm'])}</strong></span>"
    sites = merged.get("sites")
    if sites is not None:
        workers = merged.get("workers_per_site")
        per = f" × {esc(workers)} workers" if workers not in (None, 1) else ""
        yield f"<span>{esc(sites)} sites{per}</span>"
    if merged.get("link"):
        yield f"<span>link {esc(merged['link'])}</span>"
    if merged.get("codec"):
        yield f"<span>codec {esc(merged['codec'])}</span>"
    if merged.get("sync_every") is not None:
        yield f"<span>H = {esc(merged['sync_every'])}</span>"


def render_report(run: Run, *, figures: dict[str, bytes] | None = None) -> str:
    """The report of ``run`` as an HTML string. ``figures`` defaults to :func:`plots.run_figures`."""
    from geotrain.report.plots import marks_membership, run_figures

    if figures is None:
        figures = run_figures(run)
    merged, filled = merged_summary(run)
    status, reason = run_status(run.summary)
    per_site, site_filled = _merge_per_site(run)

    title = f"geotrain report: {merged.get('algorithm') or 'run'} · {run.path.name}"
    parts: list[str] = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title>",
        f"<style>{CSS}</style></head><body><main>",
        "<header>",
        f'<h1>geotrain run report <span class="badge {status}" title="{esc(reason)}">{status}</span></h1>',
        f'<p class="meta">{"".join(_meta_items(merged))}</p>',
        f'<p class="path">{esc(run.path.resolve())}</p>',
        "</header>",
    ]

    if status != "ok" or run.problems:
        kind = "failed" if status == "failed" else "partial"
        headline = {
            "failed": "This run failed.",
            "partial": "This run is incomplete" + (" (stopped before the end)." if reason == "interrupted" else "."),
        }.get(status, "Notes on this run's files.")
        items = "".join(f"<li>{esc(p)}</li>" for p in run.problems)
        error = run.summary.get("error")
        err_html = f"<pre>{esc(error)}</pre>" if error else ""
        detail = (
            "Figures marked <span class=\"derived\">*</span> were rebuilt from metrics.jsonl." if filled or site_filled else ""
        )
        parts.append(
            f'<div class="note {kind}"><strong>{esc(headline)}</strong> {detail}{err_html}'
            + (f"<ul>{items}</ul>" if items else "")
            + "</div>"
        )

    parts += ["<h2>Summary</h2>", _summary_table(merged, filled)]
    if filled:
        parts.append('<p class="footnote"><span class="derived">*</span> not in summary.json; rebuilt from metrics.jsonl.</p>')
    parts += ["<h2>Per site</h2>", _site_table(per_site, site_filled)]
    parts += _membership_section(run)

    parts.append("<h2>Plots</h2>")
    marked = marks_membership(run)
    for key, png in figures.items():
        if key in POWER_CAPTIONS:
            continue
        caption = (marked and MEMBERSHIP_CAPTIONS.get(key)) or FIGURE_CAPTIONS.get(key, "")
        parts.append(_figure(key, png, caption))
    parts += _power_section(run, merged, per_site, site_filled, figures)

    config = run.summary.get("config")
    parts.append("<h2>Configuration</h2>")
    if isinstance(config, dict) and config:
        parts.append(f"<details><summary>Resolved configuration</summary><pre>{esc(toml_ish(config))}</pre></details>")
    else:
        parts.append('<p class="footnote">summary.json holds no resolved configuration.</p>')
    if run.summary:
        raw = json.dumps(run.summary, indent=2, ensure_ascii=False, default=str)
        parts.append(f"<details><summary>summary.json</summary><pre>{esc(raw)}</pre></details>")

    counts = ", ".join(f"{len(v)} {esc(k)}" for k, v in sorted(run.records.items())) or "no records"
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts.append(f"<footer>metrics.jsonl: {counts}. Generated by geotrain.report on {esc(stamp)}.</footer>")
    parts.append("</main></body></html>")
    return "\n".join(parts)


def write_report(run_dir: str | Path, *, out: str | Path | None = None) -> Path:
    """Read ``run_dir`` and write its report to ``out`` (default ``run_dir/report.html``); returns the path."""
    run = read_run(run_dir)
    path = Path(out) if out is not None else Path(run_dir) / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, render_report(run))
    return path
