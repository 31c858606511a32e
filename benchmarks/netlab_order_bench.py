"""Announcement order: one sync's real time in the network lab with gloo's own collectives against geotrain's.

gloo sends a message only after its receiver has announced the buffer, and that announcement travels on the
same TCP connection as the data going the other way. gloo's all-gather and all-to-all post a send before the
matching receive; geotrain's transport (``GlooTransport``) posts every receive first. When a site reaches the
sync more than one link latency after its peer, the peer's announcement is already in, so under gloo's order
the late site writes its payload before its own announcement, which then waits behind up to a socket buffer of
data. This script measures both orders side by side, with every site on time and with the last site
``--skew`` seconds late, alternating between them round after round (``--rounds``), each lab keeping its
connections for ``--repeats`` syncs (``benchmarks/netlab_bench.py``'s worker). ``--pacing``: how the
kernel paces the connections, as a run's ``comm.tcp_pacing`` (the timings kept before geotrain paced were
taken without). Root only.

    sudo .venv/bin/python benchmarks/netlab_order_bench.py [--sites 2,4] [--link 10mbit/50ms]
        [--payloads 256kb,4mb] [--skews 0,0.1] [--rounds 2] [--repeats 3] [--gap 1] [--raw FILE]
        [--pacing link|uncapped|off]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from netlab_bench import COLLECTIVES, _pattern, _span, add_pacing_argument, emulated_seconds, measure  # noqa: E402


def summarise(rows: list[dict]) -> list[dict]:
    """Median sync time per (sites, payload, skew, collectives) over every round's repeats."""
    groups: dict[tuple, dict[tuple, list[dict]]] = {}
    for r in rows:
        key = (r["sites"], r["link"], r["bytes"], r["pattern"], r["skew"], r["collectives"])
        groups.setdefault(key, {}).setdefault((r["round"], r["repeat"]), []).append(r)
    table = []
    for (k, link, nbytes, pattern, skew, collectives), syncs in sorted(groups.items()):
        spans = [_span(v) for v in syncs.values() if len(v) == k]
        table.append({"sites": k, "link": link, "bytes": nbytes, "pattern": pattern, "skew": skew,
                      "collectives": collectives, "real": statistics.median(spans), "lo": min(spans),
                      "hi": max(spans), "n": len(spans), "emulated": emulated_seconds(k, nbytes, link, pattern)})
    return table


def write(table: list[dict], args: argparse.Namespace, command: str, write_result) -> None:
    lines = [
        "# Network lab: the order of announcements and sends",
        "",
        f"Command: `{command}`  ",
        f"One namespace per site, every pair over {args.link} (the lab's router, queue one round-trip BDP). Before "
        f"each sync every site idles {args.gap:g} s; with a skew, the last site idles that much longer. Median "
        "over every round's repeats of the time from the last site's call to the last site's result; the orders "
        "alternate round by round in the same run. gloo: gloo's own all-gather and all-to-all (a send posted "
        "before its receive). geotrain: `GlooTransport` (every receive announced first). Emulated: what the WAN "
        "emulator and the planner charge the sync.",
        "",
        "| sites | payload | last site late by | collectives | syncs | real median (s) | min-max (s) | emulated (s) "
        "| real / emulated | gloo / geotrain |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        twin = next((t for t in table if t["collectives"] != r["collectives"] and
                     (t["sites"], t["bytes"], t["skew"]) == (r["sites"], r["bytes"], r["skew"])), None)
        ratio = ""
        if twin is not None and r["collectives"] == "gloo":
            ratio = f"{r['real'] / twin['real']:.2f}"
        lines.append(f"| {r['sites']} | {r['bytes']:,} B | {r['skew'] * 1000:g} ms | {r['collectives']} | {r['n']} | "
                     f"{r['real']:.3f} | {r['lo']:.3f}-{r['hi']:.3f} | {r['emulated']:.3f} | "
                     f"{r['real'] / r['emulated']:.2f} | {ratio} |")
    path = write_result("netlab-gloo-announcement-order" + (f"-{args.name}" if args.name else ""),
                        "\n".join(lines) + "\n")
    plot(table, path.with_suffix(".png"))


