"""A site killed in the middle of a round and started again: what it costs, against model size.

For each model size (``--sizes``, d_model x n_layer of the demo GPT), 4 sites of DiLoCo train the same token
budget with the same seed twice: once without faults, once with ``--fault kill:1@K --fault rejoin:1@R``
(site 1 SIGKILLed in the middle of outer round K, started again in the middle of round R, healed from a live
peer at the next round boundary). Every run is a ``geotrain run`` subprocess with a time limit; every figure
comes from the files the runs wrote:

* **loss ratio**: the faulted run's final ``eval_loss`` over the fault-free run's, with the tokens each
  actually trained (a killed site trains nothing while it is down; the budget is the same number of inner
  steps for the survivors, so the run trains fewer tokens in all);
* **detection**: from the kill (``faults.jsonl``: the launcher's ``time`` of the SIGKILL) to the coordinator's
  ``left`` event for that site (``membership.jsonl``). Both are ``time.time()`` on this machine; the script
  also checks that ``summary.json``'s ``wall`` of the two (relative to the run's start) gives the same
  difference;
* **re-forming**: ``regroup_seconds`` of the survivors' ``membership`` records (building the new
  generation's gloo group), and the syncs tried again (``retry`` records) if the kill hit a sync;
* **healing**: the ``healed`` event's ``seconds`` (the state transfer into the joiner) and ``bytes``; beside
  it the healer's whole admission (``admitted`` record: new group, packing, sending) and the time from the
  ``rejoin`` to the admission (process start, and waiting for the round boundary).

    PYTHONPATH=src python benchmarks/faults_bench.py [--sizes 64x2,128x2,256x2] [--repeats 2]

Runs go one after another, never in parallel. Writes benchmarks/results/DATE-faults.md and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import RESULTS, command_line, write_result


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _geotrain_run(args: list[str], *, timeout_s: float) -> tuple[int, float]:
    """``geotrain run ARGS`` in its own session, bounded: SIGTERM at the limit (the launcher then stops its
    sites and coordinator), SIGKILL if it has not ended 30 s later. Returns (exit code, seconds)."""
    cmd = [sys.executable, "-m", "geotrain.cli", "run", *args]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print(f"   time limit of {timeout_s:g} s reached; stopping the run", flush=True)
        proc.send_signal(signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
    if proc.returncode != 0:
        print(output[-3000:], flush=True)
    return proc.returncode, time.monotonic() - t0


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fault_figures(out: Path, *, site: int, sites: int) -> dict[str, Any]:
    """Detection, re-forming and healing of ``site``'s kill and rejoin, from the run's files."""
    summary = json.loads((out / "summary.json").read_text())
    faults = _read_jsonl(out / "faults.jsonl")
    events = _read_jsonl(out / "membership.jsonl")
    records = {k: _read_jsonl(out / "sites" / f"site{k}.jsonl") for k in range(sites)}
    kill = next(f for f in faults if f["action"] == "kill" and f["site"] == site)
    rejoin = next((f for f in faults if f["action"] == "rejoin" and f["site"] == site), None)
    left = min((e for e in events if e["kind"] == "left" and e["site"] == site), key=lambda e: abs(e["time"] - kill["time"]))
    detection = left["time"] - kill["time"]
    # the same difference from summary.json, where both are seconds since the run started
    s_kill = next(f for f in summary["faults"] if f["action"] == "kill" and f["site"] == site)
    s_left = min((e for e in summary["membership"] if e["kind"] == "left" and e["site"] == site),
                 key=lambda e: abs(e["wall"] - s_kill["wall"]))
    summary_detection = s_left["wall"] - s_kill["wall"]
    due = [r for k in records for r in records[k] if r.get("kind") == "fault_due" and r.get("fault") == kill["spec"]]
    regroups = [r for k in records if k != site for r in records[k]
                if r.get("kind") == "membership" and site in (r.get("left") or [])]
    retries = [r for k in records if k != site for r in records[k] if r.get("kind") == "retry"]
    healed = next((e for e in events if e["kind"] == "healed" and e["site"] == site), None)
    rejoined = next((e for e in events if e["kind"] == "rejoined" and e["site"] == site), None)
    admitted = [r for k in records if k != site for r in records[k] if r.get("kind") == "admitted"]
    healer_admission = next((r["seconds"] for r in admitted if r["site"] == r.get("healer")), None)
    others_admission = [r["seconds"] for r in admitted if r["site"] != r.get("healer")]
    sync_checks = {r.get("params_sha256") for k in records for r in records[k] if r.get("kind") == "sync_check"}
    return {
        "kill_step": min((r["step"] for r in due), default=None),
        "detection_s": detection,
        "kill_carry_out_s": kill.get("carry_out_seconds"),
        "summary_detection_s": summary_detection,
        "left_reason": left.get("reason"),
        "regroup_s": _median([r["regroup_seconds"] for r in regroups]),
        "regroup_all": [r["regroup_seconds"] for r in regroups],
        "regroup_sync": regroups[0]["sync"] if regroups else None,
        "retries": len(retries),
        "failed_attempts": sum(int(p.get("failed_attempts") or 0) for p in summary["per_site"]),
        "heal_s": None if healed is None else healed.get("seconds"),
        "heal_bytes": None if healed is None else healed.get("bytes"),
        "heal_wait_s": None if healed is None else healed.get("wait_seconds"),
        "heal_step": None if healed is None else healed.get("step"),
        "rejoin_to_admit_s": None if rejoined is None or rejoin is None else rejoined["time"] - rejoin["time"],
        "healer_admission_s": healer_admission,
        "others_admission_s": _median(others_admission),
        "in_sync_after_heal": len(sync_checks) == 1 if sync_checks else None,
    }


def _evals(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["eval_loss"]) for r in _read_jsonl(out / "sites" / "site0.jsonl")
            if r.get("kind") == "eval" and r.get("eval_loss") is not None]


def _run_figures(run_out: Path) -> dict[str, Any]:
    """What the loss table needs from one run's summary."""
    summary = json.loads((run_out / "summary.json").read_text())
    return {"eval_loss": summary["eval_loss"], "tokens": summary["tokens"], "params": summary["model_params"],
            "elapsed_seconds": summary["elapsed_seconds"], "wall_seconds": summary["wall_seconds"],
            "steps": summary["steps"], "outer_rounds": summary["outer_rounds"], "evals": _evals(run_out),
            "site_tokens": [s.get("tokens") for s in summary["per_site"]],
            "site_steps_trained": [s.get("steps_trained") for s in summary["per_site"]],
            "sites_in_sync": summary.get("sites_in_sync")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="64x2,128x2,256x2", help="comma-separated d_model x n_layer of the demo GPT")
    p.add_argument("--repeats", type=int, default=2, help="pairs (fault-free, faulted) per size")
    p.add_argument("--tokens", default="800k", help="token budget of every run")
    p.add_argument("--sync-every", type=int, default=10)
    p.add_argument("--kill-round", type=int, default=3)
    p.add_argument("--rejoin-round", type=int, default=6)
    p.add_argument("--site", type=int, default=1, help="the site killed and started again")
    p.add_argument("--link", default="100mbit/20ms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds each run may take before it is stopped")
    p.add_argument("--out", default="runs/faults")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: write the report again from the runs already in --out (same other arguments)")
    args = p.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    out = Path(args.out)

    common = ["--sites", "4", "--algorithm", "diloco", "--sync-every", str(args.sync_every), "--no-overlap",
              "--tokens", args.tokens, "--link", args.link, "--seed", str(args.seed), "--quiet"]
    faults = ["--fault", f"kill:{args.site}@{args.kill_round}", "--fault", f"rejoin:{args.site}@{args.rejoin_round}"]
    plan = []  # (d_model, n_layer, repeat, variant, run directory, arguments), in the order they run
    for d_model, n_layer in sizes:
        model = ["--set", f"model.d_model={d_model}", "--set", f"model.n_layer={n_layer}"]
        for repeat in range(1, args.repeats + 1):
            for variant, extra in (("base", []), ("fault", faults)):
                run_out = out / f"d{d_model}-l{n_layer}-{variant}-r{repeat}"
                plan.append((d_model, n_layer, repeat, variant, run_out, [*common, *model, *extra, "--out", str(run_out)]))
    commands = ["geotrain run " + " ".join(shlex.quote(a) for a in run_args) for *_, run_args in plan]

    if args.report_only:
        meta = json.loads((out / "bench.json").read_text())
    else:
        meta = {"command": command_line(), "load_start": os.getloadavg(), "started": time.time()}
        for d_model, n_layer, repeat, variant, run_out, run_args in plan:
            print(f"-- d_model={d_model} n_layer={n_layer} {variant} (repeat {repeat}): {run_out}", flush=True)
            code, seconds = _geotrain_run(run_args, timeout_s=args.timeout)
            summary = json.loads((run_out / "summary.json").read_text()) if (run_out / "summary.json").is_file() else {}
            if code != 0 or not summary.get("ok"):
                raise SystemExit(f"{run_out} failed (exit {code}): {summary.get('error')}")
            msg = (f"   eval_loss {summary['eval_loss']:.4f}  tokens {summary['tokens']:,}  "
                   f"params {summary['model_params']:,}  {seconds:.0f} s  load {os.getloadavg()[0]:.1f}")
            if variant == "fault":
                f = _fault_figures(run_out, site=args.site, sites=4)
                base = _run_figures(out / f"d{d_model}-l{n_layer}-base-r{repeat}")
                msg += (f"\n   loss ratio {summary['eval_loss'] / base['eval_loss']:.4f}  "
                        f"detection {1000 * f['detection_s']:.1f} ms  regroup {1000 * (f['regroup_s'] or 0):.1f} ms"
                        f"  heal {f['heal_s'] if f['heal_s'] is None else round(f['heal_s'], 3)} s "
                        f"({f['heal_bytes']} bytes)")
            print(msg, flush=True)
        meta |= {"load_end": os.getloadavg(), "total_seconds": time.time() - meta["started"]}
        (out / "bench.json").write_text(json.dumps(meta))

    rows: list[dict[str, Any]] = []
    for d_model, n_layer, repeat, variant, run_out, _ in plan:
        if variant == "base":
            rows.append({"d_model": d_model, "n_layer": n_layer, "repeat": repeat, "base": _run_figures(run_out)})
        else:
            rows[-1]["fault"] = _run_figures(run_out) | _fault_figures(run_out, site=args.site, sites=4)
    (out / "faults.json").write_text(json.dumps(rows, indent=2))
    _write(rows, args, commands, meta)


