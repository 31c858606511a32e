"""The training code of DiLoCo (``geotrain.algorithms.diloco``): H local steps per site, then one outer step
on the averaged pseudo-gradient.

Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models", arXiv 2311.08105.
Each site runs H steps of its inner optimizer (AdamW by default) from the global parameters θ. Its
pseudo-gradient Δ_k = θ − θ_k is averaged across sites, and an outer SGD step with Nesterov momentum moves θ.

With ``overlap=True`` the average of round t travels while round t+1 computes and is applied one round late
(the delayed outer update of Kale et al. 2025, "Eager updates for overlapped communication and computation in
DiLoCo"): each site starts round t+1 from the newest global θ plus its own progress of round t, so no site
ever waits for the link unless a transfer takes longer than a whole round.

With ``outer.sync_every_seconds`` the rounds end after a time instead of after H steps, and the sites'
pseudo-gradients are averaged with token weights (``geotrain.algorithms.strategies.rounds``).

Methods with DiLoCo's rounds but their own payload or outer step (SparseLoCo) subclass the strategy and
override its hooks: ``theta`` (where the global parameters live), ``_send`` (what goes on the wire),
``_apply`` (the outer step on the average) and ``_extra_state`` / ``_load_extra_state`` (their checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from geotrain.algorithms.strategies.base import Strategy, StrategyContext
from geotrain.algorithms.strategies.outer import OuterOptimizer
from geotrain.algorithms.strategies.rounds import TimedRounds, TokenWeighted
from geotrain.comm.collectives import Pending
from geotrain.comm.flat import flatten, unflatten_into
from geotrain.comm.site_parallel import local
from geotrain.config import OuterConfig

__all__ = ["DiLoCoStrategy"]


class DiLoCoStrategy(Strategy):
    def __init__(self, ctx: StrategyContext, *, outer: OuterConfig, overlap: bool = False,
                 budget_tokens: int = 0) -> None:
        super().__init__(ctx)
        self.outer = OuterOptimizer(flatten(ctx.params), outer)
        self._init_rounds(sync_every=outer.sync_every, warmup_steps=outer.warmup_steps, overlap=overlap)
        self.timed = None if outer.sync_every_seconds is None else TimedRounds(
            seconds=outer.sync_every_seconds, budget_tokens=budget_tokens, site_pg=ctx.site_pg, workers=ctx.workers,
            lag=1 if overlap else 0, sites=ctx.comm.sites)

    def _init_rounds(self, *, sync_every: int, warmup_steps: int, overlap: bool) -> None:
        """The round schedule's state, once ``theta`` exists; step-based rounds (``timed`` is None)."""
        self.sync_every = sync_every
        self.warmup_steps = warmup_steps
        self.overlap = overlap
        self.start = self.theta.clone()  # where this site's current round began
        self._pending: Pending | TokenWeighted | None = None
        self._pending_plain = False
        self.timed: TimedRounds | None = None

    @property
    def theta(self) -> torch.Tensor:
        """The global parameters θ, flat fp32, (numel,): the outer step updates them in place."""
        return self.outer.params.detach()

    def _send(self, delta: torch.Tensor) -> Pending | TokenWeighted:
        """Start the cross-site average of this site's pseudo-gradient for the round, (numel,)."""
        if self.timed is None:
            return self.ctx.comm.all_reduce_mean(delta, key="outer")
        # weighted by the tokens this site trained in the round; n_ref keeps the payload's scale
        n_ref = float(self.sync_every * self.timed.step_tokens)
        return self.timed.weigh(delta, self.ctx.comm, n_ref=n_ref, key="outer")

    def _apply(self, mean: torch.Tensor, *, plain: bool) -> None:
        """The outer step on the sites' averaged pseudo-gradient (``plain``: within the outer warm-up)."""
        self.outer.step(mean, plain=plain)

    def begin(self, *, wall: Callable[[], float], step_tokens: int, round_start: float | None = None) -> None:
        if self.timed is not None:
            self.timed.begin(wall, step_tokens, round_start=round_start)

    def skip_step(self, now: float, step_seconds: float) -> bool:
        return self.timed is not None and self.timed.skip_step(now, step_seconds)

    def after_inner_step(self, step: int, *, last: bool) -> bool:
        if self.timed is not None:
            if not self.timed.due(last=last):
                return False
            # the outer warm-up in rounds, a count every site shares (its own step index is not shared: sites
            # step at their own pace): the first warmup_steps // H rounds, which H-step rounds would also be
            plain = self.outer_rounds < self.warmup_steps // self.sync_every
        elif (step + 1) % self.sync_every and not last:
            return False
        else:
            plain = step < self.warmup_steps  # the rounds that end within the warm-up's inner steps
        self._end_round(last=last, plain=plain)
        return True

    @property
    def finished(self) -> bool:
        return self.timed is not None and self.timed.finished

    def run_tokens(self) -> float | None:
        return None if self.timed is None else self.timed.tokens()

    @torch.no_grad()
    def _end_round(self, *, last: bool, plain: bool) -> None:
        params = self.ctx.params
        delta = self.start - flatten(params)  # this site's pseudo-gradient for the round, (numel,)
        pending = self._send(delta)
        if self._pending is not None:  # overlap: the previous round's average has been travelling meanwhile
            self._apply(self._pending.wait(), plain=self._pending_plain)
            self._pending = None
        if self.overlap and not last:
            self._pending, self._pending_plain = pending, plain
            self.start = self.theta - delta  # newest global plus this site's own progress
        else:
            self._apply(pending.wait(), plain=plain)
            self.start = self.theta.clone()
        unflatten_into(self.start, params)
        self.outer_rounds += 1
        if self.timed is not None:
            self.timed.end_round()
            if self.timed.finished and self._pending is not None:  # the run is over: land the round in flight
                self.close()

    def global_parameters(self) -> list[torch.Tensor]:
        flat = self.theta
        out, offset = [], 0
        for p in map(local, self.ctx.params):
            out.append(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return out

    def syncs_in_flight(self) -> int:
        return int(self._pending is not None)

    def state_dict(self) -> dict:
        pending = None if self._pending is None else self._pending.wait()  # landed first: its state is settled
        return {**super().state_dict(), "start": self.start.clone(), "pending": pending, **self._extra_state()}

    def _extra_state(self) -> dict:
        """The state beyond the schedule's (the outer optimizer's, the warm-up's, the timed rounds')."""
        return {"outer": self.outer.state_dict(), "pending_plain": self._pending_plain,
                "timed": None if self.timed is None else self.timed.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.start = state["start"].clone()
        self._pending = None if state["pending"] is None else Pending.completed(state["pending"], self.ctx.comm)
        self._load_extra_state(state)

    def _load_extra_state(self, state: dict) -> None:
        self.outer.load_state_dict(state["outer"])
        self._pending_plain = bool(state["pending_plain"])
        if self.timed is not None and state.get("timed") is not None:
            self.timed.load_state_dict(state["timed"])

    @torch.no_grad()
    def close(self) -> None:
        """A run stopped early (time budget) with a round in flight: apply it, so the global model has it."""
        if self._pending is not None:
            self._apply(self._pending.wait(), plain=self._pending_plain)
            self._pending = None
            unflatten_into(self.theta, self.ctx.params)
            self.start = self.theta.clone()
        if self.timed is not None:
            self.timed.settle()
