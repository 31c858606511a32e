"""The planner's prediction of a run under its sites' power and speeds (``geotrain.planner.power``): exact
figures on small runs without a link (step times that are powers of two, so sums are exact), the controller's
own integrals, the shipped grid examples, ``predict_from_summary`` and ``geotrain plan``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from geotrain.algorithms.timing import predict_run
from geotrain.config import load_config
from geotrain.errors import ConfigError
from geotrain.planner.model import plan_spec, sync_comm
from geotrain.planner.power import PowerPrediction, predict_power_run
from geotrain.planner.simulate import heal_seconds
from geotrain.power import site_controllers
from geotrain.summary import predict_from_summary
from geotrain.train.pace import WORK_MIN

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
GRID_EXAMPLES = sorted(CONFIGS.glob("grid-*.toml"))

# No link (syncs and healing take no time), small sites without a cap (a fraction trace is of the full draw).
BASE: dict[str, Any] = {"wan.link": "none", "sites.accelerators": 1000, "data.batch_size": 4, "model.seq_len": 32}
STEP_TOKENS = 4 * 32  # one site's inner step


def config(values: dict[str, Any]) -> Any:
    return load_config(values=BASE | values)


def test_one_site_without_power_is_steps_times_step_seconds():
    cfg = config({"run.sites": 1, "run.tokens": 40 * STEP_TOKENS, "run.site_speeds": [1.0]})
    out = predict_power_run(cfg, step_seconds=[0.25])
    assert out.steps == 40 and out.wall_seconds == 40 * 0.25
    (site,) = out.per_site
    assert site.steps == 40 and site.tokens == 40 * STEP_TOKENS == out.tokens
    assert site.throttled_seconds == 0 and site.utilization == 1.0
    assert site.energy_mwh is None and out.energy_mwh is None  # no [grid]


def test_half_of_the_power_range_doubles_the_time():
    # idle_fraction 0: the draw is active x full, and a constant trace of half the full draw gives active 0.5
    cfg = config({"run.sites": 1, "run.tokens": 40 * STEP_TOKENS, "grid.idle_fraction": 0.0,
                  "grid.time_scale": 60.0, "grid.traces": [{"site": 0, "hours": [0], "values": [0.5]}]})
    out = predict_power_run(cfg, step_seconds=[0.25])
    (site,) = out.per_site
    assert out.wall_seconds == 2 * 40 * 0.25
    assert site.compute_seconds == 40 * 0.25 and site.throttled_seconds == 40 * 0.25
    assert site.utilization == 1.0 and out.throttled_share == 0.5
    full = site_controllers(cfg)[0].site.full_mw
    assert site.peak_mw == 0.5 * full
    assert site.energy_mwh == pytest.approx(0.5 * full * out.wall_seconds * 60.0 / 3600.0, rel=1e-12)


def test_h_step_rounds_wait_for_the_slowest_site():
    cfg = config({"run.sites": 2, "run.tokens": 2 * 40 * STEP_TOKENS, "outer.sync_every": 10,
                  "run.site_speeds": [1.0, 0.25]})
    out = predict_power_run(cfg, step_seconds=[0.25, 0.25])
    assert out.steps == 40 and out.rounds == 4
    assert out.wall_seconds == 40 * 1.0  # site1's steps last 0.25 / 0.25 s
    fast, slow = out.per_site
    assert fast.steps == slow.steps == 40
    assert slow.throttled_seconds == 40 * 0.75 and slow.utilization == 1.0
    assert fast.throttled_seconds == 0 and fast.utilization == 0.25


def test_time_based_rounds_split_tokens_by_speed():
    # Rounds of 10 s: site0 takes 40 steps of 0.25 s, site1 10 steps of 1 s; three rounds reach the budget.
    budget = 3 * 50 * STEP_TOKENS
    cfg = config({"run.sites": 2, "run.tokens": budget, "outer.sync_every_seconds": 10.0, "comm.overlap": False,
                  "run.site_speeds": [1.0, 0.25]})
    out = predict_power_run(cfg, step_seconds=[0.25, 0.25])
    assert out.timed_rounds and out.rounds == 3
    assert out.wall_seconds == 30.0
    fast, slow = out.per_site
    assert (fast.steps, slow.steps) == (120, 30)
    assert fast.tokens == 4 * slow.tokens and out.tokens == budget


def test_a_budget_between_rounds_shortens_the_last_round():
    # 2.5 rounds of tokens: the third round lasts half of T, as training's rule says
    cfg = config({"run.sites": 2, "run.tokens": 125 * STEP_TOKENS, "outer.sync_every_seconds": 10.0,
                  "comm.overlap": False, "run.site_speeds": [1.0, 0.25]})
    out = predict_power_run(cfg, step_seconds=[0.25, 0.25])
    assert out.rounds == 3 and out.wall_seconds == 25.0
    assert [s.steps for s in out.per_site] == [100, 25]


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("steps", [100, 95, 7])
@pytest.mark.parametrize("step_seconds", [[0.1, 0.1], [0.1, 0.3]])
def test_at_full_power_and_speed_it_is_the_timing_model(overlap, steps, step_seconds):
    # speeds of 1 turn the prediction on without changing a step: blocking and overlapped syncs over a link, a
    # short last round, a straggler, as geotrain.algorithms.timing predicts them
    cfg = load_config(values={"run.sites": 2, "wan.link": "8mbit/10ms", "outer.sync_every": 10,
                              "comm.overlap": overlap, "run.site_speeds": [1.0, 1.0]})
    out = predict_power_run(cfg, step_seconds=step_seconds, steps=steps, payloads=[1_000_000])
    timing = predict_run(cfg, payloads=[1_000_000], steps=steps, step_seconds=step_seconds)
    assert out.wall_seconds == pytest.approx(timing.wall_seconds, rel=1e-12)
    assert out.utilization == pytest.approx(timing.utilization, rel=1e-12)
    assert out.rounds == timing.syncs and out.sync_seconds == timing.comm_seconds_per_sync


def outage_config(**extra: Any) -> Any:
    # 1 training second = 1 grid hour; site1 has no power from hour 2 to hour 4
    return config({"run.sites": 2, "run.tokens": 2 * 24 * STEP_TOKENS, "outer.sync_every": 4, "comm.overlap": False,
                   "grid.time_scale": 3600.0,
                   "grid.traces": [{"site": "site1", "hours": [0, 2, 4], "values": [1.0, 0.0, 1.0],
                                    "interpolate": "step"}]} | extra)


def test_an_outage_stops_the_sites_tokens_and_energy_for_its_window():
    out = predict_power_run(outage_config(), step_seconds=[0.25, 0.25])
    assert out.wall_seconds == 6.0 and out.steps == 24
    on, off = out.per_site
    assert (on.steps, off.steps) == (24, 16)  # 8 steps of 0.25 s missed from 2 s to 4 s
    assert off.tokens == on.tokens - 8 * STEP_TOKENS
    assert off.power_offs == 1 and off.away_seconds == 2.0 and on.power_offs == 0
    # both draw their full power whenever they are present: site1 for 4 of the 6 s
    assert off.energy_mwh == pytest.approx(on.energy_mwh * 4.0 / 6.0, rel=1e-12)
    assert on.energy_mwh == pytest.approx(on.peak_mw * 6.0, rel=1e-12)  # MW x s x 3600 / 3600


@pytest.mark.parametrize("overlap", [False, True])
def test_a_returning_site_is_admitted_when_the_members_learn_of_it(overlap):
    # rounds of 1 s (4 steps of 0.25 s) and syncs of t: its power is out from 2 s to 4 s.
    # Blocking: site1's last step of round 2 would start at 1.75 + t and run into the outage, so it leaves
    # there; site0 ends rounds 2 to 4 alone (a sync of one site takes no time), and the quorum of the sync that
    # starts at 4 + t sees site1 waiting: the members heal it as it lands, and site1 trains rounds 5 and 6
    # (15 steps in all).
    # Overlapped: round 2 starts at 1 (its sync travels meanwhile) and site1 leaves at the step that starts at
    # 2 + t (round 1's sync landing delayed it). The members learn of it at the end of round 5, drain round 5's
    # sync and heal it; site1 trains round 6 only (12 steps), and the last sync is exposed.
    cfg = outage_config(**{"wan.link": "1gbit/10ms", "comm.overlap": overlap})
    out = predict_power_run(cfg, step_seconds=[0.25, 0.25])
    spec = plan_spec(cfg)
    heal, t = heal_seconds(spec, healer=0, joiner=1), sync_comm(spec, members=[0, 1]).seconds
    on, off = out.per_site
    assert on.steps == 24 and off.power_offs == 1
    if overlap:
        assert off.steps == 12 and off.away_seconds == pytest.approx(3.0 + heal, rel=1e-12)
        assert out.wall_seconds == pytest.approx(6.0 + heal + t, rel=1e-12)
    else:
        assert off.steps == 15 and off.away_seconds == pytest.approx(4 + t + heal - (1.75 + t), rel=1e-12)
        assert out.wall_seconds == pytest.approx(6.0 + 3 * t + heal, rel=1e-12)


def test_with_time_based_rounds_a_site_is_healed_during_its_outage_and_trains_when_its_power_returns():
    # rounds of 1 s, blocking syncs of t; site1's power is out from 2 s to 4 s. Its step that would start at
    # 1.75 + t would run into the outage, so it leaves there. It asks to join a round early, at 3 s; site0,
    # alone, ends its round at 3 + t (a sync of one site takes no time), admits it and heals it in h, and site1
    # waits for its power until 4 s, inside its round: it is away from 1.75 + t to 4 s, its outage and the step
    # it could not finish before it, nothing more.
    cfg = outage_config(**{"wan.link": "1gbit/10ms", "outer.sync_every_seconds": 1.0})
    spec = plan_spec(cfg)
    heal, t = heal_seconds(spec, healer=0, joiner=1), sync_comm(spec, members=[0, 1]).seconds
    assert 3 + t + heal < 4  # healed before the power returns
    on, off = predict_power_run(cfg, step_seconds=[0.25, 0.25]).per_site
    assert off.power_offs == 1 and off.away_seconds == pytest.approx(4 - (1.75 + t), rel=1e-12)
    later = predict_power_run(outage_config(**{"wan.link": "1gbit/10ms", "outer.sync_every_seconds": 1.0,
                                               "grid.traces": [{"site": "site1", "hours": [0, 2, 3.6],
                                                                "values": [1.0, 0.0, 1.0], "interpolate": "step"}]}),
                              step_seconds=[0.25, 0.25]).per_site[1]
    assert later.away_seconds == pytest.approx(3.6 - (1.75 + t), rel=1e-12)  # admitted at 3 + t all the same


def test_a_heal_of_at_most_half_a_round_goes_in_the_background(monkeypatch):
    # The run above: site1 is healed at 3 + t while its power is out. Over 10gbit/10ms the heal takes 29 ms,
    # under half a round (1 s), so site0 trains on meanwhile and the run ends exactly one heal sooner than when
    # every site waits for it; site1's figures do not change (its round is site0's, and it waits for its power
    # anyway; a heal long enough to move the end of site1's round past half a step would change whether its
    # first step after the outage fits, TimedRounds.skip_step). Over 100mbit/10ms the heal takes 0.93 s, more
    # than half a round: it stays blocking.
    import geotrain.planner.power as power

    def both(link: str) -> tuple[Any, Any, float]:
        cfg = outage_config(**{"wan.link": link, "outer.sync_every_seconds": 1.0})
        out = predict_power_run(cfg, step_seconds=[0.25, 0.25])
        with monkeypatch.context() as m:
            m.setattr(power, "heals_in_background", lambda config, seconds: False)
            blocking = predict_power_run(cfg, step_seconds=[0.25, 0.25])
        return out, blocking, heal_seconds(plan_spec(cfg), healer=0, joiner=1)

    out, blocking, heal = both("10gbit/10ms")
    assert 0 < heal <= 0.5
    assert out.heal_seconds == 0 and blocking.heal_seconds == heal
    assert out.wall_seconds == pytest.approx(blocking.wall_seconds - heal, rel=1e-12)
    assert [(p.steps, p.away_seconds) for p in out.per_site] == [(p.steps, p.away_seconds) for p in blocking.per_site]
    out, blocking, heal = both("100mbit/10ms")
    assert heal > 0.5 and out == blocking


def test_a_returning_site_whose_first_step_would_end_past_its_round_goes_to_the_sync_without_it():
    # rounds of 1 s, no link (syncs and healing take no time); site1's power is out from 2 s to 4 s. It leaves
    # at 2 s, asks to join a round early (3 s), is admitted at the boundary at 3 s, and its power returns at 4 s,
    # the end of its first round: a step then would end 0.25 s past it, more than half a step, so it goes to
    # that sync without it (train: TimedRounds.skip_step). site0 never waits for it, and the 48-step budget
    # ends at 7 s with 28 + 20 steps (with the step, both would wait for it: 7.25 s).
    out = predict_power_run(outage_config(**{"outer.sync_every_seconds": 1.0}), step_seconds=[0.25, 0.25])
    on, off = out.per_site
    assert out.wall_seconds == 7.0 and (on.steps, off.steps) == (28, 20)
    assert on.utilization == 1.0 and off.away_seconds == 2.0


def test_with_min_sites_the_sync_waits_for_the_site_to_come_back():
    # site1 leaves at 2 s; site0 computes round 3 alone, its sync's quorum waits until site1 is back at 4 s, and
    # both train rounds 4 to 6
    out = predict_power_run(outage_config(**{"membership.min_sites": 2}), step_seconds=[0.25, 0.25])
    on, off = out.per_site
    assert out.wall_seconds == 7.0
    assert (on.steps, off.steps) == (24, 20) and off.away_seconds == 2.0
    assert on.utilization == 6.0 / 7.0
    never = outage_config(**{"membership.min_sites": 2, "grid.traces": [
        {"site": "site1", "hours": [0, 2], "values": [1.0, 0.0], "interpolate": "step"}]})
    with pytest.raises(ConfigError, match="membership.min_sites"):
        predict_power_run(never, step_seconds=[0.25, 0.25])


def test_energy_is_the_controllers_own_integral():
    # one site under a linear dip and a ramp limit: replay its controller by hand, step by step
    cfg = config({"run.sites": 1, "run.tokens": 60 * STEP_TOKENS, "grid.time_scale": 600.0, "grid.start_hours": 1.0,
                  "grid.ramp_mw_per_min": 0.5,
                  "grid.traces": [{"site": 0, "hours": [0, 1.5, 2.5, 24], "values": [1.0, 0.4, 1.0, 1.0],
                                   "carbon": [400, 200, 300, 400]}]})
    out = predict_power_run(cfg, step_seconds=[0.25])
    pc = site_controllers(cfg)[0]
    t = 0.0
    for i in range(60):
        work = 0.25 if i >= WORK_MIN else None  # as training paces it: a step's work is known after WORK_MIN
        if work:
            t += pc.start_delay(t, work)
        sp = pc.begin_step(t, work)
        t += 0.25 / sp.active
        pc.end_step(t, t)
    (site,) = out.per_site
    assert out.wall_seconds == t
    assert (site.energy_mwh, site.peak_mw, site.carbon_kg, site.smoothing_mwh) == (
        pc.energy_mwh, pc.peak_mw, pc.carbon_kg, pc.smoothing_mwh)
    assert site.throttled_seconds > 0 and out.carbon_kg == pc.carbon_kg


@pytest.mark.parametrize("path", GRID_EXAMPLES, ids=lambda p: p.stem)
def test_each_shipped_grid_example_is_predicted(path):
    cfg = load_config(path)
    out = predict_power_run(cfg, step_seconds=[0.1] * cfg.run.sites)
    assert math.isfinite(out.wall_seconds) and out.wall_seconds > out.steps * 0.1
    assert out.energy_mwh is not None and math.isfinite(out.energy_mwh) and out.energy_mwh > 0
    assert all(math.isfinite(s.peak_mw) and s.tokens > 0 for s in out.per_site)
    offs = [s.power_offs for s in out.per_site]
    assert offs == ([0, 1] if path.stem == "grid-outage" else [0, 0])


def test_grid_examples_are_shipped():
    assert {p.stem for p in GRID_EXAMPLES} >= {"grid-outage", "grid-curtailment", "grid-summer-afternoon"}


def test_predict_from_summary_plays_a_power_run_from_its_measured_steps():
    cfg = load_config(CONFIGS / "grid-curtailment.toml")
    direct = predict_power_run(cfg, step_seconds=[0.1, 0.2], steps=292)
    summary = {"config": cfg.to_dict(), "sites": 2, "steps": 292, "auto_settings": [],
               "per_site": [{"compute_seconds": 29.2, "steps": 292, "steps_trained": 292},
                            {"compute_seconds": 11.6, "steps": 292, "steps_trained": 58}]}  # healed: 58 steps since
    out = predict_from_summary(summary)
    assert isinstance(out, PowerPrediction)
    assert out.wall_seconds == pytest.approx(direct.wall_seconds, rel=1e-12)
    assert out.energy_mwh == pytest.approx(direct.energy_mwh, rel=1e-12)
    assert 0 < out.utilization <= 1


def test_bad_step_seconds_and_streaming_are_refused():
    cfg = outage_config()
    with pytest.raises(ConfigError, match="step_seconds"):
        predict_power_run(cfg, step_seconds=[0.25])
    with pytest.raises(ConfigError, match="step_seconds"):
        predict_power_run(cfg, step_seconds=[0.25, -1.0])
    streaming = outage_config(**{"run.algorithm": "streaming", "streaming.overlap_steps": 1})
    with pytest.raises(ConfigError, match="run.algorithm"):
        predict_power_run(streaming, step_seconds=[0.25, 0.25])


def test_geotrain_plan_shows_the_power_prediction(capsys):
    from geotrain.cli import main

    assert main(["plan", "--config", str(CONFIGS / "grid-outage.toml"), "--step-seconds", "0.1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    power = out["power"]
    assert power["time_to_train_seconds"] > 0 and power["per_site"][1]["power_offs"] == 1
    assert power["energy_mwh"] == pytest.approx(sum(s["energy_mwh"] for s in power["per_site"]))


def test_a_run_too_long_to_play_is_refused_at_once_and_the_plan_says_so(capsys):
    from geotrain.cli import main
    from geotrain.planner.power import MAX_SITE_STEPS

    cfg = config({"run.sites": 2, "run.tokens": 2 * MAX_SITE_STEPS * STEP_TOKENS, "run.site_speeds": [1.0, 0.5]})
    with pytest.raises(ConfigError, match="run.tokens"):
        predict_power_run(cfg, step_seconds=[0.25, 0.25])
    # time-based rounds: every site trains a whole round before the budget is known, so a round of many more
    # steps than the budget needs is refused before it is played
    timed = config({"run.sites": 2, "run.tokens": 8 * STEP_TOKENS, "outer.sync_every_seconds": 5.0})
    rate = 2 * 5.0 / 1e-6
    assert rate > MAX_SITE_STEPS
    with pytest.raises(ConfigError, match="outer.sync_every_seconds"):
        predict_power_run(timed, step_seconds=[1e-6, 1e-6])
    assert predict_power_run(timed, step_seconds=[1.0, 1.0]).tokens == 10 * STEP_TOKENS  # 5 steps each, one round
    plan = str(CONFIGS / "plan-three-datacenters.toml")
    assert main(["plan", "--config", plan, "--set", "run.site_speeds=[1.0, 0.5, 1.0]", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "power" not in out and any("no prediction under power and speeds" in n for n in out["notes"])
