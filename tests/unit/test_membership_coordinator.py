"""The coordinator's state machine, driven in-process: joins and refusals, formation, quorums, votes,
admissions, sums, heartbeats, the store, events and the adoption of membership after a restart.

No sockets: each test runs on its own event loop, joins workers directly (with a stand-in for the session
connection) and sends requests as the connection handler would. Time is a clock the test moves by hand and
``tick()`` is called by the test, so every deadline is exact arithmetic that no machine load can change.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from _utils.membership import FakeClock
from geotrain.membership.coordinator import Coordinator, Refused
from geotrain.membership.fingerprint import fingerprint

pytestmark = pytest.mark.timeout(60)

SECRET = b"s" * 32
SETTINGS = {"heartbeat_timeout_s": 10.0, "quorum_timeout_s": 60.0, "join_timeout_s": 100.0}
QUIET = {"heartbeat_timeout_s": 1000.0}
"""For tests of the other deadlines: every worker heartbeats all along, so silence never drops a site."""
WALL = 1_800_000_000.0


def in_loop(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on a fresh event loop, with a bound that only a hang can reach."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), timeout=30))

    return run


async def settle() -> None:
    """Let every runnable task take its next steps (requests arrive, decisions reach their waiters)."""
    for _ in range(10):
        await asyncio.sleep(0)


class Session:
    """Stands in for the writer of a worker's session connection; the coordinator closes it to cut a worker."""

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class Run:
    """One coordinator, its clock, and the requests of the test's workers."""

    def __init__(self, *, sites: int = 2, workers: int = 1, settings: dict[str, Any] | None = None,
                 events_path: Any = None) -> None:
        self.clock = FakeClock()
        self.sites, self.workers = sites, workers
        self.settings = {**SETTINGS, **(settings or {})}
        self.c = Coordinator(SECRET, now=self.clock, wall=lambda: WALL, events_path=events_path)
        self.sessions: dict[tuple[int, int], Session] = {}

    def message(self, site: int, worker: int = 0, **overrides: Any) -> dict[str, Any]:
        msg = {"op": "join", "site": site, "worker": worker, "sites": self.sites, "workers": self.workers,
               "incarnation": f"site{site}-worker{worker}", "intent": "start", "fingerprint": None,
               "settings": self.settings, "view": {}, "resume_rounds": []}
        msg.update(overrides)
        return msg

    def join(self, site: int, worker: int = 0, **overrides: Any) -> dict[str, Any]:
        session = Session()
        reply = self.c.join(self.message(site, worker, **overrides), session)
        self.sessions[(site, worker)] = session
        return reply

    def join_all(self, sites: list[int] | range, **overrides: Any) -> None:
        for k in sites:
            for w in range(self.workers):
                self.join(k, w, **overrides)

    def ask(self, site: int, op: str, /, *, worker: int = 0, **fields: Any) -> asyncio.Task:
        return asyncio.get_running_loop().create_task(self.c.request((site, worker), {"op": op, **fields}))

    def ask_all(self, sites: list[int] | range, op: str, **fields: Any) -> list[asyncio.Task]:
        return [self.ask(k, op, worker=w, **fields) for k in sites for w in range(self.workers)]

    async def answers(self, tasks: list[asyncio.Task]) -> list[dict[str, Any]]:
        await settle()
        assert all(t.done() for t in tasks), "a request is still waiting"
        return [t.result() for t in tasks]

    async def form(self, sites: list[int] | range | None = None) -> dict[str, Any]:
        sites = range(self.sites) if sites is None else sites
        self.join_all(sites)
        replies = await self.answers(self.ask_all(sites, "form"))
        assert all(r == replies[0] for r in replies)
        return replies[0]

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.c.tick()

    def status(self, site: int) -> str:
        return self.c.sites[site].status

    def events(self, kind: str | None = None) -> list[tuple[int, str]]:
        return [(e["site"], e["kind"]) for e in self.c.events if kind is None or e["kind"] == kind]


def _fp(params: list[tuple[str, list[int], str]], **settings: Any) -> dict[str, Any]:
    return fingerprint(params, {"run": {"seed": 1, "sites": 2}, "outer": {"lr": 0.7}, **settings})


PARAMS = [("w", [8, 8], "float32"), ("b", [8], "float32")]


# -- joining and refusals ---------------------------------------------------------------------------------------

def test_the_first_join_sets_the_shape_of_the_run_and_its_settings():
    r = Run(sites=3, workers=2, settings={"min_sites": 2})
    reply = r.join(1, 1)
    assert reply == {"ok": True, "status": "waiting", "gen": -1, "members": [], "formed": False}
    assert (r.c.sites_max, r.c.workers, r.c.min_sites) == (3, 2, 2)
    assert (r.c.heartbeat_timeout, r.c.quorum_timeout, r.c.join_timeout) == (10.0, 60.0, 100.0)
    # a later site's settings do not change the run's
    r.join(0, 0, settings={"heartbeat_timeout_s": 99.0})
    assert r.c.heartbeat_timeout == 10.0


@pytest.mark.parametrize("value, expected", [(2.5, 2.5), (7, 7.0), (-1.0, 10.0), (0, 10.0), (math.nan, 10.0),
                                             (math.inf, 10.0), ("5", 10.0), (None, 10.0)])
def test_a_deadline_setting_that_is_not_a_positive_number_falls_back_to_its_default(value, expected):
    r = Run()
    r.join(0, settings={"heartbeat_timeout_s": value})
    assert r.c.heartbeat_timeout == expected


@pytest.mark.parametrize("sites, workers, said", [(3, 1, "3 sites of 1 workers"), (2, 2, "2 sites of 2 workers")])
def test_a_site_that_disagrees_on_the_shape_of_the_run_is_refused(sites, workers, said):
    r = Run()
    r.join(0)
    with pytest.raises(Refused) as info:
        r.join(1, sites=sites, workers=workers)
    assert str(info.value) == f"this run has 2 sites of 1 workers; this site says {said}"
    assert sorted(r.c.sites) == [0]


