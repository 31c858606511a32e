"""Real against emulated: one cross-site sync's time in the network lab and what the WAN emulator charges.

For each grid point (K sites, a link, a payload of S bytes per site) a lab of K namespaces is built with the
link between every pair (``geotrain.netlab``), and one process per site times, in its namespace, one sync as
a run sends it (``geotrain.comm.pattern``) with gloo:

* ``reduce_scatter`` (a dense codec among 3 or more sites): ``all_to_all`` of S, then ``all_gather`` of S/K;
* ``all_gather`` (2 sites, and sparse codecs): ``all_gather`` of S;
* ``point_to_point`` (as a joiner is healed): site 0 sends S to site 1 and nothing else crosses a link, so
  each link carries data one way only.

``--patterns auto`` (the default) takes the pattern a run among K sites with a dense codec takes. Before each
sync every site idles ``--gap`` seconds, as a run computes its inner steps between syncs. Each sync is timed
from the last site's call to the last site's result (the namespaces share one monotonic clock); the median
over ``--repeats``. Emulated: what the emulator charges the same sync (``geotrain.comm.pattern.sync_cost``'s
collectives from ``geotrain.topology``); it holds a collective for that to within a few milliseconds
(``benchmarks/emulation_bench.py``). Also shown: the ring formula 2(K-1)(L + S/K x 8/B) the emulator charged
before the lab calibrated it. Root only.

    .venv/bin/python benchmarks/netlab_bench.py [--sites 2,4] [--links 10mbit/50ms,100mbit/10ms]
        [--payloads 16kb,256kb,2mb] [--patterns auto] [--repeats 3] [--warmup 1] [--gap 1] [--queue 64kb] [--raw FILE]
        [--skew 0.1] [--collectives geotrain|gloo] [--tcp cubic,no-idle-restart] [--pacing link|uncapped|off]
    .venv/bin/python benchmarks/netlab_bench.py --compare RAW,RAW,... --name NAME

``--compare`` measures nothing: it sets the raw timings of several runs (``--raw``) side by side, one line per
run's TCP setting (and queue, where a file's name says ``queue-``; and the sites' device queue, for timings
kept before the lab raised it), and writes how many points of each link came within 10% of the emulated time,
with a plot.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from geotrain.netlab.lab import DEVICE_QUEUE_PACKETS  # noqa: E402

PATTERNS = ("reduce_scatter", "all_gather", "point_to_point")


def _pattern(name: str, k: int) -> str:
    return ("reduce_scatter" if k >= 3 else "all_gather") if name == "auto" else name


def emulated_seconds(k: int, nbytes: int, link: str, pattern: str) -> float:
    """What the emulator charges one sync of ``nbytes`` per site among ``k`` sites in ``pattern``."""
    from geotrain.topology import Topology, all_to_all, parse_link, point_to_point, ring_all_gather

    topology = Topology(k, default=parse_link(link))
    if pattern == "all_gather":
        return ring_all_gather(nbytes, topology.ring()).seconds
    if pattern == "point_to_point":
        return point_to_point(nbytes, topology.link(0, 1)).seconds
    return (all_to_all(nbytes, topology.pairs(), sites=k).seconds
            + ring_all_gather(nbytes // k, topology.ring()).seconds)


def ring_formula_seconds(k: int, nbytes: int, link: str, pattern: str) -> float:
    """The textbook ring time the emulator charged before the lab: K-1 (all-gather) or 2(K-1) (all-to-all then
    all-gather) steps of one latency plus one chunk's serialisation, no headers."""
    from geotrain.topology import parse_link

    lk = parse_link(link)
    if pattern == "all_gather":
        return (k - 1) * (lk.latency_s + 8 * nbytes / lk.bandwidth_bps)
    if pattern == "point_to_point":
        return lk.latency_s + 8 * nbytes / lk.bandwidth_bps
    return 2 * (k - 1) * (lk.latency_s + 8 * nbytes / k / lk.bandwidth_bps)


LEGACY_TCP = "bbr (the host's), slow start after idle on (the kernel's default)"
"""The sites' TCP of rows kept before the lab set it: the host's defaults, BBR on the machine that ran them."""
LEGACY_DEVICE_QUEUE = 500
"""The sites' WAN device queue (packets) of timings kept before the lab set it: the kernel's default for a TUN
device. Such timings carry no count of the devices' drops."""


