"""MembershipClient and CoordinatorStore against a real coordinator on loopback.

The coordinator runs on its own event loop in a thread of this process and reads a clock the test moves by
hand, so its deadlines (heartbeat timeout, reconnection after a restart) pass only when a test says so. The
clients are the real ones: their own connections, heartbeat threads and retries. Blocking requests run on
background threads that every test waits for with a bound, and every client is closed however a test ends.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist

from _utils.coordinator import RunningCoordinator
from _utils.membership import FakeClock, background, closing_clients, serving, wait_until
from geotrain.errors import ConfigError
from geotrain.membership.client import Evicted, MembershipClient, MembershipError, Refused
from geotrain.membership.fingerprint import fingerprint
from geotrain.membership.store import CoordinatorStore
from geotrain.membership.wire import AuthError, WireError

pytestmark = pytest.mark.timeout(90)

SECRET = b"r" * 32
SETTINGS = {"heartbeat_s": 0.05, "heartbeat_timeout_s": 10.0, "quorum_timeout_s": 60.0, "join_timeout_s": 30.0}
"""Deadlines in the coordinator's (hand-moved) seconds; join_timeout_s also bounds a client's retries in real
seconds."""


@contextlib.contextmanager
def coordinator(clock: FakeClock | None = None, **kwargs: Any) -> Iterator[RunningCoordinator]:
    with serving(SECRET, now=clock or FakeClock(), **kwargs) as rc:
        yield rc


def _status(rc: RunningCoordinator) -> dict[str, Any]:
    return rc.call(rc.coordinator.status)


def _events(rc: RunningCoordinator) -> list[tuple[int, str]]:
    return rc.call(lambda: [(e["site"], e["kind"]) for e in rc.coordinator.events])


def _last_seen(rc: RunningCoordinator, site: int, worker: int = 0) -> float | None:
    def read() -> float | None:
        s = rc.coordinator.sites.get(site)
        w = None if s is None else s.workers.get(worker)
        return None if w is None else w.last_seen
    return rc.call(read)


def _form(*clients: MembershipClient) -> list[dict[str, Any]]:
    calls = [background(c.form) for c in clients]
    return [c.result() for c in calls]


def _admission(client: MembershipClient, sync: int) -> dict[str, Any]:
    """A member's admission at ``sync``, without the launch name."""
    reply = client.admit(sync)
    return {k: reply[k] for k in ("gen", "members", "joined", "healer")}


def _on_each(fn: Any, *clients: MembershipClient) -> list[Any]:
    """``fn(client)`` for every client at once (each on its own thread), as the sites of a run call it."""
    calls = [background(fn, c) for c in clients]
    return [c.result() for c in calls]


# -- joining ----------------------------------------------------------------------------------------------------

def test_two_sites_join_form_and_hold_the_same_view():
    with coordinator() as rc, closing_clients(rc.address, SECRET, settings=SETTINGS) as cs:
        a, b = cs.new(0), cs.new(1)
        assert a.join() == {"ok": True, "status": "waiting", "gen": -1, "members": [], "formed": False}
        assert b.join()["status"] == "waiting"
        formed = _form(a, b)
        launch = rc.call(lambda: rc.coordinator.launch)
        assert formed == [{"gen": 0, "members": [0, 1], "resume_round": None, "launch": launch}] * 2
        for c in (a, b):
            assert (c.view.gen, c.view.members, c.view.launch) == (0, [0, 1], launch)
        assert (a.view.rank(0), b.view.rank(1)) == (0, 1)
        status = _status(rc)
        assert status["formed"] and status["sites"] == {0: {"status": "member", "workers": [0], "reason": ""},
                                                        1: {"status": "member", "workers": [0], "reason": ""}}


def _params(width: int) -> list[tuple[str, list[int], str]]:
    return [("layer.weight", [width, 8], "float32"), ("layer.bias", [width], "float32")]


