"""Cross-site collectives as the algorithms see them: asynchronous, sharded over a site's workers, with a
codec slot.

``CrossSiteComm.all_reduce_mean(flat)`` returns a :class:`Pending` at once; the transfer runs on one
communication thread, so the training thread keeps computing until it calls ``wait()``. Only the time spent
blocked in ``wait()`` counts as communication wait; that is what makes overlap measurable.

With ``W`` workers per site, worker ``l`` carries shard ``l`` of the payload over cross-site group ``l``;
the reduced shards are then all-gathered inside the site over the fast fabric (on the training thread, so
the order of site-group collectives is the same on every worker).

Codecs: the lossless ``fp32`` path uses the transport's ring all-reduce. A lossy codec takes the
``reduce_scatter`` or the ``all_gather`` pattern (``geotrain.comm.pattern`` defines them and their bytes;
docs/codecs.md compares their error). Every encoder keeps error feedback (per payload key, per destination
chunk, and for the owned mean), and every site decodes the same payloads, so all sites end with
bit-identical means.

Time is read from a :class:`geotrain.clock.Clock`. A transfer runs on the communication thread from the
moment it was started (``sleep_until`` the start, a no-op on the real clock) and resolves at the time it
finished, so on a virtual clock overlapped communication costs exactly ``max(compute, transfer)``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from geotrain.clock import REAL_CLOCK, Clock
from geotrain.comm.codecs.registry import CodecChoice
from geotrain.comm.pattern import payload_bytes, resolve_pattern, shard_numel
from geotrain.comm.transport import Traffic, Transport

__all__ = ["CommStats", "ControlPending", "CrossSiteComm", "Pending"]


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
    last_transfer_seconds: float = 0.0
    """Real plus emulated time of the latest transfer: about what one still in flight may take."""
    events: list[dict[str, Any]] = field(default_factory=list)
    """Completed transfers not yet written to metrics (drained by the loop)."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, traffic: Traffic, *, key: str) -> None:
        seconds = traffic.real_seconds + traffic.emulated_seconds
        with self._lock:
            self.bytes_sent += traffic.bytes_sent
            self.collectives += 1
            self.link_seconds += seconds
            self.last_transfer_seconds = seconds
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
    """An in-flight cross-site all-reduce. ``wait()`` returns the mean, full length, on every worker.

    The future yields ``(reduced shard, time the transfer finished)``; waiting moves the caller's clock to
    that time, and the time blocked counts as communication wait.
    """

    def __init__(self, future: Future, finish: Callable[[torch.Tensor], torch.Tensor], stats: CommStats,
                 clock: Clock) -> None:
        self._future = future
        self._finish = finish
        self._stats = stats
        self._clock = clock
        self._result: torch.Tensor | None = None

    def done(self) -> bool:
        return self._future.done()

    def wait(self) -> torch.Tensor:
        if self._result is None:
            t0 = self._clock.now()
            shard, finished = self._future.result()
            self._clock.sleep_until(finished)
            self._result = self._finish(shard)
            self._stats.wait_seconds += self._clock.now() - t0
        return self._result


