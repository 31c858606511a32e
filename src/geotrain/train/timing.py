"""A worker's timekeeping in the training loop: compute, throttled, evaluation (paused) and training wall time.

``utilization = (compute + throttled) / (wall - powered_off)``: compute is forward, backward, in-site averaging
and the inner optimizer step; throttled is the time a step is held back to emulate a slower or power-capped site
(``train/pace.py``), when its accelerators are busy computing more slowly (0 unless a run paces its sites);
powered_off is the time a site back in the run after a power outage waits for its power to return (it has none
to train with, as while it was away); evaluation pauses the clock, so measurement does not dilute utilization. Time comes from a
:class:`geotrain.clock.Clock`, so tests check these figures as exact arithmetic on a virtual clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from geotrain.clock import REAL_CLOCK, Clock

__all__ = ["RunTimer"]


@dataclass(slots=True)
class RunTimer:
    """Where one worker's training time goes: compute, paused evaluation, and the spread of compute time
    between sync points. Reads ``clock`` (the real one in a run, a virtual one in tests)."""

    clock: Clock = REAL_CLOCK
    start: float = field(init=False)
    compute: float = 0.0
    throttled: float = 0.0  # steps held back by the site's speed factor or power (train/pace.py)
    paused: float = 0.0  # evaluation time, excluded from the training wall time
    powered_off: float = 0.0  # waiting, as a member, for the power to return after an outage (train/pace.py)
    # Compute time between consecutive sync points (Welford's running mean and sum of squared deviations):
    # its spread is what makes a synchronous site wait for the others even when all are equally fast. Left
    # out: the first round, whose first step (allocation, warm-up) is slow on every site at once, and any
    # round of another length than the second (a short last round).
    rounds: int = 0
    round_mean: float = 0.0
    round_m2: float = 0.0
    _round_start: float = 0.0
    _round_start_step: int = 0
    _round_steps: int = -1  # -1 until the first round ends, then 0 until the second sets the length

    def __post_init__(self) -> None:
        self.start = self.clock.now()

    def now(self) -> float:
        return self.clock.now()

    def busy(self) -> float:
        """Time the site's accelerators spent on training steps: compute plus throttled."""
        return self.compute + self.throttled

    def utilization(self) -> float:
        wall = self.wall() - self.powered_off
        return self.busy() / wall if wall > 0 else 0.0

    def wall(self) -> float:
        """Training wall time so far: evaluation excluded."""
        return self.clock.now() - self.start - self.paused

    def end_round(self, steps_done: int) -> None:
        """A sync point after ``steps_done`` inner steps in all."""
        x = self.busy() - self._round_start
        length = steps_done - self._round_start_step
        self._round_start, self._round_start_step = self.busy(), steps_done
        if self._round_steps < 0:
            self._round_steps = 0
            return
        if self._round_steps == 0:
            self._round_steps = length
        if length != self._round_steps:
            return
        self.rounds += 1
        d = x - self.round_mean
        self.round_mean += d / self.rounds
        self.round_m2 += d * (x - self.round_mean)

    _SAVED = ("compute", "throttled", "powered_off", "paused", "rounds", "round_mean", "round_m2", "_round_start",
              "_round_start_step", "_round_steps")

    def state_dict(self) -> dict[str, float]:
        """The figures so far, for a checkpoint: a resumed run goes on counting from them."""
        return {"wall": self.wall(), **{k: getattr(self, k) for k in self._SAVED}}

    def load_state_dict(self, state: dict[str, float]) -> None:
        for k in self._SAVED:
            setattr(self, k, type(getattr(self, k))(state.get(k, 0.0) if k in ("throttled", "powered_off") else state[k]))
        self.start = self.clock.now() - float(state["wall"]) - self.paused

    def round_cv(self) -> float | None:
        """Coefficient of variation of the compute time between sync points (None before two rounds)."""
        if self.rounds < 2 or self.round_mean <= 0:
            return None
        return math.sqrt(self.round_m2 / (self.rounds - 1)) / self.round_mean
