"""The wall-time budget's stop vote: read one sync point late, any site's vote stops every site."""

from __future__ import annotations

from geotrain.train.budget import BudgetVote


class _Pending:
    def __init__(self, log: list, values: list[float], other: float) -> None:
        self.log, self.values, self.other = log, values, other

    def wait(self, *, count_wait: bool = True) -> list[float]:
        self.log.append(("wait", self.values[0]))
        return [self.values[0] + self.other]


class _Comm:
    """Stands in for CrossSiteComm.start_control_sum between this site and one other whose votes are given."""

    def __init__(self, other_votes: list[float]) -> None:
        self.other_votes = list(other_votes)
        self.log: list = []
        self.names: list[str] = []

    def start_control_sum(self, name: str, values: list[float]) -> _Pending:
        self.names.append(name)
        self.log.append(("start", values[0]))
        return _Pending(self.log, values, self.other_votes.pop(0))


def _stops(vote: BudgetVote, walls, *, every: int = 10, drain: float = 0.0) -> list[bool]:
    """The decisions at sync points ``walls``, one every ``every`` steps (step 10, 20, ...)."""
    return [vote.stop_now(t, drain=drain, step=every * (i + 1)) for i, t in enumerate(walls)]


def test_a_vote_is_read_at_the_next_sync_point_and_never_waited_on_when_cast():
    comm = _Comm([0.0, 0.0, 0.0])
    vote = BudgetVote(100.0, comm, site_pg=None, workers=1)
    assert vote.stop_now(10.0, step=10) is False
    assert comm.log == [("start", 0.0)]  # cast, not waited on
    assert vote.stop_now(20.0, step=20) is False
    assert comm.log == [("start", 0.0), ("wait", 0.0), ("start", 0.0)]
    vote.finish()
    assert comm.log[-1] == ("wait", 0.0)
    vote.finish()  # nothing left in flight: a second finish waits on nothing
    assert len(comm.log) == 4


def test_the_vote_looks_two_rounds_ahead_and_stops_one_sync_point_later():
    # Rounds of 10 s against a 45 s budget. At 30 s the round after next would end at 50 s, so the site votes
    # to stop; the vote is read at 40 s, which is where the run stops, within the budget.
    comm = _Comm([0.0] * 5)
    vote = BudgetVote(45.0, comm, site_pg=None, workers=1)
    decisions = _stops(vote, (10.0, 20.0, 30.0, 40.0))
    assert decisions == [False, False, False, True]
    assert [v for kind, v in comm.log if kind == "start"] == [0.0, 0.0, 1.0]


def test_a_sync_still_in_flight_at_the_stop_counts_against_the_budget():
    # Same rounds, but a stopped run must still land an overlapped transfer of 6 s: at 20 s, stopping at 30 s
    # ends at 36 s while going on to 40 s would end at 46 s, so this site votes to stop at 20 s already.
    comm = _Comm([0.0] * 5)
    vote = BudgetVote(45.0, comm, site_pg=None, workers=1)
    assert _stops(vote, (10.0, 20.0, 30.0), drain=6.0) == [False, False, True]


def test_any_site_s_vote_stops_every_site():
    comm = _Comm([0.0, 1.0, 0.0])  # the other site votes to stop at its second sync point
    vote = BudgetVote(1000.0, comm, site_pg=None, workers=1)
    assert _stops(vote, (1.0, 2.0, 3.0)) == [False, False, True]


class _SitePG:
    """Two workers of one site: the other worker's cross-site group saw a stop vote."""

    def __init__(self, other: float) -> None:
        self.other = other

    def allreduce(self, tensors):
        tensors[0][0] += self.other

        class _Work:
            def wait(self_inner):
                return True

        return _Work()


def test_workers_of_a_site_agree_when_only_another_worker_s_group_votes_stop():
    comm = _Comm([0.0, 0.0])
    vote = BudgetVote(1000.0, comm, site_pg=_SitePG(1.0), workers=2)
    assert vote.stop_now(1.0, step=10) is False
    assert vote.stop_now(2.0, step=20) is True


def test_each_vote_is_summed_under_the_name_of_its_sync_point():
    # Every site names the vote after the step of the sync point that cast it, so the votes of one sync point
    # are summed together whatever the order the sites reach it in.
    comm = _Comm([0.0] * 3)
    vote = BudgetVote(1000.0, comm, site_pg=None, workers=1)
    _stops(vote, (1.0, 2.0, 3.0), every=25)
    assert comm.names == ["budget/25", "budget/50", "budget/75"]


def _settled_early(other_votes: list[float], walls, *, settle_after: int, workers: int = 1, site_pg=None):
    """The decisions at sync points ``walls`` when the vote is settled right after sync point ``settle_after``
    (before a joiner is given the state), and the comm's log."""
    comm = _Comm(other_votes)
    vote = BudgetVote(45.0, comm, site_pg=site_pg, workers=workers)
    decisions = []
    for i, t in enumerate(walls):
        decisions.append(vote.stop_now(t, step=10 * (i + 1)))
        if i == settle_after:
            vote.settle()
    return decisions, comm.log


