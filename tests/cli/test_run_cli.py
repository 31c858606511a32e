"""`geotrain run | report | sample | compare` end to end, as a user calls them."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _utils.runs import TINY

pytestmark = pytest.mark.slow  # starts processes

# The shared run also writes TensorBoard event files when the optional extra is installed (make test installs it).
TENSORBOARD = importlib.util.find_spec("tensorboard") is not None

CONTRACT = ["algorithm", "sites", "tokens", "eval_loss", "outer_rounds", "wan_bytes", "wall_seconds",
            "utilization", "per_site", "params_sha256", "ok"]


def geotrain(*args: str, timeout: float = 180, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = None
    if cwd is not None:  # started elsewhere: the package must still import from this checkout
        src = str(Path(__file__).resolve().parents[2] / "src")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", "geotrain.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def tiny_sets() -> list[str]:
    return [f"--set={k}={json.dumps(v)}" for k, v in TINY.items() if k != "wan.link"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    proc = geotrain("run", "--sites", "2", "--tokens", "8192", "--sync-every", "4", "--link", "100mbit/5ms",
                    "--out", str(out), *tiny_sets(), *(["--tensorboard"] if TENSORBOARD else []))
    assert proc.returncode == 0, proc.stderr
    assert "site 0" in proc.stdout  # progress and the final per-site table were shown
    return out


def test_run_writes_the_contract_files(run_dir):
    for name in ("summary.json", "metrics.jsonl", "report.html", "model.safetensors"):
        assert (run_dir / name).is_file(), name
    s = json.loads((run_dir / "summary.json").read_text())
    for key in CONTRACT:
        assert key in s, key
    assert s["ok"] and s["sites"] == 2 and s["algorithm"] == "diloco"
    assert s["tokens"] == 2 * 4 * 32 * 32 and s["outer_rounds"] == 8
    assert len(s["per_site"]) == 2 and s["wan_bytes"] == sum(p["wan_bytes"] for p in s["per_site"])
    # 2 sites: each sends the whole fp32 payload once per round (an all-gather, (K - 1) payloads = 1)
    assert s["per_site"][0]["wan_bytes"] == 8 * s["payload_bytes_per_sync"]
    kinds = {json.loads(line)["kind"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()}
    assert {"start", "step", "eval", "sync", "done"} <= kinds


@pytest.mark.skipif(not TENSORBOARD, reason="the tensorboard extra is not installed")
def test_tensorboard_event_files_hold_the_records(run_dir):
    """TensorBoard's own reader finds one run per site and a global one, with the records' values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def scalars(run: str) -> dict[str, list[tuple[int, float]]]:
        acc = EventAccumulator(str(run_dir / "tensorboard" / run))
        acc.Reload()
        return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

    s = json.loads((run_dir / "summary.json").read_text())
    assert s["tensorboard"] == "tensorboard"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    site_tags = {"loss/train", "optim/lr", "progress/tokens", "progress/outer_rounds", "wan/bytes",
                 "time/utilization", "time/compute_seconds", "time/comm_wait_seconds", "time/wall_seconds"}
    for k in range(2):
        got = scalars(f"site{k}")
        assert set(got) == site_tags
        steps = [r for r in records if r["kind"] == "step" and r["site"] == k]
        assert [st for st, _ in got["loss/train"]] == [r["step"] for r in steps]
        assert [v for _, v in got["loss/train"]] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
        assert got["wan/bytes"][-1][1] == pytest.approx(s["per_site"][k]["wan_bytes"], rel=1e-6)
        assert got["progress/outer_rounds"][-1][1] == s["outer_rounds"]
    run = scalars("global")
    assert set(run) == {"loss/eval", "progress/tokens", "progress/outer_rounds", "wan/bytes", "time/wall_seconds"}
    evals = [r for r in records if r["kind"] == "eval"]
    assert [st for st, _ in run["loss/eval"]] == [r["step"] for r in evals]
    assert run["loss/eval"][-1][1] == pytest.approx(s["eval_loss"], rel=1e-6)
    assert run["progress/tokens"][-1][1] == s["tokens"]


def test_report_renders_again(run_dir):
    (run_dir / "report.html").unlink()
    proc = geotrain("report", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "report.html").read_text().count("data:image/png;base64") == 4


def test_sample_continues_the_prompt(run_dir):
    proc = geotrain("sample", str(run_dir), "--prompt", "def ", "--max-bytes", "40")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("def ") and len(proc.stdout) > 10


def test_same_seed_same_model_and_without_out_a_fresh_run_directory(run_dir, tmp_path):
    first = json.loads((run_dir / "summary.json").read_text())
    overlap = "--overlap" if first["overlap"] else "--no-overlap"  # as the first run chose it for its link
    (tmp_path / "runs" / "20000101-000000").mkdir(parents=True)  # an earlier run, which must stay untouched
    (tmp_path / "runs" / "20000101-000000" / "summary.json").write_text("{}")
    proc = geotrain("run", "--quiet", "--sites", "2", "--tokens", "8192", "--sync-every", "4", "--link", "none",
                    overlap, *tiny_sets(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # no --out: a fresh runs/YYYYMMDD-HHMMSS, which runs/latest points to and the config names
    latest = tmp_path / "runs" / "latest"
    made = latest.parent / os.readlink(latest)
    assert latest.is_symlink() and made.is_dir() and made.name != "20000101-000000"
    assert (tmp_path / "runs" / "20000101-000000" / "summary.json").read_text() == "{}"
    second = json.loads((made / "summary.json").read_text())
    assert second["config"]["run"]["out"] == f"runs/{made.name}"
    assert json.loads((made / "config.json").read_text())["run"]["out"] == f"runs/{made.name}"
    (made / "report.html").unlink()
    assert geotrain("report", cwd=tmp_path).returncode == 0 and (made / "report.html").is_file()  # DIR: runs/latest
    resumed = geotrain("run", "--resume", "--dry-run", cwd=tmp_path)  # --resume alone: the newest run
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["run"]["out"] == f"runs/{made.name}"
    assert second["overlap"] == first["overlap"]
    assert [a for a in second["auto_settings"] if a["key"] != "checkpoint.every_rounds"] == []  # nothing else chosen
    # with the same settings, the emulated link changes timing, never the arithmetic
    assert first["params_sha256"] == second["params_sha256"]


def test_compare_writes_a_table(tmp_path):
    proc = geotrain("compare", "--quiet", "--sites", "2", "--tokens", "4096", "--sync-every", "4",
                    "--algorithms", "ddp,diloco", "--variant", "diloco-int8:codec=int8", "--out", str(tmp_path),
                    *tiny_sets())
    assert proc.returncode == 0, proc.stderr
    table = json.loads((tmp_path / "compare.json").read_text())
    rows = {r["name"]: r for r in table["runs"]}
    assert set(rows) == {"ddp", "diloco", "diloco-int8"}
    assert rows["diloco-int8"]["codec"] == "int8"
    assert rows["diloco-int8"]["wan_bytes"] < rows["diloco"]["wan_bytes"] < rows["ddp"]["wan_bytes"]
    assert (tmp_path / "compare.md").is_file() and (tmp_path / "compare.png").is_file()
