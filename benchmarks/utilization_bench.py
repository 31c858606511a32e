"""Utilization against emulated bandwidth, per algorithm, at equal wall-clock time.

K sites (default 4) train the demo GPT for the same training wall time at each bandwidth (link latency
fixed). Every figure comes from the runs' summary.json: utilization is measured compute time over wall time,
with the emulated link time inside the wall time; the planner's prediction for each run (summary.json's
predicted_utilization) is tabled beside it. Writes a table and a plot.

    .venv/bin/python benchmarks/utilization_bench.py [--wall-seconds 30] [--sites 2]

Each site is one process with one thread: with more sites than cores, the sites time-share the cores, and
the waits that causes at every synchronous point add to the WAN's. `--sites 2` on a 2-core machine gives
each site its own core.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from _common import RESULTS, command_line, run_variant, write_result

BANDWIDTHS = ["2mbit", "10mbit", "50mbit", "250mbit", "10gbit"]  # from "ddp is unusable" to "ample"
ALGORITHMS = {
    "ddp": {"run.algorithm": "ddp"},
    "diloco": {"run.algorithm": "diloco", "outer.sync_every": 25},
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
    p.add_argument("--resume", action="store_true",
                   help="reuse the finished runs already in the runs directory; run only the missing ones")
    p.add_argument("--out", default=None, help="runs directory (default runs/utilization, or runs/utilization-Ksites)")
    args = p.parse_args()
    bandwidths = args.bandwidths.split(",")
    tag = "utilization" if args.sites == 4 else f"utilization-{args.sites}sites"
    out = Path(args.out or f"runs/{tag}")
    load = os.getloadavg()[0]
    table: dict[str, dict[str, dict]] = {}
    t0 = time.time()
    for bw in bandwidths:
        for name, values in ALGORITHMS.items():
            link = f"{bw}/{args.latency}"
            done = out / f"{name}-{bw}" / "summary.json"
            if args.resume and done.is_file() and json.loads(done.read_text()).get("ok"):
                s = json.loads(done.read_text())
                print(f"-- {name}-{bw}: reused {done}", flush=True)
            else:
                s = run_variant(f"{name}-{bw}", out, {"run.sites": args.sites, "run.tokens": 10**9,
                                                      "run.wall_seconds": args.wall_seconds, "wan.link": link,
                                                      "run.eval_every_tokens": 10**9, **values})
            table.setdefault(name, {})[bw] = {k: s.get(k) for k in ("utilization", "predicted_utilization", "eval_loss",
                                                                     "wan_bytes", "tokens", "wall_seconds", "outer_rounds",
                                                                     "max_transfer_bytes")}
    (out / "utilization.json").write_text(json.dumps(table, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from geotrain.topology import parse_bandwidth

    fig = Figure(figsize=(8, 4.5), dpi=120)
    ax = fig.add_subplot()
    xs = [parse_bandwidth(b) for b in bandwidths]
    for name, row in table.items():
        ax.plot(xs, [100 * row[b]["utilization"] for b in bandwidths], marker="o", label=name)
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
        "The streaming variant uses P=4 fragments, tau=5 and the int4 codec; diloco variants fp32, H=25.",
        "",
        head,
        "|" + "---|" * (len(bandwidths) + 1),
    ]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * row[b]['utilization']:.1f}%" for b in bandwidths) + " |")
    lines += ["", "The planner's prediction for the same runs (`predicted_utilization`, from each run's configuration and "
              "measured step times):", "", head, "|" + "---|" * (len(bandwidths) + 1)]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(
            "—" if row[b]["predicted_utilization"] is None else f"{100 * row[b]['predicted_utilization']:.1f}%"
            for b in bandwidths) + " |")
    lines += ["", "Eval loss reached in the same wall time:", "", head, "|" + "---|" * (len(bandwidths) + 1)]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[b]['eval_loss']:.3f}" for b in bandwidths) + " |")
    lines += ["", f"![utilization]({png.name})", ""]
    write_result(tag, "\n".join(lines))


if __name__ == "__main__":
    main()
