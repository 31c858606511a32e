"""Time-based outer rounds (``outer.sync_every_seconds``): for sites of unequal speed.

With H-step rounds every site computes H steps and the fastest waits for the slowest at each sync. With
time-based rounds every site trains for T seconds (its training clock: compute and time held back by its
power or speed, not evaluation), contributes the inner steps it managed, and the pseudo-gradients are
averaged with token weights: the site that trained n_k tokens in the round weighs n_k / sum(n). A site that
is four times slower sends a pseudo-gradient of a quarter of the tokens and weighs a quarter as much.

How it is sent. Each site multiplies its pseudo-gradient by n_k / n_ref (n_ref: the tokens a site trains in
H steps, which keeps the payload's scale near that of plain DiLoCo for the codecs), the usual all-reduce
averages it over the K members, and a run-control sum (``CrossSiteComm.start_control_sum``, beside the
payload) adds up n_k and K. The token-weighted mean is then ``mean * K * n_ref / sum(n)``.

When the run ends. The token budget (``run.tokens``) is counted from those sums, so every site sees the
same numbers and takes the same decision. A blocking round's sum is known when the round's update lands; an
overlapped one's a round later, so the run projects the round in flight at the size of the last known one.
The run ends at the first round whose (projected) global total reaches the budget, and a round that would
overshoot it is shortened in proportion. The total can therefore differ from the budget by the error of that
projection (a few steps); ``summary.json`` reports what was trained.

Inside a site all workers must end the round at the same step: when a site has several, they agree every
step (a max of one flag over the site group).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from geotrain.algorithms.diloco import timed_round_length

__all__ = ["TimedRounds", "TokenWeighted"]


class TokenWeighted:
    """A round's all-reduce and its token sum in flight; ``wait()`` is the token-weighted mean."""

    def __init__(self, pending: Any, control: Any, n_ref: float) -> None:
        self.pending, self.control, self.n_ref = pending, control, n_ref

    def wait(self) -> torch.Tensor:
        mean = self.pending.wait()
        total, members = self.control.wait()
        return mean * (members * self.n_ref / total)


