"""The training loop: one loop for every algorithm.

Read top to bottom, it is an ordinary training loop. Distributed training adds three calls to the strategy
(see ``geotrain.algorithms.strategies.base``): ``reduce_gradients()`` after backward, ``after_inner_step()``
after the optimizer step, and ``global_parameters()`` for evaluation. Everything about sites, links and codecs
lives behind those calls.

At a sync point (where every site holds the same global model) the loop may evaluate, take a checkpoint and
vote to stop; at the step where a sync that saw joiners lands, every site drains its syncs in flight and the
healer sends its state to the joiners (``Boundary.admit``). A site that was dropped from the run sees
:class:`geotrain.membership.client.Evicted` come out of a sync and leaves the loop to join again.

Inside a site, the forward pass runs on ``module``: the model wrapped in DistributedDataParallel, or sharded
by FSDP2 (``geotrain.comm.site_parallel``), which average gradients during backward. With
``run.precision = "bf16"`` forward and backward run under autocast; weights, optimizer state and evaluation
stay fp32.

Timekeeping (``train/timing.py``): ``compute`` is time spent in forward, backward, gradient averaging inside
the site and the inner optimizer step (on GPUs the loop synchronizes once per step before reading the clock,
so queued kernels are counted where they run); ``throttled`` is time a step is held back after it computes,
so that it lasts what it would on a slower or power-capped site (``train/pace.py``: ``run.site_speeds``,
``[grid]``); ``comm wait`` is time the loop was blocked on cross-site communication; evaluation and
checkpoints pause the clock, so utilization = (compute + throttled) / training wall time is not diluted by
measurement. The time comes from the cross-site collective's clock, so a test on a virtual
clock checks it exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from geotrain.algorithms.strategies.base import Strategy
from geotrain.comm.collectives import CrossSiteComm
from geotrain.comm.site_parallel import is_sharded, load_model_state, local, reshard, reshard_optimizer_state
from geotrain.config import Config, inner_steps
from geotrain.train.budget import BudgetVote
from geotrain.train.pace import Pace
from geotrain.train.recorder import Recorder
from geotrain.train.timing import RunTimer
from geotrain.train.workload import Workload, inner_optimizer, lr_schedule

_POWER_WAITS = 6
"""Calls for the power at one step's start before giving up: a wait for the power to return, a second for a
clock's rounding, one for the ramp, and the call that starts the step suffice."""

__all__ = ["LoopResult", "LoopState", "Boundary", "train_loop", "params_sha256"]


@dataclass(slots=True)
class LoopResult:
    steps: int
    tokens: int
    eval_loss: float | None
    stopped_early: bool
    params_sha256: str
    figures: dict[str, Any]


@dataclass(slots=True)
class LoopState:
    """The loop's own counters: saved by checkpoints, sent to joining sites."""

    step: int = -1
    """The last inner step completed (-1 before the first)."""
    next_eval: int = 0
    """Tokens (at the configured number of sites) at which the next evaluation is due."""
    eval_loss: float | None = None
    eval_step: int = -1
    trained: int = 0
    """Inner steps this worker trained (a healed site counts from its admission)."""


