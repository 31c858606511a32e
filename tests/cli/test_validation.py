"""The configuration's ranges, flags and vocabulary, checked through the real ``geotrain`` CLI.

Every number has a range and a user's mistake exits 2 with a one-line message that names the field;
``geotrain run --dry-run`` checks a configuration and the launch limits without starting anything; the run
flags document their defaults; a compare variant's own settings win over the shared flags; the planner's
failure model defaults to restart; the planner's former file vocabulary is refused with the new key's name.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from geotrain.cli import main
from geotrain.config import _MOVED, defaults, parse_count
from geotrain.train.launch import MAX_LOCAL_WORKERS

ROOT = Path(__file__).resolve().parents[2]


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``geotrain ARGV`` in process: (exit code, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: --help, usage errors
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code: int, out: str, err: str, field: str) -> None:
    """Exit 2, nothing on stdout, one line on stderr that starts with the field's name."""
    assert code == 2, err
    assert err.startswith(f"error: {field}"), err
    assert err.count("\n") == 1 and err.endswith("\n"), f"not one line: {err!r}"
    assert "Traceback" not in err
    assert out == ""


# -- ranges: each exits 2 naming the field -----------------------------------------------------------------------

OUT_OF_RANGE = [
    (["--set", "run.collective_timeout_s=inf"], "run.collective_timeout_s"),
    (["--set", "run.seed=-1"], "run.seed"),
    (["--set", "optim.weight_decay=nan"], "optim.weight_decay"),
    (["--set", "optim.beta1=1.5"], "optim.beta1"),
    (["--set", "optim.beta2=-0.1"], "optim.beta2"),
    (["--set", "optim.momentum=1"], "optim.momentum"),
    (["--sites", "100000"], "run.sites"),
]


@pytest.mark.parametrize(("flags", "field"), OUT_OF_RANGE, ids=[" ".join(f) for f, _ in OUT_OF_RANGE])
def test_out_of_range_value_exits_2_naming_the_field(tmp_path, capsys, monkeypatch, flags, field):
    monkeypatch.chdir(tmp_path)
    assert_refused(*cli(["run", "--dry-run", *flags], capsys), field)
    # The planner reads the same vocabulary and refuses the same value.
    assert_refused(*cli(["plan", "--json", *flags], capsys), field)


@pytest.mark.parametrize(("flags", "field"), OUT_OF_RANGE, ids=[" ".join(f) for f, _ in OUT_OF_RANGE])
def test_out_of_range_value_exits_2_in_a_run_too(tmp_path, capsys, monkeypatch, flags, field):
    """Without --dry-run the same check stops the run before anything starts (no output directory)."""
    monkeypatch.chdir(tmp_path)
    assert_refused(*cli(["run", "--quiet", "--out", str(tmp_path / "out"), *flags], capsys), field)
    assert not (tmp_path / "out").exists()


def test_more_processes_than_a_local_run_allows_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(["run", "--dry-run", "--sites", "40", "--workers-per-site", "2"], capsys)
    assert_refused(code, out, err, "run.sites")
    assert "80" in err and str(MAX_LOCAL_WORKERS) in err and "--workers-per-site" in err
    # The limit is the launcher's: exactly 64 processes pass, and the planner studies 80 freely.
    code, out, err = cli(["run", "--dry-run", "--sites", "32", "--workers-per-site", "2"], capsys)
    assert code == 0, err
    assert json.loads(out)["run"]["workers_per_site"] == 2
    code, out, err = cli(["plan", "--json", "--sites", "40", "--workers-per-site", "2"], capsys)
    assert code == 0, err


