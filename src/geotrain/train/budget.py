"""The wall-time budget's stop vote (``run.wall_seconds``): every site stops at the same sync point, before a
round that would overrun the budget, without ever waiting for a slower site to decide.
"""

from __future__ import annotations

from typing import Any

import torch

from geotrain.comm.collectives import ControlPending, CrossSiteComm

__all__ = ["BudgetVote"]


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
        self.settled: bool | None = None
        """The outcome of a vote waited for early (settle), read at the next sync point."""

    def stop_now(self, wall: float, *, drain: float = 0.0, step: int) -> bool:
        """Call at every sync point but the last, with the training wall time, the time a sync in flight
        would still take to land (``drain``) and the step; True means stop here."""
        round_wall = wall - self.last_sync_wall
        self.last_sync_wall = wall
        if self.pending is not None or self.settled is not None:
            if self.settled is None:
                self.settle()
            total, self.settled = self.settled, None
            if total:
                return True
        self.pending = self.comm.start_control_sum(
            f"budget/{step}", [1.0 if wall + 2 * round_wall + drain > self.budget else 0.0])
        return False

    def settle(self) -> None:
        """Wait for the vote in flight now and keep its outcome (before a joiner is given the state, so that
        it stops at the same sync point as everyone)."""
        if self.pending is None:
            return
        total = torch.tensor(self.pending.wait(), dtype=torch.float64)
        self.pending = None
        if self.workers > 1:  # a site's workers vote over their own sums: agree inside the site
            self.site_pg.allreduce([total]).wait()
        self.settled = float(total[0]) > 0

    def state_dict(self) -> dict[str, Any]:
        self.settle()
        return {"last_sync_wall": self.last_sync_wall, "settled": self.settled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_sync_wall = float(state["last_sync_wall"])
        self.settled = state["settled"]

    def finish(self) -> None:
        """Wait for a vote still in flight (every member started it, so it completes)."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
