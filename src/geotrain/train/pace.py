"""How fast a site may compute, step by step: its hardware's speed factor and the power its grid gives it.

A site of an emulated run computes on this machine's CPU cores at whatever speed they give. To stand for a
slower site (``run.site_speeds``: other accelerators, fewer of them) or for a site whose power is capped
(``[grid]``, ``geotrain.power``), the loop holds each step back after it computes: a step whose compute took
``c`` seconds at a speed factor ``f`` in (0, 1] is followed by a hold of ``c * (1/f - 1)``, so the step lasts
``c / f``, what it would take on hardware ``f`` times as fast. This is a duty cycle of the cores: during the
hold the process sleeps on the run's clock (a virtual one in tests) and the cores are free for the other sites.

The factor of a step is ``speed x active``: the site's speed factor times the share of its accelerators' power
range the power controller allows at the step's start (1 without ``[grid]``). The draw is held for the whole
step, so under a ramp limit a step that would start at a low draw the ramp is about to raise (a site powered
again) first waits, when starting later at the higher setpoint the ramp then allows ends it sooner
(``PowerController.start_delay``; the controller holds the last draw through the wait, idle after a return);
that wait is throttled time too. A step's work (what it takes at full power) is estimated from the latest
steps' compute (:meth:`Pace.work`). The hold is reported as
``throttled`` time, apart from compute (what the cores did) and from waiting on the network. The emulated
accelerators are busy during it (computing slower), so utilization counts it as busy time
(``train/timing.py``).
"""

from __future__ import annotations

import statistics
from typing import Any

__all__ = ["Pace", "PowerOff"]


class PowerOff(Exception):  # noqa: N818 - an event, like Evicted
    """The grid no longer gives this site enough power to run: it leaves the run (``train/site.py``), waits
    until the power returns (``back_at``, training seconds of the run, None if the trace never gives it back)
    and joins again to be healed."""

    def __init__(self, *, wall: float, grid_hours: float, back_at: float | None,
                 powered_on: float | None = None) -> None:
        when = "the trace never returns it" if back_at is None else f"it returns at {back_at:.1f} s"
        super().__init__(f"the grid's power fell below what the site needs to run at {wall:.1f} s; {when}")
        self.wall, self.grid_hours, self.back_at = wall, grid_hours, back_at
        self.powered_on = powered_on
        """When the power had returned, if it failed again at the first step after (its power_on record)."""


WORK_WINDOW = 5
"""Steps whose compute estimates the next step's work (their median)."""

WORK_MIN = 3
"""Steps of compute known before the estimate is used (a run's first step is slow: allocation, warm-up)."""

_EARLY = 1e-6
"""Seconds a step may start before the power's return and still count as starting at it (a clock's rounding)."""


def _max_op() -> Any:
    import torch.distributed as dist

    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MAX
    return opts


