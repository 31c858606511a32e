"""SparseLoCo against DDP and DiLoCo at an equal token budget: eval loss and WAN bytes, and the Pareto front.

Issue 13's grid: DDP; for each H, DiLoCo with fp32 and int4 payloads, and ``sparseloco`` at densities 1%, 3%
and 10% with 2- and 4-bit values. Several seeds each; the tables quote medians. 4 sites train the demo GPT on
the standard-library corpus with no emulated link (the loss does not depend on the link, and bytes are counted
from the payloads either way). Each run is kept under ``--out`` (by sites, tokens and extra settings) and
read back when run again, so a study stopped midway resumes where it stopped.

    .venv/bin/python benchmarks/sparseloco_study.py                          # the whole grid: 8M tokens, 3 seeds
    .venv/bin/python benchmarks/sparseloco_study.py --grid pilot --tokens 2M --seeds 0
    .venv/bin/python benchmarks/sparseloco_study.py --grid diloco-fp32,sparseloco-d1-b2 --H 50
    .venv/bin/python benchmarks/sparseloco_study.py --grid diloco-fp32,sparseloco-d1-b2 --H 50 --tokens 8M,16M,32M

With several ``--tokens``, each budget is its own set of runs (compared with fp32 DiLoCo at the same budget and
H): longer runs at one H have more outer rounds, which separates the effect of the number of rounds from H's.

Writes ``benchmarks/results/DATE-sparseloco-study[-NAME].md`` and a ``.png`` beside it: eval loss against WAN
bytes, every variant's median, the front of the variants no other beats on both, and the paper's claim
(Sarfi et al., arXiv 2508.15706: a loss no worse than fp32 DiLoCo's with over 97x fewer bytes) marked.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from _common import command_line, run_variant, write_result

PAPER_FACTOR = 97.0
"""The paper's bytes claim against DiLoCo: over 97x fewer at a loss no worse than fp32 DiLoCo's."""


def grid(hs: list[int]) -> dict[str, dict[str, Any]]:
    """Every variant of the study by name (H in the name where it applies)."""
    out: dict[str, dict[str, Any]] = {"ddp": {"run.algorithm": "ddp"}}
    for h in hs:
        out[f"diloco-fp32-H{h}"] = {"run.algorithm": "diloco", "outer.sync_every": h}
        out[f"diloco-int4-H{h}"] = {"run.algorithm": "diloco", "outer.sync_every": h, "comm.codec": "int4"}
        for density in (1, 3, 10):
            for bits in (2, 4):
                out[f"sparseloco-d{density}-b{bits}-H{h}"] = {
                    "run.algorithm": "sparseloco", "outer.sync_every": h,
                    "sparseloco.density": density / 100, "sparseloco.bits": bits}
    return out


def select(variants: dict[str, dict[str, Any]], spec: str) -> dict[str, dict[str, Any]]:
    """``full``; ``pilot`` (fp32 DiLoCo and sparseloco at its defaults); or names with or without their
    ``-H<h>`` tail (``diloco-fp32,sparseloco-d1-b2``)."""
    if spec == "full":
        return variants
    wanted = ["diloco-fp32", "sparseloco-d1-b2"] if spec == "pilot" else [s.strip() for s in spec.split(",")]
    chosen = {k: v for k, v in variants.items() if k in wanted or k.rsplit("-H", 1)[0] in wanted}
    unknown = [w for w in wanted if not any(k == w or k.rsplit("-H", 1)[0] == w for k in variants)]
    if unknown:
        raise SystemExit(f"unknown variants {', '.join(unknown)}; known: {', '.join(variants)}")
    return chosen


def run_once(name: str, seed: int, out: Path, values: dict[str, Any]) -> dict[str, Any]:
    """The run's summary: read back when an earlier study finished it, else run now."""
    tag = f"{name}-s{seed}"
    done = out / tag / "summary.json"
    if done.exists():
        s = json.loads(done.read_text())
        if s.get("ok"):
            print(f"-- {tag}: kept from an earlier run", flush=True)
            return s
    return run_variant(tag, out, {**values, "run.seed": seed})


