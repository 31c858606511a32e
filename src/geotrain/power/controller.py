"""One site's electrical model (:class:`SitePower`) and the controller that sets its draw step by step
(:class:`PowerController`). The semantics are written out in the package docstring (``geotrain.power``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from geotrain.power.trace import GridTrace

__all__ = ["LOOKAHEAD_MARGIN", "PowerController", "SitePower", "StepPower"]

LOOKAHEAD_MARGIN = 1.25
"""The default lookahead is this many times the time the ramp needs to take the site from limit_mw to 0."""


_SETPOINT_CANDIDATES = 32
"""Draws tried, from the setpoint down to the least the ramp allows, when a step's setpoint must be lowered to
last the step."""

_BISECTIONS = 40
"""Halvings that refine such a lowered setpoint."""

_START_CANDIDATES = 64
"""Start times ``start_delay`` compares, evenly spaced up to the time the ramp reaches the site's limit."""


def _tolerance(level: float) -> float:
    """How far below ``level`` a computed draw may fall and still count as reaching it (float rounding in the
    envelope and in the crossing points of a trace)."""
    return 1e-9 * max(1.0, abs(level))


@dataclass(kw_only=True, slots=True)
class SitePower:
    """One site's electrical model: ``accelerators`` boards of ``watts`` each, behind a facility of power usage
    effectiveness ``pue``, under an optional grid cap. Power is facility power in MW throughout.

    A powered site draws ``idle_mw`` with nothing computing and ``full_mw`` with every accelerator busy; in
    between, its draw is ``idle + active * (full - idle)`` where ``active`` (0..1) is the share of the
    accelerators' dynamic range in use, which compute speed follows."""

    name: str
    accelerators: int
    watts: float
    pue: float
    cap_mw: float | None
    """The site's grid cap in MW (facility power), None for none."""
    idle_fraction: float
    """The draw of a powered site with nothing computing, as a fraction of full_mw."""

    def __post_init__(self) -> None:
        if isinstance(self.accelerators, bool) or not isinstance(self.accelerators, int) or self.accelerators < 1:
            raise ValueError(f"site {self.name!r}: accelerators must be a whole number >= 1, got {self.accelerators!r}")
        if not (math.isfinite(self.watts) and self.watts > 0):
            raise ValueError(f"site {self.name!r}: watts must be a positive number, got {self.watts!r}")
        if not (math.isfinite(self.pue) and self.pue >= 1):
            raise ValueError(f"site {self.name!r}: pue must be at least 1, got {self.pue!r}")
        if self.cap_mw is not None and not (math.isfinite(self.cap_mw) and self.cap_mw > 0):
            raise ValueError(f"site {self.name!r}: cap_mw must be a positive number of MW or None, got {self.cap_mw!r}")
        if not (math.isfinite(self.idle_fraction) and 0 <= self.idle_fraction < 1):
            raise ValueError(f"site {self.name!r}: idle_fraction must lie in [0, 1), got {self.idle_fraction!r}")

    @property
    def full_mw(self) -> float:
        """Facility draw with every accelerator busy: accelerators * watts * pue, in MW."""
        return self.accelerators * self.watts * self.pue / 1e6

    @property
    def idle_mw(self) -> float:
        """Facility draw of the powered site with nothing computing."""
        return self.full_mw * self.idle_fraction

    @property
    def limit_mw(self) -> float:
        """The most the site ever draws: full_mw, or the cap when that is lower."""
        return self.full_mw if self.cap_mw is None else min(self.full_mw, self.cap_mw)

    def draw_mw(self, active: float) -> float:
        """The draw at ``active`` (0..1): idle + active * (full - idle)."""
        return self.idle_mw + active * (self.full_mw - self.idle_mw)

    def active_at(self, draw_mw: float) -> float:
        """The inverse of :meth:`draw_mw`, clamped to [0, 1]: the share of the dynamic range ``draw_mw`` buys."""
        return min(1.0, max(0.0, (draw_mw - self.idle_mw) / (self.full_mw - self.idle_mw)))