def _write(rows: list[dict[str, Any]], args: Any, commands: list[str], meta: dict[str, Any]) -> None:
    sizes: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for r in rows:
        sizes.setdefault((r["d_model"], r["n_layer"]), []).append(r)

    def med(values: list[float | None], scale: float = 1.0, fmt: str = "{:.1f}") -> str:
        values = [v for v in values if v is not None]
        if not values:
            return "—"
        m = statistics.median(values)
        if len(values) == 1:
            return fmt.format(scale * m)
        return f"{fmt.format(scale * m)} ({fmt.format(scale * min(values))}-{fmt.format(scale * max(values))})"

    lines = [
        "# A site killed mid-round and rejoined: loss, detection, re-forming and healing against model size",
        "",
        f"Command: `{meta['command']}`  ",
        f"4 sites of DiLoCo (H={args.sync_every}, no overlap, fp32), link {args.link}, token budget {args.tokens}, "
        f"seed {args.seed}; the faulted run adds `--fault kill:{args.site}@{args.kill_round} --fault "
        f"rejoin:{args.site}@{args.rejoin_round}`. {args.repeats} pair(s) per size, each pair run back to back; "
        f"median (min-max) where there is more than one. Total {meta['total_seconds'] / 60:.0f} min; load "
        f"average (1/5/15 min) {'/'.join(f'{v:.1f}' for v in meta['load_start'])} at the start and "
        f"{'/'.join(f'{v:.1f}' for v in meta['load_end'])} at the end on {os.cpu_count()} CPUs, shared with "
        "other work (test suites, other benchmarks) while it ran: times are from a loaded machine.",
        "",
        "## Loss",
        "",
        "| d_model x layers | params | eval loss, no faults | eval loss, kill+rejoin | ratio (target <= 1.03) | "
        "tokens trained, no faults | tokens trained, faulted | steps trained per site, faulted (the killed site: "
        "since its healing) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (d, n), rs in sizes.items():
        ratios = [r["fault"]["eval_loss"] / r["base"]["eval_loss"] for r in rs]
        steps = "; ".join("/".join(str(s) for s in r["fault"]["site_steps_trained"]) for r in rs)
        lines.append(
            f"| {d} x {n} | {rs[0]['base']['params']:,} | {med([r['base']['eval_loss'] for r in rs], fmt='{:.4f}')} | "
            f"{med([r['fault']['eval_loss'] for r in rs], fmt='{:.4f}')} | {med(ratios, fmt='{:.4f}')} | "
            f"{med([r['base']['tokens'] for r in rs], fmt='{:,.0f}')} | "
            f"{med([r['fault']['tokens'] for r in rs], fmt='{:,.0f}')} | {steps} |")
    lines += [
        "",
        "## Detection, re-forming, healing",
        "",
        "Detection: kill (`faults.jsonl` time of the SIGKILL) to the coordinator's `left` event; SIGKILL to reaped: "
        "how long the launcher waited for the killed process to end (`carry_out_seconds`): its sockets close, and "
        "the coordinator sees the site go, only as it exits. Re-forming: "
        "`regroup_seconds` of the survivors' `membership` records (median over survivors, then over repeats). "
        "Healing: the `healed` event's `seconds` (state transfer into the joiner) and `bytes`; healer admission: "
        "the healer's whole `admitted` step (new group, pack, send); rejoin to admission: from the `rejoin` fault "
        "to the coordinator's `rejoined` event (process start, join, waiting for the round boundary).",
        "",
        "| d_model x layers | params | detection (ms) | summary.json check (ms) | SIGKILL to reaped (ms) | "
        "re-forming (ms) | sync retries | healing (s) | state bytes | healer admission (s) | "
        "other survivors' admission (ms) | rejoin to admission (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (d, n), rs in sizes.items():
        f = [r["fault"] for r in rs]
        lines.append(
            f"| {d} x {n} | {rs[0]['base']['params']:,} | {med([x['detection_s'] for x in f], 1000)} | "
            f"{med([x['summary_detection_s'] for x in f], 1000)} | {med([x['kill_carry_out_s'] for x in f], 1000)} | "
            f"{med([x['regroup_s'] for x in f], 1000)} | "
            f"{', '.join(str(x['retries']) for x in f)} | {med([x['heal_s'] for x in f], fmt='{:.2f}')} | "
            f"{med([x['heal_bytes'] for x in f], fmt='{:,.0f}')} | {med([x['healer_admission_s'] for x in f], fmt='{:.2f}')} | "
            f"{med([x['others_admission_s'] for x in f], 1000)} | {med([x['rejoin_to_admit_s'] for x in f], fmt='{:.1f}')} |")
    lines += [
        "",
        "Per run (faulted): the inner step at which the kill was due, the sync whose quorum saw the site gone, "
        "the step the joiner was healed at, whether all sites held the same model at the first sync after the "
        "admission (`sync_check`), and the eval losses of the two runs of the pair up to the kill.",
        "",
        "| d_model x layers | repeat | kill due at step | re-formed at sync | healed at step | sites in sync after heal | "
        "evals before the kill identical | left reason |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (d, n), rs in sizes.items():
        for r in rs:
            f = r["fault"]
            kill_step = f["kill_step"] if f["kill_step"] is not None else -1
            before = [(s, v) for s, v in r["base"]["evals"] if s < kill_step]
            after = [(s, v) for s, v in r["fault"]["evals"] if s < kill_step]
            same = "yes" if before == after and before else ("no evals before" if not before else "no")
            lines.append(f"| {d} x {n} | {r['repeat']} | {f['kill_step']} | {f['regroup_sync']} | {f['heal_step']} | "
                         f"{f['in_sync_after_heal']} | {same} | {f['left_reason']} |")
    lines += ["", "Eval loss along the runs (repeat 1; site 0's `eval` records, by inner step): the pair agrees to the "
              "last digit until the kill, then the faulted run trains with 3 sites until the rejoined one is healed.",
              "", "| step | " + " | ".join(f"{d} x {n}: no faults | {d} x {n}: faulted" for d, n in sizes) + " |",
              "|---|" + "---|---|" * len(sizes)]
    curves = [(dict(map(tuple, rs[0]["base"]["evals"])), dict(map(tuple, rs[0]["fault"]["evals"])))
              for rs in sizes.values()]
    for step in sorted({s for b, f in curves for s in (*b, *f)}):
        cells = [f"{c[step]:.4f}" if step in c else "—" for b, f in curves for c in (b, f)]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    png = _plot(sizes, args)
    lines += ["", f"![times against model size]({png.name})", "", "Commands (in order):", "", "```"]
    lines += commands
    lines += ["```", ""]
    write_result("faults", "\n".join(lines))


def _plot(sizes: dict[tuple[int, int], list[dict[str, Any]]], args: Any) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=120)
    ax = fig.add_subplot()
    xs = [rs[0]["base"]["params"] for rs in sizes.values()]
    for key, label in (("detection_s", "detection (kill to left event)"),
                       ("regroup_s", "re-forming (regroup_seconds)"),
                       ("heal_s", "healing (healed event seconds)")):
        values = [[r["fault"][key] for r in rs if r["fault"][key] is not None] for rs in sizes.values()]
        mid = [statistics.median(v) for v in values]
        ax.errorbar(xs, mid, yerr=[[m - min(v) for m, v in zip(mid, values)], [max(v) - m for m, v in zip(mid, values)]],
                    marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model parameters")
    ax.set_ylabel("seconds")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title(f"4 sites, DiLoCo H={args.sync_every}, link {args.link}: site {args.site} killed in round "
                 f"{args.kill_round}, rejoined in round {args.rejoin_round}", fontsize=9)
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / f"{time.strftime('%Y-%m-%d')}-faults.png"
    fig.savefig(png, bbox_inches="tight")
    return png


if __name__ == "__main__":
    main()
