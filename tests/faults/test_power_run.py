"""A whole run under a grid trace: a site's power fails for a window, it leaves, the other trains on, it asks to
join again (with time-based rounds of 1 s a round before the power returns; with H-step rounds when it is back),
is healed, trains from the moment its power is back, and the run finishes (exit 0). The records show every step's
draw at or under its cap, ramps within the limit between steps, and energy that adds up.

Every training step takes at least 10 ms (``floored_workload``) and the sites run at half speed
(``run.site_speeds``: each step held back to twice that), so the run's 700 steps last at least 14 s of training on
any machine (a loaded one only takes longer): the outage (2.5 s to 5 s of training) falls inside it with time to
spare for the site's return and healing, while the processes mostly sleep.
"""

from __future__ import annotations

import json

import pytest

from _utils.runs import read_jsonl, run_tiny
from _utils.workloads import floored_workload
from geotrain.report.metrics import logged_energy_mwh

pytestmark = pytest.mark.timeout(300)

TIME_SCALE = 360.0  # grid seconds per training second: 1 s of training is 6 grid minutes
RAMP = 10.0  # MW per grid minute


ROUNDS = {"timed": {"outer.sync_every_seconds": 1.0}, "steps": {"outer.sync_every": 20}}


def _grid_run(out, rounds):
    return run_tiny(out, workload_factory=floored_workload, factory_kwargs={"floor_s": 0.01}, **ROUNDS[rounds], **{
        "run.sites": 2, "run.tokens": 256 * 700, "run.log_every": 1,
        "outer.warmup_steps": 0, "comm.overlap": False, "run.site_speeds": [0.5, 0.5],
        "sites.power_cap_mw": 100, "grid.time_scale": TIME_SCALE, "grid.ramp_mw_per_min": RAMP,
        "grid.traces": [{"site": "site1", "hours": [0, 0.25, 0.5], "values": [1.0, 0.0, 1.0],
                         "interpolate": "step"}],
    })


def _before(rows, kind):
    """The step records just before each record of ``kind``."""
    out, last = [], None
    for r in rows:
        if r["kind"] == "step" and "run_s" in r:
            last = r
        elif r["kind"] == kind and last is not None:
            out.append(last)
    return out


def _incarnations(rows):
    """A site's step records cut where it left for an outage (or was healed): each piece is one stretch of
    training whose consecutive records the ramp and energy checks may compare."""
    pieces = [[]]
    for r in rows:
        if r["kind"] in ("power_off", "start") and pieces[-1]:
            pieces.append([])
        if r["kind"] == "step" and "power_mw" in r:
            pieces[-1].append(r)
    return [p for p in pieces if p]


@pytest.mark.parametrize("rounds", ["timed", "steps"])
def test_a_site_leaves_when_its_power_fails_and_is_healed_when_it_returns(tmp_path, rounds):
    assert _grid_run(tmp_path, rounds).exit_code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] and summary["sites_in_sync"]
    site1 = read_jsonl(tmp_path / "sites" / "site1.jsonl")
    kinds = [r["kind"] for r in site1]
    assert "power_off" in kinds and "power_on" in kinds and "healed" in kinds
    off = next(r for r in site1 if r["kind"] == "power_off")
    assert off["back_at_s"] == pytest.approx(0.5 * 3600 / TIME_SCALE)  # 00:30 of grid time: 5 s of training
    assert kinds.index("power_off") < kinds.index("healed") < kinds.index("power_on")
    on = next(r for r in site1 if r["kind"] == "power_on")
    assert on["wall_s"] == off["back_at_s"]
    back = [r for r in site1[kinds.index("power_on"):] if r["kind"] == "step"]
    assert back and all(r["run_s"] >= off["back_at_s"] for r in back)  # no step before its power returned
    # Time-based rounds: site1 asked to join a round (1 s) before its power returned. Where site0 admitted and
    # healed it before then, site1 was back in the run early and its first step waited for the power; where
    # after (a slow machine), it trained at once. H-step rounds: it asks when the power is back, never early.
    healed = next(r for r in site1 if r["kind"] == "healed")
    # with time-based rounds the heal (no link: no time) goes in the background, site0 training on meanwhile
    admitted = [r for r in read_jsonl(tmp_path / "sites" / "site0.jsonl") if r["kind"] == "admitted"]
    assert healed["background"] is (rounds == "timed") and admitted[-1]["background"] is healed["background"]
    admitted_at = [r["run_s"] for r in _before(read_jsonl(tmp_path / "sites" / "site0.jsonl"), "admitted")]
    assert admitted_at, "site0 admitted site1"
    in_early = admitted_at[-1] + healed["seconds"]  # on the run's clock, as site0 counted it
    waited = back[0].get("powered_off_s", 0.0)
    if rounds == "steps" or in_early > off["back_at_s"] + 0.05:
        assert waited == 0.0
    elif in_early < off["back_at_s"] - 0.05:
        assert waited == pytest.approx(off["back_at_s"] - in_early, abs=0.5)
    site0 = read_jsonl(tmp_path / "sites" / "site0.jsonl")
    during = [r for r in site0 if r["kind"] == "step" and off["wall_s"] < r["run_s"] < off["back_at_s"]]
    assert during, "site 0 trained on while site 1 was dark"

    for rows in (site0, site1):
        for piece in _incarnations(rows):
            for prev, r in zip(piece, piece[1:]):
                assert r["power_mw"] <= r["cap_mw"] + 1e-9  # A: the draw never exceeds the grid's power
                minutes = (r["grid_hours"] - prev["grid_hours"]) * 60
                assert abs(r["power_mw"] - prev["power_mw"]) <= RAMP * minutes + 1e-6  # A: ramps within the limit
            # E: the logged draw (computing and waiting) integrates to the energy the site reports
            logged = logged_energy_mwh(piece, time_scale=TIME_SCALE)
            reported = piece[-1]["energy_mwh"] - piece[0]["energy_mwh"]
            assert logged == pytest.approx(reported, rel=0.01)
    per_site = {e["site"]: e for e in summary["per_site"]}
    assert summary["energy_mwh"] == pytest.approx(per_site[0]["energy_mwh"] + per_site[1]["energy_mwh"])
    assert per_site[1]["peak_power_mw"] <= 100.0 + 1e-9
