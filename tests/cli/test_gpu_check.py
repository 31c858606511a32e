"""``benchmarks/gpu_check.py`` (``make gpu-check``): skipped cleanly without CUDA, its steps checked on the CPU
with ``--cpu-smoke``, and a failed run fails the check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def gpu_check(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH"))
                                                       if p)}
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "runs"), "--results",
                           str(tmp_path / "results"), *args], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)


def _small_corpus(path: Path) -> Path:
    source = Path(os.__file__).parent
    path.write_text("".join(f.read_text(encoding="utf-8", errors="replace") for f in sorted(source.glob("[a-c]*.py"))))
    return path


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device: the check would run")
def test_without_cuda_the_check_says_it_is_skipped_and_exits_0(tmp_path):
    proc = gpu_check(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "gpu-check skipped: no CUDA device" in proc.stdout
    assert not (tmp_path / "results").exists() and not (tmp_path / "runs").exists()  # nothing ran


@pytest.mark.slow  # one tiny run of two sites
def test_cpu_smoke_runs_the_checks_steps_and_writes_the_result_file(tmp_path):
    proc = gpu_check(tmp_path, "--cpu-smoke", "--", "--data", str(_small_corpus(tmp_path / "corpus.txt")))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "runs" / "cpu-smoke" / "summary.json").is_file()
    (result,) = (tmp_path / "results").glob("*-gpu-check-cpu-smoke.md")
    row = next(line for line in result.read_text().splitlines() if line.startswith("| cpu-smoke |"))
    assert row in proc.stdout  # the same figures printed and written
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[3]) > 0 and cells[4].endswith("%") and cells[5] == "4,096"  # loss, utilization, tokens
    assert "gpu-check passed" in proc.stdout


def test_a_run_that_fails_fails_the_check(tmp_path):
    proc = gpu_check(tmp_path, "--cpu-smoke", "--", "--link", "fast")  # bad input: geotrain run exits 2
    assert proc.returncode == 1
    assert "geotrain run exited 2" in proc.stderr and "wan.link" in proc.stderr and "gpu-check FAILED" in proc.stderr
    (result,) = (tmp_path / "results").glob("*-gpu-check-cpu-smoke.md")
    assert "Errors:" in result.read_text()
