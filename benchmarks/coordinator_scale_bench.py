"""Coordinator scale: one real coordinator process and N sites speaking the real wire protocol to it.

Acceptance item G of the fault-tolerance issue: the coordinator holds 1,000 sites, forms a quorum in under
1 s and uses less than one core. This starts ``python -m geotrain.membership`` (what ``geotrain coordinator``
runs) on loopback with a fresh token file, then drives N sites from this process with asyncio. Each site
does what ``MembershipClient`` does, through ``geotrain.membership.wire``:

* a *session* connection: ``client_handshake`` (the real one, run in a small thread pool), ``join`` with the
  run's model fingerprint and membership settings, then a heartbeat ``heartbeat_s`` after each reply;
* a *request* connection: ``client_handshake``, ``attach``, ``form`` once, then for every round a ``quorum``
  and a ``commit`` vote. The vote carries what ``comm.collectives`` sends in the all-gather pattern: the
  guard's statistics (3 floats per site, this site reporting on the next one in the ring), the data position
  (a PCG64 state) and a transfer deadline. All sites ask for the quorum together; once every site holds the
  answer (the exchange between the quorum and the vote is itself a collective), all vote together.

Measured for each N, on a fresh coordinator:

* join: from the first connection to every site joined, attached and formed;
* quorum time of a round: from the last site's quorum request to every site holding the answer; the same for
  the vote; median and max over the rounds;
* the coordinator's CPU, (utime + stime) from /proc/PID/stat over wall time, in cores: with heartbeats only,
  over the steady phase (heartbeats and rounds), and the peak over 0.5 s windows; its resident memory;
* this driver's own CPU, which says whether one driver process kept up.

    PYTHONPATH=src:tests .venv/bin/python benchmarks/coordinator_scale_bench.py [--sites 10,100,1000] [--rounds 10]

``--profile DIR`` runs the coordinator under cProfile and writes DIR/coordinator-N.prof. ``--deadline-s``
bounds the whole run; the coordinator is stopped by its PID when the benchmark ends, fails or is interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import RESULTS, ROOT, command_line, write_result

from geotrain.membership.wire import MAX_FRAME, Channel, WireError, client_handshake, create_token_file

HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SAMPLE_S = 0.5
"""CPU sampling window (seconds) for the peak."""
STATS = 3
"""Floats per site in the guard's statistics (``geotrain.comm.guard.STATS``)."""


# -- the coordinator process -----------------------------------------------------------------------------------

