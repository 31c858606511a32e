"""``geotrain.comm.pacing``: the TCP connections a call opens are paced (the socket option read back from the
kernel), those opened before it and sockets that are no TCP connection are not, and a cross-site gloo group's
connections are paced unless the config turns it off."""

from __future__ import annotations

import datetime
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


@pytest.mark.parametrize("tcp_pacing", [True, False])
def test_a_cross_site_groups_connections_are_paced_as_configured(tcp_pacing):
    store = _store()
    prefix = f"pacing{uuid.uuid4().hex}/"
    before = set(tcp_connections())

    def rank(site: int) -> int:
        client = dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=datetime.timedelta(seconds=60))
        env = SiteEnv(site_rank=site, sites=2, local_rank=0, workers=1, coordinator="", token_file=None)
        pg = cross_site_group(dist.PrefixStore(prefix, client), env, generation=0, members=[0, 1], timeout_s=60,
                              tcp_pacing=tcp_pacing)
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
    assert set(gloo) == {UNCAPPED if tcp_pacing else NOT_SET}
    del groups


def test_config_takes_tcp_pacing_as_a_boolean_only():
    assert Config().comm.tcp_pacing is True
    assert load_config(None, overrides=["comm.tcp_pacing=false"]).comm.tcp_pacing is False
    with pytest.raises(ConfigError, match="comm.tcp_pacing"):
        load_config(None, overrides=["comm.tcp_pacing=1"])