@pytest.mark.parametrize("site, worker, message", [
    (2, 0, "site rank 2 is out of range: this run's sites are 0 to 1"),
    (-1, 0, "site rank -1 is out of range: this run's sites are 0 to 1"),
    (0, 1, "worker 1 is out of range: sites have workers 0 to 0"),
])
def test_an_out_of_range_site_or_worker_is_refused(site, worker, message):
    r = Run()
    r.join(0)
    with pytest.raises(Refused) as info:
        r.join(site, worker)
    assert str(info.value) == message
    assert sorted(r.c.sites) == [0] and sorted(r.c.sites[0].workers) == [0]


@pytest.mark.parametrize("theirs, difference", [
    ([("w", [8, 4], "float32"), ("b", [8], "float32")],
     "parameter 'w' is (8, 4) float32 here and (8, 8) float32 in the run"),
    ([("w", [8, 8], "bfloat16"), ("b", [8], "float32")],
     "parameter 'w' is (8, 8) bfloat16 here and (8, 8) float32 in the run"),
    ([("w", [8, 8], "float32")], "its model has no parameter 'b' (the run's model has 2 parameters, this site's 1)"),
    (PARAMS + [("extra", [1], "float32")], "its model has a parameter 'extra' that the run's model lacks"),
    (list(reversed(PARAMS)), "its model lists the same parameters in another order"),
])
def test_a_site_with_another_model_is_refused_naming_the_first_difference(theirs, difference):
    r = Run()
    r.join(0, fingerprint=_fp(PARAMS))
    with pytest.raises(Refused) as info:
        r.join(1, fingerprint=_fp(theirs))
    assert str(info.value) == f"site 1 does not match the run: {difference}"
    assert sorted(r.c.sites) == [0]
    r.join(1, fingerprint=_fp(PARAMS))  # the same model is welcome
    assert sorted(r.c.sites) == [0, 1]


def test_a_site_with_other_shared_settings_is_refused_naming_the_setting_and_both_values():
    r = Run()
    r.join(0, fingerprint=_fp(PARAMS))
    with pytest.raises(Refused) as info:
        r.join(1, fingerprint=_fp(PARAMS, outer={"lr": 0.5}))
    assert str(info.value) == "site 1 does not match the run: setting outer.lr is 0.5 here and 0.7 in the run"
    with pytest.raises(Refused, match="one side sent no model fingerprint"):
        r.join(1, fingerprint=None)


def test_a_second_process_with_the_same_site_rank_is_refused_while_the_first_is_alive():
    r = Run()
    r.join(0)
    first = r.sessions[(0, 0)]
    r.clock.advance(10.0)  # exactly the heartbeat timeout since it was last seen: still alive
    with pytest.raises(Refused) as info:
        r.join(0, incarnation="another-process")
    assert str(info.value) == ("site 0 worker 0 is already in the run (a duplicate site rank?); give each site its "
                               "own --site-rank")
    assert r.c.sites[0].workers[0].incarnation == "site0-worker0" and not first.closed
    # the same process joining again (a new session after a broken one) is no duplicate
    assert r.join(0)["ok"] is True


def test_a_process_silent_past_the_heartbeat_timeout_is_replaced_by_a_new_one_with_its_rank():
    r = Run()
    r.join(0)
    first = r.sessions[(0, 0)]
    r.clock.advance(10.25)
    reply = r.join(0, incarnation="restarted")
    assert reply["status"] == "waiting"
    assert first.closed and r.c.sites[0].workers[0].incarnation == "restarted"


@in_loop
async def test_a_site_cannot_join_a_run_that_has_finished():
    r = Run()
    await r.form()
    assert await r.answers([r.ask(0, "done"), r.ask(1, "done")]) == [{"ok": True}, {"ok": True}]
    assert r.c.finished and r.status(0) == r.status(1) == "finished"
    with pytest.raises(Refused) as info:
        r.join(1, incarnation="late")
    assert str(info.value) == "the run has finished; start a new coordinator for a new run"


@in_loop
async def test_a_joiner_still_waiting_when_the_run_finishes_is_told_so():
    r = Run(sites=3)
    await r.form([0, 1, 2])
    r.ask(2, "leave")
    await settle()
    r.join(2, incarnation="back")
    waiting = r.ask(2, "await_admission")
    await settle()
    assert not waiting.done()
    await r.answers([r.ask(0, "done"), r.ask(1, "done")])
    assert (await r.answers([waiting]))[0] == {"error": "the run finished before this site could be admitted",
                                               "finished": True}


@in_loop
async def test_a_worker_this_coordinator_has_not_seen_is_asked_to_join_and_a_dropped_one_is_evicted():
    r = Run()
    (reply,) = await r.answers([r.ask(0, "quorum", sync=0)])
    assert reply == {"rejoin": "site 0 worker 0 has not joined this coordinator"}
    await r.form()
    await r.answers([r.ask(1, "leave", reason="maintenance")])
    (reply,) = await r.answers([r.ask(1, "quorum", sync=0)])
    assert reply == {"evicted": "site 1 is no longer in the run (maintenance); it must join again"}
    (reply,) = await r.answers([r.ask(0, "no-such-op")])
    assert reply == {"error": "unknown request 'no-such-op'"}


# -- formation --------------------------------------------------------------------------------------------------

