"""Clean stops: a crashing site fails the run with its error and never hangs; Ctrl+C stops every site."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from _utils.runs import TINY, run_tiny
from _utils.workloads import crashing_workload
import pytest

pytestmark = pytest.mark.slow  # starts processes


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_a_crashing_site_leaves_the_run_and_the_others_finish(tmp_path):
    """Elastic membership: site 1 raises at its third step; the coordinator drops it, sites 0 and 2 go on to the
    end, and the summary names the failure with its error. Nothing waits out a deadline."""
    t0 = time.monotonic()
    outcome = run_tiny(tmp_path, workload_factory=crashing_workload, **{"run.sites": 3, "run.tokens": 3 * 4 * 32 * 40,
                                                                           "outer.sync_every": 5})
    assert outcome.exit_code == 0, outcome.summary["error"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] is True and summary["sites_in_sync"] is True
    assert [f["site"] for f in summary["failures"]] == [1] and "injected failure" in summary["failures"][0]["message"]
    assert [(e["site"], e["kind"]) for e in summary["membership"] if e["kind"] == "left"] == [(1, "left")]
    assert summary["per_site"][1]["complete"] is False and summary["per_site"][0]["complete"] is True
    assert time.monotonic() - t0 < 120  # liveness: it did not sit out a deadline


def test_a_run_whose_every_site_crashes_fails_with_the_first_error(tmp_path):
    outcome = run_tiny(tmp_path, workload_factory=crashing_workload, factory_kwargs={"crash_site": -1},
                       **{"run.sites": 2, "run.tokens": 2 * 4 * 32 * 40, "outer.sync_every": 5})
    assert outcome.exit_code == 1
    assert "injected failure" in outcome.summary["error"] and outcome.summary["ok"] is False


def test_ctrl_c_stops_every_site_and_leaves_a_partial_summary(tmp_path):
    sets = [f"--set={k}={json.dumps(v)}" for k, v in TINY.items() if k != "wan.link"]
    cmd = [sys.executable, "-m", "geotrain.cli", "run", "--quiet", "--out", str(tmp_path), "--sites", "3",
           "--tokens", "50M", "--link", "50mbit/20ms", "--sync-every", "5", *sets]
    # A child inherits an ignored SIGINT (the shell ignores it for background jobs, so `make test &` would run
    # the launcher deaf to Ctrl+C); give it the default disposition, as in a terminal.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 90
        files = [tmp_path / "sites" / f"site{k}.jsonl" for k in range(3)]
        while time.monotonic() < deadline:  # wait until every site is training
            if all(f.is_file() and '"kind": "step"' in f.read_text() for f in files):
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        else:
            raise AssertionError("training never started")
        starts = [json.loads(line) for f in sorted((tmp_path / "sites").glob("*.jsonl"))
                  for line in f.read_text().splitlines() if '"start"' in line]
        pids = [r["pid"] for r in starts]
        assert len(pids) == 3
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        while any(_alive(p) for p in pids) and time.monotonic() - t0 < 30:
            time.sleep(0.1)
        stopped_in = time.monotonic() - t0  # every site process is gone
        out, err = proc.communicate(timeout=60)  # then the launcher writes the partial summary and report
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err
    assert stopped_in < 20, f"site processes took {stopped_in:.1f} s to stop"  # liveness: SIGTERM, 5 s grace, SIGKILL
    assert not any(_alive(p) for p in pids), "a site process outlived the run"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] is False and summary["interrupted"] is True
    assert summary["tokens"] > 0 and "Ctrl+C" in summary["error"]
