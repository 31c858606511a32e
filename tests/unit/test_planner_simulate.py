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

import math
from pathlib import Path

import numpy as np

from geotrain.config import SimulateConfig, load_config
from geotrain.errors import ConfigError
from geotrain.planner.model import plan, plan_spec, sync_comm
from geotrain.planner.simulate import failure_costs, heal_state_bytes, reform_seconds, simulate
from geotrain.topology import wire_bytes

try:  # the toy world is defined once, beside the formula tests (tests/ is not a package)
    from test_planner_model import T as T_TOY
    from test_planner_model import gather, message, toy_spec
except ImportError:  # pragma: no cover - if tests/ becomes a package
    from tests.unit.test_planner_model import T as T_TOY
    from tests.unit.test_planner_model import gather, message, toy_spec

ROOT = Path(__file__).resolve().parents[2]

# Three toy sites, one of them slow (MFU 0.3), over 8 Gbit/s, 10 ms links. Each site computes a third of
# 6e15 FLOPs per step: 2e15 / 3e15 = 2/3 s at the fast sites, 2e15 / 1.8e15 = 10/9 s at the slow one, which
# gates every sync. fp32 among 3 sites travels framed in a reduce-scatter: the 1e9 values are cut into
# 3 chunks of ceil(1e9 / 3) = 333,333,334 values, each encoded as 48 + 4 * 333,333,334 = 48 + 1,333,333,336
# (a multiple of 8) = 1,333,333,384 bytes. The all-to-all sends one chunk to each other site at once, one
# message, its connection paced at 95% of the link's rate: 2 * 0.01 + 8 * wire_bytes(1,333,333,384) / (0.95 * 8e9)
# s; then the ring all-gathers the encoded mean chunks, 2 steps of two 666,666,692-byte halves back to back (each
# 0.73 s, over two latencies): 2 * 0.01 + 2 * 2 * 8 * wire_bytes(666,666,692) / (0.95 * 8e9) s. A P=2 fragment
# (5e8 values): chunks of ceil(5e8 / 3) = 166,666,667 values, a body of 666,666,668 bytes padded to 666,666,672,
# + 48 = 666,666,720 bytes, gathered in halves of 333,333,360 bytes. 100 steps = 10 rounds of H=10.
C_FAST, C_SLOW = 2 / 3, 10 / 9
T = 0.02 + 8 * wire_bytes(1_333_333_384) / (0.95 * 8e9) + 0.02 + 4 * 8 * wire_bytes(666_666_692) / (0.95 * 8e9)
T_F = 0.02 + 8 * wire_bytes(666_666_720) / (0.95 * 8e9) + 0.02 + 4 * 8 * wire_bytes(333_333_360) / (0.95 * 8e9)
# T = 4.401733444 s, T_F = 2.220866838 s
HETERO = {"run.sites": 3, "wan.link": "8gbit/10ms",
          "site": [{"name": "a"}, {"name": "b"}, {"name": "slow", "mfu": 0.3}]}
