"""The training code of SparseLoCo (``geotrain.algorithms.sparseloco``): H local steps, then the decayed
accumulator's chunked top-k, all-gathered and averaged, with no outer momentum.

Sarfi et al., arXiv 2508.15706. The accumulator e is this site's own state: an ``ErrorFeedback`` with
``decay=beta`` around the ``sparse+int{bits}`` codec, handed to the cross-site collective for its key, so the
collective's checksums, guard votes, retries and membership changes apply unchanged (a sync voted down, or this
site's payload left out, rolls e back so that what it carried is sent again). The definition module has the
update rule. The rounds are DiLoCo's strategy's, which this one subclasses (with ``overlap`` the mean of round t
is applied one round late); it overrides only what is sent and the outer step on the mean.
"""

from __future__ import annotations

import torch

from geotrain.algorithms.strategies.base import Strategy, StrategyContext
from geotrain.algorithms.strategies.diloco import DiLoCoStrategy
from geotrain.comm.codecs.feedback import ErrorFeedback
from geotrain.comm.collectives import Pending
from geotrain.comm.flat import flatten
from geotrain.config import SparseLoCoConfig

__all__ = ["SparseLoCoStrategy"]

KEY = "sparseloco"
"""The payload key of the accumulator's syncs."""


class SparseLoCoStrategy(DiLoCoStrategy):
    """DiLoCo's rounds (H steps, overlap, the end of a run); its own payload and outer step, no warm-up and
    no time-based rounds."""

    def __init__(self, ctx: StrategyContext, *, sync_every: int, sparseloco: SparseLoCoConfig,
                 overlap: bool = False) -> None:
        Strategy.__init__(self, ctx)  # not DiLoCo's: no outer optimizer, θ is kept here
        self.lr = sparseloco.lr
        self.params = flatten(ctx.params).detach().clone().to(torch.float32)  # the global θ, flat fp32
        self.accumulator = ErrorFeedback(ctx.comm.codec, decay=sparseloco.beta)
        self._init_rounds(sync_every=sync_every, warmup_steps=0, overlap=overlap)

    @property
    def theta(self) -> torch.Tensor:
        return self.params

    @property
    def _owner(self) -> list[int]:
        """Whose accumulator a state holds: a joiner healed from another site starts its own at zero."""
        return [int(self.ctx.comm.site), int(self.ctx.comm.local_rank)]

    def _send(self, delta: torch.Tensor) -> Pending:
        """The accumulator's chunked top-k, all-gathered; the collective encodes it through the accumulator."""
        return self.ctx.comm.all_reduce_mean(delta, key=KEY, feedback=self.accumulator)

    def _apply(self, mean: torch.Tensor, *, plain: bool) -> None:
        """θ ← θ − lr · mean of the sites' sparse updates (no warm-up: ``plain`` is always False)."""
        self.params.sub_(mean, alpha=self.lr)

    def _extra_state(self) -> dict:  # after the round in flight has landed: its residual is committed
        return {"params": self.params.clone(), "accumulator": self.accumulator.state_dict(), "owner": self._owner}

    def _load_extra_state(self, state: dict) -> None:
        self.params.copy_(state["params"])
        if list(state.get("owner", [])) == self._owner:  # this site's own checkpoint
            self.accumulator.load_state_dict(state["accumulator"])
        else:  # a healer's state: its accumulator holds what that site has yet to send, not this one
            self.accumulator.reset()
