"""What a new user meets first, through the real CLI: damaged model files and bad flags for `sample`, a report
that cannot be written, a second run that names other data, and flags without help.

Bad input exits with code 2 and a one-line message naming the field and the fix, never a traceback. Most cases
call ``geotrain.cli.main`` in this process; one per command runs ``python -m geotrain.cli`` to show that nothing
reaches the terminal but the message.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from _utils.runs import TINY, tiny_config
from geotrain.cli import SAMPLE_MAX_BYTES, build_parser, main

pytestmark = pytest.mark.timeout(240)


def geotrain(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "geotrain.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_bad_input(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith("error: ") and err.count("\n") == 1, f"message should be one paragraph: {err!r}"
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"


# ------------------------------------------------------------------------------------------------------ sample


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """The two files `geotrain run` leaves for `sample`, written directly: no training needed."""
    from safetensors.torch import save_file

    from geotrain.models.gpt import GPTConfig, init_gpt

    config = tiny_config(tmp_path)
    tree = config.to_dict()  # what launch writes to config.json: the resolved config
    (tmp_path / "config.json").write_text(json.dumps(tree, indent=2))
    model = init_gpt(GPTConfig(**tree["model"]), seed=0)
    # As site.py saves them: the parameters by name, contiguous, on the CPU.
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_sample_of_a_sound_model_dir(model_dir, capsys):
    code, out, err = run_cli(capsys, ["sample", str(model_dir), "--prompt", "def ", "--max-bytes", "20"])
    assert code == 0, err
    assert out.startswith("def ")


def test_temperature_zero_is_greedy_and_ignores_the_seed(model_dir, capsys):
    outs = []
    for seed in ("0", "1"):
        code, out, err = run_cli(capsys, ["sample", str(model_dir), "--prompt", "ab", "--max-bytes", "16",
                                          "--temperature", "0", "--seed", seed])
        assert code == 0, err
        outs.append(out)
    assert outs[0] == outs[1]


@pytest.mark.parametrize("flags", [["--temperature", "0.01"], ["--temperature", "10"], ["--max-bytes", "1"],
                                   ["--seed", str(2**64 - 1)]], ids=["t-min", "t-max", "one-byte", "seed-max"])
def test_sample_accepts_the_ends_of_each_range(model_dir, capsys, flags):
    code, out, err = run_cli(capsys, ["sample", str(model_dir), "--prompt", "x", *flags])
    assert code == 0, err


BAD_FLAGS = [
    ("t-negative", ["--temperature=-1"], ["--temperature", "0.01 to 10"]),
    ("t-tiny", ["--temperature", "1e-40"], ["--temperature", "greedy"]),
    ("t-large", ["--temperature", "11"], ["--temperature"]),
    ("t-nan", ["--temperature", "nan"], ["--temperature", "nan"]),
    ("t-inf", ["--temperature", "inf"], ["--temperature", "inf"]),
    ("bytes-negative", ["--max-bytes=-1"], ["--max-bytes", f"1 to {SAMPLE_MAX_BYTES}"]),
    ("bytes-zero", ["--max-bytes", "0"], ["--max-bytes"]),
    ("bytes-too-many", ["--max-bytes", str(SAMPLE_MAX_BYTES + 1)], ["--max-bytes"]),
    ("seed-negative", ["--seed=-1"], ["--seed"]),
    ("seed-too-large", ["--seed", str(2**64)], ["--seed"]),
    ("prompt-empty", ["--prompt="], ["--prompt"]),
]


@pytest.mark.parametrize("name,flags,words", BAD_FLAGS, ids=[c[0] for c in BAD_FLAGS])
def test_sample_rejects_bad_flags(model_dir, capsys, name, flags, words):
    code, _, err = run_cli(capsys, ["sample", str(model_dir), "--prompt", "x", *flags])
    assert_bad_input(code, err, *words)


def _nan_weights(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    state["wte.weight"][0, 0] = float("nan")
    save_file(state, str(path))


DAMAGED_WEIGHTS: list[tuple[str, Callable[[Path], None], list[str]]] = [
    ("random-bytes", lambda p: p.write_bytes(os.urandom(4096)), ["safetensors", "damaged"]),
    ("cut-in-half", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), ["safetensors"]),
    ("empty", lambda p: p.write_bytes(b""), ["safetensors", "empty"]),
    ("nan-weights", _nan_weights, ["NaN", "wte.weight", "optim.lr"]),
]


@pytest.mark.parametrize("name,damage,words", DAMAGED_WEIGHTS, ids=[c[0] for c in DAMAGED_WEIGHTS])
def test_sample_of_damaged_weights(model_dir, capsys, name, damage, words):
    damage(model_dir / "model.safetensors")
    code, _, err = run_cli(capsys, ["sample", str(model_dir), "--prompt", "x"])
    assert_bad_input(code, err, "DIR", "model.safetensors", "geotrain run", *words)


def _edit_model(**fields) -> Callable[[dict], object]:
    def edit(tree: dict) -> dict:
        tree["model"].update(fields)
        return tree

    return edit


def _drop_model_field(name: str) -> Callable[[dict], object]:
    def edit(tree: dict) -> dict:
        del tree["model"][name]
        return tree

    return edit


BROKEN_CONFIGS: list[tuple[str, Callable[[dict], object] | str, list[str]]] = [
    ("invalid-json", '{"model": {', ["JSON"]),
    ("not-utf8", "\udcff", ["JSON"]),
    ("not-an-object", lambda tree: [1, 2], ['"model"']),
    ("no-model", lambda tree: {k: v for k, v in tree.items() if k != "model"}, ['"model"']),
    ("model-not-an-object", lambda tree: {**tree, "model": 3}, ['"model"']),
    ("n-layer-a-string", _edit_model(n_layer="x"), ["model.n_layer", "'x'"]),
    ("n-layer-zero", _edit_model(n_layer=0), ["model.n_layer"]),
    ("n-layer-missing", _drop_model_field("n_layer"), ["model.n_layer", "missing"]),
    ("unknown-field", _edit_model(n_layers=1), ["model.n_layers", "n_layer"]),
    ("dropout-a-string", _edit_model(dropout="x"), ["model.dropout"]),
    ("heads-do-not-divide", _edit_model(n_head=3), ["model.n_head"]),
    ("shape-not-the-weights", _edit_model(n_layer=2), ["does not match"]),
]


@pytest.mark.parametrize("name,edit,words", BROKEN_CONFIGS, ids=[c[0] for c in BROKEN_CONFIGS])
def test_sample_of_a_broken_config_json(model_dir, capsys, name, edit, words):
    path = model_dir / "config.json"
    if isinstance(edit, str):
        path.write_bytes(edit.encode("utf-8", "surrogateescape"))
    else:
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    code, _, err = run_cli(capsys, ["sample", str(model_dir), "--prompt", "x"])
    assert_bad_input(code, err, "DIR", "config.json", *words)


def test_sample_without_a_model(tmp_path, capsys):
    code, _, err = run_cli(capsys, ["sample", str(tmp_path), "--prompt", "x"])
    assert_bad_input(code, err, "DIR", "model.safetensors")


@pytest.mark.slow  # starts a process
def test_sample_bad_input_from_a_real_process(model_dir):
    proc = geotrain("sample", str(model_dir), "--prompt", "x", "--temperature", "nan")
    assert proc.returncode == 2 and "--temperature" in proc.stderr and "Traceback" not in proc.stderr
    (model_dir / "model.safetensors").write_bytes(os.urandom(1000))
    proc = geotrain("sample", str(model_dir), "--prompt", "x")
    assert proc.returncode == 2 and "model.safetensors" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


# ------------------------------------------------------------------------------------------------------ report


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run directory as far as `report` needs one: a summary (the report marks what is missing)."""
    d = tmp_path / "run"
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({"algorithm": "diloco", "sites": 2, "ok": True}))
    return d


