"""The training code of SparseLoCo (``geotrain.algorithms.sparseloco``): H local steps, then the decayed
accumulator's chunked top-k, all-gathered and averaged, with no outer momentum.

Sarfi et al., arXiv 2508.15706. The accumulator e is this site's own state: an ``ErrorFeedback`` with
``decay=beta`` around the ``sparse+int{bits}`` codec, handed to the cross-site collective for its key, so the
collective's checksums, guard votes, retries and membership changes apply unchanged (a sync voted down, or this
site's payload left out, rolls e back so that what it carried is sent again). The definition module has the
update rule; with ``overlap`` the mean of round t is applied one round late, exactly as in DiLoCo's strategy.
"""

from __future__ import annotations

import torch

from geotrain.algorithms.strategies.base import Strategy, StrategyContext
from geotrain.comm.codecs.feedback import ErrorFeedback
from geotrain.comm.collectives import Pending
from geotrain.comm.flat import flatten, unflatten_into
from geotrain.comm.site_parallel import local
from geotrain.config import SparseLoCoConfig

__all__ = ["SparseLoCoStrategy"]

KEY = "sparseloco"
"""The payload key of the accumulator's syncs."""


class SparseLoCoStrategy(Strategy):
    def __init__(self, ctx: StrategyContext, *, sync_every: int, sparseloco: SparseLoCoConfig,
                 overlap: bool = False) -> None:
        super().__init__(ctx)
        self.sync_every = sync_every
        self.lr = sparseloco.lr
        self.overlap = overlap
        self.params = flatten(ctx.params).detach().clone().to(torch.float32)  # the global θ, flat fp32
        self.start = self.params.clone()  # where this site's current round began
        self.accumulator = ErrorFeedback(ctx.comm.codec, decay=sparseloco.beta)
        self._pending: Pending | None = None

    @property
    def _owner(self) -> list[int]:
        """Whose accumulator a state holds: a joiner healed from another site starts its own at zero."""
        return [int(self.ctx.comm.site), int(self.ctx.comm.local_rank)]

    def after_inner_step(self, step: int, *, last: bool) -> bool:
        if (step + 1) % self.sync_every and not last:
            return False
        self._end_round(last=last)
        return True

    @torch.no_grad()
    def _end_round(self, *, last: bool) -> None:
        params = self.ctx.params
        delta = self.start - flatten(params)  # this site's pseudo-gradient for the round, (numel,)
        pending = self.ctx.comm.all_reduce_mean(delta, key=KEY, feedback=self.accumulator)
        if self._pending is not None:  # overlap: the previous round's mean has been travelling meanwhile
            self._step(self._pending.wait())
            self._pending = None
        if self.overlap and not last:
            self._pending = pending
            self.start = self.params - delta  # newest global plus this site's own progress
        else:
            self._step(pending.wait())
            self.start = self.params.clone()
        unflatten_into(self.start, params)
        self.outer_rounds += 1

    def _step(self, mean: torch.Tensor) -> None:
        """θ ← θ − lr · mean of the sites' sparse updates."""
        self.params.sub_(mean, alpha=self.lr)

    def global_parameters(self) -> list[torch.Tensor]:
        out, offset = [], 0
        for p in map(local, self.ctx.params):
            out.append(self.params[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return out

    def syncs_in_flight(self) -> int:
        return int(self._pending is not None)

    def state_dict(self) -> dict:
        pending = None if self._pending is None else self._pending.wait()  # its residual is committed now
        return {**super().state_dict(), "params": self.params.clone(), "start": self.start.clone(),
                "pending": pending, "accumulator": self.accumulator.state_dict(), "owner": self._owner}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.params.copy_(state["params"])
        self.start = state["start"].clone()
        self._pending = None if state["pending"] is None else Pending.completed(state["pending"], self.ctx.comm)
        if list(state.get("owner", [])) == self._owner:  # this site's own checkpoint
            self.accumulator.load_state_dict(state["accumulator"])
        else:  # a healer's state: its accumulator holds what that site has yet to send, not this one
            self.accumulator.reset()

    @torch.no_grad()
    def close(self) -> None:
        """A run stopped early (time budget) with a round in flight: apply it, so the global model has it."""
        if self._pending is not None:
            self._step(self._pending.wait())
            self._pending = None
            unflatten_into(self.params, self.ctx.params)
            self.start = self.params.clone()  # the local parameters restart from the global θ
