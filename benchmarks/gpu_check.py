"""GPU check: does a real run work on this machine's GPU, and how fast is it?

On a machine with a CUDA device this runs ``geotrain run`` with 2 sites x 1 worker sharing the first GPU,
DiLoCo and the int4 codec, in bf16, for about a minute of training (``--wall-seconds``), then the same run in
fp32 for a shorter time for comparison. The model is a larger demo GPT (6 layers, d_model 512, seq_len 256,
batch 32: 19M parameters) on the built-in corpus (the interpreter's standard library: nothing is downloaded).
For each run it prints eval loss, utilization, tokens/s (trained tokens over training wall time) and the peak
GPU memory (``peak_memory_bytes`` in summary.json: the most any site's process allocated), and writes them, with
the machine (GPU, torch, CUDA), to ``benchmarks/results/YYYY-MM-DD-gpu-check.md``.

    make gpu-check
    .venv/bin/python benchmarks/gpu_check.py [--seconds 60] [--link 1gbit/30ms] [--out runs/gpu-check]
    .venv/bin/python benchmarks/gpu_check.py --cpu-smoke   # the same path, a tiny model on the CPU

Without a CUDA device (a CPU build of torch, or no GPU) it prints "gpu-check skipped: no CUDA device" and
exits 0, so that ``make gpu-check`` can sit in a pipeline that also runs on CPU machines; ``--cpu-smoke`` runs
the same steps with a tiny model on the CPU, to check the script's plumbing anywhere (the test suite does).
Exit codes: 0 every run finished with a finite eval loss (or skipped); 1 a run failed, timed out, wrote no
summary, or ended with a non-finite eval loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SETUP_SECONDS = 300
"""Time a run may take beyond its training time (start-up, corpus, kernel compilation, the final files)."""

GPU_MODEL = {"model.n_layer": 6, "model.n_head": 8, "model.d_model": 512, "model.seq_len": 256,
             "data.batch_size": 32}
TINY_MODEL = {"model.n_layer": 1, "model.n_head": 2, "model.d_model": 32, "model.seq_len": 32,
              "data.batch_size": 4, "run.eval_batches": 4}


@dataclasses.dataclass(kw_only=True, slots=True)
class Variant:
    """One run of the check."""

    name: str
    precision: str
    """fp32 or bf16 (--precision)."""
    seconds: float | None
    """Training wall time (--wall-seconds); None runs the whole token budget."""


def _run_args(v: Variant, *, cuda: bool, out: Path, args: argparse.Namespace) -> list[str]:
    model = GPU_MODEL if cuda else TINY_MODEL
    cmd = [sys.executable, "-m", "geotrain.cli", "run", "--quiet", "--overwrite", "--out", str(out / v.name),
           "--device", "cuda" if cuda else "cpu", "--sites", "2", "--workers-per-site", "1",
           "--algorithm", "diloco", "--codec", "int4", "--link", args.link, "--tokens", args.tokens,
           "--precision", v.precision,
           "--set", "checkpoint.every_rounds=0", *(f"--set={k}={json.dumps(x)}" for k, x in model.items())]
    if not cuda:
        cmd += ["--sync-every", "4"]
    if v.seconds is not None:
        cmd += ["--wall-seconds", f"{v.seconds:g}"]
    return cmd + list(args.extra)


def _run(v: Variant, cmd: list[str], out: Path) -> tuple[dict[str, Any] | None, str | None]:
    """Run one variant; (summary, None) or (summary or None, what went wrong)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH"))
                                                       if p)}
    print(f"-- {v.name}: {' '.join(shlex.quote(a) for a in cmd[1:])}", flush=True)
    timeout = (v.seconds or 0) + SETUP_SECONDS
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"{v.name}: did not finish within {timeout:g} s"
    path = out / v.name / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-20:])
        return summary, f"{v.name}: geotrain run exited {proc.returncode}:\n{tail}"
    if summary is None:
        return None, f"{v.name}: no {path}"
    if not summary.get("ok"):
        return summary, f"{v.name}: summary.json says the run failed: {summary.get('error')}"
    loss = summary.get("eval_loss")
    if not isinstance(loss, (int, float)) or not math.isfinite(loss):
        return summary, f"{v.name}: eval loss is {loss!r}, not a finite number"
    return summary, None


def _gib(n: Any) -> str:
    return f"{n / 2**30:.2f} GiB" if isinstance(n, (int, float)) else "n/a"