def _tcp(row: dict) -> str:
    """A raw row's TCP in words: the sites' settings, and whether geotrain paced its connections (rows kept
    before it did carry no "pacing")."""
    pacing = row.get("pacing")
    uncapped = "pacing its connections uncapped"
    words = {"auto": "pacing transfers of one BDP or more",  # a variant measured once, over a second group
             "link": "pacing its connections at 95% of the link's rate", "uncapped": uncapped,
             "off": "not pacing", True: uncapped, False: "not pacing", None: "not pacing"}  # rows kept before
    return f"{row.get('tcp') or LEGACY_TCP}; geotrain {words[pacing]}"


def _within(row: dict, key: str = "emulated") -> bool:
    """Whether a point's real time is within 10% of its ``key`` time."""
    return abs(row["real"] / row[key] - 1) <= 0.10


def _span(rows: list[dict]) -> float:
    """A collective's time on the network: from the moment the last site called it to the moment the last site
    had its result. The sites leave a barrier up to one latency apart (its last message crosses a link), so a
    site's own time would also count the wait for a later peer. Every namespace reads the same monotonic clock."""
    return max(r["end"] for r in rows) - max(r["start"] for r in rows)


COLLECTIVES = ("geotrain", "gloo")
"""Whose collectives a sync runs: geotrain's transport (``GlooTransport``: gloo's point-to-point messages, every
receive announced before any send), or gloo's own all-gather and all-to-all, which post a send before the
matching receive (what geotrain ran before the lab found the difference)."""


def worker(payloads: list[int], repeats: int, store_port: int, gap: float, patterns: list[str], *,
           pacing: str, skew: float = 0.0, collectives: str = "geotrain", link: str = "",
           warmup: int = 0) -> None:
    """One site's process, inside its namespace: time each pattern on each payload, one JSON line per sync. The
    last site idles ``skew`` seconds longer before each sync, as a site whose inner steps ran late. ``pacing``:
    how the kernel paces the group's connections over ``link``, as a run's (``geotrain.comm.pacing``). Each
    payload's first ``warmup`` syncs are run and not timed."""
    import datetime

    import torch
    import torch.distributed as dist

    from geotrain.comm.pacing import paced
    from geotrain.comm.transport import GlooTransport

    torch.set_num_threads(1)
    k, n = int(os.environ["NETLAB_SITE"]), int(os.environ["NETLAB_SITES"])
    store = dist.TCPStore(os.environ["NETLAB_CONTROL_ADDRESS"], store_port, n, is_master=False,
                          timeout=datetime.timedelta(seconds=120))
    timeout = datetime.timedelta(seconds=900)
    from geotrain.topology import parse_link, pacing_rate

    lab_link = parse_link(link)
    pg = paced(lambda: dist.ProcessGroupGloo(store, k, n, timeout), mode=pacing, store=store, me=k, size=n,
               rate_to=None if lab_link is None else lambda j: pacing_rate(lab_link))
    transport = GlooTransport(pg, rank=k, size=n, deadline=lambda pattern, nbytes: 900.0)

    def all_gather(x: torch.Tensor) -> None:
        if collectives == "gloo":
            pg.allgather([[torch.empty_like(x) for _ in range(n)]], [x]).wait()
        else:
            transport.all_gather(x)

    def all_to_all(x: torch.Tensor) -> torch.Tensor:
        if collectives == "gloo":
            out = torch.empty_like(x)
            pg.alltoall_base(out, x, [], []).wait()
            return out
        return transport.all_to_all(x)[0]

    def point_to_point(x: torch.Tensor) -> None:
        """Site 0 sends ``x`` to site 1; the others have nothing to do."""
        if k == 0 and collectives == "gloo":
            pg.send([x], 1, 0).wait()
        elif k == 0:
            transport.send(x, 1)
        elif k == 1 and collectives == "gloo":
            pg.recv([x], 0, 0).wait()
        elif k == 1:
            transport.recv(x, 0)

    late = skew if k == n - 1 else 0.0
    for nbytes in payloads:
        for pattern in patterns:
            chunk = nbytes // n
            x = torch.zeros(chunk * n, dtype=torch.uint8)
            for r in range(-warmup, repeats):
                pg.barrier().wait()
                time.sleep(gap + late)  # the inner steps between two syncs: the connections go idle, as in a run
                t = mid = time.monotonic()
                if pattern == "reduce_scatter":
                    recv = all_to_all(x)
                    mid = time.monotonic()
                    all_gather(recv[:chunk].clone())
                elif pattern == "point_to_point":
                    point_to_point(x)
                else:
                    all_gather(x)
                if r >= 0:
                    print(json.dumps({"site": k, "bytes": chunk * n, "pattern": pattern, "repeat": r, "start": t,
                                      "mid": mid, "end": time.monotonic()}), flush=True)


