"""``geotrain plan --config FILE`` plans exactly the run ``geotrain run --config FILE`` does: the payload bytes
per sync and the total WAN bytes of every shipped run configuration, counted from the definitions the run
uses, against what the run's sites counted from the payloads they sent.

The runs here are shortened (fewer tokens in smaller batches, the same override given to the plan), read a
small corpus and use no emulated link, which changes when bytes move but not how many;
benchmarks/plan_vs_run_bench.py runs the files as shipped, links included.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from geotrain.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# The grid examples end their rounds after a time (outer.sync_every_seconds), so how many steps and syncs a run
# makes depends on the machine's speed; benchmarks/power_bench.py sets them beside the planner's prediction.
CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[2] / "configs").glob("*.toml")
                 if not p.name.startswith(("plan-", "grid-")))
SHORT = ["--tokens", "110k", "--set", "data.batch_size=2"]  # 107-143 steps: every file syncs, its last round partial


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * i}\n" for i in range(4000)))
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_the_plan_of_a_run_file_counts_the_bytes_the_run_sends(path, corpus, tmp_path, capsys):
    assert main(["plan", "--config", str(path), *SHORT, "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    code = main(["run", "--quiet", "--config", str(path), *SHORT, "--link", "none",
                 "--data", str(corpus), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 0, err
    ran = json.loads((tmp_path / "summary.json").read_text())
    assert ran["steps"] == planned["steps"]
    assert ran["collective"] == planned["collective"]
    assert ran["payload_bytes_per_sync"] == planned["payload_bytes_per_sync"]
    assert ran["wan_bytes"] == planned["wan_bytes"]
    assert ran["wan_bytes"] > 0 and sum(s["wan_bytes"] for s in ran["per_site"]) == ran["wan_bytes"]