@in_loop
async def test_the_first_generation_forms_when_every_site_has_asked():
    r = Run(sites=3)
    r.join_all([0, 1, 2])
    early = r.ask_all([2, 0], "form")
    await settle()
    assert not any(t.done() for t in early) and not r.c.formed
    replies = await r.answers(early + r.ask_all([1], "form"))
    assert replies == [{"gen": 0, "members": [0, 1, 2], "resume_round": None, "launch": r.c.launch}] * 3
    assert r.c.formed and [r.status(k) for k in range(3)] == ["member"] * 3
    assert r.events() == [(0, "joined"), (1, "joined"), (2, "joined")]
    assert all(e["generation"] == 0 and e["time"] == WALL for e in r.c.events)
    # asked again (a retried request): the same answer
    assert (await r.answers(r.ask_all([1], "form"))) == replies[:1]


@in_loop
async def test_a_site_forms_only_when_all_of_its_workers_have_asked():
    r = Run(workers=2)
    r.join_all([0, 1])
    tasks = [r.ask(0, "form", worker=0), r.ask(0, "form", worker=1), r.ask(1, "form", worker=0)]
    await settle()
    assert not any(t.done() for t in tasks)
    replies = await r.answers(tasks + [r.ask(1, "form", worker=1)])
    assert {json.dumps(x, sort_keys=True) for x in replies} == {
        json.dumps({"gen": 0, "members": [0, 1], "resume_round": None, "launch": r.c.launch}, sort_keys=True)}


@in_loop
async def test_with_min_sites_the_run_forms_without_the_missing_site_exactly_at_the_join_timeout():
    r = Run(sites=3, settings={"min_sites": 2, **QUIET})
    r.join_all([0, 1])
    tasks = r.ask_all([0, 1], "form")  # the barrier's deadline: now + join_timeout_s = +100 s
    await settle()
    r.advance(99.75)
    await settle()
    assert not any(t.done() for t in tasks)
    r.advance(0.25)
    replies = await r.answers(tasks)
    assert replies[0] == replies[1] == {"gen": 0, "members": [0, 1], "resume_round": None, "launch": r.c.launch}
    # the third site comes later: it waits, and the members admit it at a round boundary, healed by site 0
    reply = r.join(2)
    assert reply == {"ok": True, "status": "waiting", "gen": 0, "members": [0, 1], "formed": True}
    waiting = r.ask(2, "await_admission")
    await settle()
    assert not waiting.done()
    admitted = await r.answers(r.ask_all([0, 1], "admit", sync=4) + [waiting])
    expected = {"gen": 1, "members": [0, 1, 2], "joined": [2], "healer": 0, "launch": r.c.launch}
    assert admitted == [expected, expected, {**expected, "position": None}]
    assert r.events()[-1] == (2, "joined") and r.c.events[-1]["healed_from"] == 0


@in_loop
async def test_too_few_sites_by_the_join_timeout_is_an_error_that_names_the_setting():
    r = Run(sites=3, settings={"min_sites": 2, **QUIET})
    r.join_all([0, 1])
    tasks = r.ask_all([0], "form")  # site 1 joined but never asked: it is not ready
    await settle()
    r.advance(100.0)
    (reply,) = await r.answers(tasks)
    assert reply == {"error": "only 1 of 3 sites joined within 100 s (membership.min_sites is 2); start the "
                              "missing sites or lower membership.min_sites"}
    assert not r.c.formed and r.c.gen == -1


@in_loop
async def test_a_resumed_run_forms_at_the_newest_round_every_site_holds():
    r = Run(sites=3)
    for k, rounds in enumerate([[2, 4, 6], [4, 6, 8], [0, 4, 6, 10]]):
        r.join(k, intent="resume", resume_rounds=rounds)
    replies = await r.answers(r.ask_all([0, 1, 2], "form"))
    assert [x["resume_round"] for x in replies] == [6, 6, 6] and replies[0]["gen"] == 0


@in_loop
async def test_sites_without_a_common_checkpoint_round_cannot_resume_and_each_site_s_rounds_are_named():
    r = Run(sites=3)
    r.join(0, intent="start")
    r.join(1, intent="resume", resume_rounds=[2, 4])
    r.join(2, intent="resume", resume_rounds=[4])
    replies = await r.answers(r.ask_all([0, 1, 2], "form"))
    assert replies == [{"error": "the sites hold no checkpoint of a common round: site 0: none; site 1: [2, 4]; "
                                 "site 2: [4]"}] * 3
    assert not r.c.formed


# -- quorums ----------------------------------------------------------------------------------------------------

@in_loop
async def test_a_quorum_with_every_member_keeps_the_generation_and_is_answered_the_same_every_time():
    r = Run(workers=2)
    await r.form()
    tasks = r.ask_all([0], "quorum", sync=3, round=3) + [r.ask(1, "quorum", worker=0, sync=3, round=3)]
    await settle()
    assert not any(t.done() for t in tasks)  # site 1's worker 1 is missing
    replies = await r.answers(tasks + [r.ask(1, "quorum", worker=1, sync=3, round=3)])
    assert replies == [{"gen": 0, "members": [0, 1], "left": [], "admit": False}] * 4
    assert r.c.round == 3
    again = await r.answers([r.ask(0, "quorum", sync=3, round=3)])
    assert again == replies[:1]


@in_loop
async def test_a_quorum_after_a_site_left_starts_a_generation_without_it():
    r = Run(sites=3)
    await r.form()
    await r.answers([r.ask(1, "leave", reason="drained for maintenance")])
    assert r.status(1) == "gone" and r.sessions[(1, 0)].closed
    assert r.c.events[-1] == {"site": 1, "kind": "left", "round": 0, "time": WALL, "generation": 0,
                              "reason": "drained for maintenance"}
    replies = await r.answers(r.ask_all([0, 2], "quorum", sync=0))
    assert replies == [{"gen": 1, "members": [0, 2], "left": [1], "admit": False}] * 2
    assert r.c.gen_members == {0: [0, 1, 2], 1: [0, 2]}


