"""Cross-site collectives as the algorithms see them: asynchronous, sharded over a site's workers, with a codec
slot, guarded, and elastic.

``CrossSiteComm.all_reduce_mean(flat)`` returns a :class:`Pending` at once; the sync runs on one
communication thread, so the training thread keeps computing until it calls ``wait()``. Only the time spent
blocked in ``wait()`` counts as communication wait; that is what makes overlap measurable.

With ``W`` workers per site, worker ``l`` carries shard ``l`` of the payload over cross-site group ``l``;
the reduced shards are then all-gathered inside the site over the fast fabric (on the training thread, so
the order of site-group collectives is the same on every worker). Under FSDP (``sharded=True``) a worker's
payload is already its own shard of the model: it travels whole and is not gathered.

**One sync, on the communication thread** (each step a request to the coordinator or a gloo collective):

1. *quorum*: who takes part. When a site has left, the coordinator starts a new generation and every
   survivor builds new groups on its store prefix (``make_transport``).
2. *exchange* in the codec's pattern (``geotrain.comm.pattern``): in ``reduce_scatter`` each site sends
   encoded chunk j to site j, which decodes what it received; in ``all_gather`` every payload goes everywhere.
   Every codec goes this way, lossless fp32 included, so every payload carries its checksums.
3. *guard vote*: receivers report per sender whether the payload decoded, whether it is finite, and its sum
   of squares (``geotrain.comm.guard``); the coordinator sums the reports and every site leaves the same
   senders out of the mean.
4. in ``reduce_scatter``, each site encodes its mean chunk and all-gathers it, then a *commit vote*.
5. a vote that says abort (a site died or failed anywhere) makes every site drop the attempt: its
   error-feedback residuals roll back, and the sync is tried again on a new generation, up to
   ``membership.max_attempts`` times. So a sync's result is the same on every site, or on none.

Every encoder keeps error feedback (per payload key, per destination chunk, and for the owned mean); a
change in the number of sites re-cuts the chunks, and the residual of the old chunks is carried whole into
the next payload of that key. Every site decodes the same payloads, so all sites end with bit-identical means.

Time is read from a :class:`geotrain.clock.Clock`. A transfer runs on the communication thread from the
moment it was started (``sleep_until`` the start, a no-op on the real clock) and resolves at the time it
finished, so on a virtual clock overlapped communication costs exactly ``max(compute, transfer)``.
"""

from __future__ import annotations

import hashlib
import math
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from geotrain.clock import REAL_CLOCK, Clock
from geotrain.comm.codecs.registry import CodecChoice, CodecError
from geotrain.comm.guard import STATS, Guard, GuardConfig, Rejection
from geotrain.comm.pattern import payload_bytes, resolve_pattern, shard_numel
from geotrain.comm.transport import Traffic, Transport
from geotrain.membership.client import Evicted, MembershipClient, MembershipError

__all__ = ["CommStats", "ControlPending", "CrossSiteComm", "Pending", "SyncOutcome", "sender_mean"]

_REPORT_SLICE = 1 << 16
"""Values the guard's report converts to float64 at a time (512 KiB: stays in cache)."""
_TRANSFER_ERRORS = (RuntimeError, CodecError, OSError, ValueError)
"""What a failed exchange raises: gloo's errors (a closed connection, a timeout), an emulated deadline, a
payload that does not decode as a whole."""


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
    failed_attempts: int = 0
    """Sync attempts voted down (a site failed or left mid-sync) and tried again."""
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

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("bytes_sent", "collectives", "wait_seconds", "link_seconds",
                                               "peak_bandwidth_bps", "max_transfer_bytes", "failed_attempts")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, type(getattr(self, k))(v))


@dataclass(slots=True)
class SyncOutcome:
    """What one sync decided, besides its mean: the same on every site."""

    sync: int
    key: str
    generation: int = -1
    members: list[int] = field(default_factory=list)
    left: list[int] = field(default_factory=list)
    """Sites that left before or during this sync (a new generation without them)."""
    admit: bool = False
    """Joiners are waiting: every site admits them at the step where it waits for this sync."""
    rejected: list[Rejection] = field(default_factory=list)
    attempts: int = 1
    errors: dict[str, str] = field(default_factory=dict)
    """Why attempts failed, per site and worker."""
    regroup_seconds: float = 0.0
    """Time this worker spent building new groups for this sync (a generation changed)."""


