"""Utilization against emulated bandwidth, per algorithm, at equal wall-clock time.

K sites (default 4) train the demo GPT for the same training wall time at each bandwidth (link latency
fixed). Every figure comes from the runs' summary.json: utilization is measured compute time over wall time,
with the emulated link time inside the wall time; the planner's prediction for each run (summary.json's
predicted_utilization) is tabled beside it. Writes a table and a plot.

    .venv/bin/python benchmarks/utilization_bench.py [--wall-seconds 30] [--sites 2] [--repeats 3]

With --repeats N every point runs N times and the tables show the median, with the range beside it: on a
shared machine one site's passing slowdown makes the other wait at the next sync point, and a single run
can land on either side of a threshold.

Each site is one process with one thread: with more sites than cores, the sites time-share the cores, and
the waits that causes at every synchronous point add to the WAN's. `--sites 2` on a 2-core machine gives
each site its own core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from _common import RESULTS, command_line, run_variant, write_result

BANDWIDTHS = ["2mbit", "10mbit", "50mbit", "250mbit", "10gbit"]  # from "ddp is unusable" to "ample"
ALGORITHMS = {
    "ddp": {"run.algorithm": "ddp"},
    "diloco": {"run.algorithm": "diloco", "outer.sync_every": 25, "comm.overlap": False},
    "diloco+overlap": {"run.algorithm": "diloco", "outer.sync_every": 25, "comm.overlap": True},
    "streaming+overlap": {"run.algorithm": "streaming", "outer.sync_every": 25, "streaming.fragments": 4,
                          "streaming.overlap_steps": 5, "comm.codec": "int4"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wall-seconds", type=float, default=30.0)
    p.add_argument("--latency", default="10ms")
    p.add_argument("--bandwidths", default=",".join(BANDWIDTHS))
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1, help="runs per point; tables show the median and the range")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated subset of " + ", ".join(ALGORITHMS))
    p.add_argument("--resume", action="store_true",
                   help="reuse the finished runs already in the runs directory; run only the missing ones")
    p.add_argument("--out", default=None, help="runs directory (default runs/utilization, or runs/utilization-Ksites)")
    args = p.parse_args()
    bandwidths = args.bandwidths.split(",")
    algorithms = args.algorithms.split(",")
    unknown = sorted(set(algorithms) - set(ALGORITHMS))
    if unknown or args.repeats < 1:
        p.error(f"unknown algorithms {unknown}" if unknown else "--repeats must be at least 1")
    tag = "utilization" if args.sites == 4 else f"utilization-{args.sites}sites"
    if args.repeats > 1:
        tag += f"-x{args.repeats}"
    out = Path(args.out or f"runs/{tag}")
    load = os.getloadavg()[0]
    keys = ("utilization", "predicted_utilization", "eval_loss", "wan_bytes", "tokens", "wall_seconds", "outer_rounds",
            "max_transfer_bytes")
    runs: dict[str, dict[str, list[dict]]] = {}
    t0 = time.time()
    for repeat in range(args.repeats):
        for bw in bandwidths:
            for name in algorithms:
                run_name = f"{name}-{bw}" + (f"-r{repeat + 1}" if args.repeats > 1 else "")
                done = out / run_name / "summary.json"
                if args.resume and done.is_file() and json.loads(done.read_text()).get("ok"):
                    s = json.loads(done.read_text())
                    print(f"-- {run_name}: reused {done}", flush=True)
                else:
                    s = run_variant(run_name, out, {"run.sites": args.sites, "run.tokens": 10**9,
                                                    "run.wall_seconds": args.wall_seconds,
                                                    "wan.link": f"{bw}/{args.latency}",
                                                    "run.eval_every_tokens": 10**9, **ALGORITHMS[name]})
                runs.setdefault(name, {}).setdefault(bw, []).append({k: s.get(k) for k in keys})
    (out / "utilization.json").write_text(json.dumps(runs, indent=2))
    # the median run of each point (by utilization) gives its row; the range shows the spread
    table = {name: {bw: sorted(rs, key=lambda r: r["utilization"])[(len(rs) - 1) // 2] for bw, rs in row.items()}
             for name, row in runs.items()}

    def cell(name: str, bw: str, key: str) -> str:
        values = [r[key] for r in runs[name][bw]]
        if any(v is None for v in values):
            return "—"
        if len(values) == 1:
            return f"{100 * values[0]:.1f}%"
        return f"{100 * statistics.median(values):.1f}% ({100 * min(values):.1f}-{100 * max(values):.1f})"

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from geotrain.topology import parse_bandwidth

    fig = Figure(figsize=(8, 4.5), dpi=120)
    ax = fig.add_subplot()
    xs = [parse_bandwidth(b) for b in bandwidths]
    for name, row in runs.items():
        us = [[100 * r["utilization"] for r in row[b]] for b in bandwidths]
        mid = [statistics.median(u) for u in us]
        ax.errorbar(xs, mid, yerr=[[m - min(u) for m, u in zip(mid, us)], [max(u) - m for m, u in zip(mid, us)]],
                    marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel(f"emulated link bandwidth (bit/s), latency {args.latency}")
    ax.set_ylabel("measured utilization (%)")
    ax.set_ylim(0, 105)
    ax.axhline(95, color="grey", lw=0.8, ls="--")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{args.sites} sites, demo GPT, {args.wall_seconds:.0f} s of training per point")
    png = RESULTS / f"{time.strftime('%Y-%m-%d')}-{tag}.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, bbox_inches="tight")

    head = "| algorithm | " + " | ".join(bandwidths) + " |"
    lines = [
        f"# Utilization against bandwidth ({args.sites} sites, equal wall time)",
        "",
        f"Command: `{command_line()}`  ",
        f"Latency {args.latency} one way; {args.wall_seconds:.0f} s of training per point; total {time.time() - t0:.0f} s; "
        f"load average {load:.2f} at the start on {os.cpu_count()} CPUs.",
        "Utilization = compute time / training wall time, mean over sites, from each run's summary.json. "
        "The streaming variant uses P=4 fragments, tau=5 and the int4 codec; diloco variants fp32, H=25."
        + (f" Each point ran {args.repeats} times: median (min-max)." if args.repeats > 1 else ""),
        "",
        head,
        "|" + "---|" * (len(bandwidths) + 1),
    ]
    for name in table:
        lines.append(f"| {name} | " + " | ".join(cell(name, b, "utilization") for b in bandwidths) + " |")
    lines += ["", "The planner's prediction for the same runs (`predicted_utilization`, from each run's configuration and "
              "measured step times):", "", head, "|" + "---|" * (len(bandwidths) + 1)]
    for name in table:
        lines.append(f"| {name} | " + " | ".join(cell(name, b, "predicted_utilization") for b in bandwidths) + " |")
    lines += ["", "Eval loss reached in the same wall time" + (" (the median run's)" if args.repeats > 1 else "") + ":",
              "", head, "|" + "---|" * (len(bandwidths) + 1)]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[b]['eval_loss']:.3f}" for b in bandwidths) + " |")
    lines += ["", f"![utilization]({png.name})", ""]
    write_result(tag, "\n".join(lines))


if __name__ == "__main__":
    main()
