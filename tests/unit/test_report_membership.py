"""Tests of the report's membership: the Membership section of report.html and the marks on its wall-time figures.

A run directory is written the way the launcher writes one: the sites' record files (``sites/siteK.jsonl``, the
records :class:`geotrain.train.recorder.Recorder` writes, with Unix times), the coordinator's events and the
launcher's faults as they are logged, then :func:`geotrain.summary.build_summary` and
:func:`geotrain.summary.merge_metrics`. The run: three sites; site 1 is killed at 12 s, comes back and is healed
from site 0, and starts its clock again; site 2 sends an outlier that the guards reject.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from geotrain.config import load_config
from geotrain.files import write_json_atomic
from geotrain.report.html import esc, render_report, write_report
from geotrain.report.metrics import membership_of, read_run
from geotrain.report.plots import DPI, loss_vs_wall_png, marks_membership, wan_bytes_png
from geotrain.summary import build_summary, merge_metrics

pytestmark = pytest.mark.timeout(60)

T0 = 1_800_000_000.0  # the launch, Unix seconds
STEPS, SYNC_EVERY, TOKENS_PER_STEP = 40, 5, 1024
REASON = "norm 300 is 100x the running median 3 (guard.outlier_factor=10)"


def step_time(step: int) -> float:
    """Seconds since the launch at which a site finishes inner step ``step`` (all sites keep pace)."""
    return 4.0 + 0.6 * (step + 1)


def site_records(site: int, steps: range, *, started: float, first: bool = True) -> list[dict[str, Any]]:
    """One process of a site: its start record, steps (``wall_s`` counts from this process's start), syncs and,
    for site 0, evals."""
    rows: list[dict[str, Any]] = [{"kind": "start", "time": T0 + started, "site": site, "worker": 0,
                                   "steps_planned": STEPS, "param_bytes": 400_000, "sync_payloads": [100_000],
                                   "payload_bytes_per_sync": 400_000, "collective": "all_reduce",
                                   "settings": {"sync_every": SYNC_EVERY, "fragments": 1, "overlap_steps": 0,
                                                "overlap": False}, "resumed": False if first else None}]
    for step in steps:
        t = step_time(step)
        wall = t - started
        rounds = (step + 1) // SYNC_EVERY
        if (step + 1) % SYNC_EVERY == 0:
            rows.append({"kind": "sync", "time": T0 + t, "site": site, "step": step, "transfer": rounds - 1,
                         "wall_s": wall, "bytes": 100_000, "seconds": 0.1})
        rows.append({"kind": "step", "time": T0 + t, "site": site, "step": step, "tokens": (step + 1) * TOKENS_PER_STEP,
                     "loss": 5.0 - 0.05 * step, "lr": 1e-3, "wall_s": wall, "compute_s": 0.5 * (step + 1 - steps[0]),
                     "comm_s": 0.1 * rounds, "wan_bytes": 100_000 * rounds, "outer_rounds": rounds,
                     "utilization": 0.8, "trained_tokens": (step + 1 - steps[0]) * TOKENS_PER_STEP})
        if site == 0 and (step + 1) % 10 == 0:
            rows.append({"kind": "eval", "time": T0 + t + 0.01, "site": 0, "step": step,
                         "tokens": 3 * (step + 1) * TOKENS_PER_STEP, "wall_s": wall, "eval_loss": 5.1 - 0.05 * step,
                         "wan_bytes": 300_000 * rounds, "outer_rounds": rounds})
    return rows


def done(site: int, *, coordination: float, failed: int, steps_trained: int) -> dict[str, Any]:
    return {"kind": "done", "time": T0 + 28.5, "site": site, "eval_loss": 3.2, "params_sha256": "ab" * 32,
            "stopped_early": False, "steps": STEPS, "steps_trained": steps_trained,
            "tokens": steps_trained * TOKENS_PER_STEP, "wan_bytes": 800_000, "compute_seconds": 0.5 * steps_trained,
            "comm_seconds": 0.8, "wall_seconds": 24.0, "utilization": 0.8, "outer_rounds": 8,
            "coordination_seconds": coordination, "failed_attempts": failed}


def rejected(site: int, at: float) -> dict[str, Any]:
    return {"kind": "rejected", "time": T0 + at, "site": site, "step": 24, "wall_s": at - 4.0, "sync": 4,
            "key": "outer", "round": 5, "rejected_site": 2, "reason": REASON, "norm": 300.0}


def events() -> list[dict[str, Any]]:
    """The coordinator's events as it logs them (``membership.jsonl``)."""
    joined = [{"site": k, "kind": "joined", "round": 0, "time": T0 + 3.0, "generation": 0} for k in range(3)]
    return joined + [
        {"site": 1, "kind": "left", "round": 2, "time": T0 + 12.0, "generation": 0,
         "reason": "connection closed (the process ended or was killed)"},
        {"site": 1, "kind": "rejoined", "round": 4, "time": T0 + 20.0, "generation": 2, "healed_from": 0},
        {"site": 1, "kind": "healed", "round": 4, "time": T0 + 21.5, "generation": 2, "healed_from": 0,
         "seconds": 1.25, "bytes": 400_000, "wait_seconds": 1.5, "step": 29},
    ]


def faults() -> list[dict[str, Any]]:
    """The faults the launcher carried out, as it logs them (``faults.jsonl``)."""
    return [{"action": "kill", "site": 1, "round": 2, "seconds": None, "factor": None, "spec": "kill:1@2",
             "time": T0 + 11.9},
            {"action": "rejoin", "site": 1, "round": 4, "seconds": None, "factor": None, "spec": "rejoin:1@4",
             "time": T0 + 16.0}]


def write_run(out: Path, records: dict[int, list[dict[str, Any]]], *, membership: list[dict[str, Any]],
              launched: list[dict[str, Any]]) -> dict[str, Any]:
    """What ``geotrain.train.outputs.write_run_files`` does, less the report: the tests render it themselves."""
    out.mkdir(parents=True, exist_ok=True)
    for site, rows in records.items():
        (out / "sites").mkdir(exist_ok=True)
        (out / "sites" / f"site{site}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(values={"run.sites": len(records), "outer.sync_every": SYNC_EVERY}).to_dict()
    summary = build_summary(config, records, elapsed_seconds=29.0, ok=True, membership=membership, faults=launched,
                            started_at=T0)
    write_json_atomic(out / "summary.json", summary)
    merge_metrics(out, records)
    return summary


def make_elastic_run(out: Path) -> dict[str, Any]:
    site0 = site_records(0, range(STEPS), started=4.0) + [rejected(0, 24.6),
                                                          done(0, coordination=2.5, failed=1, steps_trained=STEPS)]
    # killed after step 11 (at 11.2 s); back at 22 s, healed to step 30, with its own clock started again
    site1 = site_records(1, range(12), started=4.0) + [
        {"kind": "healed", "time": T0 + 21.5, "site": 1, "healed_from": 0, "seconds": 1.25, "bytes": 400_000,
         "step": 29, "generation": 2},
        *site_records(1, range(30, STEPS), started=22.0, first=False),
        done(1, coordination=1.75, failed=0, steps_trained=22),
    ]
    site2 = site_records(2, range(STEPS), started=4.0)
    at = next(i for i, r in enumerate(site2) if r.get("step") == 23)
    site2[at:at] = [{"kind": "fault", "time": T0 + 18.2, "site": 2, "step": 23, "fault": "outlier:100:2@5"}]
    site2 += [rejected(2, 24.5), done(2, coordination=3.0, failed=1, steps_trained=STEPS)]
    return write_run(out, {0: site0, 1: site1, 2: site2}, membership=events(), launched=faults())


def make_steady_run(out: Path) -> dict[str, Any]:
    """The same three sites, nothing happening to them: they join as the run forms and finish."""
    records = {k: site_records(k, range(STEPS), started=4.0)
               + [done(k, coordination=0.5, failed=0, steps_trained=STEPS)] for k in range(3)}
    return write_run(out, records, membership=events()[:3], launched=[])


def section(page: str, heading: str) -> str:
    """The HTML from ``<h3>heading</h3>`` to the end of the table after it."""
    start = page.index(f"<h3>{heading}</h3>")
    return page[start:page.index("</table>", start)]


def rows(html_table: str) -> list[list[str]]:
    """The body rows of a table as lists of cell texts (tags stripped)."""
    body = html_table[html_table.index("<tbody>"):]
    return [[re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", row)]
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body)]


def png_size(png: bytes) -> tuple[int, int]:
    return struct.unpack(">II", png[16:24])


def stand_in() -> dict[str, bytes]:
    return {"loss_tokens": b"\x89PNG\r\n\x1a\n"}  # figures are tested on their own; a stand-in keeps page tests fast


# --- what the report reads ---------------------------------------------------------------------------------------


def test_membership_reads_events_faults_and_rejections_on_the_run_clock(tmp_path: Path) -> None:
    make_elastic_run(tmp_path)
    m = membership_of(read_run(tmp_path))
    assert m.origin == T0 and m.origin_source == "summary"
    assert m.changed
    assert [(e["site"], e["kind"], e["wall"]) for e in m.changes] == [(1, "left", 12.0), (1, "rejoined", 20.0),
                                                                        (1, "healed", 21.5)]
    # the launcher's faults from the summary, the site's own outlier from its fault record, in time order
    assert [(f["action"], f["site"]) for f in m.faults] == [("kill", 1), ("rejoin", 1), ("outlier", 2)]
    assert [f["wall"] for f in m.faults] == pytest.approx([11.9, 16.0, 18.2])
    # two members recorded the same rejection; it was decided when the first did
    assert len(m.rejected) == 1
    assert m.rejected[0]["site"] == 2 and m.rejected[0]["round"] == 5
    assert m.rejected[0]["wall"] == pytest.approx(24.5)
    # (times here are whole or half seconds past a whole T0: exact in floating point)
    assert m.intervals()[1] == [(3.0, 12.0, "member"), (12.0, 20.0, "out"), (20.0, 21.5, "healing"),
                                (21.5, 28.5, "member")]
    assert m.intervals()[0] == [(3.0, 28.5, "member")]


def test_a_run_without_changes_has_nothing_to_mark(tmp_path: Path) -> None:
    make_steady_run(tmp_path)
    m = membership_of(read_run(tmp_path))
    assert m.recorded and not m.changed
    assert len(m.events) == 3 and m.changes == []


# --- the Membership section --------------------------------------------------------------------------------------


def test_membership_section_lists_events_rejections_faults_and_coordination(tmp_path: Path) -> None:
    make_elastic_run(tmp_path)
    page = render_report(read_run(tmp_path), figures=stand_in())
    assert "<h2>Membership</h2>" in page
    assert page.index("<h2>Per site</h2>") < page.index("<h2>Membership</h2>") < page.index("<h2>Plots</h2>")
    assert "<span>1 left, 1 rejoined, 1 healed</span>" in page
    assert "<span>1 rejected update</span>" in page and "<span>3 injected faults</span>" in page
    # wall, round, site, event, healed from, healing took, reason
    events_rows = rows(section(page, "Events"))
    assert events_rows == [
        ["3.0 s", "0", "site 0", "joined", "—", "—", ""],
        ["3.0 s", "0", "site 1", "joined", "—", "—", ""],
        ["3.0 s", "0", "site 2", "joined", "—", "—", ""],
        ["12.0 s", "2", "site 1", "left", "—", "—", "connection closed (the process ended or was killed)"],
        ["20.0 s", "4", "site 1", "rejoined", "site 0", "—", ""],
        ["21.5 s", "4", "site 1", "healed", "site 0", "1.2 s", ""],
    ]
    assert rows(section(page, "Rejected updates")) == [["24.5 s", "5", "site 2", REASON]]
    assert rows(section(page, "Injected faults")) == [["11.9 s", "kill", "site 1", "kill:1@2"],
                                                       ["16.0 s", "rejoin", "site 1", "rejoin:1@4"],
                                                       ["18.2 s", "outlier", "site 2", "outlier:100:2@5"]]
    # coordination seconds, processes run (site 1 ran two), failed sync attempts
    assert rows(section(page, "Per site")) == [["site 0", "2.5 s", "1", "1"], ["site 1", "1.8 s", "2", "0"],
                                               ["site 2", "3.0 s", "1", "1"]]
    assert "Failures" not in page  # no site failed


def test_run_without_membership_changes_keeps_its_report_clean(tmp_path: Path) -> None:
    make_steady_run(tmp_path)
    page = render_report(read_run(tmp_path), figures=stand_in())
    assert "<h2>Membership</h2>" not in page and "<h3>Events</h3>" not in page
    assert "Membership: 3 sites, no changes." in page


def test_report_of_a_run_from_before_membership_renders_without_it(tmp_path: Path) -> None:
    from test_report import make_run  # the report tests' hand-written run: no membership keys at all

    make_run(tmp_path, sites=2, steps=40, sync_every=10)
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 4
    assert "Membership" not in page
    assert not marks_membership(read_run(tmp_path))


def test_failures_are_listed_and_text_from_the_run_is_escaped(tmp_path: Path) -> None:
    make_elastic_run(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    summary["failures"] = [{"site": 2, "message": "RuntimeError: <gloo> closed", "wall": 27.0}]
    summary["membership"][3]["reason"] = "<script>alert(1)</script>"
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    page = render_report(read_run(tmp_path), figures=stand_in())
    assert rows(section(page, "Failures")) == [["27.0 s", "site 2", esc("RuntimeError: <gloo> closed")]]
    assert "<script>" not in page and esc("<script>alert(1)</script>") in page


def test_older_summary_without_started_at_is_aligned_from_the_log(tmp_path: Path) -> None:
    make_elastic_run(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    del summary["started_at"]
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    m = membership_of(read_run(tmp_path))
    # the healed event and site 1's own healed record are the same moment: the log's times line up again
    assert m.origin_source == "matched" and m.origin == pytest.approx(T0)
    assert m.rejected[0]["wall"] == pytest.approx(24.5)
    page = render_report(read_run(tmp_path), figures=stand_in())
    assert "matched with the records of metrics.jsonl" in page


def test_damaged_membership_entries_do_not_break_the_report(tmp_path: Path) -> None:
    make_elastic_run(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    summary["membership"] += [7, {"kind": "exploded", "site": 1}, {"kind": "left", "site": "x", "wall": "soon"},
                              {"kind": "rejoined", "site": [1], "wall": 25.0}]
    summary["faults"] = "none"
    summary["rejected_updates"] = [None, {"site": None, "round": "five", "sync": 4}]
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 4
    assert "exploded" not in section(page, "Events")
    assert ["—", "—", "site x", "left", "—", "—", ""] in rows(section(page, "Events"))
    assert ["25.0 s", "—", "site [1]", "rejoined", "—", "—", ""] in rows(section(page, "Events"))
    assert rows(section(page, "Rejected updates")) == [["—", "five", "—", "—"]]  # no site: no time from the log


# --- the figures ---------------------------------------------------------------------------------------------------


def test_wall_time_figures_gain_membership_lanes_only_when_membership_changed(tmp_path: Path) -> None:
    make_elastic_run(tmp_path / "elastic")
    make_steady_run(tmp_path / "steady")
    elastic, steady = read_run(tmp_path / "elastic"), read_run(tmp_path / "steady")
    assert marks_membership(elastic) and not marks_membership(steady)
    plain = png_size(loss_vs_wall_png(steady))
    assert plain == (1200, int(4.5 * DPI))  # as before membership was marked
    width, height = png_size(loss_vs_wall_png(elastic))
    assert width == 1200 and height > plain[1] + 0.5 * DPI  # a lane per site above the losses, a legend below
    assert png_size(wan_bytes_png(elastic)) == png_size(wan_bytes_png(steady))
    page = render_report(elastic)
    assert "Top: each site&#x27;s membership" in page
    assert "Top: each site" not in render_report(steady, figures=stand_in())


def test_a_site_that_came_back_is_drawn_where_it_trained(tmp_path: Path) -> None:
    from geotrain.report.plots import _figure, _loss_panel

    make_elastic_run(tmp_path)
    run = read_run(tmp_path)
    m = membership_of(run)
    fig, (ax,) = _figure(4.5)
    _loss_panel(ax, run, x="wall_s", origin=m.origin, time_scale=(1.0, "s"))
    line = next(ln for ln in ax.get_lines() if ln.get_label() == "site 1 train (EMA)")
    x = np.asarray(line.get_xdata(), dtype=float)
    gap = int(np.flatnonzero(np.isnan(x))[0])  # the line breaks while the site was away
    assert np.nanmax(x[:gap]) < 12.0 and np.nanmin(x[gap + 1:]) > 21.5
    assert x[gap + 1:] == pytest.approx([step_time(s) for s in range(30, STEPS)])
    assert ax.get_xlabel() == "time since the run started (s)"


def test_the_eval_line_breaks_only_where_no_site_was_in_the_run() -> None:
    from geotrain.report.plots import _idle

    stopped_and_resumed = {0: [(0.0, 5.0, "member"), (5.0, 9.0, "out"), (9.0, 12.0, "member")],
                           1: [(0.0, 4.0, "member"), (4.0, 9.5, "out"), (9.5, 12.0, "member")]}
    assert _idle(stopped_and_resumed) == [(5.0, 9.0)]
    one_away = {0: [(0.0, 12.0, "member")], 1: [(0.0, 4.0, "member"), (4.0, 6.0, "out"), (6.0, 7.0, "healing"),
                                                 (7.0, 12.0, "member")]}
    assert _idle(one_away) == []
