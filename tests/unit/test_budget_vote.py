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

    def start_control_sum(self, values: list[float]) -> _Pending:
        self.log.append(("start", values[0]))
        return _Pending(self.log, values, self.other_votes.pop(0))


def test_a_vote_is_read_at_the_next_sync_point_and_never_waited_on_when_cast():
    comm = _Comm([0.0, 0.0, 0.0])
    vote = BudgetVote(100.0, comm, site_pg=None, workers=1)
    assert vote.stop_now(10.0) is False
    assert comm.log == [("start", 0.0)]  # cast, not waited on
    assert vote.stop_now(20.0) is False
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
    decisions = [vote.stop_now(t) for t in (10.0, 20.0, 30.0, 40.0)]
    assert decisions == [False, False, False, True]
    assert [v for kind, v in comm.log if kind == "start"] == [0.0, 0.0, 1.0]


def test_a_sync_still_in_flight_at_the_stop_counts_against_the_budget():
    # Same rounds, but a stopped run must still land an overlapped transfer of 6 s: at 20 s, stopping at 30 s
    # ends at 36 s while going on to 40 s would end at 46 s, so this site votes to stop at 20 s already.
    comm = _Comm([0.0] * 5)
    vote = BudgetVote(45.0, comm, site_pg=None, workers=1)
    assert [vote.stop_now(t, drain=6.0) for t in (10.0, 20.0, 30.0)] == [False, False, True]


def test_any_site_s_vote_stops_every_site():
    comm = _Comm([0.0, 1.0, 0.0])  # the other site votes to stop at its second sync point
    vote = BudgetVote(1000.0, comm, site_pg=None, workers=1)
    assert [vote.stop_now(t) for t in (1.0, 2.0, 3.0)] == [False, False, True]


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
    assert vote.stop_now(1.0) is False
    assert vote.stop_now(2.0) is True