E_STREAM = T_F - C_SLOW  # tau = 1 hides one slow step of each fragment's sync
# (values, the simulated wall by hand, the formula's end-of-run term by hand)
CASES = [
    ({"run.algorithm": "ddp"}, 100 * (C_SLOW + T), 0.0),
    ({}, 10 * (10 * C_SLOW + T), 0.0),
    # Overlapped: the 4.40 s sync hides behind the next 11.1 s round; the formula exposes the last one.
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


def test_the_hetero_sync_times_by_hand():
    assert T == pytest.approx(message(1_333_333_384, 8e9, 0.01) + gather(1_333_333_384, 8e9, 0.01, sites=3),
                              rel=1e-15)
    assert T_F == pytest.approx(message(666_666_720, 8e9, 0.01) + gather(666_666_720, 8e9, 0.01, sites=3),
                                rel=1e-15)
    spec = toy_spec(HETERO)
    assert sync_comm(spec).seconds == pytest.approx(T, rel=1e-12)
    fragment = toy_spec(HETERO | {"run.algorithm": "streaming", "streaming.fragments": 2})
    assert plan(fragment).comm_seconds_per_sync == pytest.approx(T_F, rel=1e-12)


def test_the_simulation_plays_the_settings_the_plan_chose():
    # comm.overlap unset: a 4.40 s sync stalls more than 2% of an 11.1 s round, so the plan overlaps, and so
    # does the simulation: 10 rounds of 100/9 s.
    spec = toy_spec(HETERO | {"comm.overlap": None})
    assert simulate(spec, SimulateConfig()).time_to_train_seconds == pytest.approx(10 * 10 * C_SLOW, rel=1e-9)


def test_the_configurations_simulate_section_is_the_default():
    spec = toy_spec({"run.tokens": 10**9, "simulate.seed": 7, "simulate.mtbf_hours": 0.05, "simulate.jitter": 0.2,
                     "simulate.restart_hours": 0.01, "simulate.recovery": "elastic"})
    assert simulate(spec).to_dict() == simulate(spec, spec.config.simulate).to_dict()
    assert SimulateConfig().recovery == "elastic"  # the default recovery: what training's membership does


@pytest.mark.parametrize("recovery", [
    dict(recovery="elastic", mtbf_hours=0.05),
    dict(recovery="elastic", mtbf_hours=0.05, silent_fraction=0.5),  # the kind of each failure is drawn too
    dict(recovery="restart", mtbf_hours=0.2, checkpoint_every_hours=0.02),
], ids=["elastic", "elastic-mixed", "restart"])
def test_same_seed_same_run_other_seed_other_run(recovery):
    spec = toy_spec({"run.tokens": 10**9})  # 1000 steps: 100 rounds of 14.4 s
    cfg = dict(jitter=0.2, restart_hours=0.01) | recovery
    a = simulate(spec, SimulateConfig(seed=7, **cfg)).to_dict()
    b = simulate(spec, SimulateConfig(seed=7, **cfg)).to_dict()
    c = simulate(spec, SimulateConfig(seed=8, **cfg)).to_dict()
    assert a["failures"] > 0
    assert a == b
    assert a != c


def test_jitter_costs_utilization_because_the_slowest_gates():
    # 4 sites: 0.5 s steps, a 4.4 s sync (fp32 cut into 4 chunks of 1e9 + 48 bytes: one chunk's message in the
    # all-to-all, then 3 all-gather steps of a chunk) hidden behind 25 s rounds.
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
    # The formula plans what was asked: 0.25 s steps, 10 rounds of 2.5 s + 4.36 s (fp32 between 2 sites: one
    # all-gather step of 4e9 + 48 bytes, the toy's T = 4.361733171 s).
    assert formula.time_to_train_seconds == pytest.approx(10 * (2.5 + T_TOY), rel=1e-12)
    sim = simulate(spec, SimulateConfig())
    assert [s["accelerators_active"] for s in sim.per_site] == [4, 2]
    # The capped site needs 0.5 s per step instead of 0.25 s: rounds of 5 s + 4.36 s of all-gather.
    assert sim.time_to_train_seconds == pytest.approx(10 * (5 + T_TOY), rel=1e-12)
    assert sim.energy_mwh == pytest.approx((4 + 2) * 1000 * 10 * (5 + T_TOY) / 3.6e9)


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
        ({"silent_fraction": 1.5}, "simulate.silent_fraction"),
        ({"silent_fraction": -0.1}, "simulate.silent_fraction"),
        ({"reform_seconds": -1}, "simulate.reform_seconds"),
    ):
        with pytest.raises(ConfigError) as info:
            SimulateConfig(**kwargs)
        assert info.value.field == field, kwargs
    with pytest.raises(ConfigError) as info:
        simulate(toy_spec(), SimulateConfig(mtbf_hours=[1.0, 2.0, 3.0]))  # 3 values for 2 sites
    assert info.value.field == "simulate.mtbf_hours"
    # the former name of the re-forming setting is refused with the new one
    with pytest.raises(ConfigError) as info:
        load_config(values={"simulate.rebuild_seconds": 30})
    assert info.value.field == "simulate.rebuild_seconds" and "reform_seconds" in str(info.value)