@in_loop
async def test_a_member_that_does_not_reach_a_sync_by_the_quorum_timeout_is_dropped_and_named():
    r = Run(sites=3, settings=QUIET)
    await r.form()
    tasks = r.ask_all([0, 2], "quorum", sync=7)  # deadline: +60 s
    await settle()
    r.advance(59.75)
    await settle()
    assert not any(t.done() for t in tasks) and r.status(1) == "member"
    r.advance(0.25)
    replies = await r.answers(tasks)
    assert replies == [{"gen": 1, "members": [0, 2], "left": [1], "admit": False}] * 2
    assert r.c.sites[1].reason == "did not reach sync 7 within membership.quorum_timeout_s=60 s"
    assert r.events("left") == [(1, "left")] and r.sessions[(1, 0)].closed
    (late,) = await r.answers([r.ask(1, "quorum", sync=7)])
    assert late["evicted"].startswith("site 1 is no longer in the run (did not reach sync 7")


@in_loop
async def test_a_retried_attempt_always_gets_a_new_generation_even_with_the_same_members():
    r = Run()
    await r.form()
    first = await r.answers(r.ask_all([0, 1], "quorum", sync=2, attempt=0))
    retry = await r.answers(r.ask_all([0, 1], "quorum", sync=2, attempt=1))
    assert first[0] == {"gen": 0, "members": [0, 1], "left": [], "admit": False}
    assert retry == [{"gen": 1, "members": [0, 1], "left": [], "admit": False}] * 2
    assert r.c.gen_members == {0: [0, 1], 1: [0, 1]}


@in_loop
async def test_a_waiting_site_cannot_take_part_in_a_quorum_or_an_admission():
    r = Run(sites=3, settings={"min_sites": 2, **QUIET})
    r.join_all([0, 1])
    tasks = r.ask_all([0, 1], "form")
    await settle()
    r.advance(100.0)
    await r.answers(tasks)
    r.join(2)
    for op, fields in (("quorum", {"sync": 0}), ("admit", {"sync": 0})):
        (reply,) = await r.answers([r.ask(2, op, **fields)])
        assert reply == {"evicted": "site 2 is not a member of the run; it must join again"}


@in_loop
async def test_below_min_sites_a_quorum_waits_for_a_joiner_to_make_up_the_minimum():
    r = Run(sites=3, settings={"min_sites": 2, **QUIET})
    r.join_all([0, 1])
    formed = r.ask_all([0, 1], "form")
    await settle()
    r.advance(100.0)
    await r.answers(formed)
    await r.answers([r.ask(1, "leave")])
    quorum = r.ask(0, "quorum", sync=5)
    await settle()
    r.advance(60.0)  # past the quorum timeout: site 0 arrived, so nobody is dropped; it waits for a joiner
    await settle()
    assert not quorum.done() and r.status(0) == "member"
    r.join(2)
    await settle()
    assert not quorum.done()  # joined, but not yet asking to be admitted (and healed)
    waiting = r.ask(2, "await_admission")
    (reply,) = await r.answers([quorum])
    assert reply == {"gen": 1, "members": [0], "left": [1], "admit": True}
    (admitted,) = await r.answers([r.ask(0, "admit", sync=5)])
    assert (admitted["members"], admitted["joined"], admitted["healer"]) == ([0, 2], [2], 0)
    assert (await r.answers([waiting]))[0]["healer"] == 0


@in_loop
async def test_below_min_sites_with_no_joiner_by_the_join_timeout_the_quorum_fails_with_the_reason():
    r = Run(settings={"min_sites": 2, **QUIET})
    await r.form()
    await r.answers([r.ask(1, "leave")])
    quorum = r.ask(0, "quorum", sync=5)  # started now; the join timeout counts from here
    await settle()
    r.advance(99.75)
    await settle()
    assert not quorum.done()
    r.advance(0.25)
    (reply,) = await r.answers([quorum])
    assert reply == {"error": "1 sites left, fewer than membership.min_sites=2, and no site joined within 100 s"}


# -- votes ------------------------------------------------------------------------------------------------------

@in_loop
async def test_a_vote_everyone_passes_commits_sums_the_statistics_and_keeps_the_data_positions():
    r = Run(workers=2)
    await r.form()
    fields = {"gen": 0, "sync": 1, "attempt": 0, "phase": "commit", "ok": True}
    tasks = [r.ask(k, "vote", worker=w, **fields, stats=[1.0 + k, 10.0 * w], position={"batch": 10 * k + w})
             for k in (0, 1) for w in (0, 1)]
    replies = await r.answers(tasks)
    assert replies == [{"commit": True, "failed": [], "gone": [], "stats": [1.0 + 1.0 + 2.0 + 2.0, 20.0],
                        "errors": {}}] * 4
    assert r.c.positions == {"0/0": {"batch": 0}, "0/1": {"batch": 1}, "1/0": {"batch": 10}, "1/1": {"batch": 11}}


@in_loop
async def test_a_vote_waits_for_every_worker_of_every_member_of_its_generation():
    r = Run(workers=2)
    await r.form()
    fields = {"gen": 0, "sync": 1, "attempt": 0, "phase": "commit", "ok": True}
    tasks = [r.ask(0, "vote", worker=0, **fields), r.ask(0, "vote", worker=1, **fields),
             r.ask(1, "vote", worker=1, **fields)]
    await settle()
    assert not any(t.done() for t in tasks)
    replies = await r.answers(tasks + [r.ask(1, "vote", worker=0, **fields)])
    assert all(x["commit"] is True for x in replies)


