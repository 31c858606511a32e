"""``geotrain plan`` end to end, through a harness that mirrors geotrain's main (ConfigError -> exit 2)."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest

from geotrain.errors import ConfigError
from geotrain.planner.cli import add_parser, run

ROOT = Path(__file__).resolve().parents[2]
WORLD = ["--model-params", "70b", "--tokens", "15t", "--sites", "3", "--power-cap", "300", "--link", "10gbit/30ms"]


def geotrain(argv: list[str], capsys) -> tuple[int, str, str]:
    """Parse ``argv`` as geotrain's CLI would and run it: (exit code, stdout, stderr)."""
    parser = argparse.ArgumentParser(prog="geotrain")
    add_parser(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(argv)
        code = run(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=__import__("sys").stderr)
        code = 2
    except SystemExit as exc:  # argparse's own usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_json_has_the_contract_keys(capsys):
    code, out, _ = geotrain(["plan", *WORLD, "--codec", "int4", "--sync-every", "500", "--json"], capsys)
    assert code == 0
    obj = json.loads(out)
    for key in ("utilization", "step_seconds", "time_to_train_seconds", "wan_bytes", "peak_bandwidth_bps",
                "energy_mwh", "accelerators_powered"):
        assert key in obj, key
    assert "bandwidth_needed_bps" not in obj
    assert obj["accelerators_powered"] == [357142] * 3
    assert obj["caps_respected"] is True
    assert 0 < obj["utilization"] <= 1


def test_target_utilization_adds_bandwidth_needed(capsys):
    code, out, _ = geotrain(["plan", *WORLD, "--accelerators-per-site", "16384", "--codec", "int4",
                             "--sync-every", "500", "--target-utilization", "0.95", "--json"], capsys)
    assert code == 0
    obj = json.loads(out)
    assert obj["bandwidth_needed_bps"] > 10e9  # 82% at 10 Gbit/s, so 95% needs more
    by_alg = obj["bandwidth_needed_bps_by_algorithm"]
    assert set(by_alg) == {"ddp", "diloco", "diloco+overlap", "streaming+overlap"}
    assert by_alg["ddp"] is None  # 4 ring steps of 30 ms exceed what a 95% DDP step can hide
    assert by_alg["diloco+overlap"] < by_alg["diloco"]
    assert "smallest_sync_every" in obj and "mildest_codec" in obj


def test_rich_tables(capsys):
    code, out, _ = geotrain(["plan", *WORLD, "--codec", "int4", "--compare", "--target-utilization", "0.95"], capsys)
    assert code == 0
    for words in ("Plan", "Sites", "Algorithms side by side", "diloco H=100+overlap", "streaming", "MWh",
                  "To reach 95.0% utilization", "357,142"):
        assert words in out, words


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--power-cap", "-5"], "power_cap_mw"),
        (["--watts", "-700"], "watts"),
        (["--mfu", "1.5"], "mfu"),
        (["--accelerator", "H10"], "did you mean 'H100'"),
        (["--bandwidth", "ten gigabits"], "cannot parse bandwidth"),
        (["--link", "10gbit"], "unknown link"),
        (["--model-params", "seventy"], "model.params"),
        (["--algorithm", "dilocco"], "did you mean 'diloco'"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(capsys, extra, words):
    code, out, err = geotrain(["plan", *WORLD, *extra], capsys)
    assert code == 2
    assert err.startswith("error: ") and words in err
    assert "Traceback" not in err and out == ""


def test_unknown_config_key_exits_2(tmp_path, capsys):
    cfg = tmp_path / "plan.toml"
    cfg.write_text('[model]\nparams = "70b"\ntokens = "15t"\n[algorithm]\nsync_evry = 10\n')
    code, _, err = geotrain(["plan", "--config", str(cfg), "--accelerators-per-site", "8"], capsys)
    assert code == 2 and "sync_evry" in err and "sync_every" in err


def test_sweep_and_plot(tmp_path, capsys):
    png = tmp_path / "sweep.png"
    code, out, _ = geotrain(["plan", *WORLD, "--accelerators-per-site", "16384", "--sweep", "1gbit:1tbit:7",
                             "--plot", str(png), "--json"], capsys)
    assert code == 0
    obj = json.loads(out)
    assert len(obj["sweep"]["bandwidths_bps"]) == 7
    assert set(obj["sweep"]["utilization"]) == {"ddp", "diloco", "diloco+overlap", "streaming+overlap"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = geotrain(["plan", *WORLD, "--accelerators-per-site", "16384", "--sweep", "1gbit,10gbit"],
                            capsys)
    assert code == 0 and "Utilization against link bandwidth" in out


def test_plot_to_a_missing_directory_exits_2(tmp_path, capsys):
    code, _, err = geotrain(["plan", *WORLD, "--plot", str(tmp_path / "no" / "such" / "dir.png")], capsys)
    assert code == 2 and "cannot write the plot" in err


def test_simulation_is_seeded(capsys):
    argv = ["plan", *WORLD, "--accelerators-per-site", "16384", "--codec", "int4", "--sync-every", "500",
            "--simulate", "--mtbf-hours", "24", "--jitter", "0.05", "--json"]
    first = json.loads(geotrain([*argv, "--seed", "1"], capsys)[1])["simulation"]
    again = json.loads(geotrain([*argv, "--seed", "1"], capsys)[1])["simulation"]
    other = json.loads(geotrain([*argv, "--seed", "2"], capsys)[1])["simulation"]
    assert first == again and first != other
    assert first["failures"] > 0 and first["lost_hours"] > 0


def test_shipped_configs_run(capsys):
    for path in sorted((ROOT / "configs").glob("plan-*.toml")):
        code, out, _ = geotrain(["plan", "--config", str(path), "--json"], capsys)
        assert code == 0, path
        json.loads(out)


def _doc_commands() -> list[list[str]]:
    doc = (ROOT / "docs" / "planner.md").read_text()
    commands = []
    for block in re.findall(r"```(?:bash|console|sh)\n(.*?)```", doc, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("geotrain plan"):
                commands.append(shlex.split(line)[1:])
    return commands


def test_the_docs_commands_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # commands may write plots
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    commands = _doc_commands()
    assert len(commands) >= 3
    for argv in commands:
        code, _, err = geotrain(argv, capsys)
        assert code == 0, (argv, err)


def test_the_worked_example_figures_in_the_docs_are_current(capsys):
    """docs/planner.md pastes the planner's output; fail when the model drifts away from it."""
    from geotrain.planner.report import fmt_bps, fmt_pct

    doc = (ROOT / "docs" / "planner.md").read_text()
    base = ["plan", "--config", str(ROOT / "configs" / "plan-three-datacenters.toml"), "--compare",
            "--target-utilization", "0.95", "--json"]
    for extra in ([], ["--codec", "int8"], ["--accelerators-per-site", "16384"],
                  ["--accelerators-per-site", "16384", "--codec", "int8"]):
        obj = json.loads(geotrain([*base, *extra], capsys)[1])
        for name, r in obj["compare"].items():
            assert fmt_pct(r["utilization"]) in doc, (extra, name)
            assert f"{r['energy_mwh']:,.0f}" in doc, (extra, name)
            assert fmt_bps(obj["bandwidth_needed_bps_by_algorithm"][name]) in doc, (extra, name)
