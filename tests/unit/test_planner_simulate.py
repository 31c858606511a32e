"""The planner's simulation: agreement with the formula, determinism, caps, noise and failures.

What is exactly comparable: the simulation plays the run's sync periods round by round and has no end-of-run
term, while the formula (``geotrain.algorithms.timing``) adds one where the run's end exposes a transfer:
overlapped DiLoCo's last sync (T minus what a period already exposes) and Streaming DiLoCo's final sync of
every fragment (P syncs of T_f instead of the one regular period they replace). For ddp and blocking DiLoCo
with whole rounds the end term is zero and the two must agree exactly; for the others the simulation must
equal the formula minus the end term, both worked out by hand below.
"""

from __future__ import annotations

import pytest

from geotrain.config import SimulateConfig
from geotrain.errors import ConfigError
from geotrain.planner.model import plan
from geotrain.planner.simulate import simulate

try:  # the toy world is defined once, beside the formula tests (tests/ is not a package)
    from test_planner_model import toy_spec
except ImportError:  # pragma: no cover - if tests/ becomes a package
    from tests.unit.test_planner_model import toy_spec

# Three toy sites, one of them slow (MFU 0.3), over 8 Gbit/s, 10 ms links. Each site computes a third of
# 6e15 FLOPs per step: 2e15 / 3e15 = 2/3 s at the fast sites, 2e15 / 1.8e15 = 10/9 s at the slow one, which
# gates every sync. fp32 among 3 sites travels framed in a reduce-scatter: the 1e9 values are cut into
# 3 chunks of ceil(1e9 / 3) = 333,333,334 values, each encoded as 48 + 4 * 333,333,334 = 48 + 1,333,333,336
# (a multiple of 8) = 1,333,333,384 bytes; 2 steps of a chunk out and 2 of the encoded mean chunk back, a
# ring all-reduce's 4 steps of (0.01 + 8 * 1,333,333,384 / 8e9) s. A P=2 fragment (5e8 values): chunks of
# ceil(5e8 / 3) = 166,666,667 values, a body of 666,666,668 bytes padded to 666,666,672, + 48 = 666,666,720
# bytes: 4 * (0.01 + 8 * 666,666,720 / 8e9) s. 100 steps = 10 rounds of H=10.
C_FAST, C_SLOW = 2 / 3, 10 / 9
T = 4 * (0.01 + 1.333333384)  # 5.373333536 s
T_F = 4 * (0.01 + 0.66666672)  # 2.70666688 s
HETERO = {"run.sites": 3, "wan.link": "8gbit/10ms",
          "site": [{"name": "a"}, {"name": "b"}, {"name": "slow", "mfu": 0.3}]}
E_STREAM = T_F - C_SLOW  # tau = 1 hides one slow step of each fragment's sync
# (values, the simulated wall by hand, the formula's end-of-run term by hand)
CASES = [
    ({"run.algorithm": "ddp"}, 100 * (C_SLOW + T), 0.0),
    ({}, 10 * (10 * C_SLOW + T), 0.0),
    # Overlapped: the 5.37 s sync hides behind the next 11.1 s round; the formula exposes the last one.
    ({"comm.overlap": True}, 10 * 10 * C_SLOW, T),
    # Streaming, P=2, tau=1: 20 fragment periods of 5 slow steps plus T_F - C_SLOW exposed each. The formula
    # counts 19 regular periods and then one final sync of both fragments at once (the whole model, T): its
    # end term is T - E_STREAM.
    ({"run.algorithm": "streaming", "streaming.fragments": 2, "streaming.overlap_steps": 1},
     20 * (5 * C_SLOW + E_STREAM), T - E_STREAM),
]