def _h(values: dict[str, Any]) -> int | None:
    return values.get("outer.sync_every")


def pareto(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the (bytes, loss) points no other point beats on both, by increasing bytes."""
    front, best = [], float("inf")
    for name, (b, loss) in sorted(points.items(), key=lambda kv: (kv[1][0], kv[1][1])):
        if loss < best:
            front.append(name)
            best = loss
    return front


def plot(path: Path, points: dict[str, tuple[float, float]], front: list[str], claims: dict[str, tuple[float, float]],
         title: str) -> None:
    """``claims``: per fp32 DiLoCo variant (its label), the point the paper's claim puts beside it."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5.5), dpi=120)
    ax = fig.add_subplot()
    colours = {"ddp": "black", "diloco-fp32": "tab:blue", "diloco-int4": "tab:cyan", "sparseloco": "tab:red"}
    for name, (b, loss) in points.items():
        family = next((f for f in colours if name.startswith(f)), "sparseloco")
        ax.scatter([b], [loss], color=colours[family], s=28, zorder=3)
        ax.annotate(name, (b, loss), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if front:
        ax.plot([points[n][0] for n in front], [points[n][1] for n in front], color="grey", lw=1, ls="--",
                label="Pareto front (no other variant has both fewer bytes and lower loss)")
    for i, (ref, (b, loss)) in enumerate(sorted(claims.items())):
        # The paper's claim at this H: fp32 DiLoCo's loss or lower, at 1/97 of its bytes or fewer.
        ax.scatter([b], [loss], marker="*", s=160, color="gold", edgecolor="black", zorder=4,
                   label="paper's claim: <= fp32 DiLoCo's loss at >= 97x fewer bytes" if i == 0 else None)
        ax.annotate(f"claim {ref.removeprefix('diloco-fp32-')}", (b, loss), fontsize=7, xytext=(-10, -12),
                    textcoords="offset points")
        ax.fill_between([b / 1000, b], [loss, loss], [loss * 0.9, loss * 0.9], color="gold", alpha=0.12, lw=0)
    ax.set_xscale("log")
    ax.set_xlabel("WAN bytes, all sites (log)")
    ax.set_ylabel("eval loss (median over seeds)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="8192000",
                   help="training tokens per run, all sites; comma-separated for several budgets (default 8,192,000)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--grid", default="full", help="full, pilot, or comma-separated variant names")
    p.add_argument("--H", default="25,50,100", help="comma-separated H values (default 25,50,100)")
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--out", default="runs/sparseloco-study")
    p.add_argument("--name", default="", help="suffix of the result files")
    p.add_argument("--set", action="append", default=[], help="extra KEY=VALUE for every run")
    args = p.parse_args()

    from geotrain.config import parse_count

    budgets = [parse_count(t, field_name="--tokens") for t in args.tokens.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    hs = [int(h) for h in args.H.split(",")]
    variants = select(grid(hs), args.grid)
    extra = dict(s.split("=", 1) for s in args.set)
    tail = "".join(f"-{k}={v}" for k, v in sorted(extra.items()))
    several = len(budgets) > 1
    t0 = time.time()
    # One entry per (token budget, variant); labelled with the budget when there are several.
    runs: dict[str, list[dict[str, Any]]] = {}
    where: dict[str, tuple[int, str]] = {}
    for tokens in budgets:
        common = {"run.sites": args.sites, "run.tokens": tokens, "wan.link": "none", **extra}
        # Runs are kept per number of sites, token budget and extra settings, so that studies of other sizes
        # never read each other's runs back.
        out = Path(args.out) / f"{args.sites}sites-{tokens}tokens{tail}".replace("/", "_")
        this_budget = {}
        for name, values in variants.items():
            label = f"{name}@{tokens / 1e6:g}M" if several else name
            where[label] = (tokens, name)
            runs[label] = this_budget[name] = [run_once(name, seed, out, {**common, **values}) for seed in seeds]
        (out / "study.json").write_text(json.dumps(
            {n: [{k: s.get(k) for k in ("eval_loss", "wan_bytes", "tokens", "seed", "codec", "algorithm",
                                         "payload_bytes_per_sync", "param_bytes", "outer_rounds", "wall_seconds")}
                 for s in rs] for n, rs in this_budget.items()}, indent=2))

    med = {n: (statistics.median(s["wan_bytes"] for s in rs), statistics.median(s["eval_loss"] for s in rs))
           for n, rs in runs.items()}

    def same_budget(label: str, name: str) -> str | None:
        """The label of variant ``name`` at ``label``'s token budget, if the study has it."""
        want = f"{name}@{where[label][0] / 1e6:g}M" if several else name
        return want if want in med else None

    budget_text = ", ".join(f"{t:,}" for t in budgets)
    lines = [
        f"# SparseLoCo study: {args.sites} sites, {budget_text} tokens, seeds {args.seeds}",
        "",
        f"Command: `{command_line()}`  ",
        f"Wall time of the runs, summed: {sum(s['wall_seconds'] for rs in runs.values() for s in rs):.0f} s "
        f"(this invocation: {time.time() - t0:.0f} s; runs kept from earlier ones are read back).",
        "Medians over the seeds. `loss / ref` and `bytes ref / x` compare with fp32 DiLoCo at the same H and token",
        "budget; `bits/param` is one site's payload per sync, header and scales included, over the parameters.",
        "",
        "| variant | tokens | H | outer rounds | eval loss | loss / ref | WAN bytes | bytes ref / x | bytes ddp / x "
        "| bits/param | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, rs in runs.items():
        b, loss = med[label]
        h = _h(variants[where[label][1]])
        ref_label = same_budget(label, f"diloco-fp32-H{h}") if h else None
        ref = med[ref_label] if ref_label else None
        ddp_label = same_budget(label, "ddp")
        ddp = med[ddp_label] if ddp_label else None
        s0 = rs[0]
        bits = 8 * s0["payload_bytes_per_sync"] / (s0["param_bytes"] / 4) if s0.get("param_bytes") else float("nan")
        cells = [label, f"{where[label][0]:,}", str(h or "—"), str(s0.get("outer_rounds", "—")), f"{loss:.4f}",
                 f"{loss / ref[1]:.4f}" if ref else "—", f"{b:,.0f}",
                 f"{ref[0] / b:.1f}" if ref and b else "—", f"{ddp[0] / b:.1f}" if ddp and b else "—",
                 f"{bits:.3f}", ", ".join(f"{s['eval_loss']:.4f}" for s in rs)]
        lines.append("| " + " | ".join(cells) + " |")
    front = pareto(med)
    claims = {}
    for label in med:
        tokens, name = where[label]
        if name.startswith("diloco-fp32-H"):
            claims[label] = (med[label][0] / PAPER_FACTOR, med[label][1])
    lines += ["", f"Pareto front (fewest bytes first): {', '.join(front)}.", ""]
    for ref_label, (b, loss) in claims.items():
        h = _h(variants[where[ref_label][1]])
        met = [n for n in med if where[n][1].startswith("sparseloco") and _h(variants[where[n][1]]) == h
               and where[n][0] == where[ref_label][0] and med[n][0] <= b and med[n][1] <= loss]
        at = f"H={h}" + (f", {where[ref_label][0]:,} tokens" if several else "")
        lines.append(f"- {at}: the paper's claim is a loss <= {loss:.4f} with <= {b:,.0f} bytes; "
                     + (f"met by {', '.join(met)}." if met else "met by no sparseloco variant here."))
    suffix = f"-{args.name}" if args.name else ""
    path = write_result(f"sparseloco-study{suffix}", "\n".join(lines) + "\n")
    plot(path.with_suffix(".png"), med, front, claims,
         f"eval loss against WAN bytes, {args.sites} sites, {budget_text} tokens (medians of seeds {args.seeds})")


if __name__ == "__main__":
    main()
