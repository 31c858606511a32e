"""Run every site of a run as processes on this machine, watch them, and write the run's files.

The launcher is the run's coordinator: it hosts the store the cross-site groups rendezvous on, starts
``sites x workers_per_site`` worker processes (each its own process group leader, so a terminal's Ctrl+C
reaches only the launcher), shows live progress from the sites' record files, and stops everything cleanly:

* Ctrl+C: every worker gets SIGTERM, then SIGKILL after a grace period; a partial summary is written.
* A worker that fails: the others are stopped at once, the failing site's error is shown, exit code 1.
* A run that stops making progress for longer than the collective timeout is stopped as hung.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geotrain.config import Config
from geotrain.errors import ConfigError
from geotrain.train.site import SiteTask
from geotrain.files import write_json_atomic
from geotrain.summary import build_summary, merge_metrics, read_site_records

__all__ = ["MAX_LOCAL_WORKERS", "RunOutcome", "check_launch", "check_out_dir", "launch"]

GRACE_SECONDS = 5.0
POLL_SECONDS = 0.25
MAX_LOCAL_WORKERS = 64
"""Most worker processes one machine is asked to start (sites x workers_per_site): each is a Python process
with its own copy of the model. Larger runs go to real clusters (torchrun, one job per site), and
``geotrain plan`` studies them at any size."""


@dataclass(slots=True)
class RunOutcome:
    summary: dict[str, Any]
    exit_code: int
    out: Path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    if config.data.path is not None:
        try:
            found = Path(config.data.path).exists()
        except OSError as e:  # a name too long for the file system, say
            raise ConfigError(f"cannot look at {config.data.path!r} ({e.strerror or e})", field="data.path") from None
        if not found:
            raise ConfigError(f"{config.data.path!r} does not exist; give a text file or a directory of text "
                              "files, or leave data.path unset for Python's standard library", field="data.path")
    if demo:  # the demo GPT is the model config.layout() describes: its settings must fit it
        config.algorithm().pattern(config, config.layout())


def _worker_entry(task: SiteTask, env: dict[str, str], log_path: str) -> None:
    """Body of a worker process: own process group, output to its log file, then the site entry."""
    os.setpgrp()  # Ctrl+C in the terminal goes to the launcher only; it stops the workers itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env)
    from geotrain.train.site import site_main

    code = site_main(task)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: a communication thread may still be parked in gloo


def _die_with_parent() -> None:
    """Ask Linux to kill this worker if the launcher dies without stopping it (e.g. SIGKILL)."""
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


def _stop(procs: list[mp.Process]) -> None:
    """SIGTERM every live worker we started, then SIGKILL those still alive after the grace period."""
    for p in procs:
        if p.is_alive() and p.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive() and p.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            p.join(timeout=2.0)


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


def launch(
    config: Config,
    *,
    workload_factory: Callable[..., Any] | None = None,
    factory_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    console: Any = None,
) -> RunOutcome:
    """Run ``config`` with every site on this machine. Returns the summary and the CLI exit code."""
    from geotrain.train.workload import demo_workload, prepare_corpus

    out = Path(config.run.out)
    check_launch(config, demo=workload_factory is None)
    check_out_dir(out)
    for stale in ("summary.json", "metrics.jsonl", "report.html", "model.safetensors"):
        (out / stale).unlink(missing_ok=True)
    for d in ("sites", "logs"):
        (out / d).mkdir(exist_ok=True)
        for f in (out / d).glob("*"):
            f.unlink()
    config_dict = config.to_dict()
    write_json_atomic(out / "config.json", config_dict)
    kwargs = dict(factory_kwargs or {})
    if workload_factory is None:
        workload_factory = demo_workload
        kwargs.setdefault("data_dir", prepare_corpus(config, out / "data"))

    import torch.distributed as dist

    coordinator_port = _free_port()
    store = dist.TCPStore("127.0.0.1", coordinator_port, is_master=True, wait_for_workers=False, use_libuv=True)
    task = SiteTask.of(config, workload_factory, kwargs)
    ctx = mp.get_context("spawn")
    procs: list[mp.Process] = []
    worker_site: list[int] = []
    sites, workers = config.run.sites, config.run.workers_per_site
    t_start = time.monotonic()
    exit_code, interrupted, error = 0, False, None
    records: dict[int, list[dict[str, Any]]] = {k: [] for k in range(sites)}
    tail = _Tail([out / "sites" / f"site{k}.jsonl" for k in range(sites)])
    live = _make_live(config, progress=progress, console=console)
    previous_term = signal.getsignal(signal.SIGTERM)
    with contextlib.suppress(ValueError):  # only possible from the main thread
        signal.signal(signal.SIGTERM, _terminate_as_interrupt)  # a killed launcher still stops its workers
    try:
        for k in range(sites):
            master_port = _free_port()
            for local in range(workers):
                env = {
                    "GEOTRAIN_SITE_RANK": str(k),
                    "GEOTRAIN_SITES": str(sites),
                    "GEOTRAIN_COORDINATOR": f"127.0.0.1:{coordinator_port}",
                    "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(master_port),
                    "RANK": str(local),
                    "LOCAL_RANK": str(local),
                    "WORLD_SIZE": str(workers),
                    "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
                    "OMP_NUM_THREADS": "1",
                }
                log = out / "logs" / (f"site{k}.log" if local == 0 else f"site{k}-worker{local}.log")
                p = ctx.Process(target=_worker_entry, args=(task, env, str(log)), name=f"site{k}-w{local}")
                p.start()
                procs.append(p)
                worker_site.append(k)
        last_progress = time.monotonic()
        hang_after = config.run.collective_timeout_s + 60.0
        with live:
            while True:
                new = tail.read()
                if new:
                    last_progress = time.monotonic()
                    for r in new:
                        site = r.get("site")
                        if isinstance(site, int) and site in records:
                            records[site].append(r)
                    live.update(new)
                failed = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if failed:
                    time.sleep(4 * POLL_SECONDS)  # let the failing sites' last records land
                    error = _first_error(out, read_site_records(out, sites), [worker_site[i] for i in failed])
                    exit_code = 1
                    break
                if all(p.exitcode == 0 for p in procs):
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
        _stop(procs)
        store = None  # noqa: F841 - the coordinator's store closes with the run
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(signal.SIGTERM, previous_term)
    records = read_site_records(out, sites)
    summary = build_summary(config_dict, records, elapsed_seconds=time.monotonic() - t_start,
                            ok=exit_code == 0, interrupted=interrupted, error=error)
    write_json_atomic(out / "summary.json", summary)
    merge_metrics(out, records)
    try:
        from geotrain.report.html import write_report

        write_report(out)
    except Exception as e:  # noqa: BLE001 - a report failure must not hide the run's own result
        print(f"warning: could not render report.html: {e}", file=sys.stderr)
    return RunOutcome(summary=summary, exit_code=exit_code, out=out)


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
