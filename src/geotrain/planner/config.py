"""``geotrain plan``'s inputs: a configuration in the run's vocabulary (``geotrain.config``) with the plan's
flags written over it.

A plan file is a run file: ``geotrain plan --config RUN.toml`` plans exactly the run that file describes, and
flags move it to another scale (``--model-params 10b --accelerators-per-site 4096``). Each flag sets one
dotted key (``FLAG_KEYS``), except where it must replace more than its key: a link flag replaces every link
of the file, per-pair links included; a site flag sets that value at every site; ``--algorithm`` drops the
file's settings that the algorithm does not read (``geotrain.config.config_from_tree``'s ``fit``). Every user
mistake raises ``ConfigError`` naming the key.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geotrain.config import DEMO_LINK, Config, SimulateConfig, config_from_tree, read_toml
from geotrain.errors import ConfigError
from geotrain.planner.model import PlanSpec, plan_spec
from geotrain.planner.questions import parse_sweep
from geotrain.topology import LINK_PRESETS, format_bandwidth, format_latency, parse_bandwidth, parse_latency, parse_link

__all__ = ["FLAG_KEYS", "PlanInputs", "load_plan", "plan_inputs"]

FLAG_KEYS = {
    "model_params": "model.params",
    "tokens": "run.tokens",
    "batch_tokens": "plan.batch_tokens",
    "seq_len": "model.seq_len",
    "sites": "run.sites",
    "workers_per_site": "run.workers_per_site",
    "algorithm": "run.algorithm",
    "sync_every": "outer.sync_every",
    "fragments": "streaming.fragments",
    "overlap_steps": "streaming.overlap_steps",
    "codec": "comm.codec",
    "topk_fraction": "comm.topk_fraction",
    "overlap": "comm.overlap",
    "target_utilization": "plan.target_utilization",
    "sweep": "plan.sweep",
    "plot": "plan.plot",
    "mtbf_hours": "simulate.mtbf_hours",
    "sim_seed": "simulate.seed",
    "recovery": "simulate.recovery",
    "silent_fraction": "simulate.silent_fraction",
    "jitter": "simulate.jitter",
}
"""Flag (argparse dest) -> the dotted key it sets."""
SITE_FLAGS = {
    "accelerator": "accelerator",
    "accelerators_per_site": "accelerators",
    "mfu": "mfu",
    "power_cap": "power_cap_mw",
    "pue": "pue",
    "watts": "watts",
    "step_seconds": "step_seconds",
}
"""Flags that set a value at every site: ``[sites] KEY``, and the key is dropped from each ``[[site]]``."""
_SIMULATION_KEYS = ("mtbf_hours", "jitter", "recovery")
DEFAULT_SWEEP = "100mbit:1tbit:41"  # four decades, ten points each: from a home uplink to a metro fibre bundle


@dataclass(kw_only=True, slots=True)
class PlanInputs:
    """A validated plan and the questions asked about it."""

    config: Config
    spec: PlanSpec
    link_text: str
    """How the links were given, for display."""
    sweep_bps: list[float] | None
    """Bandwidths to sweep, bit/s."""
    simulation: SimulateConfig | None
    """Set when the run should also be simulated."""

    @property
    def target_utilization(self) -> float | None:
        return self.config.plan.target_utilization

    @property
    def compare(self) -> bool:
        return self.config.plan.compare

    @property
    def plot(self) -> str | None:
        return self.config.plan.plot


def _flag_values(tree: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Dotted values of the flags given, with ``tree`` (the file) changed where a flag replaces more."""
    get = lambda name: getattr(args, name, None)  # noqa: E731 - a tiny accessor reads better here
    values: dict[str, Any] = {key: get(flag) for flag, key in FLAG_KEYS.items() if get(flag) is not None}
    if isinstance(values.get("simulate.mtbf_hours"), str) and "," in values["simulate.mtbf_hours"]:
        values["simulate.mtbf_hours"] = [v.strip() for v in values["simulate.mtbf_hours"].split(",")]
    for flag, key in SITE_FLAGS.items():
        if get(flag) is not None:
            values[f"sites.{key}"] = get(flag)
            for entry in tree.get("site", []) if isinstance(tree.get("site"), list) else []:
                if isinstance(entry, dict):
                    entry.pop(key, None)  # a flag applies to every site
    link, bandwidth, latency = get("link"), get("bandwidth"), get("latency")
    if link is not None or bandwidth is not None or latency is not None:
        wan = tree.get("wan") if isinstance(tree.get("wan"), dict) else {}
        wan.pop("links", None)  # a link flag sets every link: per-pair links from the file no longer apply
        if bandwidth is not None or latency is not None:
            presets = {**(wan.get("presets") or {})}
            try:
                base = parse_link(link if link is not None else wan.get("link", DEMO_LINK),
                                  presets={**LINK_PRESETS, **{k.lower(): v for k, v in presets.items()}})
                if bandwidth is not None:
                    bps = parse_bandwidth(bandwidth, bare_bits=True)
                else:
                    bps = base.bandwidth_bps if base else None
                lat = parse_latency(latency) if latency is not None else (base.latency_s if base else 0.0)
            except ValueError as exc:
                raise ConfigError(str(exc), field="wan.link") from None
            if bps is None:
                raise ConfigError("--latency needs a bandwidth too (the link is 'none'); give --bandwidth",
                                  field="wan.link")
            link = f"{format_bandwidth(bps)}/{format_latency(lat)}"
        if wan is not tree.get("wan"):
            tree["wan"] = wan
        values["wan.link"] = link
    if get("compare"):
        values["plan.compare"] = True
    if get("simulate"):
        values["simulate.enabled"] = True
    elif any(f"simulate.{k}" in values for k in _SIMULATION_KEYS):
        # failure settings alone mean the user wants the simulation, unless the file says otherwise
        simulate = tree.get("simulate") if isinstance(tree.get("simulate"), dict) else {}
        if "enabled" not in simulate:
            values["simulate.enabled"] = True
    return values


