"""Utilization with the defaults a user gets: only the algorithm and the codec named, everything else (the
demo's 4 sites, its 2 Mbit/s / 50 ms link, H, and the overlap settings the run chooses for itself) as
``geotrain run`` sets it.

Each variant runs ``--repeats`` times; the table quotes the median and the range of measured utilization, the
timing model's prediction from the same runs, the settings the runs chose and why, and eval loss. DDP syncs
every step, so it runs for ``--ddp-wall-seconds`` of training instead of the whole token budget.

    .venv/bin/python benchmarks/defaults_bench.py [--repeats 3] [--out runs/defaults]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from _common import command_line, run_variant, write_result

VARIANTS = {
    "streaming-int4": {"run.algorithm": "streaming", "comm.codec": "int4"},
    "diloco-overlap-int4": {"run.algorithm": "diloco", "comm.overlap": True, "comm.codec": "int4"},
    "ddp": {"run.algorithm": "ddp"},
    "sparseloco-overlap": {"run.algorithm": "sparseloco", "comm.overlap": True},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="runs/defaults")
    p.add_argument("--ddp-wall-seconds", type=float, default=60.0)
    p.add_argument("--variants", default=",".join(list(VARIANTS)[:3]),
                   help=f"comma-separated, of {', '.join(VARIANTS)} (default: the first three)")
    args = p.parse_args()

    out = Path(args.out)
    rows = []
    for name in args.variants.split(","):
        values = dict(VARIANTS[name])
        if values["run.algorithm"] == "ddp":
            values |= {"run.tokens": 10**9, "run.wall_seconds": args.ddp_wall_seconds}
        runs = [run_variant(f"{name}-{i}", out, values) for i in range(args.repeats)]
        rows.append((name, runs))

    lines = [
        "# Utilization with the defaults (4 sites, the demo link 2 Mbit/s / 50 ms)",
        "",
        f"Command: `{command_line()}`.  ",
        "Each run sets only the algorithm and the codec (and, for DiLoCo, overlap); H, tau and the rest are the",
        "defaults, and settings left unset are chosen by the run from its measured step time. 4 sites share the",
        "machine's 2 cores. `predicted` is the run's own `predicted_utilization` (the timing model with the run's",
        "measured compute per step and spread).",
        "",
        "| variant | runs | utilization median (range) | predicted median | eval loss median | tokens | chosen |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in rows:
        utils = [r["utilization"] for r in runs]
        preds = [r["predicted_utilization"] for r in runs if r.get("predicted_utilization") is not None]
        losses = [r["eval_loss"] for r in runs if r.get("eval_loss") is not None]
        chosen = sorted({f"{a['key'].rpartition('.')[2]}={a['value']}" for r in runs for a in r["auto_settings"]})
        lines.append(
            f"| {name} | {len(runs)} | {100 * statistics.median(utils):.1f}% ({100 * min(utils):.1f}-"
            f"{100 * max(utils):.1f}) | {100 * statistics.median(preds):.1f}% | "
            f"{statistics.median(losses):.4f} | {statistics.median(r['tokens'] for r in runs):,.0f} | "
            f"{', '.join(chosen) or '-'} |")
    reasons = {a["reason"] for _, runs in rows for r in runs for a in r["auto_settings"]}
    if reasons:
        lines += ["", "Why the runs chose what they chose (one line per distinct reason):", ""]
        lines += [f"- {reason}" for reason in sorted(reasons)]
    lines.append("")
    names = args.variants.split(",")
    write_result("defaults-utilization" if names == list(VARIANTS)[:3] else "defaults-utilization-" + "-".join(names),
                 "\n".join(lines))


if __name__ == "__main__":
    main()