class TimedRounds:
    """The clock, counts and decisions of time-based rounds for one worker's strategy."""

    def __init__(self, *, seconds: float, budget_tokens: int, site_pg: Any, workers: int, lag: int,
                 sites: int = 1) -> None:
        self.seconds = float(seconds)
        self.budget = int(budget_tokens)
        self.site_pg, self.workers = site_pg, workers
        self.lag = lag
        """Rounds whose sums are not yet known at a round's end: 0 blocking, 1 overlapped."""
        self.wall: Callable[[], float] | None = None
        self.step_tokens = 0
        self.round_start: float | None = None
        self.round_steps = 0
        self.length = self.seconds
        """This round's length in seconds (the last one may be shorter)."""
        self.known_tokens = 0
        """Global tokens of the rounds whose sums have been counted."""
        self.known_round = 0
        """How many rounds those are."""
        self.last_total = 0.0
        """Global tokens of the newest counted round."""
        self.last_own = 0.0
        """This site's tokens in that round."""
        self.unsettled: list[tuple[Any, float]] = []
        """(token sum in flight, this site's tokens) of rounds not counted yet, oldest first."""
        self.sites = sites
        """Sites of the run: before any sum is counted, every site is taken to train as this one does."""
        self.rounds = 0
        self.finished = False
        self.skipping = False
        """The coming step is skipped (:meth:`skip_step`): the round ends without it."""

    def begin(self, wall: Callable[[], float], step_tokens: int, *, round_start: float | None = None) -> None:
        """The loop's training clock and the tokens one inner step of this site trains. A round starts now (a
        run starts, resumes or is healed at a round boundary), or began at ``round_start`` on that clock (a site
        healed in the background joins the members' round, begun at the healer's snapshot)."""
        self.wall, self.step_tokens = wall, int(step_tokens)
        self.round_start, self.round_steps = (wall() if round_start is None else float(round_start)), 0

    def skip_step(self, now: float, step_seconds: float) -> bool:
        """Before a step that starts at ``now`` and is expected to last ``step_seconds``: a site that has not
        trained in this round yet goes to the sync without the step when the step would end more than half of
        it past the round's end (a site back from an outage, its power returning near the round's end and its
        first step slowed by the ramp: the members would wait for that step). The next :meth:`due` then ends
        the round with no step counted. ``now`` and ``step_seconds`` are the site's agreed figures
        (``Pace.begin_step``), so its workers decide alike."""
        assert self.round_start is not None, "begin() first"
        self.skipping = (self.round_steps == 0 and step_seconds > 0
                         and now + step_seconds / 2 > self.round_start + self.length)
        return self.skipping

    def due(self, *, last: bool) -> bool:
        """Called after every inner step (or a skipped one, :meth:`skip_step`): does the round end now? (The same
        answer on all the site's workers.)"""
        assert self.wall is not None, "begin() first"
        assert self.round_start is not None
        stepped, self.skipping = not self.skipping, False
        self.round_steps += int(stepped)
        over = last or not stepped or self.wall() - self.round_start >= self.length
        if self.workers > 1:
            flag = torch.tensor([1.0 if over else 0.0])
            self.site_pg.allreduce([flag]).wait()  # a sum: the round ends if any worker's clock says so
            over = bool(flag.item() > 0)
        return over

    def own_tokens(self) -> float:
        """This site's tokens in the round that is ending."""
        return float(self.round_steps * self.step_tokens)

    def weigh(self, delta: torch.Tensor, comm: Any, *, n_ref: float, key: str) -> TokenWeighted:
        """Send this site's pseudo-gradient of the round with its token weight; returns the weighted mean in
        flight."""
        n = self.own_tokens()
        pending = comm.all_reduce_mean(delta * (n / n_ref), key=key)
        control = comm.start_control_sum(f"round_tokens/{self.rounds}", [n, 1.0])
        self.unsettled.append((control, n))
        return TokenWeighted(pending, control, n_ref)

    def end_round(self) -> None:
        """After the round's sync was started (and, blocking, applied): count the sums the lag allows, decide
        whether the run is over and how long the next round is."""
        self.rounds += 1
        self._count(keep=self.lag)
        length = timed_round_length(seconds=self.seconds, budget=self.budget, counted_tokens=self.known_tokens,
                                    counted_rounds=self.known_round, rounds_in_flight=len(self.unsettled),
                                    last_total=self.last_total)
        if length is None:
            self.finished = True
        else:
            self.length = length
        self.round_steps = 0
        self.round_start = self.wall() if self.wall is not None else None

    def tokens(self) -> float:
        """Global tokens so far: those counted, the rounds in flight at the size of the last counted one (the
        same figure on every site at a round's end), and this round's own progress at the ratio of the last
        counted round (every site's share as it was then; before any, every site as this one)."""
        ratio = self.last_total / self.last_own if self.last_own > 0 else float(self.sites)
        return self.known_tokens + len(self.unsettled) * self.last_total + self.own_tokens() * ratio

    def settle(self) -> None:
        """Count every sum still in flight (the end of the run, a checkpoint or an admission)."""
        self._count(keep=0)

    def _count(self, *, keep: int) -> None:
        """Count the oldest sums in flight until ``keep`` are left."""
        while len(self.unsettled) > keep:
            control, own = self.unsettled.pop(0)
            total, _ = control.wait()
            self.known_tokens += int(round(total))
            self.known_round += 1
            self.last_total, self.last_own = float(total), own

    def state_dict(self) -> dict[str, Any]:
        self.settle()
        return {"known_tokens": self.known_tokens, "known_round": self.known_round, "last_total": self.last_total,
                "last_own": self.last_own, "rounds": self.rounds, "length": self.length, "finished": self.finished}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.known_tokens = int(state["known_tokens"])
        self.known_round = int(state["known_round"])
        self.last_total, self.last_own = float(state["last_total"]), float(state["last_own"])
        self.rounds, self.length = int(state["rounds"]), float(state["length"])
        self.finished = bool(state["finished"])
        self.unsettled, self.round_steps, self.round_start = [], 0, None