class CoordinatorProcess:
    """``python -m geotrain.membership`` on loopback, its log in a file; stopped by its PID."""

    def __init__(self, workdir: Path, token: Path, *, hours: float, profile: Path | None) -> None:
        self.workdir = workdir
        self.log_path = workdir / "coordinator.log"
        env = dict(os.environ)
        # This checkout's sources first, whatever the interpreter's editable install points at.
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
        prefix = [sys.executable] + (["-m", "cProfile", "-o", str(profile)] if profile is not None else [])
        cmd = [*prefix, "-m", "geotrain.membership", "--token-file", str(token), "--host", HOST, "--port", "0",
               "--events", str(workdir / "events.jsonl"), "--hours", f"{hours:.6f}", "--parent", str(os.getpid())]
        self._log = open(self.log_path, "wb")  # a file, not a pipe: a pipe nobody reads would stall it
        # Its own session: a Ctrl+C in the terminal reaches the benchmark, which stops it in order.
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        self.pid = self.proc.pid

    def wait_ready(self, timeout_s: float) -> int:
        """The port it listens on (it binds port 0 and prints the port it got)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.log_path.read_text(errors="replace").splitlines():
                if "listening on" in line:
                    return int(line.rsplit(":", 1)[1])
            if self.proc.poll() is not None:
                raise RuntimeError(f"the coordinator exited with {self.proc.returncode}:\n{self.log_tail()}")
            time.sleep(0.05)
        raise RuntimeError(f"the coordinator did not listen within {timeout_s:g} s:\n{self.log_tail()}")

    def cpu_seconds(self) -> float:
        """utime + stime so far (fields 14 and 15 of /proc/PID/stat)."""
        with open(f"/proc/{self.pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def schedstat(self) -> tuple[float, float]:
        """Seconds its main thread (the event loop) ran, and waited ready to run for a core, from
        /proc/PID/schedstat: nanosecond counters, finer than the clock ticks of /proc/PID/stat."""
        with open(f"/proc/{self.pid}/schedstat", encoding="ascii") as f:
            ran, waited = f.read().split()[:2]
        return int(ran) / 1e9, int(waited) / 1e9

    def memory(self) -> tuple[int, int]:
        """(resident bytes now, peak resident bytes) from /proc/PID/status."""
        values = {}
        with open(f"/proc/{self.pid}/status", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0]) * 1024
        return values["VmRSS"], values["VmHWM"]

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> int | None:
        """SIGINT (it closes its server; cProfile writes its file), then SIGKILL if it does not end."""
        try:
            if self.proc.poll() is None:
                os.kill(self.pid, signal.SIGINT)
                try:
                    self.proc.wait(timeout=30.0)
                except subprocess.TimeoutExpired:
                    os.kill(self.pid, signal.SIGKILL)
                    self.proc.wait(timeout=10.0)
            return self.proc.returncode
        finally:
            self._log.close()


# -- a site ----------------------------------------------------------------------------------------------------

def _open(port: int, secret: bytes) -> Channel:
    """One authenticated connection, exactly as ``MembershipClient._open`` makes it (blocking)."""
    sock = socket.create_connection((HOST, port), timeout=10.0)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client_handshake(sock, secret, address=f"{HOST}:{port}")
    except BaseException:
        sock.close()
        raise


@dataclass
class _Link:
    """A channel after its handshake, driven by asyncio: one request and its reply at a time."""

    channel: Channel
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @classmethod
    async def wrap(cls, channel: Channel) -> _Link:
        reader, writer = await asyncio.open_connection(sock=channel.sock, limit=1 << 20)
        return cls(channel, reader, writer)

    async def call(self, msg: dict[str, Any]) -> tuple[dict[str, Any], float, float]:
        """The reply, the time the request was handed to the kernel and the time the reply was read."""
        self.writer.write(self.channel.seal(msg))
        sent = time.monotonic()
        await self.writer.drain()
        n = int.from_bytes(await self.reader.readexactly(4), "big")
        if n > MAX_FRAME + 32:
            raise WireError(f"frame of {n} bytes")
        reply = self.channel.open(await self.reader.readexactly(n))
        return reply, sent, time.monotonic()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


@dataclass
class Site:
    id: int
    sites: int
    session: _Link | None = None
    request: _Link | None = None
    joined_at: float = 0.0
    attached_at: float = 0.0
    gen: int = -1
    heartbeats: list[tuple[float, float]] = field(default_factory=list)
    """(time of the reply, round-trip seconds) of every heartbeat."""

    def connect(self, port: int, secret: bytes, join: dict[str, Any]) -> tuple[Channel, Channel]:
        """Blocking, in a pool thread: the session connection joins, the request connection attaches."""
        session = _open(port, secret)
        try:
            session.send(join)
            reply = session.recv()
            if "refused" in reply:
                raise RuntimeError(f"site {self.id} refused: {reply['refused']}")
            self.joined_at = time.monotonic()
            request = _open(port, secret)
            try:
                request.send({"op": "attach", "site": self.id, "worker": 0, "incarnation": join["incarnation"]})
                reply = request.recv()
                if "refused" in reply:
                    raise RuntimeError(f"site {self.id} attach refused: {reply['refused']}")
            except BaseException:
                request.close()
                raise
            self.attached_at = time.monotonic()
            return session, request
        except BaseException:
            session.close()
            raise

    async def beat(self, period: float, stop: asyncio.Event) -> None:
        """Heartbeats like ``MembershipClient._beat``: one ``period`` after the last reply, until ``stop``."""
        assert self.session is not None
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=period)
            if stop.is_set():
                return
            reply, sent, got = await self.session.call({"op": "heartbeat"})
            if "gen" not in reply:
                raise RuntimeError(f"site {self.id}: heartbeat answered {reply}")
            self.heartbeats.append((got, got - sent))

    def vote_message(self, sync: int) -> dict[str, Any]:
        """A commit vote as ``comm.collectives`` sends it in the all-gather pattern."""
        stats = [0.0] * (STATS * self.sites)
        nxt = (self.id + 1) % self.sites  # each sender is reported once, by the site before it in the ring
        stats[STATS * nxt: STATS * nxt + STATS] = [0.0, 0.0, random.uniform(1e2, 1e4)]
        position = {"rng": {"bit_generator": "PCG64", "state": {"state": random.getrandbits(128),
                                                                "inc": random.getrandbits(128) | 1},
                            "has_uint32": 0, "uinteger": 0}}
        return {"op": "vote", "sync": sync, "gen": self.gen, "attempt": 0, "phase": "commit", "ok": True,
                "stats": stats, "position": position, "deadline_s": 30.0 + random.uniform(0.0, 5.0)}

    def close(self) -> None:
        for link in (self.session, self.request):
            if link is not None:
                link.close()


# -- measuring -------------------------------------------------------------------------------------------------

class Sampler:
    """The coordinator's and this process's CPU seconds, every SAMPLE_S, for window peaks."""

    def __init__(self, coordinator: CoordinatorProcess) -> None:
        self.coordinator = coordinator
        self.samples: list[tuple[float, float, float, float, float]] = []
        """(monotonic time, coordinator CPU seconds, driver CPU seconds, coordinator run-queue seconds,
        coordinator event-loop run seconds)."""

    def sample(self, *, keep: bool = False) -> tuple[float, float, float, float, float]:
        """One reading; ``keep``: one of the periodic readings the peak is taken over."""
        t = time.monotonic()
        own = resource.getrusage(resource.RUSAGE_SELF)
        ran, waited = self.coordinator.schedstat()
        s = (t, self.coordinator.cpu_seconds(), own.ru_utime + own.ru_stime, waited, ran)
        if keep:
            self.samples.append(s)
        return s

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.sample(keep=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=SAMPLE_S)

    @staticmethod
    def mean(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, float, float]:
        """(coordinator cores, driver cores, coordinator run-queue fraction) between two samples."""
        dt = b[0] - a[0]
        return (b[1] - a[1]) / dt, (b[2] - a[2]) / dt, (b[3] - a[3]) / dt

    def peak(self, start: float, end: float) -> float:
        """The coordinator's highest CPU over one periodic sampling window between ``start`` and ``end``."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        return max((self.mean(a, b)[0] for a, b in zip(inside, inside[1:])), default=float("nan"))