def measure(k: int, link: str, payloads: list[int], *, repeats: int, queue: int | None, gap: float,
            patterns: list[str], router: str = "auto", skew: float = 0.0, collectives: str = "geotrain",
            watch: Callable[[Any], Callable[[], None]] | None = None,
            pacing: str, tcp: str = "host", warmup: int = 0) -> tuple[list[dict], Any]:
    """Build a lab of ``k`` sites over ``link`` with the sites' TCP ``tcp`` (``LabTcp.parse``), run the workers
    (``worker``); their measurements and the closed lab (its router's and devices' counters, its data plane).
    ``watch(lab)``, if given, starts watching the lab once it is up and returns what stops it, called when the
    workers are done (or failed)."""
    import datetime

    import torch.distributed as dist

    from geotrain.netlab import Lab, LabTcp, lab_links
    from geotrain.topology import Topology, parse_link

    rows = []
    lab = Lab(sites=k, links=lab_links(Topology(k, default=parse_link(link)), queue_bytes=queue), forwarder=router,
              tcp=LabTcp.parse(tcp))
    with lab:
        store = dist.TCPStore(lab.control_address, 0, k + 1, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=120))
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
        args = [sys.executable, __file__, "--worker", "--payloads", ",".join(map(str, payloads)),
                "--repeats", str(repeats), "--store-port", str(store.port), "--gap", str(gap),
                "--patterns", ",".join(patterns), "--skew", str(skew), "--collectives", collectives,
                "--pacing", pacing, "--links", link, "--warmup", str(warmup)]
        stop = watch(lab) if watch else None
        try:
            procs = [lab.popen(j, args, env=env, stdout=subprocess.PIPE, text=True) for j in range(k)]
            for p in procs:
                out, _ = p.communicate(timeout=3600)
                if p.returncode != 0:
                    raise RuntimeError(f"a site's worker failed ({p.returncode})")
                rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        finally:
            if stop:
                stop()
        del store
    return rows, lab


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per (sites, link, payload, pattern): the median sync time over repeats, and the model's."""
    groups: dict[tuple, dict[int, list[dict]]] = {}
    for r in rows:
        groups.setdefault((r["sites"], r["link"], r["bytes"], r["pattern"]), {}).setdefault(r["repeat"], []).append(r)
    table = []
    for (k, link, nbytes, pattern), by_repeat in sorted(groups.items()):
        spans = [_span(v) for _, v in sorted(by_repeat.items()) if len(v) == k]
        real = statistics.median(spans)
        table.append({"sites": k, "link": link, "bytes": nbytes, "pattern": pattern, "real": real,
                      "lo": min(spans), "hi": max(spans), "emulated": emulated_seconds(k, nbytes, link, pattern),
                      "formula": ring_formula_seconds(k, nbytes, link, pattern), "repeats": len(spans),
                      "router": next(iter(by_repeat.values()))[0].get("router"),
                      "collectives": next(iter(by_repeat.values()))[0].get("collectives"),
                      "tcp": _tcp(next(iter(by_repeat.values()))[0]),
                      "warmup": next(iter(by_repeat.values()))[0].get("warmup", 0)})
    return table


def add_pacing_argument(p: argparse.ArgumentParser) -> None:
    """``--pacing``: how the kernel paces the sites' connections, a run's ``comm.tcp_pacing`` and its default."""
    from geotrain.comm.pacing import MODES
    from geotrain.config import CommConfig

    p.add_argument("--pacing", choices=MODES, default=CommConfig().tcp_pacing,
                   help="how the kernel paces the sites' connections, as a run's comm.tcp_pacing: at 95%% of "
                        "the link's rate, uncapped, or not at all (default %(default)s)")