def _simulation_asked(tree: dict[str, Any]) -> bool:
    """A [simulate] table with failure settings means the user wants the simulation."""
    simulate = tree.get("simulate") if isinstance(tree.get("simulate"), dict) else {}
    return any(k in simulate for k in _SIMULATION_KEYS)


def plan_inputs(path: str | Path | None, args: argparse.Namespace | None = None, *,
                overrides: list[str] | tuple[str, ...] = ()) -> PlanInputs:
    """Read ``path`` (a run or plan file; None for the defaults), write ``--set`` overrides and the flags in
    ``args`` over it, and validate the plan."""
    tree = read_toml(path) if path is not None else {}
    values = _flag_values(tree, args) if args is not None else {}
    set_keys = {item.partition("=")[0].strip() for item in overrides}
    said = "simulate.enabled" in set_keys or "simulate.enabled" in values or "enabled" in (
        tree.get("simulate") if isinstance(tree.get("simulate"), dict) else {})
    if not said and (_simulation_asked(tree) or any(f"simulate.{k}" in set_keys for k in _SIMULATION_KEYS)):
        values["simulate.enabled"] = True
    config = config_from_tree(tree, overrides=overrides, values=values, fit=True)
    spec = plan_spec(config)
    topo = spec.topology
    link_text = "none (no emulated link)" if topo.default is None else str(topo.default)
    named = str(config.wan.link).strip().lower()
    if named in config.wan.all_presets():
        link_text += f" ({named} preset)"
    if topo.overrides:
        link_text += f" + {len(topo.overrides)} per-pair link(s)"
    sweep = config.plan.sweep
    if sweep is None and config.plan.plot is not None:
        sweep = DEFAULT_SWEEP
    sweep_bps = parse_sweep(sweep) if sweep is not None else None
    simulation = config.simulate if config.simulate.enabled else None
    return PlanInputs(config=config, spec=spec, link_text=link_text, sweep_bps=sweep_bps, simulation=simulation)


def load_plan(path: str | Path) -> PlanInputs:
    """Read and validate a file as ``geotrain plan --config FILE`` would (what the shipped-config test uses)."""
    return plan_inputs(path)
