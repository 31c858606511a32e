"""Training within each site's power: the shipped grid examples, heterogeneous sites and power swings per sync.

Three parts, each a set of real runs on this machine (every run's records are read back from its directory):

* ``examples``: every ``configs/grid-*.toml``, logging every step. For each: the largest draw over cap and the
  largest ramp over its limit at any step (A); tokens trained over the tokens the power trace allows (B: the
  integral of each site's allowed speed, from the cap at each moment and no ramp, over the site's training
  time, converted to steps at its mean compute per step); the integral of the logged draw against the energy
  the sites report (E, ``geotrain.report.metrics.logged_energy_mwh``); and the planner's prediction of time
  and energy from the run's own step times (F, ``geotrain.summary.predict_from_summary``).
* ``hetero``: 2 sites with speed factors [1, 0.25] (4 sites time-share 2 cores too much) on the demo GPT and
  link: H-step rounds and time-based rounds, against 2 homogeneous sites at the same token budget. The fast
  site's idle fraction (time waiting on the network over its wall time) and the eval loss (C).
* ``swings``: the largest change of a site's draw around an outer sync (the draw while it computes against the
  draw while it waits for the sync), for blocking DiLoCo and Streaming DiLoCo with overlap, under a grid with no
  ramp limit; and what holding the draw through waits (a ramp limit) costs (G).

    .venv/bin/python benchmarks/power_bench.py                  # all three parts
    .venv/bin/python benchmarks/power_bench.py --parts hetero

Writes ``benchmarks/results/DATE-power.md`` and ``DATE-power-*.png`` beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

from _common import RESULTS, command_line, write_result

ROOT = Path(__file__).resolve().parent.parent


def run(name: str, out: Path, *, config: Path | None = None, values: dict[str, Any] | None = None) -> Path:
    """One run (a config file and dotted settings); returns its directory. Kept and reused when run again."""
    from geotrain.config import load_config
    from geotrain.train.launch import launch

    where = out / name
    if (where / "summary.json").is_file() and json.loads((where / "summary.json").read_text()).get("ok"):
        print(f"-- {name}: reusing {where}", flush=True)
        return where
    cfg = load_config(config, values={**(values or {}), "run.out": str(where)})
    print(f"-- {name}: {config.name if config else ''} {json.dumps(values or {})}", flush=True)
    outcome = launch(cfg, progress=False)
    if outcome.exit_code != 0:
        raise RuntimeError(f"{name} failed: {outcome.summary.get('error')}")
    s = outcome.summary
    print(f"   eval_loss {s['eval_loss']:.4f}  wall {s['wall_seconds']:.1f}s  utilization {s['utilization']:.3f}",
          flush=True)
    return where


def records(where: Path) -> dict[int, list[dict[str, Any]]]:
    from geotrain.summary import read_site_records

    summary = json.loads((where / "summary.json").read_text())
    return read_site_records(where, summary["sites"])


def stretches(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """A site's step records carrying power, cut where it left or restarted."""
    pieces: list[list[dict[str, Any]]] = [[]]
    for r in rows:
        if r.get("kind") in ("power_off", "start") and pieces[-1]:
            pieces.append([])
        if r.get("kind") == "step" and "power_mw" in r:
            pieces[-1].append(r)
    return [p for p in pieces if p]


# -- examples ------------------------------------------------------------------------------------------------