def main() -> None:
    from geotrain.netlab.lab import FORWARDERS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", default="2,4")
    p.add_argument("--links", default="2mbit/10ms,2mbit/50ms,10mbit/10ms,10mbit/50ms,100mbit/10ms,100mbit/50ms")
    p.add_argument("--payloads", default="16kb,64kb,256kb,1mb,4mb,16mb")
    p.add_argument("--patterns", default="auto",
                   help="comma-separated, of auto (the pattern of a run with a dense codec), "
                        f"{', '.join(PATTERNS)} (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1,
                   help="syncs of each payload run before the timed ones and not timed: a run's syncs are all one "
                        "size, while the grid's first sync of a size follows syncs 4x smaller (default %(default)s)")
    p.add_argument("--gap", type=float, default=1.0,
                   help="idle seconds before each sync, as the inner steps between two syncs (default %(default)s)")
    p.add_argument("--queue", help="each link's queue in bytes (default: the lab's, one BDP, at least 64 KB)")
    p.add_argument("--max-seconds", type=float, default=1200.0,
                   help="skip a point whose emulated time x repeats exceeds this (default %(default)s)")
    p.add_argument("--router", choices=FORWARDERS, default="auto",
                   help="the lab router's data plane (geotrain netlab --router; default %(default)s)")
    p.add_argument("--name", default="", help="suffix of the result files")
    p.add_argument("--raw", type=Path, help="append every site's timings here (JSON lines)")
    p.add_argument("--from-raw", type=Path, help="measure nothing: write the results from timings --raw kept")
    p.add_argument("--compare", help="measure nothing: set several runs' --raw timings side by side (comma-separated)")
    p.add_argument("--skew", type=float, default=0.0,
                   help="the last site reaches each sync this many seconds after the others (default %(default)s)")
    p.add_argument("--collectives", choices=COLLECTIVES, default="geotrain",
                   help="geotrain's transport, or gloo's own all-gather and all-to-all (default %(default)s)")
    p.add_argument("--tcp", default="host",
                   help="the sites' TCP (geotrain netlab --tcp), e.g. cubic,no-idle-restart (default %(default)s)")
    add_pacing_argument(p)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--store-port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    from geotrain.config import parse_size

    payloads = [parse_size(s, field="--payloads") for s in args.payloads.split(",")]
    if args.worker:
        worker(payloads, args.repeats, args.store_port, args.gap, args.patterns.split(","), skew=args.skew,
               collectives=args.collectives, pacing=args.pacing, link=args.links, warmup=args.warmup)
        return
    from _common import command_line, write_result

    if args.compare:
        compare([Path(f) for f in args.compare.split(",")], args.name or "compare", command_line(), write_result)
        return
    # Per (sites, link): packets the router's links dropped, and those the sites' own devices dropped (None in
    # timings kept before the lab counted them).
    drops: dict[tuple[int, str], tuple[int, int | None]] = {}
    if args.from_raw:
        rows, drops = _read_raw(args.from_raw)
    else:
        if os.geteuid() != 0:
            sys.exit("the network lab needs root")
        queue = None if args.queue is None else parse_size(args.queue, field="--queue")
        from geotrain.netlab import LabTcp

        tcp_in_effect = LabTcp.parse(args.tcp).describe()
        rows = []
        for k in (int(s) for s in args.sites.split(",")):
            patterns = list(dict.fromkeys(_pattern(name, k) for name in args.patterns.split(",")))
            for link in args.links.split(","):
                fit = [s for s in payloads
                       if sum(emulated_seconds(k, s, link, q) for q in patterns) * args.repeats <= args.max_seconds]
                if len(fit) < len(payloads):
                    print(f"-- {k} sites {link}: skipping {sorted(set(payloads) - set(fit))} (over --max-seconds)")
                if not fit:
                    continue
                print(f"-- {k} sites over {link}: {', '.join(patterns)} of {fit}", flush=True)
                mine, lab = measure(k, link, fit, repeats=args.repeats, queue=queue, gap=args.gap,
                                    patterns=patterns, router=args.router, skew=args.skew,
                                    collectives=args.collectives, tcp=args.tcp, pacing=args.pacing,
                                    warmup=args.warmup)
                mine = [{**r, "sites": k, "link": link, "router": lab.forwarder_used,
                         "collectives": args.collectives, "skew": args.skew, "tcp": tcp_in_effect,
                         "pacing": args.pacing, "warmup": args.warmup} for r in mine]
                drops[(k, link)] = (sum(v["dropped"] for v in lab.stats.values()), sum(lab.device_drops.values()))
                for row in summarise(mine):
                    print(f"   {row['pattern']:<15} {row['bytes']:>10,} B  real {row['real']:.3f} s  emulated "
                          f"{row['emulated']:.3f} s  ratio {row['real'] / row['emulated']:.2f}", flush=True)
                rows += mine
                if args.raw:
                    with args.raw.open("a") as f:
                        for r in mine:
                            f.write(json.dumps(r) + "\n")
                        f.write(json.dumps({"sites": k, "link": link, "dropped": drops[(k, link)][0],
                                            "device_dropped": drops[(k, link)][1]}) + "\n")
    table = summarise(rows)
    write_table(table, drops, args, command_line(), write_result)


