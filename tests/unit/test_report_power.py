"""Tests of a run's power in its outputs: the power figures of summary.json, :func:`power_series`, and the Power
section of report.html.

A run directory is written the way the launcher writes one: the sites' record files (``sites/siteK.jsonl``),
then :func:`geotrain.summary.build_summary` and :func:`geotrain.summary.merge_metrics`. The run: two sites, a
step a training second and 0.125 grid hours, so every energy below is exact in binary. Site 0 runs at full
speed under a 20 MW cap that drops to 14 MW for steps 20-39 (it draws 18 MW, then 14); site 1 runs at speed
0.25 under 8 MW and draws 6 MW, loses its power after step 29 (30 s) and gets it back at 45 s, rejoining in
the same process and going on from step 45.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest

from geotrain.config import load_config
from geotrain.files import write_json_atomic
from geotrain.report.html import render_report, write_report
from geotrain.report.metrics import power_series, read_run
from geotrain.summary import build_summary, merge_metrics, read_site_records, run_figures

pytestmark = pytest.mark.timeout(60)

T0 = 1_800_000_000.0  # the launch, Unix seconds
STARTED = 4.0  # seconds after the launch at which the sites start training
STEPS, TOKENS_PER_STEP, GRID_HOURS_PER_STEP = 60, 1024, 0.125
OFF_AT, BACK_AT = 30.0, 45.0  # site 1's outage, training seconds


def start(site: int, *, at: float) -> dict[str, Any]:
    return {"kind": "start", "time": T0 + at, "site": site, "worker": 0, "pid": 4000 + site, "steps_planned": STEPS,
            "settings": {"sync_every": 5, "fragments": 1, "overlap_steps": 0, "overlap": False}}


def cap_of(site: int, step: int) -> float:
    if site == 1:
        return 8.0
    return 14.0 if 20 <= step < 40 else 20.0


def steps(site: int, done_steps: range, *, energy: float = 0.0, throttled: float = 0.0
          ) -> tuple[list[dict[str, Any]], float, float]:
    """Step records (one per step) and the site's energy and throttled seconds after them."""
    rows = []
    speed = 1.0 if site == 0 else 0.25
    for step in done_steps:
        wall = step + 1.0
        cap = cap_of(site, step)
        power = min(18.0, cap) if site == 0 else 6.0
        energy += power * GRID_HOURS_PER_STEP
        # site 0 is held back under the low cap, site 1 by its speed
        throttled += 0.25 if (site == 0 and cap < 18.0) else (0.75 if site == 1 else 0.0)
        rows.append({"kind": "step", "time": T0 + STARTED + wall, "site": site, "step": step,
                     "tokens": (step + 1) * TOKENS_PER_STEP, "loss": 5.0 - 0.02 * step, "lr": 1e-3, "wall_s": wall,
                     "compute_s": 0.8 * wall, "comm_s": 0.1 * wall, "wan_bytes": 1000 * step,
                     "outer_rounds": (step + 1) // 5, "utilization": 0.8,
                     "trained_tokens": (step + 1) * TOKENS_PER_STEP,
                     "power_mw": power, "cap_mw": cap, "energy_mwh": energy, "throttled_s": throttled,
                     "grid_hours": wall * GRID_HOURS_PER_STEP, "active": power / cap, "speed": speed})
    return rows, energy, throttled


def done(site: int, *, energy: float, peak: float, throttled: float, carbon: float | None) -> dict[str, Any]:
    return {"kind": "done", "time": T0 + STARTED + STEPS + 0.5, "site": site, "eval_loss": 3.9,
            "params_sha256": "cd" * 32, "stopped_early": False, "steps": STEPS, "tokens": STEPS * TOKENS_PER_STEP,
            "wan_bytes": 59_000, "compute_seconds": 48.0, "comm_seconds": 6.0, "wall_seconds": float(STEPS),
            "utilization": 0.8, "outer_rounds": 12, "energy_mwh": energy, "peak_power_mw": peak,
            "throttled_seconds": throttled, "carbon_kg": carbon, "smoothing_mwh": 0.5 + site, "idle_seconds": 3.0}


