"""The strategy interface: the one place where training methods differ in the training loop.

The training loop (``geotrain.train.loop``) calls a strategy at three visible points of every inner step:

1. ``reduce_gradients()`` after ``backward()`` (which already averaged gradients inside the site, with
   PyTorch's DDP or FSDP): DDP across sites averages them across sites here; DiLoCo does nothing.
2. ``after_inner_step(step, last=...)`` after the inner optimizer has stepped: DiLoCo runs an outer round
   every H steps here. It returns True at a sync point, where every site holds the same global parameters
   (``global_parameters()``; the local ones may differ under overlap or while fragments travel), which is
   where the loop may evaluate, checkpoint or stop.
3. ``global_parameters()``: the tensors that define the global model (for evaluation and hashing).

Strategies get their process groups and the cross-site collective explicitly; none touches a default group.
Each strategy belongs to an algorithm definition (``geotrain.algorithms``), whose ``build`` creates it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from geotrain.comm.collectives import CrossSiteComm
from geotrain.comm.site_parallel import local

__all__ = ["Strategy", "StrategyContext"]


@dataclass(slots=True)
class StrategyContext:
    """Everything a strategy may use: the model, the cross-site collective and the site group."""

    model: nn.Module
    comm: CrossSiteComm
    site_pg: Any
    workers: int

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


class Strategy:
    """Base class. Subclasses override the hooks they need."""

    def __init__(self, ctx: StrategyContext) -> None:
        self.ctx = ctx
        self.outer_rounds = 0
        """Cross-site synchronisations of the model (or, for ddp, of the gradients) so far."""

    def begin(self, *, wall: Any, step_tokens: int, round_start: float | None = None) -> None:
        """Before the first step: the loop's training clock (``wall()``, seconds) and the tokens one inner step
        of this site trains; the round began at ``round_start`` on that clock (None: now). Time-based rounds
        read them; other methods ignore them."""

    def skip_step(self, now: float, step_seconds: float) -> bool:
        """Before a step that starts at ``now`` (the training clock) and is expected to last ``step_seconds``:
        whether the site goes to the round's sync without it. If so, the next :meth:`after_inner_step` ends the
        round with no step counted. Only time-based rounds skip (a round the site has not trained in, which ends
        before the step would be half done); other methods never do."""
        return False

    @property
    def finished(self) -> bool:
        """The method ended the run at this sync point (time-based rounds reach the token budget)."""
        return False

    def run_tokens(self) -> float | None:
        """Tokens all sites have trained so far when the method counts them itself (time-based rounds, where
        sites step at their own pace); None: the loop counts steps x the global batch."""
        return None

    def reduce_gradients(self) -> None:
        """Average gradients across sites, if the method does at every step. Inside the site they are already
        averaged: DDP or FSDP did it during backward (``geotrain.comm.site_parallel``)."""

    def after_inner_step(self, step: int, *, last: bool) -> bool:
        raise NotImplementedError

    def global_parameters(self) -> list[torch.Tensor]:
        """The global model's tensors, in parameter order (this worker's shards under FSDP)."""
        return [local(p).detach() for p in self.ctx.params]

    def sync_payloads(self) -> list[int]:
        """Values in each distinct cross-site sync, in turn (the whole model once; fragments for streaming)."""
        return [sum(p.numel() for p in self.ctx.params)]

    def sync_bytes_per_round(self) -> int:
        """Bytes one worker contributes per full-model synchronisation (every payload once)."""
        return sum(self.ctx.comm.payload_bytes(n) for n in self.sync_payloads())

    def syncs_in_flight(self) -> int:
        """Cross-site syncs still travelling, which ``close()`` would wait for (one after another: a worker's
        transfers share one communication thread)."""
        return 0

    def close(self) -> None:
        """Finish any in-flight communication and apply it, so the global parameters include it."""

    def drain(self) -> None:
        """Apply every sync still in flight now, so that no transfer is pending and a joining site can be given
        the whole state (its local parameters start from the global ones). Every site drains at the same step."""
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """The strategy's own state beyond the model and the inner optimizer: global parameters, outer
        momentum, syncs in flight (waited for, so their means are kept), counters."""
        return {"outer_rounds": self.outer_rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.outer_rounds = int(state["outer_rounds"])