def check_example(where: Path) -> dict[str, Any]:
    from geotrain.config import config_from_tree
    from geotrain.power import site_controllers
    from geotrain.report.metrics import logged_energy_mwh
    from geotrain.summary import predict_from_summary

    summary = json.loads((where / "summary.json").read_text())
    config = config_from_tree(json.loads((where / "config.json").read_text()))
    grid = config.grid
    ramp = grid.ramp_mw_per_min
    recs = records(where)
    over_cap, ramp_ratio = -math.inf, 0.0
    logged, reported = 0.0, 0.0
    ramp_lost = 0.0  # seconds lost to steps at a lower share than the cap allowed at their start (the ramp limit,
    # or a draw lowered so that it holds until the step ends)
    pcs = site_controllers(config)
    for k, rows in recs.items():
        for piece in stretches(rows):
            for r in piece:
                over_cap = max(over_cap, r["power_mw"] - r["cap_mw"])
            for prev, r in zip(piece, piece[1:]):
                allowed_active = pcs[k].site.active_at(min(r["cap_mw"], pcs[k].site.limit_mw))
                c = r["compute_s"] - prev["compute_s"]
                if r["active"] > 0 and allowed_active > 0:
                    ramp_lost += c / (r["speed"] * r["active"]) - c / (r["speed"] * allowed_active)
            for prev, r in zip(piece, piece[1:]):
                if ramp:
                    minutes = (r["grid_hours"] - prev["grid_hours"]) * 60
                    if minutes > 0:
                        ramp_ratio = max(ramp_ratio, abs(r["power_mw"] - prev["power_mw"]) / (ramp * minutes))
            logged += logged_energy_mwh(piece, time_scale=grid.time_scale)
            reported += piece[-1]["energy_mwh"] - piece[0]["energy_mwh"]
    # B: tokens the trace allows: each site at the speed its cap allows at each moment (no ramp), over the run
    per_site = {e["site"]: e for e in summary["per_site"]}
    controllers = site_controllers(config)
    speeds = config.run.site_speeds or [1.0] * config.run.sites
    step_tokens = config.data.batch_size * config.model.seq_len * config.run.workers_per_site
    allowed = allowed_ramp = trained = 0.0
    for k, pc in enumerate(controllers):
        rows = [r for r in recs.get(k, []) if r.get("kind") == "step"]
        steps = sum(1 for r in rows)  # log_every = 1: one record per step trained
        compute = float(per_site[k]["compute_seconds"]) / max(1, per_site[k]["steps_trained"])
        n = 2000
        # the site's training time on the run's clock (evaluation excluded; across an outage, which the trace
        # itself allows nothing in)
        dt = max(float(r.get("run_s", r["wall_s"])) for r in rows) / n
        f = f_ramp = 0.0
        # the best any controller could do under the ramp limit too: the draw follows the envelope E (which
        # comes down ahead of dips) and rises at most at the ramp rate, from the threshold after an outage; no
        # step granularity (the first point takes E, as the controller's first step does)
        held: float | None = None
        for i in range(n):
            g = pc.grid_seconds((i + 0.5) * dt)
            draw = min(pc.available_mw(g), pc.site.limit_mw)
            active = pc.site.active_at(draw) if draw >= pc.threshold_mw else 0.0
            f += speeds[k] * active * dt
            top = pc.envelope_mw(g)
            if top < pc.threshold_mw:
                held = 0.0  # out
            elif held is None or not ramp:
                held = top
            else:
                held = min(top, max(held, pc.threshold_mw) + pc.rate * dt * pc.time_scale)
            f_ramp += speeds[k] * (pc.site.active_at(held) if held >= pc.threshold_mw else 0.0) * dt
        allowed += f / compute * step_tokens
        allowed_ramp += f_ramp / compute * step_tokens
        trained += steps * step_tokens
    prediction = None
    try:
        prediction = predict_from_summary(summary)
        prediction = prediction.to_dict() if hasattr(prediction, "to_dict") else {"error": "no power prediction"}
    except Exception as e:  # noqa: BLE001 - the table says what the planner could not do
        prediction = {"error": f"{type(e).__name__}: {e}"}
    return {"summary": summary, "over_cap_mw": over_cap, "ramp_ratio": ramp_ratio if ramp else None,
            "ramp_lost_share": ramp_lost / max(float(e["wall_seconds"]) for e in per_site.values()) / len(pcs),
            "energy_logged": logged, "energy_reported": reported, "energy_summary": summary.get("energy_mwh"),
            "tokens_trained": trained, "tokens_allowed": allowed, "tokens_allowed_ramp": allowed_ramp,
            "prediction": prediction}


