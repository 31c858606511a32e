"""Training within each site's power: the grid's available power over time, each site's draw, and the energy,
peak and carbon that follow. Pure Python (no torch), so the planner and the configuration can use it.

Units and clocks
----------------
Power is facility power in MW (PUE included), energy MWh, carbon kg CO2. A site of n accelerators of W watts
behind a facility of effectiveness PUE draws ``full = n * W * PUE / 1e6`` with everything busy and
``idle = full * idle_fraction`` powered but computing nothing; at ``active`` (0..1, the share of the
accelerators' dynamic range in use, which compute speed follows) it draws ``idle + active * (full - idle)``.
``limit = min(full, cap)`` (``full`` without a cap) is the most it ever draws.

Grid time g runs in seconds from the trace's hour 0. Training time t is the loop's run clock in seconds since
the run started; ``g = start_hours * 3600 + t * time_scale``, so a run of minutes can cross a day of grid
(``time_scale = 240``: a day in six minutes). Every integral (energy, carbon) is over grid time:
``MWh = MW * training seconds * time_scale / 3600``.

Available power
---------------
``A(g) = min(cap, trace(g))``; without a trace A is the cap, or ``full`` without a cap. A trace
(:class:`GridTrace`) gives values as a fraction of the cap (``full`` without a cap) or in MW, interpolated
linearly or held ("step") between its points, constant before the first and after the last point, or
repeating with the period of its last hour.

The setpoint
------------
At each step's start ``t_i`` (grid time ``g_i``) the controller (:class:`PowerController`) sets the draw
``d_i`` the step computes at. With no ramp limit ``d_i = min(limit, A(g_i))``. With a ramp limit R (MW per
minute of grid time) the draw moves by at most ``R * (g_i - g_{i-1})`` between consecutive step starts, and
must still never exceed A. A grid trace is a forecast, so the controller looks ahead: it uses the envelope

    E(g) = min over g' in [g, g + lookahead] of  A(g') + R * (g' - g)

the highest draw at g from which a ramp of R can still come down under every later dip, and sets

    d_i = min(limit, E(g_i), d_{i-1} + R * (g_i - g_{i-1}))

(the first step of a run takes ``min(limit, E(g_0))``, as a site already running when training starts). Since
``E(g) <= A(g)`` the draw never exceeds the available power at a step's start, and ``d_i >= d_{i-1} - R *
(g_i - g_{i-1})`` holds by construction of E, provided the lookahead covers the time the ramp needs from
``limit`` to 0 (``limit / R``; points further ahead cannot bind). The default lookahead is 1.25 times that.
E is computed exactly: A is linear or constant between the trace's knots, so the minimum lies at g, at
``g + lookahead`` or at a knot in between. Between step starts the draw is held; a dip shorter than a step
that falls between two step starts is not seen.

When ``d_i < idle + min_active * (full - idle)`` (the training threshold) the step reports ``on=False``: the
available power cannot keep the site training, and it should leave.

Waits
-----
``end_step(t_compute_end, t_end)`` charges the step's compute ``[t_i, t_compute_end)`` at ``d_i``, then the wait
``[t_compute_end, t_end)`` (the site waiting for a sync): without a ramp limit at ``min(idle, d_i)``, the
idle-then-spike swing of synchronous training; with a ramp limit at ``d_i``, because the site holds its draw
with filler load rather than swing faster than the grid allows. That held energy is also counted in
``smoothing_mwh``. The draw of the last event is held through any gap until the next one.

Departures and returns
----------------------
``leave(t)`` powers the site off: its draw drops to 0 until ``rejoin``. ``back_at(t)`` is the earliest
training time at which the envelope allows the training threshold again (searched exactly over the trace's
pieces, up to its last knot or one period, so it always ends; None if that time never comes). ``rejoin(t)``
powers the site again: it draws idle until its next step, whose setpoint starts at the training threshold (if E
allows it) and ramps up from there. The drop to 0 at a departure and the step from 0 back to the threshold at
a return are the only changes the ramp limit does not bind: a site that cannot train does not stay powered.
A site may be admitted back into the run and healed before its power returns (:func:`rejoin_lead_seconds`);
its controller rejoins at ``back_at`` all the same.

Carbon
------
With a carbon trace (kg CO2 per MWh at the trace's hours, interpolated as the values) the controller
integrates draw times intensity, the intensity taken at the start of each step (and of each gap); without one
``carbon_kg`` is None.

Checkpoints
-----------
``state_dict()`` holds the running state (energy, peak, carbon, smoothing, the last setpoint and event, an open
step, whether the site is present) as plain floats; the settings come from the configuration again.

A loop's use of one site's controller
-------------------------------------
::

    pc = site_controllers(config)[site]     # [] when [grid] is off
    sp = pc.begin_step(t)                   # t: the run clock, training seconds
    if not sp.on:                           # not enough power to train
        pc.leave(t)
        back = pc.back_at(t)                # None: the power does not come back
        ...                                 # away until `back`, then:
        pc.rejoin(back); sp = pc.begin_step(back)
    ...                                     # compute the step; its speed follows sp.active
    pc.end_step(t_compute_end, t_end)       # t_end: after the step's wait for a sync

Configuration
-------------
``[grid]`` and ``[[grid.traces]]`` (``geotrain.config.GridConfig``) describe the traces and the ramp;
:func:`site_controllers` builds one controller per site from them and from the planner's sites
(``geotrain.planner.model.plan_spec``: accelerators, watts, PUE, cap).
"""

from __future__ import annotations

from geotrain.power.controller import LOOKAHEAD_MARGIN, PowerController, SitePower, StepPower
from geotrain.power.sites import rejoin_lead_seconds, site_controllers, site_powers
from geotrain.power.trace import GridTrace

__all__ = ["GridTrace", "LOOKAHEAD_MARGIN", "PowerController", "SitePower", "StepPower", "rejoin_lead_seconds",
           "site_controllers", "site_powers"]