@dataclass
class Result:
    sites: int
    join_s: float = float("nan")
    attach_s: float = float("nan")
    form_s: float = float("nan")
    quorum_s: list[float] = field(default_factory=list)
    vote_s: list[float] = field(default_factory=list)
    quorum_first_s: list[float] = field(default_factory=list)
    """From the last site's quorum request to the first site holding the answer: the decision itself."""
    vote_first_s: list[float] = field(default_factory=list)
    quorum_spread_s: list[float] = field(default_factory=list)
    """From the first to the last site's quorum request: how bunched the requests were."""
    quorum_cpu_s: list[float] = field(default_factory=list)
    """Coordinator CPU seconds from before the first quorum request to the last answer (heartbeats included)."""
    vote_cpu_s: list[float] = field(default_factory=list)
    quorum_driver_s: list[float] = field(default_factory=list)
    """This process's CPU seconds over the same span: near the span's length, the driver was the limit."""
    vote_driver_s: list[float] = field(default_factory=list)
    round_rss: list[int] = field(default_factory=list)
    """The coordinator's resident bytes after each round."""
    cpu_join: float = float("nan")
    cpu_heartbeats: float = float("nan")
    cpu_steady: float = float("nan")
    cpu_peak: float = float("nan")
    driver_steady: float = float("nan")
    run_queue_steady: float = float("nan")
    rss: int = 0
    rss_peak: int = 0
    heartbeat_rtt_median_s: float = float("nan")
    heartbeat_rtt_max_s: float = float("nan")
    heartbeats: int = 0
    completed: bool = False
    note: str = ""


