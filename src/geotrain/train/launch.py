"""Run every site of a run as processes on this machine, watch them, and write the run's files.

The launcher starts the run's coordinator (``python -m geotrain.membership``, on loopback, with a fresh
secret in a private temporary directory), then ``sites x workers_per_site`` worker processes (each its own
process group leader, so a terminal's Ctrl+C reaches only the launcher). It shows live progress from the
sites' record files and carries out the faults scheduled with ``--fault`` that come from outside a site
(kill, rejoin, partition, heal, and killing the coordinator, which it then starts again).

* A site that fails (or is killed) does not end the run: the others go on without it while at least
  ``membership.min_sites`` remain, and the summary names it. The run succeeds when the sites still in it
  finish.
* Ctrl+C: every process gets SIGTERM, then SIGKILL after a grace period; a partial summary is written.
* A run that stops making progress for longer than its quorum deadline is stopped as hung.
* A coordinator that dies is started again on the same port and secret; the sites reconnect to it.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geotrain.config import Config
from geotrain.errors import ConfigError
from geotrain.files import write_json_atomic
from geotrain.summary import read_site_records
from geotrain.train.outputs import write_run_files
from geotrain.train.site import SiteTask

__all__ = ["MAX_LOCAL_WORKERS", "RunOutcome", "check_launch", "check_out_dir", "launch"]

GRACE_SECONDS = 5.0
POLL_SECONDS = 0.05
MAX_LOCAL_WORKERS = 64
"""Most worker processes one machine is asked to start (sites x workers_per_site): each is a Python process
with its own copy of the model. Larger runs go to real clusters (torchrun, one job per site), and
``geotrain plan`` studies them at any size."""
MAX_COORDINATOR_RESTARTS = 20


@dataclass(slots=True)
class RunOutcome:
    summary: dict[str, Any]
    exit_code: int
    out: Path


def check_out_dir(out: Path) -> None:
    """Create the output directory and prove it is writable, or raise ConfigError naming the fix."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"cannot write to output directory {str(out)!r} ({e.strerror or e}); choose another with --out",
            field="run.out",
        ) from None


def check_launch(config: Config, *, demo: bool = True) -> None:
    """What a run on this machine needs beyond a valid config, checked before anything starts: ConfigError
    naming the field otherwise. ``demo``: the run trains the demo GPT (no workload of the user's)."""
    if config.model.params is not None:
        raise ConfigError("sets the model's size for geotrain plan only; a run's model size comes from n_layer, "
                          "n_head, d_model and seq_len: drop model.params (or plan this file with geotrain plan)",
                          field="model.params")
    processes = config.run.sites * config.run.workers_per_site
    if processes > MAX_LOCAL_WORKERS:
        raise ConfigError(
            f"{config.run.sites} sites x {config.run.workers_per_site} workers would start {processes:,} processes "
            f"on this machine, more than {MAX_LOCAL_WORKERS}; lower --sites or --workers-per-site, run sites with "
            "torchrun on real clusters, or study the run with geotrain plan", field="run.sites")
    if config.membership.min_sites > config.run.sites:
        raise ConfigError(f"min_sites={config.membership.min_sites} exceeds the run's {config.run.sites} sites",
                          field="membership.min_sites")
    if config.data.path is not None:
        try:
            found = Path(config.data.path).exists()
        except OSError as e:  # a name too long for the file system, say
            raise ConfigError(f"cannot look at {config.data.path!r} ({e.strerror or e})", field="data.path") from None
        if not found:
            raise ConfigError(f"{config.data.path!r} does not exist; give a text file or a directory of text "
                              "files, or leave data.path unset for Python's standard library", field="data.path")
    if config.run.tensorboard:  # before any worker starts: each would fail on its own
        from geotrain.train.sinks import check_tensorboard

        check_tensorboard()
    if demo:  # the demo GPT is the model config.layout() describes: its settings must fit it
        config.algorithm().pattern(config, config.layout())
    if config.run.device == "cuda":
        gpus_for(config)


def gpus_for(config: Config) -> tuple[int, str | None]:
    """GPUs the local launcher spreads the workers over (round-robin: global worker g gets GPU g mod n), and a
    note when several workers share one. ConfigError when there is no GPU, or when a site has more workers
    than GPUs (NCCL needs a GPU per worker of a group)."""
    import torch

    from geotrain.train.site import check_cuda

    check_cuda()
    n = torch.cuda.device_count()
    workers = config.run.workers_per_site
    if workers > n:
        raise ConfigError(f"{workers} workers per site need {workers} GPUs (NCCL puts each worker of a site on its "
                          f"own), but {n} {'is' if n == 1 else 'are'} visible; lower --workers-per-site",
                          field="run.workers_per_site")
    total = config.run.sites * workers
    if total <= n:
        return n, None
    return n, (f"note: {total} workers on {n} GPU{'s' if n > 1 else ''}: sites share GPUs round-robin (each worker "
               "of a site on its own), so they compute in turn and each site's speed is not its own")


