"""``geotrain.comm.pacing``: the TCP connections a call opens are paced (the socket option read back from the
kernel), those opened before it and sockets that are no TCP connection are not; with "link", each connection is
capped at the rate of the link to the member at its other end, found from the endpoints the members publish;
and a cross-site gloo group's connections are paced as the config says."""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import uuid

import pytest
import torch.distributed as dist

from _utils.gloo_threads import _store, run_threads
from geotrain.comm.groups import SiteEnv, cross_site_group
from geotrain.comm.pacing import _RATE, SO_MAX_PACING_RATE, UNCAPPED, pace, paced, tcp_connections
from geotrain.config import Config, ConfigError, load_config
from geotrain.topology import Topology, pacing_rate, parse_link

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
            off = paced(lambda: _pair(server), mode="off")
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


class _Store:
    """The two calls of a store :func:`paced` makes, over a dict; a key nobody set times out at once."""

    def __init__(self) -> None:
        self.keys: dict[str, bytes] = {}

    def set(self, key: str, value: str) -> None:
        self.keys[key] = value.encode()

    def wait(self, keys: list[str], timeout: datetime.timedelta) -> None:
        if not all(k in self.keys for k in keys):
            raise TimeoutError(keys)

    def get(self, key: str) -> bytes:
        return self.keys[key]


def _endpoint(s: socket.socket) -> str:
    return '["%s", %d]' % s.getsockname()[:2]


def test_link_mode_caps_each_connection_at_the_rate_to_the_member_at_its_other_end():
    """Member 0 connects to members 1, 2 and 3 (their ends accepted here, published under their keys as a
    member does, except member 3's, which never comes): its connections to 1 and 2 are capped at their own
    rates, the one to 3 is paced uncapped, and the members' ends are no connection of member 0's."""
    store = _Store()
    rates = {1: 1_000_000, 2: 3_000_000, 3: 5_000_000}
    servers = {j: socket.create_server(("127.0.0.1", 0)) for j in rates}  # each member listens on its own port
    try:
        for server in servers.values():
            server.settimeout(10)

        def connect() -> dict[int, tuple[socket.socket, socket.socket]]:
            pairs = {j: _pair(servers[j]) for j in rates}
            for j in (1, 2):
                store.set(f"pacing/{j}", f"[{_endpoint(pairs[j][1])}]")
            return pairs

        pairs = paced(connect, mode="link", rate_to=rates.get, store=store, me=0, size=4)
        try:
            assert {j: _rate(mine) for j, (mine, _) in pairs.items()} == {1: 1_000_000, 2: 3_000_000, 3: UNCAPPED}
            assert {_rate(theirs) for _, theirs in pairs.values()} == {UNCAPPED}  # no member published their peers
            published = {tuple(e) for e in json.loads(store.keys["pacing/0"])}  # the ends of what it opened
            assert published == {tuple(s.getsockname()[:2]) for pair in pairs.values() for s in pair}
        finally:
            for a, b in pairs.values():
                a.close()
                b.close()
    finally:
        for server in servers.values():
            server.close()


def test_paced_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="pacing mode"):
        paced(lambda: None, mode="fast")


LINK = parse_link("10mbit/50ms")


@pytest.mark.parametrize(("tcp_pacing", "real_network", "expected"), [
    ("link", True, pacing_rate(LINK)),  # a real network: the link's rate
    ("link", False, UNCAPPED),  # emulated links: the transfer over loopback is not the link's
    ("uncapped", True, UNCAPPED),
    ("off", True, NOT_SET),
])
def test_a_cross_site_groups_connections_are_paced_as_configured(tcp_pacing, real_network, expected):
    store = _store()
    prefix = f"pacing{uuid.uuid4().hex}/"
    before = set(tcp_connections())

    def rank(site: int) -> int:
        client = dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=datetime.timedelta(seconds=60))
        env = SiteEnv(site_rank=site, sites=2, local_rank=0, workers=1, coordinator="", token_file=None,
                      real_network=real_network)
        pg = cross_site_group(dist.PrefixStore(prefix, client), env, generation=0, members=[0, 1], timeout_s=60,
                              tcp_pacing=tcp_pacing, topology=Topology(2, default=LINK))
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
    assert set(gloo) == {expected}
    del groups


def test_pacing_rate_is_the_share_of_the_links_payload_rate_split_among_streams():
    # 10 Mbit/s: 1.25 MB/s on the wire, 1448 of every 1500 bytes payload, 95% of it, over 2 streams
    assert pacing_rate(LINK) == int(0.95 * 1_250_000 * 1448 / 1500)
    assert pacing_rate(LINK, streams=2) == int(0.95 * 1_250_000 * 1448 / 1500 / 2)


def test_config_takes_tcp_pacing_as_one_of_its_modes():
    assert Config().comm.tcp_pacing == "link"  # the cost model charges a link's bytes at its paced share
    assert load_config(None, overrides=['comm.tcp_pacing="uncapped"']).comm.tcp_pacing == "uncapped"
    assert load_config(None, overrides=['comm.tcp_pacing="off"']).comm.tcp_pacing == "off"
    for bad in ("true", "1", '"fast"'):
        with pytest.raises(ConfigError, match="comm.tcp_pacing"):
            load_config(None, overrides=[f"comm.tcp_pacing={bad}"])
