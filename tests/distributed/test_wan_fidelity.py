"""Emulation fidelity: a real gloo collective under the WAN wrapper lasts exactly the analytic time of its
pattern, on a virtual clock (the real clock's sleep accuracy is measured in benchmarks/emulation_bench.py)."""

from __future__ import annotations

import pytest
import torch

from _utils.gloo_threads import run_ranks
from geotrain.clock import VirtualClock
from geotrain.comm.transport import GlooTransport
from geotrain.topology import Topology, parse_link, ring_all_gather, ring_all_reduce, ring_reduce_scatter
from geotrain.wan.emulator import EmulatedWan

POINTS = [  # (sites, payload bytes, link)
    (3, 1_000_000, "50mbit/20ms"),
    (4, 4_000_000, "200mbit/5ms"),
    (2, 250_000, "10mbit/50ms"),
]


def _wan(rank, pg, k, topo):
    clock = VirtualClock(start=100.0)
    return EmulatedWan(GlooTransport(pg, rank=rank, size=k, clock=clock), topology=topo, members=list(range(k)),
                       clock=clock), clock


@pytest.mark.parametrize("k,nbytes,link", POINTS)
def test_all_reduce_lasts_the_analytic_time(k, nbytes, link):
    topo = Topology(k, default=parse_link(link))
    expected = ring_all_reduce(nbytes, topo.ring()).seconds
    # by hand for the first point: 4 steps of 20 ms + (1 MB / 3) * 8 / 50 Mbit/s
    if (k, nbytes, link) == POINTS[0]:
        assert expected == pytest.approx(4 * (0.02 + 1_000_000 / 3 * 8 / 50e6), rel=1e-12)

    def body(rank, pg):
        wan, clock = _wan(rank, pg, k, topo)
        out = []
        for _ in range(2):  # back to back: the second starts where the first ended
            t = torch.full((nbytes // 4,), float(rank + 1))
            t0 = clock.now()
            traffic = wan.all_reduce_sum(t)
            out.append((clock.now() - t0, traffic))
            assert torch.all(t == k * (k + 1) / 2)  # the data really was reduced
        return out, clock.now()

    for out, end in run_ranks(k, body):
        for wall, traffic in out:
            assert traffic.bytes_sent == round(2 * (k - 1) / k * nbytes)
            assert traffic.real_seconds == 0.0  # no virtual time passes inside gloo
            assert traffic.emulated_seconds == pytest.approx(expected, rel=1e-12)
            assert wall == pytest.approx(expected, rel=1e-12)
        assert end == pytest.approx(100.0 + 2 * expected, rel=1e-12)


def test_all_gather_lasts_the_analytic_time():
    k, nbytes = 3, 200_000
    topo = Topology(k, default=parse_link("20mbit/30ms"))
    expected = ring_all_gather(nbytes, topo.ring()).seconds
    assert expected == pytest.approx(2 * (0.03 + nbytes * 8 / 20e6), rel=1e-12)  # K-1 steps of a whole payload

    def body(rank, pg):
        wan, clock = _wan(rank, pg, k, topo)
        payload = torch.full((nbytes,), rank, dtype=torch.uint8)
        out, traffic = wan.all_gather(payload)
        assert [int(o[0]) for o in out] == list(range(k))
        return clock.now() - 100.0, traffic

    for wall, traffic in run_ranks(k, body):
        assert traffic.bytes_sent == (k - 1) * nbytes
        assert wall == pytest.approx(expected, rel=1e-12)


def test_all_to_all_lasts_the_analytic_reduce_scatter():
    k, nbytes = 3, 600_000  # one 200 kB chunk per site
    topo = Topology(k, default=parse_link("20mbit/30ms"))
    expected = ring_reduce_scatter(nbytes, topo.ring()).seconds

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
    expected = 4 * (0.04 + nbytes / 3 * 8 / 10e6)  # 2(K-1) steps, each as slow as the 10 Mbit/s hop

    def body(rank, pg):
        wan, clock = _wan(rank, pg, k, topo)
        wan.all_reduce_sum(torch.ones(nbytes // 4))
        return clock.now() - 100.0

    assert run_ranks(k, body) == [pytest.approx(expected, rel=1e-12)] * k