def test_a_site_with_another_model_is_refused_with_the_difference_and_starts_no_heartbeat():
    run_tree = {"run": {"seed": 3}}
    with coordinator() as rc, closing_clients(rc.address, SECRET, settings=SETTINGS) as cs:
        cs.new(0, fingerprint=fingerprint(_params(8), run_tree)).join()
        other = cs.new(1, fingerprint=fingerprint(_params(16), run_tree))
        with pytest.raises(Refused) as info:
            other.join()
        assert isinstance(info.value, ConfigError) and info.value.field == "site"
        assert str(info.value) == ("site: the coordinator refused site 1: site 1 does not match the run: parameter "
                                   "'layer.weight' is (16, 8) float32 here and (8, 8) float32 in the run")
        assert other._heartbeat is None
        assert sorted(_status(rc)["sites"]) == [0]


def test_a_second_process_with_a_site_rank_already_in_the_run_is_refused():
    with coordinator() as rc, closing_clients(rc.address, SECRET, settings=SETTINGS) as cs:
        cs.new(0).join()
        with pytest.raises(Refused, match=r"site 0 worker 0 is already in the run \(a duplicate site rank\?\); "
                                          "give each site its own --site-rank"):
            cs.new(0).join()


@pytest.mark.parametrize("site, message", [(2, "site rank 2 is out of range: this run's sites are 0 to 1"),
                                           (-1, "site rank -1 is out of range: this run's sites are 0 to 1")])
def test_a_site_rank_outside_the_run_is_refused(site, message):
    with coordinator() as rc, closing_clients(rc.address, SECRET, settings=SETTINGS) as cs:
        cs.new(0).join()
        with pytest.raises(Refused) as info:
            cs.new(site).join()
        assert str(info.value).endswith(message)


def test_a_site_that_comes_after_the_run_finished_is_refused():
    with coordinator() as rc, closing_clients(rc.address, SECRET, settings=SETTINGS) as cs:
        a, b = cs.new(0), cs.new(1)
        a.join()
        b.join()
        _form(a, b)
        a.close(done=True)
        b.close(done=True)
        assert _status(rc)["finished"] is True
        with pytest.raises(Refused, match="the run has finished; start a new coordinator for a new run"):
            cs.new(1).join()


def test_a_site_with_another_secret_gets_an_auth_error_not_retries():
    with coordinator() as rc, closing_clients(rc.address, SECRET, settings=SETTINGS) as cs:
        stranger = cs.new(0, secret=b"x" * 32)
        with pytest.raises(AuthError, match="does not hold this site's secret"):
            stranger.join(connect_s=60.0)
        assert _status(rc)["sites"] == {}


def test_joining_with_no_coordinator_gives_up_after_connect_s_with_the_address():
    with socket.socket() as reserved:  # bound, never listening: connections to it are refused
        reserved.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{reserved.getsockname()[1]}"
        with closing_clients(address, SECRET, settings=SETTINGS) as cs:
            with pytest.raises(MembershipError, match=rf"cannot reach the coordinator at {address} .* after 0.2 s"):
                cs.new(0).join(connect_s=0.2)


@pytest.mark.parametrize("address", ["localhost", "localhost:", ":5000", "host:0", "host:65536", "host:port"])
def test_a_malformed_coordinator_address_is_bad_input(address):
    with pytest.raises(ConfigError, match="must be HOST:PORT") as info:
        MembershipClient(address, SECRET, site=0, worker=0, workers=1, sites=2)
    assert info.value.field == "coordinator"


def test_an_ipv6_address_in_brackets_is_understood():
    client = MembershipClient("[::1]:7000", SECRET, site=0, worker=0, workers=1, sites=2)
    assert (client.host, client.port) == ("::1", 7000)


# -- heartbeats, eviction, rejoining and admission ------------------------------------------------------------

