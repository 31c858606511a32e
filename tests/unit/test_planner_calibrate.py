"""predict_run: the planner's prediction of geotrain's own emulated runs, on hand-made summaries."""

from __future__ import annotations

import math

import numpy as np
import pytest

from geotrain.errors import ConfigError
from geotrain.planner.calibrate import expected_slowest, measured_jitter, measured_step_seconds, predict_run


def summary(**kw) -> dict:
    base = {
        "algorithm": "diloco",
        "sites": 2,
        "workers_per_site": 1,
        "sync_every": 10,
        "fragments": 1,
        "overlap_steps": 0,
        "overlap": False,
        "codec": "fp32",
        "link": "8mbit/10ms",
        "param_bytes": 4_000_000,
        "payload_bytes_per_sync": 4_000_000,
        "steps": 100,
        "outer_rounds": 10,
        "utilization": 0.5,
        "per_site": [
            {"compute_seconds": 10.0, "comm_seconds": 9.0, "wall_seconds": 20.0},
            {"compute_seconds": 12.0, "comm_seconds": 9.0, "wall_seconds": 20.0},
        ],
    }
    return base | kw


# 2 sites over 8 Mbit/s, 10 ms: a ring all-reduce of S bytes is 2 steps of (0.01 + 8 * (S/2) / 8e6) s.
def ring2(nbytes: float, streams: int = 1) -> float:
    return 2 * (0.01 + 8 * nbytes / 2 * streams / 8e6)


def test_diloco_by_hand():
    out = predict_run(summary(), step_seconds=0.1)
    t = ring2(4e6)  # 4.02 s
    assert out["comm_seconds_per_sync"] == pytest.approx(t)
    assert out["syncs"] == 10
    assert out["compute_seconds"] == pytest.approx(10.0)
    assert out["predicted_utilization"] == pytest.approx(10 / (10 + 10 * t))
    assert out["measured_utilization"] == 0.5
    assert out["difference_points"] == pytest.approx(100 * (10 / (10 + 10 * t) - 0.5))


def test_ddp_all_reduces_the_parameters_every_step():
    out = predict_run(summary(algorithm="ddp", payload_bytes_per_sync=1_000_000), step_seconds=0.1)
    assert out["syncs"] == 100
    assert out["comm_seconds_per_sync"] == pytest.approx(ring2(4e6))  # param_bytes, not the payload
    assert out["predicted_utilization"] == pytest.approx(0.1 / (0.1 + ring2(4e6)))


def test_streaming_syncs_each_fragment_every_h_steps():
    s = summary(algorithm="streaming", fragments=4, overlap_steps=0, payload_bytes_per_sync=1_000_000)
    out = predict_run(s, step_seconds=0.1)
    t = ring2(1e6 / 4)
    assert out["syncs"] == 100 * 4 // 10
    assert out["comm_seconds_per_sync"] == pytest.approx(t)
    # 40 fragment syncs, then the last step syncs all 4 fragments in a row
    assert out["predicted_utilization"] == pytest.approx(10 / (10 + 40 * t + 4 * t))
    # With tau = 2 each fragment hides behind 0.2 s of compute.
    tau = predict_run(s | {"overlap_steps": 2}, step_seconds=0.1)
    hidden = max(0.0, t - 0.2)
    assert tau["exposed_comm_seconds"] == pytest.approx(40 * hidden + 4 * t)
    # Stopped by a time budget at a sync point: only the fragment just sent is still on the link.
    stop = predict_run(s | {"overlap_steps": 2, "stopped_early": True}, step_seconds=0.1)
    assert stop["exposed_comm_seconds"] == pytest.approx(39 * hidden + t)


def test_workers_share_their_site_link():
    one = predict_run(summary(), step_seconds=0.1)["comm_seconds_per_sync"]
    four = predict_run(summary(workers_per_site=4), step_seconds=0.1)["comm_seconds_per_sync"]
    assert one == pytest.approx(ring2(4e6))
    assert four == pytest.approx(ring2(4e6, streams=4))