def _worker_entry(task: SiteTask, env: dict[str, str], log_path: str) -> None:
    """Body of a worker process: own process group, output to its log file, then the site entry."""
    os.setpgrp()  # Ctrl+C in the terminal goes to the launcher only; it stops the workers itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env)
    if env.get("GEOTRAIN_NETNS"):  # geotrain run --network netlab: this site's namespace, before any socket
        from geotrain.netlab import enter_namespace

        enter_namespace(env["GEOTRAIN_NETNS"])
    from geotrain.train.site import site_main

    code = site_main(task)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: a communication thread may still be parked in gloo


def _die_with_parent() -> None:
    """Ask Linux to kill this process if the launcher dies without stopping it (e.g. SIGKILL)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the launcher was already gone before prctl took effect
            os._exit(1)


def _terminate_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class _Tail:
    """Reads lines appended to the sites' record files since the last call."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.offsets = [0] * len(paths)
        self.partial = [""] * len(paths)

    def read(self) -> list[dict[str, Any]]:
        import json

        out = []
        for i, p in enumerate(self.paths):
            if not p.exists():
                continue
            with open(p, encoding="utf-8") as f:
                f.seek(self.offsets[i])
                chunk = f.read()
                self.offsets[i] = f.tell()
            lines = (self.partial[i] + chunk).split("\n")
            self.partial[i] = lines.pop()
            for line in lines:
                with contextlib.suppress(json.JSONDecodeError):
                    out.append(json.loads(line))
        return out


def _stop(procs: list[Any]) -> None:
    """SIGTERM every live process we started, then SIGKILL those still alive after the grace period."""
    for p in procs:
        if _alive(p):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    for p in procs:
        _join(p, max(0.0, deadline - time.monotonic()))
    for p in procs:
        if _alive(p):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            _join(p, 2.0)


def _alive(p: Any) -> bool:
    return p.pid is not None and (p.is_alive() if isinstance(p, mp.process.BaseProcess) else p.poll() is None)


def _join(p: Any, timeout: float) -> None:
    if isinstance(p, mp.process.BaseProcess):
        p.join(timeout=timeout)
    else:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=timeout)


def _exitcode(p: Any) -> int | None:
    return p.exitcode if isinstance(p, mp.process.BaseProcess) else p.poll()


def _first_error(out: Path, records: dict[int, list[dict[str, Any]]], failed_sites: list[int]) -> str:
    """The root cause: the earliest error any site recorded (peers of a crashed site fail after it)."""
    errors = [r for rows in records.values() for r in rows if r.get("kind") == "error"]
    if errors:
        r = min(errors, key=lambda r: r.get("time", 0.0))
        return f"site {r.get('site')}: {r.get('message')}\n{r.get('traceback', '')}".rstrip()
    site = failed_sites[0]
    log = out / "logs" / f"site{site}.log"
    tail = log.read_text(encoding="utf-8", errors="replace")[-2000:] if log.is_file() else "(no log)"
    return f"site {site} exited without a record of its error; end of {log}:\n{tail}"