@in_loop
async def test_a_failed_vote_names_the_site_keeps_no_position_and_a_retry_on_a_new_generation_commits():
    r = Run()
    await r.form()
    await r.answers(r.ask_all([0, 1], "quorum", sync=3))
    failed = await r.answers([
        r.ask(0, "vote", gen=0, sync=3, attempt=0, phase="commit", ok=True, position={"batch": 1}),
        r.ask(1, "vote", gen=0, sync=3, attempt=0, phase="commit", ok=False, error="a NaN in the update",
              position={"batch": 2}),
    ])
    assert failed == [{"commit": False, "failed": [1], "gone": [], "stats": None,
                       "errors": {"site 1 worker 0": "a NaN in the update"}}] * 2
    assert r.c.positions == {}  # positions are kept only from a committed sync
    retry = await r.answers(r.ask_all([0, 1], "quorum", sync=3, attempt=1))
    assert retry == [{"gen": 1, "members": [0, 1], "left": [], "admit": False}] * 2
    committed = await r.answers([r.ask(k, "vote", gen=1, sync=3, attempt=1, phase="commit", ok=True,
                                       position={"batch": 5 + k}) for k in (0, 1)])
    assert committed == [{"commit": True, "failed": [], "gone": [], "stats": None, "errors": {}}] * 2
    assert r.c.positions == {"0/0": {"batch": 5}, "1/0": {"batch": 6}}


@in_loop
async def test_the_phases_of_one_sync_are_separate_votes():
    r = Run()
    await r.form()
    guard = await r.answers([r.ask(k, "vote", gen=0, sync=0, attempt=0, phase="guard", ok=True, stats=[float(k)])
                             for k in (0, 1)])
    commit = r.ask(0, "vote", gen=0, sync=0, attempt=0, phase="commit", ok=False)
    await settle()
    assert not commit.done()  # the guard phase's decision is not the commit phase's
    replies = await r.answers([commit, r.ask(1, "vote", gen=0, sync=0, attempt=0, phase="commit", ok=True)])
    assert guard[0]["commit"] is True and guard[0]["stats"] == [1.0]
    assert replies[0]["commit"] is False and replies[0]["failed"] == [0]


@in_loop
async def test_a_vote_on_a_generation_this_coordinator_never_saw_fails():
    r = Run()
    await r.form()
    (reply,) = await r.answers([r.ask(0, "vote", gen=7, sync=0, ok=True)])
    assert reply == {"commit": False, "failed": [], "gone": [], "stats": None,
                     "errors": {"coordinator": "generation 7 is not known here (it restarted)"}}


@in_loop
async def test_a_voter_silent_past_the_transfer_deadline_is_dropped_and_the_vote_fails():
    r = Run(sites=3, settings=QUIET)
    await r.form()
    tasks = [r.ask(k, "vote", gen=0, sync=4, ok=True, deadline_s=30.0) for k in (0, 2)]
    await settle()
    r.advance(29.75)
    await settle()
    assert not any(t.done() for t in tasks)
    r.advance(0.25)
    replies = await r.answers(tasks)
    assert replies == [{"commit": False, "failed": [1], "gone": [1], "stats": None, "errors": {}}] * 2
    assert r.c.sites[1].reason == "did not vote on sync 4 within its transfer deadline"


@in_loop
async def test_a_vote_deadline_is_never_shorter_than_one_second():
    r = Run()
    await r.form()
    task = r.ask(0, "vote", gen=0, sync=0, ok=True, deadline_s=0.25)
    await settle()
    r.advance(0.5)
    await settle()
    assert not task.done()
    r.advance(0.5)
    (reply,) = await r.answers([task])
    assert reply["commit"] is False and reply["gone"] == [1]


@in_loop
async def test_a_voter_that_leaves_during_the_vote_fails_it_at_once():
    r = Run()
    await r.form()
    voted = r.ask(0, "vote", gen=0, sync=0, ok=True)
    await settle()
    assert not voted.done()
    await r.answers([r.ask(1, "leave")])
    (reply,) = await r.answers([voted])
    assert reply == {"commit": False, "failed": [1], "gone": [1], "stats": None, "errors": {}}


# -- admissions -------------------------------------------------------------------------------------------------

@in_loop
async def test_a_site_that_comes_back_is_admitted_healed_by_a_live_peer_and_resumes_its_own_data_position():
    r = Run(workers=2)
    await r.form()
    await r.answers([r.ask(k, "vote", worker=w, gen=0, sync=0, ok=True, position={"site": k, "worker": w, "batch": 9})
                     for k in (0, 1) for w in (0, 1)])
    await r.answers([r.ask(1, "leave", reason="killed")])
    assert (await r.answers(r.ask_all([0], "quorum", sync=1)))[0]["members"] == [0]
    for w in (0, 1):
        reply = r.join(1, w, intent="rejoin", incarnation=f"second-{w}")
        assert reply["status"] == "waiting"
    waiting = [r.ask(1, "await_admission", worker=w) for w in (0, 1)]
    await settle()
    assert not any(t.done() for t in waiting)
    admitted = await r.answers(r.ask_all([0], "admit", sync=1, round=1))
    expected = {"gen": 2, "members": [0, 1], "joined": [1], "healer": 0, "launch": r.c.launch}
    assert admitted == [expected, expected]
    joiner = await r.answers(waiting)
    assert joiner == [{**expected, "position": {"site": 1, "worker": w, "batch": 9}} for w in (0, 1)]
    assert r.events() == [(0, "joined"), (1, "joined"), (1, "left"), (1, "rejoined")]
    assert r.c.events[-1]["healed_from"] == 0 and r.c.events[-1]["generation"] == 2
    # asked again after admission, the site is told it is a member
    (again,) = await r.answers([r.ask(1, "await_admission")])
    assert again == {"gen": 2, "members": [0, 1], "joined": [], "healer": None, "launch": r.c.launch}