class ControlPending:
    """An in-flight run-control sum. ``wait()`` returns the summed values."""

    def __init__(self, future: Future, values: torch.Tensor, stats: CommStats, clock: Clock) -> None:
        self._future = future
        self._values = values
        self._stats = stats
        self._clock = clock
        self._result: list[float] | None = None

    def wait(self, *, count_wait: bool = True) -> list[float]:
        """Block until every site has contributed; ``count_wait=False`` for time already excluded (evaluation)."""
        if self._result is None:
            t0 = self._clock.now()
            self._future.result()
            if count_wait:
                self._stats.wait_seconds += self._clock.now() - t0
            self._result = self._values.tolist()
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
        codec: CodecChoice | None = None,
        error_feedback: bool = True,
        pattern: str = "auto",
        clock: Clock = REAL_CLOCK,
    ) -> None:
        self.transport = transport
        self.site_pg = site_pg
        self.local_rank = local_rank
        self.workers = workers
        self.choice = None if codec is None or codec.lossless else codec
        self.codec = None if self.choice is None else self.choice.build()
        """The torch codec of lossy payloads (None: raw fp32)."""
        self.error_feedback = error_feedback
        self.pattern = resolve_pattern(pattern, codec=self.choice, sites=transport.size)
        self.clock = clock
        self.stats = CommStats()
        self._feedback: dict[str, Any] = {}
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="geotrain-comm")
        # Run control gets its own thread too: the training thread then waits in Python, where a SIGTERM or
        # Ctrl+C can still interrupt it, never inside a blocking gloo call.
        self._control = ThreadPoolExecutor(max_workers=1, thread_name_prefix="geotrain-control")

    @property
    def sites(self) -> int:
        return self.transport.size

    def payload_bytes(self, numel: int) -> int:
        """Bytes one worker contributes to one all-reduce of ``numel`` fp32 values."""
        return payload_bytes(numel, codec=self.choice, pattern=self.pattern, sites=self.sites, workers=self.workers)

    # -- the collective ----------------------------------------------------------------------------------
    def all_reduce_mean(self, flat: torch.Tensor, *, key: str = "all") -> Pending:
        """Start averaging ``flat`` (1-D float32 CPU) across sites; returns at once."""
        assert flat.dim() == 1 and flat.dtype == torch.float32, "cross-site payloads are flat fp32"
        n = flat.numel()
        shard_len = shard_numel(n, self.workers)
        padded = flat if shard_len * self.workers == n else torch.cat([flat, flat.new_zeros(shard_len * self.workers - n)])
        shard = padded[self.local_rank * shard_len : (self.local_rank + 1) * shard_len].clone()
        future = self._pool.submit(self._reduce_shard, shard, key, self.clock.now())

        def finish(reduced: torch.Tensor) -> torch.Tensor:
            if self.workers == 1:
                return reduced[:n]
            parts = [torch.empty_like(reduced) for _ in range(self.workers)]
            self.site_pg.allgather([parts], [reduced]).wait()
            return torch.cat(parts)[:n]

        return Pending(future, finish, self.stats, self.clock)

    def _reduce_shard(self, shard: torch.Tensor, key: str, started: float) -> tuple[torch.Tensor, float]:
        self.clock.sleep_until(started)  # this thread's link was free since its last transfer ended
        if self.codec is None:
            traffic = self.transport.all_reduce_sum(shard)
            mean = shard.div_(self.sites)
        elif self.pattern == "all_gather":
            payloads, traffic = self.transport.all_gather(self._encode(shard, key))
            mean = torch.zeros_like(shard)
            for p in payloads:  # decode and accumulate in fp32
                mean += self.codec.decode(p)
            mean.div_(self.sites)
        else:
            mean, traffic = self._reduce_scatter_gather(shard, key)
        self.stats.record(traffic, key=key)
        return mean, self.clock.now()

    def _encode(self, x: torch.Tensor, key: str, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Encode ``x`` with the error feedback kept under ``key`` (one residual per key)."""
        if not self.error_feedback:
            return self.codec.encode(x, out=out)
        if key not in self._feedback:
            from geotrain.comm.codecs import ErrorFeedback

            self._feedback[key] = ErrorFeedback(self.codec)
        return self._feedback[key].encode(x, out=out)

    def _buffer(self, key: str, numel: int, dtype: torch.dtype, slot: int) -> torch.Tensor:
        """A buffer reused round after round (fresh large tensors cost more in page faults than the codec)."""
        buf = self._buffers.get((key, slot))
        if buf is None or buf.numel() != numel or buf.dtype != dtype:
            buf = self._buffers[(key, slot)] = torch.zeros(numel, dtype=dtype)
        return buf

    def _reduce_scatter_gather(self, shard: torch.Tensor, key: str) -> tuple[torch.Tensor, Traffic]:
        k, me, n = self.sites, self.transport.rank, shard.numel()
        c = -(-n // k)  # values per chunk; the last chunk is zero padded so that every payload has one size
        x = shard if c * k == n else torch.cat([shard, shard.new_zeros(c * k - n)])
        e = self.codec.encoded_size(c)  # a multiple of 8 bytes, so every slice of the buffers stays aligned
        send = self._buffer(key, k * e, torch.uint8, 0)
        for j in range(k):
            if j != me:  # slot ``me`` stays home: this site's own chunk is summed unencoded
                self._encode(x[j * c : (j + 1) * c], f"{key}/to{j}", out=send[j * e : (j + 1) * e])
        recv, scatter = self.transport.all_to_all(send)
        own = x[me * c : (me + 1) * c].clone()
        part = self._buffer(key, c, torch.float32, 1)
        for j in range(k):
            if j != me:
                own += self.codec.decode(recv[j * e : (j + 1) * e], numel=c, out=part)
        own.div_(k)
        payloads, gather = self.transport.all_gather(self._encode(own, f"{key}/mean"))
        mean = torch.empty(c * k)
        for j, p in enumerate(payloads):  # this site's own chunk too: every site must hold the same mean
            self.codec.decode(p, numel=c, out=mean[j * c : (j + 1) * c])
        traffic = Traffic(
            "reduce_scatter+all_gather",
            scatter.payload_bytes,
            scatter.bytes_sent + gather.bytes_sent,
            scatter.real_seconds + gather.real_seconds,
            scatter.emulated_seconds + gather.emulated_seconds,
        )
        return mean[:n], traffic

    def control_sum(self, values: list[float], *, count_wait: bool = True) -> list[float]:
        """Sum a few floats across sites (eval losses) and wait for the result; see :meth:`start_control_sum`."""
        return self.start_control_sum(values).wait(count_wait=count_wait)

    def start_control_sum(self, values: list[float]) -> ControlPending:
        """Start summing a few floats across sites (stop votes, eval losses); returns at once.

        The transport runs it on the control group, beside (not behind) any payload in flight. It completes
        only when every site has started it, so the time ``wait()`` blocks is time spent waiting for the
        slowest site, and by default it counts as communication wait. Every site must start the same control
        sums in the same order (one control thread runs them in turn)."""
        t = torch.tensor(values, dtype=torch.float64)
        return ControlPending(self._control.submit(self.transport.control_sum, t), t, self.stats, self.clock)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._control.shutdown(wait=False, cancel_futures=True)