@dataclass
class _Coordinator:
    """The run's coordinator process, started again when it dies."""

    port: int
    token: Path
    events: Path
    log: Path
    host: str = "127.0.0.1"
    """Where it listens: loopback, or the network lab's control address."""
    proc: subprocess.Popen | None = None
    restarts: int = 0

    def start(self) -> None:
        """Start it: the first time on a port the system picks (read back from its log), again on that port."""
        log = open(self.log, "ab")  # noqa: SIM115 - the child owns it
        seen = self.log.stat().st_size
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "geotrain.membership", "--host", self.host, "--port", str(self.port),
             "--token-file", str(self.token), "--events", str(self.events), "--parent", str(os.getpid())],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:  # listening once it says so
            if self.proc.poll() is not None:
                raise RuntimeError(f"the coordinator exited at start; see {self.log}")
            with open(self.log, "rb") as f:
                f.seek(seen)
                m = re.search(rb"listening on " + re.escape(self.host.encode()) + rb":(\d+)", f.read())
            if m:
                self.port = int(m.group(1))
                return
            time.sleep(0.02)
        raise RuntimeError(f"the coordinator did not start listening within 60 s; see {self.log}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@dataclass
class _Sites:
    """The worker processes of every site, started (and started again) by site."""

    task: SiteTask
    out: Path
    sites: int
    workers: int
    env: dict[str, str]
    stores: Path
    """Where each start of a site gets the file its workers meet on."""
    gpus: int = 0
    """GPUs to spread the workers over, round-robin (0: CPU)."""
    site_env: Callable[[int], dict[str, str]] | None = None
    """Extra environment of site k's workers (the network lab: its namespace and interface)."""
    procs: dict[int, list[mp.Process]] = field(default_factory=dict)
    killed: set[int] = field(default_factory=set)
    """Sites killed by a fault (their exit is expected)."""
    finished: list[Any] = field(default_factory=list)
    """Processes of earlier incarnations, for cleanup."""

    def start(self, k: int) -> None:
        ctx = mp.get_context("spawn")
        # The site's workers meet on a file, new for each start of the site: a free port picked here could be
        # taken by another process before worker 0 binds it.
        store = Path(tempfile.mkdtemp(prefix=f"site{k}-", dir=self.stores)) / "store"
        if k in self.procs:
            self.finished += self.procs[k]
        self.procs[k] = []
        for local in range(self.workers):
            env = {**self.env, "GEOTRAIN_SITE_RANK": str(k), "GEOTRAIN_SITE_STORE": str(store),
                   "RANK": str(local), "LOCAL_RANK": str(local), "WORLD_SIZE": str(self.workers)}
            if self.site_env is not None:
                env.update(self.site_env(k))
            if self.gpus:
                env["GEOTRAIN_CUDA_DEVICE"] = str((k * self.workers + local) % self.gpus)
            log = self.out / "logs" / (f"site{k}.log" if local == 0 else f"site{k}-worker{local}.log")
            p = ctx.Process(target=_worker_entry, args=(self.task, env, str(log)), name=f"site{k}-w{local}")
            p.start()
            self.procs[k].append(p)
        self.killed.discard(k)

    def kill(self, k: int) -> None:
        for p in self.procs.get(k, []):
            if _alive(p):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
        for p in self.procs.get(k, []):
            _join(p, 10.0)
        self.killed.add(k)

    def signal(self, k: int, sig: int) -> None:
        for p in self.procs.get(k, []):
            if _alive(p):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, sig)

    def all(self) -> list[mp.Process]:
        return [p for ps in self.procs.values() for p in ps] + self.finished