def test_a_silent_site_is_dropped_sees_evicted_rejoins_and_is_admitted_with_its_healer_and_data_position():
    clock = FakeClock()
    with coordinator(clock) as rc, closing_clients(rc.address, SECRET, settings=SETTINGS) as cs:
        live = cs.new(0)
        silent = cs.new(1, settings={"heartbeat_s": 3600.0})  # a hung process: its connection stays open
        live.join()
        silent.join()
        _form(live, silent)
        t0 = clock()
        votes = [background(c.vote, 0, gen=0, attempt=0, phase="commit", ok=True, position={"batch": 10 + k})
                 for k, c in enumerate((live, silent))]
        assert all(v.result()["commit"] for v in votes)

        # live heartbeats on its own thread; move time in two steps so the drop falls between its heartbeats
        clock.advance(6.0)
        wait_until(lambda: _last_seen(rc, 0) == t0 + 6.0, what="a heartbeat from site 0 at the new time")
        clock.advance(4.25)  # site 1 silent for 10.25 s > 10 s; site 0 for at most 4.25 s
        rc.call(rc.coordinator.tick)
        status = _status(rc)
        assert status["sites"][1] == {"status": "gone", "workers": [],
                                      "reason": "no heartbeat from worker 0 for 10 s (membership.heartbeat_timeout_s)"}
        assert status["sites"][0]["status"] == "member"
        assert _events(rc) == [(0, "joined"), (1, "joined"), (1, "left")]

        # the survivor's next sync goes on without it; the dropped site learns it at its next request
        assert live.quorum(1, round=1) == {"gen": 1, "members": [0], "left": [1], "admit": False}
        with pytest.raises(Evicted, match="site 1 is no longer in the run"):
            silent.quorum(1, round=1)

        reply = silent.rejoin()
        assert reply["status"] == "waiting" and silent.view.gen == -1
        waiting = background(silent.await_admission)
        wait_until(lambda: rc.call(lambda: bool(rc.coordinator._admission_waiters.get(1))),
                   what="site 1 waiting to be admitted")
        admitted = live.admit(2)
        launch = rc.call(lambda: rc.coordinator.launch)
        assert admitted == {"gen": 2, "members": [0, 1], "joined": [1], "healer": 0, "launch": launch}
        assert waiting.result() == {**admitted, "position": {"batch": 11}}
        assert (silent.view.gen, silent.view.members) == (2, [0, 1]) == (live.view.gen, live.view.members)
        assert _events(rc)[-1] == (1, "rejoined")
        assert rc.call(lambda: rc.coordinator.events[-1]["healed_from"]) == 0


def test_a_dropped_site_whose_heartbeats_return_is_admitted_only_after_it_learns_it_was_dropped():
    """Site 1 is cut off mid-round, dropped at the heartbeat timeout, and the cut heals before its training
    thread talks to the coordinator again. Its heartbeat thread re-joins at once; the members' next
    admission must not take it in unhealed. Its training thread sees Evicted, rejoins, and is healed."""
    clock = FakeClock()
    with coordinator(clock) as rc, closing_clients(rc.address, SECRET, settings=SETTINGS) as cs:
        a, b = cs.new(0), cs.new(1)
        a.join()
        b.join()
        _form(a, b)
        t0 = clock()
        b.cut(True)
        with b._session_lock:  # and no heartbeat of b's already under way can land while time moves
            clock.advance(6.0)
            wait_until(lambda: _last_seen(rc, 0) == t0 + 6.0, what="a heartbeat from site 0 at the new time")
            clock.advance(4.25)
            rc.call(rc.coordinator.tick)
        assert _status(rc)["sites"][1]["status"] == "gone"
        b.cut(False)
        wait_until(lambda: _status(rc)["sites"][1] == {"status": "waiting", "workers": [0], "reason": ""},
                   what="site 1's heartbeat thread to join again")

        assert _admission(a, 1) == {"gen": 0, "members": [0, 1], "joined": [], "healer": None}
        with pytest.raises(Evicted, match="site 1 is not a member of the run"):
            b.quorum(1, round=1)
        b.rejoin()
        waiting = background(b.await_admission)
        wait_until(lambda: rc.call(lambda: bool(rc.coordinator._admission_waiters.get(1))),
                   what="site 1 waiting to be admitted")
        assert _admission(a, 2) == {"gen": 1, "members": [0, 1], "joined": [1], "healer": 0}
        assert waiting.result()["healer"] == 0 and b.view.gen == 1
        assert _events(rc) == [(0, "joined"), (1, "joined"), (1, "left"), (1, "rejoined")]


