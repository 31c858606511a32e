"""Real against emulated: one cross-site collective's time in the network lab and what the WAN emulator charges.

For each grid point (K sites, a link, a payload of S fp32 bytes per site) a lab of K namespaces is built with the
link between every pair (``geotrain.netlab``), and one process per site times, in its namespace:

* ``transport``: what a lossless geotrain sync does on the wire, ``GlooTransport.all_to_all`` of S bytes then
  ``all_gather`` of S/K bytes (``comm/collectives.py``); the emulator charges it
  ``ring_reduce_scatter(S) + ring_all_gather(S/K)``, which is the ring all-reduce time 2(K-1)(L + S/K x 8/B);
* ``all_reduce``: gloo's own all-reduce of the same tensor, against the same ring time (the figure issue #14
  quotes).

Each point: ``--repeats`` collectives after a barrier, each timed from the last site's call to the last site's
result (the namespaces share one monotonic clock), and the median over repeats.
The gloo group meets on a store in the host namespace, over the lab's unshaped control links, as a run's sites
meet on the coordinator. The emulated time is the formula: ``benchmarks/emulation_bench.py`` shows the emulator
holds a collective for it to within a few milliseconds. Points whose emulated time times the repeats exceeds
``--max-seconds`` are skipped. Root only.

    .venv/bin/python benchmarks/netlab_bench.py [--sites 2,4] [--links 10mbit/50ms,100mbit/10ms]
        [--payloads 16kb,256kb,2mb] [--repeats 3] [--queue 64kb]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

OPS = ("transport", "all_reduce")


def _size(text: str) -> int:
    t = text.strip().lower()
    for suffix, scale in (("kb", 1024), ("mb", 1 << 20), ("b", 1)):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * scale)
    return int(t)


def emulated_seconds(k: int, nbytes: int, link: str) -> float:
    """What the emulator charges one lossless sync of ``nbytes`` per site among ``k`` sites (both patterns)."""
    from geotrain.topology import Topology, parse_link, ring_all_gather, ring_reduce_scatter

    ring = Topology(k, default=parse_link(link)).ring()
    chunk = nbytes // k
    return ring_reduce_scatter(chunk * k, ring).seconds + ring_all_gather(chunk, ring).seconds


def _span(rows: list[dict]) -> float:
    """A collective's time on the network: from the moment the last site called it to the moment the last site
    had its result. The sites leave a barrier up to one latency apart (its last message crosses a link), so a
    site's own time would also count the wait for a later peer. Every namespace reads the same monotonic clock."""
    return max(r["end"] for r in rows) - max(r["start"] for r in rows)


def worker(payloads: list[int], repeats: int, store_port: int) -> None:
    """One site's process, inside its namespace: time each op on each payload, one JSON line per measurement."""
    import datetime

    import torch
    import torch.distributed as dist

    from geotrain.comm.transport import GlooTransport

    torch.set_num_threads(1)
    k, n = int(os.environ["NETLAB_SITE"]), int(os.environ["NETLAB_SITES"])
    store = dist.TCPStore(os.environ["NETLAB_CONTROL_ADDRESS"], store_port, n, is_master=False,
                          timeout=datetime.timedelta(seconds=120))
    timeout = datetime.timedelta(seconds=900)
    pg = dist.ProcessGroupGloo(store, k, n, timeout)
    transport = GlooTransport(pg, rank=k, size=n, deadline=lambda pattern, nbytes: 900.0)
    for nbytes in payloads:
        chunk = nbytes // 4 // n
        x = torch.randn(chunk * n)
        for op in OPS:
            for r in range(repeats):
                pg.barrier().wait()
                t = time.monotonic()
                if op == "transport":
                    recv, _ = transport.all_to_all(x)
                    transport.all_gather(recv[:chunk].clone())
                else:
                    pg.allreduce([x.clone()]).wait()
                print(json.dumps({"site": k, "bytes": chunk * n * 4, "op": op, "repeat": r, "start": t,
                                  "end": time.monotonic()}), flush=True)