def launch(
    config: Config,
    *,
    workload_factory: Callable[..., Any] | None = None,
    factory_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    console: Any = None,
    faults: list[Any] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    lab: Any = None,
) -> RunOutcome:
    """Run ``config`` with every site on this machine. Returns the summary and the CLI exit code.

    ``faults``: ``geotrain.faults.Fault`` to inject. ``resume``: continue the run in ``run.out`` from its last
    checkpoint. ``overwrite``: start afresh in a directory that holds an earlier run's checkpoints. ``lab``: a
    :class:`geotrain.netlab.Lab`, open, to run each site in its namespace over the lab's links instead of the
    WAN emulator; faults then act on its links. With ``run.out`` unset the run gets a fresh
    ``runs/YYYYMMDD-HHMMSS`` (``geotrain.rundirs``)."""
    from geotrain.checkpoint import CheckpointStore
    from geotrain.faults import LAUNCHER_ACTIONS, check_faults
    from geotrain.membership.wire import create_token_file
    from geotrain.train.workload import demo_workload, prepare_corpus

    faults = list(faults or [])
    check_launch(config, demo=workload_factory is None)
    check_faults(faults, config)
    if config.run.out is None:  # no --out: a fresh directory, runs/latest points to it (geotrain.rundirs)
        from geotrain.rundirs import fresh_run_dir

        try:
            config = config.updated({"run.out": str(fresh_run_dir())})
        except OSError as e:
            raise ConfigError(f"cannot create a run directory under 'runs' ({e.strerror or e}); choose one with "
                              "--out", field="run.out") from None
    out = Path(config.run.out)
    check_out_dir(out)
    checkpoints = CheckpointStore(out / "checkpoints")
    if resume and not checkpoints.has_checkpoints():
        raise ConfigError(f"{str(out)!r} holds no checkpoint to resume from; start the run without --resume",
                          field="--resume")
    if not resume and checkpoints.has_checkpoints():
        if not overwrite:
            raise ConfigError(f"{str(out)!r} holds checkpoints of an earlier run; continue it with --resume, or start "
                              "afresh with --overwrite (which deletes them), or choose another --out", field="run.out")
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    for stale in ("summary.json", "metrics.jsonl", "report.html", "model.safetensors"):
        (out / stale).unlink(missing_ok=True)
    for d in ("sites", "logs"):
        (out / d).mkdir(exist_ok=True)
        if not resume:  # a resumed run appends to its records
            for f in (out / d).glob("*"):
                f.unlink()
    if not resume:
        shutil.rmtree(out / "tensorboard", ignore_errors=True)  # an earlier run's event files; a resume appends
        (out / "membership.jsonl").unlink(missing_ok=True)
        (out / "faults.jsonl").unlink(missing_ok=True)
    if config.run.tensorboard and progress:
        print(f"live scalars: tensorboard --logdir {out / 'tensorboard'}", file=sys.stderr)
    config_dict = config.to_dict()
    write_json_atomic(out / "config.json", config_dict)
    kwargs = dict(factory_kwargs or {})
    if workload_factory is None:
        workload_factory = demo_workload
        kwargs.setdefault("data_dir", prepare_corpus(config, out / "data"))

    secret_dir = Path(tempfile.mkdtemp(prefix="geotrain-"))  # mode 0700: the run's secret stays ours
    token = secret_dir / "token"
    create_token_file(token)
    coordinator = _Coordinator(0, token, out / "membership.jsonl", out / "logs" / "coordinator.log",
                               host="127.0.0.1" if lab is None else lab.control_address)
    task = SiteTask.of(config, workload_factory, kwargs, faults)
    sites, workers = config.run.sites, config.run.workers_per_site
    env = {"GEOTRAIN_SITES": str(sites), "GEOTRAIN_TOKEN_FILE": str(token), "GEOTRAIN_RESUME": "1" if resume else "",
           "GEOTRAIN_LOCAL_LAUNCHER": "1", "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
           "OMP_NUM_THREADS": "1"}
    gpus = 0
    if config.run.device == "cuda":
        gpus, note = gpus_for(config)
        if note:
            print(note, file=sys.stderr, flush=True)
    if lab is not None:  # the lab's links are the network: no emulated time on top (train.site.connect)
        env["GEOTRAIN_NETWORK"] = "netlab"
    group = _Sites(task, out, sites, workers, env, stores=secret_dir, gpus=gpus,
                   site_env=None if lab is None else lab.site_env)
    # In the network lab the launcher acts on the real links: it carries out slow as well.
    actions = (*LAUNCHER_ACTIONS, "slow") if lab is not None else LAUNCHER_ACTIONS
    pending = [f for f in faults if f.action in actions or f.site is None]
    t_start, started_at = time.monotonic(), time.time()
    exit_code, interrupted, error = 0, False, None
    tail = _Tail([out / "sites" / f"site{k}.jsonl" for k in range(sites)])
    if resume:
        tail.read()  # the earlier launches' records are not news
    live = _make_live(config, progress=progress, console=console)
    previous_term = signal.getsignal(signal.SIGTERM)
    with contextlib.suppress(ValueError):  # only possible from the main thread
        signal.signal(signal.SIGTERM, _terminate_as_interrupt)  # a killed launcher still stops its workers
    try:
        events = out / "membership.jsonl"  # the coordinator's events: the first ones when the run forms
        events_at_start = events.stat().st_size if events.is_file() else 0
        coordinator.start()
        env["GEOTRAIN_COORDINATOR"] = f"{coordinator.host}:{coordinator.port}"
        for k in range(sites):
            group.start(k)
        last_progress = time.monotonic()
        hang_after = config.membership.quorum_timeout_s + config.membership.heartbeat_timeout_s + 60.0
        train_start: float | None = None
        cut: set[int] = set()
        failures: dict[int, int] = {}
        with live:
            while True:
                new = tail.read()
                due: list[str] = []
                if new:
                    last_progress = time.monotonic()
                    for r in new:
                        if r.get("kind") == "start" and train_start is None:
                            train_start = time.monotonic()
                        if r.get("kind") == "fault_due":
                            due.append(str(r.get("fault")))
                        if r.get("kind") == "warning":  # shown even with --quiet, and kept in the summary
                            print(f"warning: site {r.get('site')}: {r.get('message')}", file=sys.stderr)
                    live.update(new)
                elapsed = None if train_start is None else time.monotonic() - train_start
                for f in list(pending):
                    if str(f) in due or (f.seconds is not None and elapsed is not None and elapsed >= f.seconds):
                        pending.remove(f)
                        _carry_out(f, group, coordinator, cut, out, lab=lab)
                        last_progress = time.monotonic()
                if coordinator.proc is not None and coordinator.proc.poll() is not None:
                    if coordinator.restarts >= MAX_COORDINATOR_RESTARTS:
                        error, exit_code = "the coordinator kept dying; see logs/coordinator.log", 1
                        break
                    coordinator.restarts += 1
                    coordinator.start()
                for k, procs in group.procs.items():
                    codes = [_exitcode(p) for p in procs]
                    if k not in group.killed and k not in failures and any(c not in (None, 0) for c in codes):
                        failures[k] = next(c for c in codes if c not in (None, 0))
                        for p in procs:  # a site is all its workers: stop the rest of a failed one
                            if _alive(p):
                                with contextlib.suppress(ProcessLookupError):
                                    os.kill(p.pid, signal.SIGKILL)
                running = [k for k, ps in group.procs.items() if any(_alive(p) for p in ps)]
                if failures and not _grew(events, events_at_start):  # a site failed before the run formed
                    records = read_site_records(out, sites)
                    error = _first_error(out, records, sorted(failures))
                    exit_code = 2 if all(c == 2 for c in failures.values()) else 1
                    break
                if not running:  # a rejoin still pending has no run left to join, nor a peer to heal from
                    for f in pending:
                        print(f"warning: --fault {f} was not carried out: the run ended before it was due",
                              file=sys.stderr)
                    done = [k for k, ps in group.procs.items()
                            if k not in group.killed and all(_exitcode(p) == 0 for p in ps)]
                    if not done:
                        records = read_site_records(out, sites)
                        error = _first_error(out, records, sorted(failures) or [0])
                        exit_code = 2 if failures and all(c == 2 for c in failures.values()) else 1
                    break
                if time.monotonic() - last_progress > hang_after:
                    error = f"no progress from any site for {hang_after:.0f} s; stopped the run as hung"
                    exit_code = 1
                    break
                time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        interrupted, exit_code = True, 1
        error = "interrupted by the user (Ctrl+C)"
    finally:
        _stop(group.all())
        coordinator.kill()
        shutil.rmtree(secret_dir, ignore_errors=True)
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(signal.SIGTERM, previous_term)
    summary = write_run_files(out, config_dict, elapsed_seconds=time.monotonic() - t_start, ok=exit_code == 0,
                              interrupted=interrupted, error=error, membership=_read_jsonl(out / "membership.jsonl"),
                              faults=_read_jsonl(out / "faults.jsonl"), started_at=None if resume else started_at)
    return RunOutcome(summary=summary, exit_code=exit_code, out=out)


