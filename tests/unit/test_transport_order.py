"""The order in which ``GlooTransport`` posts gloo's point-to-point messages, against a recording group.

gloo sends a message only after its receiver has announced the buffer, and the announcement shares the TCP
connection with the data going the other way. A site that sent before announcing would queue its announcement
behind its own payload and hold its peer's data back (measured in the network lab:
``benchmarks/results/2026-12-02-netlab-gloo-announcement-order.md``). So every receive of a collective is
posted before its first send, and a ring passes a half on only once it has arrived."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from geotrain.comm.transport import GlooTransport


class _Work:
    def __init__(self, log: list[tuple], op: str, peer: int, tensor: torch.Tensor) -> None:
        self.log, self.op, self.peer, self.tensor, self.waited = log, op, peer, tensor, 0

    def wait(self, timeout: Any = None) -> bool:
        self.waited += 1
        assert self.waited == 1, "a work is waited once"
        self.log.append(("wait", self.op, self.peer, self.tensor.numel()))
        return True


class _RecordingGroup:
    """Records every post and wait; a receive is filled with the sender's rank + 1 when it is waited."""

    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.works: list[_Work] = []

    def _post(self, op: str, tensors: list[torch.Tensor], peer: int, tag: int) -> _Work:
        (tensor,) = tensors
        assert tensor.is_contiguous()
        self.log.append((op, peer, tensor.numel(), tag))
        work = _Work(self.log, op, peer, tensor)
        self.works.append(work)
        return work

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> _Work:
        return self._post("send", tensors, dst, tag)

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> _Work:
        return self._post("recv", tensors, src, tag)


def _posts(log: list[tuple], op: str) -> list[int]:
    return [i for i, entry in enumerate(log) if entry[0] == op]


@pytest.mark.parametrize("k", [2, 3, 4])
def test_every_receive_of_an_all_to_all_is_announced_before_its_first_send(k):
    group = _RecordingGroup()
    out, traffic = GlooTransport(group, rank=1, size=k).all_to_all(torch.arange(4 * k, dtype=torch.float32))
    recvs, sends = _posts(group.log, "recv"), _posts(group.log, "send")
    assert len(recvs) == len(sends) == k - 1
    assert max(recvs) < min(sends)
    assert sorted(group.log[i][1] for i in recvs) == sorted(group.log[i][1] for i in sends) == [j for j in range(k)
                                                                                              if j != 1]
    assert all(group.log[i][2] == 4 for i in recvs + sends)  # one chunk each
    assert all(w.waited == 1 for w in group.works)
    assert torch.equal(out[4:8], torch.arange(4, 8, dtype=torch.float32))  # this rank's own chunk, kept
    assert traffic.bytes_sent == (k - 1) * 4 * 4


@pytest.mark.parametrize("k", [2, 3, 4])
def test_a_ring_all_gather_announces_every_receive_first_and_forwards_only_what_arrived(k):
    group = _RecordingGroup()
    me, numel = 1, 7  # halves of 3 and 4 elements
    GlooTransport(group, rank=me, size=k).all_gather(torch.ones(numel))
    log = group.log
    recvs, sends = _posts(log, "recv"), _posts(log, "send")
    assert len(recvs) == len(sends) == 2 * (k - 1)
    assert max(recvs) < min(sends)  # every announcement leaves before any data
    assert {log[i][1] for i in recvs} == {(me - 1) % k} and {log[i][1] for i in sends} == {(me + 1) % k}
    assert [log[i][2] for i in recvs] == [3, 4] * (k - 1) and [log[i][2] for i in sends] == [3, 4] * (k - 1)
    # the own two halves go at once; each further send follows the wait for the half it passes on
    waits = [i for i, entry in enumerate(log) if entry[:2] == ("wait", "recv")]
    for n, i in enumerate(sends[2:]):
        assert waits[n] < i
    assert all(w.waited == 1 for w in group.works)


def test_one_site_and_an_empty_payload_send_nothing():
    group = _RecordingGroup()
    out, _ = GlooTransport(group, rank=0, size=1).all_gather(torch.ones(5))
    assert len(out) == 1 and torch.equal(out[0], torch.ones(5))
    out, _ = GlooTransport(group, rank=0, size=3).all_gather(torch.ones(0))
    assert len(out) == 3 and group.log == []
