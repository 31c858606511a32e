"""A run's predicted utilization: the timing model (``geotrain.algorithms.timing``) read from a run's summary
(``geotrain.summary.predict_from_summary``), on hand-made summaries, and ``expected_slowest`` against its
closed form and sampling."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from geotrain.algorithms.timing import expected_slowest, predict_run
from geotrain.config import load_config
from geotrain.errors import ConfigError
from geotrain.summary import build_summary, measured_jitter, measured_step_seconds, predict_from_summary
from geotrain.topology import wire_bytes

BASE = {"run.sites": 2, "wan.link": "8mbit/10ms", "outer.sync_every": 10, "comm.overlap": False}


def summary(values: dict[str, Any] | None = None, /, *, steps: int = 100, compute: list[float] | None = None,
            payloads: list[int] | None = None, **fields: Any) -> dict:
    """A summary of a run of ``steps`` inner steps whose sites computed ``compute`` seconds each (0.1 s per
    step by default) and sent syncs of ``payloads`` values (1e6: 48 + 4e6 bytes in fp32)."""
    config = load_config(values=BASE | (values or {}))
    compute = compute if compute is not None else [0.1 * steps] * config.run.sites
    out = {
        "config": config.to_dict(),
        "algorithm": config.run.algorithm,
        "sites": config.run.sites,
        "link": config.wan.link,
        "steps": steps,
        "sync_payloads": [1_000_000] if payloads is None else payloads,
        "per_site": [{"compute_seconds": c} for c in compute],
    }
    return out | fields


def predict(s: dict, **kw):
    timing = predict_from_summary(s, **kw)
    assert timing is not None
    return timing


# 2 sites over 8 Mbit/s, 10 ms. Every codec travels framed, fp32 included, and between 2 sites it is
# all-gathered: each site sends its whole payload of S bytes (a 48-byte header, then 4 bytes per value, the
# body a multiple of 8 bytes) to the other in K - 1 = 1 step, as gloo sends it: two halves (S // 2 and the
# rest) back to back, each with 52 bytes of TCP/IP headers per 1448-byte segment, after the receiver's
# announcement (one latency) and with the last byte a latency in flight; W workers of a site share its link as
# W streams, each connection paced at 95% of the link's rate:
# 2 * 0.01 + 8 * (wire_bytes(S // 2) + wire_bytes(S - S // 2)) * W / (0.95 * 8e6) s.
def gather2(nbytes: int, *, bps: float = 8e6, streams: int = 1) -> float:
    half = nbytes // 2
    return 2 * 0.01 + 8 * (wire_bytes(half) + wire_bytes(nbytes - half)) * streams / (0.95 * bps)


def test_diloco_by_hand():
    out = predict(summary())
    # 1e6 fp32 values: halves of 2,000,024 bytes, 1,382 segments, 2,071,888 bytes on the wire each:
    # 0.02 + 8 * 2 * 2,071,888 / (0.95 * 8e6) = 4.381869474 s
    t = gather2(48 + 4_000_000)
    assert t == pytest.approx(0.02 + 4.143776 / 0.95, rel=1e-12)
    assert out.comm_seconds_per_sync == pytest.approx(t)
    assert out.syncs == 10
    assert out.compute_seconds == pytest.approx(10.0)
    assert out.wall_seconds == pytest.approx(10 + 10 * t)
    assert out.utilization == pytest.approx(10 / (10 + 10 * t))
    # the same from the configuration directly
    config = load_config(values=BASE)
    direct = predict_run(config, payloads=[1_000_000], steps=100, step_seconds=[0.1, 0.1])
    assert direct.utilization == pytest.approx(out.utilization)


def test_ddp_syncs_every_step():
    out = predict(summary({"run.algorithm": "ddp"}))
    assert out.syncs == 100
    assert out.utilization == pytest.approx(0.1 / (0.1 + gather2(4_000_048)))
    # Without the run's payloads, the configured model's: the demo GPT's 445,952 values, 48 + 1,783,808 =
    # 1,783,856 bytes (4 * 445,952 is a multiple of 8), in halves of 891,928 bytes (616 segments, 923,960 bytes
    # on the wire).
    demo = predict(summary({"run.algorithm": "ddp"}, payloads=[]))
    assert demo.comm_seconds_per_sync == pytest.approx(0.02 + 8 * 2 * 923_960 / (0.95 * 8e6))  # 1.965 s


STREAMING = {"run.algorithm": "streaming", "streaming.fragments": 4, "streaming.overlap_steps": 0}


def test_streaming_syncs_each_fragment_every_h_steps():
    s = summary(STREAMING, payloads=[250_000] * 4)
    # 250,000 fp32 values: 0.02 + 8 * 2 * 518,016 / (0.95 * 8e6) = 1.11056 s per fragment
    t = gather2(48 + 1_000_000)
    out = predict(s)
    assert out.comm_seconds_per_sync == pytest.approx(t)
    # Fragments start at offsets 0, 2, 5, 7 of each H=10: fragment 0 syncs after steps 10, ..., 90 (9 times),
    # the others after off, off + 10, ..., off + 90 (10 times each): 39 syncs, then at the last step all 4
    # fragments sync once more, at once: one collective of the whole model, 4,000,048 bytes, 4.381869474 s.
    final = gather2(4_000_048)
    assert out.syncs == 39
    assert out.exposed_seconds == pytest.approx(39 * t + final)
    assert out.utilization == pytest.approx(10 / (10 + 39 * t + final))
    # With tau = 2 each fragment hides 0.2 s of its 1.11056 s behind compute (a period of 2.5 steps = 0.25 s
    # plus 0.91056 s exposed is longer than the sync itself).
    exposed = t - 0.2
    tau = predict(summary(STREAMING | {"streaming.overlap_steps": 2}, payloads=[250_000] * 4))
    assert tau.exposed_seconds_per_sync == pytest.approx(exposed)
    assert tau.exposed_seconds == pytest.approx(39 * exposed + final)
    # Stopped by a time budget at the sync point after step 100: fragment 0 started a sync there too
    # (40 periods), and only the fragment just sent is still on the link: its hidden part is exposed.
    stop = predict(summary(STREAMING | {"streaming.overlap_steps": 2}, payloads=[250_000] * 4, stopped_early=True))
    assert stop.syncs == 40
    assert stop.exposed_seconds == pytest.approx(40 * exposed + (t - exposed))


def test_the_settings_the_run_chose_are_the_ones_predicted():
    # The configuration leaves overlap and tau unset; the summary says what the run chose.
    # Overlapped over 80 Mbit/s: each 0.02 + 8 * 2 * 2,071,888 / (0.95 * 80e6) = 0.456186947 s sync (one
    # all-gather step) hides behind the next 1 s round; the last one is exposed at the end.
    t = gather2(4_000_048, bps=80e6)
    assert t == pytest.approx(0.02 + 0.4143776 / 0.95, rel=1e-12)
    def chose(key, value):
        return [{"key": key, "value": value, "reason": "as the start record says"}]

    over = predict(summary({"comm.overlap": None, "wan.link": "80mbit/10ms"},
                           auto_settings=chose("comm.overlap", True)))
    assert over.exposed_seconds_per_sync == 0.0
    assert over.wall_seconds == pytest.approx(10 + t)
    blocking = predict(summary({"comm.overlap": None, "wan.link": "80mbit/10ms"},
                               auto_settings=chose("comm.overlap", False)))
    assert blocking.wall_seconds == pytest.approx(10 + 10 * t)
    tau = predict(summary(STREAMING | {"streaming.overlap_steps": None}, payloads=[250_000] * 4,
                          auto_settings=chose("streaming.overlap_steps", 2)))
    assert tau.exposed_seconds_per_sync == pytest.approx(gather2(1_000_048) - 0.2)


def test_workers_share_their_site_link():
    one = predict(summary()).comm_seconds_per_sync
    # 4 workers each carry a quarter shard (250,000 values: 48 + 1e6 = 1,000,048 bytes) as 4 streams sharing
    # 8 Mbit/s: 1 step of two 500,024-byte halves (346 segments, 518,016 bytes on the wire each):
    # 0.02 + 8 * 2 * 518,016 * 4 / (0.95 * 8e6) = 4.38224 s, the time of one worker carrying it all (4.381869 s) plus
    # that of the 3 more codec headers and of 4 more segments' headers (each of the 8 halves ends in a partial
    # segment: 8 * 346 = 2,768 segments against 2 * 1,382 = 2,764).
    four = predict(summary({"run.workers_per_site": 4})).comm_seconds_per_sync
    assert one == pytest.approx(gather2(4_000_048)) and four == pytest.approx(gather2(1_000_048, streams=4))
    assert four == pytest.approx(0.02 + 8 * 2 * 518_016 * 4 / (0.95 * 8e6))
    assert four - one == pytest.approx(8 * (3 * 48 + 4 * 52) / (0.95 * 8e6))
    # 1,000,002 values: shards of ceil(1,000,002 / 4) = 250,001 values (the last zero padded), a body of
    # 1,000,004 bytes padded to 1,000,008, and 48 + 1,000,008 = 1,000,056 bytes: halves of 500,028 bytes, 346
    # segments, 518,020 bytes on the wire.
    odd = predict(summary({"run.workers_per_site": 4}, payloads=[1_000_002])).comm_seconds_per_sync
    assert odd == pytest.approx(0.02 + 8 * 2 * 518_020 * 4 / (0.95 * 8e6))


def test_overlapped_diloco_hides_behind_the_next_round():
    out = predict(summary({"comm.overlap": True, "wan.link": "80mbit/10ms"}))
    # 0.456186947 s of all-gather (one step of 4,000,048 bytes) hides behind 1 s of inner steps, except the last
    # round's, which ends the run.
    t = 0.02 + 8 * 2 * 2_071_888 / (0.95 * 80e6)
    assert t == pytest.approx(gather2(4_000_048, bps=80e6))
    assert out.comm_seconds_per_sync == pytest.approx(t)
    assert out.exposed_seconds_per_sync == 0.0
    assert out.utilization == pytest.approx(10 / (10 + t))


def test_an_unemulated_run_has_no_prediction_and_no_link_cost():
    assert predict_from_summary(summary({"wan.link": "none"})) is None
    config = load_config(values=BASE | {"wan.link": "none"})
    out = predict_run(config, payloads=[1_000_000], steps=100, step_seconds=[0.1, 0.1])
    assert out.comm_seconds_per_sync == 0 and out.utilization == pytest.approx(1.0)


def test_three_sites():
    out = predict(summary({"run.sites": 3, "wan.link": "12mbit/5ms"}, compute=[20.0] * 3))
    # fp32 among 3 sites is reduce-scattered: chunks of ceil(1e6 / 3) = 333,334 values, each encoded as
    # 48 + 1,333,336 (a multiple of 8) = 1,333,384 bytes. The all-to-all sends one chunk to each other site at
    # once, over its own link: one message of 921 segments, 1,381,276 bytes on the wire. Then the ring
    # all-gathers the encoded mean chunks: 2 steps of two 666,692-byte halves (690,664 bytes on the wire, 0.48 s
    # each at 95% of 12 Mbit/s, far over two latencies) back to back, behind one announcement and with the last a
    # latency in flight.
    t = (2 * 0.005 + 8 * 1_381_276 / (0.95 * 12e6)) + (2 * 0.005 + 2 * 2 * 8 * 690_664 / (0.95 * 12e6))  # 2.928 s
    assert out.comm_seconds_per_sync == pytest.approx(t)
    assert out.utilization == pytest.approx(20 / (20 + 10 * t))


def test_measured_step_seconds_is_compute_over_steps():
    s = summary(compute=[10.0, 12.0])
    assert measured_step_seconds(s) == pytest.approx((10 + 12) / 2 / 100)
    assert measured_step_seconds(s, per_site=True) == pytest.approx([10 / 100, 12 / 100])
    no_compute = summary() | {"per_site": [{"compute_seconds": 1.0}, {}]}
    for bad in (summary(steps=0), summary() | {"per_site": []}, no_compute):
        with pytest.raises(ConfigError):
            measured_step_seconds(bad)


def test_summaries_without_a_prediction():
    assert predict_from_summary({"algorithm": "diloco"}) is None  # no configuration
    assert predict_from_summary(summary({"wan.link": "none"})) is None  # no emulated link
    assert predict_from_summary(summary({"run.sites": 1}, compute=[10.0])) is None  # one site: no syncs
    assert predict_from_summary(summary(steps=0, compute=[0.0, 0.0])) is None  # nothing finished
    assert predict_from_summary(summary() | {"per_site": []}) is None  # no measurement
    bad = summary()
    bad["config"]["run"]["algorithm"] = "allreduce"
    assert predict_from_summary(bad) is None


def _refused(s: dict, **kw) -> bool:
    try:
        return predict_from_summary(s, **kw) is None
    except ConfigError:
        return True


@pytest.mark.parametrize("kw", [dict(step_seconds=[0.1, -1]), dict(step_seconds=[]), dict(jitter=-0.1),
                                dict(jitter=True)], ids=["negative-step", "no-step", "negative-jitter", "bool-jitter"])
def test_bad_measurements_are_refused(kw):
    assert _refused(summary(), **kw)


def test_diloco_counts_the_last_partial_round():
    # 105 steps at H=10: 10 whole rounds and a partial one, which syncs too: 11 syncs.
    out = predict(summary(steps=105))
    assert out.syncs == 11
    assert out.wall_seconds == pytest.approx(10.5 + 11 * gather2(4_000_048))


def test_lossy_collectives_are_charged_as_the_run_sends_them():
    # 3 sites over 12 Mbit/s, 5 ms, int8, 1.2M values. Reduce-scatter (the default among 3 sites): chunks of
    # 400,000 values encoded as 48 + pad8(4 * ceil(400,000 / 256) = 6,252) = 6,256 + 400,000 = 406,304 bytes
    # (281 segments, 420,916 bytes on the wire). The chunks go to the other sites at once, one message each over
    # its own link; then 2 all-gather steps of a re-encoded mean in two 203,152-byte halves (141 segments,
    # 210,484 bytes on the wire, 0.15 s each, over two latencies) back to back.
    base = {"run.sites": 3, "wan.link": "12mbit/5ms", "comm.codec": "int8"}
    rs = predict(summary(base, payloads=[1_200_000], compute=[20.0] * 3))
    assert rs.comm_seconds_per_sync == pytest.approx((2 * 0.005 + 8 * 420_916 / (0.95 * 12e6))
                                                     + (2 * 0.005 + 2 * 2 * 8 * 210_484 / (0.95 * 12e6)))  # 0.906 s
    # All-gather: every site's whole payload, 48 + 4 * 4,688 + 1,200,000 = 1,218,800 bytes, over 2 steps of two
    # 609,400-byte halves (421 segments, 631,292 bytes on the wire) back to back.
    ag = predict(summary(base | {"comm.pattern": "all_gather"}, payloads=[1_200_000], compute=[20.0] * 3))
    assert ag.comm_seconds_per_sync == pytest.approx(2 * 0.005 + 2 * 2 * 8 * 631_292 / (0.95 * 12e6))  # 1.782 s


def test_the_slowest_site_gates_the_wall_time():
    out = predict(summary(), step_seconds=[0.08, 0.12])
    t = gather2(4_000_048)
    # the mean site computes 10 s; the wall holds the slowest site's 12 s plus 10 syncs
    assert out.step_seconds == pytest.approx(0.1) and out.slowest_step_seconds == pytest.approx(0.12)
    assert out.utilization == pytest.approx(10 / (12 + 10 * t))
    assert out.site_utilization == pytest.approx([8 / (12 + 10 * t), 12 / (12 + 10 * t)])
    # the same from the measured compute
    assert predict(summary(compute=[8.0, 12.0])).utilization == pytest.approx(out.utilization)


def test_build_summary_carries_the_prediction():
    config = load_config(values=BASE).to_dict()
    start = {"kind": "start", "settings": {"sync_every": 10, "fragments": 1, "overlap_steps": 0, "overlap": False},
             "sync_payloads": [1_000_000], "collective": "all_gather", "payload_bytes_per_sync": 4_000_048}
    done = {"kind": "done", "steps": 100, "tokens": 1000, "wan_bytes": 40_000_000, "compute_seconds": 10.0,
            "wall_seconds": 50.2, "utilization": 10 / 50.2, "outer_rounds": 10}
    s = build_summary(config, {0: [start, done], 1: [done]}, elapsed_seconds=51.0, ok=True)
    assert s["predicted_utilization"] == pytest.approx(10 / (10 + 10 * gather2(4_000_048)))
    assert s["payload_bytes_per_sync"] == 4_000_048
    assert s["collective"] == "all_gather"


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
    link = {"wan.link": "80mbit/10ms"}
    plain = predict(summary(link))
    spread = predict(summary(link), jitter=0.1)
    # 10 rounds of 1 s on each of 2 sites: each waits E[max of 2] - 1 s for the slower of that round
    assert spread.straggler_seconds == pytest.approx(10 * (expected_slowest([1.0, 1.0], 0.1) - 1.0))
    assert spread.wall_seconds == pytest.approx(plain.wall_seconds + spread.straggler_seconds)
    ddp = predict(summary(link | {"run.algorithm": "ddp"}), jitter=0.1)
    assert ddp.straggler_seconds == pytest.approx(100 * (expected_slowest([0.1, 0.1], 0.1) - 0.1))
    assert predict(summary(link | {"comm.overlap": True}), jitter=0.1).straggler_seconds == 0.0
    tau = link | STREAMING | {"streaming.overlap_steps": 2}
    assert predict(summary(tau, payloads=[250_000] * 4), jitter=0.1).straggler_seconds == 0.0
    # streaming with tau = 0 blocks at every fragment: 39 full periods of 2.5 steps, each with sqrt(10 / 2.5)
    # times the spread measured between sync points (every H = 10 steps)
    blocking = predict(summary(link | STREAMING, payloads=[250_000] * 4), jitter=0.1)
    assert blocking.straggler_seconds == pytest.approx(39 * (expected_slowest([0.25, 0.25], 0.2) - 0.25))
    # per-site means: the faster site only sometimes finishes last
    uneven = predict(summary(link), step_seconds=[0.09, 0.11], jitter=0.1)
    assert uneven.straggler_seconds == pytest.approx(10 * (expected_slowest([0.9, 1.1], 0.1) - 1.1))
    # numpy scalars are numbers too
    assert predict(summary(link), step_seconds=[np.float32(0.1)] * 2, jitter=np.float64(0.1)).straggler_seconds \
        == pytest.approx(spread.straggler_seconds, rel=1e-6)
    # a short last DiLoCo round (105 steps at H=10, 11 syncs) pays no straggler wait
    short = predict(summary(link, steps=105), jitter=0.1)
    assert short.syncs == 11
    assert short.straggler_seconds == pytest.approx(spread.straggler_seconds)


def test_measured_jitter_is_the_mean_of_the_sites_spread():
    s = summary({"wan.link": "80mbit/10ms"})
    assert measured_jitter(s) == 0.0  # summaries from before the field
    s["per_site"][0]["round_compute_cv"] = 0.05
    s["per_site"][1]["round_compute_cv"] = 0.15
    assert measured_jitter(s) == pytest.approx(0.1)
    # the prediction uses the measured spread when none is given
    assert predict(s).straggler_seconds == pytest.approx(10 * (expected_slowest([1.0, 1.0], 0.1) - 1.0))