def test_overlapped_diloco_hides_behind_the_next_round():
    out = predict_run(summary(overlap=True, link="80mbit/10ms"), step_seconds=0.1)
    # 0.42 s of all-reduce hides behind 1 s of inner steps, except the last round's, which ends the run.
    assert out["comm_seconds_per_sync"] == pytest.approx(2 * (0.01 + 8 * 2e6 / 80e6))
    assert out["predicted_utilization"] == pytest.approx(10 / (10 + out["comm_seconds_per_sync"]))


def test_unemulated_run_is_fully_utilized():
    out = predict_run(summary(link="none"), step_seconds=0.1)
    assert out["comm_seconds_per_sync"] == 0 and out["predicted_utilization"] == pytest.approx(1.0)


def test_three_sites():
    out = predict_run(summary(sites=3, link="12mbit/5ms"), step_seconds=0.2)
    t = 4 * (0.005 + 8 * (4e6 / 3) / 12e6)
    assert out["comm_seconds_per_sync"] == pytest.approx(t)
    assert out["predicted_utilization"] == pytest.approx(20 / (20 + 10 * t))


def test_measured_step_seconds_is_mean_compute_over_steps():
    assert measured_step_seconds(summary()) == pytest.approx((10 + 12) / 2 / 100)


def test_bad_summaries():
    with pytest.raises(ConfigError, match="sites"):
        predict_run({"algorithm": "diloco"}, step_seconds=0.1)
    with pytest.raises(ConfigError):
        predict_run(summary(link="fast"), step_seconds=0.1)
    with pytest.raises(ConfigError):
        predict_run(summary(), step_seconds=0)
    with pytest.raises(ConfigError):
        predict_run(summary(algorithm="allreduce"), step_seconds=0.1)


def test_diloco_counts_the_outer_rounds_the_run_reports():
    # 105 steps at H=10 and a final partial round that synced: 11 outer rounds.
    out = predict_run(summary(steps=105, outer_rounds=11), step_seconds=0.1)
    assert out["syncs"] == 11
    assert predict_run(summary(steps=105, outer_rounds=None), step_seconds=0.1)["syncs"] == 10


def test_lossy_collectives_are_charged_as_the_run_sent_them():
    # 3 sites over 12 Mbit/s, 5 ms, an int8 payload of 1.2 MB (three 0.4 MB chunks).
    base = summary(sites=3, link="12mbit/5ms", codec="int8", payload_bytes_per_sync=1_200_000)
    rs = predict_run(base | {"collective": "reduce_scatter"}, step_seconds=0.2)
    assert rs["comm_seconds_per_sync"] == pytest.approx(4 * (0.005 + 8 * 0.4e6 / 12e6))  # = ring all-reduce
    ag = predict_run(base | {"collective": "all_gather"}, step_seconds=0.2)
    assert ag["comm_seconds_per_sync"] == pytest.approx(2 * (0.005 + 8 * 1.2e6 / 12e6))
    # a summary without the field predates the reduce-scatter: lossy codecs then all-gathered
    assert predict_run(base, step_seconds=0.2)["comm_seconds_per_sync"] == ag["comm_seconds_per_sync"]


def test_the_slowest_site_gates_the_wall_time():
    out = predict_run(summary(), step_seconds=[0.08, 0.12])
    t = ring2(4e6)
    # the mean site computes 10 s; the wall holds the slowest site's 12 s plus 10 syncs
    assert out["step_seconds"] == pytest.approx(0.1) and out["slowest_step_seconds"] == pytest.approx(0.12)
    assert out["predicted_utilization"] == pytest.approx(10 / (12 + 10 * t))
    assert measured_step_seconds(summary(), per_site=True) == pytest.approx([10 / 100, 12 / 100])
    with pytest.raises(ConfigError):
        predict_run(summary(), step_seconds=[0.1, -1])
    with pytest.raises(ConfigError):
        predict_run(summary(), step_seconds=[])


def _lognormal_max(means, cv, n=1_000_000, seed=1):
    rng = np.random.default_rng(seed)
    s2 = math.log1p(cv * cv)
    return np.stack([rng.lognormal(math.log(m) - s2 / 2, math.sqrt(s2), n) for m in means]).max(axis=0).mean()


@pytest.mark.parametrize("means,cv", [([1.0, 1.0], 0.1), ([1.0, 1.05], 0.08), ([1.0] * 4, 0.2), ([2.0, 1.0], 0.5)])
def test_expected_slowest_matches_sampling(means, cv):
    assert expected_slowest(means, cv) == pytest.approx(_lognormal_max(means, cv), rel=2e-3)


