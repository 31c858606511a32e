"""Utilization in the network lab against the same run under the WAN emulator.

For each algorithm, the same ``geotrain run`` (K sites, the demo GPT, one link between every pair, a fixed
training wall time) runs twice side by side: with the WAN emulator holding each collective for its modelled
time, and with every site in the network lab, its traffic crossing real shaped links (``--network netlab``).
Every figure comes from the runs' summary.json: utilization is measured compute time over wall time. The two
runs of a pair follow each other, so a passing load on the shared machine touches both. Root only.

    sudo .venv/bin/python benchmarks/netlab_utilization_bench.py [--repeats 3] [--wall-seconds 30]
        [--link 2mbit/50ms] [--sites 4] [--algorithms ddp,diloco+overlap,streaming-int4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from _common import RESULTS, command_line, run_variant, write_result  # noqa: E402

ALGORITHMS = {
    "ddp": {"run.algorithm": "ddp"},
    "diloco+overlap": {"run.algorithm": "diloco", "outer.sync_every": 25, "comm.overlap": True},
    "streaming-int4": {"run.algorithm": "streaming", "outer.sync_every": 25, "streaming.fragments": 4,
                       "streaming.overlap_steps": 5, "comm.codec": "int4"},
}
NETWORKS = ("emulated", "netlab")
KEYS = ("utilization", "predicted_utilization", "wall_seconds", "wan_bytes", "outer_rounds", "eval_loss")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--wall-seconds", type=float, default=30.0)
    p.add_argument("--link", default="2mbit/50ms", help="between every pair of sites (default: the demo link)")
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated subset of " + ", ".join(ALGORITHMS))
    p.add_argument("--out", type=Path, default=Path("runs/netlab-utilization"))
    p.add_argument("--resume", action="store_true", help="reuse the finished runs already in --out")
    p.add_argument("--name", default="", help="suffix of the result files")
    args = p.parse_args()
    algorithms = args.algorithms.split(",")
    unknown = sorted(set(algorithms) - set(ALGORITHMS))
    if unknown or args.repeats < 1:
        p.error(f"unknown algorithms {unknown}" if unknown else "--repeats must be at least 1")
    if os.geteuid() != 0:
        sys.exit("the network lab needs root")
    load = os.getloadavg()[0]
    t0 = time.time()
    runs: dict[str, dict[str, list[dict]]] = {}
    for repeat in range(args.repeats):
        for name in algorithms:
            for network in NETWORKS:
                run_name = f"{name}-{network}-r{repeat + 1}"
                done = args.out / run_name / "summary.json"
                if args.resume and done.is_file() and json.loads(done.read_text()).get("ok"):
                    s = json.loads(done.read_text())
                    print(f"-- {run_name}: reused {done}", flush=True)
                else:
                    s = run_variant(run_name, args.out, {"run.sites": args.sites, "run.tokens": 10**9,
                                                         "run.wall_seconds": args.wall_seconds, "wan.link": args.link,
                                                         "run.eval_every_tokens": 10**9, **ALGORITHMS[name]},
                                    netlab=network == "netlab")
                runs.setdefault(name, {}).setdefault(network, []).append({k: s.get(k) for k in KEYS})
    (args.out / "netlab-utilization.json").write_text(json.dumps(runs, indent=2))

    def stat(name: str, network: str, key: str = "utilization") -> tuple[float, float, float]:
        values = [100 * r[key] for r in runs[name][network] if r[key] is not None]
        return statistics.median(values), min(values), max(values)

    lines = [
        f"# Utilization in the network lab against the WAN emulator ({args.sites} sites, {args.link})",
        "",
        f"Command: `{command_line()}`  ",
        f"The demo GPT, {args.sites} sites over {args.link} between every pair, {args.wall_seconds:.0f} s of training "
        f"per run, {args.repeats} pairs of runs per algorithm (emulated, then in the lab); total {time.time() - t0:.0f} s; "
        f"load average {load:.2f} at the start on {os.cpu_count()} CPUs. Utilization = compute time / training wall "
        "time, mean over sites, from each run's summary.json; median (min-max). Streaming: P=4 fragments, tau=5, int4; "
        "DiLoCo: fp32, H=25, overlapped.",
        "",
        "| algorithm | emulated | network lab | lab - emulated (points, medians) | predicted (emulated runs) |",
        "|---|---|---|---|---|",
    ]
    for name in algorithms:
        e, lab = stat(name, "emulated"), stat(name, "netlab")
        pred = stat(name, "emulated", "predicted_utilization")
        lines.append(f"| {name} | {e[0]:.1f}% ({e[1]:.1f}-{e[2]:.1f}) | {lab[0]:.1f}% ({lab[1]:.1f}-{lab[2]:.1f}) | "
                     f"{lab[0] - e[0]:+.1f} | {pred[0]:.1f}% |")
    path = write_result(f"netlab-utilization-{args.sites}sites" + (f"-{args.name}" if args.name else ""),
                        "\n".join(lines) + "\n")
    plot(runs, algorithms, path.with_suffix(".png"), f"{args.sites} sites over {args.link}")


def plot(runs: dict, algorithms: list[str], path: Path, title: str) -> None:
    """Each algorithm's runs, emulated beside lab: the median as a bar, every run as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.38
    for j, network in enumerate(NETWORKS):
        xs = [i + (j - 0.5) * width for i in range(len(algorithms))]
        values = [[100 * r["utilization"] for r in runs[name][network]] for name in algorithms]
        ax.bar(xs, [statistics.median(v) for v in values], width, label=network, color=f"C{j}", alpha=0.7)
        for x, v in zip(xs, values):
            ax.plot([x] * len(v), v, "k.", markersize=4)
    ax.set_xticks(range(len(algorithms)), algorithms)
    ax.set_ylabel("utilization (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"Utilization, emulated against the network lab: {title}")
    ax.legend()
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
