"""The planner's answers: bandwidth for a target, smallest H, mildest codec, sweeps."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geotrain.errors import ConfigError
from geotrain.planner.model import AlgorithmSpec, plan
from geotrain.planner.questions import (
    bandwidth_needed,
    compare_variants,
    mildest_codec,
    parse_sweep,
    smallest_sync_every,
    sweep,
    with_bandwidth,
)

try:  # the toy world is defined once, beside the formula tests (tests/ is not a package)
    from test_planner_model import toy_spec
except ImportError:  # pragma: no cover - if tests/ becomes a package
    from tests.unit.test_planner_model import toy_spec


def test_bandwidth_needed_by_hand():
    # DiLoCo H=10 on the toy (1 s steps, 2 sites, fp32 4e9-byte payload, no latency): 95% needs
    # T <= 10 * (1/0.95 - 1) s, and T = 2 * 8 * 2e9 / b, so b = 3.2e10 / T.
    spec = toy_spec(algorithm=AlgorithmSpec(name="diloco", sync_every=10))
    expected = 3.2e10 / (10 * (1 / 0.95 - 1))
    got = bandwidth_needed(spec, target=0.95)
    assert got == pytest.approx(expected, rel=1e-3)
    assert plan(with_bandwidth(spec, bandwidth_bps=got)).utilization >= 0.95 * (1 - 1e-9)
    assert plan(with_bandwidth(spec, bandwidth_bps=got * 0.99)).utilization < 0.95


def test_bandwidth_needed_is_none_when_latency_alone_blocks():
    # DDP at 1 s steps over 300 ms links: two ring steps cost 0.6 s of latency whatever the bandwidth.
    spec = toy_spec(algorithm=AlgorithmSpec(name="ddp"), latency=0.3)
    assert bandwidth_needed(spec, target=0.95) is None
    assert bandwidth_needed(spec, target=0.5) is not None


def test_bandwidth_needed_rejects_bad_targets():
    with pytest.raises(ConfigError):
        bandwidth_needed(toy_spec(algorithm=AlgorithmSpec()), target=1.5)


def test_with_bandwidth_keeps_each_latency():
    spec = toy_spec(algorithm=AlgorithmSpec(), sites=3, latency=0.02)
    from geotrain.topology import Link

    spec.topology.overrides[(0, 1)] = Link(bandwidth_bps=1e6, latency_s=0.09)
    new = with_bandwidth(spec, bandwidth_bps=5e9)
    assert new.topology.link(0, 1) == Link(bandwidth_bps=5e9, latency_s=0.09)
    assert new.topology.link(1, 2) == Link(bandwidth_bps=5e9, latency_s=0.02)


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(["ddp", "diloco", "diloco+overlap", "streaming+overlap"]),
    bws=st.lists(st.floats(min_value=1e6, max_value=1e13), min_size=2, max_size=6),
)
def test_utilization_never_falls_with_bandwidth(name, bws):
    variants = compare_variants(toy_spec(algorithm=AlgorithmSpec(name="diloco", sync_every=50), latency=0.01))
    bws = sorted(bws)
    utils = sweep({name: variants[name]}, bandwidths_bps=bws).utilization[name]
    assert all(b >= a - 1e-12 for a, b in zip(utils, utils[1:]))


def test_smallest_sync_every():
    # Toy at 8 Gbit/s: T = 4 s. Without overlap util(H) = H / (H + 4) >= 0.95 needs H >= 76: 100 of the list.
    spec = toy_spec(algorithm=AlgorithmSpec(name="diloco", sync_every=10))
    assert smallest_sync_every(spec, target=0.95) == 100
    # With overlap util = min(1, H / 4): H = 5 of the list.
    over = toy_spec(algorithm=AlgorithmSpec(name="diloco", sync_every=10, overlap=True))
    assert smallest_sync_every(over, target=0.95) == 5
    assert smallest_sync_every(spec, target=0.999, candidates=[1, 2, 3]) is None
    # A ddp plan is asked as diloco.
    assert smallest_sync_every(toy_spec(algorithm=AlgorithmSpec(name="ddp")), target=0.95) == 100


def test_mildest_codec():
    # DiLoCo H=10 needs T <= 0.526 s; fp32 takes 4 s, bf16 2 s, int8 1 s, int4 0.5 s.
    spec = toy_spec(algorithm=AlgorithmSpec(name="diloco", sync_every=10))
    assert mildest_codec(spec, target=0.95).name == "int4"
    assert mildest_codec(spec, target=0.80).name == "bf16"  # 10 / 12 = 0.83
    assert mildest_codec(spec, target=0.999) is None


def test_compare_variants_cover_the_four_algorithms():
    variants = compare_variants(toy_spec(algorithm=AlgorithmSpec(name="diloco", sync_every=100), codec="int4"))
    assert list(variants) == ["ddp", "diloco", "diloco+overlap", "streaming+overlap"]
    assert variants["ddp"].codec.name == "bf16"  # ddp sends bf16 gradients
    assert variants["diloco+overlap"].algorithm.overlap
    s = variants["streaming+overlap"].algorithm
    assert (s.name, s.sync_every, s.fragments, s.overlap_steps) == ("streaming", 100, 4, 1)
    assert variants["streaming+overlap"].codec.name == "int4"


def test_parse_sweep():
    assert parse_sweep("1gbit,10gbit, 100mbit") == [1e8, 1e9, 1e10]
    points = parse_sweep("1gbit:1tbit:4")
    assert points == pytest.approx([1e9, 1e10, 1e11, 1e12])
    assert parse_sweep(["1gbit", 5e9]) == [1e9, 5e9]
    for bad in ("1gbit:1tbit:1", "1tbit:1gbit:5", "fast", "1gbps", "1gbit:1tbit:x"):
        with pytest.raises(ConfigError):
            parse_sweep(bad)


def test_sweep_shape():
    s = sweep(compare_variants(toy_spec(algorithm=AlgorithmSpec())), bandwidths_bps=[1e9, 1e10, 1e11])
    assert set(s.utilization) == {"ddp", "diloco", "diloco+overlap", "streaming+overlap"}
    assert all(len(v) == 3 for v in s.utilization.values())
    assert s.to_dict()["bandwidths_bps"] == [1e9, 1e10, 1e11]
