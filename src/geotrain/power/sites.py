"""Power controllers for a configuration's sites, from ``[grid]`` and the planner's site definitions."""

from __future__ import annotations

from typing import Any

from geotrain.power.controller import PowerController, SitePower

__all__ = ["rejoin_lead_seconds", "site_controllers", "site_powers"]


def site_powers(config: Any) -> list[SitePower]:
    """Each site's electrical model, in site order: accelerators, watts, PUE and cap as the planner defines
    them (``geotrain.planner.model.plan_spec``: ``[sites]``, ``[[site]]``, ``[accelerators.NAME]``; by default one
    accelerator per worker, or all that ``power_cap_mw`` feeds), and ``grid.idle_fraction``."""
    from geotrain.planner.model import plan_spec

    return [SitePower(name=s.name, accelerators=s.accelerators, watts=s.watts, pue=s.pue, cap_mw=s.power_cap_mw,
                      idle_fraction=config.grid.idle_fraction) for s in plan_spec(config).sites]


def site_controllers(config: Any) -> list[PowerController]:
    """One :class:`PowerController` per site (in site order) for ``config`` (a ``geotrain.config.Config``), or
    an empty list when ``[grid]`` is off. A site without a ``[[grid.traces]]`` entry has its cap all the time."""
    grid = config.grid
    if not grid.on:
        return []
    traces = grid.site_traces(config.site_names())
    return [PowerController(site, traces.get(i),
                            time_scale=grid.time_scale, start_hours=grid.start_hours,
                            ramp_mw_per_min=grid.ramp_mw_per_min, min_active=grid.min_active)
            for i, site in enumerate(site_powers(config))]


def rejoin_lead_seconds(config: Any) -> float:
    """How long before its power returns a site that left for lack of power asks to join the run again.

    Joining waits for the others' next round boundary and then for the healing transfer. The trace is a
    forecast, so the site knows when its power returns and can do both while it is still out. With time-based
    rounds (``outer.sync_every_seconds`` T) it asks T seconds early (2T with overlapped syncs, whose members
    learn of a joiner a round later): it is admitted at the first boundary where the members learn of it, at
    most about T before the power returns, is healed, and waits in its first round for the power
    (``geotrain.train.pace.Pace.expect_power``), drawing nothing; it trains the rest of that round from the
    moment the power is back, and the round's token weights count only what it trained. With H-step rounds a
    member that waits holds every site's next sync up, so it asks when the power is back (0). ``config`` is
    the run's as prepared (``comm.overlap`` decided; unset counts as blocking)."""
    if config.algorithm().timed_rounds and config.outer.sync_every_seconds:
        return float(config.outer.sync_every_seconds) * (2 if config.comm.overlap else 1)
    return 0.0
