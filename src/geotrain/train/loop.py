"""The training loop: one loop for every algorithm.

Read top to bottom, it is an ordinary training loop. Distributed training adds three calls to the strategy
(see ``geotrain.algorithms.base``): ``reduce_gradients()`` after backward, ``after_inner_step()`` after the
optimizer step, and ``global_parameters()`` for evaluation. Everything about sites, links and codecs lives
behind those calls.

Timekeeping: ``compute`` is time spent in forward, backward, gradient averaging inside the site and the inner
optimizer step; ``comm wait`` is time the loop was blocked on cross-site communication; evaluation pauses the
clock, so utilization = compute / training wall time is not diluted by measurement.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from geotrain.algorithms.base import Strategy
from geotrain.comm.collectives import ControlPending, CrossSiteComm
from geotrain.config import Config
from geotrain.train.recorder import Recorder
from geotrain.train.workload import Workload, inner_optimizer, lr_schedule

__all__ = ["LoopResult", "train_loop", "params_sha256"]


@dataclass(slots=True)
class Clock:
    start: float = field(default_factory=time.perf_counter)
    compute: float = 0.0
    paused: float = 0.0  # evaluation time, excluded from the training wall time
    # Compute time between consecutive sync points (Welford's running mean and sum of squared deviations):
    # its spread is what makes a synchronous site wait for the others even when all are equally fast. Left
    # out: the first round, whose first step (allocation, warm-up) is slow on every site at once, and any
    # round of another length than the second (a short last round).
    rounds: int = 0
    round_mean: float = 0.0
    round_m2: float = 0.0
    _round_start: float = 0.0
    _round_start_step: int = 0
    _round_steps: int = -1  # -1 until the first round ends, then 0 until the second sets the length

    def wall(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def end_round(self, steps_done: int) -> None:
        """A sync point after ``steps_done`` inner steps in all."""
        x = self.compute - self._round_start
        length = steps_done - self._round_start_step
        self._round_start, self._round_start_step = self.compute, steps_done
        if self._round_steps < 0:
            self._round_steps = 0
            return
        if self._round_steps == 0:
            self._round_steps = length
        if length != self._round_steps:
            return
        self.rounds += 1
        d = x - self.round_mean
        self.round_mean += d / self.rounds
        self.round_m2 += d * (x - self.round_mean)

    def round_cv(self) -> float | None:
        """Coefficient of variation of the compute time between sync points (None before two rounds)."""
        if self.rounds < 2 or self.round_mean <= 0:
            return None
        return math.sqrt(self.round_m2 / (self.rounds - 1)) / self.round_mean


@dataclass(slots=True)
class LoopResult:
    steps: int
    tokens: int
    eval_loss: float | None
    stopped_early: bool
    params_sha256: str
    figures: dict[str, Any]


def params_sha256(tensors: list[torch.Tensor]) -> str:
    """Hash of the global parameters in order, as fp32 bytes: equal hashes mean identical models."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class BudgetVote:
    """The stop vote of a wall-time budget, read one sync point late so that a site less than a round ahead
    never waits on it.

    At each sync point every site votes whether the round after next, plus the time to land the syncs still
    in flight when the run stops, would end past the budget, and the sum travels while the next round
    computes. At the next sync point each site reads it: any vote stops every site there, at the same step.
    A blocking vote would make the site that is ahead wait for the slowest at every sync point, even when the
    algorithm itself (overlapped DiLoCo, Streaming DiLoCo) lets it run on.
    """

    def __init__(self, budget: float, comm: CrossSiteComm, *, site_pg: Any, workers: int) -> None:
        self.budget = budget
        self.comm = comm
        self.site_pg = site_pg
        self.workers = workers
        self.last_sync_wall = 0.0
        self.pending: ControlPending | None = None

    def stop_now(self, wall: float, *, drain: float = 0.0) -> bool:
        """Call at every sync point but the last, with the training wall time and the time a sync in flight
        would still take to land (``drain``); True means stop here."""
        round_wall = wall - self.last_sync_wall
        self.last_sync_wall = wall
        if self.pending is not None:
            total = torch.tensor(self.pending.wait(), dtype=torch.float64)
            self.pending = None
            if self.workers > 1:  # a site's workers vote over different cross-site groups: agree inside the site
                self.site_pg.allreduce([total]).wait()
            if float(total[0]) > 0:
                return True
        self.pending = self.comm.start_control_sum([1.0 if wall + 2 * round_wall + drain > self.budget else 0.0])
        return False

    def finish(self) -> None:
        """Wait for a vote still in flight (every site started it, so it completes)."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None


@contextlib.contextmanager
def global_model(strategy: Strategy) -> Iterator[None]:
    """Temporarily load the global parameters into the model (DiLoCo's local ones may have moved on)."""
    params = strategy.ctx.params
    global_params = strategy.global_parameters()
    if all(g.data_ptr() == p.data_ptr() for g, p in zip(global_params, params)):
        yield
        return
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, global_params):
            p.copy_(g)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


