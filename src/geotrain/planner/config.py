"""The plan file (TOML) and the command-line flags, turned into validated planner inputs.

A plan file is a plain TOML document; docs/planner.md describes every key. Unknown keys are refused with
the closest valid name, because a mistyped key that is silently ignored gives a plausible, wrong plan.
Flags override the file: ``load_raw`` reads the file into a dict, ``apply_flags`` writes the flags over it,
and ``build`` validates the result. Every user mistake raises ``ConfigError`` naming the key.
"""

from __future__ import annotations

import argparse
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from geotrain.errors import ConfigError
from geotrain.planner.model import AlgorithmSpec, ModelSpec, PlanSpec, SiteSpec
from geotrain.planner.presets import (
    ACCELERATORS,
    LINK_PRESETS,
    Accelerator,
    closest,
    parse_bandwidth_text,
    parse_codec,
    parse_count,
    parse_latency_text,
    parse_link_text,
    resolve_accelerator,
)
from geotrain.planner.questions import DEFAULT_CODEC_CANDIDATES, DEFAULT_SYNC_EVERY_CANDIDATES, parse_sweep
from geotrain.planner.simulate import SimulationSpec
from geotrain.topology import Link, Topology

__all__ = ["PlanConfig", "apply_flags", "build", "load_plan", "load_raw"]

DEFAULT_SITES = 3
DEFAULT_LINK = "cross-country"
DEFAULT_SWEEP = "100mbit:1tbit:41"  # four decades, ten points each: from a home uplink to a metro fibre bundle

_SITE_KEYS = {"accelerator", "accelerators", "mfu", "power_cap_mw", "pue", "watts", "peak_flops"}
# Valid keys of each table. "site" and "links" are arrays of tables; "accelerators" and "link_presets" hold
# user-named entries, checked separately.
SCHEMA: dict[str, set[str]] = {
    "model": {"params", "tokens", "batch_tokens", "seq_len"},
    "sites": _SITE_KEYS | {"count", "names"},
    "site": _SITE_KEYS | {"name"},
    "link": {"link", "bandwidth", "latency"},
    "links": {"between", "link", "bandwidth", "latency"},
    "algorithm": {"name", "sync_every", "fragments", "overlap_steps", "overlap", "codec", "balance"},
    "accelerators": set(),
    "link_presets": set(),
    "question": {"target_utilization", "sweep", "plot", "compare", "sync_every_candidates", "codec_candidates"},
    "simulate": {
        "enabled",
        "seed",
        "mtbf_hours",
        "restart_hours",
        "recovery",
        "checkpoint_every_hours",
        "rebuild_seconds",
        "jitter",
    },
}
_ARRAYS = {"site", "links"}


@dataclass(kw_only=True, slots=True)
class PlanConfig:
    """A validated plan and the questions asked about it."""

    spec: PlanSpec
    """The plan itself."""
    link_text: str
    """How the links were given, for display."""
    target_utilization: float | None = None
    """Utilization to reach; asks for bandwidth, H and codec."""
    sweep_bps: list[float] | None = None
    """Bandwidths to sweep, bit/s."""
    plot: str | None = None
    """Where to write the sweep's plot (PNG, SVG or PDF by extension)."""
    compare: bool = False
    """Show ddp, diloco, diloco+overlap and streaming+overlap side by side."""
    sync_every_candidates: list[int] = field(default_factory=lambda: list(DEFAULT_SYNC_EVERY_CANDIDATES))
    """H values tried by the smallest-H question."""
    codec_candidates: list[str] = field(default_factory=lambda: list(DEFAULT_CODEC_CANDIDATES))
    """Codecs tried by the mildest-codec question."""
    simulation: SimulationSpec | None = None
    """Set when the run should also be simulated."""