def test_heartbeats_keep_a_quiet_site_in_the_run_for_as_long_as_it_lives():
    clock = FakeClock()
    with coordinator(clock) as rc, closing_clients(rc.address, SECRET, settings=SETTINGS) as cs:
        a, b = cs.new(0), cs.new(1)
        a.join()
        b.join()
        _form(a, b)
        for _ in range(4):  # 32 s of coordinator time without a request from either site
            t = clock.advance(8.0)
            wait_until(lambda: _last_seen(rc, 0) == t and _last_seen(rc, 1) == t, what="heartbeats at the new time")
            rc.call(rc.coordinator.tick)
        assert [s["status"] for s in _status(rc)["sites"].values()] == ["member", "member"]
        assert _events(rc) == [(0, "joined"), (1, "joined")]


def test_closing_a_client_says_why_it_left_and_stops_its_heartbeat():
    with coordinator() as rc, closing_clients(rc.address, SECRET, settings=SETTINGS) as cs:
        a, b = cs.new(0), cs.new(1)
        a.join()
        b.join()
        _form(a, b)
        b.close(reason="interrupted")
        assert not b._heartbeat.is_alive()
        assert _status(rc)["sites"][1] == {"status": "gone", "workers": [], "reason": "interrupted"}
        assert _events(rc)[-1] == (1, "left")
        with pytest.raises(MembershipError):  # a closed client makes no more requests
            b.call("status", retry_s=0.0)


def test_a_session_cleared_between_a_heartbeat_s_send_and_its_reply_does_not_kill_the_heartbeat(monkeypatch):
    """close() clears the session without the heartbeat's lock (it closes the channel, which fails the pending
    read). A heartbeat that had already sent must then see a failed read, not a missing session."""
    with coordinator() as rc, closing_clients(rc.address, SECRET, settings=SETTINGS) as cs:
        a, b = cs.new(0), cs.new(1)
        a.join()
        b.join()
        _form(a, b)
        crashed: list[BaseException] = []
        monkeypatch.setattr(threading, "excepthook", lambda args: crashed.append(args.exc_value))

        class ClearedAfterSend:
            def __init__(self) -> None:
                self.sent = threading.Event()

            def send(self, message: dict) -> None:
                b._session = None  # what close() does, at the worst moment
                self.sent.set()

            def recv(self) -> dict:
                raise WireError("the connection was closed")

            def close(self) -> None:
                pass

        fake = ClearedAfterSend()
        with b._session_lock:
            b._session = fake
        assert fake.sent.wait(timeout=30.0)
        wait_until(lambda: b._session is not None, what="the heartbeat to re-join its session")
        assert crashed == [] and b._heartbeat.is_alive()


def test_a_closed_client_opens_no_connection_for_a_thread_that_asks_afterwards():
    """After close(), nothing of the client may reach the coordinator again: not a request from a thread
    that never had a connection, and not the heartbeat thread re-joining a session that close() cut under
    it (both open a new connection the same way, after close() has closed the ones it knew)."""
    with coordinator() as rc, closing_clients(rc.address, SECRET, settings=SETTINGS) as cs:
        a, b = cs.new(0), cs.new(1)
        a.join()
        b.join()
        _form(a, b)
        b.close(done=True)

        def only_site_0_connected() -> bool:
            return rc.call(lambda: len(rc.coordinator._tasks)) == len(a._channels)

        wait_until(only_site_0_connected, what="the coordinator to see site 1's connections close")
        requests = rc.call(lambda: rc.coordinator.requests)
        late = background(b.call, "status", retry_s=0.0)
        with pytest.raises(MembershipError, match="closed"):
            late.result()
        assert b._channels == [] and rc.call(lambda: rc.coordinator.requests) == requests
        wait_until(only_site_0_connected, what="no connection of site 1 left open")