def test_report_into_a_directory_named_report_html(run_dir, capsys):
    (run_dir / "report.html").mkdir()  # stops root too, unlike a read-only directory
    code, _, err = run_cli(capsys, ["report", str(run_dir)])
    assert_bad_input(code, err, "DIR", "report.html", "directory", "--out")
    assert (run_dir / "report.html").is_dir()
    assert sorted(p.name for p in run_dir.iterdir()) == ["report.html", "summary.json"]  # no temporary file left


def test_report_out_below_a_file(run_dir, capsys):
    code, _, err = run_cli(capsys, ["report", str(run_dir), "--out", str(run_dir / "summary.json" / "r.html")])
    assert_bad_input(code, err, "--out", "not a directory")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only directories")
def test_report_into_a_read_only_run_dir(run_dir, capsys):
    run_dir.chmod(0o500)
    try:
        code, _, err = run_cli(capsys, ["report", str(run_dir)])
    finally:
        run_dir.chmod(0o700)
    assert_bad_input(code, err, "DIR", "writable", "--out")


def test_report_out_writes_elsewhere(run_dir, tmp_path, capsys):
    (run_dir / "report.html").mkdir()
    out = tmp_path / "elsewhere" / "r.html"
    code, stdout, err = run_cli(capsys, ["report", str(run_dir), "--out", str(out)])
    assert code == 0, err
    assert out.is_file() and "<html" in out.read_text() and str(out) in stdout


