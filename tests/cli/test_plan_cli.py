"""``geotrain plan`` end to end, through a harness that mirrors geotrain's main (ConfigError -> exit 2)."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

from geotrain.errors import ConfigError
from geotrain.planner.cli import add_parser, run
from geotrain.topology import wire_bytes

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))
# Three datacenters at a 300 MW cap, 10 Gbit/s links, 70B on 15T tokens in batches of 16M.
WORLD = ["--model-params", "70b", "--tokens", "15t", "--batch-tokens", "16m", "--seq-len", "8192", "--sites", "3",
         "--power-cap", "300", "--link", "10gbit/30ms"]
VARIANTS = {"ddp", "diloco", "diloco+overlap", "streaming", "sparseloco", "sparseloco+overlap"}


def geotrain(argv: list[str], capsys) -> tuple[int, str, str]:
    """Parse ``argv`` as geotrain's CLI would and run it: (exit code, stdout, stderr)."""
    parser = argparse.ArgumentParser(prog="geotrain")
    add_parser(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(argv)
        code = run(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except SystemExit as exc:  # argparse's own usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def plan_json(argv: list[str], capsys) -> dict:
    code, out, err = geotrain(["plan", *argv, "--json"], capsys)
    assert code == 0, err
    return json.loads(out)


def test_json_has_the_contract_keys(capsys):
    obj = plan_json([*WORLD, "--codec", "int4", "--sync-every", "500", "--no-overlap"], capsys)
    for key in ("utilization", "step_seconds", "time_to_train_seconds", "time_to_train_days", "wan_bytes",
                "peak_bandwidth_bps", "energy_mwh", "accelerators_powered", "caps_respected", "collective",
                "payload_bytes_per_sync", "auto", "per_site", "inputs"):
        assert key in obj, key
    assert "bandwidth_needed_bps" not in obj and "compare" not in obj and "simulation" not in obj
    assert obj["accelerators_powered"] == [357142] * 3  # floor(300 MW / (700 W * 1.2)) each
    assert obj["caps_respected"] is True
    assert obj["collective"] == "reduce_scatter" and obj["auto"] == []
    # the int4 payload of 70e9 values among 3 sites: 3 chunks of 12,031,250,056 encoded bytes
    assert obj["payload_bytes_per_sync"] == 3 * 12_031_250_056
    assert obj["inputs"]["batch_tokens"] == 16_000_000 and obj["inputs"]["params"] == 70_000_000_000
    assert 0 < obj["utilization"] <= 1


def test_unset_overlap_is_chosen_and_reported(capsys):
    obj = plan_json([*WORLD, "--codec", "int4", "--sync-every", "500"], capsys)
    assert [(a["key"], a["value"]) for a in obj["auto"]] == [("comm.overlap", True)]
    assert obj["algorithm"] == "diloco H=500+overlap"
    code, out, _ = geotrain(["plan", *WORLD, "--codec", "int4", "--sync-every", "500"], capsys)
    assert code == 0 and "chose comm.overlap = True" in out


def test_target_utilization_adds_bandwidth_needed(capsys):
    obj = plan_json([*WORLD, "--accelerators-per-site", "16384", "--codec", "int4", "--sync-every", "500",
                     "--no-overlap", "--target-utilization", "0.95"], capsys)
    assert obj["utilization"] < 0.95  # about 85% at 10 Gbit/s without overlap
    assert obj["bandwidth_needed_bps"] > 10e9  # so 95% needs more
    by_alg = obj["bandwidth_needed_bps_by_algorithm"]
    assert set(by_alg) == VARIANTS
    # ddp's bf16 gradients reduce-scatter among 3 sites: 6 latencies of 30 ms a sync at any bandwidth (the
    # all-to-all's announcement and flight, and 4 in the latency-bound ring all-gather), 0.18 s, more than a
    # 0.35 s step can spare for 95%
    assert by_alg["ddp"] is None
    assert by_alg["diloco"] == pytest.approx(obj["bandwidth_needed_bps"])
    assert by_alg["diloco+overlap"] < by_alg["diloco"]
    # without overlap no candidate H up to 1000 and no codec reaches 95% at 10 Gbit/s; overlapped, both do
    assert obj["smallest_sync_every"] is None and obj["mildest_codec"] is None
    over = plan_json([*WORLD, "--accelerators-per-site", "16384", "--codec", "int4", "--sync-every", "500",
                      "--overlap", "--target-utilization", "0.95"], capsys)
    assert over["bandwidth_needed_bps"] == pytest.approx(by_alg["diloco+overlap"])
    assert over["smallest_sync_every"] in (1, 5, 10, 25, 50, 100, 250, 500)
    assert over["mildest_codec"] in ("fp32", "bf16", "int8", "int4")


def test_rich_tables(capsys):
    code, out, _ = geotrain(["plan", *WORLD, "--codec", "int4", "--compare", "--target-utilization", "0.95"], capsys)
    assert code == 0
    # H defaults to 50 (a run's default); the overlap setting the plan chose is printed with its reason
    for words in ("Plan", "Sites", "Algorithms side by side", "diloco H=50+overlap", "streaming H=50 P=4",
                  "chose comm.overlap = True",
                  "MWh", "To reach 95.0% utilization", "357,142", "reduce_scatter"):
        assert words in out, words


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--power-cap", "-5"], "power_cap_mw"),
        (["--watts", "-700"], "watts"),
        (["--mfu", "1.5"], "mfu"),
        (["--accelerator", "H10"], "did you mean 'H100'"),
        (["--bandwidth", "ten gigabits"], "cannot parse bandwidth"),
        (["--link", "10gbit"], "cannot parse link"),
        (["--model-params", "seventy"], "model.params"),
        (["--algorithm", "dilocco"], "did you mean 'diloco'"),
        (["--codec", "fp16"], "unknown codec"),
        (["--codec", "topk", "--topk-fraction", "2"], "comm.topk_fraction"),
        (["--workers-per-site", "0"], "run.workers_per_site"),
        (["--step-seconds", "-1"], "step_seconds"),
        (["--set", "outer.sync_evry=5"], "did you mean 'outer.sync_every'"),
        (["--set", "outer.sync_every"], "key=value"),
        (["--algorithm", "ddp", "--overlap"], "comm.overlap"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(capsys, extra, words):
    code, out, err = geotrain(["plan", *WORLD, *extra], capsys)
    assert code == 2
    assert err.startswith("error: ") and words in err
    assert "Traceback" not in err and out == ""


def test_unknown_config_key_exits_2(tmp_path, capsys):
    cfg = tmp_path / "plan.toml"
    cfg.write_text('[model]\nparams = "70b"\n[run]\ntokens = "15t"\n[outer]\nsync_evry = 10\n')
    code, _, err = geotrain(["plan", "--config", str(cfg), "--accelerators-per-site", "8"], capsys)
    assert code == 2 and "sync_evry" in err and "sync_every" in err


def test_a_plan_file_in_the_former_vocabulary_exits_2_naming_the_new_keys(tmp_path, capsys):
    cfg = tmp_path / "old.toml"
    cfg.write_text('[model]\nparams = "70b"\ntokens = "15t"\n')
    code, _, err = geotrain(["plan", "--config", str(cfg)], capsys)
    assert code == 2 and "model.tokens" in err and "run.tokens" in err


def test_set_and_new_flags(capsys):
    base = plan_json([*WORLD, "--codec", "int4", "--no-overlap"], capsys)
    assert base["inputs"]["workers_per_site"] == 1
    obj = plan_json([*WORLD, "--codec", "int4", "--no-overlap", "--set", "outer.sync_every=250",
                     "--workers-per-site", "2", "--step-seconds", "0.5"], capsys)
    assert obj["algorithm"] == "diloco H=250"
    assert obj["inputs"]["workers_per_site"] == 2
    assert obj["compute_step_seconds"] == 0.5 and all(s["step_seconds"] == 0.5 for s in obj["inputs"]["sites"])
    # 2 workers each carry half of the payload: 3 chunks of ceil(35e9 / 3) = 11,666,666,667 values, encoded as
    # 48 + pad8(4 * 45,572,917 = 182,291,668) = 182,291,672 + pad8(5,833,333,334) = 5,833,333,336.
    assert obj["payload_bytes_per_sync"] == 3 * (48 + 182_291_672 + 5_833_333_336)
    # top-k at 5% all-gathers: 70e9 values are 17,089,843 chunks of 4096 and a last one of 3,072; it keeps
    # ceil(204.8) = 205 of each and ceil(205 * 3072 / 4096) = 154 of the last: 3,503,417,969 entries, with
    # uint16 indices pad8(7,006,835,938) = 7,006,835,944 and fp32 values pad8(14,013,671,876) = 14,013,671,880.
    topk = plan_json([*WORLD, "--codec", "topk", "--topk-fraction", "0.05"], capsys)
    assert topk["collective"] == "all_gather" and topk["codec"] == "topk"
    assert topk["payload_bytes_per_sync"] == 48 + 7_006_835_944 + 14_013_671_880


def test_sweep_and_plot(tmp_path, capsys):
    png = tmp_path / "sweep.png"
    obj = plan_json([*WORLD, "--accelerators-per-site", "16384", "--sweep", "1gbit:1tbit:7", "--plot", str(png)],
                    capsys)
    assert len(obj["sweep"]["bandwidths_bps"]) == 7
    assert set(obj["sweep"]["utilization"]) == VARIANTS
    assert obj["plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = geotrain(["plan", *WORLD, "--accelerators-per-site", "16384", "--sweep", "1gbit,10gbit"], capsys)
    assert code == 0 and "Utilization against link bandwidth" in out


def test_plot_to_a_missing_directory_exits_2(tmp_path, capsys):
    code, _, err = geotrain(["plan", *WORLD, "--plot", str(tmp_path / "no" / "such" / "dir.png")], capsys)
    assert code == 2 and "cannot write the plot" in err


def test_simulation_is_seeded(capsys):
    argv = [*WORLD, "--accelerators-per-site", "16384", "--codec", "int4", "--sync-every", "500",
            "--simulate", "--mtbf-hours", "24", "--jitter", "0.05", "--recovery", "elastic"]
    first = plan_json([*argv, "--sim-seed", "1"], capsys)["simulation"]
    again = plan_json([*argv, "--sim-seed", "1"], capsys)["simulation"]
    other = plan_json([*argv, "--sim-seed", "2"], capsys)["simulation"]
    assert first == again and first != other
    assert first["failures"] > 0 and first["lost_hours"] > 0
    assert first["recovery"] == "elastic" and first["mtbf_hours"] == 24.0 and first["jitter"] == 0.05
    # the default recovery is elastic, and its costs are reported per failure and in all
    default = plan_json([*WORLD, "--accelerators-per-site", "16384", "--codec", "int4", "--simulate",
                         "--mtbf-hours", "24"], capsys)["simulation"]
    assert default["recovery"] == "elastic" and default["silent_fraction"] == 1.0
    for key in ("detection", "reform"):
        assert default[f"{key}_seconds_per_failure"] == pytest.approx(default[f"{key}_seconds"] / default["failures"])
    assert default["heal_seconds_per_rejoin"] == pytest.approx(default["heal_seconds"] / default["rejoins"])
    assert default["heal_seconds"] > 0 and default["heal_bytes"] == 6 * 4 * 70 * 10**9
    costs = default["failure_costs"]
    assert costs["detection_silent_seconds"] == 10.0 and costs["heal_bytes"] == default["heal_bytes"]
    # 1.68 TB in one message over 10 Gbit/s, 30 ms: the joiner's announcement and the last byte's flight, and the
    # bytes with their TCP/IP headers (52 per 1448-byte segment) at the 95% of the link a connection is paced at:
    # 1465.6 s
    assert costs["heal_seconds"] == pytest.approx(2 * 0.03 + 8 * wire_bytes(1.68e12) / (0.95 * 10e9))
    restart = plan_json([*WORLD, "--accelerators-per-site", "16384", "--codec", "int4", "--simulate",
                         "--mtbf-hours", "24", "--recovery", "restart"], capsys)["simulation"]
    assert restart["recovery"] == "restart" and "failure_costs" not in restart and restart["heal_seconds"] == 0
    crash = plan_json([*WORLD, "--accelerators-per-site", "16384", "--codec", "int4", "--simulate",
                       "--mtbf-hours", "24", "--silent-fraction", "0"], capsys)["simulation"]
    assert crash["silent_failures"] == 0 and crash["detection_seconds"] == 0


def test_simulation_prints_the_failure_costs(capsys):
    code, out, err = geotrain(["plan", *WORLD, "--accelerators-per-site", "16384", "--codec", "int4", "--simulate",
                               "--mtbf-hours", "24", "--sim-seed", "1"], capsys)
    assert code == 0, err
    for text in ("elastic recovery", "detection per failure / in all", "re-forming per failure / in all",
                 "healing per rejoin / in all", "stall of the running sites", "One failure of site2",
                 "membership.heartbeat_timeout_s", "1.68 TB of state from site0 over 10gbit/30ms"):
        assert text in out, text
    code, out, err = geotrain(["plan", *WORLD, "--simulate", "--mtbf-hours", "24", "--recovery", "restart"], capsys)
    assert code == 0, err
    assert "restart recovery" in out and "detection per failure" not in out and "One failure of" not in out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_run(path, capsys):
    obj = plan_json(["--config", str(path)], capsys)
    assert 0 < obj["utilization"] <= 1


def test_a_run_file_is_planned_at_its_own_scale_or_moved_by_flags(capsys):
    own = plan_json(["--config", str(ROOT / "configs" / "demo.toml")], capsys)
    # fp32 among 4 sites: 4 framed chunks (48-byte header + a quarter of the values each)
    assert own["inputs"]["params"] == 445_952 and own["payload_bytes_per_sync"] == 4 * (48 + 445_952)
    moved = plan_json(["--config", str(ROOT / "configs" / "demo.toml"), "--model-params", "10b",
                       "--accelerators-per-site", "4096", "--link", "internet"], capsys)
    assert moved["inputs"]["params"] == 10_000_000_000 and moved["payload_bytes_per_sync"] == 4 * (48 + 10**10)
    assert moved["inputs"]["sites"][0]["accelerators"] == 4096
    assert moved["inputs"]["link"] == "1gbit/50ms (internet preset)"


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


def test_the_help_examples_run(tmp_path, capsys, monkeypatch):
    from geotrain.planner.cli import _EPILOG

    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "plan.toml").write_text('[model]\nparams = "7b"\n[run]\ntokens = "1t"\nsites = 2\n[plan]\n'
                                        'batch_tokens = "4m"\n[sites]\naccelerators = 1024\n'
                                        '[wan]\nlink = "cross-country"\n')
    commands = [shlex.split(line.split("#")[0])[1:] for line in _EPILOG.splitlines()
                if line.strip().startswith("geotrain plan")]
    assert len(commands) >= 5
    for argv in commands:
        code, _, err = geotrain(argv, capsys)
        assert code == 0, (argv, err)


def test_the_worked_example_figures_in_the_docs_are_current(capsys):
    """docs/planner.md pastes the planner's output; fail when the model drifts away from it."""
    from geotrain.planner.report import fmt_bps, fmt_pct

    doc = (ROOT / "docs" / "planner.md").read_text()
    base = ["--config", str(ROOT / "configs" / "plan-three-datacenters.toml"), "--compare",
            "--target-utilization", "0.95"]
    for extra in ([], ["--codec", "int8"], ["--accelerators-per-site", "16384"],
                  ["--accelerators-per-site", "16384", "--codec", "int8"]):
        obj = plan_json([*base, *extra], capsys)
        for name, r in obj["compare"].items():
            assert fmt_pct(r["utilization"]) in doc, (extra, name)
            assert f"{r['energy_mwh']:,.0f}" in doc, (extra, name)
            assert fmt_bps(obj["bandwidth_needed_bps_by_algorithm"][name]) in doc, (extra, name)


def test_the_docs_failure_table_is_what_the_simulation_gives(capsys):
    """docs/planner.md's table of failures, row by row, from the commands above it."""
    doc = (ROOT / "docs" / "planner.md").read_text()
    base = ["--config", str(ROOT / "configs" / "plan-three-datacenters.toml"), "--accelerators-per-site", "16384",
            "--simulate", "--mtbf-hours", "24", "--sim-seed", "1"]
    rows = {"elastic, every failure silent (the default)": [], "elastic, every failure a crash": ["--silent-fraction", "0"],
            "restart from hourly checkpoints": ["--recovery", "restart"]}
    for label, extra in rows.items():
        s = plan_json([*base, *extra], capsys)["simulation"]
        row = (f"| {label} | {s['time_to_train_days']:.1f} days | {100 * s['utilization']:.1f}% | "
               f"{s['energy_mwh']:,.0f} | {s['failures']} | {s['lost_progress_hours']:.1f} / {s['downtime_hours']:.1f} |")
        assert row in doc, row