def test_a_killed_worker_s_closed_connection_drops_its_site_at_once():
    with coordinator() as rc, closing_clients(rc.address, SECRET, settings=SETTINGS) as cs:
        a, b = cs.new(0), cs.new(1)
        a.join()
        b.join()
        _form(a, b)
        b.cut(True)  # no goodbye: as if the process had been killed
        b.close()
        wait_until(lambda: _status(rc)["sites"][1]["status"] == "gone", what="site 1 dropped")
        assert _status(rc)["sites"][1]["reason"] == "connection closed (the process ended or was killed)"
        assert a.quorum(0, round=0)["left"] == [1]


# -- quorums, votes and sums ------------------------------------------------------------------------------------

def test_a_vote_that_fails_is_retried_on_a_new_generation_and_commits():
    with coordinator() as rc, closing_clients(rc.address, SECRET, settings=SETTINGS) as cs:
        a, b = cs.new(0), cs.new(1)
        a.join()
        b.join()
        _form(a, b)
        assert _on_each(lambda c: c.quorum(5, round=5), a, b) == [
            {"gen": 0, "members": [0, 1], "left": [], "admit": False}] * 2
        calls = [background(a.vote, 5, gen=0, attempt=0, phase="commit", ok=True, stats=[1.0, 2.0]),
                 background(b.vote, 5, gen=0, attempt=0, phase="commit", ok=False, stats=[3.0, 4.0],
                            error="the update from site 0 did not decode")]
        failed = [c.result() for c in calls]
        assert failed == [{"commit": False, "failed": [1], "gone": [], "stats": [4.0, 6.0],
                           "errors": {"site 1 worker 0": "the update from site 0 did not decode"}}] * 2
        retry = _on_each(lambda c: c.quorum(5, round=5, attempt=1), a, b)
        assert retry == [{"gen": 1, "members": [0, 1], "left": [], "admit": False}] * 2
        assert a.view.gen == b.view.gen == 1
        calls = [background(c.vote, 5, gen=1, attempt=1, phase="commit", ok=True) for c in (a, b)]
        assert [c.result()["commit"] for c in calls] == [True, True]
        # each client remembers the decisions it received (reported to a restarted coordinator)
        assert [(d["kind"], d["key"]) for d in a.view.decisions] == [
            ("quorum", [5, 0]), ("vote", [0, 5, 0, "commit"]), ("quorum", [5, 1]), ("vote", [1, 5, 1, "commit"])]


def test_sums_run_per_worker_index_and_a_site_s_first_finished_worker_does_not_end_the_site():
    """Two workers per site. A worker that finishes first says done and closes its connections while its
    site's other worker is still working; the site must stay in the run until that one is done too."""
    with coordinator() as rc, closing_clients(rc.address, SECRET, settings=SETTINGS, workers=2) as cs:
        workers = {(k, w): cs.new(k, w) for k in (0, 1) for w in (0, 1)}
        for c in workers.values():
            c.join()
        _form(*workers.values())
        sums = {kw: background(c.sum, "eval/0", [float(kw[0]), 10.0 * kw[1]]) for kw, c in workers.items()}
        results = {kw: s.result() for kw, s in sums.items()}
        assert results == {(0, 0): [1.0, 0.0], (1, 0): [1.0, 0.0], (0, 1): [1.0, 20.0], (1, 1): [1.0, 20.0]}

        tasks_before = rc.call(lambda: len(rc.coordinator._tasks))
        connections = len(workers[(0, 1)]._channels)
        workers[(0, 1)].close(done=True)
        wait_until(lambda: rc.call(lambda: len(rc.coordinator._tasks)) == tasks_before - connections,
                   what="the coordinator to see the finished worker's connections close")
        assert _status(rc)["sites"][0]["status"] == "member"
        assert _events(rc) == [(0, "joined"), (1, "joined")]

        # the site's remaining worker still takes part in its worker index's sums, then finishes the site
        final = [background(workers[kw].sum, "final", [5.0]) for kw in ((0, 0), (1, 0))]
        assert [f.result() for f in final] == [[10.0], [10.0]]
        workers[(0, 0)].close(done=True)
        assert _status(rc)["sites"][0]["status"] == "finished" and _status(rc)["finished"] is False
        workers[(1, 1)].close(done=True)
        workers[(1, 0)].close(done=True)
        assert _status(rc)["finished"] is True
        assert _events(rc) == [(0, "joined"), (1, "joined")]


