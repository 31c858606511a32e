"""The raw cross-site transport: gloo collectives on one generation's group, with their traffic accounted and
their deadlines set.

Every call returns a :class:`Traffic` record saying which pattern moved how many bytes. Bytes are counted
from the tensors actually handed to gloo (the encoded payloads), using the pattern's known traffic per site,
so a compressed payload is charged at its compressed size. The WAN emulator wraps this class and adds the
time the emulated links would take; the algorithm cannot tell the two apart.

Each operation runs under a deadline that follows its size and the links (``membership.deadlines``): a peer
that died mid-transfer fails it at once (a closed connection), a peer that hangs or is cut off fails it at the
deadline, and the caller votes the sync down and retries on a new generation.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import AllgatherOptions

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

    def _timeout(self, pattern: str, nbytes: int) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.deadline(pattern, nbytes))

    def all_gather(self, payload: torch.Tensor) -> tuple[list[torch.Tensor], Traffic]:
        t0 = self.clock.now()
        nbytes = payload.numel() * payload.element_size()
        if self.size > 1:
            out = [torch.empty_like(payload) for _ in range(self.size)]
            opts = AllgatherOptions()
            opts.timeout = self._timeout("all_gather", nbytes)
            self.pg.allgather([out], [payload], opts).wait()
        else:
            out = [payload]
        cost = ring_all_gather(nbytes, [None] * self.size)
        return out, Traffic("all_gather", nbytes, cost.bytes_sent, self.clock.now() - t0)

    def all_to_all(self, payload: torch.Tensor) -> tuple[torch.Tensor, Traffic]:
        """Send slice j of ``payload`` (K equal slices) to rank j; returns slice i of every rank's payload, in
        rank order (slot ``rank`` is this site's own slice, which never crosses the link)."""
        if payload.numel() % self.size:
            raise ValueError(f"all_to_all payload of {payload.numel()} elements does not split into {self.size} slices")
        t0 = self.clock.now()
        nbytes = payload.numel() * payload.element_size()
        if self.size > 1:
            out = torch.empty_like(payload)
            opts = dist.AllToAllOptions()
            opts.timeout = self._timeout("reduce_scatter", nbytes)
            self.pg.alltoall_base(out, payload, [], [], opts).wait()
        else:
            out = payload
        cost = all_to_all(nbytes, [], sites=self.size)
        return out, Traffic("reduce_scatter", nbytes, cost.bytes_sent, self.clock.now() - t0)

    def send(self, tensor: torch.Tensor, dst: int) -> Traffic:
        t0 = self.clock.now()
        nbytes = tensor.numel() * tensor.element_size()
        self.pg.send([tensor], dst, 0).wait(self._timeout("point_to_point", nbytes))
        return Traffic("point_to_point", nbytes, nbytes, self.clock.now() - t0)

    def recv(self, tensor: torch.Tensor, src: int) -> Traffic:
        t0 = self.clock.now()
        nbytes = tensor.numel() * tensor.element_size()
        self.pg.recv([tensor], src, 0).wait(self._timeout("point_to_point", nbytes))
        return Traffic("point_to_point", nbytes, 0, self.clock.now() - t0)