# -- elastic recovery: what training's membership does, at the costs its configuration gives ----------------------
#
# Three toy sites (a third of the batch each, 2/3 s per step, H=10 blocking) over 8 Gbit/s, 10 ms links; 1e8
# tokens are 10 rounds. Among 3 sites fp32 is reduce-scattered (T3 = T of HETERO above, 4.401733444 s). The
# pattern stays the one chosen for the configured 3 sites when one is down: 2 survivors send one chunk of
# ceil(1e9 / 2) = 5e8 values (48 + 2e9 = 2,000,000,048 bytes) each way in one message, then all-gather their
# mean chunks in one step of two 1,000,000,024-byte halves:
# T2 = 2 * 0.01 + 8 * wire_bytes(2,000,000,048) / (0.95 * 8e9) + 2 * 0.01
#      + 2 * 8 * wire_bytes(1,000,000,024) / (0.95 * 8e9) = 4.401733221 s.
# Only site 2 fails (an MTBF for it alone), so the seeded generator's first draw is its failure time; it stays
# down 100 h, longer than the run. Re-forming: 3 round trips of the 10 ms links, 0.06 s.
C3 = 20 / 3  # compute per round: 10 steps of 2/3 s
T3 = T
T2 = 0.02 + 8 * wire_bytes(2_000_000_048) / (0.95 * 8e9) + 0.02 + 2 * 8 * wire_bytes(1_000_000_024) / (0.95 * 8e9)
W3, W2 = C3 + T3, C3 + T2  # a round of 3 sites, of the 2 survivors
REFORM = 3 * 2 * 0.010
HEARTBEAT_TIMEOUT = 5.0
THREE = {"run.sites": 3, "wan.link": "8gbit/10ms", "membership.heartbeat_timeout_s": HEARTBEAT_TIMEOUT}
ONE_FAILURE = dict(mtbf_hours=[0, 0, 0.02], restart_hours=100.0)


