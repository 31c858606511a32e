"""How fast does ``geotrain plan`` answer? (issue 4, acceptance E: one plan < 2 s, a 100-point sweep < 30 s)

Measures, as medians of several repeats on this machine:

* in process: building and planning one plan; a 100-point bandwidth sweep of the four algorithms; the
  bandwidth-for-95% bisection; a simulation of the worked example with failures;
* end to end: a fresh Python process that runs the ``plan`` subcommand (interpreter start and imports included),
  for one plan and for a 100-point sweep with its plot.

    .venv/bin/python benchmarks/planner_speed_bench.py [--repeats 5] [--out results.md]

Prints a markdown table (and writes it to --out when given).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from geotrain.planner.cli import add_parser, plan_output
from geotrain.planner.config import plan_inputs

WORLD = ["--model-params", "70b", "--tokens", "15t", "--batch-tokens", "16m", "--seq-len", "8192", "--sites", "3",
         "--power-cap", "300", "--accelerators-per-site", "16384", "--link", "10gbit/30ms", "--codec", "int4",
         "--sync-every", "500"]

# A child process runs the subcommand exactly as geotrain's main would, through add_parser and run.
_CHILD = """
import argparse, sys
from geotrain.planner.cli import add_parser
p = argparse.ArgumentParser(prog="geotrain"); add_parser(p.add_subparsers(dest="command", required=True))
a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))
"""


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="geotrain")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["plan", *argv])


def in_process(argv: list[str]) -> float:
    start = time.perf_counter()
    args = _args(argv)
    plan_output(plan_inputs(None, args))
    return time.perf_counter() - start


def end_to_end(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", _CHILD, "plan", *argv, "--json"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def median_of(fn, argv: list[str], repeats: int) -> float:
    return statistics.median(fn(argv) for _ in range(repeats))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", help="also write the markdown table here")
    opts = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        png = str(Path(tmp) / "sweep.png")
        cases = [
            ("one plan", in_process, WORLD, 2.0),
            ("one plan + --compare", in_process, [*WORLD, "--compare"], 2.0),
            ("bandwidth for 95% (5 bisections)", in_process, [*WORLD, "--target-utilization", "0.95"], 2.0),
            ("100-point sweep x 4 algorithms", in_process, [*WORLD, "--sweep", "100mbit:1tbit:100"], 30.0),
            ("simulation, MTBF 24 h, jitter 0.05", in_process,
             [*WORLD, "--simulate", "--mtbf-hours", "24", "--jitter", "0.05"], 2.0),
            ("fresh process: one plan", end_to_end, WORLD, 2.0),
            ("fresh process: 100-point sweep + plot", end_to_end,
             [*WORLD, "--sweep", "100mbit:1tbit:100", "--plot", png], 30.0),
        ]
        rows = []
        for name, fn, argv, limit in cases:
            fn(argv)  # warm caches (imports, font cache for the plot)
            seconds = median_of(fn, argv, opts.repeats)
            rows.append((name, seconds, limit))

    lines = [
        f"# geotrain plan speed ({dt.date.today().isoformat()})",
        "",
        f"Machine: {platform.machine()}, Python {platform.python_version()}, medians of {opts.repeats} runs.",
        "Command: `.venv/bin/python benchmarks/planner_speed_bench.py"
        + (f" --repeats {opts.repeats}" if opts.repeats != 5 else "") + "`",
        "Scenario: 70B, 15T tokens, 3 sites x 16,384 H100, 10 Gbit/s / 30 ms links, diloco H=500, int4.",
        "",
        "| case | median seconds | goal (s) | ok |",
        "|---|---:|---:|---|",
    ]
    for name, seconds, limit in rows:
        lines.append(f"| {name} | {seconds:.3f} | {limit:g} | {'yes' if seconds < limit else 'NO'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if opts.out:
        Path(opts.out).write_text(text)
    return 0 if all(s < limit for _, s, limit in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