def _drops(counts: tuple[int, int | None] | None) -> str:
    if counts is None:
        return ""
    link, device = counts
    return f"{link:,}" + ("" if device is None else f" ({device:,})")


def _warmup_words(table: list[dict]) -> str:
    """What the rows say about untimed syncs before each payload's timed ones (rows kept before carry none)."""
    counts = sorted({r.get("warmup", 0) for r in table})
    if counts == [0]:
        return ""
    return f"each payload's first {'/'.join(map(str, counts))} sync(s) run untimed (warm-up); "


def write_table(table: list[dict], drops: dict, args: argparse.Namespace, command: str, write_result) -> None:
    def close(rows: list[dict], key: str) -> int:
        return sum(_within(r, key) for r in rows)

    within = [r for r in table if _within(r)]
    # Rows kept before the router had a C data plane carry no "router": they were forwarded in Python.
    router = ", ".join(sorted({r.get("router") or "python" for r in table})) + " data plane"
    # Rows kept before geotrain ran its own collectives carry no "collectives": they ran gloo's.
    collectives = ", ".join(sorted({r.get("collectives") or "gloo" for r in table}))
    tcp = " / ".join(sorted({r["tcp"] for r in table}))
    links = list(dict.fromkeys(r["link"] for r in table))
    by_link = ["| link | points | within 10% of the emulated time | within 10% of the ring formula |", "|---|---|---|---|"]
    for link in links:
        rows = [r for r in table if r["link"] == link]
        by_link.append(f"| {link} | {len(rows)} | {close(rows, 'emulated')} | {close(rows, 'formula')} |")
    lines = [
        "# Network lab: real against emulated sync time",
        "",
        f"Command: `{command}`  ",
        f"One namespace per site, the link between every pair applied per direction by the lab's router ({router}; "
        "MTU 1500, "
        f"queue {args.queue or 'one round-trip BDP, at least 64 KB'}; each site's own WAN device queues "
        f"{_device_queue(drops):,} packets; the sites' TCP: {tcp}); {collectives}'s "
        f"collectives. Each sync follows {args.gap:g} s of idle, as a run's inner "
        + (f"steps, the last site {args.skew:g} s later than the others; " if args.skew else "steps; ") +
        _warmup_words(table) + "median over the repeats "
        "of the time from the last site's call to the last site's result. Emulated: what the WAN emulator (and "
        "the planner) charge the same sync; ring formula: what the emulator charged before the lab calibrated it.",
        "",
        f"**{len(within)} of {len(table)} points within 10% of the emulated time** ({close(table, 'formula')} of the "
        "ring formula's).",
        "",
        *by_link,
        "",
        "| sites | link | payload S | pattern | real median (s) | real min-max (s) | emulated (s) | real / emulated "
        "| real / ring formula | packets dropped, all its syncs: at the links (at the sites' devices) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(f"| {r['sites']} | {r['link']} | {r['bytes']:,} B | {r['pattern']} | {r['real']:.3f} | "
                     f"{r['lo']:.3f}-{r['hi']:.3f} | {r['emulated']:.3f} | {r['real'] / r['emulated']:.2f} | "
                     f"{r['real'] / r['formula']:.2f} | {_drops(drops.get((r['sites'], r['link'])))} |")
    path = write_result("netlab-real-vs-emulated" + (f"-{args.name}" if args.name else ""), "\n".join(lines) + "\n")
    plot(table, path.with_suffix(".png"))