def _failure(seed: int) -> tuple[float, int, float]:
    """Site 2's failure time as the simulation draws it, its round and its place in that round."""
    f = float(np.random.default_rng(seed).exponential(0.02 * 3600))
    r = int(f // W3)
    return f, r, f - r * W3


def _rounds_after(r: int) -> int:
    """Rounds of 2 sites after a failure in round r, whose round the survivors still complete (2/3 of one)."""
    return math.ceil(round((10 - r - 2 / 3) * 1.5, 9))


def test_the_hand_computed_sync_times_are_the_plans():
    spec = toy_spec(THREE)
    assert T2 == pytest.approx(message(2_000_000_048, 8e9, 0.01) + gather(2_000_000_048, 8e9, 0.01, sites=2),
                               rel=1e-15)
    assert sync_comm(spec).seconds == pytest.approx(T3, rel=1e-12)
    assert sync_comm(spec, members=[0, 1]).seconds == pytest.approx(T2, rel=1e-12)


def test_a_silent_failure_during_inner_steps_is_waited_for_at_the_next_sync():
    spec = toy_spec(THREE)
    f, r, pos = _failure(8)
    assert r == 3 and C3 - HEARTBEAT_TIMEOUT < pos < C3  # found after the survivors reach the sync
    silent = simulate(spec, SimulateConfig(seed=8, silent_fraction=1.0, **ONE_FAILURE))
    crash = simulate(spec, SimulateConfig(seed=8, silent_fraction=0.0, **ONE_FAILURE))
    # Silent: the coordinator drops site 2 heartbeat_timeout_s after it failed; the survivors wait at the quorum
    # until then, re-form, and sync among themselves. A crash is dropped at once: they only re-form.
    after = _rounds_after(r) * W2
    assert silent.time_to_train_seconds == pytest.approx(f + HEARTBEAT_TIMEOUT + REFORM + T2 + after, rel=1e-12)
    assert crash.time_to_train_seconds == pytest.approx(r * W3 + C3 + REFORM + T2 + after, rel=1e-12)
    assert (silent.failures, silent.silent_failures, crash.silent_failures) == (1, 1, 0)
    assert silent.detection_seconds == HEARTBEAT_TIMEOUT and crash.detection_seconds == 0
    assert silent.reform_seconds == pytest.approx(REFORM) and crash.reform_seconds == pytest.approx(REFORM)
    assert silent.stall_seconds == pytest.approx(pos + HEARTBEAT_TIMEOUT - C3 + REFORM)
    assert crash.stall_seconds == pytest.approx(REFORM)
    # site 2 loses its partial round, nothing else; it never comes back, so nothing is healed
    assert silent.lost_compute_hours * 3600 == pytest.approx(pos) and silent.rejoins == 0 == silent.heal_seconds


def test_a_silent_failure_found_before_the_next_sync_costs_the_survivors_only_the_re_forming():
    f, r, pos = _failure(36)
    assert r == 3 and pos + HEARTBEAT_TIMEOUT < C3
    result = simulate(toy_spec(THREE), SimulateConfig(seed=36, **ONE_FAILURE))
    assert result.time_to_train_seconds == pytest.approx(r * W3 + C3 + REFORM + T2 + _rounds_after(r) * W2,
                                                         rel=1e-12)
    assert result.detection_seconds == HEARTBEAT_TIMEOUT and result.stall_seconds == pytest.approx(REFORM)


def test_a_failure_mid_sync_fails_the_vote_and_the_sync_is_redone_without_the_site():
    spec = toy_spec(THREE)
    f, r, pos = _failure(32)
    assert r == 3 and C3 < pos < W3  # during the sync that ends round 3
    silent = simulate(spec, SimulateConfig(seed=32, silent_fraction=1.0, **ONE_FAILURE))
    crash = simulate(spec, SimulateConfig(seed=32, silent_fraction=0.0, **ONE_FAILURE))
    after = _rounds_after(r) * W2
    # A crash fails the transfer at once: the attempt so far is lost, the survivors re-form and sync again.
    assert crash.time_to_train_seconds == pytest.approx(f + REFORM + T2 + after, rel=1e-12)
    # A silent site hangs the transfer until its deadline, transfer_floor_s + transfer_margin x T3 from the
    # start of the sync (30 s + 8 x T3 by default).
    deadline = 30.0 + 8.0 * T3
    assert silent.time_to_train_seconds == pytest.approx(r * W3 + C3 + deadline + REFORM + T2 + after, rel=1e-12)
    assert silent.detection_seconds == pytest.approx(deadline - (pos - C3))
    assert silent.stall_seconds == pytest.approx(deadline + REFORM)
    # site 2's whole round is lost: its pseudo-gradient was in the sync voted down
    assert silent.lost_compute_hours * 3600 == pytest.approx(C3)


def test_detection_follows_the_heartbeat_timeout():
    # No link: syncs take no time, so every failure strikes during inner steps and is found
    # heartbeat_timeout_s after it if silent, at once if it crashes.
    values = {"run.sites": 3, "wan.link": "none", "run.tokens": 10**10}
    sim = dict(mtbf_hours=0.05, restart_hours=0.02, seed=4)
    for timeout in (2.0, 20.0):
        spec = toy_spec(values | {"membership.heartbeat_timeout_s": timeout})
        silent = simulate(spec, SimulateConfig(silent_fraction=1.0, **sim))
        assert silent.failures > 10 and silent.silent_failures == silent.failures
        # a failure of the last live site has nobody to detect it: the run resumes from its checkpoint
        detected = silent.failures - silent.outages
        assert silent.detection_seconds == pytest.approx(timeout * detected)
        mixed = simulate(spec, SimulateConfig(silent_fraction=0.5, **sim))
        assert 0 < mixed.silent_failures < mixed.failures
        assert mixed.detection_seconds <= timeout * mixed.silent_failures
        assert mixed.detection_seconds >= timeout * (mixed.silent_failures - mixed.outages)
    crash = simulate(toy_spec(values), SimulateConfig(silent_fraction=0.0, **sim))
    assert crash.failures > 10 and crash.detection_seconds == 0 and crash.silent_failures == 0
    costs = failure_costs(toy_spec(values | {"membership.heartbeat_timeout_s": 20.0}),
                          sim=SimulateConfig(silent_fraction=0.25))
    assert (costs.detection_crash_seconds, costs.detection_silent_seconds, costs.detection_seconds) == (0, 20, 5)


# The toy's state: 1e9 values; DiLoCo with AdamW and outer momentum keeps the model, two AdamW moments, the
# global parameters, the start of the round and the outer momentum: 6 x 4e9 = 24e9 bytes.
STATE_BYTES = 6 * 4 * 10**9


def test_heal_time_is_one_message_of_the_state_bytes_over_the_link():
    spec = toy_spec({"wan.link": "8gbit/25ms"})
    costs = failure_costs(spec)
    assert costs.heal_bytes == STATE_BYTES == heal_state_bytes(spec.config, spec.model.layout)
    assert costs.heal_seconds == pytest.approx(2 * 0.025 + 8 * wire_bytes(24e9) / (0.95 * 8e9), rel=1e-12)  # 26.22 s
    assert (costs.site, costs.healer, costs.link) == (1, 0, "8gbit/25ms")  # the lowest live site heals
    # Two workers per site send one shard each; the two streams share the link: the same time.
    two = failure_costs(toy_spec({"wan.link": "8gbit/25ms", "run.workers_per_site": 2}))
    assert two.heal_seconds == pytest.approx(costs.heal_seconds, rel=1e-12)
    # Over a per-pair link: site 2 is healed by site 0 over their 1 Gbit/s, 100 ms link, and is the slowest
    # to heal, so failure_costs picks it when no site is named.
    pair = toy_spec({"run.sites": 3, "wan.link": "8gbit/25ms",
                     "wan.links": [{"between": [0, 2], "link": "1gbit/100ms"}]})
    slow = failure_costs(pair)
    assert (slow.site, slow.healer, slow.link) == (2, 0, "1gbit/100ms")
    assert slow.heal_seconds == pytest.approx(2 * 0.1 + 8 * wire_bytes(24e9) / (0.95 * 1e9), rel=1e-12)  # 209.6 s
    assert failure_costs(pair, site=0).heal_seconds == pytest.approx(costs.heal_seconds, rel=1e-12)  # from site 1
    with pytest.raises(ConfigError):
        failure_costs(pair, site=3)


def test_the_simulation_heals_every_rejoin_at_that_cost():
    # Site 1 fails and comes back again and again; site 0 heals it each time over the 8 Gbit/s, 25 ms link.
    spec = toy_spec({"wan.link": "8gbit/25ms", "run.tokens": 2 * 10**9})
    r = simulate(spec, SimulateConfig(mtbf_hours=[0, 0.1], restart_hours=0.02, seed=2))
    assert r.rejoins >= 3 and r.heal_bytes == STATE_BYTES
    heal = 2 * 0.025 + 8 * wire_bytes(24e9) / (0.95 * 8e9)  # one message of the state: 26.22 s
    assert r.heal_seconds == pytest.approx(r.rejoins * heal, rel=1e-12)
    assert r.heal_seconds_per_rejoin == pytest.approx(heal, rel=1e-12)
    # re-forming: 3 round trips of 50 ms after each failure and at each rejoin (one survivor: no link left
    # among the members, so only the rejoin re-forms over a link)
    assert r.reform_seconds == pytest.approx(r.rejoins * 0.15)


@pytest.mark.parametrize(("values", "copies"), [
    ({"run.algorithm": "ddp"}, 3),  # model + AdamW's two moments
    ({"run.algorithm": "diloco"}, 6),  # + global parameters, start of the round, outer momentum
    ({"run.algorithm": "diloco", "comm.overlap": True}, 6),  # syncs in flight are drained before admission
    ({"run.algorithm": "streaming", "streaming.overlap_steps": 2}, 5),  # + global fragments and their momentum
    ({"run.algorithm": "diloco", "optim.name": "sgd", "outer.momentum": 0.0}, 3),  # no moments, no momentum
], ids=["ddp", "diloco", "diloco+overlap", "streaming", "diloco-sgd"])
def test_heal_state_bytes_count_the_state_a_healer_packs(values, copies):
    """Against the blob training sends: the demo model's state packed as ``geotrain.train.loop`` packs it for a
    joiner (its ``snapshot`` without the worker's counters), after a step of each optimizer."""
    torch = pytest.importorskip("torch")
    from geotrain.algorithms.strategies.base import StrategyContext
    from geotrain.models.gpt import GPT
    from geotrain.train.state import pack
    from geotrain.train.workload import inner_optimizer, lr_schedule

    config = load_config(values=values)
    torch.manual_seed(0)
    model = GPT(config.model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = inner_optimizer(params, config.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(config.optim, 100))
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    scheduler.step()
    strategy = config.algorithm().build(config, StrategyContext(model=model, comm=None, site_pg=None, workers=1))
    for outer in [getattr(strategy, "outer", None), *(f.outer for f in getattr(strategy, "fragments", []))]:
        if outer is not None:  # past the outer warm-up, the outer momentum exists
            outer.step(torch.zeros_like(outer.params))
    blob = pack({"config": config.to_dict(), "loop": {"step": 9, "trained": 10}, "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "strategy": strategy.state_dict(), "budget": None, "comm": {"syncs": 1, "guard": {}},
                 "run_wall": 1.0})
    predicted = heal_state_bytes(config)
    assert predicted == copies * 4 * config.layout().params
    assert predicted <= len(blob) <= predicted * 1.02  # headers, counters and the configuration on top


def test_reform_seconds_are_three_round_trips_of_the_slowest_link_unless_set():
    spec = toy_spec({"run.sites": 3, "wan.link": "8gbit/25ms", "wan.links": [{"between": [1, 2], "link": "1gbit/40ms"}]})
    sim = SimulateConfig()
    assert reform_seconds(sim, spec.topology, [0, 1, 2]) == pytest.approx(3 * 2 * 0.040)
    assert reform_seconds(sim, spec.topology, [0, 1]) == pytest.approx(3 * 2 * 0.025)
    assert reform_seconds(sim, spec.topology, [2]) == 0  # one member: no link to cross
    assert reform_seconds(SimulateConfig(reform_seconds=1.5), spec.topology, [0, 1]) == 1.5
    costs = failure_costs(spec)
    assert costs.reform_seconds == pytest.approx(0.24) and "3 round trips of 80 ms" in costs.reform_source
    assert failure_costs(spec, sim=SimulateConfig(reform_seconds=2.0)).reform_source == "simulate.reform_seconds"
    # no link (no emulation): nothing to wait for
    assert failure_costs(toy_spec({"wan.link": "none"})).reform_seconds == 0


def test_failure_costs_take_a_run_configuration_as_the_fault_benchmark_has_it():
    config = load_config(values={"run.sites": 4, "wan.link": "10mbit/50ms", "membership.heartbeat_timeout_s": 5.0})
    costs = failure_costs(config, site=2)
    n = config.layout().params
    assert (costs.site, costs.healer) == (2, 0) and costs.heal_bytes == 6 * 4 * n
    assert costs.heal_seconds == pytest.approx(2 * 0.05 + 8 * wire_bytes(6 * 4 * n) / (0.95 * 10e6), rel=1e-12)
    assert costs.detection_silent_seconds == 5.0 and costs.reform_seconds == pytest.approx(0.3)
    assert costs.detection_hung_seconds == pytest.approx(30.0 + 8.0 * costs.sync_seconds)
    assert costs.to_dict()["heal_seconds"] == costs.heal_seconds


def test_elastic_beats_restart_on_a_long_run_with_failures():
    # The worked example of docs/planner.md: 70B on three datacenters of 16,384 H100 over 10 Gbit/s, here on
    # 60T tokens (17.7 days without failures), every site failing once a day on average, at the default costs
    # (silent failures, 24 min heals). On the 4.4-day run of 15T tokens the luck of the draw can decide.
    config = load_config(ROOT / "configs" / "plan-three-datacenters.toml",
                         values={"sites.accelerators": 16384, "run.tokens": "60t"})
    spec = plan_spec(config)
    for seed in (1, 2, 3):
        elastic = simulate(spec, SimulateConfig(mtbf_hours=24, seed=seed))
        restart = simulate(spec, SimulateConfig(mtbf_hours=24, seed=seed, recovery="restart"))
        assert elastic.failures > 5 and restart.failures > 5
        assert elastic.time_to_train_seconds < restart.time_to_train_seconds
        assert elastic.utilization > restart.utilization
        assert elastic.lost_progress_hours < restart.lost_progress_hours
        assert elastic.heal_seconds > 0 and elastic.stall_seconds > elastic.heal_seconds


# What the restart model gave before elastic recovery was modelled from training (recorded from that code):
# the restart path must not change. The two linked cases were recorded again when the collectives' costs were
# recalibrated against the network lab (the toy's syncs went from 4.0 s to 4.14 s between 2 sites and from
# 5.33 s to 4.14 s among 3); with the former costs the simulation still gives the former figures (116,
# 1832.7886677281613, ...) and (436, 6619.82243527071, ...) exactly, as checked when they were recorded again.
# They were recorded once more when the model began charging a link's bytes at the 95% of its rate that a
# connection is paced at (the toy's syncs went from 4.14 s to 4.36 s between 2 sites); with the share set back
# to 1 the simulation gives the figures before that, (120, 1912.3043071351776, ...) and (428, 5818.96074059369,
# ...), exactly. The one-site case has no link and did not change.
RESTART_GOLDEN = [
    ({"run.tokens": 10**9},
     dict(mtbf_hours=0.2, checkpoint_every_hours=0.02, jitter=0.2, restart_hours=0.01, seed=7),
     (114, 1823.202140915882, 0.5313233412326461, 4, 0.09896340790350056, 0.07055286583561854, 0.08)),
    ({"run.tokens": 2 * 10**9, "run.sites": 3},
     dict(mtbf_hours=0.2, restart_hours=0.02, seed=3, checkpoint_every_hours=0.1),
     (421, 5826.593774121059, 0.22883581471825978, 18, 1.9374281266213504, 1.192153585364546, 1.08)),
    ({"run.algorithm": "ddp", "run.sites": 1, "run.tokens": 2 * 10**11},
     dict(mtbf_hours=2.0, restart_hours=0.0, checkpoint_every_hours=0.05, seed=0),
     (202420, 404794.7883089684, 0.988155014719931, 50, 1.331885641380116, 1.331885641380116, 0.0)),
]


@pytest.mark.parametrize(("values", "sim", "expected"), RESTART_GOLDEN, ids=["jitter", "three-sites", "ddp-one-site"])
def test_the_restart_path_is_unchanged(values, sim, expected):
    r = simulate(toy_spec(values), SimulateConfig(recovery="restart", **sim))
    got = (r.rounds, r.time_to_train_seconds, r.utilization, r.failures, r.lost_progress_hours,
           r.lost_compute_hours, r.downtime_hours)
    assert got[0] == expected[0] and got[3] == expected[3]
    assert got == pytest.approx(expected, rel=1e-12)
    assert (r.detection_seconds, r.reform_seconds, r.heal_seconds, r.rejoins) == (0, 0, 0, 0)


def test_one_site_has_no_peer_to_heal_from_so_elastic_resumes_from_the_checkpoint_as_restart_does():
    values, sim = RESTART_GOLDEN[2][0], RESTART_GOLDEN[2][1]
    elastic = simulate(toy_spec(values), SimulateConfig(recovery="elastic", **sim))
    restart = simulate(toy_spec(values), SimulateConfig(recovery="restart", **sim))
    keys = ("rounds", "time_to_train_seconds", "failures", "lost_progress_hours", "lost_compute_hours",
            "downtime_hours", "utilization")
    assert {k: elastic.to_dict()[k] for k in keys} == pytest.approx({k: restart.to_dict()[k] for k in keys}, rel=1e-12)
    assert elastic.rejoins == 0 and elastic.heal_seconds == 0