def load_raw(path: str | Path | None) -> dict:
    """Read a plan file into a dict (an empty dict without a file)."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"plan file {str(p)!r} does not exist", field="config")
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p} is not valid TOML: {exc}", field="config") from None


def load_plan(path: str | Path) -> PlanConfig:
    """Read and validate a plan file (what the shipped-config test uses)."""
    return build(load_raw(path))


def apply_flags(raw: dict, args: argparse.Namespace) -> dict:
    """Write the command-line flags over the file's values (flags win). Returns a new dict."""
    out = {k: (dict(v) if isinstance(v, dict) else [dict(e) for e in v] if isinstance(v, list) else v)
           for k, v in raw.items()}

    def put(table: str, key: str, value) -> None:
        if value is not None:
            section = out.setdefault(table, {})
            if not isinstance(section, dict):
                raise ConfigError(f"[{table}] must be a table", field=table)
            section[key] = value

    get = lambda name: getattr(args, name, None)  # noqa: E731 - a tiny accessor reads better here
    put("model", "params", get("model_params"))
    put("model", "tokens", get("tokens"))
    put("model", "batch_tokens", get("batch_tokens"))
    put("model", "seq_len", get("seq_len"))

    put("sites", "count", get("sites"))
    for flag, key in (
        ("accelerator", "accelerator"),
        ("accelerators_per_site", "accelerators"),
        ("mfu", "mfu"),
        ("power_cap", "power_cap_mw"),
        ("pue", "pue"),
        ("watts", "watts"),
    ):
        value = get(flag)
        if value is not None:
            put("sites", key, value)
            for entry in out.get("site", []):  # a flag applies to every site
                entry.pop(key, None)

    if any(get(f) is not None for f in ("link", "bandwidth", "latency")):
        out.pop("links", None)  # a link flag sets every link: per-pair links from the file no longer apply
        if get("link") is not None:
            out["link"] = {"link": get("link")}
        put("link", "bandwidth", get("bandwidth"))
        put("link", "latency", get("latency"))

    algorithm = get("algorithm")
    if algorithm is not None:
        put("algorithm", "name", algorithm)
        if str(algorithm).lower() != "streaming":  # the file's streaming settings do not carry over
            for key in ("fragments", "overlap_steps"):
                out.get("algorithm", {}).pop(key, None)
    put("algorithm", "sync_every", get("sync_every"))
    put("algorithm", "fragments", get("fragments"))
    put("algorithm", "overlap_steps", get("overlap_steps"))
    put("algorithm", "overlap", get("overlap"))
    put("algorithm", "codec", get("codec"))

    put("question", "target_utilization", get("target_utilization"))
    put("question", "sweep", get("sweep"))
    put("question", "plot", get("plot"))
    if get("compare"):
        put("question", "compare", True)

    if get("simulate"):
        put("simulate", "enabled", True)
    put("simulate", "mtbf_hours", get("mtbf_hours"))
    put("simulate", "seed", get("seed"))
    put("simulate", "recovery", get("recovery"))
    put("simulate", "jitter", get("jitter"))
    return out


def _check_keys(raw: dict) -> None:
    for table, value in raw.items():
        if table not in SCHEMA:
            raise ConfigError(f"unknown table [{table}]{closest(table, list(SCHEMA))}", field=table)
        entries = value if table in _ARRAYS and isinstance(value, list) else [value]
        for entry in entries:
            if not isinstance(entry, dict):
                kind = "an array of tables [[" + table + "]]" if table in _ARRAYS else "a table [" + table + "]"
                raise ConfigError(f"must be {kind}", field=table)
            if table in ("accelerators", "link_presets"):
                continue
            for key in entry:
                if key not in SCHEMA[table]:
                    raise ConfigError(
                        f"unknown key {key!r}{closest(key, SCHEMA[table])}; valid keys: "
                        f"{', '.join(sorted(SCHEMA[table]))}",
                        field=f"{table}.{key}",
                    )


def _float(value, name: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"expected a number, got {value!r}", field=name)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"expected a number, got {value!r}", field=name) from None
    if not math.isfinite(number):
        raise ConfigError(f"expected a finite number, got {value!r}", field=name)
    return number