class Pace:
    """One worker's pacing: ``speed`` (the site's factor) and ``power`` (a ``geotrain.power.PowerController``
    or None). Without either it does nothing (factor 1, no hold)."""

    def __init__(self, *, speed: float = 1.0, power: Any = None, site_pg: Any = None, workers: int = 1,
                 gpu: Any = None) -> None:
        if not 0 < speed <= 1:
            raise ValueError(f"a speed factor lies in (0, 1], got {speed}")
        self.speed = float(speed)
        self.power = power
        self.gpu = gpu
        """This worker's GPU (``geotrain.power.nvml.GpuPower``) on CUDA with NVML: the board's power limit
        follows the controller, so the hardware slows itself instead of the step being held back."""
        self.site_pg, self.workers = site_pg, workers
        self.step: Any = None
        """The power controller's decision for the current step (``StepPower``), None without power."""
        self.factor = self.speed
        self.back_at: float | None = None
        """After an outage: when the site's power returns (training seconds), until its first step there."""
        self.powered_on: float | None = None
        """The time power returned, once, for the loop's ``power_on`` record (:meth:`take_power_on`)."""
        self.waiting = ""
        """What the wait :meth:`begin_step` last asked for is for: ``power`` (it is not back yet: no draw) or
        ``ramp`` (the draw is ramping up: the step ends sooner if it starts later; counted as throttled)."""
        self.delayed = False  # this step already waited for the ramp: it starts at the next call
        self.works: list[float] = []
        """What the latest steps' work took at full power (compute seconds; on a GPU whose limit slowed the step,
        scaled back by its share of power), newest last, at most WORK_WINDOW."""
        self.limited = False  # the GPU's power limit, not a hold, slows the current step
        self.t_step: float | None = None  # when the current step began, on the site's agreed clock

    @property
    def active(self) -> bool:
        """Whether steps are held back at all (a speed factor or power control)."""
        return self.speed < 1 or self.power is not None

    def expect_power(self, back_at: float) -> None:
        """The site left the run for lack of power (:class:`PowerOff`) and its power returns at ``back_at``. It
        may be back in the run before that (``geotrain.power.rejoin_lead_seconds``): its first step then waits
        for the power (:meth:`begin_step`), drawing nothing meanwhile."""
        self.back_at = float(back_at)

    def begin_step(self, wall: float) -> float:
        """A step starts at ``wall`` training seconds of the run: take the power controller's decision for it.
        Returns 0, or the seconds to wait before the step may start (:attr:`waiting` says why): wait, then call
        again. Raises :class:`PowerOff` when the site cannot run."""
        if self.power is None:
            return 0.0
        work = self.work()
        if self.workers > 1:  # the site's workers take one decision: at the latest of their clocks
            import torch

            t = torch.tensor([wall, work], dtype=torch.float64)
            self.site_pg.allreduce([t], _max_op()).wait()
            wall, work = (float(x) for x in t.tolist())
        if self.back_at is not None:
            if wall < self.back_at - _EARLY:
                self.waiting = "power"
                return self.back_at - wall
            self.power.rejoin(self.back_at)  # idle draw from the moment the power is back (healing included)
            self.powered_on, wall, self.back_at = self.back_at, max(wall, self.back_at), None
        if not self.delayed:  # under a ramp limit: wait for the draw to rise if the step then ends sooner
            delay = self.power.start_delay(wall, work)
            if delay > 0:
                self.waiting, self.delayed = "ramp", True
                return delay
        self.delayed = False
        self.step = self.power.begin_step(wall, work or None)  # a draw it can hold until the step ends
        self.t_step = wall
        if not self.step.on:
            self.power.leave(wall)
            raise PowerOff(wall=wall, grid_hours=self.step.grid_hours, back_at=self.power.back_at(wall, work or None),
                           powered_on=self.take_power_on())
        self.limited = self.gpu is not None and self.gpu.apply(self.step.active)
        self.factor = self.speed if self.limited else self.speed * self.step.active
        return 0.0

    def work(self) -> float:
        """What the next step's work takes at full power and this site's speed: the median of the latest
        WORK_WINDOW steps' (robust to a slow first step after a start), 0 while fewer than WORK_MIN are known."""
        if len(self.works) < WORK_MIN:
            return 0.0
        return statistics.median(self.works) / self.speed

    def step_seconds(self) -> float:
        """How long the step just begun (:meth:`begin_step`) is expected to last: its work at full power over
        the share of power it runs at; 0 while the work is not known yet."""
        active = self.step.active if self.step is not None else 1.0
        return self.work() / active if active > 0 else 0.0

    def take_power_on(self) -> float | None:
        """When the site's power returned, if it did since the last call (else None)."""
        t, self.powered_on = self.powered_on, None
        return t

    def hold(self, compute_seconds: float) -> float:
        """Seconds to hold the step back after ``compute_seconds`` of compute, so that it lasts compute / factor."""
        if compute_seconds > 0:
            full = compute_seconds * self.step.active if self.limited and self.step is not None else compute_seconds
            self.works = [*self.works[-(WORK_WINDOW - 1):], full]
        if self.factor >= 1 or compute_seconds <= 0:
            return 0.0
        return compute_seconds * (1.0 / self.factor - 1.0)

    def end_step(self, compute_end: float, end: float) -> None:
        """The step computed (held back included) until ``compute_end`` and waited on the network until ``end``
        (training seconds): the power controller charges its energy."""
        if self.power is not None:
            if self.t_step is not None:  # the site's step began at the latest of its workers' clocks
                compute_end = max(compute_end, self.t_step)
            self.power.end_step(compute_end, max(end, compute_end))

    def fields(self, *, run_s: float) -> dict[str, Any]:
        """What a ``step`` record adds: the site's draw while the step computed (``power_mw``) and while it
        waited on the network (``wait_mw``), the grid's cap, energy, grid time, share of power in use, and
        ``run_s``, the run's training clock at the record (``wall_s`` restarts when a site comes back after an
        outage; ``run_s`` goes on, as the grid's time does)."""
        if self.power is None or self.step is None:
            return {"speed": self.speed} if self.speed < 1 else {}
        s, p = self.step, self.power
        out = {"power_mw": s.draw_mw, "wait_mw": p.held_mw, "cap_mw": s.cap_mw, "energy_mwh": p.energy_mwh,
               "grid_hours": s.grid_hours, "active": s.active, "speed": self.speed, "run_s": run_s}
        if self.gpu is not None:  # what the board itself draws, and whether its limit follows the controller
            out.update(gpu_watts=self.gpu.watts(), gpu_limited=self.gpu.limiting)
        return out

    def close(self) -> None:
        """Give the GPU its power limit back."""
        if self.gpu is not None:
            self.gpu.close()

    def state_dict(self) -> dict[str, Any] | None:
        """The power controller's counters (energy so far), for a checkpoint."""
        return None if self.power is None else self.power.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.power is not None and state is not None:
            self.power.load_state_dict(state)

    def figures(self) -> dict[str, Any]:
        """What the ``done`` record adds."""
        if self.power is None:
            return {}
        p = self.power
        return {"energy_mwh": p.energy_mwh, "peak_power_mw": p.peak_mw, "carbon_kg": p.carbon_kg,
                "smoothing_mwh": p.smoothing_mwh}
