"""Bad input exits with code 2 and a one-paragraph message naming the field and the fix, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from geotrain.cli import main


def _run(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


CASES = [
    # (id, argv builder taking tmp_path, words the message must contain)
    ("unknown-key", lambda t: ["--set", "run.sitez=4"], ["run.sitez", "did you mean", "run.sites"]),
    ("wrong-type", lambda t: ["--set", "run.sites=four"], ["run.sites", "integer"]),
    ("negative-bandwidth", lambda t: ["--link=-10mbit/50ms"], ["wan.link", "negative"]),
    ("zero-bandwidth", lambda t: ["--link", "0mbit/50ms"], ["wan.link", "positive"]),
    ("h-zero", lambda t: ["--sync-every", "0"], ["outer.sync_every", "at least 1"]),
    ("zero-sites", lambda t: ["--sites", "0"], ["run.sites", "at least 1"]),
    ("missing-data", lambda t: ["--data", str(t / "nope.txt")], ["data.path", "nope.txt"]),
    ("empty-corpus", lambda t: ["--data", str((t / "empty").mkdir() or t / "empty")], ["data.path"]),
    ("unparsable-link", lambda t: ["--link", "fast"], ["wan.link", "BANDWIDTH/LATENCY"]),
    ("bad-unit", lambda t: ["--link", "10mbps/5ms"], ["wan.link", "mbit"]),
    ("bad-toml", lambda t: ["--config", str(_write(t / "bad.toml", "[run\nsites = 4"))], ["--config", "TOML"]),
    ("missing-config", lambda t: ["--config", str(t / "none.toml")], ["--config", "does not exist"]),
    ("unwritable-out", lambda t: ["--out", str(_write(t / "file", "x") / "sub")], ["run.out", "--out"]),
    ("unknown-algorithm", lambda t: ["--algorithm", "dilco"], ["run.algorithm", "diloco"]),
    ("bad-head-count", lambda t: ["--set", "model.n_head=3"], ["model.n_head"]),
    ("bad-override-form", lambda t: ["--set", "run.sites"], ["key=value"]),
    ("negative-tokens", lambda t: ["--tokens=-5"], ["run.tokens"]),
    ("bad-precision", lambda t: ["--precision", "fp8"], ["run.precision", "bf16"]),
]
if not torch.cuda.is_available():  # the case every CPU machine runs: asked for a GPU it does not have
    CASES.append(("cuda-without-cuda", lambda t: ["--device", "cuda"], ["run.device", "--device cpu"]))


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("name,argv,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_clear_message(tmp_path, capsys, name, argv, words):
    code, err = _run(capsys, ["run", "--quiet", "--out", str(tmp_path / "out"), *argv(tmp_path)])
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith("error: ")
    assert err.count("\n") == 1, f"message should be one paragraph: {err!r}"
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"


def test_unknown_codec_is_bad_input(tmp_path, capsys):
    code, err = _run(capsys, ["run", "--quiet", "--out", str(tmp_path), "--codec", "int3"])
    assert code == 2 and "comm.codec" in err and "int8" in err


@pytest.mark.slow  # starts a process
def test_bad_input_from_a_real_process(tmp_path):
    """The console entry point itself maps bad input to exit code 2 without a traceback."""
    proc = subprocess.run([sys.executable, "-m", "geotrain.cli", "run", "--sites", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "run.sites" in proc.stderr and "Traceback" not in proc.stderr


def test_report_of_a_directory_without_a_run(tmp_path, capsys):
    code, err = _run(capsys, ["report", str(tmp_path)])
    assert code == 2 and "summary.json" in err