@pytest.mark.slow  # starts a process
def test_report_bad_input_from_a_real_process(run_dir):
    (run_dir / "report.html").mkdir()
    proc = geotrain("report", str(run_dir))
    assert proc.returncode == 2 and "report.html" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------- coordinator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BAD_COORDINATOR = [
    ("port-negative", ["--port", "-1"], ["--port", "1 to 65535"]),
    ("port-too-large", ["--port", "70000"], ["--port"]),
    ("hours-zero", ["--hours", "0"], ["--hours", "positive"]),
    ("hours-nan", ["--hours", "nan"], ["--hours"]),
    ("host-not-this-machine", ["--host", "192.0.2.1"], ["--host", "192.0.2.1"]),  # TEST-NET-1: never local
]


@pytest.mark.parametrize("name,flags,words", BAD_COORDINATOR, ids=[c[0] for c in BAD_COORDINATOR])
def test_coordinator_rejects_bad_flags(capsys, tmp_path, name, flags, words):
    code, _, err = run_cli(capsys, ["coordinator", "--token-file", str(tmp_path / "token"), *flags])
    assert_bad_input(code, err, *words)


BAD_TOKENS = [
    ("short", "abcd\n", 0o600, "at least 16 bytes"),
    ("not-hex", "zz" * 32 + "\n", 0o600, "at least 16 bytes"),
    ("readable-by-others", "ab" * 32 + "\n", 0o644, "chmod 600"),
]


@pytest.mark.parametrize("name,text,mode,words", BAD_TOKENS, ids=[c[0] for c in BAD_TOKENS])
def test_coordinator_rejects_a_bad_token_file(capsys, tmp_path, name, text, mode, words):
    token = tmp_path / "token"
    token.write_text(text)
    token.chmod(mode)
    code, _, err = run_cli(capsys, ["coordinator", "--token-file", str(token), "--port", str(_free_port())])
    assert_bad_input(code, err, "--token-file", words)


def test_coordinator_on_a_port_in_use(capsys, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code, _, err = run_cli(capsys, ["coordinator", "--token-file", str(tmp_path / "token"), "--host", "127.0.0.1",
                                        "--port", str(busy.getsockname()[1])])
    assert_bad_input(code, err, "--port", "another")


@pytest.mark.slow  # starts a process
def test_coordinator_from_a_real_process(tmp_path):
    token = tmp_path / "token"
    proc = geotrain("coordinator", "--token-file", str(token), "--port", "65536")
    assert proc.returncode == 2 and "--port" in proc.stderr and "Traceback" not in proc.stderr
    # A clean start and stop: --hours 0.0003 is about a second. It writes a fresh secret, private to its owner.
    proc = geotrain("coordinator", "--token-file", str(token), "--host", "127.0.0.1", "--port", str(_free_port()),
                    "--hours", "0.0003")
    assert proc.returncode == 0, proc.stderr
    assert "listening" in proc.stdout and "wrote a fresh secret" in proc.stdout
    assert token.stat().st_mode & 0o077 == 0 and len(bytes.fromhex(token.read_text().strip())) == 32


# -------------------------------------------------------------------------------------------------------- help


def _subcommand(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command", ["sample", "coordinator", "report"])
def test_every_flag_has_help_that_states_its_default(command, capsys):
    p = _subcommand(command)
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"{command} {name} has no help"
        if action.option_strings:
            assert "default" in action.help or "required" in action.help, f"{command} {name}: {action.help!r}"
        if action.default is not None:
            assert "%(default)s" in action.help, f"{command} {name} should show its default with %(default)s"
    text = p.format_help()
    for action in p._actions:
        if action.default not in (None, argparse.SUPPRESS):
            assert f"(default {action.default})" in " ".join(text.split()), action.dest


# ----------------------------------------------------------------------------------------------- run and data


def _text_file(path: Path, word: str, size: int = 100_000) -> Path:
    line = f"{word}: the quick brown fox jumps over the lazy dog\n"
    path.write_text(line * (size // len(line) + 1))
    return path


@pytest.mark.slow
def test_second_run_into_the_same_out_trains_on_its_own_data(tmp_path, capsys):
    a, b = _text_file(tmp_path / "alpha.txt", "alpha"), _text_file(tmp_path / "bravo.txt", "bravo")
    out = tmp_path / "out"
    sets = [f"--set={k}={json.dumps(v)}" for k, v in TINY.items() if k != "wan.link"]
    common = ["run", "--quiet", "--sites", "2", "--tokens", "2048", "--sync-every", "4", "--link", "none",
              "--out", str(out), *sets]
    for path in (a, b):
        code, _, err = run_cli(capsys, [*common, "--data", str(path)])
        assert code == 0, err
        summary = json.loads((out / "summary.json").read_text())
        assert path.name in summary["data"], summary["data"]
        assert path.name in json.loads((out / "data" / "corpus.json").read_text())["source"]