@in_loop
async def test_a_site_is_admitted_only_once_every_one_of_its_workers_asks_to_be():
    """A dropped site's sessions can come back on their own (its heartbeat threads re-join) while its
    training threads are still mid-round. Such a site is not ready to take a healer's state: admitting it
    would make it a member that was never healed, and its training would never learn it had been dropped."""
    r = Run(workers=2)
    await r.form()
    await r.answers([r.ask(1, "leave")])
    await r.answers(r.ask_all([0], "quorum", sync=1))
    for w in (0, 1):
        assert r.join(1, w, intent="member", incarnation=f"b{w}")["status"] == "waiting"
    assert await r.answers(r.ask_all([0], "quorum", sync=2)) == [
        {"gen": 1, "members": [0], "left": [], "admit": False}] * 2
    asking = [r.ask(1, "await_admission", worker=0)]
    none = await r.answers(r.ask_all([0], "admit", sync=2))
    assert none == [{"gen": 1, "members": [0], "joined": [], "healer": None, "launch": r.c.launch}] * 2
    asking.append(r.ask(1, "await_admission", worker=1))
    assert (await r.answers(r.ask_all([0], "quorum", sync=3)))[0]["admit"] is True
    admitted = await r.answers(r.ask_all([0], "admit", sync=3))
    expected = {"gen": 2, "members": [0, 1], "joined": [1], "healer": 0, "launch": r.c.launch}
    assert admitted == [expected] * 2
    assert await r.answers(asking) == [{**expected, "position": None}] * 2
    assert r.events("rejoined") == [(1, "rejoined")]


@in_loop
async def test_the_healer_is_the_lowest_live_member():
    r = Run(sites=3)
    await r.form()
    await r.answers([r.ask(0, "leave"), r.ask(2, "leave")])
    await r.answers([r.ask(1, "quorum", sync=0)])
    r.join(2, incarnation="back")
    waiting = r.ask(2, "await_admission")
    (admitted,) = await r.answers([r.ask(1, "admit", sync=0)])
    assert admitted["healer"] == 1 and admitted["members"] == [1, 2] and admitted["joined"] == [2]
    assert (await r.answers([waiting]))[0]["healer"] == 1


@in_loop
async def test_an_admission_without_joiners_keeps_the_generation():
    r = Run()
    await r.form()
    replies = await r.answers(r.ask_all([0, 1], "admit", sync=3))
    assert replies == [{"gen": 0, "members": [0, 1], "joined": [], "healer": None, "launch": r.c.launch}] * 2
    assert r.c.gen == 0


@in_loop
async def test_a_member_that_does_not_reach_an_admission_in_time_is_dropped():
    r = Run(sites=3, settings=QUIET)
    await r.form()
    task = r.ask(0, "admit", sync=2)
    await settle()
    r.advance(60.0)
    await settle()
    assert r.status(1) == r.status(2) == "gone"
    assert r.c.sites[1].reason == "did not reach the admission within membership.quorum_timeout_s"
    (reply,) = await r.answers([task])
    assert (reply["gen"], reply["joined"], reply["healer"]) == (0, [], None)  # the next quorum names who left


@in_loop
async def test_a_joiner_is_told_when_no_live_site_is_left_to_heal_from():
    r = Run()
    await r.form()
    await r.answers([r.ask(0, "leave"), r.ask(1, "leave")])
    r.join(1, intent="rejoin", incarnation="back")
    (reply,) = await r.answers([r.ask(1, "await_admission")])
    assert reply == {"error": "no live site is left to heal from; resume the run from its last checkpoint with "
                              "geotrain run --resume"}


@in_loop
async def test_a_joiner_not_admitted_within_the_join_timeout_is_told_so():
    r = Run(settings=QUIET)
    await r.form()
    await r.answers([r.ask(1, "leave")])
    r.join(1, intent="rejoin", incarnation="back")
    waiting = r.ask(1, "await_admission")
    await settle()
    r.advance(100.0)
    await settle()
    assert not waiting.done()
    r.advance(0.25)
    (reply,) = await r.answers([waiting])
    assert reply == {"error": "not admitted within membership.join_timeout_s=100 s; is the run still making "
                              "progress?"}


# -- sums -------------------------------------------------------------------------------------------------------

@in_loop
async def test_a_sum_adds_each_member_s_values_per_worker_index():
    r = Run(sites=3, workers=2)
    await r.form()
    w0 = [r.ask(k, "sum", worker=0, name="eval/4", values=[float(k), 1.0]) for k in (0, 1)]
    w1 = [r.ask(k, "sum", worker=1, name="eval/4", values=[10.0 * k, 2.0]) for k in (0, 1, 2)]
    await settle()
    assert not any(t.done() for t in w0)  # worker 0 of site 2 is missing; worker 1's sum is its own
    assert all(t.done() for t in w1)
    assert [t.result() for t in w1] == [{"values": [30.0, 6.0], "sites": [0, 1, 2]}] * 3
    replies = await r.answers(w0 + [r.ask(2, "sum", worker=0, name="eval/4", values=[2.0, 1.0])])
    assert replies == [{"values": [3.0, 3.0], "sites": [0, 1, 2]}] * 3


@in_loop
async def test_a_sum_counts_a_member_that_contributed_and_then_left():
    r = Run(sites=3)
    await r.form()
    first = [r.ask(k, "sum", name="stop", values=[1.0]) for k in (0, 2)]
    await settle()
    await r.answers([r.ask(2, "leave")])
    await settle()
    assert not any(t.done() for t in first)
    replies = await r.answers(first + [r.ask(1, "sum", name="stop", values=[4.0])])
    assert replies == [{"values": [6.0], "sites": [0, 1, 2]}] * 3