def measure(k: int, link: str, payloads: list[int], *, repeats: int, queue: int | None) -> list[dict]:
    """Build a lab of ``k`` sites over ``link``, run the workers, return their measurements."""
    import datetime

    import torch.distributed as dist

    from geotrain.netlab import Lab, lab_links
    from geotrain.topology import Topology, parse_link

    rows = []
    lab = Lab(sites=k, links=lab_links(Topology(k, default=parse_link(link)), queue_bytes=queue))
    with lab:
        store = dist.TCPStore(lab.control_address, 0, k + 1, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=120))
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
        args = [sys.executable, __file__, "--worker", "--payloads", ",".join(map(str, payloads)),
                "--repeats", str(repeats), "--store-port", str(store.port)]
        procs = [lab.popen(j, args, env=env, stdout=subprocess.PIPE, text=True) for j in range(k)]
        for p in procs:
            out, _ = p.communicate(timeout=3600)
            if p.returncode != 0:
                raise RuntimeError(f"a site's worker failed ({p.returncode})")
            rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        del store
    print(f"   router: {json.dumps(lab.stats)}", file=sys.stderr)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", default="2,4")
    p.add_argument("--links", default="10mbit/50ms,100mbit/10ms,2mbit/50ms")
    p.add_argument("--payloads", default="16kb,256kb,2mb")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--queue", help="each link's queue in bytes (default: the lab's, one BDP, at least 64 KB)")
    p.add_argument("--max-seconds", type=float, default=30.0,
                   help="skip a point whose emulated time x repeats exceeds this (default %(default)s)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--store-port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    payloads = [_size(s) for s in args.payloads.split(",")]
    if args.worker:
        worker(payloads, args.repeats, args.store_port)
        return
    from _common import command_line, write_result

    if os.geteuid() != 0:
        sys.exit("the network lab needs root")
    queue = None if args.queue is None else _size(args.queue)
    table = []
    for k in (int(s) for s in args.sites.split(",")):
        for link in args.links.split(","):
            fit = [s for s in payloads if emulated_seconds(k, s, link) * args.repeats <= args.max_seconds]
            skipped = sorted(set(payloads) - set(fit))
            if skipped:
                print(f"-- {k} sites {link}: skipping {skipped} (over --max-seconds)", flush=True)
            if not fit:
                continue
            print(f"-- {k} sites over {link}: {fit}", flush=True)
            rows = measure(k, link, fit, repeats=args.repeats, queue=queue)
            for nbytes in fit:
                for op in OPS:
                    mine = [r for r in rows if r["op"] == op and abs(r["bytes"] - nbytes) < 4 * k]
                    per_repeat = [_span([r for r in mine if r["repeat"] == j]) for j in range(args.repeats)]
                    real = statistics.median(per_repeat)
                    emulated = emulated_seconds(k, mine[0]["bytes"], link)
                    table.append((k, link, nbytes, op, real, emulated, min(per_repeat), max(per_repeat)))
                    print(f"   {op:<10} {nbytes:>10,} B  real {real:.3f} s  emulated {emulated:.3f} s  "
                          f"ratio {real / emulated:.2f}", flush=True)
    lines = [
        "# Network lab: real against emulated collective time",
        "",
        f"Command: `{command_line()}`  ",
        f"One namespace per site, the link between every pair applied per direction by the lab's router (MTU 1500, "
        f"queue {args.queue or 'one round-trip BDP, at least 64 KB'}). Median over {args.repeats} repeats of the "
        "time from the last site's call to the last site's result. `transport`: all_to_all of S then all_gather of "
        "S/K, what a lossless geotrain sync sends; `all_reduce`: gloo's all-reduce. Emulated: the ring all-reduce "
        "time the emulator charges both.",
        "",
        "| sites | link | payload S | op | real median (s) | real min-max (s) | emulated (s) | real / emulated |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, link, nbytes, op, real, emulated, lo, hi in table:
        lines.append(f"| {k} | {link} | {nbytes:,} B | {op} | {real:.3f} | {lo:.3f}-{hi:.3f} | {emulated:.3f} "
                     f"| {real / emulated:.2f} |")
    path = write_result("netlab-real-vs-emulated", "\n".join(lines) + "\n")
    plot(table, path.with_suffix(".png"))


def plot(table: list[tuple], path: Path) -> None:
    """Real / emulated against the payload, one panel per number of sites, one line per link and op."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = sorted({row[0] for row in table})
    fig, axes = plt.subplots(1, len(sites), figsize=(6 * len(sites), 4.2), sharey=True, squeeze=False)
    for ax, k in zip(axes[0], sites):
        for link in dict.fromkeys(row[1] for row in table):
            for op, style in zip(OPS, ("-o", "--s")):
                pts = [(row[2], row[4] / row[5]) for row in table if row[0] == k and row[1] == link and row[3] == op]
                if pts:
                    ax.plot(*zip(*pts), style, label=f"{link} {op}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("payload per site (bytes)")
        ax.set_title(f"{k} sites")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("real / emulated time")
    fig.suptitle("Network lab: one collective's real time against the emulator's")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
