"""The planner's simulation: equivalence with the formula, determinism, caps, noise and failures."""

from __future__ import annotations

import pytest

from geotrain.errors import ConfigError
from geotrain.planner.model import AlgorithmSpec, SiteSpec, plan
from geotrain.planner.simulate import SimulationSpec, simulate

try:  # the toy world is defined once, beside the formula tests (tests/ is not a package)
    from test_planner_model import TOY, toy_spec
except ImportError:  # pragma: no cover - if tests/ becomes a package
    from tests.unit.test_planner_model import TOY, toy_spec

ALGORITHMS = [
    AlgorithmSpec(name="ddp"),
    AlgorithmSpec(name="ddp", overlap=True),
    AlgorithmSpec(name="diloco", sync_every=10),
    AlgorithmSpec(name="diloco", sync_every=10, overlap=True),
    AlgorithmSpec(name="streaming", sync_every=10, fragments=2, overlap_steps=1),
]


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda a: a.label)
def test_without_noise_or_failures_the_simulation_is_the_formula(algorithm):
    spec = toy_spec(algorithm=algorithm, sites=3, latency=0.01)
    spec.sites[2] = SiteSpec(name="slow", accelerator=TOY, accelerators=1, mfu=0.3, pue=1.0)  # heterogeneous
    formula = plan(spec)
    sim = simulate(spec, SimulationSpec())
    assert sim.time_to_train_seconds == pytest.approx(formula.time_to_train_seconds, rel=1e-9)
    assert sim.utilization == pytest.approx(formula.utilization, rel=1e-9)
    assert sim.energy_mwh == pytest.approx(formula.energy_mwh, rel=1e-9)
    assert sim.failures == 0 and sim.lost_hours == 0


def test_same_seed_same_run_other_seed_other_run():
    spec = toy_spec(algorithm=AlgorithmSpec(name="diloco", sync_every=10), tokens=1e9)
    cfg = dict(mtbf_hours=0.05, jitter=0.2, restart_hours=0.01)
    a = simulate(spec, SimulationSpec(seed=7, **cfg)).to_dict()
    b = simulate(spec, SimulationSpec(seed=7, **cfg)).to_dict()
    c = simulate(spec, SimulationSpec(seed=8, **cfg)).to_dict()
    assert a == b
    assert a != c


def test_jitter_costs_utilization_because_the_slowest_gates():
    spec = toy_spec(algorithm=AlgorithmSpec(name="diloco", sync_every=50, overlap=True), sites=4, tokens=1e9)
    base = simulate(spec, SimulationSpec()).utilization
    noisy = simulate(spec, SimulationSpec(jitter=0.2, seed=1)).utilization
    assert base == pytest.approx(1.0)
    assert noisy < 0.95  # E[max of 4] is well above the mean


def test_power_cap_limits_the_accelerators_that_run():
    # Two sites ask for 4 accelerators of 1 kW but one site's cap feeds only 2: it computes half as fast.
    spec = toy_spec(algorithm=AlgorithmSpec(name="diloco", sync_every=10), accelerators=4)
    spec.sites[1] = SiteSpec(name="capped", accelerator=TOY, accelerators=4, mfu=0.5, pue=1.0, power_cap_mw=0.002)
    formula = plan(spec)
    assert not formula.caps_respected
    sim = simulate(spec, SimulationSpec())
    assert [s["accelerators_active"] for s in sim.per_site] == [4, 2]
    # The capped site needs 0.5 s per step instead of 0.25 s: rounds of 5 s + 4 s of all-reduce.
    assert sim.time_to_train_seconds == pytest.approx(10 * (5 + 4))
    assert sim.time_to_train_seconds > formula.time_to_train_seconds
    assert sim.energy_mwh == pytest.approx((4 + 2) * 1000 * 90 / 3.6e9)


def test_elastic_failures_lose_little_and_restart_loses_more():
    spec = toy_spec(algorithm=AlgorithmSpec(name="diloco", sync_every=10), tokens=2e9, sites=3)
    clean = simulate(spec, SimulationSpec())
    elastic = simulate(spec, SimulationSpec(mtbf_hours=0.2, restart_hours=0.02, seed=3))
    restart = simulate(spec, SimulationSpec(mtbf_hours=0.2, restart_hours=0.02, seed=3, recovery="restart",
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
    spec = toy_spec(algorithm=AlgorithmSpec(name="ddp"), sites=1, tokens=2e11)  # 200k steps of 0.5 s
    interval = 0.05
    r = simulate(spec, SimulationSpec(mtbf_hours=2.0, restart_hours=0.0, recovery="restart",
                                      checkpoint_every_hours=interval, seed=0))
    assert r.failures > 20
    assert r.lost_progress_hours / r.failures == pytest.approx(interval / 2, rel=0.25)
    assert r.downtime_hours == 0


def test_a_site_that_is_down_rejoins_and_counts_downtime():
    spec = toy_spec(algorithm=AlgorithmSpec(name="diloco", sync_every=10), tokens=2e9)
    r = simulate(spec, SimulationSpec(mtbf_hours=[0.1, None], restart_hours=0.05, seed=2))
    failed, steady = r.per_site
    assert steady["failures"] == 0 and failed["failures"] > 0
    assert failed["downtime_hours"] == pytest.approx(0.05 * failed["failures"], rel=0.3)
    assert failed["utilization"] < steady["utilization"]


def test_simulation_spec_validation():
    for kwargs, field in (
        ({"mtbf_hours": -1}, "mtbf_hours"),
        ({"jitter": -0.1}, "jitter"),
        ({"recovery": "pray"}, "recovery"),
        ({"seed": -1}, "seed"),
        ({"checkpoint_every_hours": 0}, "checkpoint_every_hours"),
    ):
        with pytest.raises(ConfigError) as info:
            SimulationSpec(**kwargs)
        assert info.value.field == field
    with pytest.raises(ConfigError):
        simulate(toy_spec(algorithm=AlgorithmSpec()), SimulationSpec(mtbf_hours=[1.0, 2.0, 3.0]))