@dataclass(slots=True)
class StepPower:
    """What the controller decided at one step's start."""

    draw_mw: float
    """The site's draw while this step computes (the controller's setpoint)."""
    cap_mw: float
    """Power available from the grid at the step's start: min(cap, trace)."""
    active: float
    """Share of the accelerators' dynamic range in use, 0..1; compute speed follows it."""
    on: bool
    """False: the setpoint is below idle + min_active * (full - idle), so the site cannot keep training and
    should leave (``PowerController.leave``) until ``back_at``."""
    grid_hours: float
    """Grid time at the step's start, in hours."""


class PowerController:
    """Sets one site's draw at each step's start, within its available power and ramp limit, and integrates
    its energy, peak and carbon. ``t`` arguments are training seconds since the run started (the loop's run
    clock); grid seconds are ``start_hours * 3600 + t * time_scale``.

    ``ramp_mw_per_min`` is in MW per minute of grid time (None: no limit); ``lookahead_s`` is in grid seconds
    and, with a ramp limit, at least the time the ramp needs from limit_mw to 0 (default: LOOKAHEAD_MARGIN
    times that). Calls come in time order: ``begin_step`` then ``end_step`` per step, ``leave`` and ``rejoin``
    in between; a time earlier than the last one is refused."""

    def __init__(self, site: SitePower, trace: GridTrace | None, *, time_scale: float = 1.0,
                 start_hours: float = 0.0, ramp_mw_per_min: float | None = None, min_active: float = 0.05,
                 lookahead_s: float | None = None) -> None:
        if not (math.isfinite(time_scale) and time_scale > 0):
            raise ValueError(f"time_scale must be a positive number of grid seconds per training second, got "
                             f"{time_scale!r}")
        if not (math.isfinite(start_hours) and start_hours >= 0):
            raise ValueError(f"start_hours must be a grid time >= 0, got {start_hours!r}")
        if ramp_mw_per_min is not None and not (math.isfinite(ramp_mw_per_min) and ramp_mw_per_min > 0):
            raise ValueError(f"ramp_mw_per_min must be a positive number or None, got {ramp_mw_per_min!r}")
        if not (math.isfinite(min_active) and 0 < min_active <= 1):
            raise ValueError(f"min_active must lie in (0, 1], got {min_active!r}")
        self.site, self.trace = site, trace
        self.time_scale, self.start_hours = float(time_scale), float(start_hours)
        self.ramp_mw_per_min, self.min_active = ramp_mw_per_min, float(min_active)
        self.rate = None if ramp_mw_per_min is None else ramp_mw_per_min / 60.0
        """The ramp limit in MW per grid second."""
        if self.rate is None:
            self.lookahead_s = 0.0
        else:
            needed = site.limit_mw / self.rate
            if lookahead_s is None:
                lookahead_s = LOOKAHEAD_MARGIN * needed
            elif not (math.isfinite(lookahead_s) and lookahead_s >= needed):
                raise ValueError(f"lookahead_s must be at least {needed:g} grid seconds, the time the ramp needs to "
                                 f"take site {site.name!r} from {site.limit_mw:g} MW to 0, got {lookahead_s!r}")
            self.lookahead_s = float(lookahead_s)
        self.threshold_mw = site.draw_mw(self.min_active)
        """The least draw at which the site trains: idle + min_active * (full - idle)."""
        # The cap a fraction trace is a fraction of, and the bound of an MW trace.
        self._trace_cap = site.cap_mw if site.cap_mw is not None else site.full_mw
        self._reset()

    def _reset(self) -> None:
        self.energy_mwh = 0.0
        """Integral of the draw over grid time so far, MWh."""
        self.peak_mw = 0.0
        """The highest draw held for a positive time so far."""
        self.carbon_kg: float | None = None if self._carbon_free() else 0.0
        """Integral of draw times carbon intensity, kg CO2; None without a carbon trace."""
        self.smoothing_mwh = 0.0
        """Energy spent holding the draw through waits (with a ramp limit), MWh; part of energy_mwh."""
        self._t_last: float | None = None  # training time up to which energy is charged
        self._held_mw = 0.0  # the draw from _t_last until the next event
        self._prev_mw: float | None = None  # the last setpoint (the ramp's reference) ...
        self._prev_g = 0.0  # ... and the grid seconds it was set at
        self._present = True
        self._step_t: float | None = None  # an open step: its start, setpoint and carbon intensity
        self._step_mw = 0.0
        self._step_carbon = 0.0

    def _carbon_free(self) -> bool:
        return self.trace is None or self.trace.carbon is None

    # -- time and power ---------------------------------------------------------------------------------------

    def grid_seconds(self, t: float) -> float:
        """Grid seconds at training time ``t``."""
        return self.start_hours * 3600.0 + t * self.time_scale

    def training_seconds(self, grid_seconds: float) -> float:
        """Training time at ``grid_seconds`` (the inverse of :meth:`grid_seconds`)."""
        return (grid_seconds - self.start_hours * 3600.0) / self.time_scale

    def available_mw(self, grid_seconds: float) -> float:
        """A(g): min(cap, trace(g)); without a trace the cap, or full_mw without a cap."""
        if self.trace is None:
            return self._trace_cap
        return self.trace.available_mw(grid_seconds, self._trace_cap)

    def envelope_mw(self, grid_seconds: float) -> float:
        """min(limit_mw, E(g)), with E(g) = min over g' in [g, g + lookahead] of A(g') + R * (g' - g): the
        highest draw at g from which the ramp can still follow every later dip of the available power.
        Without a ramp limit it is min(limit_mw, A(g)). Exact: A is linear (or constant) between the trace's
        knots, so the minimum lies at g, at g + lookahead or at a knot between."""
        limit = self.site.limit_mw
        if self.trace is None:
            return min(limit, self._trace_cap)
        g = float(grid_seconds)
        if self.rate is None:
            return min(limit, self.available_mw(g))
        cap, rate, end = self._trace_cap, self.rate, g + self.lookahead_s
        best = self.trace.trace_mw(g, cap)
        for k in self.trace.knots_s(g, end):
            best = min(best, self.trace.trace_mw(k, cap) + rate * (k - g))
        best = min(best, self.trace.trace_mw(end, cap) + rate * self.lookahead_s)
        # min(cap, f) + R (g' - g) has its least cap term at g' = g, so the cap enters once.
        return min(limit, cap, best)

    def _carbon_at(self, grid_seconds: float) -> float:
        if self._carbon_free():
            return 0.0
        c = self.trace.carbon_kg_per_mwh(grid_seconds)  # type: ignore[union-attr]
        return 0.0 if c is None else c

    def _charge(self, draw_mw: float, t0: float, t1: float, carbon: float, *, smoothing: bool = False) -> None:
        """Add ``draw_mw`` held over training time [t0, t1) (grid time: times time_scale)."""
        mwh = draw_mw * (t1 - t0) * self.time_scale / 3600.0
        self.energy_mwh += mwh
        if smoothing:
            self.smoothing_mwh += mwh
        if self.carbon_kg is not None:
            self.carbon_kg += mwh * carbon
        if t1 > t0:
            self.peak_mw = max(self.peak_mw, draw_mw)

    def _advance(self, t: float, what: str) -> None:
        """Charge the gap since the last event at the held draw (carbon at the gap's start)."""
        if not math.isfinite(t):
            raise ValueError(f"{what}: the time must be finite, got {t!r}")
        if self._t_last is not None:
            if t < self._t_last:
                raise ValueError(f"{what}({t!r}): time goes back; the last event was at {self._t_last!r}")
            # under a ramp limit a draw held above idle between steps is filler load: smoothing
            self._charge(self._held_mw, self._t_last, t, self._carbon_at(self.grid_seconds(self._t_last)),
                         smoothing=self.rate is not None and self._held_mw > self.site.idle_mw)
        self._t_last = t

    # -- the step protocol ------------------------------------------------------------------------------------

    def begin_step(self, t: float, work_seconds: float | None = None) -> StepPower:
        """The setpoint for the step starting at training time ``t``:
        d = min(limit_mw, E(g), d_prev + R * (g - g_prev)) (the first step, and one without a ramp limit, take
        min(limit_mw, E(g))). ``on`` is False when d falls below the training threshold.

        ``work_seconds``: what the step takes at full draw, when known. The draw is held for the whole step,
        which at a share ``active`` of the power range lasts ``work / active``, so the draw must stay
        available until the step ends (:meth:`holdable_mw`). If d cannot be held that long, the setpoint is
        the highest draw that can, no lower than the ramp allows (d_prev - R * (g - g_prev)); if no draw at or
        above the training threshold can, ``on`` is False: a step begun at the threshold would still run on
        into a dip, so the site leaves now."""
        if not self._present:
            raise RuntimeError(f"site {self.site.name!r} has left; call rejoin(t) before begin_step")
        if self._step_t is not None:
            raise RuntimeError("begin_step called twice; end_step closes a step")
        self._advance(t, "begin_step")
        g = self.grid_seconds(t)
        draw, on = self._step_draw(t, work_seconds)
        self._prev_mw, self._prev_g = draw, g
        self._step_t, self._step_mw, self._step_carbon = t, draw, self._carbon_at(g)
        self._held_mw = draw
        return StepPower(draw_mw=draw, cap_mw=self.available_mw(g), active=self.site.active_at(draw), on=on,
                         grid_hours=g / 3600.0)

    def holdable_mw(self, t0: float, t1: float) -> float:
        """The highest draw the site may hold from training time ``t0`` to ``t1`` without a new setpoint: at or
        under the available power all along (min(limit, min of A over [g0, g1]), exact over the trace's
        pieces). With a ramp limit nothing more is needed: a setpoint at or under E(g0) can follow every later
        dip from the next step start, since E(g0) <= E(g1) + R * (g1 - g0)."""
        low = min(self.site.limit_mw, self._trace_cap)
        if self.trace is not None:
            for _, _, va, vb in self.trace.pieces(self.grid_seconds(t0), self.grid_seconds(t1), self._trace_cap):
                low = min(low, va, vb)
        return low

    def _held_setpoint(self, t: float, draw: float, floor: float, work: float) -> tuple[float, bool]:
        """The highest draw in [floor, draw] that can be held for the step it runs (``work / active``), and
        whether there is one. A lower draw is easier to keep under the available power but runs longer, into
        more of what comes, so the draws that hold need not be one interval: the highest of evenly spaced
        candidates from the top, refined by bisection towards the next candidate above it."""
        tol = _tolerance(self.threshold_mw)

        def holds(d: float) -> bool:
            active = self.site.active_at(d)
            return active > 0 and d <= self.holdable_mw(t, t + work / active) + tol

        if holds(draw):
            return draw, True
        if floor > draw:
            return draw, False
        n = _SETPOINT_CANDIDATES
        for j in range(1, n + 1):
            lo = draw - (draw - floor) * j / n
            if holds(lo):
                hi = draw - (draw - floor) * (j - 1) / n
                for _ in range(_BISECTIONS):
                    mid = 0.5 * (lo + hi)
                    lo, hi = (mid, hi) if holds(mid) else (lo, mid)
                return lo, True
        return draw, False

    def _step_draw(self, t: float, work_seconds: float | None, prev: tuple[float, float] | None = None
                   ) -> tuple[float, bool]:
        """The setpoint ``begin_step(t, work_seconds)`` gives and whether the site trains at it, without changing
        anything. ``prev``: the ramp's reference (draw, grid seconds) to use instead of the last setpoint's."""
        g = self.grid_seconds(t)
        ref = prev if prev is not None else (None if self._prev_mw is None else (self._prev_mw, self._prev_g))
        draw = self._setpoint(g, ref)
        on = draw >= self.threshold_mw - _tolerance(self.threshold_mw)
        if on and work_seconds is not None and work_seconds > 0:
            floor = self.threshold_mw
            if self.rate is not None and ref is not None:
                floor = max(floor, ref[0] - self.rate * (g - ref[1]))
            draw, on = self._held_setpoint(t, draw, floor, work_seconds)
        return draw, on

    def _setpoint(self, g: float, ref: tuple[float, float] | None = None) -> float:
        """The setpoint a step starting at grid time ``g`` would get, before the hold to its end; ``ref``: the
        ramp's reference (draw, grid seconds), none for a first step."""
        draw = self.envelope_mw(g)
        if self.rate is not None and ref is not None:
            draw = min(draw, ref[0] + self.rate * (g - ref[1]))
        return max(0.0, draw)

    def start_delay(self, t: float, work_seconds: float) -> float:
        """Training seconds to wait before starting, at ``t``, a step of ``work_seconds`` (its duration at full
        draw), so that it ends soonest.

        The draw is held for a whole step, so a step started while the ramp limit keeps the setpoint low (a
        site powered again, or after a dip) runs all its length at that low draw, although the ramp would have
        raised it long before the step ends. If the step starts after a wait w instead, its setpoint is higher
        (the ramp is measured from the last setpoint, and the draw of the last event is held through the wait:
        idle after a return) and it ends at ``w + work / active``, with the setpoint ``begin_step`` would give
        then (held to the step's end). This returns the w among 0 and 64 even points up to the time the ramp
        reaches the site's limit that ends it soonest (0 without a ramp limit, when the setpoint is already at
        the limit, when the site cannot train now, or when no wait ends the step sooner). Waiting changes
        nothing in the controller."""
        if self.rate is None or self._prev_mw is None or not work_seconds > 0:
            return 0.0
        if self._step_t is not None:
            raise RuntimeError("start_delay inside an open step; end_step first")
        draw, on = self._step_draw(t, work_seconds)
        horizon = (self.site.limit_mw - draw) / self.rate / self.time_scale  # training seconds to reach the limit
        if horizon <= 0 or not on:  # at the limit; or it cannot train now, and leaves
            return 0.0
        return self._best_start(t, work_seconds, horizon, None)

    def _best_start(self, t: float, work: float, horizon: float, prev: tuple[float, float] | None) -> float:
        """The wait among 0 and 64 even points up to ``horizon`` after which a step of ``work`` ends soonest
        (``prev``: the ramp's reference, as in :meth:`_step_draw`); inf when no start trains."""
        best_w, best_end = math.inf, math.inf
        for j in range(_START_CANDIDATES + 1):
            w = horizon * j / _START_CANDIDATES
            d, on = self._step_draw(t + w, work, prev)
            active = self.site.active_at(d)
            if not on or active <= 0:
                continue
            end = w + work / active
            if end < best_end * (1 - 1e-12):
                best_w, best_end = w, end
        return best_w

    @property
    def held_mw(self) -> float:
        """The draw held now: after ``end_step``, the draw of the step's wait (what a step record logs as
        ``wait_mw``)."""
        return self._held_mw

    def end_step(self, t_compute_end: float, t_end: float) -> None:
        """Close the open step: [start, t_compute_end) computes at the setpoint; the wait [t_compute_end, t_end)
        is charged at idle (no ramp limit: the site idles, never above its setpoint) or at the setpoint (a ramp
        limit: the site holds its draw with filler load; that energy also counts in smoothing_mwh). The draw
        of the wait is held until the next event. Carbon uses the intensity at the step's start."""
        if self._step_t is None:
            raise RuntimeError("end_step without begin_step")
        t0 = self._step_t
        if not (t0 <= t_compute_end <= t_end):
            raise ValueError(f"end_step({t_compute_end!r}, {t_end!r}): needs step start {t0!r} <= compute end <= "
                             "step end")
        self._charge(self._step_mw, t0, t_compute_end, self._step_carbon)
        held = self._step_mw if self.rate is not None else min(self.site.idle_mw, self._step_mw)
        self._charge(held, t_compute_end, t_end, self._step_carbon, smoothing=self.rate is not None)
        self._held_mw, self._t_last, self._step_t = held, t_end, None

    def leave(self, t: float) -> None:
        """The site powers off at ``t`` (an open step ends there): its draw is 0 until ``rejoin``. The drop to
        0 is one of the two changes the ramp limit does not bind (see the package docstring)."""
        if not self._present:
            raise RuntimeError(f"site {self.site.name!r} has already left")
        if self._step_t is not None:
            self.end_step(t, t)
        self._advance(t, "leave")
        self._held_mw, self._present = 0.0, False

    def rejoin(self, t: float) -> None:
        """The site is powered again at ``t``: it draws idle_mw until its next step, whose setpoint starts at
        the training threshold (or less, if E allows less) and ramps up from there."""
        if self._present:
            raise RuntimeError(f"site {self.site.name!r} has not left")
        self._advance(t, "rejoin")
        self._present, self._held_mw = True, self.site.idle_mw
        self._prev_mw, self._prev_g = self.threshold_mw, self.grid_seconds(t)

    @property
    def present(self) -> bool:
        """False between ``leave`` and ``rejoin``."""
        return self._present

    def back_at(self, t: float, work_seconds: float | None = None) -> float | None:
        """The earliest training time >= ``t`` at which the envelope allows the training threshold again, so
        that ``rejoin`` and ``begin_step`` there give on=True; None when that never happens (the trace ends
        below it, the cap is below it, or a periodic trace stays below it for a whole period). With
        ``work_seconds`` (as :meth:`begin_step` takes it), also a time from which the step the site would run
        after ``rejoin`` (from the threshold, after a wait for the ramp if that helps) can be held to its end:
        not just before the next dip.

        Exact for the trace's pieces: a point g' where A(g') < threshold forbids every g in
        (g' - (threshold - A(g')) / R, g'] (from there the ramp could not come down in time; without a ramp
        limit just g'), so the earliest allowed g is t's own grid time or the right end of a stretch where A is
        below the threshold. Those candidates, within the trace's last knot or one period, are checked in
        order against the envelope."""
        theta = self.threshold_mw
        tol = _tolerance(theta)
        if self.site.limit_mw < theta - tol:
            return None
        g0 = self.grid_seconds(t)
        if self.trace is None:
            return t
        cap = self._trace_cap
        period = self.trace.period_s
        hi = g0 + period if period is not None else max(g0, self.trace.hours[-1] * 3600.0)
        ends = []
        for a, b, va, vb in self.trace.pieces(g0, hi, cap):
            if va < theta and vb < theta:
                ends.append(b)
            elif va < theta <= vb:  # rises through the threshold inside the piece
                ends.append(a + (theta - va) / (vb - va) * (b - a))
        if self.envelope_mw(g0) >= theta - tol and self._threshold_holds(t, work_seconds):
            return t
        for g in sorted(e for e in ends if e > g0):
            if self.envelope_mw(g) >= theta - tol:
                back = self._first_on(g, t)
                if self._threshold_holds(back, work_seconds):
                    return back
        return None

    def _threshold_holds(self, t: float, work_seconds: float | None) -> bool:
        """Whether a site powered again at ``t`` can run a step of ``work_seconds`` soon: its first setpoint
        starts from the threshold (``rejoin``) and, under a ramp limit, may wait for the ramp
        (:meth:`start_delay`) within the time the ramp needs to reach the limit; the step must hold to its end."""
        if work_seconds is None or not work_seconds > 0:
            return True
        ref = (self.threshold_mw, self.grid_seconds(t))
        if self.rate is None:
            return self._step_draw(t, work_seconds, ref)[1]
        horizon = (self.site.limit_mw - self.threshold_mw) / self.rate / self.time_scale
        return math.isfinite(self._best_start(t, work_seconds, max(horizon, 0.0), ref))

    def _first_on(self, g: float, t_floor: float) -> float:
        """Training time of grid time ``g``, no earlier than ``t_floor``, nudged past float rounding so that
        the envelope there reaches the threshold as begin_step computes it."""
        t = max(t_floor, self.training_seconds(g))
        theta, tol = self.threshold_mw, _tolerance(self.threshold_mw)
        for _ in range(64):
            if self.envelope_mw(self.grid_seconds(t)) >= theta - tol:
                break
            t = math.nextafter(t, math.inf)
        return t

    # -- checkpoints ------------------------------------------------------------------------------------------

    _STATE = ("energy_mwh", "peak_mw", "carbon_kg", "smoothing_mwh", "_t_last", "_held_mw", "_prev_mw", "_prev_g",
              "_present", "_step_t", "_step_mw", "_step_carbon")

    def state_dict(self) -> dict[str, float]:
        """The controller's running state as plain floats (NaN for a value not set yet, 1.0/0.0 for flags),
        for a checkpoint; the settings are the configuration's and are not included."""
        out = {}
        for key in self._STATE:
            value = getattr(self, key)
            out[key.lstrip("_")] = math.nan if value is None else float(value)
        return out

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore :meth:`state_dict`'s values."""
        missing = [k.lstrip("_") for k in self._STATE if k.lstrip("_") not in state]
        if missing:
            raise ValueError(f"power state lacks {', '.join(missing)}")
        for key in self._STATE:
            value = float(state[key.lstrip("_")])
            if key == "_present":
                self._present = value != 0.0
            elif key == "carbon_kg":
                self.carbon_kg = None if self._carbon_free() else (0.0 if math.isnan(value) else value)
            elif math.isnan(value) and key in ("_t_last", "_prev_mw", "_step_t"):
                setattr(self, key, None)
            else:
                setattr(self, key, value)
