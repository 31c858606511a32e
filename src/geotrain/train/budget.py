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