@torch.no_grad()
def evaluate(workload: Workload, strategy: Strategy, comm: CrossSiteComm, *, worker: int, world: int) -> float:
    """Mean held-out loss of the global model. Workers split the fixed eval batches and add up the sums."""
    model = workload.model
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    with global_model(strategy):
        for i, batch in enumerate(workload.eval_batches):
            if i % world == worker:
                total += float(workload.loss(model, batch))
                count += 1
    model.train(was_training)
    sums = torch.tensor([total, count], dtype=torch.float64)
    strategy.ctx.site_pg.allreduce([sums]).wait()  # sum over the site's workers
    total, count = comm.control_sum(sums.tolist(), count_wait=False)  # then over sites (eval time is paused)
    return total / count if count else math.nan


def train_loop(
    config: Config,
    workload: Workload,
    *,
    strategy: Strategy,
    comm: CrossSiteComm,
    recorder: Recorder,
    site: int,
    worker: int,
) -> LoopResult:
    model = workload.model
    params = strategy.ctx.params
    world = comm.sites * strategy.ctx.workers
    steps = max(1, config.run.tokens // (workload.tokens_per_batch * world))
    optimizer = workload.optimizer or inner_optimizer(params, config.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(config.optim, steps))
    eval_every = config.run.eval_every_tokens or max(1, steps * workload.tokens_per_batch * world // 10)
    next_eval = eval_every
    clip = config.optim.grad_clip
    budget = None if config.run.wall_seconds is None else BudgetVote(
        config.run.wall_seconds, comm, site_pg=strategy.ctx.site_pg, workers=strategy.ctx.workers)

    clock = Clock()
    eval_loss: float | None = None
    eval_step = -1
    stopped_early = False
    step = -1
    model.train()
    for step in range(steps):
        t0 = time.perf_counter()
        batch = next(workload.batches)
        loss = workload.loss(model, batch)
        loss.backward()
        clock.compute += time.perf_counter() - t0

        wait_before = comm.stats.wait_seconds
        t0 = time.perf_counter()
        strategy.reduce_gradients()  # ddp: cross-site all-reduce; others: inside the site only
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        clock.compute += time.perf_counter() - t0 - (comm.stats.wait_seconds - wait_before)

        last = step == steps - 1
        synced = strategy.after_inner_step(step, last=last)  # diloco: outer round every H steps

        tokens_all = (step + 1) * workload.tokens_per_batch * world
        if step % config.run.log_every == 0 or last:
            recorder.step(step=step, tokens=tokens_all // comm.sites, loss=float(loss), lr=scheduler.get_last_lr()[0],
                          clock=clock, comm=comm, outer_rounds=strategy.outer_rounds, site=site)
        recorder.syncs(comm.stats.drain(), step=step, site=site, wall=clock.wall())
        if not synced:
            continue
        clock.end_round(step + 1)
        if tokens_all >= next_eval or last:
            t_eval = time.perf_counter()
            eval_loss = evaluate(workload, strategy, comm, worker=worker, world=world)
            clock.paused += time.perf_counter() - t_eval
            eval_step = step
            next_eval = (tokens_all // eval_every + 1) * eval_every
            if site == 0:
                recorder.eval(step=step, tokens=tokens_all, wall=clock.wall(), eval_loss=eval_loss,
                              wan_bytes=comm.stats.bytes_sent * world, outer_rounds=strategy.outer_rounds)
        if budget is not None and not last:
            # landing the syncs still in flight, estimated from the latest transfer (none before the first lands)
            drain = comm.stats.last_transfer_seconds * strategy.syncs_in_flight()
            if budget.stop_now(clock.wall(), drain=drain):
                stopped_early = True  # before a round that would overrun the wall-time budget
                break
        if last:
            break

    if budget is not None:
        budget.finish()
    strategy.close()
    steps_done = step + 1
    if eval_step != step:  # stopped by the time budget between evaluations
        t_eval = time.perf_counter()
        eval_loss = evaluate(workload, strategy, comm, worker=worker, world=world)
        clock.paused += time.perf_counter() - t_eval
    wall = clock.wall()
    figures = {
        "steps": steps_done,
        "tokens": steps_done * workload.tokens_per_batch * strategy.ctx.workers,
        "compute_seconds": clock.compute,
        "comm_seconds": comm.stats.wait_seconds,
        "link_seconds": comm.stats.link_seconds,
        "wall_seconds": wall,
        "eval_seconds": clock.paused,
        "utilization": clock.compute / wall if wall > 0 else 0.0,
        "wan_bytes": comm.stats.bytes_sent * strategy.ctx.workers,
        "collectives": comm.stats.collectives,
        "peak_bandwidth_bps": comm.stats.peak_bandwidth_bps,
        "max_transfer_bytes": comm.stats.max_transfer_bytes * strategy.ctx.workers,
        "outer_rounds": strategy.outer_rounds,
        "round_compute_cv": clock.round_cv(),
    }
    return LoopResult(
        steps=steps_done,
        tokens=steps_done * workload.tokens_per_batch * world,
        eval_loss=eval_loss,
        stopped_early=stopped_early,
        params_sha256=params_sha256(strategy.global_parameters()),
        figures=figures,
    )