def _fingerprint(sites: int, heartbeat_s: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """The demo run's model fingerprint and membership settings, as ``train.site`` sends them."""
    import torch

    from geotrain.config import load_config
    from geotrain.models.gpt import GPT
    from geotrain.train.site import model_fingerprint

    config = load_config(values={"run.sites": sites, "membership.heartbeat_s": heartbeat_s})
    with torch.device("meta"):  # names and shapes only
        model = GPT(config.model)
    settings = {k: getattr(config.membership, k) for k in
                ("min_sites", "heartbeat_s", "heartbeat_timeout_s", "quorum_timeout_s", "join_timeout_s")}
    return model_fingerprint(config, model), settings


async def _gather(what: str, coros: list, timeout_s: float) -> list:
    try:
        return await asyncio.wait_for(asyncio.gather(*coros), timeout=timeout_s)
    except asyncio.TimeoutError:
        raise RuntimeError(f"{what} did not finish within {timeout_s:g} s") from None


async def measure(n: int, *, port: int, secret: bytes, coordinator: CoordinatorProcess, args: argparse.Namespace,
                  result: Result) -> None:
    """Join N sites, form, heartbeat, run the rounds; fills ``result`` as it goes."""
    fingerprint, settings = _fingerprint(n, args.heartbeat_s)
    sites = [Site(k, n) for k in range(n)]
    sampler = Sampler(coordinator)
    stop_sampling, stop_beating = asyncio.Event(), asyncio.Event()
    sampling = asyncio.get_running_loop().create_task(sampler.run(stop_sampling))
    beating: list[asyncio.Task] = []
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=args.join_concurrency, thread_name_prefix="handshake")
    step_s = args.step_timeout_s
    try:
        async def join(site: Site) -> None:
            msg = {"op": "join", "site": site.id, "worker": 0, "workers": 1, "sites": n,
                   "incarnation": os.urandom(8).hex(), "intent": "start", "fingerprint": fingerprint,
                   "settings": settings, "view": {"gen": -1, "members": [], "round": 0, "decisions": [],
                                                  "launch": None}, "resume_rounds": []}
            session, request = await loop.run_in_executor(pool, site.connect, port, secret, msg)
            site.session, site.request = await _Link.wrap(session), await _Link.wrap(request)
            beating.append(loop.create_task(site.beat(args.heartbeat_s, stop_beating)))

        print(f"[N={n}] joining {n} sites ({args.join_concurrency} handshakes in flight)", flush=True)
        t0 = sampler.sample()
        await _gather("joining", [join(s) for s in sites], max(step_s, n * 0.05))
        result.join_s = max(s.joined_at for s in sites) - t0[0]
        result.attach_s = max(s.attached_at for s in sites) - t0[0]
        print(f"[N={n}] all joined in {result.join_s:.2f} s (attached {result.attach_s:.2f} s)", flush=True)

        replies = await _gather("form", [s.request.call({"op": "form"}) for s in sites], step_s)
        for s, (reply, _, _) in zip(sites, replies):
            if reply.get("members") != list(range(n)):
                raise RuntimeError(f"site {s.id}: form answered {str(reply)[:300]}")
            s.gen = reply["gen"]
        result.form_s = max(got for _, _, got in replies) - t0[0]
        t_formed = sampler.sample()
        result.cpu_join = Sampler.mean(t0, t_formed)[0]
        print(f"[N={n}] formed generation {sites[0].gen} in {result.form_s:.2f} s from the first connection; "
              f"coordinator CPU while joining {result.cpu_join:.2f} cores", flush=True)

        # Heartbeats only: every site has beaten a few times before this phase is measured.
        await asyncio.sleep(args.heartbeat_s * 2)
        hb0 = sampler.sample()
        await asyncio.sleep(args.idle_s)
        hb1 = sampler.sample()
        result.cpu_heartbeats = Sampler.mean(hb0, hb1)[0]
        print(f"[N={n}] heartbeats only ({args.heartbeat_s:g} s period): coordinator "
              f"{result.cpu_heartbeats:.3f} cores", flush=True)

        for r in range(args.rounds):
            broken = [t for t in beating if t.done()]
            if broken:
                broken[0].result()  # raises what stopped a heartbeat
                raise RuntimeError("a site stopped heartbeating")
            before = sampler.sample()
            quorum = await _gather(f"quorum {r}", [s.request.call({"op": "quorum", "sync": r, "attempt": 0,
                                                                   "gen": s.gen, "round": r}) for s in sites], step_s)
            for s, (reply, _, _) in zip(sites, quorum):
                if reply.get("gen") != s.gen or reply.get("members") != list(range(n)) or reply.get("left"):
                    raise RuntimeError(f"site {s.id}: quorum {r} answered {str(reply)[:300]}")
            sends = [sent for _, sent, _ in quorum]
            result.quorum_s.append(max(got for _, _, got in quorum) - max(sends))
            result.quorum_first_s.append(min(got for _, _, got in quorum) - max(sends))
            result.quorum_spread_s.append(max(sends) - min(sends))
            between = sampler.sample()
            votes = await _gather(f"vote {r}", [s.request.call(s.vote_message(r)) for s in sites], step_s)
            for s, (reply, _, _) in zip(sites, votes):
                stats = reply.get("stats") or []
                if not reply.get("commit") or len(stats) != STATS * n:
                    raise RuntimeError(f"site {s.id}: vote {r} answered {str(reply)[:300]}")
            result.vote_s.append(max(got for _, _, got in votes) - max(sent for _, sent, _ in votes))
            result.vote_first_s.append(min(got for _, _, got in votes) - max(sent for _, sent, _ in votes))
            after = sampler.sample()
            result.quorum_cpu_s.append(between[4] - before[4])
            result.vote_cpu_s.append(after[4] - between[4])
            result.quorum_driver_s.append(between[2] - before[2])
            result.vote_driver_s.append(after[2] - between[2])
            result.round_rss.append(coordinator.memory()[0])
            print(f"[N={n}] round {r + 1}/{args.rounds}: quorum {1e3 * result.quorum_s[-1]:.1f} ms (first answer "
                  f"{1e3 * result.quorum_first_s[-1]:.1f} ms; requests spread over "
                  f"{1e3 * result.quorum_spread_s[-1]:.1f} ms), vote {1e3 * result.vote_s[-1]:.1f} ms (first "
                  f"{1e3 * result.vote_first_s[-1]:.1f} ms); coordinator CPU {1e3 * result.quorum_cpu_s[-1]:.0f} + "
                  f"{1e3 * result.vote_cpu_s[-1]:.0f} ms, driver {1e3 * result.quorum_driver_s[-1]:.0f} + "
                  f"{1e3 * result.vote_driver_s[-1]:.0f} ms, RSS {result.round_rss[-1] / 2**20:.0f} MiB", flush=True)
            await asyncio.sleep(args.round_gap_s)
        steady1 = sampler.sample()
        result.cpu_steady, result.driver_steady, result.run_queue_steady = Sampler.mean(hb0, steady1)
        result.cpu_peak = sampler.peak(hb0[0], steady1[0])
        result.rss, result.rss_peak = coordinator.memory()
        rtts = [rtt for s in sites for t, rtt in s.heartbeats if hb0[0] <= t <= steady1[0]]
        result.heartbeats = len(rtts)
        if rtts:
            result.heartbeat_rtt_median_s, result.heartbeat_rtt_max_s = statistics.median(rtts), max(rtts)
        print(f"[N={n}] steady phase: coordinator {result.cpu_steady:.3f} cores (peak {result.cpu_peak:.2f} over "
              f"{SAMPLE_S:g} s), waiting for a core {result.run_queue_steady:.2f} of the time; driver "
              f"{result.driver_steady:.2f} cores; RSS {result.rss / 2**20:.1f} MiB "
              f"(peak {result.rss_peak / 2**20:.1f})", flush=True)

        # The end of a run: every site says it is done, as MembershipClient.close(done=True) does.
        stop_beating.set()
        await _gather("heartbeats stopping", beating, step_s)
        done = await _gather("done", [s.request.call({"op": "done"}) for s in sites], step_s)
        if not all(reply.get("ok") for reply, _, _ in done):
            raise RuntimeError("a site's done was not acknowledged")
        result.completed = True
    finally:
        stop_beating.set()
        stop_sampling.set()
        for t in beating:
            t.cancel()
        await asyncio.gather(*beating, sampling, return_exceptions=True)
        for s in sites:
            s.close()
        pool.shutdown(wait=False, cancel_futures=True)