class Pending:
    """An in-flight cross-site all-reduce. ``wait()`` returns the mean, full length, on every worker.

    The future yields ``(reduced shard, time the transfer finished, outcome)``; waiting moves the caller's
    clock to that time, and the time blocked counts as communication wait. A sync that cannot complete raises
    here: :class:`Evicted` (this site must join again) or :class:`MembershipError` (the run cannot go on).
    """

    def __init__(self, future: Future | None, finish: Callable[[torch.Tensor], torch.Tensor], comm: CrossSiteComm,
                 *, result: torch.Tensor | None = None) -> None:
        self._future = future
        self._finish = finish
        self._comm = comm
        self._result = result
        self.outcome: SyncOutcome | None = None

    @classmethod
    def completed(cls, result: torch.Tensor, comm: CrossSiteComm) -> Pending:
        """A sync whose mean is already known (restored from a checkpoint)."""
        return cls(None, lambda t: t, comm, result=result)

    def done(self) -> bool:
        return self._result is not None or (self._future is not None and self._future.done())

    def wait(self) -> torch.Tensor:
        if self._result is None:
            assert self._future is not None
            clock = self._comm.clock
            t0 = clock.now()
            shard, finished, outcome = self._future.result()
            clock.sleep_until(finished)
            self._result = self._finish(shard)
            self._comm.stats.wait_seconds += clock.now() - t0
            self.outcome = outcome
            self._comm._observe(outcome)
        return self._result


class ControlPending:
    """An in-flight run-control sum. ``wait()`` returns the summed values."""

    def __init__(self, future: Future, stats: CommStats, clock: Clock) -> None:
        self._future = future
        self._stats = stats
        self._clock = clock
        self._result: list[float] | None = None

    def wait(self, *, count_wait: bool = True) -> list[float]:
        """Block until every member has contributed; ``count_wait=False`` for time already excluded (evaluation)."""
        if self._result is None:
            t0 = self._clock.now()
            self._result = self._future.result()
            if count_wait:
                self._stats.wait_seconds += self._clock.now() - t0
        return self._result


class _Aborted(Exception):
    """A vote said that this attempt failed somewhere."""

    def __init__(self, decision: dict[str, Any]) -> None:
        super().__init__("sync attempt voted down")
        self.decision = decision


