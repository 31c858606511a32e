"""Cross-site collectives as the algorithms see them: asynchronous, sharded over a site's workers, with a
codec slot.

``CrossSiteComm.all_reduce_mean(flat)`` returns a :class:`Pending` at once; the transfer runs on one
communication thread, so the training thread keeps computing until it calls ``wait()``. Only the time spent
blocked in ``wait()`` counts as communication wait; that is what makes overlap measurable.

With ``W`` workers per site, worker ``l`` carries shard ``l`` of the payload over cross-site group ``l``;
the reduced shards are then all-gathered inside the site over the fast fabric (on the training thread, so
the order of site-group collectives is the same on every worker).

Codecs: the lossless ``fp32`` path uses the transport's ring all-reduce. A lossy codec encodes on the
sender (with error feedback kept per payload key), all-gathers the encoded payloads, and decodes and sums
them in fp32 on every site, so each payload is quantized exactly once (see docs/codecs.md).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from geotrain.comm.transport import Traffic, Transport

__all__ = ["CommStats", "CrossSiteComm", "Pending"]


@dataclass(slots=True)
class CommStats:
    """Running totals of one worker's cross-site traffic."""

    bytes_sent: int = 0
    collectives: int = 0
    wait_seconds: float = 0.0
    """Time the training thread spent blocked on cross-site communication."""
    link_seconds: float = 0.0
    """Real plus emulated time of all transfers (overlapped or not)."""
    peak_bandwidth_bps: float = 0.0
    """Highest rate one transfer reached: its bits over its transfer time (real plus emulated)."""
    max_transfer_bytes: int = 0
    """Largest payload one transfer put on the wire: what a link must carry at once."""
    events: list[dict[str, Any]] = field(default_factory=list)
    """Completed transfers not yet written to metrics (drained by the loop)."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, traffic: Traffic, *, key: str) -> None:
        seconds = traffic.real_seconds + traffic.emulated_seconds
        with self._lock:
            self.bytes_sent += traffic.bytes_sent
            self.collectives += 1
            self.link_seconds += seconds
            self.max_transfer_bytes = max(self.max_transfer_bytes, traffic.bytes_sent)
            if seconds > 0:
                self.peak_bandwidth_bps = max(self.peak_bandwidth_bps, 8.0 * traffic.bytes_sent / seconds)
            self.events.append(
                {"key": key, "pattern": traffic.pattern, "bytes": traffic.bytes_sent, "seconds": seconds}
            )

    def drain(self) -> list[dict[str, Any]]:
        with self._lock:
            out, self.events = self.events, []
        return out


class Pending:
    """An in-flight cross-site all-reduce. ``wait()`` returns the mean, full length, on every worker."""

    def __init__(self, future: Future, finish: Callable[[torch.Tensor], torch.Tensor], stats: CommStats) -> None:
        self._future = future
        self._finish = finish
        self._stats = stats
        self._result: torch.Tensor | None = None

    def done(self) -> bool:
        return self._future.done()

    def wait(self) -> torch.Tensor:
        if self._result is None:
            t0 = time.perf_counter()
            shard = self._future.result()
            self._result = self._finish(shard)
            self._stats.wait_seconds += time.perf_counter() - t0
        return self._result


class CrossSiteComm:
    """Cross-site all-reduce for one worker, over ``transport`` (real or emulated)."""

    def __init__(
        self,
        transport: Transport,
        *,
        site_pg: Any,
        local_rank: int,
        workers: int,
        codec: Any = None,
        error_feedback: bool = True,
    ) -> None:
        self.transport = transport
        self.site_pg = site_pg
        self.local_rank = local_rank
        self.workers = workers
        self.codec = None if codec is None or getattr(codec, "lossless", False) else codec
        self.error_feedback = error_feedback
        self.stats = CommStats()
        self._feedback: dict[str, Any] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="geotrain-comm")

    @property
    def sites(self) -> int:
        return self.transport.size

    def payload_bytes(self, numel: int) -> int:
        """Bytes one worker contributes to one all-reduce of ``numel`` fp32 values."""
        shard = -(-numel // self.workers)
        return shard * 4 if self.codec is None else self.codec.encoded_size(shard)

    # -- the collective ----------------------------------------------------------------------------------
    def all_reduce_mean(self, flat: torch.Tensor, *, key: str = "all") -> Pending:
        """Start averaging ``flat`` (1-D float32 CPU) across sites; returns at once."""
        assert flat.dim() == 1 and flat.dtype == torch.float32, "cross-site payloads are flat fp32"
        n = flat.numel()
        shard_len = -(-n // self.workers)
        padded = flat if shard_len * self.workers == n else torch.cat([flat, flat.new_zeros(shard_len * self.workers - n)])
        shard = padded[self.local_rank * shard_len : (self.local_rank + 1) * shard_len].clone()
        future = self._pool.submit(self._reduce_shard, shard, key)

        def finish(reduced: torch.Tensor) -> torch.Tensor:
            if self.workers == 1:
                return reduced[:n]
            parts = [torch.empty_like(reduced) for _ in range(self.workers)]
            self.site_pg.allgather([parts], [reduced]).wait()
            return torch.cat(parts)[:n]

        return Pending(future, finish, self.stats)

    def _reduce_shard(self, shard: torch.Tensor, key: str) -> torch.Tensor:
        if self.codec is None:
            traffic = self.transport.all_reduce_sum(shard)
            total = shard
        else:
            if self.error_feedback:
                if key not in self._feedback:
                    from geotrain.comm.codecs import ErrorFeedback

                    self._feedback[key] = ErrorFeedback(self.codec)
                payload = self._feedback[key].encode(shard)
            else:
                payload = self.codec.encode(shard)
            payloads, traffic = self.transport.all_gather(payload)
            total = torch.zeros_like(shard)
            for p in payloads:  # decode and accumulate in fp32
                total += self.codec.decode(p)
        self.stats.record(traffic, key=key)
        return total.div_(self.sites)

    def control_sum(self, values: list[float]) -> list[float]:
        """Sum a few floats across sites (stop votes, eval losses), in order with the data collectives."""
        t = torch.tensor(values, dtype=torch.float64)
        self._pool.submit(self.transport.control_sum, t).result()
        return t.tolist()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