def plot(table: list[dict], path: Path) -> None:
    """Real / emulated per configuration: gloo's order and geotrain's side by side, a bar at the median with
    the min-max as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys((r["sites"], r["bytes"], r["skew"]) for r in table))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(configs)), 4.5))
    width = 0.38
    for j, collectives in enumerate(COLLECTIVES):
        rows = {(r["sites"], r["bytes"], r["skew"]): r for r in table if r["collectives"] == collectives}
        here = [(i, rows[c]) for i, c in enumerate(configs) if c in rows]
        ys = [r["real"] / r["emulated"] for _, r in here]
        lo = [y - r["lo"] / r["emulated"] for y, (_, r) in zip(ys, here)]
        hi = [r["hi"] / r["emulated"] - y for y, (_, r) in zip(ys, here)]
        ax.bar([i + (j - 0.5) * width for i, _ in here], ys, width, yerr=[lo, hi], capsize=3, color=f"C{j}",
               label=f"{collectives} (median, min-max)")
    ax.axhspan(0.9, 1.1, color="green", alpha=0.08)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels([f"{k} sites\n{b / 2**20:g} MiB\nlate {s * 1000:g} ms" for k, b, s in configs], fontsize=8)
    ax.set_ylabel("real / emulated sync time")
    ax.set_title(f"Announcement order over {table[0]['link']}: gloo's collectives against geotrain's")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", default="2,4")
    p.add_argument("--link", default="10mbit/50ms")
    p.add_argument("--payloads", default="256kb,4mb")
    p.add_argument("--skews", default="0,0.1", help="seconds the last site is late, comma-separated")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="syncs per lab (per round, order and skew)")
    p.add_argument("--gap", type=float, default=1.0)
    add_pacing_argument(p)
    p.add_argument("--name", default="", help="suffix of the result files")
    p.add_argument("--raw", type=Path, help="append every site's timings here (JSON lines)")
    p.add_argument("--from-raw", type=Path, help="measure nothing: write the results from timings --raw kept")
    args = p.parse_args()
    from _common import command_line, write_result

    from geotrain.config import parse_size

    if args.from_raw:
        rows = [json.loads(line) for line in args.from_raw.read_text().splitlines() if line.startswith("{")]
    else:
        if os.geteuid() != 0:
            sys.exit("the network lab needs root")
        payloads = [parse_size(s, field="--payloads") for s in args.payloads.split(",")]
        skews = [float(s) for s in args.skews.split(",")]
        rows = []
        for rnd in range(args.rounds):
            for k in (int(s) for s in args.sites.split(",")):
                pattern = _pattern("auto", k)
                for skew in skews:
                    for collectives in COLLECTIVES if rnd % 2 == 0 else COLLECTIVES[::-1]:
                        print(f"-- round {rnd + 1}/{args.rounds}: {k} sites, last {skew * 1000:g} ms late, "
                              f"{collectives}", flush=True)
                        mine, _ = measure(k, args.link, payloads, repeats=args.repeats, queue=None, gap=args.gap,
                                             patterns=[pattern], skew=skew, collectives=collectives,
                                             pacing=args.pacing)
                        mine = [{**r, "sites": k, "link": args.link, "skew": skew, "collectives": collectives,
                                 "round": rnd} for r in mine]
                        rows += mine
                        if args.raw:
                            with args.raw.open("a") as f:
                                f.writelines(json.dumps(r) + "\n" for r in mine)
    table = summarise(rows)
    for r in table:
        print(f"   {r['sites']} sites {r['bytes']:>10,} B late {r['skew'] * 1000:g} ms {r['collectives']:<9} "
              f"real {r['real']:.3f} s  emulated {r['emulated']:.3f} s", flush=True)
    write(table, args, command_line(), write_result)


if __name__ == "__main__":
    main()