def power_records(*, finished: bool = True) -> dict[int, list[dict[str, Any]]]:
    """The two sites' records; with ``finished=False`` site 1 stops without its done record."""
    site0, energy0, throttled0 = steps(0, range(STEPS))
    assert (energy0, throttled0) == (125.0, 5.0)
    site0 = [start(0, at=STARTED), *site0, done(0, energy=energy0, peak=18.0, throttled=throttled0, carbon=50_000.0)]

    before, energy1, throttled1 = steps(1, range(30))
    after, energy1, throttled1 = steps(1, range(45, STEPS), energy=energy1, throttled=throttled1)
    assert (energy1, throttled1) == (33.75, 33.75)
    site1 = [start(1, at=STARTED), *before,
             {"kind": "power_off", "time": T0 + STARTED + OFF_AT, "site": 1, "step": 29, "wall_s": OFF_AT,
              "grid_hours": OFF_AT * GRID_HOURS_PER_STEP, "back_at_s": BACK_AT},
             {"kind": "power_on", "time": T0 + STARTED + BACK_AT, "site": 1, "wall_s": BACK_AT,
              "grid_hours": BACK_AT * GRID_HOURS_PER_STEP},
             {"kind": "healed", "time": T0 + STARTED + BACK_AT + 0.1, "site": 1, "healed_from": 0, "seconds": 0.1,
              "bytes": 1000, "step": 44, "generation": 2},
             start(1, at=STARTED + BACK_AT + 0.2),
             *after]
    if finished:
        site1.append(done(1, energy=energy1, peak=6.0, throttled=throttled1, carbon=12_000.5))
    return {0: site0, 1: site1}


