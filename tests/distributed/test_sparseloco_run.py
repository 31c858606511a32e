"""``sparseloco`` in real site processes: it trains, every site ends on the same model, and ``geotrain plan``
priced exactly the bytes its sites sent (the packed sparse payloads, indices and scales included)."""

from __future__ import annotations

import json
import math

import pytest

from _utils.runs import TINY
from geotrain.cli import main
from geotrain.comm.codecs import choose_codec
from geotrain.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_sparseloco_runs_with_overlap_and_sends_what_the_plan_priced(tmp_path, capsys):
    sets = [f"--set={k}={json.dumps(v)}" for k, v in TINY.items()]
    common = ["--algorithm", "sparseloco", "--sites", "2", "--sync-every", "4", "--tokens", str(2 * 4 * 32 * 12),
              "--set", "comm.overlap=true", "--set", "sparseloco.density=0.05", *sets]
    assert main(["plan", *common, "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert planned["codec"] == "sparse+int2" and planned["collective"] == "all_gather"

    code = main(["run", "--quiet", *common, "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] and summary["algorithm"] == "sparseloco" and summary["codec"] == "sparse+int2"
    assert summary["outer_rounds"] == 3 and summary["eval_loss"] < math.log(256)
    params = summary["param_bytes"] // 4
    assert summary["payload_bytes_per_sync"] == planned["payload_bytes_per_sync"]
    # chunked per tensor of the model: its layout, as the run's config describes it
    tensors = load_config(values={**TINY, "run.algorithm": "sparseloco"}).layout().tensors
    assert sum(n for _, n in tensors) == params
    by_tensor = choose_codec("sparse+int2", fraction=0.05, segments=tuple(n for _, n in tensors))
    assert summary["payload_bytes_per_sync"] == by_tensor.encoded_size(params)
    assert summary["wan_bytes"] == planned["wan_bytes"] > 0
    assert summary["sites_in_sync"] and summary["params_sha256"]  # every site decoded the same means
