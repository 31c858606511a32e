"""The training loop's timekeeping: the spread of compute time between sync points (round_compute_cv)."""

from __future__ import annotations

import math
import statistics

import pytest

from geotrain.clock import VirtualClock
from geotrain.train.timing import RunTimer


def rounds(clock: RunTimer, seconds: list[float], steps: list[int]) -> None:
    done = 0
    for x, n in zip(seconds, steps):
        clock.compute += x
        done += n
        clock.end_round(done)


def test_spread_leaves_out_the_first_round_and_rounds_of_another_length():
    clock = RunTimer(VirtualClock())
    # a slow first round (warm-up), four full rounds of 10 steps, then a short last round of 3 steps
    rounds(clock, [9.0, 1.0, 1.2, 0.8, 1.0, 0.3], [10, 10, 10, 10, 10, 3])
    full = [1.0, 1.2, 0.8, 1.0]
    assert clock.rounds == 4
    assert clock.round_cv() == pytest.approx(statistics.stdev(full) / statistics.mean(full))


def test_equal_rounds_have_no_spread_and_one_round_has_none_to_measure():
    clock = RunTimer(VirtualClock())
    rounds(clock, [5.0, 2.0, 2.0, 2.0], [25, 25, 25, 25])
    assert clock.round_cv() == pytest.approx(0.0, abs=1e-12)
    lone = RunTimer(VirtualClock())
    rounds(lone, [5.0, 2.0], [1, 1])
    assert lone.round_cv() is None  # the first round is left out, one more is not a spread


def test_every_step_a_round_as_in_ddp():
    clock = RunTimer(VirtualClock())
    times = [0.3] + [0.1, 0.12, 0.08, 0.1, 0.1, 0.14]
    rounds(clock, times, [1] * len(times))
    assert clock.round_cv() == pytest.approx(statistics.stdev(times[1:]) / statistics.mean(times[1:]))
    assert math.isfinite(clock.round_cv())