def sender_mean(decoded: list[torch.Tensor], accepted: list[int], *,
                carried: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """The mean of the accepted senders' decoded payloads, summed in rank order on every site (bit-identical).

    Without ``carried`` every value is divided by the number of accepted senders. With it (each accepted
    sender's carried positions, for codecs with ``mean_over_senders``), a value is divided by the number of
    accepted senders whose payload carried it, counted from the positions (a value sent as 0 still counts),
    and a value no sender carried stays 0: SparseLoCo's ``scatter_reduce(reduce="mean", include_self=False)``.
    """
    mean = torch.zeros_like(decoded[accepted[0]])
    for j in accepted:
        mean += decoded[j]
    if carried is None:
        return mean.div_(len(accepted))
    senders = torch.zeros_like(mean)
    for j in accepted:  # positions are distinct within one payload
        senders[carried[j]] += 1.0
    return mean.div_(senders.clamp_(min=1.0))


MakeTransport = Callable[[int, list[int]], Transport]
"""(generation, members) -> this worker's transport over that generation's cross-site group."""


class CrossSiteComm:
    """Cross-site all-reduce for one worker of site ``site``, over the groups ``make_transport`` builds."""

    def __init__(
        self,
        *,
        membership: MembershipClient,
        make_transport: MakeTransport,
        site: int,
        sites: int,
        site_pg: Any,
        local_rank: int,
        workers: int,
        codec: CodecChoice,
        generation: int,
        members: list[int],
        pattern: str = "auto",
        error_feedback: bool = True,
        guard: GuardConfig | None = None,
        max_attempts: int = 3,
        vote_deadline: Callable[[int], float] | None = None,
        clock: Clock = REAL_CLOCK,
        sharded: bool = False,
    ) -> None:
        self.membership = membership
        self.make_transport = make_transport
        self.site = site
        self.site_pg = site_pg
        self.local_rank = local_rank
        self.workers = workers
        self.sharded = sharded
        """Each worker's payloads and state are its own (FSDP shards), not a replica's slice to cut and gather."""
        self.choice = codec
        self.codec = codec.build()
        """The torch codec of every payload (fp32 included, so every payload carries its checksums)."""
        self.error_feedback = error_feedback
        self.pattern = resolve_pattern(pattern, codec=codec, sites=sites)
        """Chosen once for the run's configured number of sites, and kept as sites leave and join."""
        self.guard = Guard(guard or GuardConfig())
        self.max_attempts = max_attempts
        self.vote_deadline = vote_deadline
        self.clock = clock
        self.stats = CommStats()
        self.syncs = 0
        """Cross-site syncs started (the same sequence on every site): each names its barriers."""
        self.round = 0
        """The outer round, for the coordinator's events (set by the loop)."""
        self.generation = -1
        self.members: list[int] = []
        self.transport: Transport | None = None
        self.poison_next = False
        """Fault injection: the next payload this site sends is replaced by NaNs (with valid checksums)."""
        self.scale_next = 1.0
        """Fault injection: the next pseudo-gradient this site sends is multiplied by this."""
        self.admission_due = False
        """Set when the training thread waits for a sync whose quorum saw joiners: admit them at this step."""
        self.heal_errors: list[str] = []
        """Transfers of the state to a joiner that failed (the joiner is dropped; the healer goes on)."""
        self.outcomes: list[SyncOutcome] = []
        """Outcomes waited for and not yet read by the loop (membership changes, rejected updates)."""
        self._feedback: dict[str, Any] = {}
        self._external: dict[str, Any] = {}
        """Error feedback that callers own, per payload key (kept in their state, not in this one's)."""
        self._carry: dict[str, torch.Tensor] = {}
        self._layout: dict[str, tuple[int, int]] = {}
        """Per payload key in reduce_scatter: (values per chunk, chunks) of its residuals."""
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}
        self._phase = "commit"
        self._position: Any = None
        self.observed_members: list[int] = list(members)
        """The members as the training thread last learned them (from a sync it waited for, or an admission):
        the same on every site at the same step, unlike ``members``, which the communication thread moves."""
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="geotrain-comm")
        self._healing: Future | None = None
        """A heal this member sends in the background (:meth:`admit`)."""
        self.background_heal: Callable[[int, list[int]], bool] | None = None
        """``(healer, joiners) -> bool``: the rule for sending a heal in the background; None: always blocking."""
        # Run control gets its own thread too: the training thread then waits in Python, where a SIGTERM or
        # Ctrl+C can still interrupt it, never inside a blocking request.
        self._control = ThreadPoolExecutor(max_workers=1, thread_name_prefix="geotrain-control")
        self._regroup(generation, members)

    @property
    def sites(self) -> int:
        """Sites in the current generation."""
        return len(self.members)

    def payload_bytes(self, numel: int) -> int:
        """Bytes one worker contributes to one all-reduce of ``numel`` fp32 values (at the configured sites)."""
        return payload_bytes(numel, codec=self.choice, pattern=self.pattern, sites=self.sites, workers=self.workers)

    # -- generations -----------------------------------------------------------------------------------------
    def _regroup(self, generation: int, members: list[int]) -> None:
        """Build this worker's transport for a new generation (its gloo group on the generation's prefix)."""
        if self.site not in members:  # the coordinator dropped this site meanwhile: join again, be healed
            raise Evicted(f"generation {generation} of sites {list(members)} no longer holds site {self.site}")
        old = self.sites
        self.transport = None  # the old group's sockets close with it
        self.transport = self.make_transport(generation, list(members))
        self.generation, self.members = generation, list(members)
        if old and old != self.sites:
            self._recut()

    def _recut(self) -> None:
        """The number of sites changed: chunk j of a payload now covers other values. Carry each key's
        per-destination residuals, laid out on the old chunks, whole into its next payload, and forget the
        owned-mean residuals (the owner of those values may have changed)."""
        for key, (c, k) in list(self._layout.items()):
            carry = self._carry.get(key)
            if carry is None:
                carry = torch.zeros(c * k)
            for j in range(k):
                fb = self._feedback.pop(f"{key}/to{j}", None)
                if fb is not None and fb.residual is not None:
                    carry[j * c: (j + 1) * c] += fb.residual
            self._feedback.pop(f"{key}/mean", None)
            self._carry[key] = carry
            del self._layout[key]

    # -- the collective ----------------------------------------------------------------------------------
    def all_reduce_mean(self, flat: torch.Tensor, *, key: str = "all", position: Any = None,
                        feedback: Any = None) -> Pending:
        """Start averaging ``flat`` (1-D float32 CPU) across sites; returns at once. ``position``: this worker's
        data position after the batches that made ``flat`` (kept by the coordinator for a site that rejoins).

        ``feedback``: an ``ErrorFeedback`` the caller owns (an algorithm whose accumulator is its own state, as
        SparseLoCo's), used for this key instead of the collective's own residual; it commits or rolls back
        with the sync like any other. Only in the ``all_gather`` pattern, where a site encodes its payload once."""
        assert flat.dim() == 1 and flat.dtype == torch.float32, "cross-site payloads are flat fp32"
        if feedback is not None:
            if self.pattern != "all_gather":
                raise ValueError(f"a caller's error feedback needs the all_gather pattern, not {self.pattern}")
            self._external[key] = feedback
        n = flat.numel()
        if self.sharded:
            shard = flat.clone()
        else:
            shard_len = shard_numel(n, self.workers)
            padded = flat if shard_len * self.workers == n else torch.cat(
                [flat, flat.new_zeros(shard_len * self.workers - n)])
            shard = padded[self.local_rank * shard_len : (self.local_rank + 1) * shard_len].clone()
        sync = self.syncs
        self.syncs += 1
        future = self._pool.submit(self._sync, shard, key, self.clock.now(), sync, position)

        def finish(reduced: torch.Tensor) -> torch.Tensor:
            if self.workers == 1 or self.sharded:
                return reduced[:n]
            parts = [torch.empty_like(reduced) for _ in range(self.workers)]
            self.site_pg.allgather([parts], [reduced]).wait()
            return torch.cat(parts)[:n]

        return Pending(future, finish, self)

    def _observe(self, outcome: SyncOutcome) -> None:
        """The training thread received ``outcome`` (at the same step on every site)."""
        self.outcomes.append(outcome)
        self.observed_members = list(outcome.members)
        if outcome.admit:
            self.admission_due = True

    def _sync(self, shard: torch.Tensor, key: str, started: float, sync: int,
              position: Any) -> tuple[torch.Tensor, float, SyncOutcome]:
        self.clock.sleep_until(started)  # this thread's link was free since its last transfer ended
        outcome = SyncOutcome(sync=sync, key=key)
        carry = self._carry.get(key)
        x = shard if carry is None else shard + carry[: shard.numel()]
        if self.scale_next != 1.0:  # fault injection: an outlier
            x, self.scale_next = x * self.scale_next, 1.0
        poison, self.poison_next = self.poison_next, False
        self._position = position
        for attempt in range(self.max_attempts):
            q = self.membership.quorum(sync, round=self.round, attempt=attempt)
            outcome.left += [k for k in q.get("left", []) if k not in outcome.left]
            outcome.admit = outcome.admit or bool(q.get("admit"))
            if q["gen"] != self.generation:
                t0 = time.perf_counter()  # wall time, on any clock: how long re-forming takes
                self._regroup(q["gen"], q["members"])
                outcome.regroup_seconds += time.perf_counter() - t0
            outcome.generation, outcome.members = self.generation, list(self.members)
            touched: list[tuple[Any, bool]] = []  # (error feedback, whether it encoded this site's own values)
            self._phase = "guard" if self.pattern == "reduce_scatter" else "commit"
            try:
                try:
                    mean, traffic, rejected = self._exchange(x, key, sync, attempt, touched, poison=poison)
                except _TRANSFER_ERRORS as e:
                    d = self._vote(sync, attempt, self._phase, ok=False, error=f"{type(e).__name__}: {e}")
                    raise _Aborted(d) from None
            except _Aborted as aborted:
                for fb, _ in touched:
                    fb.rollback()
                self.stats.failed_attempts += 1
                outcome.attempts = attempt + 2
                outcome.errors.update(aborted.decision.get("errors") or {})
                outcome.left += [k for k in aborted.decision.get("gone", []) if k not in outcome.left]
                continue
            mine_rejected = any(r.site == self.site for r in rejected)
            for fb, own in touched:
                fb.rollback() if (own and mine_rejected) else fb.commit()
            if carry is not None and not mine_rejected:
                del self._carry[key]
            self.stats.record(traffic, key=key)
            outcome.rejected = rejected
            outcome.attempts = attempt + 1
            return mean, self.clock.now(), outcome
        raise MembershipError(
            f"sync {sync} ({key}) failed {self.max_attempts} times (membership.max_attempts); last errors: "
            + "; ".join(f"{k}: {v}" for k, v in list(outcome.errors.items())[-4:]))

    def _vote(self, sync: int, attempt: int, phase: str, *, ok: bool, stats: list[float] | None = None,
              error: str | None = None, nbytes: int = 0) -> dict[str, Any]:
        """Vote on ``phase`` of this attempt (the commit vote carries this worker's data position)."""
        deadline = None if self.vote_deadline is None else self.vote_deadline(nbytes)
        position = self._position if phase == "commit" and ok else None
        return self.membership.vote(sync, gen=self.generation, attempt=attempt, phase=phase, ok=ok, stats=stats,
                                    error=error, position=position, deadline_s=deadline)

    def _encode(self, x: torch.Tensor, key: str, touched: list, *, own: bool, poison: bool = False,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """Encode ``x`` with the error feedback kept under ``key`` (one residual per key)."""
        external = self._external.get(key)
        if external is not None:
            payload = external.encode(x, out=out)
            touched.append((external, own))
        elif not self.error_feedback:
            payload = self.codec.encode(x, out=out)
        else:
            fb = self._feedback.get(key)
            if fb is None:
                from geotrain.comm.codecs import ErrorFeedback

                fb = self._feedback[key] = ErrorFeedback(self.codec)
            payload = fb.encode(x, out=out)
            touched.append((fb, own))
        if poison:  # fault injection: what a site with a bug or bad intent could send
            from geotrain.comm.codecs.base import poison_payload

            poison_payload(payload)
        return payload

    def _buffer(self, key: str, numel: int, dtype: torch.dtype, slot: int) -> torch.Tensor:
        """A buffer reused round after round (fresh large tensors cost more in page faults than the codec)."""
        buf = self._buffers.get((key, slot))
        if buf is None or buf.numel() != numel or buf.dtype != dtype:
            buf = self._buffers[(key, slot)] = torch.zeros(numel, dtype=dtype)
        return buf

    @staticmethod
    def _report(values: torch.Tensor) -> list[float]:
        """The guard's report on decoded values: [0, non-finite count, sum of squares of the finite ones].

        The sum of squares is taken in float64 a slice at a time: a finiteness mask and float64 copies of the
        whole payload took about 40 ms per 1.7M values on one core, the slices about 1.5 ms. A float32 value
        squared cannot overflow a float64, so the sum is finite exactly when every value is: the non-finite values
        are counted only when it is not."""
        flat = values.reshape(-1)
        squares = 0.0
        for i in range(0, flat.numel(), _REPORT_SLICE):
            squares += float(flat[i: i + _REPORT_SLICE].double().square_().sum())
        if math.isfinite(squares):
            return [0.0, 0.0, squares]
        finite = torch.isfinite(values)
        nonfinite = float(values.numel() - int(finite.sum()))
        kept = values if not nonfinite else torch.where(finite, values, 0.0)
        return [0.0, nonfinite, float(kept.double().square().sum())]

    def _check(self, payload: torch.Tensor, numel: int, out: torch.Tensor) -> list[float]:
        """Decode one received payload into ``out`` and report on it (a payload that fails to decode: [1, 0, 0])."""
        try:
            self.codec.decode(payload, numel=numel, out=out)
        except CodecError:
            out.zero_()
            return [1.0, 0.0, 0.0]
        return self._report(out)

    def _exchange(self, x: torch.Tensor, key: str, sync: int, attempt: int, touched: list,
                  *, poison: bool) -> tuple[torch.Tensor, Traffic, list[Rejection]]:
        assert self.transport is not None
        if self.pattern == "all_gather":
            return self._all_gather(x, key, sync, attempt, touched, poison)
        return self._reduce_scatter_gather(x, key, sync, attempt, touched, poison)

    def _decided(self, key: str, d: dict[str, Any]) -> tuple[list[int], list[Rejection]]:
        if not d.get("commit"):
            raise _Aborted(d)
        accepted, rejected = self.guard.decide(key, d["stats"], self.members)
        if not accepted:
            raise MembershipError("every site's update was left out of the sync ("
                                  + "; ".join(f"site {r.site}: {r.reason}" for r in rejected) + ")")
        return accepted, rejected

    def _all_gather(self, x: torch.Tensor, key: str, sync: int, attempt: int, touched: list,
                    poison: bool) -> tuple[torch.Tensor, Traffic, list[Rejection]]:
        k, me, n = self.sites, self.transport.rank, x.numel()
        payloads, traffic = self.transport.all_gather(self._encode(x, key, touched, own=True, poison=poison))
        decoded = [torch.empty(n) for _ in range(k)]
        stats = [0.0] * (STATS * k)
        for j, p in enumerate(payloads):
            report = self._check(p, n, decoded[j])
            if j == (me + 1) % k:  # each sender is reported once: by the site after it in the ring
                stats[STATS * j: STATS * j + STATS] = report
        d = self._vote(sync, attempt, "commit", ok=True, stats=stats, nbytes=traffic.payload_bytes)
        accepted, rejected = self._decided(key, d)
        carried = None
        if self.codec.mean_over_senders:
            carried = {j: self.codec.carried(payloads[j]) for j in accepted}
        return sender_mean(decoded, accepted, carried=carried), traffic, rejected

    def _reduce_scatter_gather(self, x: torch.Tensor, key: str, sync: int, attempt: int, touched: list,
                               poison: bool) -> tuple[torch.Tensor, Traffic, list[Rejection]]:
        k, me, n = self.sites, self.transport.rank, x.numel()
        c = -(-n // k)  # values per chunk; the last chunk is zero padded so that every payload has one size
        self._layout[key] = (c, k)
        x = x if c * k == n else torch.cat([x, x.new_zeros(c * k - n)])
        e = self.codec.encoded_size(c)  # a multiple of 8 bytes, so every slice of the buffers stays aligned
        send = self._buffer(key, k * e, torch.uint8, 0)
        for j in range(k):
            if j != me:  # slot ``me`` stays home: this site's own chunk is summed unencoded
                self._encode(x[j * c: (j + 1) * c], f"{key}/to{j}", touched, own=True, poison=poison,
                             out=send[j * e: (j + 1) * e])
        recv, scatter = self.transport.all_to_all(send)
        parts = [torch.empty(c) for _ in range(k)]
        stats = [0.0] * (STATS * k)
        for j in range(k):
            if j == me:
                parts[j].copy_(x[me * c: (me + 1) * c])
                report = self._report(parts[j])
            else:
                report = self._check(recv[j * e: (j + 1) * e], c, parts[j])
            stats[STATS * j: STATS * j + STATS] = report
        d = self._vote(sync, attempt, "guard", ok=True, stats=stats, nbytes=scatter.payload_bytes)
        accepted, rejected = self._decided(key, d)
        self._phase = "commit"
        own = parts[me].clone() if me in accepted else torch.zeros(c)
        for j in accepted:  # this site's own chunk, then the others in rank order
            if j != me:
                own += parts[j]
        own.div_(len(accepted))
        payloads, gather = self.transport.all_gather(self._encode(own, f"{key}/mean", touched, own=False))
        mean = torch.empty(c * k)
        for j, p in enumerate(payloads):  # this site's own chunk too: every site must hold the same mean
            self.codec.decode(p, numel=c, out=mean[j * c: (j + 1) * c])
        d = self._vote(sync, attempt, "commit", ok=True, nbytes=gather.payload_bytes)
        if not d.get("commit"):
            raise _Aborted(d)
        traffic = Traffic(
            "reduce_scatter+all_gather",
            scatter.payload_bytes,
            scatter.bytes_sent + gather.bytes_sent,
            scatter.real_seconds + gather.real_seconds,
            scatter.emulated_seconds + gather.emulated_seconds,
        )
        return mean[:n], traffic, rejected

    # -- admissions and healing ------------------------------------------------------------------------------
    def admit(self, build_state: Callable[[], bytes]) -> dict[str, Any]:
        """Every member calls this at the same step, with nothing in flight: the coordinator admits the joiners
        waiting now, every member moves to the new generation, and the healer (one live member) sends each
        joiner its state, ``build_state()``, worker by worker (each carries one shard). Returns the admission,
        with ``background``: whether the heal goes on while the members train (:meth:`heals_in_background`),
        or every member waited for it (``geotrain.membership.heal``)."""
        t0 = self.clock.now()
        self._finish_healing()
        q = self._pool.submit(self._admission).result()
        background = bool(q["joined"]) and self.heals_in_background(q["healer"], q["joined"])
        if q["joined"] and q["healer"] == self.site:
            blob = build_state()
            sending = self._pool.submit(self._send_state, blob, [self.members.index(j) for j in q["joined"]])
            if background:  # the next sync on this pool goes out after it, as it would on the link
                self._healing = sending
            else:
                sending.result()
        if q["joined"] and not background:
            self.healed_barrier(q["gen"])
        self.stats.wait_seconds += self.clock.now() - t0
        return {**q, "background": background}

    def heals_in_background(self, healer: int, joiners: list[int]) -> bool:
        """Whether ``healer``'s state goes to ``joiners`` in the background: the rule the site sets
        (``geotrain.membership.heal.heals_in_background``); blocking when none is set."""
        return self.background_heal is not None and bool(self.background_heal(healer, joiners))

    def _finish_healing(self) -> None:
        """A background heal's send is over (the pool runs it before anything queued after it); an error that is
        not a transfer failure (those are in ``heal_errors``) surfaces here."""
        if self._healing is not None:
            sending, self._healing = self._healing, None
            sending.result()

    def healed_barrier(self, generation: int) -> None:
        """Members and joiners start the next round together, once the state has arrived: the healer's link
        is busy while it sends, so a round begun meanwhile would wait on it past its transfer deadline."""
        self.control_sum(f"healed/{generation}", [0.0], count_wait=False)

    def _admission(self) -> dict[str, Any]:
        q = self.membership.admit(self.syncs)
        if q["gen"] != self.generation:
            self._regroup(q["gen"], q["members"])
        elif q["joined"]:  # the decision of an admission this worker already took part in (asked again at the
            q = {**q, "joined": [], "healer": None}  # same sync count): its joiners are members and healed
        self.observed_members = list(self.members)
        return q

    def _shard_bounds(self, total: int) -> tuple[int, int]:
        if self.sharded:  # each worker's state is its own: it travels whole
            return 0, total
        size = -(-total // self.workers)
        start = min(total, self.local_rank * size)
        return start, min(total, start + size)

    def _send_state(self, blob: bytes, ranks: list[int]) -> None:
        start, end = self._shard_bounds(len(blob))
        header = torch.tensor([len(blob), start, end, *struct.unpack("<4q", hashlib.sha256(blob).digest())],
                              dtype=torch.int64)
        shard = torch.frombuffer(bytearray(blob[start:end]), dtype=torch.uint8) if end > start else torch.zeros(
            0, dtype=torch.uint8)
        for r in ranks:
            try:
                self.transport.send(header, r)
                if shard.numel():
                    traffic = self.transport.send(shard, r)
                    self.stats.record(traffic, key="heal")
            except _TRANSFER_ERRORS as e:  # the joiner went away: it is dropped and joins again; the run goes on
                self.heal_errors.append(f"sending the state to site {self.members[r]} failed: {e}")

    def receive_state(self, healer: int) -> bytes:
        """A joiner's side of :meth:`admit`: this worker's shard from the healer, then the site's shards put
        together (over the fast fabric) and checked against the healer's SHA-256."""
        t0 = self.clock.now()
        header, shard = self._pool.submit(self._recv_state, self.members.index(healer)).result()
        total, start, end = (int(v) for v in header[:3])
        sha = struct.pack("<4q", *(int(v) for v in header[3:]))
        size = total if self.sharded else -(-total // self.workers)
        padded = torch.zeros(size, dtype=torch.uint8)
        padded[: end - start] = shard
        if self.workers > 1 and not self.sharded:
            parts = [torch.empty_like(padded) for _ in range(self.workers)]
            self.site_pg.allgather([parts], [padded]).wait()
            blob = bytes(torch.cat(parts)[:total].numpy())
        else:
            blob = bytes(padded[:total].numpy())
        if hashlib.sha256(blob).digest() != sha:
            from geotrain.train.state import StateError

            raise StateError(f"the state received from site {healer} does not match its SHA-256", field="heal")
        self.stats.wait_seconds += self.clock.now() - t0
        return blob

    def _recv_state(self, src: int) -> tuple[torch.Tensor, torch.Tensor]:
        header = torch.zeros(7, dtype=torch.int64)
        self.transport.recv(header, src)
        start, end = int(header[1]), int(header[2])
        shard = torch.empty(end - start, dtype=torch.uint8)
        if end > start:
            self.transport.recv(shard, src)
        return header, shard

    def gather_bytes(self, blob: bytes) -> dict[int, bytes] | None:
        """At the end of a run, every member's ``blob`` to the lowest member (which returns them by site; the
        others return None). A member that fails meanwhile is left out."""
        return self._pool.submit(self._gather_bytes, blob).result()

    def _gather_bytes(self, blob: bytes) -> dict[int, bytes] | None:
        root = min(self.members)
        if self.site != root:
            data = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.zeros(0, dtype=torch.uint8)
            self.transport.send(torch.tensor([len(blob)], dtype=torch.int64), self.members.index(root))
            if len(blob):
                self.transport.send(data, self.members.index(root))
            return None
        out = {self.site: blob}
        for k in self.members:
            if k == root:
                continue
            try:
                size = torch.zeros(1, dtype=torch.int64)
                self.transport.recv(size, self.members.index(k))
                data = torch.empty(int(size[0]), dtype=torch.uint8)
                if data.numel():
                    self.transport.recv(data, self.members.index(k))
                out[k] = bytes(data.numpy())
            except _TRANSFER_ERRORS:
                continue
        return out

    # -- run control -----------------------------------------------------------------------------------------
    def control_sum(self, name: str, values: list[float], *, count_wait: bool = True) -> list[float]:
        """Sum a few floats over the members (eval losses); see :meth:`start_control_sum`."""
        return self.start_control_sum(name, values).wait(count_wait=count_wait)

    def start_control_sum(self, name: str, values: list[float]) -> ControlPending:
        """Start summing a few floats over the members (stop votes, eval losses); returns at once.

        The coordinator sums them, beside (not behind) any payload in flight. It completes when every member
        has contributed to ``name`` (a name the same on every site, such as ``eval/1200``), so the time
        ``wait()`` blocks is time spent waiting for the slowest site, and by default it counts as
        communication wait. A member that leaves meanwhile is left out of the sum."""
        future = self._control.submit(self.membership.sum, name, [float(v) for v in values])
        return ControlPending(future, self.stats, self.clock)

    # -- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (this worker's own: residuals are the sender's)."""
        residuals = {k: fb.residual.clone() for k, fb in self._feedback.items() if fb.residual is not None}
        return {"syncs": self.syncs, "residuals": residuals, "carry": {k: v.clone() for k, v in self._carry.items()},
                "layout": {k: list(v) for k, v in self._layout.items()}, "guard": self.guard.state_dict(),
                "stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from geotrain.comm.codecs import ErrorFeedback

        self.syncs = int(state["syncs"])
        self._feedback = {}
        for k, r in state.get("residuals", {}).items():
            fb = self._feedback[k] = ErrorFeedback(self.codec)
            fb.load_state_dict({"residual": r})
        self._carry = {k: v.clone() for k, v in state.get("carry", {}).items()}
        self._layout = {k: (int(v[0]), int(v[1])) for k, v in state.get("layout", {}).items()}
        self.guard.load_state_dict(state.get("guard", {}))
        if "stats" in state:
            self.stats.load_state_dict(state["stats"])

    def shared_state(self) -> dict[str, Any]:
        """What a joining site receives from its healer: the sync count and the guard's history."""
        return {"syncs": self.syncs, "guard": self.guard.state_dict()}

    def load_shared_state(self, state: dict[str, Any]) -> None:
        self.syncs = int(state["syncs"])
        self.guard.load_state_dict(state.get("guard", {}))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._control.shutdown(wait=False, cancel_futures=True)
