"""Emulation fidelity: a real gloo collective under the WAN wrapper lasts exactly the analytic time of its
pattern, on a virtual clock (the real clock's sleep accuracy is measured in benchmarks/emulation_bench.py)."""

from __future__ import annotations

import pytest
import torch

from _utils.gloo_threads import run_ranks
from geotrain.clock import VirtualClock
from geotrain.comm.transport import GlooTransport
from geotrain.topology import Topology, all_to_all, parse_link, ring_all_gather
from geotrain.wan.emulator import EmulatedWan, TransferDeadlineExceeded

def _wan(rank, pg, k, topo, *, deadline=None):
    clock = VirtualClock(start=100.0)
    return EmulatedWan(GlooTransport(pg, rank=rank, size=k, clock=clock), topology=lambda: topo, clock=clock,
                       deadline=deadline), clock


def test_all_gather_lasts_the_analytic_time():
    k, nbytes = 3, 200_000
    topo = Topology(k, default=parse_link("20mbit/30ms"))
    expected = ring_all_gather(nbytes, topo.ring()).seconds
    # halves of 100,000 bytes: 70 segments, 103,640 bytes on the wire, s = 43.64 ms at the 95% of 20 Mbit/s a
    # connection is paced at. After the neighbour's announcement (L) the four halves go back to back: a
    # forwarded half has arrived (its own serialisation and a latency after it left) before the link is free,
    # since s > L. The last arrives at 2L + 4s.
    assert expected == pytest.approx(2 * 0.03 + 4 * 103_640 * 8 / (0.95 * 20e6), rel=1e-12)

    def body(rank, pg):
        wan, clock = _wan(rank, pg, k, topo)
        payload = torch.full((nbytes,), rank, dtype=torch.uint8)
        out, traffic = wan.all_gather(payload)
        assert [int(o[0]) for o in out] == list(range(k))
        return clock.now() - 100.0, traffic

    for wall, traffic in run_ranks(k, body):
        assert traffic.bytes_sent == (k - 1) * nbytes
        assert wall == pytest.approx(expected, rel=1e-12)


def test_all_to_all_lasts_one_chunks_message():
    k, nbytes = 3, 600_000  # one 200 kB chunk per site: 139 segments, 207,228 bytes on the wire
    topo = Topology(k, default=parse_link("20mbit/30ms"))
    expected = all_to_all(nbytes, topo.pairs(), sites=k).seconds
    assert expected == pytest.approx(2 * 0.03 + 207_228 * 8 / (0.95 * 20e6), rel=1e-12)  # every pair at once

    def body(rank, pg):
        wan, clock = _wan(rank, pg, k, topo)
        payload = torch.arange(k, dtype=torch.uint8).repeat_interleave(nbytes // k) + 10 * rank
        out, traffic = wan.all_to_all(payload)
        # slot i holds site i's chunk for this rank
        assert [int(out[i * (nbytes // k)]) for i in range(k)] == [10 * i + rank for i in range(k)]
        return clock.now() - 100.0, traffic

    for wall, traffic in run_ranks(k, body):
        assert traffic.bytes_sent == (k - 1) * nbytes // k
        assert wall == pytest.approx(expected, rel=1e-12)


def test_the_slowest_link_of_the_ring_sets_every_step():
    k, nbytes = 3, 300_000
    topo = Topology(k, default=parse_link("1gbit/1ms"), overrides={(1, 2): parse_link("10mbit/40ms")})
    expected = 2 * 0.04 + 103_640 * 8 / (0.95 * 10e6)  # a 100 kB chunk over the slowest pair, the 10 Mbit/s one

    def body(rank, pg):
        wan, clock = _wan(rank, pg, k, topo)
        wan.all_to_all(torch.ones(nbytes, dtype=torch.uint8))
        return clock.now() - 100.0

    assert run_ranks(k, body) == [pytest.approx(expected, rel=1e-12)] * k


def test_a_slowed_site_slows_its_links_by_the_factor():
    """``--fault slow:4:1``: site 1's links carry 4x fewer bits per second; the all-to-all waits for them."""
    k, nbytes = 3, 300_000
    topo = Topology(k, default=parse_link("40mbit/10ms")).slowed({1: 4.0})
    assert topo.link(0, 2) == parse_link("40mbit/10ms") and topo.link(0, 1) == parse_link("10mbit/10ms")
    expected = 2 * 0.01 + 103_640 * 8 / (0.95 * 10e6)

    def body(rank, pg):
        wan, clock = _wan(rank, pg, k, topo)
        wan.all_to_all(torch.ones(nbytes, dtype=torch.uint8))
        return clock.now() - 100.0

    assert run_ranks(k, body) == [pytest.approx(expected, rel=1e-12)] * k


def test_point_to_point_lasts_one_message_over_the_link():
    """Healing: the healer sends its state to a joiner over the link between the two: the joiner's
    announcement, then 346 segments (517,992 bytes on the wire), then a latency."""
    k, nbytes = 2, 500_000
    topo = Topology(k, default=parse_link("100mbit/25ms"))
    expected = 2 * 0.025 + 517_992 * 8 / (0.95 * 100e6)

    def body(rank, pg):
        wan, clock = _wan(rank, pg, k, topo)
        t = torch.full((nbytes,), 7 if rank == 0 else 0, dtype=torch.uint8)
        traffic = wan.send(t, 1) if rank == 0 else wan.recv(t, 0)
        assert int(t[-1]) == 7
        return clock.now() - 100.0, traffic.bytes_sent

    (w0, sent0), (w1, sent1) = run_ranks(k, body)
    assert w0 == pytest.approx(expected, rel=1e-12) and w1 == pytest.approx(expected, rel=1e-12)
    assert (sent0, sent1) == (nbytes, 0)


def test_an_emulated_transfer_past_its_deadline_fails_at_the_deadline():
    """Emulated transfers obey the same deadlines as real ones: held until the deadline, then an error."""
    k, nbytes = 2, 1_000_000
    topo = Topology(k, default=parse_link("1mbit/10ms"))  # 8 s for the megabyte

    def body(rank, pg):
        wan, clock = _wan(rank, pg, k, topo, deadline=lambda pattern, n: 2.5)
        with pytest.raises(TransferDeadlineExceeded, match="past its deadline of 2.5 s"):
            wan.all_gather(torch.ones(nbytes, dtype=torch.uint8))
        return clock.now() - 100.0

    assert run_ranks(k, body) == [pytest.approx(2.5, rel=1e-12)] * k
