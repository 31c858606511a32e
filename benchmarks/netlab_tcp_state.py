"""The kernel's TCP state behind a series of syncs in the network lab: what the congestion control thinks of the
link before each sync.

Runs ``--repeats`` syncs of one payload (``benchmarks/netlab_bench.py``'s worker, ``--gap`` s of idle before
each) and, all along, reads ``ss -tin`` in every site's namespace every ``--interval`` s. For each sync the table
gives its time, the emulated time, and the state of site 0's busiest connection just before the sync: the
congestion control's bandwidth estimate, its pacing gain (BBR's start-up gain is 2.89), the pacing rate, the
congestion window and slow start's threshold; and during the sync: the largest and the median congestion window,
the median smoothed round trip, and the segments retransmitted. A plot draws the window over every sync against
the link's queue and bandwidth-delay product. ``--tcp`` sets the sites' TCP (``geotrain netlab --tcp``),
``--queue`` the links' queue, ``--pacing`` how the kernel paces the connections (as a run's
``comm.tcp_pacing``; the traces kept before geotrain paced were taken without). Root only.

    sudo .venv/bin/python benchmarks/netlab_tcp_state.py [--sites 2] [--link 100mbit/50ms] [--payload 64kb]
        [--repeats 10] [--gap 1] [--tcp cubic,no-idle-restart] [--queue 4mb] [--pacing link|uncapped|off]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from netlab_bench import _pattern, _span, _tcp, add_pacing_argument, emulated_seconds, measure  # noqa: E402

FIELDS = {"bw": r"bbr:\(bw:(\S+?)[,)]", "pacing_gain": r"pacing_gain:([\d.]+)", "pacing_rate": r"pacing_rate (\S+)",
          "cwnd": r"cwnd:(\d+)", "ssthresh": r"ssthresh:(\d+)", "rtt_ms": r" rtt:([\d.]+)/",
          "bytes_sent": r"bytes_sent:(\d+)", "bytes_retrans": r"bytes_retrans:(\d+)"}


def connections(text: str, peers: set[str]) -> list[dict]:
    """``ss -tinH`` output: one dict of FIELDS per connection to one of ``peers`` (addresses)."""
    lines = text.splitlines()
    out = []
    for head, info in zip(lines[0::2], lines[1::2]):
        if head.split()[3].rsplit(":", 1)[0] in peers:
            out.append({k: (m.group(1) if (m := re.search(p, info)) else "") for k, p in FIELDS.items()})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", type=int, default=2)
    p.add_argument("--link", default="100mbit/50ms")
    p.add_argument("--payload", default="64kb")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--gap", type=float, default=1.0)
    p.add_argument("--interval", type=float, default=0.02, help="seconds between two reads of ss")
    p.add_argument("--tcp", default="host", help="the sites' TCP (geotrain netlab --tcp; default %(default)s)")
    p.add_argument("--queue", help="each link's queue in bytes (default: the lab's, one BDP, at least 64 KB)")
    add_pacing_argument(p)
    p.add_argument("--name", default="", help="suffix of the result file")
    args = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("the network lab needs root")
    from _common import command_line, write_result

    from geotrain.config import parse_size
    from geotrain.netlab import DEFAULT_MTU, Lab, LabTcp, lab_links
    from geotrain.topology import MSS_BYTES, Topology, parse_link

    k, nbytes, pattern = args.sites, parse_size(args.payload, field="--payload"), _pattern("auto", args.sites)
    samples: list[tuple[float, str]] = []

    def watch(lab: Lab) -> Callable[[], None]:
        """Read ss in site 0's namespace every --interval s until stopped."""
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():  # bounded: measure stops it once the workers are done
                t = time.monotonic()
                r = subprocess.run(["ip", "netns", "exec", lab.namespace(0), "ss", "-tinH", "state", "established"],
                                   capture_output=True, text=True, timeout=10)
                samples.append((t, r.stdout))
                time.sleep(args.interval)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()

        def end() -> None:
            stop.set()
            thread.join(timeout=15)

        return end

    queue = None if args.queue is None else parse_size(args.queue, field="--queue")
    rows, _ = measure(k, args.link, [nbytes], repeats=args.repeats, queue=queue, gap=args.gap, patterns=[pattern],
                      watch=watch, tcp=args.tcp, pacing=args.pacing)
    emulated = emulated_seconds(k, nbytes, args.link, pattern)
    link = parse_link(args.link)
    queue_bytes = lab_links(Topology(k, default=link), queue_bytes=queue)[(0, 1)].queue_bytes
    bdp_segments = link.bandwidth_bps * 2 * link.latency_s / 8 / MSS_BYTES
    lines = [
        f"# Network lab: TCP's state before and during each sync ({k} sites, {nbytes:,} B over {args.link})",
        "",
        f"Command: `{command_line()}`  ",
        f"{args.repeats} syncs ({pattern}), each after {args.gap:g} s of idle; `ss -tin` read in site 0's namespace "
        f"every {args.interval * 1000:g} ms. Before the sync: site 0's connection that sent the most, at the last "
        "read before the sync (the connections over the links only). During the sync: site 0's connection to site "
        f"1. Emulated: {emulated:.3f} s. The link's queue: {queue_bytes:,} B ({queue_bytes / DEFAULT_MTU:.0f} "
        f"packets); its bandwidth-delay product over the round trip: {bdp_segments:.0f} segments. The sites' TCP: "
        f"{_tcp({'tcp': LabTcp.parse(args.tcp).describe(), 'pacing': args.pacing})}.",
        "",
        "| sync | real (s) | real - emulated (ms) | bandwidth estimate | pacing gain | pacing rate | cwnd (segments) "
        "| ssthresh | smoothed RTT (ms) | cwnd during: largest | median | RTT during, median (ms) "
        "| segments retransmitted |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    peers = {Lab.wan_address(j) for j in range(1, k)}
    site1 = {Lab.wan_address(1)}

    def to_site1(text: str) -> dict | None:
        return next(iter(connections(text, site1)), None)

    by_repeat: dict[int, list[dict]] = {}
    for r in rows:
        by_repeat.setdefault(r["repeat"], []).append(r)
    spans = []
    for rep, v in sorted(by_repeat.items()):
        start = max(r["start"] for r in v)
        before = [text for t, text in samples if t < start]
        conns = connections(before[-1], peers) if before else []
        c = max(conns, key=lambda x: int(x["bytes_sent"] or 0), default={f: "" for f in FIELDS})
        end = max(r["end"] for r in v)
        spans.append((start, end))
        during = [x for t, text in samples if start <= t <= end if (x := to_site1(text)) and x["cwnd"]]
        last_before = to_site1(before[-1]) if before else None
        retrans = ""  # ss leaves bytes_retrans out until the connection has retransmitted
        if during and last_before:
            retrans = str(round((int(during[-1]["bytes_retrans"] or 0) - int(last_before["bytes_retrans"] or 0))
                                / MSS_BYTES))
        cwnds = [int(x["cwnd"]) for x in during]
        rtts = [float(x["rtt_ms"]) for x in during if x["rtt_ms"]]
        real = _span(v)
        lines.append(f"| {rep + 1} | {real:.3f} | {(real - emulated) * 1000:+.0f} | {c['bw']} | {c['pacing_gain']} | "
                     f"{c['pacing_rate']} | {c['cwnd']} | {c['ssthresh']} | {c['rtt_ms']} | "
                     f"{max(cwnds, default='')} | {f'{statistics.median(cwnds):.0f}' if cwnds else ''} | "
                     f"{f'{statistics.median(rtts):.1f}' if rtts else ''} | {retrans} |")
    path = write_result(f"netlab-tcp-state-{k}sites" + (f"-{args.name}" if args.name else ""), "\n".join(lines) + "\n")
    series = [(t, int(x["cwnd"])) for t, text in samples if (x := to_site1(text)) and x["cwnd"]]
    plot(series, spans, queue_bytes / DEFAULT_MTU, bdp_segments, path.with_suffix(".png"),
         f"{k} sites, {nbytes:,} B over {args.link}; {LabTcp.parse(args.tcp).describe()}")


def plot(series: list[tuple[float, int]], spans: list[tuple[float, float]], queue_packets: float,
         bdp_segments: float, path: Path, title: str) -> None:
    """Site 0's congestion window to site 1 over the whole series, the syncs shaded, against the link's queue
    and bandwidth-delay product."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not series or not spans:
        return
    t0 = spans[0][0]
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot([t - t0 for t, _ in series], [c for _, c in series], color="C0", linewidth=1, label="congestion window")
    for i, (a, b) in enumerate(spans):
        ax.axvspan(a - t0, b - t0, color="C2", alpha=0.15, label="a sync" if i == 0 else None)
    ax.axhline(queue_packets, color="C3", linestyle="--", label=f"the link's queue ({queue_packets:.0f} packets)")
    ax.axhline(bdp_segments, color="black", linestyle=":", label=f"bandwidth-delay product ({bdp_segments:.0f})")
    ax.set_xlabel("seconds since the first sync")
    ax.set_ylabel("segments")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