def write_run(out: Path, records: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    """What ``geotrain.train.outputs.write_run_files`` does, less the report."""
    (out / "sites").mkdir(parents=True, exist_ok=True)
    for site, rows in records.items():
        (out / "sites" / f"site{site}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(values={"run.sites": len(records), "outer.sync_every": 5}).to_dict()
    summary = build_summary(config, read_site_records(out, len(records)), elapsed_seconds=STEPS + 6.0, ok=True,
                            started_at=T0)
    write_json_atomic(out / "summary.json", summary)
    merge_metrics(out, records)
    return summary


def without_power(records: dict[int, list[dict[str, Any]]]) -> dict[int, list[dict[str, Any]]]:
    """The same run as one that does not model power writes it."""
    power = {"power_mw", "cap_mw", "energy_mwh", "throttled_s", "grid_hours", "active", "speed", "peak_power_mw",
             "throttled_seconds", "carbon_kg", "smoothing_mwh", "idle_seconds"}
    return {site: [{k: v for k, v in r.items() if k not in power} for r in rows
                   if r["kind"] not in ("power_off", "power_on")] for site, rows in records.items()}


def figures_section(page: str) -> str:
    return page[page.index('<h2 id="power">'):]


# --- summary.json ------------------------------------------------------------------------------------------------


def test_summary_gives_each_sites_power_and_the_runs_totals(tmp_path: Path) -> None:
    summary = write_run(tmp_path, power_records())
    site0, site1 = summary["per_site"]
    assert {k: site0[k] for k in ("energy_mwh", "peak_power_mw", "throttled_seconds", "carbon_kg", "smoothing_mwh",
                                  "idle_seconds")} == {"energy_mwh": 125.0, "peak_power_mw": 18.0,
                                                       "throttled_seconds": 5.0, "carbon_kg": 50_000.0,
                                                       "smoothing_mwh": 0.5, "idle_seconds": 3.0}
    # site 1 rejoined in the same process: its done record's figures already hold both stretches
    assert {k: site1[k] for k in ("energy_mwh", "peak_power_mw", "throttled_seconds", "carbon_kg",
                                  "smoothing_mwh")} == {"energy_mwh": 33.75, "peak_power_mw": 6.0,
                                                        "throttled_seconds": 33.75, "carbon_kg": 12_000.5,
                                                        "smoothing_mwh": 1.5}
    assert summary["energy_mwh"] == 158.75
    assert summary["carbon_kg"] == 62_000.5
    assert summary["power_offs"] == 1


def test_an_unfinished_site_gives_its_latest_steps_energy_and_no_total_carbon(tmp_path: Path) -> None:
    summary = write_run(tmp_path, power_records(finished=False))
    site1 = summary["per_site"][1]
    assert site1["complete"] is False
    assert (site1["energy_mwh"], site1["throttled_seconds"]) == (33.75, 33.75)
    assert "carbon_kg" not in site1 and "peak_power_mw" not in site1
    assert summary["energy_mwh"] == 158.75  # every site has its energy
    assert summary["carbon_kg"] is None  # site 1 has no carbon figure
    # the report rebuilds the same figures from metrics.jsonl
    rebuilt = run_figures(power_records(finished=False))
    assert rebuilt["per_site"][1]["energy_mwh"] == 33.75 and rebuilt["power_offs"] == 1


def test_a_site_started_again_in_a_new_process_adds_up_both_processes() -> None:
    """A process counts its energy from zero; one killed without a done record leaves its latest step's."""
    first, energy, throttled = steps(1, range(10))
    again, energy2, throttled2 = steps(1, range(10, 20))  # a new process: counts from zero again
    rows = [start(1, at=STARTED), *first, {**start(1, at=30.0), "pid": 5000}, *again,
            done(1, energy=energy2, peak=6.0, throttled=throttled2, carbon=100.0)]
    [site] = run_figures({1: rows})["per_site"]
    assert site["energy_mwh"] == energy + energy2 == 15.0
    assert site["throttled_seconds"] == throttled + throttled2 == 15.0
    # the first process wrote no done record: the figures only that record gives are unknown for the site
    assert site["peak_power_mw"] is None and site["carbon_kg"] is None and site["smoothing_mwh"] is None
    series = power_series({1: rows})[1]
    assert series.energy_mwh[-1] == 15.0  # the second process's count goes on from the first's


def test_power_series_gives_the_plots_each_sites_figures_and_outage(tmp_path: Path) -> None:
    records = power_records()
    summary = write_run(tmp_path, records)
    series = power_series(records)
    assert set(series) == {0, 1}
    s0, s1 = series[0], series[1]
    assert s0.wall_s == [step + 1.0 for step in range(STEPS)]
    assert s0.grid_hours == [(step + 1) * GRID_HOURS_PER_STEP for step in range(STEPS)]
    assert s0.cap_mw == [cap_of(0, step) for step in range(STEPS)]
    assert s0.power_mw[19:21] == [18.0, 14.0] and s0.off == [] and s0.speed == 1.0
    assert len(s1.wall_s) == 45 and s1.off == [(OFF_AT, BACK_AT)] and s1.speed == 0.25
    assert [s.energy_mwh[-1] for s in (s0, s1)] == [e["energy_mwh"] for e in summary["per_site"]]
    # the same from metrics.jsonl, as the report reads it
    from geotrain.report.metrics import run_power

    assert run_power(read_run(tmp_path)) == series


def test_an_outage_without_its_power_on_ends_when_the_site_said_it_would() -> None:
    rows = [r for r in power_records(finished=False)[1] if r["kind"] != "power_on"]
    assert power_series({1: rows})[1].off == [(OFF_AT, BACK_AT)]
    rows = [{**r, "back_at_s": None} if r["kind"] == "power_off" else r for r in rows]
    assert power_series({1: rows})[1].off == [(OFF_AT, None)]


# --- report.html -------------------------------------------------------------------------------------------------


def test_report_shows_the_power_section_with_its_table_and_figures(tmp_path: Path) -> None:
    write_run(tmp_path, power_records())
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 6  # the four of every run, and the two power figures
    power = figures_section(page)
    assert '<figure id="fig-power">' in power and '<figure id="fig-energy">' in power
    assert '<figure id="fig-loss_tokens">' in page[:page.index('<h2 id="power">')]
    assert "159 MWh used by all sites" in power and "carbon 62,000 kg" in power and "1 power-off" in power
    table = power[:power.index("</table>")]
    rows = re.findall(r"<tr><td>site (\d)</td>(.*?)</tr>", table)
    assert [site for site, _ in rows] == ["0", "1"]
    assert ">125 MWh<" in rows[0][1] and ">18 MW<" in rows[0][1] and ">50,000 kg<" in rows[0][1]
    assert ">0.25<" in rows[1][1] and ">33.8 MWh<" in rows[1][1] and ">12,000 kg<" in rows[1][1]


def test_a_run_without_power_has_no_power_section(tmp_path: Path) -> None:
    summary = write_run(tmp_path, without_power(power_records()))
    assert summary["energy_mwh"] is None and summary["carbon_kg"] is None and summary["power_offs"] == 0
    assert not any(k in e for e in summary["per_site"] for k in ("energy_mwh", "peak_power_mw", "carbon_kg"))
    run = read_run(tmp_path)
    assert power_series({s: [r for r in run.records["step"] if r["site"] == s] for s in (0, 1)}) == {}
    page = render_report(run)
    assert 'id="power"' not in page and "fig-power" not in page and "fig-energy" not in page
    assert page.count("data:image/png;base64,") == 4


def test_the_power_figures_draw_with_a_site_off_to_the_end(tmp_path: Path) -> None:
    """A run stopped while a site's power was off, its return not announced: the figures still draw."""
    records = power_records(finished=False)
    records[1] = [{**r, "back_at_s": None} if r["kind"] == "power_off" else r
                  for r in records[1][:records[1].index(next(r for r in records[1] if r["kind"] == "power_on"))]]
    write_run(tmp_path, records)
    from geotrain.report.plots import power_figures

    pngs = power_figures(read_run(tmp_path))
    assert set(pngs) == {"power", "energy"} and all(p.startswith(b"\x89PNG") for p in pngs.values())


# --- live progress -----------------------------------------------------------------------------------------------


def live_lines(records: list[dict[str, Any]], *, terminal: bool = False) -> str:
    from rich.console import Console

    from geotrain.report.live import LiveProgress

    buf = io.StringIO()
    console = Console(file=buf, width=160, force_terminal=terminal, color_system=None)
    with LiveProgress(2, title="power", total_tokens=2 * STEPS * TOKENS_PER_STEP, console=console,
                      clock=lambda: 0.0) as live:
        live.update(records)
    return buf.getvalue()


def test_live_progress_shows_each_sites_draw_and_cap_or_that_its_power_is_off() -> None:
    records = power_records()
    by_time = sorted((r for rows in records.values() for r in rows), key=lambda r: r["time"])
    outage = [r for r in by_time if r["time"] <= T0 + STARTED + OFF_AT]
    text = live_lines(outage)  # at 30 s: site 0 under its low cap, site 1 without power
    assert "site 0:" in text and "power 14/14 MW" in text.split("site 0:")[1].splitlines()[0]
    assert "power off" in text.split("site 1:")[1].splitlines()[0]
    assert "power 6/8 MW" in live_lines(by_time).split("site 1:")[1].splitlines()[0]  # back after 45 s
    assert "power 18/20 MW" in live_lines(by_time).split("site 0:")[1].splitlines()[0]
    assert "draw/cap" in live_lines(by_time, terminal=True)
    quiet = sorted((r for rows in without_power(records).values() for r in rows), key=lambda r: r["time"])
    assert "power" not in live_lines(quiet).replace("[power]", "")
    assert "draw/cap" not in live_lines(quiet, terminal=True)


def test_final_table_gives_the_runs_energy_and_carbon(tmp_path: Path) -> None:
    from rich.console import Console

    from geotrain.report.live import final_table

    buf = io.StringIO()
    Console(file=buf, width=200).print(final_table(write_run(tmp_path, power_records())))
    assert "energy 159 MWh" in buf.getvalue() and "carbon 62,000 kg" in buf.getvalue()
