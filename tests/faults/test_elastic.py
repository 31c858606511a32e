"""Sites fail, leave and come back while the run goes on: real processes, real SIGKILLs, a real coordinator.

Each test runs ``geotrain.train.launch.launch`` with faults scheduled by ``--fault`` specs. Rounds are short
and the runs long enough that a restarted site boots and is admitted well before the end on a loaded
machine; nothing asserts a duration except generous liveness bounds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _utils.runs import TINY, run_tiny

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
# 4 sites, about 50 ms of compute per step on a shared 2-core machine, rounds of 5 steps, 60 rounds.
ELASTIC = {"run.sites": 4, "model.d_model": 64, "model.seq_len": 64, "data.batch_size": 8, "outer.sync_every": 5,
           "run.tokens": 4 * 8 * 64 * 300, "membership.heartbeat_s": 0.2, "membership.heartbeat_timeout_s": 5.0,
           "checkpoint.every_rounds": 0}


def _processes_naming(text: str) -> list[int]:
    """PIDs whose command line contains ``text``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def _events(summary, kind):
    return [e for e in summary["membership"] if e["kind"] == kind]


def _records(out: Path, site: int, kind: str):
    path = out / "sites" / f"site{site}.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == kind]


def test_a_site_killed_mid_round_is_dropped_rejoins_and_is_healed_from_a_peer(tmp_path):
    outcome = run_tiny(tmp_path, faults=["kill:2@3", "rejoin:2@5"], **ELASTIC)
    s = outcome.summary
    assert outcome.exit_code == 0 and s["ok"] is True, s["error"]
    left = _events(s, "left")
    assert [e["site"] for e in left] == [2] and "connection closed" in left[0]["reason"]  # named, not the survivors
    assert [e["site"] for e in _events(s, "rejoined")] == [2]
    (healed,) = _events(s, "healed")
    assert healed["site"] == 2 and healed["healed_from"] in (0, 1, 3) and healed["seconds"] > 0
    # the survivors synced without site 2 (a generation of three) before it came back
    gens = [r for r in _records(tmp_path, 0, "membership")]
    assert gens and gens[0]["left"] == [2] and gens[0]["members"] == [0, 1, 3]
    # after the next sync every site, the healed one included, holds the same global model
    checks = {k: _records(tmp_path, k, "sync_check") for k in range(4)}
    step = checks[2][0]["step"]
    hashes = {next(r["params_sha256"] for r in checks[k] if r["step"] == step) for k in range(4)}
    assert len(hashes) == 1
    assert s["sites_in_sync"] is True and all(p["complete"] for p in s["per_site"])
    assert s["per_site"][2]["incarnations"] == 2
    assert [f["spec"] for f in s["faults"]] == ["kill:2@3", "rejoin:2@5"]


def test_the_coordinator_killed_and_started_again_loses_no_site(tmp_path):
    outcome = run_tiny(tmp_path, faults=["kill:coordinator@3"], **ELASTIC)
    s = outcome.summary
    assert outcome.exit_code == 0 and s["ok"] is True, s["error"]
    assert _events(s, "left") == [] and s["sites_in_sync"] is True
    assert all(p["complete"] for p in s["per_site"])
    log = (tmp_path / "logs" / "coordinator.log").read_text()
    assert log.count("listening on") == 2 and "adopted generation" in log


def test_a_poisoned_and_an_outlying_update_are_left_out_and_named(tmp_path):
    outcome = run_tiny(tmp_path, faults=["nan:1@3", "outlier:100:3@8"],
                       **{**ELASTIC, "run.tokens": 4 * 8 * 64 * 60, "guard.min_history": 4})
    s = outcome.summary
    assert outcome.exit_code == 0 and s["ok"] is True, s["error"]
    rejected = {(r["site"], r["round"]): r["reason"] for r in s["rejected_updates"]}
    assert [k[0] for k in rejected] == [1, 3]
    assert "non-finite" in rejected[next(k for k in rejected if k[0] == 1)]
    assert "running median" in rejected[next(k for k in rejected if k[0] == 3)]
    assert _events(s, "left") == [] and s["sites_in_sync"] is True  # the run went on with every site


def test_a_partitioned_site_is_dropped_then_healed_back_in(tmp_path):
    outcome = run_tiny(tmp_path, faults=["partition:1@3", "heal:1@6"], **ELASTIC)
    s = outcome.summary
    assert outcome.exit_code == 0 and s["ok"] is True, s["error"]
    (left,) = _events(s, "left")
    assert left["site"] == 1 and "no heartbeat" in left["reason"]
    assert [e["site"] for e in _events(s, "healed")] == [1]
    assert s["sites_in_sync"] is True and _records(tmp_path, 1, "evicted")