@pytest.mark.parametrize("cv", [1e-6, 1e-3, 0.1, 1.0, 1.6, 2.0, 5.0])
def test_expected_slowest_of_two_equal_sites_is_exact(cv):
    # For two iid lognormals of mean 1 and log-sd s, E[max] = 1 + erf(s / 2) in closed form.
    s = math.sqrt(math.log1p(cv * cv))
    got = expected_slowest([1.0, 1.0], cv)
    assert got - 1.0 == pytest.approx(math.erf(s / 2), rel=1e-6)
    assert got >= 1.0


def test_expected_slowest_edges():
    assert expected_slowest([1.0, 1.3], 0.0) == 1.3
    assert expected_slowest([0.7], 0.4) == 0.7
    assert expected_slowest([1.0, 1e-9], 1e-4) == pytest.approx(1.0)  # a far faster site never finishes last
    # many sites: the expected maximum grows slowly with their number, and never below the largest mean
    few, many = expected_slowest([1.0] * 4, 0.2), expected_slowest([1.0] * 64, 0.2)
    assert 1.0 < few < many < 1.0 + 4 * 0.2


def test_blocking_syncs_pay_for_the_spread_of_round_times_and_overlapped_ones_do_not():
    s = summary(link="80mbit/10ms")
    plain = predict_run(s, step_seconds=0.1)
    spread = predict_run(s, step_seconds=0.1, jitter=0.1)
    # 10 rounds of 1 s on each of 2 sites: each waits E[max of 2] - 1 s for the slower of that round
    assert spread["straggler_seconds"] == pytest.approx(10 * (expected_slowest([1.0, 1.0], 0.1) - 1.0))
    assert spread["predicted_wall_seconds"] == pytest.approx(plain["predicted_wall_seconds"] + spread["straggler_seconds"])
    ddp = predict_run(s | {"algorithm": "ddp"}, step_seconds=0.1, jitter=0.1)
    assert ddp["straggler_seconds"] == pytest.approx(100 * (expected_slowest([0.1, 0.1], 0.1) - 0.1))
    assert predict_run(s | {"overlap": True}, step_seconds=0.1, jitter=0.1)["straggler_seconds"] == 0.0
    tau = s | {"algorithm": "streaming", "fragments": 4, "overlap_steps": 2}
    assert predict_run(tau, step_seconds=0.1, jitter=0.1)["straggler_seconds"] == 0.0
    # streaming with tau = 0 blocks at every fragment: 40 syncs of 2.5 steps, spread sqrt(4) times the H-step one
    blocking = predict_run(tau | {"overlap_steps": 0}, step_seconds=0.1, jitter=0.1)
    assert blocking["straggler_seconds"] == pytest.approx(40 * (expected_slowest([0.25, 0.25], 0.2) - 0.25))
    # per-site means: the faster site only sometimes finishes last
    uneven = predict_run(s, step_seconds=[0.09, 0.11], jitter=0.1)
    assert uneven["straggler_seconds"] == pytest.approx(10 * (expected_slowest([0.9, 1.1], 0.1) - 1.1))
    with pytest.raises(ConfigError):
        predict_run(s, step_seconds=0.1, jitter=-0.1)
    with pytest.raises(ConfigError):
        predict_run(s, step_seconds=0.1, jitter=True)
    # numpy scalars are numbers too
    assert predict_run(s, step_seconds=np.float32(0.1), jitter=np.float64(0.1))["straggler_seconds"] == pytest.approx(
        spread["straggler_seconds"], rel=1e-6)
    # a short last DiLoCo round (105 steps at H=10, 11 syncs) pays no straggler wait
    short = predict_run(s | {"steps": 105, "outer_rounds": 11}, step_seconds=0.1, jitter=0.1)
    assert short["straggler_seconds"] == pytest.approx(spread["straggler_seconds"])


def test_measured_jitter_is_the_mean_of_the_sites_spread():
    s = summary()
    assert measured_jitter(s) == 0.0  # summaries from before the field
    s["per_site"][0]["round_compute_cv"] = 0.05
    s["per_site"][1]["round_compute_cv"] = 0.15
    assert measured_jitter(s) == pytest.approx(0.1)