# -- a coordinator restart --------------------------------------------------------------------------------------

def _first_coordinator(stack: contextlib.ExitStack) -> tuple[RunningCoordinator, Any]:
    """A coordinator and a function that stops it (once; ``stack`` stops it if the test does not)."""
    manager = serving(SECRET, now=FakeClock())
    first = manager.__enter__()
    stopped: list[bool] = []

    def stop() -> None:
        if not stopped:
            stopped.append(True)
            manager.__exit__(None, None, None)

    stack.callback(stop)
    return first, stop


def test_a_new_coordinator_on_the_same_port_and_secret_adopts_the_membership_the_sites_report():
    with contextlib.ExitStack() as stack:
        first, stop_first = _first_coordinator(stack)
        cs = stack.enter_context(closing_clients(first.address, SECRET, settings=SETTINGS))
        a, b = cs.new(0), cs.new(1)
        a.join()
        b.join()
        _form(a, b)
        _on_each(lambda c: c.quorum(0, round=0), a, b)
        launch = first.call(lambda: first.coordinator.launch)
        stop_first()

        second = stack.enter_context(serving(SECRET, port=first.port, now=FakeClock()))
        assert second.port == first.port
        replies = _on_each(lambda c: c.quorum(1, round=1), a, b)
        assert replies == [{"gen": 0, "members": [0, 1], "left": [], "admit": False}] * 2
        c = second.coordinator
        assert second.call(lambda: (c.gen, c.members, c.formed, c.launch, c.round, c.adopted_at is not None)) == (
            0, [0, 1], True, launch, 1, True)
        assert [s["status"] for s in _status(second)["sites"].values()] == ["member", "member"]
        votes = [background(x.vote, 1, gen=0, attempt=0, phase="commit", ok=True) for x in (a, b)]
        assert [v.result()["commit"] for v in votes] == [True, True]


def test_a_site_that_died_while_the_coordinator_was_down_is_dropped_after_twice_the_heartbeat_timeout():
    clock = FakeClock()
    with contextlib.ExitStack() as stack:
        first, stop_first = _first_coordinator(stack)
        cs = stack.enter_context(closing_clients(first.address, SECRET, settings=SETTINGS))
        a, b = cs.new(0), cs.new(1)
        a.join()
        b.join()
        _form(a, b)
        stop_first()
        b.cut(True)  # site 1 dies during the outage: it never comes back
        b.close()

        second = stack.enter_context(serving(SECRET, port=first.port, now=clock))
        t0 = clock()
        quorum = background(a.quorum, 1, round=1)
        wait_until(lambda: second.call(lambda: bool(second.coordinator.barriers["quorum"].get((1, 0)))),
                   what="site 0 to reach the quorum of sync 1 on the new coordinator")
        assert second.call(lambda: second.coordinator.adopted_at) == t0
        for _ in range(3):  # site 0 heartbeats at each step, so only site 1's absence counts
            t = clock.advance(6.0)
            wait_until(lambda: _last_seen(second, 0) == t, what="a heartbeat from site 0 at the new time")
        clock.advance(2.0)  # exactly twice the heartbeat timeout since the adoption: site 1 still has time
        second.call(second.coordinator.tick)
        assert _status(second)["sites"][1]["status"] == "member" and not quorum.done()
        clock.advance(0.25)
        second.call(second.coordinator.tick)
        assert quorum.result() == {"gen": 1, "members": [0], "left": [1], "admit": False}
        assert _status(second)["sites"][1]["reason"] == "did not reconnect after the coordinator restarted"
        assert _events(second) == [(1, "left")]