@pytest.mark.parametrize(("values", "wall", "end"), CASES, ids=["ddp", "diloco", "diloco+overlap", "streaming"])
def test_without_noise_or_failures_the_simulation_is_the_formula_without_its_end_term(values, wall, end):
    spec = toy_spec(HETERO | values)
    formula = plan(spec)
    sim = simulate(spec, SimulateConfig())
    assert sim.time_to_train_seconds == pytest.approx(wall, rel=1e-9)
    assert sim.time_to_train_seconds == pytest.approx(formula.time_to_train_seconds - end, rel=1e-9)
    # Utilization: the sites' compute (100 steps each) over the wall, mean over sites.
    assert sim.utilization == pytest.approx((2 * 100 * C_FAST + 100 * C_SLOW) / 3 / wall, rel=1e-9)
    # Energy: three 1 kW accelerators at PUE 1 for the whole wall.
    assert sim.energy_mwh == pytest.approx(3 * 1000 * wall / 3.6e9, rel=1e-9)
    assert sim.failures == 0 and sim.lost_hours == 0
    assert sim.rounds == (100 if values.get("run.algorithm") == "ddp" else 10)


@pytest.mark.parametrize(("values", "wall", "end"), CASES[:2], ids=["ddp", "diloco"])
def test_where_the_run_ends_on_a_sync_point_the_simulation_equals_the_formula(values, wall, end):
    spec = toy_spec(HETERO | values)
    formula, sim = plan(spec), simulate(spec, SimulateConfig())
    assert sim.time_to_train_seconds == pytest.approx(formula.time_to_train_seconds, rel=1e-9)
    assert sim.utilization == pytest.approx(formula.utilization, rel=1e-9)
    assert sim.energy_mwh == pytest.approx(formula.energy_mwh, rel=1e-9)


def test_the_simulation_plays_the_settings_the_plan_chose():
    # comm.overlap unset: a 5.37 s sync stalls more than 2% of an 11.1 s round, so the plan overlaps, and so
    # does the simulation: 10 rounds of 100/9 s.
    spec = toy_spec(HETERO | {"comm.overlap": None})
    assert simulate(spec, SimulateConfig()).time_to_train_seconds == pytest.approx(10 * 10 * C_SLOW, rel=1e-9)


def test_the_configurations_simulate_section_is_the_default():
    spec = toy_spec({"run.tokens": 10**9, "simulate.seed": 7, "simulate.mtbf_hours": 0.05, "simulate.jitter": 0.2,
                     "simulate.restart_hours": 0.01, "simulate.recovery": "elastic"})
    assert simulate(spec).to_dict() == simulate(spec, spec.config.simulate).to_dict()
    assert SimulateConfig().recovery == "restart"  # the default recovery


@pytest.mark.parametrize("recovery", [
    dict(recovery="elastic", mtbf_hours=0.05),
    dict(recovery="restart", mtbf_hours=0.2, checkpoint_every_hours=0.02),
], ids=["elastic", "restart"])
def test_same_seed_same_run_other_seed_other_run(recovery):
    spec = toy_spec({"run.tokens": 10**9})  # 1000 steps: 100 rounds of 14 s
    cfg = dict(jitter=0.2, restart_hours=0.01) | recovery
    a = simulate(spec, SimulateConfig(seed=7, **cfg)).to_dict()
    b = simulate(spec, SimulateConfig(seed=7, **cfg)).to_dict()
    c = simulate(spec, SimulateConfig(seed=8, **cfg)).to_dict()
    assert a["failures"] > 0
    assert a == b
    assert a != c


def test_jitter_costs_utilization_because_the_slowest_gates():
    # 4 sites: 0.5 s steps, a 6 s sync (fp32 reduce-scattered then all-gathered: 6 steps of a 1e9-value
    # chunk) hidden behind 25 s rounds.
    spec = toy_spec({"outer.sync_every": 50, "comm.overlap": True, "run.sites": 4, "run.tokens": 10**9})
    base = simulate(spec, SimulateConfig()).utilization
    noisy = simulate(spec, SimulateConfig(jitter=0.2, seed=1)).utilization
    assert base == pytest.approx(1.0)
    assert noisy < 0.95  # E[max of 4] is well above the mean


