"""The planner's answers: bandwidth for a target, smallest H, mildest codec, compared variants, sweeps."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geotrain.errors import ConfigError
from geotrain.planner.model import plan
from geotrain.planner.questions import (
    bandwidth_needed,
    compare_variants,
    mildest_codec,
    parse_sweep,
    smallest_sync_every,
    sweep,
    with_bandwidth,
)
from geotrain.topology import Link

try:  # the toy world is defined once, beside the formula tests (tests/ is not a package)
    from test_planner_model import T, T_F2, gather, toy_spec
except ImportError:  # pragma: no cover - if tests/ becomes a package
    from tests.unit.test_planner_model import T, T_F2, gather, toy_spec

# The toy's fp32 payload of 4e9 + 48 bytes goes between its 2 sites as two 2,000,000,024-byte halves, each
# 2,071,823,256 bytes on the wire (TCP/IP headers included): 8 * 2 * 2,071,823,256 = 33,149,172,096 bits, so
# T = 33,149,172,096 / (0.95 b) s over links of b bit/s without latency, a connection paced at 95% of the link's
# rate (4.361733171 s at 8 Gbit/s).
TOY_BITS = 8 * 2 * 2_071_823_256

VARIANTS = {"ddp", "diloco", "diloco+overlap", "streaming", "sparseloco", "sparseloco+overlap"}


def test_bandwidth_needed_by_hand():
    # Blocking DiLoCo H=10 on the toy (100 steps of 1 s, 10 syncs, 2 sites, a 4e9 + 48-byte fp32 payload, no
    # latency): 95% needs 100 / (100 + 10 T) >= 0.95, T <= 10 * (1/0.95 - 1) s, and T = TOY_BITS / b (one
    # all-gather step of the whole payload), so b = 3.3149172096e10 / (0.95 T) = 6.63e10 bit/s.
    spec = toy_spec()
    assert TOY_BITS / (0.95 * 8e9) == pytest.approx(T, rel=1e-15)
    expected = TOY_BITS / (0.95 * 10 * (1 / 0.95 - 1))
    got = bandwidth_needed(spec, target=0.95)
    assert got == pytest.approx(expected, rel=1e-3)
    assert plan(with_bandwidth(spec, bandwidth_bps=got)).utilization >= 0.95 * (1 - 1e-9)
    assert plan(with_bandwidth(spec, bandwidth_bps=got * 0.99)).utilization < 0.95


def test_bandwidth_needed_for_overlapped_diloco_by_hand():
    # Overlapped, H=10: the syncs hide while T <= 10 s, and the run pays the last one: 100 / (100 + T) >= 0.95
    # needs T <= 100 / 19 s, so b = TOY_BITS * 19 / (100 * 0.95) = 6.63e9 bit/s, ten times less than blocking.
    got = bandwidth_needed(toy_spec({"comm.overlap": True}), target=0.95)
    assert got == pytest.approx(TOY_BITS * 19 / (100 * 0.95), rel=1e-3)


def test_bandwidth_needed_is_none_when_latency_alone_blocks():
    # DDP at 1 s steps over 300 ms links: fp32 between 2 sites is one all-gather step, 0.6 s of latency (the
    # receiver's announcement, then the last byte's flight) and a paced burst of a quarter of the 600 ms round
    # trip whatever the bandwidth, so utilization stays below 1 / 1.75 = 0.571.
    spec = toy_spec({"run.algorithm": "ddp", "wan.link": "8gbit/300ms"})
    assert bandwidth_needed(spec, target=0.95) is None
    assert bandwidth_needed(spec, target=0.58) is None
    assert bandwidth_needed(spec, target=0.56) is not None


def test_one_site_needs_no_bandwidth():
    spec = toy_spec({"run.sites": 1})
    assert bandwidth_needed(spec, target=0.95) == 0.0  # no links: utilization 1 already
    slow = toy_spec({"run.sites": 1, "site": [{"name": "only", "step_seconds": 1.0}]})
    assert bandwidth_needed(slow, target=1.0) == 0.0


def test_bandwidth_needed_rejects_bad_targets():
    for target in (1.5, 0, -0.1):
        with pytest.raises(ConfigError) as info:
            bandwidth_needed(toy_spec(), target=target)
        assert info.value.field == "plan.target_utilization"


def test_with_bandwidth_keeps_each_latency():
    spec = toy_spec({"run.sites": 3, "wan.link": "8gbit/20ms",
                     "wan.links": [{"between": [0, 1], "link": "1mbit/90ms"}]})
    new = with_bandwidth(spec, bandwidth_bps=5e9)
    assert new.topology.link(0, 1) == Link(bandwidth_bps=5e9, latency_s=0.09)
    assert new.topology.link(1, 2) == Link(bandwidth_bps=5e9, latency_s=0.02)
    assert spec.topology.link(0, 1) == Link(bandwidth_bps=1e6, latency_s=0.09)  # the original is unchanged
    # an unemulated plan gets links of that bandwidth and no latency
    none = with_bandwidth(toy_spec({"wan.link": "none"}), bandwidth_bps=5e9)
    assert none.topology.link(0, 1) == Link(bandwidth_bps=5e9, latency_s=0.0)


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(sorted(VARIANTS)),
    bws=st.lists(st.floats(min_value=1e6, max_value=1e13), min_size=2, max_size=6),
)
def test_utilization_never_falls_with_bandwidth(name, bws):
    variants = compare_variants(toy_spec({"outer.sync_every": 50, "wan.link": "8gbit/10ms"}))
    bws = sorted(bws)
    utils = sweep({name: variants[name]}, bandwidths_bps=bws).utilization[name]
    assert all(b >= a - 1e-12 for a, b in zip(utils, utils[1:]))


def test_smallest_sync_every():
    # Toy at 8 Gbit/s: T = 4.361733171 s (say 4.36 s), 100 steps. Blocking:
    # util(H) = 100 / (100 + ceil(100 / H) * 4.36); H=50 gives 100/108.72 = 0.920 and H=100 gives
    # 100/104.36 = 0.958: 100 of the candidate list.
    spec = toy_spec()
    assert smallest_sync_every(spec, target=0.95) == 100
    # Overlapped: util = 100 / (100 + ceil(100/H) * max(0, 4.36 - H) + min(4.36, H)); H=1 gives 100/437.2,
    # H=5 gives 100/104.36: 5 of the list.
    assert smallest_sync_every(toy_spec({"comm.overlap": True}), target=0.95) == 5
    assert smallest_sync_every(spec, target=0.999, candidates=[1, 2, 3]) is None
    # A ddp plan is asked as the default algorithm (diloco) with overlap chosen as a run chooses it: a 4.36 s
    # sync stalls more than 2% of any candidate round up to H=100, so overlap is on, and H=5 reaches 100/104.36.
    assert smallest_sync_every(toy_spec({"run.algorithm": "ddp"}), target=0.95) == 5
    # A streaming plan keeps its fragments and tau and skips H it cannot take (fewer steps than its 4
    # fragments, or not more than tau = 3): with P=4 a fragment (1e9 + 48 bytes) takes 1.090433331 s. From H=5
    # on it hides behind tau, and the final sync of the 4 fragments at once (the whole model) costs
    # T = 4.361733171 s: 100/104.36. At H=4 a fragment is due every 1 s step and the link carries one at a time:
    # 99 periods expose 0.090433331 s each, 100 / (100 + 99 * 0.090433331 + T) = 100/113.31 = 0.882.
    streaming = toy_spec({"run.algorithm": "streaming", "streaming.overlap_steps": 3})
    assert smallest_sync_every(streaming, target=0.95) == 5  # 1 is skipped, 5 is the next candidate
    assert smallest_sync_every(streaming, target=0.95, candidates=[1, 2, 3]) is None
    assert smallest_sync_every(streaming, target=0.95, candidates=[3, 4]) is None
    assert smallest_sync_every(streaming, target=0.88, candidates=[3, 4]) == 4
    assert smallest_sync_every(streaming, target=0.89, candidates=[3, 4]) is None
    h4 = plan(streaming.with_config({"outer.sync_every": 4}))
    assert h4.time_to_train_seconds == pytest.approx(100 + 99 * (gather(1_000_000_048, 8e9, 0.0, sites=2) - 1) + T,
                                                     rel=1e-12)


def test_mildest_codec():
    # Blocking DiLoCo H=10 needs T <= 10 * (1/0.94 - 1) = 0.638 s for 94%, T <= 10/19 = 0.526 s for 95%.
    # Between 2 sites every codec is all-gathered in one step, its payload in two halves, 3.6% of headers on
    # top, at 95% of the link's rate: fp32 (4e9 + 48 bytes) 4.36 s; bf16 (2e9 + 48 bytes) 2.18 s; int8
    # (1,015,625,048 bytes) 1.11 s; int4 (515,625,048 bytes) 0.562 s, which makes 94% but misses 95%.
    for nbytes, seconds in ((4_000_000_048, 4.361733170526316), (2_000_000_048, 2.1808666105263157),
                            (1_015_625_048, 1.052097848 / 0.95), (515_625_048, 0.53414204 / 0.95)):
        assert gather(nbytes, 8e9, 0.0, sites=2) == pytest.approx(seconds, rel=1e-12)
    spec = toy_spec()
    assert mildest_codec(spec, target=0.94) == "int4"
    assert mildest_codec(spec, target=0.95) is None
    assert mildest_codec(spec, target=0.80) == "bf16"  # 100 / (100 + 10 * 2.18) = 0.82
    assert mildest_codec(spec, target=0.999) is None
    assert mildest_codec(spec, target=0.80, candidates=["int8", "fp32"]) == "int8"


def test_compare_variants_come_from_each_algorithm_definition():
    variants = compare_variants(toy_spec({"outer.sync_every": 100, "comm.codec": "int4"}))
    assert list(variants) == ["ddp", "diloco", "diloco+overlap", "streaming", "sparseloco", "sparseloco+overlap"]
    assert {name: v.algorithm.name for name, v in variants.items()} == {
        "ddp": "ddp", "diloco": "diloco", "diloco+overlap": "diloco", "streaming": "streaming",
        "sparseloco": "sparseloco", "sparseloco+overlap": "sparseloco"}
    assert variants["ddp"].codec.name == "bf16"  # ddp sends bf16 gradients beside another method
    assert variants["diloco"].config.comm.overlap is False
    assert variants["diloco+overlap"].config.comm.overlap is True
    s = variants["streaming"].config
    # the plan's H and codec, streaming's default P = 4, and tau left for the plan to choose
    assert (s.outer.sync_every, s.streaming.fragments, s.streaming.overlap_steps) == (100, 4, None)
    assert all(v.codec.name == "int4" for name, v in variants.items() if name in ("diloco", "streaming"))
    assert variants["sparseloco"].codec.name == "sparse+int2"  # its own payloads whatever the plan's codec
    # A ddp plan keeps its own codec for its ddp variant.
    assert compare_variants(toy_spec({"run.algorithm": "ddp", "comm.codec": "int8"}))["ddp"].codec.name == "int8"
    # A streaming plan's P and tau carry over to its streaming variant.
    own = compare_variants(toy_spec({"run.algorithm": "streaming", "streaming.fragments": 2,
                                     "streaming.overlap_steps": 1}))["streaming"].config.streaming
    assert (own.fragments, own.overlap_steps) == (2, 1)


def test_a_variant_the_settings_cannot_take_is_left_out():
    # H=2 with streaming's 4 fragments: no staggered schedule, so no streaming variant.
    assert list(compare_variants(toy_spec({"outer.sync_every": 2}))) == ["ddp", "diloco", "diloco+overlap",
                                                                         "sparseloco", "sparseloco+overlap"]


def test_compare_variants_by_hand():
    # The toy at H=10 (100 steps of 1 s; fp32 all-gathers 4e9 + 48 bytes in one step: T = 4.361733171 s):
    variants = compare_variants(toy_spec())
    results = {name: plan(v) for name, v in variants.items()}
    # ddp with bf16 all-gathers 2e9 + 48 bytes each step, T_F2 = 2.180866611 s: 100 * (1 + T_F2) s.
    assert results["ddp"].time_to_train_seconds == pytest.approx(100 * (1 + T_F2), rel=1e-12)
    assert results["diloco"].time_to_train_seconds == pytest.approx(100 + 10 * T, rel=1e-12)
    assert results["diloco+overlap"].time_to_train_seconds == pytest.approx(100 + T, rel=1e-12)
    # streaming, P=4: a fragment (2.5e8 values, 1e9 + 48 bytes) takes 1.090433331 s; tau covers twice that,
    # ceil(2 * 1.090433331 / 1) = ceil(2.18) = 3 steps, and hides it; the final sync of the 4 fragments at once
    # (the whole model, 4e9 + 48 bytes) stalls T.
    fragment = gather(1_000_000_048, 8e9, 0.0, sites=2)
    assert fragment == pytest.approx(1.035911664 / 0.95, rel=1e-12)
    assert results["streaming"].comm_seconds_per_sync == pytest.approx(fragment, rel=1e-12)
    assert [(a.key, a.value) for a in results["streaming"].auto] == [("streaming.overlap_steps", 3)]
    assert results["streaming"].time_to_train_seconds == pytest.approx(100 + T, rel=1e-12)


def test_parse_sweep():
    assert parse_sweep("1gbit,10gbit, 100mbit") == [1e8, 1e9, 1e10]
    points = parse_sweep("1gbit:1tbit:4")
    assert points == pytest.approx([1e9, 1e10, 1e11, 1e12])
    assert parse_sweep(["1gbit", 5e9]) == [1e9, 5e9]
    for bad in ("1gbit:1tbit:1", "1tbit:1gbit:5", "fast", "1gbps", "1gbit:1tbit:x", ""):
        with pytest.raises(ConfigError) as info:
            parse_sweep(bad)
        assert info.value.field == "plan.sweep"


def test_sweep_shape_and_values():
    s = sweep(compare_variants(toy_spec()), bandwidths_bps=[1e9, 8e9, 1e11])
    assert set(s.utilization) == VARIANTS
    assert all(len(v) == 3 for v in s.utilization.values())
    d = s.to_dict()
    assert d["bandwidths_bps"] == [1e9, 8e9, 1e11]
    # At 8 Gbit/s, blocking DiLoCo is the toy itself: 100 / (100 + 10 * 4.361733170526) = 100 / 143.61733170526.
    assert d["utilization"]["diloco"][1] == pytest.approx(100 / 143.61733170526316, rel=1e-12)
    assert d["time_to_train_seconds"]["diloco"][1] == pytest.approx(100 + 10 * T, rel=1e-12)
    # At 1 Gbit/s a sync takes 8 times as long: 100 + 10 * 8 * T.
    assert d["time_to_train_seconds"]["diloco"][0] == pytest.approx(100 + 80 * T, rel=1e-12)