def _read_raw(path: Path) -> tuple[list[dict], dict[tuple[int, str], tuple[int, int | None]]]:
    """A run's --raw timings: its sync rows, and per (sites, link) the packets the router's links and the sites'
    devices dropped (None for the devices in timings kept before the lab counted them)."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    drops = {(r["sites"], r["link"]): (r["dropped"], r.get("device_dropped")) for r in lines if "dropped" in r}
    return [r for r in lines if "pattern" in r], drops


def _device_queue(drops: dict[tuple[int, str], tuple[int, int | None]]) -> int:
    """The sites' device queue a run's timings were measured with: the lab's, once it counted the devices' drops."""
    return DEVICE_QUEUE_PACKETS if any(device is not None for _, device in drops.values()) else LEGACY_DEVICE_QUEUE


def compare(paths: list[Path], name: str, command: str, write_result) -> None:
    """Several runs' timings side by side: per link, how many points each run brought within 10% of the emulated
    time, and a plot of real / emulated against the payload, one panel per number of sites and link."""
    runs: dict[str, list[dict]] = {}
    for path in paths:
        rows, drops = _read_raw(path)
        table, device_queue = summarise(rows), _device_queue(drops)
        label = table[0]["tcp"]
        if "queue-" in path.stem:
            label += f"; queue {path.stem.split('queue-')[1]}"
        if device_queue != DEVICE_QUEUE_PACKETS:
            label += f"; the sites' devices queued {device_queue} packets"
        warmup = max(r.get("warmup", 0) for r in table)
        if warmup:
            label += f"; {warmup} untimed sync(s) of each size first"
        runs.setdefault(label, []).extend(table)
    links = list(dict.fromkeys(r["link"] for t in runs.values() for r in t))
    lines = ["# Network lab: real against emulated sync time, by the sites' TCP settings", "",
             f"Command: `{command}`  ",
             "Each run's points within 10% of the emulated time, per link (of the points it measured; each point "
             "the median of its repeats). Runs: " + ", ".join(f"`{p.name}`" for p in paths) + ".", "",
             "| the sites' TCP | " + " | ".join(links) + " | all |", "|---|" + "---|" * (len(links) + 1)]
    for label, table in runs.items():
        cells = []
        for link in links:
            pts = [r for r in table if r["link"] == link]
            cells.append(f"{sum(map(_within, pts))} of {len(pts)}" if pts else "")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {sum(map(_within, table))} of {len(table)} |")
    path = write_result(f"netlab-real-vs-emulated-{name}", "\n".join(lines) + "\n")
    compare_plot(runs, path.with_suffix(".png"))


def compare_plot(runs: dict[str, list[dict]], path: Path) -> None:
    """real / emulated against the payload: a panel per (sites, link), a line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from geotrain.topology import parse_link

    panels = sorted({(r["sites"], r["link"]) for t in runs.values() for r in t},
                    key=lambda p: (p[0], parse_link(p[1]).bandwidth_bps, parse_link(p[1]).latency_s))
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), sharey=True, squeeze=False)
    for ax, (k, link) in zip(axes.flat, panels):
        for i, (label, table) in enumerate(runs.items()):
            pts = sorted((r for r in table if r["sites"] == k and r["link"] == link), key=lambda r: r["bytes"])
            if pts:
                ax.plot([r["bytes"] for r in pts], [r["real"] / r["emulated"] for r in pts], "-o", color=f"C{i}",
                        label=label, markersize=4)
        ax.axhspan(0.9, 1.1, color="green", alpha=0.08)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_title(f"{k} sites, {link}", fontsize=9)
        ax.set_xlabel("payload per site (bytes)", fontsize=8)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("real / emulated (log)")
    legend: dict[str, Any] = {}  # a run may miss some panels: its line from any panel
    for ax in axes.flat[:len(panels)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    labels = list(legend)
    fig.legend(list(legend.values()), labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8)
    fig.suptitle("Network lab: one sync's real time against the emulator's, by the sites' TCP settings "
                 "(green: within 10%)")
    fig.tight_layout(rect=(0, 0.06 * (1 + (len(labels) - 1) // 3), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def plot(table: list[dict], path: Path) -> None:
    """Real / emulated against the payload, one panel per number of sites, one line per link and pattern; the
    ring formula's ratio faint beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = sorted({row["sites"] for row in table})
    fig, axes = plt.subplots(1, len(sites), figsize=(6.5 * len(sites), 4.5), sharey=True, squeeze=False)
    for ax, k in zip(axes[0], sites):
        for i, link in enumerate(dict.fromkeys(row["link"] for row in table)):
            for pattern, style in zip(PATTERNS, ("-o", "--s", ":^")):
                pts = [r for r in table if r["sites"] == k and r["link"] == link and r["pattern"] == pattern]
                if not pts:
                    continue
                x = [r["bytes"] for r in pts]
                line, = ax.plot(x, [r["real"] / r["emulated"] for r in pts], style, color=f"C{i}",
                                label=f"{link} {pattern}")
                ax.plot(x, [r["real"] / r["formula"] for r in pts], style, color=f"C{i}", alpha=0.2)
        ax.axhspan(0.9, 1.1, color="green", alpha=0.08)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("payload per site (bytes)")
        ax.set_title(f"{k} sites (faint: the ring formula before calibration)")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("real / emulated sync time")
    fig.suptitle("Network lab: one sync's real time against the emulator's")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