def _int(value, name: str) -> int:
    """A whole number: 500, "500", "1e3" or "10k". Zero and negatives pass through for the specs to judge."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        number = parse_count(value, field=name)
    if not math.isfinite(number) or number != int(number):
        raise ConfigError(f"expected a whole number, got {value!r}", field=name)
    return int(number)


def _bool(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ConfigError(f"expected true or false, got {value!r}", field=name)


def _accelerator_table(raw: dict) -> dict[str, Accelerator]:
    table = dict(ACCELERATORS)
    for name, entry in raw.get("accelerators", {}).items():
        where = f"accelerators.{name}"
        if not isinstance(entry, dict):
            raise ConfigError("must be a table with peak_flops and watts", field=where)
        for key in entry:
            if key not in ("peak_flops", "watts"):
                raise ConfigError(f"unknown key {key!r}{closest(key, ['peak_flops', 'watts'])}", field=f"{where}.{key}")
        preset = next((a for k, a in table.items() if k.lower() == name.lower()), None)
        if preset is None and not {"peak_flops", "watts"} <= entry.keys():
            raise ConfigError("a new accelerator needs both peak_flops (FLOP/s) and watts", field=where)
        peak = _float(entry.get("peak_flops", preset.peak_flops if preset else 0), f"{where}.peak_flops")
        watts = _float(entry.get("watts", preset.watts if preset else 0), f"{where}.watts")
        if peak <= 0 or watts <= 0:
            raise ConfigError(f"peak_flops and watts must be positive, got {peak:g} and {watts:g}", field=where)
        key = preset.name if preset else name
        table[key] = Accelerator(name=key, peak_flops=peak, watts=watts, source="plan file")
    return table


def _link(entry: dict, *, presets: dict[str, str], where: str, base: Link | None) -> Link:
    link = parse_link_text(entry["link"], presets=presets, field=f"{where}.link") if "link" in entry else base
    if link is None and not {"bandwidth", "latency"} <= entry.keys():
        raise ConfigError("give link (a preset or BANDWIDTH/LATENCY), or both bandwidth and latency", field=where)
    bandwidth = parse_bandwidth_text(entry["bandwidth"], field=f"{where}.bandwidth") if "bandwidth" in entry else None
    latency = parse_latency_text(entry["latency"], field=f"{where}.latency") if "latency" in entry else None
    return Link(
        bandwidth_bps=bandwidth if bandwidth is not None else link.bandwidth_bps,
        latency_s=latency if latency is not None else link.latency_s,
    )


def _sites(raw: dict, accelerators: dict[str, Accelerator]) -> list[SiteSpec]:
    defaults = dict(raw.get("sites", {}))
    per_site = raw.get("site", [])
    count = defaults.pop("count", None)
    names = defaults.pop("names", None)
    if per_site:
        n = len(per_site)
        if count is not None and _int(count, "sites.count") != n:
            raise ConfigError(
                f"{_int(count, 'sites.count')} sites asked for but {n} [[site]] tables given; drop one or the other",
                field="sites.count",
            )
    else:
        n = DEFAULT_SITES if count is None else _int(count, "sites.count")
        if n < 1 or n > 1000:
            raise ConfigError(f"must be from 1 to 1000, got {n}", field="sites.count")
    if names is not None:
        if not isinstance(names, list) or len(names) != n or not all(isinstance(x, str) for x in names):
            raise ConfigError(f"must be a list of {n} names", field="sites.names")
    entries = per_site or [{} for _ in range(n)]
    sites = []
    for i, entry in enumerate(entries):
        merged = {**defaults, **entry}
        name = merged.pop("name", None) or (names[i] if names else f"site{i}")
        where = f"site {name!r}"
        accel = resolve_accelerator(merged.get("accelerator", "H100"), accelerators)

        def opt_float(key: str, merged=merged, where=where) -> float | None:
            return None if merged.get(key) is None else _float(merged[key], f"{where}: {key}")

        count_each = merged.get("accelerators")
        sites.append(
            SiteSpec(
                name=str(name),
                accelerator=accel,
                accelerators=None if count_each is None else _int(count_each, f"{where}: accelerators"),
                mfu=_float(merged.get("mfu", 0.4), f"{where}: mfu"),
                power_cap_mw=opt_float("power_cap_mw"),
                pue=_float(merged.get("pue", 1.2), f"{where}: pue"),
                watts=opt_float("watts"),
                peak_flops=opt_float("peak_flops"),
            )
        )
    return sites


def _topology(raw: dict, names: list[str], presets: dict[str, str]) -> tuple[Topology, str]:
    link_table = raw.get("link", {})
    if "link" in link_table:
        default = _link(link_table, presets=presets, where="link", base=None)
        named = str(link_table["link"]).strip().lower()
        text = f"{default}" + (f" ({named} preset)" if named in presets else "")
    elif {"bandwidth", "latency"} <= link_table.keys():
        default = _link(link_table, presets=presets, where="link", base=None)
        text = f"{default}"
    else:
        # Nothing or half a link: the rest comes from the default preset, and the display says so.
        base = parse_link_text(DEFAULT_LINK, presets=presets)
        default = _link(link_table, presets=presets, where="link", base=base)
        text = f"{default} ({'the default ' if not link_table else 'the rest from the '}{DEFAULT_LINK} preset)"
    overrides: dict[tuple[int, int], Link] = {}
    for i, entry in enumerate(raw.get("links", [])):
        where = f"links[{i}]"
        between = entry.get("between")
        if not isinstance(between, list) or len(between) != 2:
            raise ConfigError("must name two sites, e.g. between = ['east', 'west'] or [0, 1]", field=f"{where}.between")
        idx = []
        for b in between:
            if isinstance(b, int) and not isinstance(b, bool) and 0 <= b < len(names):
                idx.append(b)
            elif isinstance(b, str) and b in names:
                idx.append(names.index(b))
            else:
                raise ConfigError(f"{b!r} is not a site{closest(str(b), names)}; sites: {', '.join(names)}",
                                  field=f"{where}.between")
        if idx[0] == idx[1]:
            raise ConfigError("a link joins two different sites", field=f"{where}.between")
        overrides[(min(idx), max(idx))] = _link(entry, presets=presets, where=where, base=default)
    if overrides:
        text += f" + {len(overrides)} per-pair link(s)"
    return Topology(sites=len(names), default=default, overrides=overrides, names=list(names)), text


def build(raw: dict) -> PlanConfig:
    """Validate a raw plan (file values with flags written over them) into a ``PlanConfig``."""
    _check_keys(raw)
    accelerators = _accelerator_table(raw)
    presets = dict(LINK_PRESETS)
    for name, text in raw.get("link_presets", {}).items():
        presets[name.lower()] = str(text)
        parse_link_text(str(text), presets={}, field=f"link_presets.{name}")

    m = raw.get("model", {})
    for key in ("params", "tokens"):
        if key not in m:
            flag = "--model-params" if key == "params" else "--tokens"
            raise ConfigError(
                f"missing: give it in [model] of the plan file or with {flag} (e.g. {flag} "
                f"{'70b' if key == 'params' else '15t'})",
                field=f"model.{key}",
            )
    model = ModelSpec(
        params=parse_count(m["params"], field="model.params"),
        tokens=parse_count(m["tokens"], field="model.tokens"),
        batch_tokens=parse_count(m.get("batch_tokens", 16e6), field="model.batch_tokens"),
        seq_len=_int(m.get("seq_len", 8192), "model.seq_len"),
    )

    sites = _sites(raw, accelerators)
    topology, link_text = _topology(raw, [s.name for s in sites], presets)

    a = raw.get("algorithm", {})
    algorithm = AlgorithmSpec(
        name=str(a.get("name", "diloco")),
        sync_every=_int(a.get("sync_every", 100), "algorithm.sync_every"),
        fragments=_int(a.get("fragments", 1), "algorithm.fragments"),
        overlap_steps=_int(a.get("overlap_steps", 0), "algorithm.overlap_steps"),
        overlap=_bool(a.get("overlap", False), "algorithm.overlap"),
    )
    spec = PlanSpec(
        model=model,
        sites=sites,
        topology=topology,
        algorithm=algorithm,
        codec=parse_codec(a.get("codec", "fp32"), field="algorithm.codec"),
        balance=str(a.get("balance", "equal")),
    )

    q = raw.get("question", {})
    target = None
    if q.get("target_utilization") is not None:
        target = _float(q["target_utilization"], "target_utilization")
        if not (0 < target <= 1):
            raise ConfigError(f"must be in (0, 1], e.g. 0.95, got {target:g}", field="target_utilization")
    sweep_bps = parse_sweep(q["sweep"]) if q.get("sweep") is not None else None
    plot = q.get("plot")
    if plot is not None:
        plot = str(plot)
        if Path(plot).suffix.lower() not in (".png", ".svg", ".pdf"):
            raise ConfigError(f"{plot!r} must end in .png, .svg or .pdf", field="plot")
        if sweep_bps is None:
            sweep_bps = parse_sweep(DEFAULT_SWEEP)
    h_candidates = [_int(h, "question.sync_every_candidates") for h in q.get("sync_every_candidates",
                                                                           DEFAULT_SYNC_EVERY_CANDIDATES)]
    codec_candidates = [str(c) for c in q.get("codec_candidates", DEFAULT_CODEC_CANDIDATES)]
    for c in codec_candidates:
        parse_codec(c, field="question.codec_candidates")

    s = raw.get("simulate", {})
    simulation = None
    if _bool(s.get("enabled", False), "simulate.enabled"):
        mtbf = s.get("mtbf_hours")
        if isinstance(mtbf, list):
            mtbf = [None if v in (None, 0, "none", "") else _float(v, "simulate.mtbf_hours") for v in mtbf]
        elif mtbf is not None:
            mtbf = _float(mtbf, "simulate.mtbf_hours")
        simulation = SimulationSpec(
            seed=_int(s.get("seed", 0), "simulate.seed"),
            mtbf_hours=mtbf,
            restart_hours=_float(s.get("restart_hours", 0.5), "simulate.restart_hours"),
            recovery=str(s.get("recovery", "elastic")),
            checkpoint_every_hours=_float(s.get("checkpoint_every_hours", 1.0), "simulate.checkpoint_every_hours"),
            rebuild_seconds=_float(s.get("rebuild_seconds", 30.0), "simulate.rebuild_seconds"),
            jitter=_float(s.get("jitter", 0.0), "simulate.jitter"),
        )
        if isinstance(mtbf, list):
            simulation.mtbf_seconds(len(sites))  # checks the length now, with the key in the message
    elif any(k in s for k in ("mtbf_hours", "jitter", "recovery")) and "enabled" not in s:
        # Failure settings without --simulate mean the user wants the simulation.
        return build({**raw, "simulate": {**s, "enabled": True}})

    return PlanConfig(
        spec=spec,
        link_text=link_text,
        target_utilization=target,
        sweep_bps=sweep_bps,
        plot=plot,
        compare=_bool(q.get("compare", False), "question.compare"),
        sync_every_candidates=h_candidates,
        codec_candidates=codec_candidates,
        simulation=simulation,
    )
