"""A transformers Llama trained by site processes: examples/hf_llama.py, tiny, 2 sites with DiLoCo; its hf/
export reloads with from_pretrained and gives the run's eval loss."""

from __future__ import annotations

import importlib.util
import json
import sysconfig
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # starts processes

ROOT = Path(__file__).resolve().parents[2]


def _example():
    spec = importlib.util.spec_from_file_location("hf_llama_example", ROOT / "examples" / "hf_llama.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_hf_llama_example_trains_on_two_sites_and_its_export_reloads(tmp_path, capsys):
    from geotrain.config import load_config
    from geotrain.models.hf import causal_lm_loss, run_eval_batches

    data = tmp_path / "source.txt"
    data.write_bytes(Path(sysconfig.get_paths()["stdlib"], "argparse.py").read_bytes()[:120_000])
    out = tmp_path / "run"
    code = _example().main(["--out", str(out), "--tokens", str(2 * 4 * 32 * 8), "--d-model", "32", "--layers", "1",
                            "--heads", "2", "--seq-len", "32", "--batch-size", "4", "--sync-every", "2",
                            "--eval-batches", "2", "--link", "none", "--data", str(data)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "eval loss: run" in printed and "LlamaForCausalLM" in printed

    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and summary["sites"] == 2 and summary["algorithm"] == "diloco"
    assert summary["outer_rounds"] == 4 and summary["steps"] == 8
    config = load_config(values=json.loads((out / "config.json").read_text()))
    assert summary["model_params"] == config.layout().params < 5_000_000
    # Checked here too, not only by the example: plain transformers on the run's own eval windows.
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "hf")
    batches = run_eval_batches(out)
    with torch.no_grad():
        reloaded = sum(float(causal_lm_loss(model, b)) for b in batches) / len(batches)
    assert abs(reloaded - summary["eval_loss"]) <= 1e-4
    assert summary["eval_loss"] < 5.0  # trained below ln(256) = 5.55
    tok = transformers.AutoTokenizer.from_pretrained(out / "hf")
    assert tok("def")["input_ids"] == list(b"def")  # byte-level: the ids are the bytes