def examples(out: Path, repeats: int = 1) -> tuple[str, list[Path]]:
    rows = ["| example | max draw - cap (MW) | max ramp / limit | training time lost to setpoints under the cap (ramp, "
            "a draw held to the step's end) | power used (B) | "
            "B, against the trace under its ramp limit | energy, summary (MWh) | logged-draw integral / energy (E) | "
            "wall (s) | predicted wall (s) | predicted energy (MWh) | one model at the end |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    plots = []
    used: dict[str, list[float]] = {}
    used_ramp: dict[str, list[float]] = {}
    for path, rep in [(p, r) for p in sorted((ROOT / "configs").glob("grid-*.toml")) for r in range(repeats)]:
        where = run(path.stem + (f"-r{rep}" if rep else ""), out, config=path, values={"run.log_every": 1})
        c = check_example(where)
        used.setdefault(path.name, []).append(c["tokens_trained"] / c["tokens_allowed"])
        used_ramp.setdefault(path.name, []).append(c["tokens_trained"] / c["tokens_allowed_ramp"])
        s, p = c["summary"], c["prediction"] or {}
        ratio = c["energy_logged"] / c["energy_reported"] if c["energy_reported"] else math.nan
        pw = p.get("wall_seconds") if isinstance(p, dict) else None
        pe = p.get("energy_mwh") if isinstance(p, dict) else None
        ramp = "no limit" if c["ramp_ratio"] is None else f"{c['ramp_ratio']:.3f}"
        rows.append(f"| {path.name}{f' (repeat {rep + 1})' if repeats > 1 else ''} | {c['over_cap_mw']:.3g} | {ramp} | {100 * c['ramp_lost_share']:.2f}% | "
                    f"{c['tokens_trained'] / c['tokens_allowed']:.3f} | "
                    f"{c['tokens_trained'] / c['tokens_allowed_ramp']:.3f} | {s.get('energy_mwh') or math.nan:,.1f} | "
                    f"{ratio:.4f} | {s['wall_seconds']:.1f} | {pw if pw is None else f'{pw:.1f}'} | "
                    f"{pe if pe is None else f'{pe:,.1f}'} | {_in_sync(s)} |")
        if isinstance(p, dict) and "error" in p:
            rows.append(f"|  | planner: {p['error']} | | | | | | | | | | |")
        if rep == 0:
            plots.append(plot_power(where, RESULTS / f"power-{path.stem}.png"))
    if repeats > 1:
        rows.append("")
        rows.append("Median power used (B) over the repeats: " + ", ".join(
            f"{name} {statistics.median(v):.3f} (range {min(v):.3f}-{max(v):.3f})" for name, v in used.items()))
        rows.append("")
        rows.append("Against the trace under its ramp limit: " + ", ".join(
            f"{name} {statistics.median(v):.3f} (range {min(v):.3f}-{max(v):.3f})" for name, v in used_ramp.items()))
    return "\n".join(rows), plots


def _in_sync(summary: dict[str, Any]) -> str:
    """Whether the sites that finished hold one model (``summary.json``'s ``sites_in_sync``)."""
    return {True: "yes", False: "**no**"}.get(summary.get("sites_in_sync"), "n/a")


def plot_power(where: Path, dest: Path) -> Path:
    """The report's power figure of the run (draw under cap per site), as a PNG beside the results."""
    from geotrain.report.metrics import read_run
    from geotrain.report.plots import power_png

    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(power_png(read_run(where)))
    return dest


# -- heterogeneous sites -----------------------------------------------------------------------------------------


HETERO = {"run.sites": 2, "run.tokens": 1_200_000, "run.log_every": 1, "model.n_layer": 2, "model.n_head": 4,
          "model.d_model": 128, "model.seq_len": 128, "data.batch_size": 16, "wan.link": "2mbit/50ms",
          "outer.sync_every": 50, "comm.overlap": True, "comm.codec": "int4"}


def hetero(out: Path, seeds: list[int]) -> str:
    variants = {
        "homogeneous-H50": {},
        "hetero-H50": {"run.site_speeds": [1.0, 0.25]},
        "hetero-timed-5s": {"run.site_speeds": [1.0, 0.25], "outer.sync_every_seconds": 5.0},
    }
    rows = ["| run | seed | site speeds | rounds | fast site idle: comm wait / wall | fast site idle, waits inside "
            "evaluations too | slow site idle | wall (s) | tokens | eval loss | loss / homogeneous | one model |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ratios: dict[str, list[float]] = {}
    bars: list[tuple[str, list[dict[str, Any]], float]] = []  # (run, its per-site entries, loss / homogeneous)
    for seed in seeds:
        base = None
        for name, extra in variants.items():
            if name == "hetero-H50" and seed != seeds[0]:
                continue  # H-step rounds compute the same as the homogeneous run whatever the speeds: one seed
            tag = name if seed == 0 else f"{name}-seed{seed}"
            s = json.loads((run(tag, out, values={**HETERO, **extra, "run.seed": seed}) / "summary.json").read_text())
            sites = {e["site"]: e for e in s["per_site"]}
            idle = [float(sites[k]["comm_seconds"]) / float(sites[k]["wall_seconds"]) for k in (0, 1)]
            # evaluation pauses the clock; at a sync point the fast site can wait inside it for the slow one
            fast = sites[0]
            elapsed = float(fast["wall_seconds"]) + float(fast.get("eval_seconds") or 0.0)
            busy = float(fast["compute_seconds"]) + float(fast.get("throttled_seconds") or 0.0)
            base = base or s["eval_loss"]
            ratios.setdefault(name, []).append(s["eval_loss"] / base)
            bars.append((tag, [sites[0], sites[1]], s["eval_loss"] / base))
            rows.append(f"| {name} | {seed} | {extra.get('run.site_speeds', [1, 1])} | "
                        f"{'T = 5 s' if 'outer.sync_every_seconds' in extra else 'H = 50'} | {idle[0]:.3f} | "
                        f"{1 - busy / elapsed:.3f} | {idle[1]:.3f} | {s['wall_seconds']:.1f} | {s['tokens']:,} | "
                        f"{s['eval_loss']:.4f} | {s['eval_loss'] / base:.3f} | {_in_sync(s)} |")
    rows += ["", "Median loss / homogeneous over seeds: " + ", ".join(
        f"{name} {statistics.median(v):.3f} ({len(v)} seed{'s' if len(v) > 1 else ''})" for name, v in ratios.items())]
    plot = plot_hetero(bars, RESULTS / "power-hetero.png")
    rows += ["", f"![{plot.stem}]({plot.name})"]
    return "\n".join(rows)


def plot_hetero(bars: list[tuple[str, list[dict[str, Any]], float]], dest: Path) -> Path:
    """Where each site's wall time went in each heterogeneous run (compute, held back, waiting on the network,
    the rest), and its eval loss relative to the homogeneous run of its seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.5 * 2 * len(bars) + 1.6),
                                      gridspec_kw={"width_ratios": [3, 1]}, sharey=True)
    labels, y = [], 0.0
    parts = (("compute_seconds", "compute", "tab:blue"), ("throttled_seconds", "held back (speed)", "lightsteelblue"),
             ("comm_seconds", "waiting on the network", "tab:orange"))
    for tag, per_site, ratio in bars:
        for k, site in enumerate(per_site):
            wall = float(site["wall_seconds"])
            x = 0.0
            for key, label, colour in parts:
                share = float(site.get(key) or 0.0) / wall
                left.barh(y, share, left=x, color=colour, label=label if y == 0 else None)
                x += share
            left.barh(y, max(0.0, 1 - x), left=x, color="0.85", label="the rest" if y == 0 else None)
            labels.append(f"{tag} · site {k}")
            y += 1
        right.barh(y - 1.5, ratio, height=1.6, color="tab:green" if ratio <= 1.03 else "tab:red")
        right.text(ratio, y - 1.5, f" {ratio:.3f}", va="center", fontsize=8)
    left.set_yticks(range(len(labels)), labels, fontsize=8)
    left.invert_yaxis()
    left.set_xlim(0, 1)
    left.set_xlabel("share of the site's wall time")
    left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=4)
    left.set_title("Speeds [1, 0.25]: where each site's time went")
    right.axvline(1.03, color="black", linestyle="--", linewidth=0.8)
    right.set_xlabel("eval loss / homogeneous\n(dashed: 1.03)")
    right.set_xlim(0.7, 1.15)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)
    return dest


# -- swings --------------------------------------------------------------------------------------------------


SWING = {**HETERO, "run.tokens": 600_000, "sites.power_cap_mw": 100, "grid.enabled": True}


def swings(out: Path) -> str:
    variants = {
        "diloco-blocking": {"comm.overlap": False},
        "streaming-overlap": {"run.algorithm": "streaming", "comm.codec": "int4"},
        "diloco-blocking-ramp": {"comm.overlap": False, "grid.ramp_mw_per_min": 10.0},
    }
    rows = ["| run | outer syncs | site syncs with a wait >= 0.1 s | largest swing at such a sync (MW) | seconds spent "
            "dipped | smoothing energy (MWh) | tokens / training second |", "|---|---|---|---|---|---|---|"]
    for name, extra in variants.items():
        values = {**SWING, **extra}
        if values.get("run.algorithm") == "streaming":
            values.pop("comm.overlap")
        where = run(name, out, values=values)
        s = json.loads((where / "summary.json").read_text())
        from geotrain.config import config_from_tree
        from geotrain.power import site_controllers

        config = config_from_tree(json.loads((where / "config.json").read_text()))
        pcs = site_controllers(config)
        found, dipped, syncs = [], 0.0, 0
        for k, rows_k in records(where).items():
            steps = [r for r in rows_k if r.get("kind") == "step" and "power_mw" in r]
            syncs = max(syncs, steps[-1]["outer_rounds"] if steps else 0)
            for prev, r in zip(steps, steps[1:]):
                wait = r["comm_s"] - prev["comm_s"]
                if wait < 0.1:  # a wait of milliseconds is no swing a grid sees
                    continue
                # waiting, the site draws idle without a ramp limit, and holds its setpoint with one
                during = r["power_mw"] if config.grid.ramp_mw_per_min else min(pcs[k].site.idle_mw, r["power_mw"])
                found.append(r["power_mw"] - during)
                dipped += wait if during < r["power_mw"] else 0.0
        smoothing = sum(float(e.get("smoothing_mwh") or 0) for e in s["per_site"])
        rows.append(f"| {name} | {syncs} | {len(found)} | {max(found, default=0.0):.1f} | {dipped:.1f} | "
                    f"{smoothing:,.2f} | {s['tokens'] / s['wall_seconds']:,.0f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="examples,hetero,swings")
    p.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",")], default=[0, 1, 2],
                   help="seeds of the heterogeneous comparison (default 0,1,2)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each shipped grid example (default 1)")
    p.add_argument("--out", default="runs/power-bench", help="where the runs are kept (reused when run again)")
    args = p.parse_args()
    out = Path(args.out)
    parts = [x.strip() for x in args.parts.split(",")]
    body = [f"# Training within each site's power\n\n`{command_line()}`\n"]
    if "examples" in parts:
        table, plots = examples(out, args.repeats)
        body += ["## The shipped grid examples (A, B, E, F)\n", table, ""]
        body += [f"![{p.stem}]({p.name})" for p in plots] + [""]
    if "hetero" in parts:
        body += ["## Heterogeneous sites: speed factors [1, 0.25] (C)\n", hetero(out, args.seeds), ""]
    if "swings" in parts:
        body += ["## Power swings at outer syncs (G)\n", swings(out), ""]
    write_result("power" if parts == ["examples", "hetero", "swings"] else "power-" + "-".join(parts),
                 "\n".join(body) + "\n")


if __name__ == "__main__":
    main()
