"""The plan of each shipped run file against the run itself: ``geotrain plan --config FILE`` at the file's own
scale, and ``geotrain run --config FILE`` as shipped (its link, its token budget unless --tokens).

For each file: payload bytes per sync (planned and measured: they must be equal), total WAN bytes (planned
and measured), and utilization: measured, and predicted by the timing model the planner uses, given the
run's measured compute per step and its spread (the run's own ``predicted_utilization``; a plan at the file's
own scale assumes H100s, so its utilization is not the CPU run's).

    .venv/bin/python benchmarks/plan_vs_run_bench.py [--tokens 1.6M] [--out runs/plan-vs-run]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

from _common import ROOT, command_line, write_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", help="train this many tokens instead of each file's budget")
    p.add_argument("--out", default="runs/plan-vs-run")
    args = p.parse_args()

    from geotrain.cli import main as geotrain

    configs = sorted(c for c in (ROOT / "configs").glob("*.toml") if not c.name.startswith("plan-"))
    tokens = ["--tokens", args.tokens] if args.tokens else []
    rows = []
    for path in configs:
        out = Path(args.out) / path.stem
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            if geotrain(["plan", "--config", str(path), *tokens, "--json"]) != 0:
                raise SystemExit(f"plan of {path} failed")
        planned = json.loads(buffer.getvalue())
        print(f"-- {path.name}: running", flush=True)
        if geotrain(["run", "--quiet", "--config", str(path), *tokens, "--out", str(out)]) != 0:
            raise SystemExit(f"run of {path} failed")
        ran = json.loads((out / "summary.json").read_text())
        rows.append((path.name, planned, ran))

    lines = [
        "# The plan of each shipped run file against its run",
        "",
        f"Command: `{command_line()}`.  ",
        "Planned: `geotrain plan --config FILE` at the file's own scale. Measured: `geotrain run --config FILE` as",
        "shipped, link included. Predicted utilization: the timing model with the run's measured compute per step",
        "and spread (summary.json's `predicted_utilization`).",
        "",
        "| file | steps (plan / run) | payload per sync (plan / run) | WAN bytes (plan / run) | utilization measured | predicted | difference (points) | chosen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, planned, ran in rows:
        chosen = ", ".join(f"{a['key'].rpartition('.')[2]}={a['value']}" for a in ran["auto_settings"]) or "-"
        predicted = ran["predicted_utilization"]
        lines.append(
            f"| {name} | {planned['steps']} / {ran['steps']} | {planned['payload_bytes_per_sync']:,} / "
            f"{ran['payload_bytes_per_sync']:,} | {planned['wan_bytes']:,.0f} / {ran['wan_bytes']:,} "
            f"({ran['wan_bytes'] / planned['wan_bytes']:.4f}) | {100 * ran['utilization']:.1f}% | "
            f"{100 * predicted:.1f}% | {100 * (predicted - ran['utilization']):+.1f} | {chosen} |")
    lines.append("")
    write_result("plan-vs-run", "\n".join(lines))


if __name__ == "__main__":
    main()
