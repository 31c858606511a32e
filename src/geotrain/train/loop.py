"""The training loop: one loop for every algorithm.

Read top to bottom, it is an ordinary training loop. Distributed training adds three calls to the strategy
(see ``geotrain.algorithms.strategies.base``): ``reduce_gradients()`` after backward, ``after_inner_step()``
after the optimizer step, and ``global_parameters()`` for evaluation. Everything about sites, links and codecs
lives behind those calls.

Timekeeping (``train/timing.py``): ``compute`` is time spent in forward, backward, gradient averaging inside
the site and the inner optimizer step; ``comm wait`` is time the loop was blocked on cross-site
communication; evaluation pauses the clock, so utilization = compute / training wall time is not diluted by
measurement. The time comes from the cross-site collective's clock, so a test on a virtual clock checks it
exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from geotrain.algorithms.strategies.base import Strategy
from geotrain.comm.collectives import CrossSiteComm
from geotrain.config import Config, inner_steps
from geotrain.train.budget import BudgetVote
from geotrain.train.recorder import Recorder
from geotrain.train.timing import RunTimer
from geotrain.train.workload import Workload, inner_optimizer, lr_schedule

__all__ = ["LoopResult", "train_loop", "params_sha256"]


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
    steps = inner_steps(config.run.tokens, workload.tokens_per_batch * world)
    optimizer = workload.optimizer or inner_optimizer(params, config.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(config.optim, steps))
    eval_every = config.run.eval_every_tokens or max(1, steps * workload.tokens_per_batch * world // 10)
    next_eval = eval_every
    clip = config.optim.grad_clip
    budget = None if config.run.wall_seconds is None else BudgetVote(
        config.run.wall_seconds, comm, site_pg=strategy.ctx.site_pg, workers=strategy.ctx.workers)

    timer = RunTimer(comm.clock)
    eval_loss: float | None = None
    eval_step = -1
    stopped_early = False
    step = -1
    model.train()
    for step in range(steps):
        t0 = timer.now()
        batch = next(workload.batches)
        loss = workload.loss(model, batch)
        loss.backward()
        timer.compute += timer.now() - t0

        wait_before = comm.stats.wait_seconds
        t0 = timer.now()
        strategy.reduce_gradients()  # ddp: cross-site all-reduce; others: inside the site only
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        timer.compute += timer.now() - t0 - (comm.stats.wait_seconds - wait_before)

        last = step == steps - 1
        synced = strategy.after_inner_step(step, last=last)  # diloco: outer round every H steps

        tokens_all = (step + 1) * workload.tokens_per_batch * world
        if step % config.run.log_every == 0 or last:
            recorder.step(step=step, tokens=tokens_all // comm.sites, loss=float(loss.detach()), lr=scheduler.get_last_lr()[0],
                          timer=timer, comm=comm, outer_rounds=strategy.outer_rounds, site=site)
        recorder.syncs(comm.stats.drain(), step=step, site=site, wall=timer.wall())
        if not synced:
            continue
        timer.end_round(step + 1)
        if tokens_all >= next_eval or last:
            t_eval = timer.now()
            eval_loss = evaluate(workload, strategy, comm, worker=worker, world=world)
            timer.paused += timer.now() - t_eval
            eval_step = step
            next_eval = (tokens_all // eval_every + 1) * eval_every
            if site == 0:
                recorder.eval(site=site, step=step, tokens=tokens_all, wall=timer.wall(), eval_loss=eval_loss,
                              wan_bytes=comm.stats.bytes_sent * world, outer_rounds=strategy.outer_rounds)
        if budget is not None and not last:
            # landing the syncs still in flight, estimated from the latest transfer (none before the first lands)
            drain = comm.stats.last_transfer_seconds * strategy.syncs_in_flight()
            if budget.stop_now(timer.wall(), drain=drain):
                stopped_early = True  # before a round that would overrun the wall-time budget
                break
        if last:
            break

    if budget is not None:
        budget.finish()
    strategy.close()
    steps_done = step + 1
    if eval_step != step:  # stopped by the time budget between evaluations
        t_eval = timer.now()
        eval_loss = evaluate(workload, strategy, comm, worker=worker, world=world)
        timer.paused += timer.now() - t_eval
    wall = timer.wall()
    figures = {
        "steps": steps_done,
        "tokens": steps_done * workload.tokens_per_batch * strategy.ctx.workers,
        "compute_seconds": timer.compute,
        "comm_seconds": comm.stats.wait_seconds,
        "link_seconds": comm.stats.link_seconds,
        "wall_seconds": wall,
        "eval_seconds": timer.paused,
        "utilization": timer.compute / wall if wall > 0 else 0.0,
        "wan_bytes": comm.stats.bytes_sent * strategy.ctx.workers,
        "collectives": comm.stats.collectives,
        "peak_bandwidth_bps": comm.stats.peak_bandwidth_bps,
        "max_transfer_bytes": comm.stats.max_transfer_bytes * strategy.ctx.workers,
        "outer_rounds": strategy.outer_rounds,
        "round_compute_cv": timer.round_cv(),
    }
    return LoopResult(
        steps=steps_done,
        tokens=steps_done * workload.tokens_per_batch * world,
        eval_loss=eval_loss,
        stopped_early=stopped_early,
        params_sha256=params_sha256(strategy.global_parameters()),
        figures=figures,
    )