def _carry_out(f: Any, group: _Sites, coordinator: _Coordinator, cut: set[int], out: Path, *,
               lab: Any = None) -> None:
    """Do one fault to the run from outside, and note when: ``time`` is the instant it struck (a kill's
    SIGKILL), taken before waiting for the killed processes to end, so that it precedes what it causes (the
    coordinator's ``left`` event); ``carry_out_seconds`` is how long carrying it out took."""
    import json

    struck = time.time()
    if f.action == "kill" and f.site is None:
        coordinator.kill()  # the watch loop starts it again
    elif f.action == "kill":
        group.kill(f.site)
    elif f.action == "rejoin":
        group.start(f.site)
    elif f.action == "partition":
        if lab is not None:  # the network lab: the links themselves are cut; the site finds out as it would
            lab.partition(f.site)
        else:
            group.signal(f.site, signal.SIGUSR1)
        cut.add(f.site)
    elif f.action == "slow" and lab is not None:
        lab.slow(f.site, f.factor)
    elif f.action == "heal":
        if lab is not None:
            lab.heal(f.site)
        else:
            group.signal(f.site, signal.SIGUSR2)
        cut.discard(f.site)
    with open(out / "faults.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({**f.to_dict(), "time": struck, "carry_out_seconds": time.time() - struck}) + "\n")


def _grew(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size > size


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    import json

    rows: list[dict[str, Any]] = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                row = json.loads(line)
                if isinstance(row, dict):
                    rows.append(row)
    return rows


class _NoLive:
    def __enter__(self) -> _NoLive:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def update(self, records: list[dict[str, Any]]) -> None:
        return None


def _make_live(config: Config, *, progress: bool, console: Any) -> Any:
    if not progress:
        return _NoLive()
    from geotrain.report.live import LiveProgress

    title = f"geotrain {config.run.algorithm}: {config.run.sites} sites over {config.wan.link}"
    return LiveProgress(config.run.sites, title=title, total_tokens=config.run.tokens, console=console)
