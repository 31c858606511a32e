"""Emulation fidelity: measured wall time of one cross-site all-reduce against the analytic time of its pattern.

K ranks run as threads on a real gloo group over loopback, wrapped in the WAN emulator. For each
(K, S, B, L) point the table gives the analytic ring time 2(K-1) x (L + (S/K) / B), the median measured wall
time over repeats, and their ratio.

    .venv/bin/python benchmarks/emulation_bench.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _common import command_line, write_result  # noqa: E402
from _utils.gloo_threads import run_ranks  # noqa: E402

from geotrain.comm.transport import GlooTransport  # noqa: E402
from geotrain.topology import Topology, parse_link  # noqa: E402
from geotrain.wan.emulator import EmulatedWan  # noqa: E402
from geotrain.topology import ring_all_reduce  # noqa: E402

POINTS = [
    (4, 1_783_808, "2mbit/50ms"),  # the demo model over the demo link
    (4, 1_783_808, "100mbit/10ms"),
    (3, 1_000_000, "50mbit/20ms"),
    (4, 16_000_000, "1gbit/30ms"),
    (2, 250_000, "10mbit/50ms"),
    (8, 4_000_000, "200mbit/5ms"),
]


def measure(i: int, repeats: int) -> None:
    k, nbytes, link = POINTS[i]
    topo = Topology(k, default=parse_link(link))
    expected = ring_all_reduce(nbytes, topo.ring()).seconds

    def body(rank, pg):
        wan = EmulatedWan(GlooTransport(pg, rank=rank, size=k), topology=topo, members=list(range(k)))
        walls = []
        for _ in range(repeats):
            t = torch.ones(nbytes // 4)
            t0 = time.perf_counter()
            traffic = wan.all_reduce_sum(t)
            walls.append(time.perf_counter() - t0)
        return walls, traffic.bytes_sent

    results = run_ranks(k, body, timeout_s=600)
    per_repeat = [max(r[0][j] for r in results) for j in range(repeats)]  # the slowest rank finishes the op
    print(json.dumps({"analytic": expected, "measured": statistics.median(per_repeat), "bytes_sent": results[0][1]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--point", type=int, help=argparse.SUPPRESS)  # internal: measure one point, print JSON
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.point is not None:
        measure(args.point, args.repeats)
        return
    lines = [
        "# WAN emulation fidelity: one all-reduce, measured against the analytic ring time",
        "",
        f"Command: `{command_line()}`  ",
        f"Threads on a real gloo group over loopback; median of {args.repeats} all-reduces per point, slowest rank.",
        "",
        "| sites K | payload S | link | analytic (s) | measured median (s) | measured / analytic | bytes sent per site |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, (k, nbytes, link) in enumerate(POINTS):
        # one fresh process per point: each point's group lives and dies with its process
        proc = subprocess.run([sys.executable, __file__, "--point", str(i), "--repeats", str(args.repeats)],
                              capture_output=True, text=True, timeout=900, check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        lines.append(f"| {k} | {nbytes:,} B | {link} | {r['analytic']:.3f} | {r['measured']:.3f} "
                     f"| {r['measured'] / r['analytic']:.3f} | {r['bytes_sent']:,} |")
        print(lines[-1], flush=True)
    write_result("emulation-fidelity", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
