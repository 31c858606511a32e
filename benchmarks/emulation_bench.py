"""Emulation fidelity: measured wall time of one cross-site sync under the WAN emulator against the time its
cost model gives (``geotrain.topology``).

K ranks run as threads on a real gloo group over loopback, wrapped in the WAN emulator. Each point is one sync
of S bytes per site as a run sends it: an all-to-all of S then an all-gather of S/K among 3 or more sites, an
all-gather of S between 2. The table gives the modelled time, the median measured wall time over repeats,
and their ratio: how closely the emulator's hold follows its model on a real clock. Whether the model
follows a real network is the network lab's question (``benchmarks/netlab_bench.py``).

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
from geotrain.topology import Topology, all_to_all, parse_link, ring_all_gather  # noqa: E402
from geotrain.wan.emulator import EmulatedWan  # noqa: E402

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
    chunk = nbytes // k
    if k == 2:
        expected = ring_all_gather(nbytes, topo.ring()).seconds
    else:
        expected = all_to_all(chunk * k, topo.pairs(), sites=k).seconds + ring_all_gather(chunk, topo.ring()).seconds

    def body(rank, pg):
        wan = EmulatedWan(GlooTransport(pg, rank=rank, size=k), topology=lambda: topo)
        walls = []
        for _ in range(repeats):
            t = torch.ones(chunk * k, dtype=torch.uint8)
            t0 = time.perf_counter()
            if k == 2:
                _, traffic = wan.all_gather(t)
                sent = traffic.bytes_sent
            else:
                out, traffic = wan.all_to_all(t)
                _, gathered = wan.all_gather(out[:chunk].clone())
                sent = traffic.bytes_sent + gathered.bytes_sent
            walls.append(time.perf_counter() - t0)
        return walls, sent

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
        "# WAN emulation fidelity: one sync, measured against the emulator's cost model",
        "",
        f"Command: `{command_line()}`  ",
        f"Threads on a real gloo group over loopback; median of {args.repeats} syncs per point, slowest rank.",
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
