"""A deployment as on real machines: ``geotrain coordinator`` as its own process, one ``torchrun`` job per
site, a secret in a token file. Everything stays on loopback.

Checks the torchrun path end to end (a killed site's job started again rejoins while the others go on, and
site 0 writes the run's files; two jobs of two workers each train one run), and that a site that must not
join is refused with exit code 2 and a message: a wrong secret, a different model, a site rank already taken,
a join after the run has finished.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors import safe_open

from _utils.runs import TINY

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")
SETTINGS = {**TINY, "membership.heartbeat_s": 0.2, "membership.heartbeat_timeout_s": 5.0, "outer.sync_every": 5,
            "checkpoint.every_rounds": 0}


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


class Processes:
    """Processes this test started, each in its own session; all of them are killed at the end."""

    def __init__(self, root: Path) -> None:
        self.root, self.procs = root, []

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - closed with the process below
        proc = subprocess.Popen(args, cwd=self.root, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True)
        self.procs.append((proc, log))
        return proc

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL of the process and everything it started (torchrun puts its workers in sessions of their
        own, so its process group is not enough)."""
        family = [proc.pid, *_descendants(proc.pid)]
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=60)

    def close(self) -> None:
        for proc, log in self.procs:
            if proc.poll() is None:
                self.kill(proc)
            log.close()


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid``, read from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier and len(found) < 1000:
        parent = frontier.pop()
        children = [c for c, pp in parents.items() if pp == parent]
        found += children
        frontier += children
    return found


@contextlib.contextmanager
def processes(root: Path) -> Iterator[Processes]:
    p = Processes(root)
    try:
        yield p
    finally:
        p.close()


def _wait_for(predicate, what: str, *, timeout: float = 300.0, procs: list[subprocess.Popen] = ()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for proc in procs:
            assert proc.poll() is None, f"a process ended (exit {proc.returncode}) while waiting for {what}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start_coordinator(p: Processes, token: Path) -> tuple[subprocess.Popen, str]:
    proc = p.start("coordinator", [sys.executable, "-m", "geotrain.cli", "coordinator", "--port", "0",
                                   "--token-file", str(token), "--events", str(p.root / "events.jsonl")])
    found: list[str] = []

    def listening() -> bool:
        m = re.search(r"listening on (\S+):(\d+)", p.log("coordinator"))
        if m:
            found.append(f"127.0.0.1:{m.group(2)}")
        return bool(m)

    _wait_for(listening, "the coordinator to listen", timeout=60, procs=[proc])
    return proc, found[0]


def site_args(site: int, sites: int, address: str, token: Path, out: Path, *extra: str, torchrun: bool = True,
              settings: dict | None = None, nproc: int = 1) -> list[str]:
    sets = [f"--set={k}={json.dumps(v)}" for k, v in {**SETTINGS, **(settings or {})}.items()]
    site = ["--site-rank", str(site), "--sites", str(sites), "--coordinator", address, "--token-file", str(token),
            "--set", f"run.out={json.dumps(str(out))}", *sets, *extra]
    if torchrun:
        return [str(TORCHRUN), "--standalone", "--nproc-per-node", str(nproc), "-m", "geotrain.train.site", *site]
    return [sys.executable, "-m", "geotrain.train.site", *site]


def _records(out: Path, site: int, kind: str) -> list[dict]:
    path = out / "sites" / f"site{site}.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    return [r for r in (json.loads(x) for x in lines if x.strip().endswith("}")) if r.get("kind") == kind]


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
def test_torchrun_sites_a_killed_job_started_again_rejoins_and_site0_writes_the_run_files(tmp_path):
    token = tmp_path / "run.token"
    tokens = {"run.tokens": 2 * 4 * 32 * 2000}  # 2,000 steps of each of 2 sites (400 rounds), a minute or so
    with processes(tmp_path) as p:
        coordinator, address = start_coordinator(p, token)
        outs = [tmp_path / f"site{k}" for k in range(2)]
        site0 = p.start("site0", site_args(0, 2, address, token, outs[0], settings=tokens))
        site1 = p.start("site1", site_args(1, 2, address, token, outs[1], settings=tokens))
        _wait_for(lambda: len(_records(outs[1], 1, "sync")) >= 3, "site 1 to sync three times",
                  procs=[site0, site1, coordinator])
        p.kill(site1)  # SIGKILL of the whole torchrun job: agent and worker
        _wait_for(lambda: "left: site 1" in p.log("coordinator"), "the coordinator to drop site 1",
                  procs=[site0, coordinator])
        assert site0.poll() is None  # the survivor never stops
        again = p.start("site1-again", site_args(1, 2, address, token, outs[1], settings=tokens))
        assert site0.wait(timeout=400) == 0, p.log("site0")
        assert again.wait(timeout=120) == 0, p.log("site1-again")

        summary = json.loads((outs[0] / "summary.json").read_text())
        assert summary["ok"] is True and (outs[0] / "metrics.jsonl").stat().st_size > 0
        assert (outs[0] / "report.html").is_file() and (outs[0] / "model.safetensors").is_file()
        assert not (outs[1] / "summary.json").exists()  # site 0 alone writes the run's files
        kinds = [(e["site"], e["kind"]) for e in summary["membership"]]
        assert (1, "left") in kinds and (1, "rejoined") in kinds and (1, "healed") in kinds
        assert summary["sites_in_sync"] is True
        assert {s["site"] for s in summary["per_site"]} == {0, 1}
        assert all(s["coordination_seconds"] >= 0 for s in summary["per_site"])

        # the run is over: a site that joins now is told so and exits 2
        # (without torchrun, whose own exit code is 1 whatever its worker's)
        late = p.start("late", site_args(1, 2, address, token, tmp_path / "late", settings=tokens, torchrun=False))
        assert late.wait(timeout=120) == 2
        assert "the run has finished" in p.log("late") and "Traceback" not in p.log("late")
        assert coordinator.poll() is None  # a standalone coordinator outlives the run until stopped


