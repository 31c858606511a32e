"""The raw cross-site transport: gloo collectives on one process group, with their traffic accounted.

Every call returns a :class:`Traffic` record saying which pattern moved how many bytes. Bytes are counted
from the tensors actually handed to gloo (the encoded payloads), using the pattern's known traffic per site,
so a compressed payload is charged at its compressed size. The WAN emulator wraps this class and adds the
time the emulated links would take; the algorithm cannot tell the two apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from geotrain.clock import REAL_CLOCK, Clock
from geotrain.topology import ring_all_gather, ring_all_reduce, ring_reduce_scatter

__all__ = ["Traffic", "Transport", "GlooTransport"]


@dataclass(slots=True)
class Traffic:
    """What one collective cost this site."""

    pattern: str
    """"all_reduce" (ring), "all_gather" (ring), "reduce_scatter" (all-to-all of one chunk per site), or
    "reduce_scatter+all_gather" (the two, as one compressed all-reduce)."""
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

    def all_reduce_sum(self, tensor: torch.Tensor) -> Traffic: ...

    def all_gather(self, payload: torch.Tensor) -> tuple[list[torch.Tensor], Traffic]: ...

    def all_to_all(self, payload: torch.Tensor) -> tuple[torch.Tensor, Traffic]: ...

    def control_sum(self, tensor: torch.Tensor) -> None: ...


class GlooTransport:
    """Cross-site collectives on a gloo process group (CPU tensors)."""

    def __init__(self, pg: Any, *, rank: int, size: int, control_pg: Any = None, clock: Clock = REAL_CLOCK) -> None:
        self.pg = pg
        self.control_pg = pg if control_pg is None else control_pg
        self.rank = rank
        self.size = size
        self.clock = clock

    def all_reduce_sum(self, tensor: torch.Tensor) -> Traffic:
        t0 = self.clock.now()
        if self.size > 1:
            self.pg.allreduce([tensor]).wait()
        nbytes = tensor.numel() * tensor.element_size()
        cost = ring_all_reduce(nbytes, [None] * self.size)
        return Traffic("all_reduce", nbytes, cost.bytes_sent, self.clock.now() - t0)

    def all_gather(self, payload: torch.Tensor) -> tuple[list[torch.Tensor], Traffic]:
        t0 = self.clock.now()
        if self.size > 1:
            out = [torch.empty_like(payload) for _ in range(self.size)]
            self.pg.allgather([out], [payload]).wait()
        else:
            out = [payload]
        nbytes = payload.numel() * payload.element_size()
        cost = ring_all_gather(nbytes, [None] * self.size)
        return out, Traffic("all_gather", nbytes, cost.bytes_sent, self.clock.now() - t0)

    def all_to_all(self, payload: torch.Tensor) -> tuple[torch.Tensor, Traffic]:
        """Send slice j of ``payload`` (K equal slices) to site j; returns slice i of every site's payload, in
        site order (slot ``rank`` is this site's own slice, which never crosses the link)."""
        if payload.numel() % self.size:
            raise ValueError(f"all_to_all payload of {payload.numel()} elements does not split into {self.size} slices")
        t0 = self.clock.now()
        if self.size > 1:
            out = torch.empty_like(payload)
            self.pg.alltoall_base(out, payload, [], [], dist.AllToAllOptions()).wait()
        else:
            out = payload
        nbytes = payload.numel() * payload.element_size()
        cost = ring_reduce_scatter(nbytes, [None] * self.size)
        return out, Traffic("reduce_scatter", nbytes, cost.bytes_sent, self.clock.now() - t0)

    def control_sum(self, tensor: torch.Tensor) -> None:
        """A tiny unaccounted all-reduce for run control (stop votes, eval losses), never emulated. It runs on
        the control group when there is one, so it does not wait for a payload in flight on the data group."""
        if self.size > 1:
            self.control_pg.allreduce([tensor]).wait()