def test_a_vote_settled_early_is_read_at_the_next_sync_point_as_one_waited_for_there():
    walls = (10.0, 20.0, 30.0, 40.0)
    # 45 s budget, 10 s rounds: this site votes to stop at 30 s, read at 40 s (as above). Settling that vote
    # right after it is cast changes nothing: the run still stops at 40 s, the same sync point as a site that
    # did not settle, and the vote is waited for once, at the settle, not again at 40 s.
    plain, plain_log = _settled_early([0.0] * 5, walls, settle_after=-1)
    settled, log = _settled_early([0.0] * 5, walls, settle_after=2)
    assert plain == settled == [False, False, False, True]
    assert log == plain_log == [("start", 0.0), ("wait", 0.0), ("start", 0.0), ("wait", 0.0),
                                ("start", 1.0), ("wait", 1.0)]
    # The other site's vote to stop, cast at its second sync point and settled here right after ours, stops
    # this site at its third, as it would have unsettled.
    plain, _ = _settled_early([0.0, 1.0, 0.0], walls[:3], settle_after=-1)
    settled, _ = _settled_early([0.0, 1.0, 0.0], walls[:3], settle_after=1)
    assert plain == settled == [False, False, True]
    # A vote to go on, settled early, does not stop the next sync point, which casts the next vote.
    settled, log = _settled_early([0.0] * 3, (1.0, 2.0, 3.0), settle_after=0)
    assert settled == [False, False, False]
    assert [kind for kind, _ in log] == ["start", "wait", "start", "wait", "start"]


def test_settling_agrees_inside_the_site_and_settling_twice_or_with_nothing_in_flight_waits_on_nothing():
    comm = _Comm([0.0, 0.0])
    vote = BudgetVote(1000.0, comm, site_pg=_SitePG(1.0), workers=2)
    vote.settle()  # nothing cast yet
    assert comm.log == []
    assert vote.stop_now(1.0, step=10) is False
    vote.settle()  # the other worker's group voted to stop: the site agrees on it at the settle
    vote.settle()
    assert comm.log == [("start", 0.0), ("wait", 0.0)]
    assert vote.stop_now(2.0, step=20) is True
    assert comm.log == [("start", 0.0), ("wait", 0.0)]  # read, not waited for again; no new vote cast


def _round_trip(vote: BudgetVote, other_votes: list[float]) -> tuple[BudgetVote, _Comm]:
    """A vote restored from ``vote.state_dict()`` on a fresh comm (a resumed or joining site)."""
    comm = _Comm(other_votes)
    restored = BudgetVote(vote.budget, comm, site_pg=None, workers=1)
    restored.load_state_dict(vote.state_dict())
    return restored, comm


def test_state_dict_round_trip_goes_on_as_the_original():
    # 45 s budget, 10 s rounds. The state taken after the vote cast at 30 s (a vote to stop) carries that vote
    # settled: the restored vote stops at 40 s, as the original does, without casting or waiting anything.
    walls = (10.0, 20.0, 30.0, 40.0)
    original = BudgetVote(45.0, _Comm([0.0] * 5), site_pg=None, workers=1)
    assert _stops(original, walls[:3]) == [False, False, False]
    state = original.state_dict()
    assert state == {"last_sync_wall": 30.0, "settled": True}
    restored, comm = _round_trip(original, [])
    assert restored.stop_now(40.0, step=40) is True
    assert original.stop_now(40.0, step=40) is True
    assert comm.log == []

    # Taken after the vote cast at 10 s (a vote to go on): the restored vote measures its next round from
    # 10 s, so at 30 s it votes to stop (30 + 2 * 10 > 45), exactly as the original does.
    original = BudgetVote(45.0, _Comm([0.0] * 5), site_pg=None, workers=1)
    assert _stops(original, walls[:1]) == [False]
    restored, comm = _round_trip(original, [0.0] * 3)
    assert [restored.stop_now(t, step=s) for t, s in ((20.0, 20), (30.0, 30), (40.0, 40))] == [False, False, True]
    assert [original.stop_now(t, step=s) for t, s in ((20.0, 20), (30.0, 30), (40.0, 40))] == [False, False, True]
    assert [v for kind, v in comm.log if kind == "start"] == [0.0, 1.0]
    assert comm.names == ["budget/20", "budget/30"]

    # Before any sync point: nothing in flight, nothing settled.
    fresh = BudgetVote(45.0, _Comm([]), site_pg=None, workers=1)
    assert fresh.state_dict() == {"last_sync_wall": 0.0, "settled": None}
    restored, comm = _round_trip(fresh, [0.0])
    assert restored.stop_now(10.0, step=10) is False
    assert comm.log == [("start", 0.0)]
