"""The raw cross-site transport: collectives over one generation's gloo group, with their traffic accounted and
their deadlines set.

Every call returns a :class:`Traffic` record saying which pattern moved how many bytes. Bytes are counted
from the tensors actually handed to gloo (the encoded payloads), using the pattern's known traffic per site,
so a compressed payload is charged at its compressed size. The WAN emulator wraps this class and adds the
time the emulated links would take; the algorithm cannot tell the two apart.

The collectives are built from gloo's point-to-point messages, with every receive posted before any send.
gloo moves a message only once its receiver has announced the buffer, and the announcement travels on the same
TCP connection as the data going the other way. gloo's own all-gather and all-to-all post a send before the
matching receive, so a site that reaches the collective more than one link latency after its peer (whose
announcement is already there) writes its payload first and its own announcement behind it: the peer's data then
waits for up to a socket buffer of it to cross the link. In the network lab (2 sites, 4 MB over 10mbit/50ms,
one site 100 ms late) such a sync took 5.51 s with gloo's collectives and 3.96 s with these
(``benchmarks/results/2026-12-02-netlab-gloo-announcement-order.md``).

Each operation runs under a deadline that follows its size and the links (``membership.deadlines``): a peer
that died mid-transfer fails it at once (a closed connection), a peer that hangs or is cut off fails it at the
deadline, and the caller votes the sync down and retries on a new generation.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from geotrain.clock import REAL_CLOCK, Clock
from geotrain.topology import all_to_all, ring_all_gather

__all__ = ["Deadline", "GlooTransport", "Traffic", "Transport"]

Deadline = Callable[[str, int], float]
"""(pattern, payload bytes) -> seconds the operation may take."""


@dataclass(slots=True)
class Traffic:
    """What one collective cost this site."""

    pattern: str
    """"all_gather" (ring), "reduce_scatter" (all-to-all of one chunk per site), "reduce_scatter+all_gather"
    (the two, as one all-reduce) or "point_to_point" (healing a joiner)."""
    payload_bytes: int
    """Bytes this site contributed (one encoded payload)."""
    bytes_sent: int
    """Bytes this site put on the wire for the pattern."""
    real_seconds: float
    """Time the real transport took."""
    emulated_seconds: float = 0.0
    """Time the emulated links added beyond the real transfer (0 without emulation)."""


class Transport(Protocol):
    rank: int
    size: int
    members: list[int]

    def all_gather(self, payload: torch.Tensor) -> tuple[list[torch.Tensor], Traffic]: ...

    def all_to_all(self, payload: torch.Tensor) -> tuple[torch.Tensor, Traffic]: ...

    def send(self, tensor: torch.Tensor, dst: int) -> Traffic: ...

    def recv(self, tensor: torch.Tensor, src: int) -> Traffic: ...


def _no_deadline(pattern: str, nbytes: int) -> float:
    return 300.0


_ALL_GATHER_TAG, _ALL_TO_ALL_TAG = 1, 2
"""Point-to-point tags of the collectives; 0 is :meth:`GlooTransport.send`'s. Every rank of a generation issues
the same collectives in the same order and gloo matches one tag's messages first in, first out; a failed
collective is never retried on its group (the retry forms a new generation)."""


class GlooTransport:
    """Cross-site collectives on a gloo process group (CPU tensors). ``members``: the site of each rank."""

    def __init__(self, pg: Any, *, rank: int, size: int, members: list[int] | None = None, clock: Clock = REAL_CLOCK,
                 deadline: Deadline = _no_deadline) -> None:
        self.pg = pg
        self.rank = rank
        self.size = size
        self.members = list(range(size)) if members is None else list(members)
        self.clock = clock
        self.deadline = deadline

    def _waiter(self, pattern: str, nbytes: int) -> Callable[[Any], None]:
        """Wait for one of an operation's messages within what is left of the operation's deadline (real time,
        as gloo's own)."""
        seconds = self.deadline(pattern, nbytes)
        end = time.monotonic() + seconds

        def wait(work: Any) -> None:
            left = end - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{pattern} of {nbytes:,} bytes timed out after {seconds:g} s")
            work.wait(datetime.timedelta(seconds=left))

        return wait

    def all_gather(self, payload: torch.Tensor) -> tuple[list[torch.Tensor], Traffic]:
        """Every rank's payload, in rank order, by a ring: each rank passes what it has to its right-hand
        neighbour, K-1 times, each payload in two halves so that a half is forwarded while the other arrives (the
        time and traffic :func:`geotrain.topology.ring_all_gather` prices)."""
        t0 = self.clock.now()
        nbytes = payload.numel() * payload.element_size()
        k, me = self.size, self.rank
        out = [torch.empty_like(payload, memory_format=torch.contiguous_format) for _ in range(k)]
        out[me].copy_(payload)
        if k > 1 and nbytes:
            wait = self._waiter("all_gather", nbytes)
            cut = payload.numel() // 2

            def halves(j: int) -> tuple[torch.Tensor, ...]:
                flat = out[j].view(-1)
                return (flat[:cut], flat[cut:]) if cut else (flat,)

            left, right = (me - 1) % k, (me + 1) % k
            # Step s brings the halves of rank me-s from the left; all K-1 steps' receives are announced first.
            recvs = [self.pg.recv([h], left, _ALL_GATHER_TAG) for s in range(1, k) for h in halves((me - s) % k)]
            sends = [self.pg.send([h], right, _ALL_GATHER_TAG) for h in halves(me)]
            onward = [h for s in range(1, k - 1) for h in halves((me - s) % k)]  # what arrives, to pass on
            for i, h in enumerate(onward):
                wait(recvs[i])  # a work is waited once: each wait takes one of its buffer's completions
                sends.append(self.pg.send([h], right, _ALL_GATHER_TAG))
            for work in (*recvs[len(onward):], *sends):
                wait(work)
        cost = ring_all_gather(nbytes, [None] * k)
        return out, Traffic("all_gather", nbytes, cost.bytes_sent, self.clock.now() - t0)

    def all_to_all(self, payload: torch.Tensor) -> tuple[torch.Tensor, Traffic]:
        """Send slice j of ``payload`` (K equal slices) to rank j; returns slice i of every rank's payload, in
        rank order (slot ``rank`` is this site's own slice, which never crosses the link)."""
        if payload.numel() % self.size:
            raise ValueError(f"all_to_all payload of {payload.numel()} elements does not split into {self.size} slices")
        t0 = self.clock.now()
        nbytes = payload.numel() * payload.element_size()
        k, me = self.size, self.rank
        if k > 1:
            wait = self._waiter("reduce_scatter", nbytes)
            mine = payload.contiguous().view(-1).chunk(k)
            out = torch.empty_like(payload, memory_format=torch.contiguous_format)
            theirs = out.view(-1).chunk(k)
            theirs[me].copy_(mine[me])
            recvs = [self.pg.recv([theirs[j]], j, _ALL_TO_ALL_TAG) for j in range(k) if j != me]
            sends = [self.pg.send([mine[(me + i) % k]], (me + i) % k, _ALL_TO_ALL_TAG) for i in range(1, k)]
            for work in (*recvs, *sends):
                wait(work)
        else:
            out = payload
        cost = all_to_all(nbytes, [], sites=k)
        return out, Traffic("reduce_scatter", nbytes, cost.bytes_sent, self.clock.now() - t0)

    def send(self, tensor: torch.Tensor, dst: int) -> Traffic:
        t0 = self.clock.now()
        nbytes = tensor.numel() * tensor.element_size()
        self._waiter("point_to_point", nbytes)(self.pg.send([tensor], dst, 0))
        return Traffic("point_to_point", nbytes, nbytes, self.clock.now() - t0)

    def recv(self, tensor: torch.Tensor, src: int) -> Traffic:
        t0 = self.clock.now()
        nbytes = tensor.numel() * tensor.element_size()
        self._waiter("point_to_point", nbytes)(self.pg.recv([tensor], src, 0))
        return Traffic("point_to_point", nbytes, 0, self.clock.now() - t0)
