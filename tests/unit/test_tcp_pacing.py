"""``geotrain.comm.pacing``: the TCP connections a call opens are paced (the socket option read back from the
kernel), those opened before it and sockets that are no TCP connection are not; a cross-site gloo group's
connections are paced when asked; the size from which a transfer is paced; and the transport sending each
transfer over the connections its size picks."""

from __future__ import annotations

import datetime
import os
import socket
import sys
import uuid

import pytest
import torch
import torch.distributed as dist

from _utils.gloo_threads import _store, run_threads
from geotrain.comm.groups import SiteEnv, cross_site_group
from geotrain.comm.pacing import _RATE, SO_MAX_PACING_RATE, UNCAPPED, groups, pace, pace_from, paced, tcp_connections
from geotrain.comm.transport import GlooTransport
from geotrain.config import Config, ConfigError, load_config
from geotrain.topology import Topology, parse_link

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TCP pacing is Linux's")

NOT_SET = (1 << (8 * _RATE.size)) - 1
"""What the kernel reports for a socket nobody asked to pace."""


def _rate(s: socket.socket) -> int:
    return _RATE.unpack(s.getsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, _RATE.size))[0]


def _pair(server: socket.socket) -> tuple[socket.socket, socket.socket]:
    client = socket.create_connection(server.getsockname(), timeout=10)
    accepted, _ = server.accept()
    return client, accepted


def test_paced_sets_the_connections_the_call_opened_and_only_those():
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(10)
        old = _pair(server)
        new = paced(lambda: _pair(server))
        try:
            assert [_rate(s) for s in new] == [UNCAPPED, UNCAPPED]
            assert [_rate(s) for s in old] == [NOT_SET, NOT_SET]
            assert _rate(server) == NOT_SET  # listening: not a connection
            off = paced(lambda: _pair(server), enabled=False)
            assert [_rate(s) for s in off] == [NOT_SET, NOT_SET]
        finally:
            for s in (*old, *new, *off):
                s.close()


def test_pace_leaves_other_descriptors_alone_and_caps_when_asked():
    r, w = os.pipe()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(10)
        a, b = _pair(server)
        with a, b:
            assert set(tcp_connections([r, w, udp.fileno(), server.fileno(), a.fileno(), b.fileno()])) == {
                a.fileno(), b.fileno()}
            assert pace([r, w, udp.fileno(), server.fileno(), a.fileno()], rate=12_500_000) == 1
            assert _rate(a) == 12_500_000 and _rate(b) == NOT_SET
            assert _rate(udp) == NOT_SET
    os.close(r)
    os.close(w)


@pytest.mark.parametrize("tcp_paced", [True, False])
def test_a_cross_site_groups_connections_are_paced_when_asked(tcp_paced):
    store = _store()
    prefix = f"pacing{uuid.uuid4().hex}/"
    before = set(tcp_connections())

    def rank(site: int) -> int:
        client = dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=datetime.timedelta(seconds=60))
        env = SiteEnv(site_rank=site, sites=2, local_rank=0, workers=1, coordinator="", token_file=None)
        pg = cross_site_group(dist.PrefixStore(prefix, client), env, generation=0, members=[0, 1], timeout_s=60,
                              tcp_paced=tcp_paced)
        pg.barrier().wait()
        return pg, client

    groups = run_threads([lambda s=s: rank(s) for s in (0, 1)], timeout_s=60)
    gloo = []
    for fd in set(tcp_connections()) - before:
        s = socket.socket(fileno=os.dup(fd))
        with s:
            if store.port not in (s.getsockname()[1], s.getpeername()[1]):  # not a store client's
                gloo.append(_rate(s))
    assert len(gloo) >= 2  # both ends of the group's connection live in this process
    assert set(gloo) == {UNCAPPED if tcp_paced else NOT_SET}
    del groups


def test_config_takes_auto_on_or_off():
    assert Config().comm.tcp_pacing == "auto"
    assert load_config(None, overrides=["comm.tcp_pacing=off"]).comm.tcp_pacing == "off"
    for bad in ("true", "1", "paced"):
        with pytest.raises(ConfigError, match="comm.tcp_pacing"):
            load_config(None, overrides=[f"comm.tcp_pacing={bad}"])


def test_auto_paces_from_one_round_trips_bandwidth_delay_product_of_the_slowest_link():
    slow, fast = parse_link("10mbit/50ms"), parse_link("100mbit/50ms")
    # 10 Mbit/s for 100 ms: 125,000 bytes; per stream when 4 workers share the link
    assert pace_from("auto", [fast, slow, None]) == 125_000
    assert pace_from("auto", [slow], streams=4) == 31_250
    assert pace_from("auto", Topology(3, default=parse_link("2mbit/10ms")).pairs()) == 5_000
    assert pace_from("auto", [None, None]) == 0  # no link known: every transfer paced
    assert pace_from("on", [slow]) == 0 and pace_from("off", [slow]) is None
    with pytest.raises(ValueError, match="auto, on, off"):
        pace_from("always", [slow])
    made = []
    assert groups(0, lambda p: made.append(p) or p) == (True, None)
    assert groups(None, lambda p: made.append(p) or p) == (False, None)
    assert groups(125_000, lambda p: made.append(p) or p) == (False, True)
    assert made == [True, False, False, True]  # only the groups a setting uses are built


class _Done:
    def wait(self, timeout=None):
        return True


class _Group:
    """Records the messages posted on it; every message completes at once."""

    def __init__(self):
        self.posted = []

    def send(self, tensors, peer, tag):
        self.posted.append(("send", tensors[0].numel(), peer))
        return _Done()

    def recv(self, tensors, peer, tag):
        self.posted.append(("recv", tensors[0].numel(), peer))
        return _Done()


@pytest.mark.parametrize("pace_from_bytes,paced_sizes", [(100, {400, 300, 150}), (300, {400, 300}), (None, set())])
def test_the_transport_sends_what_reaches_the_threshold_over_the_paced_connections(pace_from_bytes, paced_sizes):
    plain, fast = _Group(), _Group()
    t = GlooTransport(plain, rank=0, size=2, paced=fast, pace_from=pace_from_bytes)
    t.all_gather(torch.zeros(400, dtype=torch.uint8))  # writes 400 bytes to its one connection at once
    t.all_to_all(torch.zeros(600, dtype=torch.uint8))  # 300 per connection
    t.send(torch.zeros(150, dtype=torch.uint8), 1)
    t.recv(torch.zeros(99, dtype=torch.uint8), 1)
    sizes = {400: {200}, 300: {300}, 150: {150}, 99: {99}}  # each transfer's messages (the all-gather's halves)
    for size, numels in sizes.items():
        on = fast if size in paced_sizes else plain
        off = plain if on is fast else fast
        assert {n for _, n, _ in on.posted} >= numels and not {n for _, n, _ in off.posted} & numels
