"""Time sources: the real clock of a run and a virtual one for exact tests.

Everything in geotrain that reads the time or waits for it takes a :class:`Clock`: the loop's timekeeping
(``train/timing.py``), the WAN emulator's hold (``wan/emulator.py``), the transport's transfer times and the
cross-site collectives' wait accounting (``comm/``). A run uses :data:`REAL_CLOCK`. Tests pass a
:class:`VirtualClock`, on which time moves only when the code says so (a fake workload "computes" by
advancing it, the emulator "holds" a transfer by advancing it), so that utilization, overlap and budget
stops are checked as exact arithmetic and cannot depend on how busy the machine is.

A clock has two operations, ``now()`` and ``sleep_until(t)``. Waiting for a result that was ready at time
``t`` is ``sleep_until(t)`` too: on the real clock that time has already passed and the call returns at once;
on a virtual clock it moves the caller's time forward to ``t`` if it is behind.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

__all__ = ["Clock", "REAL_CLOCK", "RealClock", "VirtualClock"]


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on this clock (an arbitrary origin; only differences mean anything)."""
        ...

    def sleep_until(self, t: float) -> None:
        """Return when ``now()`` has reached ``t`` (at once if it already has)."""
        ...


class RealClock:
    """``time.perf_counter`` and a sleep accurate to well under a millisecond."""

    __slots__ = ()

    def now(self) -> float:
        return time.perf_counter()

    def sleep_until(self, t: float) -> None:
        while True:
            left = t - time.perf_counter()
            if left <= 0:
                return
            # sleep most of the way, then spin briefly: time.sleep alone can overshoot by a scheduler tick
            time.sleep(left - 0.0005 if left > 0.002 else 0)

    def __repr__(self) -> str:
        return "RealClock()"


REAL_CLOCK = RealClock()
"""The clock every run uses."""


class VirtualClock:
    """Virtual seconds, one timeline per thread, that pass only through ``advance`` and ``sleep_until``.

    One site is one virtual clock. Its training thread and its communication threads each keep their own
    time, because they run concurrently: the training thread advances by the compute it does, the
    communication thread by the transfers it carries (one after another, as on one link). A thread that
    waits for the other's result moves to the time the result was ready (``sleep_until``), so overlapped
    communication costs ``max(compute, transfer)`` and blocking communication ``compute + transfer``,
    exactly. A new thread starts at ``start``.

    The model does not make one site wait for another: a collective lasts, on each site's timeline, what
    the emulated links charge from that site's own start, as the real emulator charges it. Sites that
    compute at the same virtual speed therefore give exact figures.
    """

    def __init__(self, start: float = 0.0) -> None:
        self.start = float(start)
        self._local = threading.local()

    def now(self) -> float:
        return getattr(self._local, "t", self.start)

    def sleep_until(self, t: float) -> None:
        self._local.t = max(self.now(), float(t))

    def advance(self, seconds: float) -> None:
        """Spend ``seconds`` on the calling thread (what a fake workload's compute does)."""
        if seconds < 0:
            raise ValueError(f"a clock cannot go back, got {seconds} s")
        self._local.t = self.now() + float(seconds)

    def __repr__(self) -> str:
        return f"VirtualClock(now={self.now()})"
