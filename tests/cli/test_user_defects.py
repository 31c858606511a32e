"""What a new user meets first, through the real CLI: damaged model files and bad flags for `sample`, a report
that cannot be written, a second run that names other data, and flags without help.

Bad input exits with code 2 and a one-line message naming the field and the fix, never a traceback. Most cases
call ``geotrain.cli.main`` in this process; one per command runs ``python -m geotrain.cli`` to show that nothing
reaches the terminal but the message.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from _utils.runs import TINY
from geotrain.cli import main

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
