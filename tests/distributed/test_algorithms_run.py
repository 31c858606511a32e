"""Algorithms, codecs and workers-per-site in real site processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from _utils.runs import run_tiny
import pytest

pytestmark = pytest.mark.slow  # starts processes

ROOT = Path(__file__).resolve().parents[2]


def test_two_workers_per_site_equal_four_single_worker_sites_under_ddp(tmp_path):
    """Worker w draws the same batches either way, and DDP averages over all workers: same model."""
    common = {"run.algorithm": "ddp", "run.tokens": 4 * 4 * 32 * 5, "optim.grad_clip": 0.0}
    a = run_tiny(tmp_path / "a", **common, **{"run.sites": 2, "run.workers_per_site": 2})
    b = run_tiny(tmp_path / "b", **common, **{"run.sites": 4})
    assert a.exit_code == 0 and b.exit_code == 0, (a.summary["error"], b.summary["error"])
    assert a.summary["steps"] == b.summary["steps"] == 5
    pa, pb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    for name in pa:
        torch.testing.assert_close(pa[name], pb[name], rtol=1e-5, atol=1e-5)  # summation order differs


def test_codecs_and_streaming_train_and_send_fewer_bytes(tmp_path):
    common = {"run.sites": 2, "run.tokens": 2 * 4 * 32 * 16, "outer.sync_every": 4}
    fp32 = run_tiny(tmp_path / "fp32", **common)
    int4 = run_tiny(tmp_path / "int4", **common, **{"comm.codec": "int4"})
    stream = run_tiny(tmp_path / "stream", **common, **{"run.algorithm": "streaming", "streaming.fragments": 2,
                                                         "streaming.overlap_steps": 1, "comm.codec": "int8"})
    for o in (fp32, int4, stream):
        assert o.exit_code == 0, o.summary["error"]
        assert o.summary["eval_loss"] < 5.0  # trained well below ln(256) = 5.55
    # int4 payloads are about 1/7 of fp32 ones (4 bits plus one scale per block of 256, plus a header)
    assert int4.summary["payload_bytes_per_sync"] < fp32.summary["payload_bytes_per_sync"] / 6
    assert int4.summary["wan_bytes"] < fp32.summary["wan_bytes"] / 6
    # streaming sends one fragment at a time: its largest transfer is smaller than a whole-model one
    assert stream.summary["max_transfer_bytes"] < fp32.summary["max_transfer_bytes"] / 2


def test_custom_model_example_trains(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_model.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert "eval MSE" in proc.stdout
    import json

    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["ok"] and s["sites"] == 2 and s["algorithm"] == "diloco" and s["outer_rounds"] == 20
    assert s["eval_loss"] < 0.2  # the teacher's output variance is about 0.6: the student learned it


def test_a_wall_time_budget_stops_every_site_and_worker_at_the_same_step(tmp_path):
    """2 sites of 2 workers each, overlapped DiLoCo, a 2 s budget on a token budget that would take minutes, in
    real processes. (When the budget stops the run is checked exactly on virtual clocks in
    test_virtual_time.py; here only that every process stops together.)"""
    res = run_tiny(tmp_path / "budget", **{"run.sites": 2, "run.workers_per_site": 2, "run.algorithm": "diloco",
                                           "outer.sync_every": 4, "comm.overlap": True, "run.tokens": 10**8,
                                           "run.wall_seconds": 2.0})
    assert res.exit_code == 0, res.summary.get("error")
    s = res.summary
    assert s["stopped_early"] is True
    assert len({p["steps"] for p in s["per_site"]}) == 1 and s["per_site"][0]["steps"] % 4 == 0