@in_loop
async def test_a_member_silent_at_a_sum_past_the_quorum_timeout_is_dropped():
    r = Run(settings=QUIET)
    await r.form()
    task = r.ask(0, "sum", name="loss", values=[2.0])
    await settle()
    r.advance(59.75)
    await settle()
    assert not task.done()
    r.advance(0.25)
    (reply,) = await r.answers([task])
    assert reply == {"values": [2.0], "sites": [0]}
    assert r.c.sites[1].reason == "did not contribute to loss within membership.quorum_timeout_s"


@in_loop
async def test_a_site_is_finished_only_when_every_one_of_its_workers_has_said_done():
    r = Run(workers=2)
    await r.form()
    assert (await r.answers([r.ask(0, "done", worker=0)])) == [{"ok": True}]
    assert r.status(0) == "member" and not r.c.finished
    # the site's other worker still takes part: a sum of worker index 1 waits for it
    other = r.ask(1, "sum", worker=1, name="final", values=[1.0])
    await settle()
    assert not other.done()
    replies = await r.answers([other, r.ask(0, "sum", worker=1, name="final", values=[2.0])])
    assert replies == [{"values": [3.0], "sites": [0, 1]}] * 2
    await r.answers([r.ask(0, "done", worker=0)])  # a retried done counts once
    assert r.status(0) == "member"
    await r.answers([r.ask(0, "done", worker=1)])
    assert r.status(0) == "finished" and not r.c.finished
    assert r.c._alive_members() == [1]
    await r.answers(r.ask_all([1], "done"))
    assert r.status(1) == "finished" and r.c.finished
    assert r.events("left") == []


@in_loop
async def test_a_worker_that_said_done_and_stopped_heartbeating_does_not_drop_its_site():
    r = Run(workers=2)
    await r.form()
    await r.answers([r.ask(0, "done", worker=0)])
    # its process ended; the site's other worker and site 1 go on heartbeating
    r.clock.advance(8.0)
    await r.answers([r.ask(0, "heartbeat", worker=1)] + r.ask_all([1], "heartbeat"))
    r.advance(8.0)
    assert r.status(0) == "member" and r.events("left") == []
    await r.answers([r.ask(0, "done", worker=1)])
    assert r.status(0) == "finished"


# -- heartbeats -------------------------------------------------------------------------------------------------

@in_loop
async def test_a_worker_silent_for_longer_than_the_heartbeat_timeout_drops_its_site_exactly_then():
    r = Run(sites=3)
    await r.form()  # every worker last seen at t0
    r.clock.advance(6.0)
    assert await r.answers([r.ask(0, "heartbeat"), r.ask(2, "heartbeat")]) == [{"gen": 0}] * 2
    r.advance(4.0)  # site 1 silent for exactly 10 s: not yet
    assert [r.status(k) for k in range(3)] == ["member"] * 3
    r.advance(0.25)
    assert [r.status(k) for k in range(3)] == ["member", "gone", "member"]
    assert r.c.sites[1].reason == "no heartbeat from worker 0 for 10 s (membership.heartbeat_timeout_s)"
    assert r.sessions[(1, 0)].closed and not r.sessions[(0, 0)].closed
    assert r.events("left") == [(1, "left")]
    (reply,) = await r.answers([r.ask(1, "quorum", sync=0)])
    assert reply["evicted"].startswith("site 1 is no longer in the run (no heartbeat from worker 0")
    # sites 0 and 2 were seen 4.25 s ago; 5.75 s more and they would be dropped too
    r.advance(5.75)
    assert r.status(0) == r.status(2) == "member"
    r.advance(0.25)
    assert r.status(0) == r.status(2) == "gone"


@in_loop
async def test_any_request_counts_as_a_sign_of_life():
    r = Run()
    await r.form()
    r.clock.advance(9.75)
    await r.answers([r.ask(0, "set", key="k", value="00"), r.ask(1, "events")])
    r.advance(9.75)
    assert r.status(0) == r.status(1) == "member"


@in_loop
async def test_a_dropped_site_that_joins_again_waits_as_a_returning_member():
    r = Run()
    await r.form()
    r.advance(10.25)
    assert r.status(0) == r.status(1) == "gone"
    assert not r.c._alive_members()
    reply = r.join(1, intent="rejoin")  # the same process, after it saw Evicted
    assert reply == {"ok": True, "status": "waiting", "gen": 0, "members": [0, 1], "formed": True}
    assert r.c.sites[1].was_member is True


# -- the store --------------------------------------------------------------------------------------------------

@in_loop
async def test_the_store_sets_gets_adds_checks_swaps_deletes_and_counts():
    r = Run()
    r.join(0)

    async def op(name: str, **fields: Any) -> dict[str, Any]:
        (reply,) = await r.answers([r.ask(0, name, **fields)])
        return reply

    assert await op("set", key="a", value=b"\x00\xff".hex()) == {"ok": True}
    assert await op("get", key="a") == {"value": "00ff"}
    assert await op("add", key="n", amount=3) == {"value": 3}
    assert await op("add", key="n", amount=-5) == {"value": -2}
    assert r.c.store["n"] == b"-2"
    assert await op("check", keys=["a", "n"]) == {"ok": True}
    assert await op("check", keys=["a", "missing"]) == {"ok": False}
    assert await op("cas", key="a", expected="00", desired="11") == {"value": "00ff"}  # no match: unchanged
    assert await op("cas", key="a", expected="00ff", desired="11") == {"value": "11"}
    assert await op("cas", key="new", expected="", desired="22") == {"value": "22"}  # absent matches empty
    assert await op("num_keys") == {"value": 3}
    assert await op("delete", key="a") == {"ok": True}
    assert await op("delete", key="a") == {"ok": False}
    assert await op("num_keys") == {"value": 2}


