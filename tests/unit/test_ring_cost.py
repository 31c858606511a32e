"""The analytic cost of cross-site collectives, checked against hand-computed cases."""

from __future__ import annotations

import pytest

from geotrain.topology import (HEADER_BYTES, MSS_BYTES, PACED_BURST_RTTS, PACED_LINK_SHARE, Link, Topology, all_to_all,
                               burst_seconds, message_seconds, parse_bandwidth, parse_latency, parse_link,
                               point_to_point, ring_all_gather, wire_bytes)

SEG = 14_480  # ten full segments: 15,000 bytes on the wire
LINK = Link(bandwidth_bps=10e6, latency_s=0.02)  # a quarter of its round trip: 10 ms
S = 0.012 / 0.95
"""Ten segments over ``LINK``: 120,000 bits take 12 ms at its rate, 12.63 ms at the 95% of it a connection is
paced at (``PACED_LINK_SHARE``)."""


def test_connections_carry_data_at_the_paced_share_of_the_link():
    assert PACED_LINK_SHARE == 0.95
    assert point_to_point(SEG, Link(bandwidth_bps=10e6, latency_s=0.0)).seconds == pytest.approx(S)


def test_headers_are_charged_per_segment():
    assert MSS_BYTES + HEADER_BYTES == 1500
    assert wire_bytes(SEG) == 15_000
    assert wire_bytes(1) == 1 + HEADER_BYTES
    assert wire_bytes(MSS_BYTES + 1) == MSS_BYTES + 1 + 2 * HEADER_BYTES


def test_a_message_waits_one_latency_for_the_receivers_announcement():
    assert message_seconds(SEG, LINK) == pytest.approx(0.02 + S + 0.02)
    assert message_seconds(SEG, LINK, streams=2) == pytest.approx(0.02 + 2 * S + 0.02)  # two workers share it
    assert point_to_point(SEG, LINK).seconds == message_seconds(SEG, LINK)
    assert message_seconds(SEG, None) == 0 and message_seconds(0, LINK) == 0


def test_all_to_all_pairs_go_at_once_and_the_slowest_pair_gates():
    cost = all_to_all(4 * SEG, [LINK] * 6, sites=4)
    assert cost.seconds == pytest.approx(0.04 + S)  # one chunk's message, not three after one another
    assert cost.bytes_sent == 3 * SEG and cost.steps == 1
    slow = Link(bandwidth_bps=1e6, latency_s=0.05)
    topo = Topology(3, default=LINK, overrides={(0, 2): slow})
    assert topo.pairs() == [LINK, slow, LINK]
    # the slow pair's chunk (0.1 + 10 S) gates; the others take 0.04 + S
    assert all_to_all(3 * SEG, topo.pairs(), sites=3).seconds == pytest.approx(0.1 + 10 * S)


def test_ring_all_gather_by_hand():
    # two halves of 10 segments each (S apiece), after the neighbour's announcement
    assert ring_all_gather(2 * SEG, [LINK] * 2).seconds == pytest.approx(0.04 + 2 * S)
    # 3 sites: every receive is announced at the start, so the third half is passed on as soon as the first has
    # arrived (0.04 + S), and the fourth as soon as the second has (0.04 + 2 S): then S on the link, 0.02 in flight
    cost = ring_all_gather(2 * SEG, [LINK] * 3)
    assert cost.seconds == pytest.approx(0.06 + 3 * S) and cost.bytes_sent == 4 * SEG and cost.steps == 2


def test_a_paced_burst_takes_a_quarter_round_trip_at_least():
    long_link = Link(bandwidth_bps=10e6, latency_s=0.06)  # a quarter of its 120 ms round trip: 30 ms > 2 S
    assert PACED_BURST_RTTS == 0.25
    assert burst_seconds(SEG, long_link) == pytest.approx(0.03)
    assert burst_seconds(30 * SEG, long_link) == pytest.approx(30 * S)  # longer than the floor: serialisation
    assert message_seconds(SEG, long_link) == pytest.approx(0.06 + 0.03 + 0.06)
    assert all_to_all(2 * SEG, [long_link], sites=2).seconds == pytest.approx(0.15)  # a 7,240-byte chunk
    # between 2 sites this site's payload (both halves) is one burst: 0.06 + max(2 S, 0.03) + 0.06
    assert ring_all_gather(2 * SEG, [long_link] * 2).seconds == pytest.approx(0.15)
    assert ring_all_gather(20 * SEG, [long_link] * 2).seconds == pytest.approx(0.12 + 20 * S)  # unchanged


def test_a_bandwidth_bound_ring_all_gather_keeps_the_link_busy():
    links = [Link(bandwidth_bps=8e6, latency_s=0.0)] * 4
    payload = 100 * MSS_BYTES
    cost = ring_all_gather(payload, links)
    assert cost.seconds == pytest.approx(3 * 8 * wire_bytes(payload) / (0.95 * 8e6))  # K-1 payloads back to back
    assert ring_all_gather(payload // 2, links, streams=2).seconds == pytest.approx(cost.seconds, rel=1e-3)


def test_the_slowest_link_of_the_ring_sets_the_all_gather():
    slow = Link(bandwidth_bps=1e6, latency_s=0.05)
    topo = Topology(3, default=LINK, overrides={(2, 1): slow})
    assert topo.ring() == [LINK, slow, LINK]
    assert ring_all_gather(SEG, topo.ring()).seconds == ring_all_gather(SEG, [slow] * 3).seconds


def test_one_site_and_no_emulation_cost_nothing():
    assert ring_all_gather(1000, []).seconds == 0
    assert ring_all_gather(1000, [None, None]).seconds == 0
    assert ring_all_gather(1000, [None, None]).bytes_sent == 1000
    assert all_to_all(1000, [None], sites=2).seconds == 0 and all_to_all(1000, [], sites=2).bytes_sent == 500


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