def test_resume_after_the_whole_run_was_killed_is_exact(tmp_path):
    """Run to the end; run again, SIGKILL the whole run (launcher, sites, coordinator) after its second
    checkpoint, and --resume: the final model is bit for bit the uninterrupted one."""
    sets = [f"--set={k}={json.dumps(v)}" for k, v in TINY.items()]
    args = ["run", "--quiet", "--sites", "3", "--tokens", "40000", "--sync-every", "4", "--overlap", *sets,
            "--set", "checkpoint.every_rounds=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

    def start(*extra):
        return subprocess.Popen([sys.executable, "-m", "geotrain.cli", *args, *extra], cwd=tmp_path, env=env,
                                start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    proc = start("--out", str(whole))
    assert proc.wait(timeout=300) == 0, proc.communicate()
    proc = start("--out", str(killed))
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(list(killed.glob("checkpoints/round-*/site2/manifest.json"))) < 2:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and everything it started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    summary = json.loads((killed / "summary.json").read_text()) if (killed / "summary.json").exists() else None
    assert summary is None  # nothing finished
    # the coordinator runs in a session of its own; with its launcher gone it stops by itself
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _processes_naming(str(killed / "membership.jsonl")):
        time.sleep(0.1)
    assert not _processes_naming(str(killed / "membership.jsonl")), "the coordinator outlived its launcher"
    resumed = subprocess.run([sys.executable, "-m", "geotrain.cli", "run", "--quiet", "--resume", str(killed)],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((whole / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    assert b["params_sha256"] == a["params_sha256"] and b["eval_loss"] == a["eval_loss"]
    assert any(r["kind"] == "resumed" for r in map(json.loads, (killed / "sites" / "site0.jsonl").read_text().splitlines()))


def test_a_new_run_refuses_to_overwrite_checkpoints_and_resume_needs_some(tmp_path):
    sets = [f"--set={k}={json.dumps(v)}" for k, v in TINY.items()]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

    def run(*extra):
        return subprocess.run([sys.executable, "-m", "geotrain.cli", "run", "--quiet", "--sites", "2", "--tokens",
                               "8192", "--sync-every", "4", *sets, "--set", "checkpoint.every_rounds=1", *extra],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "geotrain.cli", "run", "--resume", str(empty)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "config.json" in proc.stderr and "Traceback" not in proc.stderr
    assert run("--out", str(tmp_path / "r")).returncode == 0
    assert list((tmp_path / "r" / "checkpoints").glob("round-*"))
    again = run("--out", str(tmp_path / "r"))
    assert again.returncode == 2 and "--resume" in again.stderr and "--overwrite" in again.stderr
    assert list((tmp_path / "r" / "checkpoints").glob("round-*")), "nothing is lost"
    assert run("--out", str(tmp_path / "r"), "--overwrite").returncode == 0


def _random_schedule(seed: int, *, sites: int, kills: int, first: int, gap: int) -> list[str]:
    """``kills`` kill-and-rejoin pairs at random sites, one in each window of ``gap`` rounds from round
    ``first``: the kill in the window's first 5 rounds, its rejoin 1 to 3 rounds later. On an idle machine a
    window is long enough for the restarted site to boot and be admitted before the next kill."""
    import random

    rng = random.Random(seed)
    faults = []
    for i in range(kills):
        site = rng.randrange(sites)
        at = first + i * gap + rng.randrange(5)
        faults += [f"kill:{site}@{at}", f"rejoin:{site}@{at + 1 + rng.randrange(3)}"]
    return faults


def test_a_seeded_random_schedule_of_five_kills_and_rejoins_ends_in_sync_at_the_no_fault_loss(tmp_path):
    settings = {**ELASTIC, "run.tokens": 4 * 8 * 64 * 1000}  # 200 rounds of 5 steps
    schedule = _random_schedule(7, sites=4, kills=5, first=3, gap=36)  # the last rejoin by round 155
    assert len({f.split(":")[1].split("@")[0] for f in schedule}) > 1  # more than one site is struck
    base = run_tiny(tmp_path / "base", **settings)
    assert base.exit_code == 0
    outcome = run_tiny(tmp_path / "faults", faults=schedule, **settings)
    s = outcome.summary
    assert outcome.exit_code == 0 and s["ok"] is True, s["error"]  # no hang: launch returned, every wait bounded
    assert [f["spec"] for f in s["faults"]] == schedule  # every kill and rejoin was carried out
    # A kill strikes a member (it leaves, and is healed when it returns) or, on a slow machine, a restarted site
    # still booting or waiting to be admitted (it never was a member again): both are failures the run survives.
    left, rejoined, healed = (_events(s, k) for k in ("left", "rejoined", "healed"))
    assert 1 <= len(left) <= 5 and 1 <= len(healed) <= len(rejoined) <= 5, s["membership"]
    assert s["sites_in_sync"] is True and all(p["complete"] for p in s["per_site"])
    assert s["eval_loss"] <= 1.05 * base.summary["eval_loss"], (s["eval_loss"], base.summary["eval_loss"])


def test_a_corrupt_checkpoint_is_named_and_resume_goes_on_exactly_from_the_one_before(tmp_path):
    """Two sites of two workers run to the end with a checkpoint every 2 rounds; one file of the newest
    checkpoint is corrupted; --resume warns, naming the file, resumes from the previous checkpoint, and ends
    on the same model bit for bit."""
    sets = [f"--set={k}={json.dumps(v)}" for k, v in TINY.items()]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = tmp_path / "r"
    first = subprocess.run([sys.executable, "-m", "geotrain.cli", "run", "--quiet", "--sites", "2", "--workers-per-site",
                            "2", "--tokens", "20000", "--sync-every", "4", *sets, "--set", "checkpoint.every_rounds=2",
                            "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    before = json.loads((out / "summary.json").read_text())["params_sha256"]
    rounds = sorted(out.glob("checkpoints/round-*"))
    assert len(rounds) >= 2
    newest, previous = rounds[-1], rounds[-2]
    damaged = newest / "site1" / "w0.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-10] ^= 0xFF
    damaged.write_bytes(bytes(data))
    resumed = subprocess.run([sys.executable, "-m", "geotrain.cli", "run", "--quiet", "--resume", str(out)],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    r_prev = int(previous.name.split("-")[1])
    assert f"site1/w0.safetensors: SHA-256 differs" in resumed.stderr and f"using round {r_prev}" in resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert any("SHA-256 differs" in w["message"] for w in summary["warnings"])
    assert summary["params_sha256"] == before  # nothing lost: the same run, from one checkpoint earlier
    assert [r["round"] for r in _records(out, 0, "resumed")] == [r_prev]