# -- the report ------------------------------------------------------------------------------------------------

def _ms(values: list[float]) -> str:
    return f"{1e3 * statistics.median(values):.1f} / {1e3 * max(values):.1f}" if values else "-"


def _num(x: float, fmt: str) -> str:
    return "-" if x != x else format(x, fmt)


def report(results: list[Result], args: argparse.Namespace, *, load: tuple[tuple, tuple], wall_s: float) -> str:
    done = [r for r in results if r.completed]
    big = max(done, key=lambda r: r.sites, default=None)
    lines = [
        "# Coordinator scale: N sites on one coordinator process",
        "",
        f"Command: `{command_line()}`  ",
        f"One `python -m geotrain.membership` process on loopback; the N sites are asyncio tasks in the benchmark "
        f"process, each with a session connection (handshake, join, a heartbeat {args.heartbeat_s:g} s after each "
        f"reply, the default membership.heartbeat_s) and a request connection (attach, form, then per round a "
        f"quorum and a commit vote carrying the guard's statistics, 3 floats per site, and the data position). "
        f"{args.rounds} rounds, {args.round_gap_s:g} s apart; handshakes run {args.join_concurrency} at a time.  ",
        f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}, shared with other work while this ran (load average "
        f"{load[0][0]:.2f} at the start, {load[1][0]:.2f} at the end); coordinator and driver share those cores. "
        f"Total {wall_s:.0f} s.",
        "",
        "Quorum (vote) time: from the last site's quorum (vote) request to every site holding the answer, "
        "median / max over the rounds. Coordinator CPU: (utime + stime) from /proc/PID/stat over wall time, in "
        f"cores; steady = heartbeats and rounds together, peak = the highest {SAMPLE_S:g} s window of that phase. "
        "Waiting for a core: the fraction of the steady phase the coordinator was ready to run but had no core "
        "(/proc/PID/schedstat), the share of its latency that the machine's other load caused. Driver: this "
        "benchmark process's CPU over the steady phase.",
        "",
        "| sites N | join all (s) | formed (s) | quorum median / max (ms) | vote median / max (ms) "
        "| coordinator CPU, heartbeats only | steady | peak | waiting for a core | RSS (MiB) | driver CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if not r.completed:
            lines.append(f"| {r.sites} | not completed: {r.note or 'stopped'} ||||||||||")
            continue
        lines.append(f"| {r.sites} | {r.join_s:.2f} | {r.form_s:.2f} | {_ms(r.quorum_s)} | {_ms(r.vote_s)} "
                     f"| {r.cpu_heartbeats:.3f} | {r.cpu_steady:.3f} | {r.cpu_peak:.2f} | {r.run_queue_steady:.2f} "
                     f"| {r.rss / 2**20:.1f} (peak {r.rss_peak / 2**20:.1f}) | {r.driver_steady:.2f} |")
    if big is not None:
        quorum_max = max(big.quorum_s)
        lines += [
            "",
            f"Acceptance (item G), at N = {big.sites}: {big.sites} sites held through {args.rounds} rounds "
            f"({'met' if big.sites >= 1000 else 'not met: fewer than 1,000 sites'}); quorum in "
            f"{1e3 * statistics.median(big.quorum_s):.0f} ms median, {1e3 * quorum_max:.0f} ms max "
            f"({'met' if quorum_max < 1.0 else 'not met'}: under 1 s); coordinator {big.cpu_steady:.2f} cores "
            f"steady, {big.cpu_peak:.2f} peak ({'met' if big.cpu_steady < 1.0 else 'not met'}: under one core).",
        ]
    if done:
        lines += [
            "",
            "In the tables per N below, first answer: from the last request to the first site holding the answer (the decision and one "
            "reply); the rest of the quorum (vote) time is the coordinator sending N replies and this one "
            "process reading them. Coordinator CPU per quorum (vote): the time its event loop ran (/proc/PID/schedstat) from just before "
            "the first request to the last answer, heartbeats in that span included: what the step costs it, "
            "whatever the machine's load. Driver: this process's CPU over the same span (building, sealing and "
            "sending the N requests, reading the N answers); the span itself starts before the first request, "
            "so it is longer than the quorum (vote) time. A heartbeat's round trip is measured here, so it "
            "includes this process's own delays.",
        ]
    for r in done:
        lines += [
            "",
            f"## N = {r.sites}",
            "",
            f"Joined {r.join_s:.2f} s, attached {r.attach_s:.2f} s, formed {r.form_s:.2f} s after the first "
            f"connection (coordinator {r.cpu_join:.2f} cores meanwhile). Heartbeats in the steady phase: "
            f"{r.heartbeats}, round trip median {_num(1e3 * r.heartbeat_rtt_median_s, '.2f')} ms, "
            f"max {_num(1e3 * r.heartbeat_rtt_max_s, '.1f')} ms.",
            "",
            "| round | quorum requests spread over (ms) | quorum: first answer / all (ms) "
            "| vote: first answer / all (ms) | coordinator CPU, quorum (ms) | vote (ms) | driver CPU, quorum (ms) "
            "| vote (ms) | RSS after the round (MiB) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [f"| {i + 1} | {1e3 * s:.1f} | {1e3 * qf:.1f} / {1e3 * q:.1f} | {1e3 * vf:.1f} / {1e3 * v:.1f} "
                  f"| {1e3 * qc:.0f} | {1e3 * vc:.0f} | {1e3 * qd:.0f} | {1e3 * vd:.0f} | {m / 2**20:.1f} |"
                  for i, (s, qf, q, vf, v, qc, vc, qd, vd, m) in enumerate(zip(
                      r.quorum_spread_s, r.quorum_first_s, r.quorum_s, r.vote_first_s, r.vote_s, r.quorum_cpu_s,
                      r.vote_cpu_s, r.quorum_driver_s, r.vote_driver_s, r.round_rss))]
    return "\n".join(lines) + "\n"


def plot(results: list[Result], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    done = [r for r in results if r.completed]
    xs = [r.sites for r in done]
    fig = Figure(figsize=(10, 4), dpi=120)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, get, style in (("quorum median", lambda r: statistics.median(r.quorum_s), "o-"),
                             ("quorum max", lambda r: max(r.quorum_s), "o--"),
                             ("vote median", lambda r: statistics.median(r.vote_s), "s-"),
                             ("vote max", lambda r: max(r.vote_s), "s--")):
        left.plot(xs, [1e3 * get(r) for r in done], style, label=name)
    left.axhline(1000, color="grey", lw=0.8, ls=":", label="target: 1 s")
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("sites N")
    left.set_ylabel("last request to last answer (ms)")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    for name, get, style in (("heartbeats only", lambda r: r.cpu_heartbeats, "o-"),
                             ("steady (heartbeats + rounds)", lambda r: r.cpu_steady, "s-"),
                             (f"peak ({SAMPLE_S:g} s window)", lambda r: r.cpu_peak, "^--")):
        right.plot(xs, [get(r) for r in done], style, label=name)
    right.axhline(1.0, color="grey", lw=0.8, ls=":", label="target: one core")
    right.set_xscale("log")
    right.set_xlabel("sites N")
    right.set_ylabel("coordinator CPU (cores)")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.suptitle("geotrain coordinator: one process, N sites over loopback")
    fig.savefig(png, bbox_inches="tight")
    print(f"wrote {png}")


# -- main ------------------------------------------------------------------------------------------------------

def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", default="10,100,1000", help="comma-separated site counts N")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--heartbeat-s", type=float, default=1.0, help="membership.heartbeat_s of the sites")
    p.add_argument("--idle-s", type=float, default=5.0, help="seconds of heartbeats only before the rounds")
    p.add_argument("--round-gap-s", type=float, default=0.5, help="seconds between rounds")
    p.add_argument("--join-concurrency", type=int, default=32, help="handshakes in flight while joining")
    p.add_argument("--step-timeout-s", type=float, default=60.0, help="longest wait for one step of all sites")
    p.add_argument("--deadline-s", type=float, default=900.0, help="the whole benchmark ends within this")
    p.add_argument("--profile", type=Path, help="run the coordinator under cProfile; .prof files go here")
    p.add_argument("--no-write", action="store_true", help="print only; write no result files")
    args = p.parse_args()
    counts = [int(x) for x in args.sites.split(",")]
    if not counts or min(counts) < 1 or max(counts) > 1000 or args.rounds < 1 or args.join_concurrency < 1:
        p.error("--sites must be 1 to 1000, --rounds and --join-concurrency at least 1")

    # Each site holds two sockets here and two in the coordinator (which inherits this limit).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * max(counts) + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also what the coordinator starts with

    started = time.monotonic()
    deadline = started + args.deadline_s
    load_start = os.getloadavg()
    results: list[Result] = []
    coordinator: CoordinatorProcess | None = None
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="geotrain-coordinator-scale-") as tmp:
        token = Path(tmp) / "token"
        secret = create_token_file(token)
        try:
            for n in counts:
                result = Result(n)
                results.append(result)
                left = deadline - time.monotonic()
                if left < 10:
                    result.note = "out of time (--deadline-s)"
                    print(f"[N={n}] skipped: {result.note}", flush=True)
                    continue
                workdir = Path(tmp) / f"n{n}"
                workdir.mkdir()
                profile = None if args.profile is None else args.profile.resolve() / f"coordinator-{n}.prof"
                # --parent and --hours: it ends by itself even if this process is killed without a chance to
                # stop it.
                coordinator = CoordinatorProcess(workdir, token, hours=(left + 60) / 3600, profile=profile)
                print(f"[N={n}] coordinator pid {coordinator.pid}", flush=True)
                try:
                    port = coordinator.wait_ready(min(30.0, left))
                    asyncio.run(asyncio.wait_for(
                        measure(n, port=port, secret=secret, coordinator=coordinator, args=args, result=result),
                        timeout=deadline - time.monotonic()))
                except Exception as e:  # noqa: BLE001 - any failure of one N is reported, and the next N runs
                    result.note = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                    if isinstance(e, asyncio.TimeoutError):
                        result.note = "out of time (--deadline-s)"
                    print(f"[N={n}] failed: {result.note}\ncoordinator log:\n{coordinator.log_tail()}", flush=True)
                finally:
                    code = coordinator.stop()
                    coordinator = None
                    if profile is not None:
                        print(f"[N={n}] profile: {profile} (coordinator exit code {code})", flush=True)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            return 130
        finally:
            if coordinator is not None:
                coordinator.stop()
    wall_s = time.monotonic() - started
    text = report(results, args, load=(load_start, os.getloadavg()), wall_s=wall_s)
    print(text)
    if not args.no_write and any(r.completed for r in results):
        path = write_result("coordinator-scale", text)
        plot(results, path.with_suffix(".png"))
    return 0 if all(r.completed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