def test_power_cap_limits_the_accelerators_that_run():
    # Two sites ask for 4 accelerators of 1 kW but one site's 2 kW cap feeds only 2: it computes half as fast.
    spec = toy_spec({"site": [{"name": "free", "accelerators": 4},
                              {"name": "capped", "accelerators": 4, "power_cap_mw": 0.002}]})
    formula = plan(spec)
    assert not formula.caps_respected
    # The formula plans what was asked: 0.25 s steps, 10 rounds of 2.5 s + 4 s (fp32 between 2 sites: one
    # all-gather step of 4e9 + 48 bytes, 4.000000048 s).
    assert formula.time_to_train_seconds == pytest.approx(10 * (2.5 + 4.000000048), rel=1e-12)
    sim = simulate(spec, SimulateConfig())
    assert [s["accelerators_active"] for s in sim.per_site] == [4, 2]
    # The capped site needs 0.5 s per step instead of 0.25 s: rounds of 5 s + 4 s of all-gather.
    assert sim.time_to_train_seconds == pytest.approx(10 * (5 + 4.000000048), rel=1e-12)
    assert sim.energy_mwh == pytest.approx((4 + 2) * 1000 * 90 / 3.6e9)


def test_elastic_failures_lose_little_and_restart_loses_more():
    spec = toy_spec({"run.tokens": 2 * 10**9, "run.sites": 3})
    clean = simulate(spec, SimulateConfig())
    elastic = simulate(spec, SimulateConfig(mtbf_hours=0.2, restart_hours=0.02, seed=3, recovery="elastic"))
    restart = simulate(spec, SimulateConfig(mtbf_hours=0.2, restart_hours=0.02, seed=3, recovery="restart",
                                            checkpoint_every_hours=0.1))
    assert elastic.failures > 5 and restart.failures > 5
    for r in (elastic, restart):
        assert r.time_to_train_seconds > clean.time_to_train_seconds
        assert r.utilization < clean.utilization
        assert r.lost_hours > 0 and r.downtime_hours > 0
    assert restart.lost_progress_hours > elastic.lost_progress_hours
    assert restart.utilization < elastic.utilization


def test_restart_loses_half_a_checkpoint_interval_per_failure_on_average():
    # One site, no links, MTBF far above the interval: each failure throws away ~U(0, interval) of progress.
    # One site computes the whole batch: 2e5 steps of 2 s.
    spec = toy_spec({"run.algorithm": "ddp", "run.sites": 1, "run.tokens": 2 * 10**11})
    interval = 0.05
    r = simulate(spec, SimulateConfig(mtbf_hours=2.0, restart_hours=0.0, recovery="restart",
                                      checkpoint_every_hours=interval, seed=0))
    assert r.failures > 20
    assert r.lost_progress_hours / r.failures == pytest.approx(interval / 2, rel=0.25)
    assert r.downtime_hours == 0


def test_a_site_that_is_down_rejoins_and_counts_downtime():
    spec = toy_spec({"run.tokens": 2 * 10**9})
    # A per-site list: 0 means the second site never fails.
    r = simulate(spec, SimulateConfig(mtbf_hours=[0.1, 0], restart_hours=0.05, seed=2, recovery="elastic"))
    failed, steady = r.per_site
    assert steady["failures"] == 0 and failed["failures"] > 0
    assert failed["downtime_hours"] == pytest.approx(0.05 * failed["failures"], rel=0.3)
    assert failed["utilization"] < steady["utilization"]


def test_simulate_config_validation():
    for kwargs, field in (
        ({"mtbf_hours": -1}, "simulate.mtbf_hours"),
        ({"mtbf_hours": 0}, "simulate.mtbf_hours"),  # 0 only means "never" inside a per-site list
        ({"mtbf_hours": [1.0, -1.0]}, "simulate.mtbf_hours"),
        ({"jitter": -0.1}, "simulate.jitter"),
        ({"recovery": "pray"}, "simulate.recovery"),
        ({"seed": -1}, "simulate.seed"),
        ({"checkpoint_every_hours": 0}, "simulate.checkpoint_every_hours"),
        ({"restart_hours": -1}, "simulate.restart_hours"),
    ):
        with pytest.raises(ConfigError) as info:
            SimulateConfig(**kwargs)
        assert info.value.field == field, kwargs
    with pytest.raises(ConfigError) as info:
        simulate(toy_spec(), SimulateConfig(mtbf_hours=[1.0, 2.0, 3.0]))  # 3 values for 2 sites
    assert info.value.field == "simulate.mtbf_hours"