def _small_corpus(path: Path) -> Path:
    """About 600 KB of the standard library's text: enough for a held-out split, quick for every worker to prepare."""
    source = Path(os.__file__).parent
    path.write_text("".join(f.read_text(encoding="utf-8", errors="replace") for f in sorted(source.glob("[a-c]*.py"))))
    return path


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
def test_two_torchrun_jobs_of_two_workers_each_write_the_run_files_as_geotrain_run_does(tmp_path):
    """2 sites x 2 workers (torchrun --nproc-per-node 2): each site's world is its workers, the config says so
    (a file that says otherwise is overruled, with a note), and site 0's first worker writes summary.json,
    metrics.jsonl, report.html and model.safetensors."""
    token = tmp_path / "run.token"
    steps = 40
    settings = {"data.path": str(_small_corpus(tmp_path / "corpus.txt")), "outer.sync_every": 5,
                "run.tokens": steps * 2 * 2 * 4 * 32}  # steps x sites x workers x batch x seq_len
    with processes(tmp_path) as p:
        coordinator, address = start_coordinator(p, token)
        outs = [tmp_path / f"site{k}" for k in range(2)]
        jobs = [p.start("site0", site_args(0, 2, address, token, outs[0], settings=settings, nproc=2)),
                p.start("site1", site_args(1, 2, address, token, outs[1], "--set", "run.workers_per_site=3",
                                           settings=settings, nproc=2))]
        for k, job in enumerate(jobs):
            assert job.wait(timeout=400) == 0, p.log(f"site{k}")
        assert "run.workers_per_site = 3" in p.log("site1") and "WORLD_SIZE=2" in p.log("site1")

        s = json.loads((outs[0] / "summary.json").read_text())
        assert s["ok"] is True and s["sites"] == 2 and s["workers_per_site"] == 2 and s["algorithm"] == "diloco"
        assert s["config"]["run"]["workers_per_site"] == 2 and s["config"]["run"]["out"] == str(outs[0])
        assert s["tokens"] == settings["run.tokens"] and s["outer_rounds"] == steps // 5
        assert math.isfinite(s["eval_loss"]) and s["sites_in_sync"] is True
        assert {d["site"] for d in s["per_site"]} == {0, 1}
        kinds = {json.loads(line)["kind"] for line in (outs[0] / "metrics.jsonl").read_text().splitlines()}
        assert {"start", "step", "eval", "sync", "done"} <= kinds
        assert (outs[0] / "report.html").is_file()
        assert json.loads((outs[0] / "config.json").read_text())["run"]["workers_per_site"] == 2
        with safe_open(str(outs[0] / "model.safetensors"), "pt") as f:
            assert f.metadata()["params_sha256"] == s["params_sha256"]
        assert not (outs[1] / "summary.json").exists()  # site 0 alone writes the run's files
        assert coordinator.poll() is None


def test_sites_that_must_not_join_are_refused_with_a_message(tmp_path):
    """Each refusal exits 2 before training starts and names what is wrong; the site that was let in keeps
    waiting for the run to form, its state untouched."""
    token, other = tmp_path / "run.token", tmp_path / "other.token"
    with processes(tmp_path) as p:
        coordinator, address = start_coordinator(p, token)
        p.start("other-coordinator", [sys.executable, "-m", "geotrain.cli", "coordinator", "--port", "0",
                                      "--token-file", str(other)])
        _wait_for(lambda: other.is_file() and other.stat().st_size > 0, "the second token", timeout=60)
        # site 0 of a 3-site run joins and waits for the other two
        first = p.start("first", site_args(0, 3, address, token, tmp_path / "s0", torchrun=False))
        _wait_for(lambda: "site 0 worker 0 connected" in p.log("coordinator"), "site 0 to join", timeout=120,
                  procs=[first, coordinator])

        def refused(name: str, args: list[str]) -> str:
            proc = p.start(name, args)
            assert proc.wait(timeout=120) == 2, p.log(name)
            log = p.log(name)
            assert "Traceback" not in log, log
            return log

        log = refused("wrong-secret", site_args(1, 3, address, other, tmp_path / "s1", torchrun=False))
        assert "secret" in log
        assert other.read_text().strip() not in p.log("coordinator")
        log = refused("duplicate", site_args(0, 3, address, token, tmp_path / "dup", torchrun=False))
        assert "site 0" in log and "already" in log
        log = refused("out-of-range", site_args(5, 3, address, token, tmp_path / "s5", torchrun=False))
        assert "site rank 5 is out of range" in log
        log = refused("mismatch", site_args(1, 3, address, token, tmp_path / "s1", torchrun=False,
                                            settings={"model.d_model": 48}))
        assert "'wte.weight' is (256, 48)" in log and "(256, 32)" in log  # names the parameter that differs
        log = refused("other-settings", site_args(1, 3, address, token, tmp_path / "s1", torchrun=False,
                                                  settings={"outer.lr": 0.5}))
        assert "outer.lr" in log
        assert first.poll() is None  # the site that was let in is still waiting, unharmed
