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
        self.sync_every = outer.sync_every
        self.warmup_steps = outer.warmup_steps
        self.overlap = overlap
        self.outer = OuterOptimizer(flatten(ctx.params), outer)
        self.start = self.outer.params.detach().clone()  # where this site's current round began
        self._pending: Pending | TokenWeighted | None = None
        self._pending_plain = False
        self.timed = None if outer.sync_every_seconds is None else TimedRounds(
            seconds=outer.sync_every_seconds, budget_tokens=budget_tokens, site_pg=ctx.site_pg, workers=ctx.workers,
            lag=1 if overlap else 0, sites=ctx.comm.sites)

    def begin(self, *, wall: Callable[[], float], step_tokens: int) -> None:
        if self.timed is not None:
            self.timed.begin(wall, step_tokens)

    def after_inner_step(self, step: int, *, last: bool) -> bool:
        if self.timed is not None:
            if not self.timed.due(last=last):
                return False
        elif (step + 1) % self.sync_every and not last:
            return False
        self._end_round(last=last, plain=step < self.warmup_steps)
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
        if self.timed is None:
            pending: Pending | TokenWeighted = self.ctx.comm.all_reduce_mean(delta, key="outer")
        else:  # weighted by the tokens this site trained in the round; n_ref keeps the payload's scale
            n_ref = float(self.sync_every * self.timed.step_tokens)
            pending = self.timed.weigh(delta, self.ctx.comm, n_ref=n_ref, key="outer")
        if self._pending is not None:  # overlap: the previous round's average has been travelling meanwhile
            self.outer.step(self._pending.wait(), plain=self._pending_plain)
            self._pending = None
        if self.overlap and not last:
            self._pending, self._pending_plain = pending, plain
            self.start = self.outer.params.detach() - delta  # newest global plus this site's own progress
        else:
            self.outer.step(pending.wait(), plain=plain)
            self.start = self.outer.params.detach().clone()
        unflatten_into(self.start, params)
        self.outer_rounds += 1
        if self.timed is not None:
            self.timed.end_round()
            if self.timed.finished and self._pending is not None:  # the run is over: land the round in flight
                self.close()

    def global_parameters(self) -> list[torch.Tensor]:
        flat = self.outer.params.detach()
        out, offset = [], 0
        for p in map(local, self.ctx.params):
            out.append(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return out

    def syncs_in_flight(self) -> int:
        return int(self._pending is not None)

    def state_dict(self) -> dict:
        pending = None if self._pending is None else self._pending.wait()
        return {**super().state_dict(), "outer": self.outer.state_dict(), "start": self.start.clone(),
                "pending": pending, "pending_plain": self._pending_plain,
                "timed": None if self.timed is None else self.timed.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.outer.load_state_dict(state["outer"])
        self.start = state["start"].clone()
        self._pending = None if state["pending"] is None else Pending.completed(state["pending"], self.ctx.comm)
        self._pending_plain = bool(state["pending_plain"])
        if self.timed is not None and state.get("timed") is not None:
            self.timed.load_state_dict(state["timed"])

    @torch.no_grad()
    def close(self) -> None:
        """A run stopped early (time budget) with a round in flight: apply it, so the global model has it."""
        if self._pending is not None:
            self.outer.step(self._pending.wait(), plain=self._pending_plain)
            self._pending = None
            unflatten_into(self.outer.params.detach(), self.ctx.params)
            self.start = self.outer.params.detach().clone()
        if self.timed is not None:
            self.timed.settle()
