"""The members' side of an admission (``CrossSiteComm.admit``) against a scripted coordinator: the healer
sends the state once per admission, even when the loop asks again at the same sync count and the coordinator
answers with the decision it already made; a joiner that went away does not take the healer down."""

from __future__ import annotations

import threading
from typing import Any

import torch

from geotrain.comm.collectives import CrossSiteComm
from geotrain.comm.transport import Traffic
from geotrain.config import load_config


class _Membership:
    """Answers admit with one decision per sync count, as the coordinator's barriers do."""

    def __init__(self, decisions: dict[int, dict[str, Any]]) -> None:
        self.decisions, self.asked, self.sums = decisions, [], []

    def admit(self, sync: int) -> dict[str, Any]:
        self.asked.append(sync)
        return self.decisions[sync]

    def sum(self, name: str, values: list[float]) -> list[float]:
        self.sums.append(name)
        return values


class _Transport:
    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[int, int]] = []
        self.fail = fail

    def send(self, tensor: torch.Tensor, dst: int) -> Traffic:
        if self.fail:
            raise RuntimeError("Timed out waiting 30401ms for send operation to complete")
        self.sent.append((dst, tensor.numel()))
        return Traffic("point_to_point", tensor.numel(), tensor.numel(), 0.0, 0.0)

    def close(self) -> None:
        pass


def _comm(membership: _Membership, transport: _Transport) -> CrossSiteComm:
    comm = CrossSiteComm(membership=membership, make_transport=lambda gen, members: transport, site=0, sites=3,
                         site_pg=None, local_rank=0, workers=1, codec=load_config(values={"comm.codec": "fp32"}).codec(),
                         generation=1, members=[0, 2])
    return comm


ADMITTED = {"gen": 2, "members": [0, 1, 2], "joined": [1], "healer": 0}


def test_the_healer_sends_once_when_the_same_admission_is_answered_twice():
    membership, transport = _Membership({5: ADMITTED}), _Transport()
    comm = _comm(membership, transport)
    comm.syncs = 5
    try:
        first = comm.admit(lambda: b"state" * 100)
        again = comm.admit(lambda: b"state" * 100)  # asked again before another sync started
    finally:
        comm.close()
    assert first["joined"] == [1] and comm.generation == 2 and comm.members == [0, 1, 2]
    assert first["background"] is False  # no rule set: blocking
    assert again["joined"] == [] and again["healer"] is None
    assert transport.sent == [(1, 7), (1, 500)]  # one header and one state, to site 1's rank, once
    assert membership.sums == ["healed/2"]  # everyone waited for the state to arrive, once


def test_a_joiner_that_went_away_does_not_take_the_healer_down():
    membership, transport = _Membership({5: ADMITTED}), _Transport(fail=True)
    comm = _comm(membership, transport)
    comm.syncs = 5
    try:
        q = comm.admit(lambda: b"state")
    finally:
        comm.close()
    assert q["joined"] == [1]
    assert len(comm.heal_errors) == 1 and "site 1" in comm.heal_errors[0]


class _GatedTransport(_Transport):
    """Sends only once the test opens the gate: the state is still travelling until then."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def send(self, tensor: torch.Tensor, dst: int) -> Traffic:
        assert self.gate.wait(30), "the test never opened the gate"
        return super().send(tensor, dst)


def test_a_heal_in_the_background_lets_the_healer_train_on_while_its_state_travels():
    membership = _Membership({5: ADMITTED, 9: {"gen": 2, "members": [0, 1, 2], "joined": [], "healer": None}})
    transport = _GatedTransport()
    comm = _comm(membership, transport)
    comm.background_heal = lambda healer, joiners: (healer, joiners) == (0, [1])
    comm.syncs = 5
    try:
        q = comm.admit(lambda: b"state" * 100)
        assert q["background"] is True and q["joined"] == [1]
        assert transport.sent == [] and membership.sums == []  # back before the state went out, no barrier
        assert comm.heals_in_background(0, [1]) and not comm.heals_in_background(2, [1])
        transport.gate.set()
        comm.syncs = 9
        later = comm.admit(lambda: b"never sent")  # the next boundary: the heal is over by then
    finally:
        comm.close()
    assert later["joined"] == [] and later["background"] is False
    assert transport.sent == [(1, 7), (1, 500)] and membership.sums == []
