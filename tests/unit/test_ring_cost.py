"""The analytic cost of cross-site collectives, checked against hand-computed cases."""

from __future__ import annotations

import pytest

from geotrain.topology import Link, Topology, parse_bandwidth, parse_latency, parse_link
from geotrain.topology import ring_all_gather, ring_all_reduce, ring_reduce_scatter


def test_ring_all_reduce_by_hand():
    # 4 sites, 8 MB: 6 steps of 2 MB chunks; each step 50 ms + 2e6*8/100e6 s = 0.21 s
    links = [Link(bandwidth_bps=100e6, latency_s=0.05)] * 4
    cost = ring_all_reduce(8_000_000, links)
    assert cost.steps == 6
    assert cost.seconds == pytest.approx(6 * 0.21)
    assert cost.bytes_sent == 12_000_000  # 2(K-1)/K of the payload


def test_slowest_link_gates_each_step():
    fast, slow = Link(bandwidth_bps=1e9, latency_s=0.001), Link(bandwidth_bps=10e6, latency_s=0.1)
    topo = Topology(3, default=fast, overrides={(2, 1): slow})
    ring = topo.ring()
    assert ring == [fast, slow, fast]
    cost = ring_all_reduce(3_000_000, ring)
    assert cost.seconds == pytest.approx(4 * (0.1 + 1e6 * 8 / 10e6))


def test_all_gather_and_streams():
    links = [Link(bandwidth_bps=8e6, latency_s=0.0)] * 3
    cost = ring_all_gather(1_000_000, links)
    assert cost.bytes_sent == 2_000_000 and cost.seconds == pytest.approx(2.0)
    # two workers of a site share its link: each stream gets half the bandwidth
    assert ring_all_gather(500_000, links, streams=2).seconds == pytest.approx(2.0)


def test_reduce_scatter_then_all_gather_of_a_chunk_is_a_ring_all_reduce():
    # 4 sites, 8 MB cut into 2 MB chunks: 3 steps of 50 ms + 0.16 s, sending 6 MB
    links = [Link(bandwidth_bps=100e6, latency_s=0.05)] * 4
    rs = ring_reduce_scatter(8_000_000, links)
    assert rs.steps == 3 and rs.bytes_sent == 6_000_000 and rs.seconds == pytest.approx(3 * 0.21)
    ag = ring_all_gather(2_000_000, links)
    ar = ring_all_reduce(8_000_000, links)
    assert rs.seconds + ag.seconds == pytest.approx(ar.seconds)
    assert rs.bytes_sent + ag.bytes_sent == ar.bytes_sent


def test_one_site_and_no_emulation_cost_nothing():
    assert ring_all_reduce(1000, []).seconds == 0
    assert ring_all_reduce(1000, [None, None]).seconds == 0
    assert ring_all_reduce(1000, [None, None]).bytes_sent == 1000


@pytest.mark.parametrize("text,bps", [("10mbit", 10e6), ("1gbit", 1e9), ("1.5Gbit", 1.5e9), ("500kbit", 5e5)])
def test_parse_bandwidth(text, bps):
    assert parse_bandwidth(text) == pytest.approx(bps)


@pytest.mark.parametrize("text,s", [("50ms", 0.05), ("0.1s", 0.1), ("200us", 2e-4), ("0", 0.0), ("30", 0.03)])
def test_parse_latency(text, s):
    assert parse_latency(text) == pytest.approx(s)


@pytest.mark.parametrize("bad", ["fast", "10mbit", "-1mbit/5ms", "10mbps/5ms", "10mbit/-5ms", "0mbit/1ms", "x/y"])
def test_bad_links_raise(bad):
    with pytest.raises(ValueError):
        parse_link(bad)


def test_none_link():
    assert parse_link("none") is None
    assert str(parse_link("10mbit/50ms")) == "10mbit/50ms"
