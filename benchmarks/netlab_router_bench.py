"""How fast the network lab's router forwards, by data plane: ``forward.c`` against the Python loop.

For each data plane in turn (alternating, ``--repeats`` times, so that both see the machine in the same state),
a lab of K sites is built with unshaped links (no rate, no delay: only the router's own speed limits them) and
every site sends ``--megabytes`` over one TCP connection to every other site at once (with ``--one-way``,
site 0 alone sends, to every other site). Throughput is the bytes all sites received over the time from
the first connection to the last byte, in Mbit/s of TCP payload; the table quotes the median and the range.
The lab warns when a run's links add up past these figures (``geotrain.netlab.ROUTER_MEASURED_BPS``). Root only.

    sudo .venv/bin/python benchmarks/netlab_router_bench.py [--sites 2] [--one-way] [--megabytes 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PORT = 29517
CHUNK = 1 << 16


def worker(megabytes: int, one_way: bool, deadline_s: float) -> None:
    """One site: accept the other sites' streams and read them whole, while sending its own to each of them."""
    import os
    import socket
    import threading

    k, n = int(os.environ["NETLAB_SITE"]), int(os.environ["NETLAB_SITES"])
    addresses = os.environ["NETLAB_ADDRESSES"].split(",")
    others = [j for j in range(n) if j != k]
    if one_way:  # site 0 sends to every other site
        peers_out, peers_in = (others, []) if k == 0 else ([], [0])
    else:
        peers_out, peers_in = others, others
    total = megabytes * 1_000_000
    server = socket.create_server((addresses[k], PORT), backlog=n)
    server.settimeout(deadline_s)
    got = {"bytes": 0, "first": None, "last": None}

    def receive(conn: socket.socket) -> None:
        conn.settimeout(deadline_s)
        with conn:
            left = total
            while left > 0:
                data = conn.recv(min(CHUNK, left))
                if not data:
                    break
                left -= len(data)
            got["bytes"] += total - left
            got["last"] = time.monotonic()

    def send(j: int) -> None:
        payload = b"\0" * CHUNK
        for _ in range(int(deadline_s * 100)):  # the peer's server may not listen yet: retry for a while
            try:
                s = socket.create_connection((addresses[j], PORT), timeout=deadline_s)
                break
            except OSError:
                time.sleep(0.01)
        else:
            raise RuntimeError(f"site {k} cannot reach site {j}")
        with s:
            sent = 0
            while sent < total:
                sent += s.send(payload[: min(CHUNK, total - sent)])

    print("listening", flush=True)
    sys.stdin.readline()  # every site listens: go
    got["first"] = time.monotonic()
    threads = [threading.Thread(target=send, args=(j,)) for j in peers_out]
    for t in threads:
        t.start()
    for _ in peers_in:
        conn, _ = server.accept()
        receive(conn)
    for t in threads:
        t.join(deadline_s)
    print(json.dumps({"site": k, **got}), flush=True)


def measure(forwarder: str, sites: int, megabytes: int, one_way: bool, deadline_s: float) -> dict:
    from geotrain.netlab import Lab, lab_links
    from geotrain.topology import Topology

    lab = Lab(sites=sites, links=lab_links(Topology(sites, default=None)), forwarder=forwarder)
    with lab:
        args = [sys.executable, __file__, "--worker", "--megabytes", str(megabytes), "--deadline", str(deadline_s)]
        args += ["--one-way"] if one_way else []
        procs = [lab.popen(k, args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for k in range(sites)]
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "listening"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        rows = []
        for p in procs:
            out, _ = p.communicate(timeout=deadline_s + 30)
            if p.returncode != 0:
                raise RuntimeError(f"a site failed ({p.returncode})")
            rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    received = sum(r["bytes"] for r in rows)
    start = min(r["first"] for r in rows)
    end = max(r["last"] for r in rows if r["last"] is not None)
    return {"forwarder": lab.forwarder_used, "bytes": received, "seconds": end - start,
            "mbps": 8 * received / (end - start) / 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", type=int, default=2)
    p.add_argument("--one-way", action="store_true", help="site 0 sends to every other site; nothing comes back")
    p.add_argument("--megabytes", type=int, default=200, help="bytes each stream carries, in MB (default 200)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--forwarders", default="c,python")
    p.add_argument("--deadline", type=float, default=300.0, help="seconds a stream may take at most")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.megabytes, args.one_way, args.deadline)
        return

    from _common import command_line, write_result

    forwarders = args.forwarders.split(",")
    results: dict[str, list[dict]] = {f: [] for f in forwarders}
    for r in range(args.repeats):
        for f in forwarders:
            m = measure(f, args.sites, args.megabytes, args.one_way, args.deadline)
            results[f].append(m)
            print(f"repeat {r}: {f}: {m['mbps']:,.0f} Mbit/s ({m['bytes'] / 1e6:,.0f} MB in {m['seconds']:.2f} s)",
                  flush=True)
    streams = args.sites - 1 if args.one_way else args.sites * (args.sites - 1)
    lines = [f"# The lab's router: forwarding speed by data plane, {args.sites} sites, {streams} TCP stream"
             f"{'s' if streams != 1 else ''} at once", "",
             f"Command: `{command_line()}`  ",
             f"{args.megabytes} MB per stream over unshaped links; repeats alternate between the data planes.", "",
             "| data plane | Mbit/s, median | range | runs |", "|---|---|---|---|"]
    for f, ms in results.items():
        v = [m["mbps"] for m in ms]
        lines.append(f"| {f} | {statistics.median(v):,.0f} | {min(v):,.0f}-{max(v):,.0f} | "
                     f"{', '.join(f'{x:,.0f}' for x in v)} |")
    if len(forwarders) == 2:
        a, b = (statistics.median(m["mbps"] for m in results[f]) for f in forwarders)
        lines += ["", f"{forwarders[0]} / {forwarders[1]}: {a / b:.2f}x (medians, side by side)."]
    suffix = f"{args.sites}sites" + ("-one-way" if args.one_way else "")
    write_result(f"netlab-router-{suffix}", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