@in_loop
async def test_a_store_get_waits_for_the_key_and_times_out_with_its_name():
    r = Run()
    r.join(0)
    r.join(1)
    waiting = r.ask(0, "get", key="rendezvous/0", timeout=30.0)
    await settle()
    assert not waiting.done()
    await r.answers([r.ask(1, "set", key="rendezvous/0", value="ab")])
    assert (await r.answers([waiting]))[0] == {"value": "ab"}
    reply = await asyncio.wait_for(r.c.request((0, 0), {"op": "get", "key": "never", "timeout": 0.01}), 10)
    assert reply == {"error": "timed out waiting for key 'never'"}


# -- events -----------------------------------------------------------------------------------------------------

@in_loop
async def test_events_are_kept_written_to_the_events_file_and_carry_the_sender_s_site(tmp_path):
    path = tmp_path / "events.jsonl"
    r = Run(events_path=path)
    await r.form()
    await r.answers([r.ask(1, "event", kind="healed", site=0, healed_from=0, seconds=1.5, round=4)])
    await r.answers([r.ask(0, "leave", reason="preempted")])
    written = [json.loads(line) for line in path.read_text().splitlines()]
    assert written == r.c.events
    assert [(e["site"], e["kind"]) for e in written] == [(0, "joined"), (1, "joined"), (1, "healed"), (0, "left")]
    healed = written[2]
    assert healed == {"site": 1, "kind": "healed", "round": 4, "time": WALL, "generation": 0, "healed_from": 0,
                      "seconds": 1.5}  # the site is the sender's, whatever the message says
    (reply,) = await r.answers([r.ask(1, "events")])
    assert reply == {"events": r.c.events}


# -- a restarted coordinator adopts the membership the sites report --------------------------------------------

def _view(gen: int, members: list[int], *, launch: str = "launch-1", round: int = 9,
          decisions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"gen": gen, "members": members, "round": round, "decisions": decisions or [], "launch": launch}


@in_loop
async def test_a_restarted_coordinator_adopts_the_view_of_the_first_returning_member():
    r = Run(sites=3)
    reply = r.join(1, intent="member", view=_view(4, [0, 1, 2]))
    assert reply == {"ok": True, "status": "member", "gen": 4, "members": [0, 1, 2], "formed": True}
    assert (r.c.gen, r.c.members, r.c.launch, r.c.round, r.c.formed) == (4, [0, 1, 2], "launch-1", 9, True)
    assert [r.status(k) for k in range(3)] == ["member"] * 3
    assert sorted(r.c.sites[0].workers) == [] and sorted(r.c.sites[1].workers) == [0]
    r.join(0, intent="member", view=_view(4, [0, 1, 2]))
    r.join(2, intent="member", view=_view(4, [0, 1, 2]))
    replies = await r.answers(r.ask_all([0, 1, 2], "quorum", sync=12))
    assert replies == [{"gen": 4, "members": [0, 1, 2], "left": [], "admit": False}] * 3
    votes = await r.answers([r.ask(k, "vote", gen=4, sync=12, ok=True) for k in range(3)])
    assert votes[0]["commit"] is True


@in_loop
async def test_a_newer_view_reported_later_wins_and_a_site_it_left_out_must_join_again():
    r = Run(sites=3)
    r.join(0, intent="member", view=_view(2, [0, 1, 2]))
    r.join(1, intent="member", view=_view(3, [1, 2], launch="launch-1"))  # site 0 was dropped at gen 3
    assert (r.c.gen, r.c.members) == (3, [1, 2])
    assert r.status(0) == "waiting" and r.status(1) == r.status(2) == "member"
    r.join(2, intent="member", view=_view(2, [0, 1, 2]))  # an older view changes nothing
    assert (r.c.gen, r.c.members) == (3, [1, 2])
    (reply,) = await r.answers([r.ask(0, "quorum", sync=1)])
    assert reply == {"evicted": "site 0 is not a member of the run; it must join again"}


@in_loop
async def test_a_decision_a_site_already_holds_is_answered_the_same_to_the_others():
    r = Run()
    quorum = {"gen": 5, "members": [0, 1], "left": [], "admit": False}
    vote = {"commit": True, "failed": [], "gone": [], "stats": [3.0], "errors": {}}
    decisions = [{"kind": "quorum", "key": [8, 0], "result": quorum},
                 {"kind": "vote", "key": [5, 8, 0, "commit"], "result": vote}]
    r.join(0, intent="member", view=_view(5, [0, 1], decisions=decisions))
    r.join(1, intent="member", view=_view(4, [0, 1]))
    # site 1 had not received them before the restart: it gets what site 0 got, made once
    assert await r.answers([r.ask(1, "quorum", sync=8, attempt=0)]) == [quorum]
    assert await r.answers([r.ask(1, "vote", gen=5, sync=8, attempt=0, phase="commit", ok=False)]) == [vote]
    assert r.c.gen == 5


@in_loop
async def test_a_member_that_does_not_reconnect_after_a_restart_is_dropped_after_twice_the_heartbeat_timeout():
    """Every worker of every site reconnects at once after a restart, so they get twice the usual grace."""
    r = Run(sites=3)
    r.join(0, intent="member", view=_view(4, [0, 1, 2]))  # adopted now
    r.clock.advance(5.0)
    r.join(2, intent="member", view=_view(4, [0, 1, 2]))
    quorum = r.ask_all([0, 2], "quorum", sync=12)
    r.clock.advance(7.0)
    await r.answers([r.ask(0, "heartbeat"), r.ask(2, "heartbeat")])
    r.advance(8.0)  # exactly twice the heartbeat timeout since the adoption
    await settle()
    assert r.status(1) == "member" and not any(t.done() for t in quorum)
    r.advance(0.25)
    replies = await r.answers(quorum)
    assert replies == [{"gen": 5, "members": [0, 2], "left": [1], "admit": False}] * 2
    assert r.c.sites[1].reason == "did not reconnect after the coordinator restarted"
    assert r.c.launch == "launch-1"