# -- per-thread channels and the store --------------------------------------------------------------------------

def test_a_request_blocked_on_one_thread_does_not_hold_up_another_thread_s():
    with coordinator() as rc, closing_clients(rc.address, SECRET, settings=SETTINGS) as cs:
        a = cs.new(0)
        a.join()
        waiting = background(a.call, "get", key="later", timeout=30.0)
        wait_until(lambda: rc.call(lambda: "later" in rc.coordinator._store_waiters), what="the get to wait")
        assert a.call("set", key="later", value="beef") == {"ok": True}  # this thread's own channel
        assert waiting.result() == {"value": "beef"}
        assert len(a._channels) == 3  # the session, the background thread's, this thread's


def test_the_coordinator_store_sets_gets_adds_waits_swaps_and_deletes():
    with coordinator() as rc, closing_clients(rc.address, SECRET, settings=SETTINGS) as cs:
        a, b = cs.new(0), cs.new(1)
        a.join()
        b.join()
        sa, sb = CoordinatorStore(a, timeout_s=30.0), CoordinatorStore(b, timeout_s=30.0)
        assert sa.timeout == datetime.timedelta(seconds=30)
        sa.set("text", "héllo")
        sa.set("raw", b"\x00\x01\xff")
        assert sb.get("text") == "héllo".encode() and sb.get("raw") == b"\x00\x01\xff"
        assert [sa.add("count", 1), sb.add("count", 1), sb.add("count", 5)] == [1, 2, 7]
        assert sa.get("count") == b"7"
        assert sb.check(["text", "raw"]) is True and sb.check(["text", "absent"]) is False
        waiting = background(sb.wait, ["late/0", "late/1"])
        wait_until(lambda: rc.call(lambda: "late/0" in rc.coordinator._store_waiters), what="the wait to start")
        sa.set("late/0", b"0")
        sa.set("late/1", b"1")
        waiting.result()
        assert sa.compare_set("raw", b"wrong", b"new") == b"\x00\x01\xff"
        assert sa.compare_set("raw", b"\x00\x01\xff", b"new") == b"new"
        assert sa.num_keys() == 5
        assert sa.delete_key("raw") is True and sa.delete_key("raw") is False
        sb.set_timeout(datetime.timedelta(seconds=0.05))
        with pytest.raises(MembershipError, match="timed out waiting for key 'never'"):
            sb.get("never")
        with pytest.raises(MembershipError, match="timed out waiting for key 'never'"):
            sa.wait(["never"], datetime.timedelta(seconds=0.05))


def test_a_gloo_process_group_forms_over_the_coordinator_store_and_reduces():
    with coordinator() as rc, closing_clients(rc.address, SECRET, settings=SETTINGS) as cs:
        clients = [cs.new(k) for k in (0, 1)]
        for c in clients:
            c.join()

        def rank(k: int) -> tuple[list[float], list[float]]:
            torch.set_num_threads(1)
            # the Python store must outlive the group: gloo's C++ side calls back into this very object
            base = CoordinatorStore(clients[k], timeout_s=30.0)
            pg = dist.ProcessGroupGloo(dist.PrefixStore("cross/0/gen0/", base), k, 2, datetime.timedelta(seconds=30))
            summed = torch.tensor([1.0 + k, 10.0 * k, -2.0])
            pg.allreduce([summed]).wait()
            sent = torch.tensor([7.0, 8.0]) if k == 0 else torch.zeros(2)
            pg.broadcast(sent, 0).wait()
            pg.barrier().wait()
            assert base.client is clients[k]
            return summed.tolist(), sent.tolist()

        ranks = [background(rank, k) for k in (0, 1)]
        assert [r.result(60) for r in ranks] == [([3.0, 10.0, -4.0], [7.0, 8.0])] * 2
        keys = rc.call(lambda: sorted(rc.coordinator.store))
        assert keys and all(k.startswith("cross/0/gen0/") for k in keys)
