"""Power controllers for a configuration's sites, from ``[grid]`` and the planner's site definitions."""

from __future__ import annotations

from typing import Any

from geotrain.power.controller import PowerController, SitePower

__all__ = ["site_controllers", "site_powers"]


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
