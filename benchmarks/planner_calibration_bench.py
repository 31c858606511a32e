"""Planner calibration: predicted against measured utilization of geotrain's own emulated runs.

For each run the timing model the planner uses (``geotrain.algorithms.timing``, through
``geotrain.summary.predict_from_summary``, which also writes every run's ``predicted_utilization``) gets the
run's configuration (algorithm, H, fragments, overlap and tau as the run chose them, codec payloads, link) and
the run's measured compute time per inner step, and predicts utilization; the run's summary.json holds the
measured figure. By default it reads the runs written by utilization_bench.py (ddp, diloco and streaming
at several bandwidths); --run-missing runs six short ones itself.

    .venv/bin/python benchmarks/planner_calibration_bench.py [--runs runs/utilization]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import command_line, run_variant, write_result

SIX = {
    "ddp-50mbit": {"run.algorithm": "ddp", "wan.link": "50mbit/10ms"},
    "ddp-250mbit": {"run.algorithm": "ddp", "wan.link": "250mbit/10ms"},
    "diloco-2mbit": {"run.algorithm": "diloco", "outer.sync_every": 25, "wan.link": "2mbit/10ms"},
    "diloco-10mbit": {"run.algorithm": "diloco", "outer.sync_every": 25, "wan.link": "10mbit/10ms"},
    "streaming-2mbit": {"run.algorithm": "streaming", "outer.sync_every": 25, "streaming.fragments": 4,
                        "streaming.overlap_steps": 5, "comm.codec": "int4", "wan.link": "2mbit/10ms"},
    "streaming-10mbit": {"run.algorithm": "streaming", "outer.sync_every": 25, "streaming.fragments": 4,
                         "streaming.overlap_steps": 5, "comm.codec": "int4", "wan.link": "10mbit/10ms"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["runs/utilization"],
                   help="directories of run directories to calibrate against")
    p.add_argument("--run-missing", action="store_true", help="run the six default runs into --runs first")
    p.add_argument("--wall-seconds", type=float, default=30.0)
    args = p.parse_args()

    from geotrain.summary import measured_jitter, measured_step_seconds, predict_from_summary

    roots = [Path(r) for r in args.runs]
    root = roots[0]
    if args.run_missing:
        for name, values in SIX.items():
            if not (root / name / "summary.json").is_file():
                run_variant(name, root, {"run.sites": 4, "run.tokens": 10**9, "run.wall_seconds": args.wall_seconds,
                                         "run.eval_every_tokens": 10**9, **values})
    rows = []
    for summary_path in sorted(p for r in roots for p in r.glob("*/summary.json")):
        s = json.loads(summary_path.read_text())
        if not s.get("ok") or s.get("link") == "none":
            continue
        timing = predict_from_summary(s)
        if timing is None:
            continue
        steps = measured_step_seconds(s, per_site=True)
        rows.append((f"{summary_path.parent.parent.name}/{summary_path.parent.name}", s, {
            "step_seconds": sum(steps) / len(steps), "slowest_step_seconds": max(steps), "jitter": measured_jitter(s),
            "predicted_utilization": timing.utilization, "measured_utilization": s["utilization"],
            "difference_points": 100 * (timing.utilization - s["utilization"])}))
    if not rows:
        raise SystemExit(f"no finished emulated runs under {', '.join(map(str, roots))}; run utilization_bench.py "
                         "or pass --run-missing")
    lines = [
        "# Planner calibration: predicted vs measured utilization",
        "",
        f"Command: `{command_line()}` over the runs in {', '.join(f'`{r}`' for r in roots)}.  ",
        "Prediction input: the run's configuration, each site's measured compute seconds per inner step (the",
        "slowest gates every synchronous point) and the spread of compute time between sync points (jitter: standard",
        "deviation over mean, mean over sites), which blocking syncs pay for. Runs written before summaries carried",
        "`round_compute_cv` are predicted without jitter.",
        "",
        "| run | algorithm | codec | sites | link | steps | step s (mean / slowest) | jitter | predicted | measured | difference (points) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    worst = 0.0
    for name, s, pred in rows:
        d = pred["difference_points"]
        worst = max(worst, abs(d))
        lines.append(f"| {name} | {s['algorithm']} | {s['codec']} | {s['sites']} | {s['link']} | {s['steps']} | "
                     f"{pred['step_seconds']:.3f} / {pred['slowest_step_seconds']:.3f} | {pred['jitter']:.3f} | "
                     f"{100 * pred['predicted_utilization']:.1f}% | "
                     f"{100 * pred['measured_utilization']:.1f}% | {d:+.1f} |")
    within = sum(abs(r[2]["difference_points"]) <= 5 for r in rows)
    lines += ["", f"{within} of {len(rows)} runs within 5 points; largest difference {worst:.1f} points.", ""]
    write_result("planner-calibration", "\n".join(lines))


if __name__ == "__main__":
    main()
