"""What membership adds to one outer round: ``CrossSiteComm`` sync against a bare gloo all-reduce.

Two site processes (real processes: no shared GIL) join a coordinator process on loopback through the same
wiring a site uses (``MembershipClient`` joined and formed, ``geotrain.train.site.connect``), with no WAN
emulation and no faults. Each then runs, for every payload size, ``--rounds`` rounds of

* a **sync**: ``comm.all_reduce_mean(x).wait()``: quorum, the codec's exchange (fp32 with checksums),
  the guard vote, the commit vote, with heartbeats going on in the background;
* a **bare all-reduce** of the same tensor on the same gloo group (``comm.transport.pg.allreduce``, then the
  division by the number of sites),

interleaved (the order alternates every round), each preceded by a one-float all-reduce that lines the two
sites up, so that neither figure includes waiting for the other site to arrive. The table quotes medians per
site; the difference is what membership, the codec and the guard add per outer round, and the profile says
where it goes: each request to the coordinator (quorum, guard vote, commit vote), the two collectives of the
exchange, and encode/decode, timed by wrapping the comm's own objects (no change to the code measured).

It then runs a real ``geotrain run`` (2 sites, no link emulation, no faults) and quotes each site's
``coordination_seconds`` divided by its outer rounds.

    PYTHONPATH=src python benchmarks/membership_overhead_bench.py [--rounds 60] [--numels 4096,445952]

Writes benchmarks/results/DATE-membership-overhead.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shlex
import shutil
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import command_line, write_result

SITES = 2
PHASES = ("quorum", "guard_vote", "commit_vote", "all_to_all", "all_gather", "encode", "decode", "guard_stats")


class _Phases:
    """Seconds per phase of the sync in progress (the comm thread runs one sync at a time)."""

    def __init__(self) -> None:
        self.current: dict[str, float] = {}

    def wrap(self, obj: Any, name: str, phase: Any) -> None:
        """Replace ``obj.name`` (on the instance) by a timed call; ``phase`` names the phase, or is a function
        of the call's keyword arguments that does."""
        inner = getattr(obj, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                key = phase(kwargs) if callable(phase) else phase
                self.current[key] = self.current.get(key, 0.0) + time.perf_counter() - t0

        setattr(obj, name, timed)

    def codec(self, codec: Any) -> Any:
        """The same codec, as an instance of a subclass whose encode and decode are timed (codecs are frozen
        slotted dataclasses, and error feedback accepts only a Codec)."""
        import dataclasses

        base = type(codec)
        phases = self

        def encode(self: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return base.encode(self, *args, **kwargs)
            finally:
                phases.current["encode"] = phases.current.get("encode", 0.0) + time.perf_counter() - t0

        def decode(self: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return base.decode(self, *args, **kwargs)
            finally:
                phases.current["decode"] = phases.current.get("decode", 0.0) + time.perf_counter() - t0

        timed = type(f"Timed{base.__name__}", (base,), {"encode": encode, "decode": decode})
        return timed(**{f.name: getattr(codec, f.name) for f in dataclasses.fields(codec) if f.init})

    def take(self) -> dict[str, float]:
        out, self.current = self.current, {}
        return out


def _site(site: int, address: str, token: str, pattern: str, numels: list[int], rounds: int, warmup: int,
          result_path: str) -> None:
    """One site process: join, form, connect, then the interleaved rounds; writes its timings as JSON."""
    import datetime

    import torch
    import torch.distributed as dist

    from geotrain.comm.groups import SiteEnv
    from geotrain.comm.transport import GlooTransport
    from geotrain.config import load_config
    from geotrain.membership.client import MembershipClient
    from geotrain.membership.wire import read_token_file
    from geotrain.train.site import connect

    torch.set_num_threads(1)
    config = load_config(values={"run.sites": SITES, "wan.link": "none", "comm.pattern": pattern})
    client = MembershipClient(address, read_token_file(Path(token)), site=site, worker=0, workers=1, sites=SITES,
                              settings={k: getattr(config.membership, k) for k in
                                        ("min_sites", "heartbeat_s", "heartbeat_timeout_s", "quorum_timeout_s",
                                         "join_timeout_s")})
    client.join()
    formed = client.form()
    site_pg = dist.ProcessGroupGloo(dist.HashStore(), 0, 1, datetime.timedelta(seconds=60))  # one worker per site
    env = SiteEnv(site_rank=site, sites=SITES, local_rank=0, workers=1, coordinator=address)
    comm = connect(config, env, site_pg, client, generation=formed["gen"], members=formed["members"])
    assert isinstance(comm.transport, GlooTransport), "no WAN emulation: the transport is gloo itself"
    pg = comm.transport.pg

    phases = _Phases()
    phases.wrap(client, "quorum", "quorum")
    phases.wrap(client, "vote", lambda kw: f"{kw.get('phase', 'commit')}_vote")
    phases.wrap(comm.transport, "all_to_all", "all_to_all")
    phases.wrap(comm.transport, "all_gather", "all_gather")
    phases.wrap(comm, "_report", "guard_stats")
    comm.codec = phases.codec(comm.codec)

    line_up = torch.zeros(1)

    def barrier() -> None:
        pg.allreduce([line_up]).wait()

    # one round trip to the coordinator that waits for no one: the floor of every request
    rtts = []
    for _ in range(30):
        t0 = time.perf_counter()
        client.call("heartbeat")
        rtts.append(time.perf_counter() - t0)

    out: dict[str, Any] = {"site": site, "pattern": comm.pattern, "codec": comm.codec.name,
                           "coordinator_rtt": rtts, "sizes": {}}
    gen = torch.Generator().manual_seed(1234 + site)
    for numel in numels:
        x = torch.randn(numel, generator=gen)
        buf = torch.empty(numel)
        sync_s, bare_s, profile = [], [], []
        coordination0 = client.coordination_seconds
        for i in range(warmup + rounds):
            order = ("sync", "bare") if i % 2 == 0 else ("bare", "sync")
            for what in order:
                if what == "bare":
                    buf.copy_(x)
                    barrier()
                    t0 = time.perf_counter()
                    pg.allreduce([buf]).wait()
                    buf.div_(SITES)
                    dt = time.perf_counter() - t0
                    if i >= warmup:
                        bare_s.append(dt)
                else:
                    barrier()
                    phases.take()
                    t0 = time.perf_counter()
                    comm.all_reduce_mean(x, key=f"bench{numel}").wait()
                    dt = time.perf_counter() - t0
                    taken = phases.take()
                    if i >= warmup:
                        sync_s.append(dt)
                        profile.append(taken)
            if site == 0 and (i + 1) % 20 == 0:
                print(f"   {pattern}, {numel:,} values: round {i + 1}/{warmup + rounds}", flush=True)
        assert not comm.outcomes or all(o.attempts == 1 and not o.left for o in comm.outcomes), comm.outcomes
        comm.outcomes.clear()
        out["sizes"][str(numel)] = {"sync": sync_s, "bare": bare_s, "profile": profile,
                                    "coordination_seconds": client.coordination_seconds - coordination0,
                                    "syncs": warmup + rounds}
    comm.close()
    client.close(done=True)
    Path(result_path).write_text(json.dumps(out))


def _measure(pattern: str, numels: list[int], rounds: int, warmup: int, timeout_s: float) -> list[dict[str, Any]]:
    """Start a coordinator process and the two site processes; returns each site's timings."""
    from geotrain.membership.wire import create_token_file

    tmp = Path(tempfile.mkdtemp(prefix="geotrain-bench-"))  # mode 0700: the secret stays ours
    token = tmp / "token"
    create_token_file(token)
    log = tmp / "coordinator.log"
    with open(log, "wb") as out:  # port 0: the system picks one; the coordinator says which (no port race)
        coordinator = subprocess.Popen([sys.executable, "-m", "geotrain.membership", "--host", "127.0.0.1", "--port",
                                        "0", "--token-file", str(token), "--quiet", "--parent", str(os.getpid())],
                                       stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
    procs: list[Any] = []
    try:
        deadline = time.monotonic() + 60
        while not (m := re.search(rb"listening on 127\.0\.0\.1:(\d+)", log.read_bytes())):
            if coordinator.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the coordinator did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        port = int(m.group(1))
        # the environment geotrain run gives its site processes (train/launch.py): one OpenMP thread in every
        # thread of a site, the comm thread's included, and gloo on loopback
        os.environ.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
        ctx = mp.get_context("spawn")
        paths = [tmp / f"site{k}.json" for k in range(SITES)]
        procs = [ctx.Process(target=_site, args=(k, f"127.0.0.1:{port}", str(token), pattern, numels, rounds, warmup,
                                                 str(paths[k])), name=f"bench-site{k}") for k in range(SITES)]
        for p in procs:
            p.start()
        end = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(1.0, end - time.monotonic()))
        if any(p.is_alive() for p in procs):
            raise SystemExit(f"the site processes did not finish within {timeout_s:g} s")
        if any(p.exitcode != 0 for p in procs):
            raise SystemExit(f"a site process failed (exit codes {[p.exitcode for p in procs]})")
        return [json.loads(path.read_text()) for path in paths]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        coordinator.send_signal(signal.SIGTERM)
        try:
            coordinator.wait(10)
        except subprocess.TimeoutExpired:
            coordinator.kill()
            coordinator.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)


def _real_run(out: Path, tokens: str, sync_every: int, timeout_s: float, extra: list[str]) -> tuple[str, dict[str, Any]]:
    """A real ``geotrain run`` without faults or link emulation; returns its command and summary."""
    args = ["--sites", str(SITES), "--algorithm", "diloco", "--sync-every", str(sync_every), "--no-overlap",
            "--tokens", tokens, "--link", "none", "--seed", "0", *extra, "--quiet", "--out", str(out)]
    print(f"-- geotrain run {' '.join(args)}", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "geotrain.cli", "run", *args], start_new_session=True)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the launcher stops its sites and coordinator
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise SystemExit(f"geotrain run did not finish within {timeout_s:g} s") from None
    summary = json.loads((out / "summary.json").read_text())
    if proc.returncode != 0 or not summary.get("ok"):
        raise SystemExit(f"geotrain run failed: {summary.get('error')}")
    return "geotrain run " + " ".join(shlex.quote(a) for a in args), summary


def _ms(v: float) -> str:
    return f"{1000 * v:.2f}"


def _p90(v: list[float]) -> float:
    return sorted(v)[max(0, int(round(0.9 * len(v))) - 1)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=60, help="timed rounds per payload size (after the warm-up)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--numels", default="4096,445952,1677312",
                   help="payload sizes in fp32 values (445952: the demo GPT; 1677312: d_model 256, 2 layers)")
    p.add_argument("--patterns", default="all_gather,reduce_scatter",
                   help="exchange patterns: all_gather is what 2 sites use (commit vote only); reduce_scatter what "
                        "3 or more use with a dense codec (guard vote and commit vote)")
    p.add_argument("--run-tokens", default="400k", help="token budget of the real geotrain runs")
    p.add_argument("--sync-every", type=int, default=10, help="H of the real geotrain runs")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds each part may take")
    p.add_argument("--out", default="runs/membership-overhead")
    args = p.parse_args()
    numels = [int(v) for v in args.numels.split(",")]
    patterns = args.patterns.split(",")
    load = os.getloadavg()
    t0 = time.time()

    measured: dict[str, list[dict[str, Any]]] = {}
    for pattern in patterns:
        print(f"-- {SITES} site processes, pattern {pattern}, {args.rounds} interleaved rounds per payload size",
              flush=True)
        measured[pattern] = _measure(pattern, numels, args.rounds, args.warmup, args.timeout)
    runs = [_real_run(Path(args.out) / "run", args.run_tokens, args.sync_every, args.timeout, []),
            _real_run(Path(args.out) / "run-final-eval", args.run_tokens, args.sync_every, args.timeout,
                      ["--set", "run.eval_every_tokens=1000000000000"])]
    load_end = os.getloadavg()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "sites.json").write_text(json.dumps(measured))

    first = next(iter(measured.values()))
    lines = [
        "# What membership adds per outer round: CrossSiteComm sync against a bare gloo all-reduce",
        "",
        f"Command: `{command_line()}`  ",
        f"{SITES} site processes (torch.set_num_threads(1), OMP_NUM_THREADS=1 as `geotrain run` gives its sites) "
        "and a coordinator process on loopback, no WAN emulation, no "
        f"faults, codec {first[0]['codec']}. Per pattern and payload size, {args.rounds} timed rounds after "
        f"{args.warmup} warm-up rounds, sync and bare all-reduce interleaved (order alternating), each lined up "
        f"by a one-float all-reduce first. Medians per site. Total {time.time() - t0:.0f} s; load average "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} at the start and {load_end[0]:.2f} / {load_end[1]:.2f} / "
        f"{load_end[2]:.2f} at the end on {os.cpu_count()} CPUs, shared with other work (tests, another "
        "benchmark) while it ran.",
        "",
        "Coordinator round trip that waits for no one (`heartbeat` request), median per site: "
        + "; ".join(f"{pattern}: " + ", ".join(f"site {s['site']} {_ms(statistics.median(s['coordinator_rtt']))} ms"
                                              for s in sites) for pattern, sites in measured.items()) + ".",
        "",
        "| pattern | payload (fp32 values) | site | sync median (ms) | bare all-reduce median (ms) | added (ms, "
        "target <= 30) | ratio | sync p90 (ms) | bare p90 (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for pattern, sites in measured.items():
        for numel in numels:
            for s in sites:
                r = s["sizes"][str(numel)]
                sync, bare = statistics.median(r["sync"]), statistics.median(r["bare"])
                lines.append(f"| {pattern} | {numel:,} | {s['site']} | {_ms(sync)} | {_ms(bare)} | {_ms(sync - bare)} | "
                             f"{sync / bare:.2f} | {_ms(_p90(r['sync']))} | {_ms(_p90(r['bare']))} |")
    lines += [
        "",
        "Where a sync's time goes (median per phase over the timed rounds, per site, ms). The three requests to "
        "the coordinator (quorum, guard vote, commit vote) are membership's own cost, and each includes waiting "
        "for the other site to make the same request; the exchange is the codec's pattern (an all-gather, or an "
        "all-to-all and an all-gather, of encoded payloads instead of one all-reduce); `guard_stats` is the "
        "guard's finiteness count and sum of squares of each received payload or chunk; `other` is the rest of "
        "the sync (summing, copies, handing the work to the comm thread and back).",
        "",
        "| pattern | payload | site | " + " | ".join(PHASES) + " | coordinator requests (sum) | other | sync |",
        "|---|---|---|" + "---|" * (len(PHASES) + 3),
    ]
    for pattern, sites in measured.items():
        for numel in numels:
            for s in sites:
                r = s["sizes"][str(numel)]
                prof = r["profile"]
                med = {ph: statistics.median(p.get(ph, 0.0) for p in prof) for ph in PHASES}
                requests = statistics.median(p.get("quorum", 0.0) + p.get("guard_vote", 0.0) + p.get("commit_vote", 0.0)
                                             for p in prof)
                other = statistics.median(t - sum(p.values()) for t, p in zip(r["sync"], prof))
                lines.append(f"| {pattern} | {numel:,} | {s['site']} | " + " | ".join(_ms(med[ph]) for ph in PHASES)
                             + f" | {_ms(requests)} | {_ms(other)} | {_ms(statistics.median(r['sync']))} |")
    lines += [
        "",
        "Coordination time the client itself counted (`coordination_seconds`: time in blocking requests) per sync "
        "in these rounds (warm-up included): "
        + "; ".join(f"{pattern} site {s['site']}: " + ", ".join(
            f"{numel:,} values {_ms(s['sizes'][str(numel)]['coordination_seconds'] / s['sizes'][str(numel)]['syncs'])} ms"
            for numel in numels) for pattern, sites in measured.items() for s in sites) + ".",
        "",
        "## Real runs",
        "",
        "`coordination_seconds` (summary.json, per site) counts every blocking request of the site's worker: each "
        "sync's quorum and votes, but also the evaluations' sums and the step-time agreement at the start, and it "
        "includes waiting at those barriers for the other site (the two sites' compute differs from round to round "
        "on a shared machine, and without overlap each sync waits for the slower one). The second run evaluates "
        "only at the end.",
        "",
        "| run | site | coordination_seconds | outer rounds | per round (ms) | comm wait (s) | wall (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for command, run in runs:
        for s in run["per_site"]:
            lines.append(f"| `{command}` | {s['site']} | {s['coordination_seconds']:.3f} | {s['outer_rounds']} | "
                         f"{_ms(s['coordination_seconds'] / s['outer_rounds'])} | {s['comm_seconds']:.2f} | "
                         f"{s['wall_seconds']:.1f} |")
    lines.append("")
    write_result("membership-overhead", "\n".join(lines))


if __name__ == "__main__":
    main()