def params_sha256(tensors: list[torch.Tensor]) -> str:
    """Hash of the global parameters in order, as fp32 bytes: equal hashes mean identical models."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def site_params_sha256(strategy: Strategy) -> str:
    """:func:`params_sha256` of the global model. Under FSDP each worker holds a shard: the hash of the
    workers' shard hashes in order (a collective of the site's workers)."""
    digest = params_sha256(strategy.global_parameters())
    if strategy.ctx.workers == 1 or not any(is_sharded(p) for p in strategy.ctx.params):
        return digest
    mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8)
    rows = [torch.empty_like(mine) for _ in range(strategy.ctx.workers)]
    strategy.ctx.site_pg.allgather([rows], [mine]).wait()
    return hashlib.sha256(b"".join(bytes(r.tolist()) for r in rows)).hexdigest()


@contextlib.contextmanager
def global_model(strategy: Strategy) -> Iterator[None]:
    """Temporarily load the global parameters into the model (DiLoCo's local ones may have moved on)."""
    params = [local(p) for p in strategy.ctx.params]
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
def evaluate(workload: Workload, strategy: Strategy, comm: CrossSiteComm, *, step: int) -> float:
    """Mean held-out loss of the global model. Workers split the fixed eval batches and add up the sums. Under
    FSDP a site's workers take each of its batches together (a forward pass gathers the shards) and the first
    one counts it."""
    model = workload.model
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    members = comm.observed_members  # the live sites share the batches: every one is evaluated once
    shards = any(is_sharded(p) for p in strategy.ctx.params)
    per_site = 1 if shards else strategy.ctx.workers
    world = len(members) * per_site
    worker = members.index(comm.site) * per_site + (0 if shards else comm.local_rank)
    with global_model(strategy):
        for i, batch in enumerate(workload.eval_batches):
            if i % world == worker:
                loss = float(workload.loss(model, batch))
                if not shards or comm.local_rank == 0:
                    total += loss
                    count += 1
        if shards:
            reshard(model)
    model.train(was_training)
    sums = torch.tensor([total, count], dtype=torch.float64)
    strategy.ctx.site_pg.allreduce([sums]).wait()  # sum over the site's workers
    # then over the member sites (eval time is paused); a worker index's eval batches depend only on it
    # named by what every site shares: the step, or under time-based rounds (sites at their own steps) the round
    name = f"eval/{step}" if strategy.run_tokens() is None else f"eval/round{strategy.outer_rounds}"
    total, count = comm.control_sum(name, sums.tolist(), count_wait=False)
    return total / count if count else math.nan


class Boundary:
    """What happens at sync points besides training: checkpoints and admissions. ``train_loop`` calls it; the
    site (``train/site.py``) supplies the pieces. ``snapshot(full)`` returns the state tree; the callables may
    be None (no checkpoints, no healing: tests)."""

    def __init__(self, *, checkpoint: Callable[[int, Callable[[], Any]], None] | None = None,
                 every_steps: int = 0, round_steps: int = 1, admit: Callable[[Callable[[], Any]], None] | None = None,
                 at_step: Callable[[int, float], None] | None = None) -> None:
        self.checkpoint = checkpoint
        """Called as ``checkpoint(outer round, snapshot)`` every ``every_steps`` inner steps."""
        self.every_steps = every_steps
        self.round_steps = round_steps
        self.admit = admit
        self.at_step = at_step


def train_loop(
    config: Config,
    workload: Workload,
    *,
    strategy: Strategy,
    comm: CrossSiteComm,
    recorder: Recorder,
    site: int,
    worker: int,
    restore: dict[str, Any] | None = None,
    boundary: Boundary | None = None,
    module: torch.nn.Module | None = None,
    pace: Pace | None = None,
    wall_offset: float = 0.0,
) -> LoopResult:
    """Train from the start, or from ``restore`` (a state tree from a checkpoint or a healer), to the end.
    ``module``: what forward runs on (the model wrapped for data parallelism inside the site; default the
    model itself). ``pace``: this site's speed factor and power controller (``train/pace.py``; default full
    speed); it raises ``PowerOff`` out of the loop when the site's power fails. ``wall_offset``: training
    seconds of the run before this start (a site that comes back after its power failed)."""
    model = workload.model
    module = model if module is None else module
    device = config.run.device
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=config.run.precision == "bf16")
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    params = strategy.ctx.params
    world = config.run.sites * strategy.ctx.workers  # the configured run: steps and the eval schedule
    steps = inner_steps(config.run.tokens, workload.tokens_per_batch * world)
    eval_every = config.run.eval_every_tokens or max(1, steps * workload.tokens_per_batch * world // 10)
    optimizer = workload.optimizer or inner_optimizer(params, config.optim)
    schedule = lr_schedule(config.optim, steps)
    step_tokens = workload.tokens_per_batch * strategy.ctx.workers  # one inner step of this site
    if strategy.run_tokens() is not None:
        # Time-based rounds: sites step at their own pace and the strategy ends the run when all of them
        # together reach the budget. The learning rate follows the run's tokens, not this site's steps; the
        # loop's bound is what this site would train alone, twice over (it never binds in practice).
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda _: schedule(int(strategy.run_tokens() or 0) // (workload.tokens_per_batch * world)))
        steps = 2 * inner_steps(config.run.tokens, step_tokens)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    clip = config.optim.grad_clip
    budget = None if config.run.wall_seconds is None else BudgetVote(
        config.run.wall_seconds, comm, site_pg=strategy.ctx.site_pg, workers=strategy.ctx.workers)
    boundary = boundary or Boundary()
    pace = pace or Pace()
    timer = RunTimer(comm.clock)
    state = LoopState(next_eval=eval_every)

    def snapshot(full: bool) -> dict[str, Any]:
        """The state a checkpoint keeps (``full``) or a healer sends (what every worker of a site shares)."""
        tree: dict[str, Any] = {
            "config": config.to_dict(), "loop": dataclasses.asdict(state), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "strategy": strategy.state_dict(), "budget": None if budget is None else budget.state_dict(),
            "comm": comm.state_dict() if full else comm.shared_state(),
        }
        tree["run_wall"] = timer.wall() + wall_offset  # the run's training time so far, for a joiner's budget
        if full:
            tree["rng"] = torch.get_rng_state()
            tree["data"] = workload.data_state() if workload.data_state is not None else None
            tree["timer"] = timer.state_dict()
            tree["pace"] = pace.state_dict()
        return tree

    if restore is not None:
        with torch.no_grad():
            load_model_state(model, restore["model"])
        optimizer.load_state_dict(restore["optimizer"])
        reshard_optimizer_state(optimizer)
        scheduler.load_state_dict(restore["scheduler"])
        strategy.load_state_dict(restore["strategy"])
        if budget is not None and restore.get("budget") is not None:
            budget.load_state_dict(restore["budget"])
        state = LoopState(**restore["loop"])
        if "timer" in restore:  # a checkpoint of this worker: its own counters, data and randomness
            comm.load_state_dict(restore["comm"])
            timer.load_state_dict(restore["timer"])
            pace.load_state_dict(restore.get("pace"))
            torch.set_rng_state(restore["rng"])
            if restore.get("data") is not None and workload.load_data_state is not None:
                workload.load_data_state(restore["data"])
        else:  # a healer's state: the run's progress, not the healer's own counters
            comm.load_shared_state(restore["comm"])
            state.trained = 0
            wall_offset = max(wall_offset, float(restore.get("run_wall", 0.0)))  # the run's clock did not stop

    # a round starts now; a site healed in the background joins the round the members began at the snapshot
    strategy.begin(wall=lambda: timer.wall() + wall_offset, step_tokens=step_tokens,
                   round_start=None if restore is None else restore.get("round_start"))
    stopped_early = False
    check_next_sync = restore is not None and "timer" not in restore  # a healed site shows its model too
    first = state.step + 1
    step = state.step
    model.train()
    for step in range(first, steps):
        if boundary.at_step is not None:
            boundary.at_step(step, timer.wall())  # faults due at this step
        for attempt in range(_POWER_WAITS):  # the power this step may draw; PowerOff if none
            wait = pace.begin_step(timer.wall() + wall_offset)
            if wait <= 0:
                break
            if attempt == _POWER_WAITS - 1:
                raise RuntimeError(f"site {site}'s step {step} was asked to wait ({pace.waiting}) "
                                   f"{_POWER_WAITS} times before it could start")
            t_wait = timer.now()
            comm.clock.sleep_until(t_wait + wait)
            if pace.waiting == "power":  # back in the run before its power: it waits for it, drawing nothing
                timer.powered_off += timer.now() - t_wait
            else:  # its draw ramps up first: held back by its power, as a slow step would be
                timer.throttled += timer.now() - t_wait
        if (t_on := pace.take_power_on()) is not None:
            recorder.write("power_on", site=site, wall_s=t_on, grid_hours=pace.power.grid_seconds(t_on) / 3600)
        # time-based rounds: a round this site has not trained in yet, which ends before its step could (back
        # from an outage, the ramp slowing its first step), goes to the sync without it
        skipped = pace.step is not None and strategy.skip_step(pace.t_step, pace.step_seconds())
        if skipped:
            loss = None
            compute_end = pace.t_step
        else:
            t0 = timer.now()
            wait_before = comm.stats.wait_seconds
            batch = next(workload.batches)
            with autocast:
                loss = workload.loss(module, batch)
            loss.backward()  # DDP or FSDP average the gradients inside the site meanwhile
            strategy.reduce_gradients()  # ddp across sites: the cross-site all-reduce; others: nothing
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize()
            compute = timer.now() - t0 - (comm.stats.wait_seconds - wait_before)
            timer.compute += compute
            hold = pace.hold(compute)  # a slower or power-capped site: the step lasts compute / its speed factor
            if hold > 0:
                comm.clock.sleep_until(timer.now() + hold)
                timer.throttled += hold
            compute_end = timer.wall() + wall_offset

        last = step == steps - 1
        comm.round = strategy.outer_rounds
        synced = strategy.after_inner_step(step, last=last)  # diloco: outer round every H steps (or T seconds)
        scheduler.step()  # the next step's learning rate (time-based rounds: from the tokens counted just now)
        last = last or strategy.finished
        state.step = step
        state.trained += 0 if skipped else 1
        pace.end_step(compute_end, timer.wall() + wall_offset)

        run_tokens = strategy.run_tokens()
        tokens_all = (step + 1) * workload.tokens_per_batch * world if run_tokens is None else int(run_tokens)
        if loss is not None and (step % config.run.log_every == 0 or last):
            recorder.step(step=step, tokens=tokens_all // config.run.sites, loss=float(loss.detach()),
                          lr=scheduler.get_last_lr()[0], timer=timer, comm=comm, outer_rounds=strategy.outer_rounds,
                          site=site, trained_tokens=state.trained * step_tokens,
                          **pace.fields(run_s=timer.wall() + wall_offset))
        recorder.syncs(comm.stats.drain(), step=step, site=site, wall=timer.wall())
        recorder.outcomes(comm, step=step, site=site, wall=timer.wall())
        if synced:
            timer.end_round(step + 1)
            if check_next_sync:  # the first sync point after an admission: every site shows its global model
                check_next_sync = False
                recorder.write("sync_check", site=site, step=step, generation=comm.generation,
                               params_sha256=site_params_sha256(strategy))
            if tokens_all >= state.next_eval or last:
                t_eval = timer.now()
                state.eval_loss = evaluate(workload, strategy, comm, step=step)
                timer.paused += timer.now() - t_eval
                state.eval_step = step
                state.next_eval = (tokens_all // eval_every + 1) * eval_every
                if site == min(comm.members, default=site):
                    recorder.eval(site=site, step=step, tokens=tokens_all, wall=timer.wall(), eval_loss=state.eval_loss,
                                  wan_bytes=comm.stats.bytes_sent * world, outer_rounds=strategy.outer_rounds)
            # checkpoints every N rounds: counted in steps, or in rounds when sites step at their own pace
            rounds_done = (step + 1) // boundary.round_steps if run_tokens is None else strategy.outer_rounds
            every = boundary.every_steps // boundary.round_steps
            if (boundary.checkpoint is not None and every and not last and rounds_done % every == 0
                    and (run_tokens is not None or (step + 1) % boundary.round_steps == 0)):
                t_ckpt = timer.now()
                boundary.checkpoint(rounds_done, lambda: snapshot(True))
                timer.paused += timer.now() - t_ckpt
            if budget is not None and not last:
                # landing the syncs still in flight, estimated from the latest transfer (none before the first lands)
                drain = comm.stats.last_transfer_seconds * strategy.syncs_in_flight()
                if budget.stop_now(timer.wall() + wall_offset, drain=drain, step=step):
                    stopped_early = True  # before a round that would overrun the wall-time budget
                    break
        if comm.admission_due and not last:
            comm.admission_due = False
            strategy.drain()  # nothing may be in flight while the joiners take the state
            if budget is not None:
                budget.settle()
            if boundary.admit is not None:
                boundary.admit(lambda: snapshot(False))
            # the next round starts now, with the joiners (time-based rounds: the healing is not part of it)
            strategy.begin(wall=lambda: timer.wall() + wall_offset, step_tokens=step_tokens)
            check_next_sync = True
        if last:
            break

    if budget is not None:
        budget.finish()
    strategy.close()
    steps_done = step + 1
    if state.eval_step != step:  # stopped by the time budget between evaluations
        t_eval = timer.now()
        state.eval_loss = evaluate(workload, strategy, comm, step=step)
        timer.paused += timer.now() - t_eval
    recorder.outcomes(comm, step=step, site=site, wall=timer.wall())
    wall = timer.wall()
    figures = {
        "steps": steps_done,
        "steps_trained": state.trained,
        "tokens": state.trained * workload.tokens_per_batch * strategy.ctx.workers,
        "compute_seconds": timer.compute,
        "throttled_seconds": timer.throttled,
        **({"powered_off_seconds": timer.powered_off} if timer.powered_off else {}),
        "comm_seconds": comm.stats.wait_seconds,
        "link_seconds": comm.stats.link_seconds,
        "coordination_seconds": comm.membership.coordination_seconds,
        "wall_seconds": wall,
        "eval_seconds": timer.paused,
        "utilization": timer.utilization(),
        "wan_bytes": comm.stats.bytes_sent * strategy.ctx.workers,
        "collectives": comm.stats.collectives,
        "failed_attempts": comm.stats.failed_attempts,
        "peak_bandwidth_bps": comm.stats.peak_bandwidth_bps,
        "max_transfer_bytes": comm.stats.max_transfer_bytes * strategy.ctx.workers,
        "outer_rounds": strategy.outer_rounds,
        "round_compute_cv": timer.round_cv(),
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        **pace.figures(),
    }
    run_tokens = strategy.run_tokens()
    return LoopResult(
        steps=steps_done,
        tokens=state.trained * workload.tokens_per_batch * world if run_tokens is None else int(run_tokens),
        eval_loss=state.eval_loss,
        stopped_early=stopped_early,
        params_sha256=site_params_sha256(strategy),
        figures=figures,
    )