def _row(v: Variant, s: dict[str, Any]) -> dict[str, Any]:
    wall = s.get("wall_seconds") or 0.0
    peak = _gib(s["peak_memory_bytes"]) if s.get("peak_memory_bytes") is not None else "n/a (CPU)"
    return {"variant": v.name, "precision": s["precision"], "device": s["device"], "eval_loss": f"{s['eval_loss']:.4f}",
            "utilization": (f"{100 * s['utilization']:.1f}%" if isinstance(s.get("utilization"), (int, float))
                            else "n/a"),
            "tokens": f"{s.get('tokens', 0):,}", "wall_s": f"{wall:.1f}",
            "tokens_per_s": f"{s.get('tokens', 0) / wall:,.0f}" if wall else "n/a", "peak_gpu_memory": peak,
            "outer_rounds": s.get("outer_rounds")}


def _machine(cuda: bool) -> list[str]:
    import torch

    lines = [f"- torch {torch.__version__}, CUDA {torch.version.cuda or 'none (CPU build)'}, "
             f"Python {platform.python_version()}, {os.cpu_count()} CPUs"]
    if cuda:
        props = torch.cuda.get_device_properties(0)
        lines.insert(0, f"- GPU: {torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB), "
                        f"{torch.cuda.device_count()} visible")
    else:
        lines.insert(0, "- no GPU: --cpu-smoke (a tiny model on the CPU; figures say nothing about GPUs)")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="training time of the bf16 run (default %(default)s)")
    p.add_argument("--compare-seconds", type=float, default=20.0,
                   help="training time of the fp32 comparison run; 0 skips it (default %(default)s)")
    p.add_argument("--tokens", default="200M",
                   help="token budget, more than the time allows: --wall-seconds ends the runs (default %(default)s)")
    p.add_argument("--link", default="1gbit/30ms", help="emulated link between the two sites (default %(default)s)")
    p.add_argument("--out", default="runs/gpu-check", help="the runs' directories go under this (default %(default)s)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"),
                   help="where the dated result file is written (default benchmarks/results)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run the check's steps on the CPU with a tiny model and a few hundred steps' budget "
                        "(the bf16 run only: CPU autocast), to check the script itself")
    p.add_argument("extra", nargs="*", help="after --: more 'geotrain run' flags, e.g. -- --set optim.lr=1e-3")
    args = p.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        print(f"gpu-check skipped: no CUDA device (torch {torch.__version__}, "
              f"{'built for CUDA ' + torch.version.cuda if torch.version.cuda else 'a CPU build'}); "
              "run with --cpu-smoke to check the script on the CPU", flush=True)
        return 0
    if cuda:
        variants = [Variant(name="bf16-int4", precision="bf16", seconds=args.seconds)]
        if args.compare_seconds > 0:
            variants.append(Variant(name="fp32-int4", precision="fp32", seconds=args.compare_seconds))
    else:  # the same steps, tiny: a token budget rather than a minute
        args.tokens, args.link = "4096", "none"
        variants = [Variant(name="cpu-smoke", precision="bf16", seconds=None)]  # CPU autocast: the same path

    out = Path(args.out)
    started = time.time()
    rows, errors, commands = [], [], []
    for v in variants:
        cmd = _run_args(v, cuda=cuda, out=out, args=args)
        commands.append(" ".join(shlex.quote(a) for a in ["geotrain", *cmd[3:]]))
        summary, error = _run(v, cmd, out)
        if error is not None:
            print(f"error: {error}", file=sys.stderr, flush=True)
            errors.append(error)
            continue
        rows.append(_row(v, summary))

    columns = ["variant", "precision", "device", "eval_loss", "utilization", "tokens", "wall_s", "tokens_per_s",
               "peak_gpu_memory", "outer_rounds"]
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    table += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    print("\n".join(table), flush=True)

    what = "gpu-check" if cuda else "gpu-check-cpu-smoke"
    command = " ".join(shlex.quote(a) for a in ["python", "benchmarks/gpu_check.py", *(argv or sys.argv[1:])])
    body = [f"# GPU check: 2 sites x 1 worker on one GPU, DiLoCo, int4{'' if cuda else ' (CPU smoke run)'}", "",
            f"Command: `{command}`"
            f", started {datetime.datetime.fromtimestamp(started).isoformat(timespec='seconds')}, "
            f"{time.time() - started:.0f} s in all.", "", "Machine:", "", *_machine(cuda), "",
            "Runs (the two sites share the device; tokens/s is trained tokens over training wall time, "
            "utilization the mean over sites of compute time over wall time):", "",
            *[f"- `{c}`" for c in commands], "", *table, ""]
    if errors:
        body += ["Errors:", "", *[f"```\n{e}\n```" for e in errors], ""]
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{datetime.date.today().isoformat()}-{what}.md"
    path.write_text("\n".join(body), encoding="utf-8")
    print(f"wrote {path}", flush=True)
    if errors:
        print(f"gpu-check FAILED: {len(errors)} of {len(variants)} runs", file=sys.stderr, flush=True)
        return 1
    print(f"gpu-check passed: {len(rows)} runs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
