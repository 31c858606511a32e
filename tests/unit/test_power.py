"""The grid power model (``geotrain.power``): traces, the setpoint under cap and ramp, energy, carbon,
departures and returns, checkpoints, and the ``[grid]`` configuration. Exact arithmetic, no clock."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from geotrain.config import load_config
from geotrain.errors import ConfigError
from geotrain.power import (GridTrace, PowerController, SitePower, StepPower, rejoin_lead_seconds, site_controllers,
                            site_powers)
from geotrain.train.pace import PowerOff

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
GRID_CONFIGS = sorted(CONFIGS.glob("grid-*.toml"))
H = 3600.0  # grid seconds per hour


def one_mw(idle_fraction: float = 0.25, cap_mw: float | None = None) -> SitePower:
    """A site of exactly 1 MW at full draw."""
    return SitePower(name="s", accelerators=1000, watts=1000.0, pue=1.0, cap_mw=cap_mw, idle_fraction=idle_fraction)


# -- traces ----------------------------------------------------------------------------------------------------


def test_linear_trace_interpolates_and_holds_its_ends():
    trace = GridTrace([2, 4, 8], [0.25, 0.75, 0.5])
    assert trace.value(0) == 0.25  # before the first point
    assert trace.value(3 * H) == 0.5
    assert trace.value(6 * H) == 0.625
    assert trace.value(4 * H) == 0.75
    assert trace.value(100 * H) == 0.5  # after the last point
    assert trace.available_mw(3 * H, cap_mw=80.0) == 40.0


def test_step_trace_holds_each_value_until_the_next_point():
    trace = GridTrace([0, 4, 8], [0.25, 0.75, 0.5], interpolate="step")
    assert trace.value(4 * H - 1) == 0.25
    assert trace.value(4 * H) == 0.75
    assert trace.value(7.5 * H) == 0.75
    assert trace.value(9 * H) == 0.5


def test_periodic_trace_repeats_with_the_last_hour():
    trace = GridTrace([0, 12, 24], [1.0, 0.5, 1.0], periodic=True)
    assert trace.period_s == 24 * H
    assert trace.value(6 * H) == 0.75
    assert trace.value(30 * H) == 0.75
    assert trace.value(48 * H + 12 * H) == 0.5
    assert trace.knots_s(10 * H, 40 * H) == [12 * H, 24 * H, 36 * H]


def test_mw_trace_is_bounded_by_the_cap_and_fractions_scale_it():
    trace = GridTrace([0, 10], [50.0, 150.0], unit="mw")
    assert trace.trace_mw(10 * H, cap_mw=100.0) == 150.0
    assert trace.available_mw(10 * H, cap_mw=100.0) == 100.0
    assert trace.available_mw(5 * H, cap_mw=100.0) == 100.0
    assert trace.available_mw(0, cap_mw=100.0) == 50.0
    assert GridTrace([0], [0.5]).available_mw(123.0, cap_mw=30.0) == 15.0


def test_carbon_is_interpolated_like_the_values():
    trace = GridTrace([0, 2], [1.0, 1.0], carbon=[100.0, 300.0])
    assert trace.carbon_kg_per_mwh(1 * H) == 200.0
    assert GridTrace([0, 2], [1.0, 1.0]).carbon_kg_per_mwh(H) is None


@pytest.mark.parametrize("kwargs, words", [
    ({"hours": [0, 2, 2], "values": [1, 1, 1]}, "trace.hours"),
    ({"hours": [0, 2], "values": [1]}, "trace.values"),
    ({"hours": [0, 2], "values": [1, -0.5]}, "trace.values"),
    ({"hours": [0, 2], "values": [1, 1.5]}, 'unit = "mw"'),
    ({"hours": [-1, 2], "values": [1, 1]}, "trace.hours"),
    ({"hours": [0, 2], "values": [1, 1], "carbon": [1]}, "trace.carbon"),
    ({"hours": [0, 24], "values": [1, 0.5], "periodic": True}, "trace.values"),
    ({"hours": [1, 24], "values": [1, 1], "periodic": True}, "trace.hours"),
    ({"hours": [0, 2], "values": [1, 1], "unit": "kw"}, "trace.unit"),
    ({"hours": [0, 2], "values": [1, 1], "interpolate": "cubic"}, "trace.interpolate"),
    ({"hours": [0, 2], "values": [1, float("nan")]}, "trace.values"),
])
def test_bad_traces_are_refused_naming_the_field(kwargs, words):
    hours, values = kwargs.pop("hours"), kwargs.pop("values")
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        GridTrace(hours, values, **kwargs)


def test_csv_trace_reads_points_and_names_the_bad_line(tmp_path):
    good = tmp_path / "good.csv"
    good.write_text("# a day\nhours,value,carbon\n0,1.0,400\n12,0.5,200\n\n24,1.0,400\n", encoding="utf-8")
    trace = GridTrace.from_csv(good, periodic=True)
    assert trace.hours == [0, 12, 24] and trace.values == [1.0, 0.5, 1.0] and trace.carbon == [400, 200, 400]
    bad = tmp_path / "bad.csv"
    bad.write_text("hours,value\n0,1.0\n3,abc\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="line 3"):
        GridTrace.from_csv(bad)
    bad.write_text("hours,value\n0,1.0\n3,0.5,7\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="line 3: expected 2 columns"):
        GridTrace.from_csv(bad)
    bad.write_text("hour,val\n0,1.0\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="line 1: the header"):
        GridTrace.from_csv(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        GridTrace.from_csv(tmp_path / "none.csv")


# -- the site ---------------------------------------------------------------------------------------------------


def test_site_power_draws_between_idle_and_full():
    site = SitePower(name="x", accelerators=100_000, watts=700.0, pue=1.2, cap_mw=50.0, idle_fraction=0.15)
    assert site.full_mw == pytest.approx(84.0, abs=1e-12)
    assert site.idle_mw == pytest.approx(12.6, abs=1e-12)
    assert site.limit_mw == 50.0
    assert site.draw_mw(0.5) == pytest.approx(48.3, abs=1e-12)
    assert site.active_at(48.3) == pytest.approx(0.5, abs=1e-12)
    assert site.active_at(1.0) == 0.0 and site.active_at(1000.0) == 1.0


# -- the setpoint: envelope, cap and ramp ------------------------------------------------------------------------


def random_trace(rng: random.Random) -> GridTrace:
    n = rng.randint(2, 7)
    hours = sorted(rng.sample(range(1, 40), n - 1))
    hours = [0, *[h / 4 for h in hours]]
    values = [rng.choice([0.0, rng.random(), 1.0]) for _ in range(n)]
    periodic = rng.random() < 0.3
    if periodic:
        values[-1] = values[0]
    return GridTrace(hours, values, interpolate=rng.choice(["linear", "step"]), periodic=periodic)


def brute_envelope(pc: PowerController, g: float, samples: int) -> float:
    """min(limit, min over sampled g' of A(g') + R (g' - g)): never below the true minimum."""
    end = pc.lookahead_s
    best = min(pc.available_mw(g + end * k / samples) + pc.rate * end * k / samples for k in range(samples + 1))
    return min(pc.site.limit_mw, best)


def test_envelope_is_the_exact_minimum_over_the_lookahead():
    rng = random.Random(7)
    samples = 600
    for _ in range(40):
        trace = random_trace(rng)
        site = SitePower(name="r", accelerators=80_000, watts=500.0, pue=1.25, cap_mw=rng.choice([None, 40.0]),
                         idle_fraction=0.2)
        pc = PowerController(site, trace, ramp_mw_per_min=rng.choice([0.5, 2.0, 10.0]))
        cap = pc._trace_cap
        slopes = [abs(b - a) * cap / ((hb - ha) * H) for a, b, ha, hb in
                  zip(trace.values, trace.values[1:], trace.hours, trace.hours[1:])]
        lipschitz = pc.rate + (max(slopes) if trace.interpolate == "linear" else 0.0)
        for _ in range(8):
            g = rng.uniform(0, 12 * H)
            exact, sampled = pc.envelope_mw(g), brute_envelope(pc, g, samples)
            assert exact <= sampled + 1e-9
            assert sampled - exact <= lipschitz * pc.lookahead_s / samples + 1e-9
            assert exact <= pc.available_mw(g) + 1e-9


def test_setpoints_keep_the_cap_and_the_ramp_at_every_step_start():
    rng = random.Random(11)
    for _ in range(40):
        trace = random_trace(rng)
        site = SitePower(name="r", accelerators=80_000, watts=500.0, pue=1.25, cap_mw=rng.choice([None, 40.0]),
                         idle_fraction=0.2)
        ramp = rng.choice([0.5, 2.0, 10.0])
        pc = PowerController(site, trace, ramp_mw_per_min=ramp, time_scale=rng.choice([1.0, 60.0, 240.0]))
        t, last = 0.0, None
        for _ in range(200):
            sp = pc.begin_step(t)
            g = pc.grid_seconds(t)
            assert sp.draw_mw <= pc.available_mw(g) + 1e-9 and sp.draw_mw <= site.limit_mw + 1e-9
            assert sp.cap_mw == pc.available_mw(g) and sp.grid_hours == g / H
            if last is not None:
                assert abs(sp.draw_mw - last[1]) <= ramp / 60 * (g - last[0]) + 1e-9
            last = (g, sp.draw_mw)
            compute, wait = rng.uniform(0.1, 2.0), rng.choice([0.0, rng.uniform(0, 3.0)])
            end = t + compute + wait
            pc.end_step(min(t + compute, end), end)
            t = end + rng.choice([0.0, rng.uniform(0, 3.0)])


def test_ramp_starts_down_ahead_of_a_dip():
    # 1 MW site; the available power steps to 0.5 MW at 1 h; the ramp is 0.5 MW/min, so 60 s to come down.
    pc = PowerController(one_mw(), GridTrace([0, 1], [1.0, 0.5], interpolate="step"), ramp_mw_per_min=0.5)
    assert pc.lookahead_s == pytest.approx(150.0)
    assert pc.begin_step(0.0).draw_mw == 1.0
    pc.end_step(1.0, 1.0)
    assert pc.begin_step(H - 60).draw_mw == pytest.approx(1.0, abs=1e-12)
    pc.end_step(H - 60, H - 60)
    assert pc.begin_step(H - 30).draw_mw == pytest.approx(0.75, abs=1e-12)
    pc.end_step(H - 30, H - 30)
    sp = pc.begin_step(H)
    assert sp.draw_mw == pytest.approx(0.5, abs=1e-12) and sp.cap_mw == 0.5 and sp.on
    pc.end_step(H, H)
    # and back up no faster than the ramp, though the trace allows 0.5 MW only: it stays there
    assert pc.begin_step(H + 600).draw_mw == pytest.approx(0.5, abs=1e-12)


def test_ramp_up_is_bounded_after_the_power_returns():
    pc = PowerController(one_mw(), GridTrace([0, 1, 2], [0.5, 1.0, 1.0], interpolate="step"), ramp_mw_per_min=0.5)
    assert pc.begin_step(0.0).draw_mw == 0.5
    pc.end_step(H - 10, H - 10)
    assert pc.begin_step(H - 10).draw_mw == 0.5
    pc.end_step(H - 10, H - 10)
    assert pc.begin_step(H + 20).draw_mw == pytest.approx(0.75, abs=1e-12)  # 30 s at 0.5 MW/min


def test_lookahead_shorter_than_the_ramp_needs_is_refused():
    with pytest.raises(ValueError, match="at least 120"):
        PowerController(one_mw(), None, ramp_mw_per_min=0.5, lookahead_s=60.0)


# -- energy, waits and carbon -------------------------------------------------------------------------------------


def test_energy_without_a_ramp_limit_waits_at_idle():
    # time_scale 3600: one training second is one grid hour, so MWh = MW * training seconds.
    pc = PowerController(one_mw(), None, time_scale=3600.0)
    sp = pc.begin_step(0.0)
    assert sp == StepPower(draw_mw=1.0, cap_mw=1.0, active=1.0, on=True, grid_hours=0.0)
    pc.end_step(2.0, 3.0)  # 2 h at 1 MW, then a 1 h wait at idle 0.25 MW
    assert pc.energy_mwh == 2.25
    pc.begin_step(3.0)
    pc.end_step(4.0, 4.0)
    assert pc.energy_mwh == 3.25
    pc.begin_step(6.0)  # the gap holds the last draw: idle
    assert pc.energy_mwh == 3.75
    assert pc.peak_mw == 1.0 and pc.smoothing_mwh == 0.0 and pc.carbon_kg is None


def test_energy_with_a_ramp_limit_holds_the_draw_through_waits():
    pc = PowerController(one_mw(), None, time_scale=3600.0, ramp_mw_per_min=60.0)
    pc.begin_step(0.0)
    pc.end_step(2.0, 3.0)  # the wait is held at 1 MW with filler load
    assert pc.energy_mwh == 3.0 and pc.smoothing_mwh == 1.0
    pc.begin_step(3.0)
    pc.end_step(3.5, 4.0)
    assert pc.energy_mwh == 4.0 and pc.smoothing_mwh == 1.5


def test_energy_follows_the_setpoint_under_a_trace_and_time_scale():
    # 240 grid seconds per training second: 15 training seconds are one grid hour.
    trace = GridTrace([0, 1], [0.5, 0.5])
    pc = PowerController(one_mw(cap_mw=0.8), trace, time_scale=240.0)
    sp = pc.begin_step(0.0)
    assert sp.draw_mw == 0.4 and sp.active == pytest.approx(0.2, abs=1e-12)
    pc.end_step(15.0, 30.0)  # a grid hour at 0.4 MW, then a grid hour at idle 0.25 MW
    assert pc.energy_mwh == pytest.approx(0.65, abs=1e-12)


def test_carbon_uses_the_intensity_at_each_step_start():
    trace = GridTrace([0, 2], [1.0, 1.0], carbon=[100.0, 300.0])
    pc = PowerController(one_mw(), trace, time_scale=3600.0)
    pc.begin_step(0.0)
    pc.end_step(1.0, 1.0)
    assert pc.carbon_kg == 100.0
    pc.begin_step(1.0)
    pc.end_step(1.5, 2.0)  # 0.5 MWh computing and 0.125 MWh idle at 200 kg/MWh
    assert pc.carbon_kg == 100.0 + 0.625 * 200.0
    assert pc.energy_mwh == 1.625


# -- departures and returns ---------------------------------------------------------------------------------------

OUTAGE = GridTrace([0, 2, 3], [1.0, 0.0, 1.0], interpolate="step")  # no power from 2 h to 3 h


def test_outage_without_a_ramp_limit():
    pc = PowerController(one_mw(), OUTAGE, time_scale=3600.0)  # training seconds are grid hours
    assert pc.threshold_mw == 0.2875  # idle 0.25 + 5% of the 0.75 MW range
    assert pc.begin_step(1.0).on
    pc.end_step(2.0, 2.0)
    sp = pc.begin_step(2.0)
    assert not sp.on and sp.draw_mw == 0.0 and sp.cap_mw == 0.0
    pc.leave(2.0)
    assert not pc.present
    assert pc.back_at(2.0) == 3.0 and pc.back_at(2.5) == 3.0 and pc.back_at(3.5) == 3.5
    pc.rejoin(3.0)
    sp = pc.begin_step(3.0)
    assert sp.on and sp.draw_mw == 1.0
    pc.end_step(4.0, 4.0)
    assert pc.energy_mwh == 2.0  # nothing drawn while away


def test_outage_with_a_ramp_limit_leaves_early_and_ramps_back_up():
    # 0.6 MW/min = 0.01 MW per grid second; the 0.2875 MW threshold is 28.75 s of ramp above 0.
    pc = PowerController(one_mw(), OUTAGE, ramp_mw_per_min=0.6)
    assert pc.begin_step(0.0).draw_mw == 1.0
    pc.end_step(1.0, 1.0)
    sp = pc.begin_step(2 * H - 50)
    assert sp.on and sp.draw_mw == pytest.approx(0.5, abs=1e-12)
    pc.end_step(2 * H - 50, 2 * H - 20)  # the wait holds 0.5 MW
    sp = pc.begin_step(2 * H - 20)
    assert not sp.on and sp.draw_mw == pytest.approx(0.2, abs=1e-12)
    pc.leave(2 * H - 20)
    back = pc.back_at(2 * H - 20)
    assert back == 3 * H
    with pytest.raises(RuntimeError, match="rejoin"):
        pc.begin_step(back)
    pc.rejoin(back)
    sp = pc.begin_step(back)
    assert sp.on and sp.draw_mw == pytest.approx(pc.threshold_mw, abs=1e-12)
    pc.end_step(back, back)
    assert pc.begin_step(back + 10).draw_mw == pytest.approx(pc.threshold_mw + 0.1, abs=1e-12)
    energy = 1.0 * 1.0 + 1.0 * (2 * H - 51) + 0.5 * 30 + 0.0 + pc.site.idle_mw * 0 + pc.threshold_mw * 10
    assert pc.energy_mwh * H == pytest.approx(energy, rel=1e-12)


def test_a_site_back_in_the_run_before_its_power_waits_for_it_drawing_nothing():
    from geotrain.train.pace import Pace

    pc = PowerController(one_mw(), OUTAGE, time_scale=3600.0)  # training seconds are grid hours
    pace = Pace(power=pc)
    assert pace.begin_step(1.0) == 0.0
    pace.end_step(2.0, 2.0)
    with pytest.raises(PowerOff) as e:
        pace.begin_step(2.0)
    assert e.value.back_at == 3.0
    pace.expect_power(3.0)  # admitted and healed at 2.6 s, before the power returns at 3 s
    assert pace.begin_step(2.6) == pytest.approx(0.4, abs=1e-15)
    assert pace.take_power_on() is None and not pc.present
    assert pace.begin_step(3.0 - 1e-9) == 0.0  # a clock's rounding: the step starts as the power returns
    assert pace.take_power_on() == 3.0 and pace.take_power_on() is None
    assert pace.factor == 1.0 and pc.present
    pace.end_step(4.0, 4.0)
    assert pc.energy_mwh == pytest.approx(2.0, abs=1e-12)  # 1 h before the outage, 1 h after: nothing while out


def test_a_site_back_in_the_run_after_its_power_draws_idle_from_its_return():
    from geotrain.train.pace import Pace

    pc = PowerController(one_mw(), OUTAGE, time_scale=3600.0)
    pace = Pace(power=pc)
    pace.begin_step(1.0)
    pace.end_step(2.0, 2.0)
    with pytest.raises(PowerOff):
        pace.begin_step(2.0)
    pace.expect_power(3.0)
    assert pace.begin_step(3.5) == 0.0  # admitted half an hour after the power returned
    assert pace.take_power_on() == 3.0
    pace.end_step(4.0, 4.0)
    assert pc.energy_mwh == pytest.approx(1.0 + 0.25 * 0.5 + 0.5, abs=1e-12)  # idle while waiting to be admitted


def test_a_step_is_given_a_draw_it_can_hold_to_its_end():
    # training seconds are grid hours. A dip to 0.6 MW from 1 h to 1.2 h: a step of 0.2 h of work starting at
    # 0.9 h cannot end before the dip at any draw, so it runs at the dip's 0.6 MW (active 0.467, 0.43 h)
    dip = GridTrace([0, 1, 1.2, 2], [1.0, 0.6, 1.0, 1.0], interpolate="step")
    pc = PowerController(one_mw(), dip, time_scale=3600.0)
    assert pc.holdable_mw(0.9, 0.99) == 1.0 and pc.holdable_mw(0.9, 1.1) == 0.6
    sp = pc.begin_step(0.9, 0.2)
    assert sp.on and sp.draw_mw == pytest.approx(0.6, abs=1e-9)
    pc.end_step(0.9 + 0.2 / sp.active, 1.4)
    assert pc.begin_step(1.4, 0.2).draw_mw == 1.0  # after the dip: full draw again
    pc.end_step(1.6, 1.6)
    assert PowerController(one_mw(), dip, time_scale=3600.0).begin_step(0.9).draw_mw == 1.0  # work unknown


def test_a_step_that_would_run_into_an_outage_leaves_before_it():
    pc = PowerController(one_mw(), OUTAGE, time_scale=3600.0)  # no power from 2 h to 3 h
    assert pc.begin_step(1.0, 0.5).on  # ends at 1.5 h
    pc.end_step(1.5, 1.5)
    sp = pc.begin_step(1.6, 0.5)  # would end at 2.1 h at full draw, later at any lower one
    assert not sp.on
    pc.leave(1.6)
    assert pc.back_at(1.6) == 1.6  # the power is still there...
    assert pc.back_at(1.6, 0.5) == 3.0  # ...but no step can be held to its end before the outage


def test_back_at_counts_the_draw_a_returning_site_gets():
    # power from 0 to 1 h and from 2 h to 3 h only; a step of 0.5 h of work. Without a ramp limit a site powered
    # again at 2 h runs at full draw and ends at 2.5 h, before the next outage: it can come back at 2 h (a step
    # at the 5% threshold would last 10 h, but that is not the draw it gets)
    gaps = GridTrace([0, 1, 2, 3], [1.0, 0.0, 1.0, 0.0], interpolate="step")
    pc = PowerController(one_mw(), gaps, time_scale=3600.0)
    assert pc.back_at(1.5, 0.5) == 2.0
    assert pc.back_at(2.8, 0.5) is None  # nothing after 3 h: a step from 2.8 h would run into it
    assert pc.back_at(2.4, 0.5) == 2.4


def test_a_draw_held_above_idle_between_steps_under_a_ramp_limit_is_smoothing():
    pc = PowerController(one_mw(), None, ramp_mw_per_min=60.0)
    pc.begin_step(0.0)
    pc.end_step(1.0, 1.0)
    pc.begin_step(3.0)  # the 2 s between the steps (a wait for the ramp, say) hold 1 MW of filler load
    assert pc.smoothing_mwh * H == pytest.approx(2.0, rel=1e-12)
    assert pc.energy_mwh * H == pytest.approx(3.0, rel=1e-12)


def test_a_step_after_a_return_waits_for_the_ramp_when_that_ends_it_sooner():
    # 1 MW/s of ramp (60 MW/min, 1 training second = 1 grid second): from the 0.2875 MW threshold to the full
    # 1 MW takes 0.7125 s. A step of 0.1 s of work started at once runs at active 0.05 for 2 s; after a wait w
    # it ends at w + 0.1 / (0.05 + w / 0.75), least at w* = 0.75 * (sqrt(0.1 / 0.75) - 0.05) = 0.236 s.
    pc = PowerController(one_mw(), None, ramp_mw_per_min=60.0)
    pc.begin_step(0.0)
    pc.end_step(1.0, 1.0)
    assert pc.start_delay(1.0, 0.1) == 0.0  # at the limit: nothing to gain
    pc.leave(1.0)
    pc.rejoin(2.0)
    w = pc.start_delay(2.0, 0.1)

    def end(x):
        return x + 0.1 / (0.05 + x / 0.75)

    w_star = 0.75 * ((0.1 / 0.75) ** 0.5 - 0.05)
    assert abs(w - w_star) <= 0.7125 / 64  # the best of its 64 points
    assert end(w) <= end(w_star) * 1.001 and end(w) < end(0.0) / 2.5
    sp = pc.begin_step(2.0 + w)  # waiting changed nothing: the setpoint is the ramp's from the threshold
    assert sp.draw_mw == pytest.approx(pc.threshold_mw + w, abs=1e-12)
    pc.end_step(2.0 + w, 2.0 + w)
    assert pc.energy_mwh * H == pytest.approx(1.0 + 0.25 * w, rel=1e-12)  # idle while it waited
    assert PowerController(one_mw(), None).start_delay(0.0, 0.1) == 0.0  # no ramp limit: never


def test_pace_waits_for_the_ramp_once_per_step():
    from geotrain.train.pace import Pace

    pc = PowerController(one_mw(), None, ramp_mw_per_min=60.0)
    pace = Pace(power=pc)
    for i, compute in enumerate([0.5, 0.1, 0.1]):  # the first steps: their work is not known yet
        assert pace.work() == 0.0
        assert pace.begin_step(i) == 0.0
        assert pace.hold(compute) == 0.0  # full draw: no hold; the step's work is noted
        pace.end_step(i + compute, i + compute)
    assert pace.work() == 0.1  # the median: a slow first step does not count
    pc.leave(0.1 + 2)
    pace.expect_power(3.0)
    wait = pace.begin_step(3.0)
    assert wait > 0 and pace.waiting == "ramp" and pace.take_power_on() == 3.0
    assert pace.begin_step(3.0 + wait) == 0.0  # once: the step starts now
    assert pace.factor == pytest.approx(pc.site.active_at(pc.threshold_mw + wait), abs=1e-12)


def test_rejoin_lead_is_a_time_based_round_two_overlapped_and_nothing_for_h_step_rounds():
    timed = load_config(values={"outer.sync_every_seconds": 5.0})
    assert rejoin_lead_seconds(timed) == 5.0
    assert rejoin_lead_seconds(load_config(values={"outer.sync_every_seconds": 5.0, "comm.overlap": True})) == 10.0
    assert rejoin_lead_seconds(load_config(values={})) == 0.0
    assert rejoin_lead_seconds(load_config(values={"run.algorithm": "ddp"})) == 0.0


def test_back_at_answers_none_or_the_next_period():
    assert PowerController(one_mw(), GridTrace([0, 1], [1.0, 0.0]), time_scale=H).back_at(2.0) is None
    assert PowerController(one_mw(), GridTrace([0], [0.1])).back_at(0.0) is None  # 0.1 MW < the threshold
    day = GridTrace([0, 12, 24], [1.0, 0.0, 1.0], interpolate="step", periodic=True)
    pc = PowerController(one_mw(), day, time_scale=H)
    assert pc.back_at(13.0) == 24.0 and pc.back_at(25.0) == 25.0 and pc.back_at(40.0) == 48.0
    # a linear fall and rise crosses the threshold inside a piece
    valley = GridTrace([0, 1, 2], [1.0, 0.0, 1.0])
    assert PowerController(one_mw(), valley, time_scale=H).back_at(1.0) == pytest.approx(1.2875, abs=1e-12)
    # with a ramp: the first time from which the ramp can stay above the threshold; begin_step agrees
    ramped = PowerController(one_mw(), valley, time_scale=H, ramp_mw_per_min=0.6)
    back = ramped.back_at(1.0)
    assert back == pytest.approx(1.2875, abs=1e-9)
    assert ramped.begin_step(back).on


def test_back_at_waits_for_a_later_dip_the_ramp_could_not_follow():
    # Power returns at 1 h but goes again at 1 h + 20 s: from 0.2875 MW the 0.01 MW/s ramp needs 28.75 s, so
    # the site may return only when the second outage is over.
    trace = GridTrace([0, 1, 1 + 20 / H, 2], [0.0, 1.0, 0.0, 1.0], interpolate="step")
    pc = PowerController(one_mw(), trace, ramp_mw_per_min=0.6)
    assert pc.back_at(0.0) == 2 * H


def test_back_at_is_the_first_allowed_time_on_random_traces():
    """Against sampling: the envelope reaches the threshold at back_at's answer and at no sampled time before it
    (None: at no sampled time within the horizon searched)."""
    rng = random.Random(5)
    for _ in range(100):
        trace = random_trace(rng)
        site = SitePower(name="r", accelerators=80_000, watts=500.0, pue=1.25, cap_mw=rng.choice([None, 40.0]),
                         idle_fraction=0.2)
        pc = PowerController(site, trace, ramp_mw_per_min=rng.choice([None, 0.5, 2.0, 10.0]))
        theta, tol = pc.threshold_mw, 1e-9 * pc.threshold_mw
        t0 = rng.uniform(0, 10 * H)
        back = pc.back_at(t0)
        end = back if back is not None else t0 + (trace.period_s or trace.hours[-1] * H)
        if back is not None:
            assert back >= t0 and pc.envelope_mw(back) >= theta - tol
        for k in range(300):
            g = t0 + (end - t0 - 1.0) * k / 300
            if g < end - 1.0:
                assert pc.envelope_mw(g) < theta - tol, (trace, t0, back, g)


# -- checkpoints ----------------------------------------------------------------------------------------------


def test_state_dict_round_trip_continues_identically():
    trace = GridTrace([0, 1, 2], [1.0, 0.3, 1.0], carbon=[300.0, 100.0, 300.0])

    def make() -> PowerController:
        return PowerController(one_mw(), trace, time_scale=240.0, ramp_mw_per_min=2.0)

    def steps(pc: PowerController, t0: float, n: int) -> float:
        t = t0
        for _ in range(n):
            pc.begin_step(t)
            pc.end_step(t + 0.75, t + 1.0)
            t += 1.0
        return t

    a = make()
    t = steps(a, 0.0, 10)
    state = a.state_dict()
    assert all(isinstance(v, float) for v in state.values())
    b = make()
    b.load_state_dict(dict(state))
    assert b.state_dict() == state
    steps(a, t, 20)
    steps(b, t, 20)
    assert b.state_dict() == a.state_dict()
    a.leave(t + 20)
    b.load_state_dict(a.state_dict())
    assert not b.present
    with pytest.raises(ValueError, match="lacks"):
        b.load_state_dict({})


# -- configuration ----------------------------------------------------------------------------------------------


def grid_config(traces, **grid):
    return load_config(values={"run.sites": 2, "sites.power_cap_mw": 100, "grid": {**grid, "traces": traces}})


def test_site_controllers_use_the_planners_sites():
    config = grid_config([{"site": "site1", "hours": [0, 2], "values": [1.0, 0.5]}], ramp_mw_per_min=5.0,
                         time_scale=60.0)
    pcs = site_controllers(config)
    from geotrain.planner.model import plan_spec

    specs = plan_spec(config).sites
    assert [pc.site.name for pc in pcs] == ["site0", "site1"]
    for pc, spec in zip(pcs, specs):
        assert pc.site.full_mw == spec.power_mw() and pc.site.accelerators == spec.accelerators
        assert pc.site.cap_mw == 100 and pc.time_scale == 60.0 and pc.ramp_mw_per_min == 5.0
    assert pcs[0].trace is None and pcs[1].trace.values == [1.0, 0.5]
    assert [s.idle_fraction for s in site_powers(config)] == [0.15, 0.15]
    assert site_controllers(load_config(values={"run.sites": 2})) == []
    off = grid_config([{"site": 0, "hours": [0], "values": [1.0]}], enabled=False)
    assert site_controllers(off) == []


@pytest.mark.parametrize("trace, words", [
    ({"site": "nowhere", "hours": [0, 1], "values": [1, 1]}, "grid.traces[0].site"),
    ({"site": 5, "hours": [0, 1], "values": [1, 1]}, "grid.traces[0].site"),
    ({"hours": [0, 1], "values": [1, 1]}, "grid.traces[0].site"),
    ({"site": 0, "hours": [1, 0], "values": [1, 1]}, "grid.traces[0].hours"),
    ({"site": 0, "hours": [0, 1], "values": [1, 1, 1]}, "grid.traces[0].values"),
    ({"site": 0, "hours": [0, 1], "values": [1, -1]}, "grid.traces[0].values"),
    ({"site": 0, "hours": [0, 1], "values": [1, 2]}, "grid.traces[0].values"),
    ({"site": 0, "hours": [0, 1], "values": [1, 1], "file": "x.csv"}, "grid.traces[0].file"),
    ({"site": 0, "values": [1, 1]}, "grid.traces[0].hours"),
    ({"site": 0, "hours": [0, 1], "values": [1, 1], "unit": "kw"}, "grid.traces[0].unit"),
    ({"site": 0, "file": "no/such.csv"}, "grid.traces[0].file"),
])
def test_bad_grid_traces_name_the_field(trace, words):
    with pytest.raises(ConfigError) as info:
        grid_config([trace])
    assert words in str(info.value)


def test_bad_grid_settings_name_the_field():
    for key, value in [("time_scale", 0), ("start_hours", -1), ("ramp_mw_per_min", 0), ("idle_fraction", 1),
                       ("min_active", 0)]:
        with pytest.raises(ConfigError, match=f"grid.{key}"):
            load_config(values={f"grid.{key}": value})
    with pytest.raises(ConfigError, match=r"grid\.traces\[1\]\.site.*already has a trace"):
        grid_config([{"site": 0, "hours": [0], "values": [1]}, {"site": "site0", "hours": [0], "values": [1]}])


def test_grid_trace_file_is_read_relative_to_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "grid").mkdir()
    (tmp_path / "grid" / "s.csv").write_text("hours,value\n0,1\n2,0.5\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    config = grid_config([{"site": 1, "file": "grid/s.csv", "interpolate": "step"}])
    assert site_controllers(config)[1].trace.values == [1.0, 0.5]


def test_there_are_grid_configs():
    assert {p.name for p in GRID_CONFIGS} >= {"grid-summer-afternoon.toml", "grid-curtailment.toml",
                                               "grid-outage.toml"}


@pytest.mark.parametrize("path", GRID_CONFIGS, ids=lambda p: p.name)
def test_grid_config_loads_and_its_dip_falls_inside_a_short_run(path):
    """Each shipped example, stepped as a site trains (steps of 0.25 s): its event falls inside the first 90 s,
    and at every step the draw is at or under the cap and within the ramp limit of the step before (a return
    after an outage starts a new stretch; see the module's docstring)."""
    config = load_config(path)
    assert config.grid.on and config.grid.traces
    names = config.site_names()
    traces = config.grid.site_traces(names)
    assert traces and all(0 <= i < len(names) for i in traces)
    pcs = site_controllers(config)
    assert len(pcs) == config.run.sites
    # The interesting part of the trace lies within the first 90 training seconds: some site's setpoint
    # falls below its limit there.
    lows = []
    ramp = config.grid.ramp_mw_per_min
    for pc in pcs:
        t, prev = 0.0, None
        while t < 90.0:
            sp = pc.begin_step(t)
            lows.append(sp.draw_mw < pc.site.limit_mw - 1e-9)
            assert sp.draw_mw <= sp.cap_mw + 1e-9
            if prev is not None and ramp is not None and sp.on:
                minutes = (sp.grid_hours - prev.grid_hours) * 60
                assert abs(sp.draw_mw - prev.draw_mw) <= ramp * minutes + 1e-9
            prev = sp if sp.on else None
            if not sp.on:
                pc.leave(t)
                back = pc.back_at(t)
                assert back is not None and back < 90.0
                pc.rejoin(back)
                t = back
                continue
            pc.end_step(t + 0.25, t + 0.25)
            t += 0.25
    assert any(lows)


class _FakeNvml:
    """NVML's calls as ``pynvml`` names them, on one board of 100-700 W whose limit may be set or refused."""

    def __init__(self, *, refuse: bool = False) -> None:
        self.limit, self.refuse, self.sets = 700_000, refuse, []

    def nvmlInit(self):  # noqa: N802 - NVML's names
        pass

    def nvmlDeviceGetHandleByIndex(self, index):  # noqa: N802
        return index

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle):  # noqa: N802
        return 100_000, 700_000

    def nvmlDeviceGetPowerManagementLimit(self, handle):  # noqa: N802
        return self.limit

    def nvmlDeviceGetPowerUsage(self, handle):  # noqa: N802
        return 432_100

    def nvmlDeviceSetPowerManagementLimit(self, handle, mw):  # noqa: N802
        if self.refuse:
            raise PermissionError("Insufficient Permissions")
        self.limit = mw
        self.sets.append(mw)


def test_nvml_limits_the_board_to_the_controllers_share_and_gives_it_back():
    from geotrain.power.nvml import GpuPower
    from geotrain.train.pace import Pace

    nvml = _FakeNvml()
    gpu = GpuPower.open(0, nvml=nvml)
    assert gpu.watts() == 432.1
    assert gpu.apply(0.5) and nvml.limit == 400_000  # half of 100-700 W
    assert gpu.apply(0.5) and nvml.sets == [400_000]  # unchanged: not set again
    pace = Pace(speed=0.5, gpu=gpu, power=None)
    pace.close()
    assert nvml.limit == 700_000  # the board's own limit again


def test_nvml_refusing_a_limit_falls_back_to_holding_steps_back():
    from geotrain.power.nvml import GpuPower

    gpu = GpuPower.open(0, nvml=_FakeNvml(refuse=True))
    assert not gpu.apply(0.3) and not gpu.limiting and "Permission" in gpu.refusal
    assert GpuPower.open(0, nvml=object()) is None  # no NVML: nothing to do