def test_values_just_inside_the_ranges_pass(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(["run", "--dry-run", "--set", "optim.beta1=0", "--set", "optim.beta2=0.999",
                          "--set", "optim.momentum=0.99", "--set", "optim.weight_decay=0", "--set", "run.seed=0",
                          "--set", "run.collective_timeout_s=604800", "--sites", "64"], capsys)
    assert code == 0, err
    tree = json.loads(out)
    assert tree["optim"]["beta2"] == 0.999 and tree["run"]["sites"] == 64


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize(("flags", "field"), [(["--set", "optim.beta1=1.5"], "optim.beta1"),
                                              (["--sites", "40", "--workers-per-site", "2"], "run.sites")])
def test_out_of_range_in_a_real_process(tmp_path, flags, field):
    proc = subprocess.run([sys.executable, "-m", "geotrain.cli", "run", "--dry-run", *flags], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert_refused(proc.returncode, proc.stdout, proc.stderr, field)


# -- --overlap / --no-overlap and the defaults in --help ------------------------------------------------------


@pytest.mark.parametrize(("flags", "overlap"), [(["--overlap"], True), (["--no-overlap"], False), ([], None)])
def test_overlap_flags_parse(tmp_path, capsys, monkeypatch, flags, overlap):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(["run", "--dry-run", *flags], capsys)
    assert code == 0, err
    assert json.loads(out)["comm"]["overlap"] is overlap
    assert "nothing was started" in err and not (tmp_path / "runs").exists()


def test_no_overlap_with_ddp_is_accepted_and_overlap_is_not(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(["run", "--dry-run", "--algorithm", "ddp", "--no-overlap"], capsys)
    assert code == 0, err
    assert_refused(*cli(["run", "--dry-run", "--algorithm", "ddp", "--overlap"], capsys), "comm.overlap")


def _help_blocks(text: str) -> dict[str, str]:
    """Each option's help, whitespace collapsed, by each of its flag names."""
    blocks: dict[str, str] = {}
    current: list[str] = []
    for line in text.splitlines() + ["  -end"]:
        if re.match(r"^  -", line):
            if current:
                block = " ".join(" ".join(current).split())
                for name in re.findall(r"(?<![\w-])(--[\w-]+)", block.split("  ")[0]):
                    blocks.setdefault(name, block)
            current = [line]
        elif current and line.startswith(" "):
            current.append(line)
        else:
            current = []
    return blocks


def _default_in(block: str) -> str:
    found = re.search(r"\(default:? ([^)]*)\)", block)
    assert found, f"no default in {block!r}"
    return found.group(1)


def test_run_help_shows_the_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    code, out, _ = cli(["run", "--help"], capsys)
    assert code == 0
    blocks = _help_blocks(out)
    d = defaults()
    assert _default_in(blocks["--codec"]) == d.comm.codec
    assert parse_count(_default_in(blocks["--tokens"]), field_name="--tokens") == d.run.tokens
    assert _default_in(blocks["--link"]) == d.wan.link
    assert int(_default_in(blocks["--fragments"])) == d.streaming.fragments
    assert float(_default_in(blocks["--mix-alpha"])) == d.streaming.mix_alpha
    assert _default_in(blocks["--device"]) == d.run.device
    # tau is unset by default: the run picks it and says so, which is what the help says.
    assert d.streaming.overlap_steps is None
    tau = _default_in(blocks["--overlap-steps"])
    assert not re.search(r"\d", tau) and "chose" in tau
    assert d.comm.overlap is None and "chose" in _default_in(blocks["--overlap"])
    assert blocks["--no-overlap"] == blocks["--overlap"]


def test_a_dry_run_without_flags_resolves_to_the_defaults(tmp_path, capsys, monkeypatch):
    """What --help quotes is what a run gets."""
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(["run", "--dry-run"], capsys)
    assert code == 0, err
    assert json.loads(out) == json.loads(json.dumps(defaults().to_dict()))


# -- compare: a variant's settings win over the shared flags ------------------------------------------------------


@pytest.fixture
def no_training(monkeypatch):
    """cmd_compare as it is, with the launcher and the comparison report replaced: the configs it would run."""
    import geotrain.report.compare
    import geotrain.train.launch
    from geotrain.train.launch import RunOutcome

    launched: dict[str, object] = {}

    def fake_launch(config, **kwargs):
        out = Path(config.run.out)
        launched[out.name] = config
        return RunOutcome(summary={"ok": True}, exit_code=0, out=out)

    def fake_write_comparison(out, runs):
        Path(out, "compare.md").write_text("| run |\n")
        return {"runs": [name for name, _ in runs]}

    monkeypatch.setattr(geotrain.train.launch, "launch", fake_launch)
    monkeypatch.setattr(geotrain.report.compare, "write_comparison", fake_write_comparison)
    return launched


def test_compare_variant_settings_win_over_shared_flags(tmp_path, capsys, monkeypatch, no_training):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(["compare", "--quiet", "--out", str(tmp_path / "cmp"), "--codec", "int8", "--sync-every", "50",
                        "--variant", "v:H=100,codec=int4", "--variant", "w:link=metro",
                        "--variant", "ddp-fast:codec=bf16"], capsys)
    assert code == 0, err
    v, w, ddp = no_training["v"], no_training["w"], no_training["ddp-fast"]
    assert v.outer.sync_every == 100 and v.comm.codec == "int4"  # the variant's own
    assert w.outer.sync_every == 50 and w.comm.codec == "int8" and w.wan.link == "metro"  # shared where silent
    assert v.run.algorithm == w.run.algorithm == defaults().run.algorithm
    assert ddp.run.algorithm == "ddp" and ddp.comm.codec == "bf16"  # a name that starts with an algorithm
    assert Path(v.run.out) == tmp_path / "cmp" / "v"


def test_compare_set_loses_to_a_variant_and_a_variant_is_checked_before_any_run(tmp_path, capsys, monkeypatch,
                                                                                no_training):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(["compare", "--quiet", "--out", str(tmp_path / "cmp"), "--set", "comm.codec=int8",
                        "--variant", "v:comm.codec=int4", "--variant", "w"], capsys)
    assert code == 0, err
    assert no_training["v"].comm.codec == "int4" and no_training["w"].comm.codec == "int8"
    no_training.clear()
    code, out, err = cli(["compare", "--quiet", "--out", str(tmp_path / "cmp2"), "--variant", "ok:H=10",
                          "--variant", "bad:H=0"], capsys)
    assert_refused(code, out, err, "outer.sync_every")
    assert no_training == {}, "a run started before every variant was checked"


# -- the planner's failure model --------------------------------------------------------------------------------


def test_plan_simulation_defaults_to_elastic(tmp_path, capsys, monkeypatch):
    """Elastic membership is what training does when a site fails, so it is what a simulation plays unless
    told otherwise."""
    monkeypatch.chdir(tmp_path)
    assert defaults().simulate.recovery == "elastic"
    code, out, err = cli(["plan", "--simulate", "--mtbf-hours", "24", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["simulation"]["recovery"] == "elastic"
    # --mtbf-hours alone turns the simulation on, with the same default
    code, out, err = cli(["plan", "--mtbf-hours", "24", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["simulation"]["recovery"] == "elastic"
    # checkpoint/restart when asked for
    code, out, err = cli(["plan", "--simulate", "--mtbf-hours", "24", "--recovery", "restart", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["simulation"]["recovery"] == "restart"


def test_plan_help_describes_elastic_as_what_training_does(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    code, out, _ = cli(["plan", "--help"], capsys)
    assert code == 0
    recovery = _help_blocks(out)["--recovery"]
    assert re.search(r"elastic \(default", recovery), recovery
    assert "membership" in recovery and "restart" in recovery
    assert not re.search(r"is to do|not yet|today stops", recovery), recovery
    assert "heartbeat_timeout_s" in _help_blocks(out)["--silent-fraction"]


def test_planner_docs_agree_that_elastic_is_the_default():
    """docs/planner.md states the same default and no longer calls elastic recovery future work."""
    doc = (ROOT / "docs" / "planner.md").read_text(encoding="utf-8")
    row = next(line for line in doc.splitlines() if "--recovery MODE" in line)
    assert "elastic" in row.split("|")[-2], row
    for stale in ("not what geotrain does today", "training stops when a site fails", "is meant to do"):
        assert stale not in doc, stale


# -- the planner's former vocabulary -------------------------------------------------------------------------------

FORMER = [
    ('[algorithm]\nname = "diloco"\n', "algorithm", "[run] algorithm"),
    ('[link]\nlink = "metro"\n', "link", "[wan] link"),
    ("[question]\ncompare = true\n", "question", "[plan]"),
    ('[model]\ntokens = "15t"\n', "model.tokens", "run.tokens"),
    ('[model]\nbatch_tokens = "4M"\n', "model.batch_tokens", "plan.batch_tokens"),
    ("[sites]\ncount = 3\n", "sites.count", "run.sites"),
    ('[[links]]\nbetween = [0, 1]\nlink = "metro"\n', "links", "[[wan.links]]"),
]


@pytest.mark.parametrize(("text", "key", "new"), FORMER, ids=[k for _, k, _ in FORMER])
def test_former_plan_vocabulary_exits_2_naming_the_new_key(tmp_path, capsys, monkeypatch, text, key, new):
    monkeypatch.chdir(tmp_path)
    assert _MOVED[key].startswith(new)
    path = tmp_path / "old-plan.toml"
    path.write_text(text)
    for command in (["plan", "--json"], ["run", "--dry-run"]):
        code, out, err = cli([*command, "--config", str(path)], capsys)
        assert_refused(code, out, err, key)
        assert new in err and "former" in err, err


def test_a_whole_former_plan_file_is_refused_at_its_first_old_key(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "old-plan.toml"
    path.write_text('[model]\nparams = "70b"\ntokens = "15t"\n\n[algorithm]\nname = "diloco"\nsync_every = 500\n\n'
                    '[link]\nlink = "metro"\n\n[question]\ncompare = true\n')
    code, out, err = cli(["plan", "--config", str(path), "--json"], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert any(_MOVED[k] in err for k in ("algorithm", "link", "question", "model.tokens")), err


def test_run_warns_when_the_sites_end_with_different_models(tmp_path, capsys, monkeypatch):
    import geotrain.train.launch
    from geotrain.train.launch import RunOutcome

    summaries = iter([{"ok": True, "sites_in_sync": False}, {"ok": True, "sites_in_sync": True}])
    monkeypatch.setattr(geotrain.train.launch, "launch",
                        lambda config, **kw: RunOutcome(summary=next(summaries), exit_code=0, out=tmp_path))
    _, _, err = cli(["run", "--quiet", "--out", str(tmp_path / "a")], capsys)
    assert "different models" in err
    _, _, err = cli(["run", "--quiet", "--out", str(tmp_path / "b")], capsys)
    assert "different models" not in err
