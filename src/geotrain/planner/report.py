"""What ``geotrain plan`` shows: rich tables on the terminal, one JSON object, and the sweep's plot.

Rendering is kept apart from the model so the numbers in the JSON and on the terminal come from one dict.
rich and matplotlib are imported inside the functions that need them, so ``import geotrain.planner`` stays
light; matplotlib draws through its Agg canvas and never touches a display or pyplot's global state.
"""

from __future__ import annotations

from pathlib import Path

from geotrain.errors import ConfigError
from geotrain.planner.model import PlanResult
from geotrain.planner.questions import Sweep
from geotrain.planner.simulate import SimulationResult

__all__ = ["fmt_bps", "fmt_bytes", "fmt_duration", "plot_sweep", "render"]


def fmt_bps(bps: float | None) -> str:
    if bps is None:
        return "unreachable"
    if bps == 0:
        return "0"
    for unit, scale in (("Pbit/s", 1e15), ("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.3g} {unit}"
    return f"{bps:.3g} bit/s"


def fmt_bytes(n: float) -> str:
    for unit, scale in (("EB", 1e18), ("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def fmt_duration(seconds: float) -> str:
    if seconds >= 86400 * 2:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1e3:.3g} ms"


def fmt_pct(x: float) -> str:
    return f"{100 * x:.1f}%" if x >= 0.001 else f"{100 * x:.3f}%"


def _seconds(seconds: float) -> str:
    return "0 s" if seconds == 0 else fmt_duration(seconds)


def _count(x: float) -> str:
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:g}"


def _mwh(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _render_power(console, power: dict) -> None:
    """The run played step by step under its grid traces and site speeds (``geotrain.planner.power``)."""
    from rich.table import Table

    rounds = "time-based rounds" if power["timed_rounds"] else "H-step rounds"
    t = Table(title=f"Under power and speeds ({rounds})", header_style="bold")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_row("time to train", f"[bold]{fmt_duration(power['time_to_train_seconds'])}[/bold]")
    t.add_row("utilization (busy: compute and throttled)", fmt_pct(power["utilization"]))
    t.add_row("throttled share of busy time", fmt_pct(power["throttled_share"]))
    t.add_row("tokens trained / rounds", f"{power['tokens']:,} / {power['rounds']:,}")
    if power["heal_seconds"]:
        t.add_row("waiting for healers", fmt_duration(power["heal_seconds"]))
    if power["energy_mwh"] is not None:
        t.add_row("energy (grid time)", f"[bold]{_mwh(power['energy_mwh'])} MWh[/bold]")
    if power["carbon_kg"] is not None:
        t.add_row("carbon", f"{power['carbon_kg']:,.0f} kg")
    console.print(t)
    st = Table(title="Sites under power and speeds", header_style="bold")
    for col in ("site", "steps", "tokens", "throttled", "away", "power-offs", "utilization", "energy (MWh)",
                "peak (MW)", "carbon (kg)"):
        st.add_column(col, justify="left" if col == "site" else "right")
    for s in power["per_site"]:
        st.add_row(s["name"], f"{s['steps']:,}", f"{s['tokens']:,}", _seconds(s["throttled_seconds"]),
                   _seconds(s["away_seconds"]), f"{s['power_offs']:,}", fmt_pct(s["utilization"]),
                   _mwh(s["energy_mwh"]), "-" if s["peak_mw"] is None else f"{s['peak_mw']:,.1f}",
                   "-" if s["carbon_kg"] is None else f"{s['carbon_kg']:,.0f}")
    console.print(st)


def render(out: dict, *, results: dict[str, PlanResult], sweep: Sweep | None,
           simulation: SimulationResult | None, console=None) -> None:
    """Print a plan (and whatever questions were asked) as rich tables."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or captured: wide enough that the tables do not wrap
            console = Console(width=170)
    main = results["plan"]
    inp = out["inputs"]
    site_desc = ", ".join(
        f"{s['name']}: {s['accelerators']:,} {s['accelerator']} "
        + (f"@ MFU {s['mfu']:g}" if s.get("step_seconds") is None else f"(measured {s['step_seconds']:g} s per step)")
        for s in inp["sites"]
    )
    console.print(
        f"[bold]geotrain plan[/bold]: {_count(inp['params'])} params, {_count(inp['tokens'])} tokens, "
        f"global batch {_count(inp['batch_tokens'])} tokens\n"
        f"sites: {site_desc}\nlink: {inp['link']}\n"
        f"algorithm: {main.algorithm}, codec {main.codec} ({main.codec_bits:.3g} bits/param, {main.collective})"
    )
    for choice in main.auto:
        console.print(f"[cyan]chose[/cyan] {choice.key} = {choice.value}: {choice.reason}")

    t = Table(title="Plan", show_header=True, header_style="bold")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_row("compute per inner step (slowest site)", fmt_duration(main.compute_step_seconds))
    t.add_row("wall time per inner step", fmt_duration(main.step_seconds))
    t.add_row("communication per sync", fmt_duration(main.comm_seconds_per_sync))
    t.add_row("  hidden behind compute", fmt_duration(main.hidden_seconds_per_sync))
    t.add_row("  exposed (stalls compute)", fmt_duration(main.exposed_seconds_per_sync))
    t.add_row("utilization", f"[bold]{fmt_pct(main.utilization)}[/bold]")
    t.add_row("time to train", f"[bold]{fmt_duration(main.time_to_train_seconds)}[/bold]")
    t.add_row("inner steps / syncs", f"{main.steps:,} / {main.syncs:,}")
    t.add_row("payload per full sync (one worker)", fmt_bytes(main.payload_bytes_per_sync))
    t.add_row("WAN bytes (all sites)", fmt_bytes(main.wan_bytes))
    t.add_row("peak bandwidth per site", fmt_bps(main.peak_bandwidth_bps))
    t.add_row("energy", f"[bold]{main.energy_mwh:,.0f} MWh[/bold]")
    t.add_row("power caps respected", "yes" if main.caps_respected else "[red]NO[/red]")
    console.print(t)

    st = Table(title="Sites", header_style="bold")
    for col in ("site", "accelerators", "powered under cap", "power / cap (MW)", "compute/step", "utilization",
                "energy (MWh)"):
        st.add_column(col, justify="left" if col == "site" else "right")
    for s in main.sites:
        cap = "-" if s.power_cap_mw is None else f"{s.power_cap_mw:g}"
        powered = "no cap" if s.accelerators_powered is None else f"{s.accelerators_powered:,}"
        st.add_row(s.name, f"{s.accelerators:,} {s.accelerator}", powered,
                   f"{s.power_mw:,.1f} / {cap}" if s.cap_respected else f"[red]{s.power_mw:,.1f} / {cap}[/red]",
                   fmt_duration(s.compute_step_seconds), fmt_pct(s.utilization), f"{s.energy_mwh:,.0f}")
    console.print(st)
    for note in out.get("notes", main.notes):
        console.print(f"[yellow]note:[/yellow] {note}")
    if out.get("power"):
        _render_power(console, out["power"])

    variants = {k: v for k, v in results.items() if k != "plan"}
    target = out.get("target_utilization")
    if variants:
        ct = Table(title="Algorithms side by side", header_style="bold")
        cols = ["algorithm", "codec", "utilization", "step", "time to train", "WAN bytes", "peak bw/site",
                "energy (MWh)"]
        if target is not None:
            cols.append(f"bw for {fmt_pct(target)}")
        for col in cols:
            ct.add_column(col, justify="left" if col in ("algorithm", "codec") else "right")
        needed = out.get("bandwidth_needed_bps_by_algorithm", {})
        for name, r in variants.items():
            row = [r.algorithm, r.codec, fmt_pct(r.utilization), fmt_duration(r.step_seconds),
                   fmt_duration(r.time_to_train_seconds), fmt_bytes(r.wan_bytes), fmt_bps(r.peak_bandwidth_bps),
                   f"{r.energy_mwh:,.0f}"]
            if target is not None:
                row.append(fmt_bps(needed.get(name)))
            ct.add_row(*row)
        console.print(ct)

    if target is not None:
        qt = Table(title=f"To reach {fmt_pct(target)} utilization", header_style="bold")
        qt.add_column("question")
        qt.add_column("answer", justify="right")
        qt.add_row(f"bandwidth per link for {main.algorithm}, {main.codec}", fmt_bps(out["bandwidth_needed_bps"]))
        if not variants:
            for name, bps in out.get("bandwidth_needed_bps_by_algorithm", {}).items():
                qt.add_row(f"  {name}", fmt_bps(bps))
        h = out.get("smallest_sync_every")
        qt.add_row("smallest H at these links", "none of the candidates" if h is None else str(h))
        codec = out.get("mildest_codec")
        qt.add_row("mildest codec at these links", "none of the candidates" if codec is None else codec)
        console.print(qt)
        if out["bandwidth_needed_bps"] is None:
            console.print("[yellow]note:[/yellow] no bandwidth reaches the target: latency or a slow site is the limit")

    if sweep is not None:
        sw = Table(title="Utilization against link bandwidth", header_style="bold")
        sw.add_column("bandwidth", justify="right")
        for name in sweep.utilization:
            sw.add_column(name, justify="right")
        for i, bw in enumerate(sweep.bandwidths_bps):
            sw.add_row(fmt_bps(bw), *(fmt_pct(sweep.utilization[n][i]) for n in sweep.utilization))
        console.print(sw)
        if out.get("plot"):
            console.print(f"plot written to {out['plot']}")

    if simulation is not None:
        sim = out["simulation"]
        s = Table(title=f"Simulation (seed {simulation.seed}, {sim['recovery']} recovery)", header_style="bold")
        s.add_column("quantity")
        s.add_column("formula", justify="right")
        s.add_column("simulated", justify="right")
        s.add_row("time to train", fmt_duration(main.time_to_train_seconds),
                  fmt_duration(simulation.time_to_train_seconds))
        s.add_row("utilization (effective)", fmt_pct(main.utilization), fmt_pct(simulation.utilization))
        s.add_row("energy (MWh)", f"{main.energy_mwh:,.0f}", f"{simulation.energy_mwh:,.0f}")
        s.add_row("failures", "-", f"{simulation.failures:,}")
        s.add_row("lost progress (site-hours)", "-", f"{simulation.lost_progress_hours:,.1f}")
        s.add_row("downtime (site-hours)", "-", f"{simulation.downtime_hours:,.1f}")
        s.add_row("lost hours in all (site-hours)", "-", f"{simulation.lost_hours:,.1f}")
        if sim["recovery"] == "elastic":
            r = simulation
            s.add_row("  silent failures", "-", f"{r.silent_failures:,}")
            s.add_row("detection per failure / in all", "-",
                      f"{_seconds(r.detection_seconds_per_failure)} / {_seconds(r.detection_seconds)}")
            s.add_row("re-forming per failure / in all", "-",
                      f"{_seconds(r.reform_seconds_per_failure)} / {_seconds(r.reform_seconds)}")
            s.add_row("healing per rejoin / in all", "-",
                      f"{_seconds(r.heal_seconds_per_rejoin)} / {_seconds(r.heal_seconds)} ({r.rejoins:,} rejoins)")
            s.add_row("stall of the running sites", "-", _seconds(r.stall_seconds))
            if r.outages:
                s.add_row("every site down at once (resumed from a checkpoint)", "-", f"{r.outages:,}")
        console.print(s)
        costs = sim.get("failure_costs")
        if costs:
            names = [site["name"] for site in out["inputs"]["sites"]]
            healer = "no other site" if costs["healer"] is None else names[costs["healer"]]
            link = "no emulated link" if costs["link"] is None else costs["link"]
            f = Table(title=f"One failure of {names[costs['site']]}, from the configuration", header_style="bold")
            f.add_column("cost")
            f.add_column("time", justify="right")
            f.add_column("where it comes from")
            f.add_row("detection of a crash", _seconds(costs["detection_crash_seconds"]), "its connections close")
            f.add_row("detection of a silent failure", _seconds(costs["detection_silent_seconds"]),
                      "membership.heartbeat_timeout_s")
            f.add_row("  ... as a sync starts", _seconds(costs["detection_hung_seconds"]),
                      f"the transfer deadline of a {_seconds(costs['sync_seconds'])} sync")
            f.add_row("re-forming (after the failure, and at the rejoin)", _seconds(costs["reform_seconds"]),
                      costs["reform_source"])
            f.add_row("healing", _seconds(costs["heal_seconds"]),
                      f"{fmt_bytes(costs['heal_bytes'])} of state from {healer} over {link}")
            console.print(f)


def plot_sweep(sweep: Sweep, *, path: str | Path, target: float | None = None, title: str = "") -> Path:
    """Write utilization against bandwidth, one line per algorithm, to ``path`` (PNG, SVG or PDF)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    gbps = [b / 1e9 for b in sweep.bandwidths_bps]
    for name, util in sweep.utilization.items():
        ax.plot(gbps, [100 * u for u in util], marker="o", markersize=3, label=name)
    if target is not None:
        ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1, label=f"target {100 * target:g}%")
    ax.set_xscale("log")
    ax.set_xlabel("link bandwidth (Gbit/s)")
    ax.set_ylabel("utilization (%)")
    ax.set_ylim(0, 102)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=10)
    path = Path(path)
    try:
        fig.savefig(path)
    except OSError as exc:
        raise ConfigError(f"cannot write the plot to {str(path)!r}: {exc.strerror or exc}", field="plot") from None
    return path

