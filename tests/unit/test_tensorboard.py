"""TensorBoard output (``--tensorboard``): records become scalars per site and for the run, read back with
TensorBoard's own reader; a resumed site's points replace the old ones; a broken sink never stops training;
a missing TensorBoard is bad input, found before anything starts; importing geotrain never imports it.
The end-to-end run is in tests/cli/test_run_cli.py (its shared run writes event files)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from geotrain.cli import main
from geotrain.train.recorder import Recorder
from geotrain.train.sinks import GLOBAL_RUN, ScalarSink, scalar_series

tensorboard = pytest.importorskip("tensorboard")

SITE_TAGS = {"loss/train", "optim/lr", "progress/tokens", "progress/outer_rounds", "wan/bytes", "time/utilization",
             "time/compute_seconds", "time/comm_wait_seconds", "time/wall_seconds"}
GLOBAL_TAGS = {"loss/eval", "progress/tokens", "progress/outer_rounds", "wan/bytes", "time/wall_seconds"}


def read_scalars(run_dir: Path, *, reader: str = "events") -> dict[str, list[tuple[int, float, float]]]:
    """{tag: [(step, value, wall time)]} of a TensorBoard run directory, as TensorBoard's readers see it:
    ``events``, the event accumulator; ``server``, the one behind ``tensorboard --load_fast=false``."""
    if reader == "events":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(run_dir))
        acc.Reload()
        return {tag: [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, float(make_ndarray(e.tensor_proto)), e.wall_time) for e in acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"]}


def as_if_earlier(run_dir: Path) -> None:
    """Name the event files in ``run_dir`` as a process a minute earlier would have. TensorBoard reads a run's
    files in name order, which starts with the Unix second each was opened; the processes a test plays open
    theirs within one second."""
    for f in run_dir.iterdir():
        parts = f.name.split(".")
        parts[3] = f"{int(parts[3]) - 60:010d}"
        f.rename(f.with_name(".".join(parts)))


def step_fields(step: int, *, loss: float, site: int = 0) -> dict:
    return dict(site=site, step=step, tokens=128 * (step + 1), loss=loss, lr=1e-3, wall_s=0.5 * (step + 1),
                compute_s=0.4 * (step + 1), comm_s=0.05 * step, wan_bytes=1000 * step, outer_rounds=step // 4,
                utilization=0.8, trained_tokens=128 * (step + 1))


def tensorboard_recorder(tmp_path: Path) -> Recorder:
    from geotrain.train.sinks import TensorBoardSink

    return Recorder(tmp_path / "sites" / "site0.jsonl", sinks=[TensorBoardSink(tmp_path / "tensorboard")])


def test_records_map_to_scalars_per_site_and_for_the_run():
    step = {"kind": "step", "time": 1.0, **step_fields(7, loss=2.5, site=1)}
    [(run, at, values)] = scalar_series(step)
    assert (run, at) == ("site1", 7) and set(values) == SITE_TAGS
    assert values["loss/train"] == 2.5 and values["wan/bytes"] == 7000 and values["time/comm_wait_seconds"] == 0.05 * 7
    evaluation = {"kind": "eval", "time": 1.0, "site": 0, "step": 7, "tokens": 2048, "wall_s": 3.0, "eval_loss": 2.25,
                  "wan_bytes": 9000, "outer_rounds": 2}
    [(run, at, values)] = scalar_series(evaluation)
    assert (run, at) == (GLOBAL_RUN, 7) and set(values) == GLOBAL_TAGS and values["loss/eval"] == 2.25
    assert "loss/train" not in scalar_series({**step, "loss": None})[0][2]  # a non-finite loss was written as null
    for kind in ("start", "sync", "done", "membership", "warning"):
        assert scalar_series({"kind": kind, "time": 1.0, "site": 0, "step": 3, "loss": 1.0}) == []


def test_event_files_read_back_with_the_records_values(tmp_path):
    rec = tensorboard_recorder(tmp_path)
    rec.write("start", site=0, worker=0)
    for step in (0, 5, 9):
        rec.write("step", **step_fields(step, loss=3.0 - 0.1 * step))
    rec.eval(site=0, step=9, tokens=2560, wall=5.0, eval_loss=2.0, wan_bytes=18000, outer_rounds=2)
    rec.write("done", site=0, steps=10, eval_loss=2.0)
    rec.close()
    records = [json.loads(line) for line in (tmp_path / "sites" / "site0.jsonl").read_text().splitlines()]

    site = read_scalars(tmp_path / "tensorboard" / "site0")
    assert set(site) == SITE_TAGS
    steps = [r for r in records if r["kind"] == "step"]
    assert [s for s, _, _ in site["loss/train"]] == [0, 5, 9]
    for (s, value, wall), r in zip(site["loss/train"], steps):
        assert value == pytest.approx(r["loss"], rel=1e-6)  # stored as float32
        assert wall == pytest.approx(r["time"])  # the record's own time
    assert [v for _, v, _ in site["wan/bytes"]] == [0, 5000, 9000]
    run = read_scalars(tmp_path / "tensorboard" / GLOBAL_RUN)
    assert set(run) == GLOBAL_TAGS
    assert [(s, v) for s, v, _ in run["loss/eval"]] == [(9, 2.0)]  # done adds nothing: step 9 was evaluated
    assert [(s, v) for s, v, _ in run["wan/bytes"]] == [(9, 18000.0)]


def test_a_resumed_site_replaces_the_points_after_its_checkpoint(tmp_path):
    """A run killed at step 9 resumes from the checkpoint of step 4: TensorBoard shows 0-4 from the first
    process and 5-7 from the second, nothing of the first process's 5-9."""
    rec = tensorboard_recorder(tmp_path)
    for step in range(10):
        rec.write("step", **step_fields(step, loss=10.0 + step))
    rec.eval(site=0, step=9, tokens=2560, wall=5.0, eval_loss=2.0, wan_bytes=18000, outer_rounds=2)
    rec.close()
    for run in ("site0", GLOBAL_RUN):
        as_if_earlier(tmp_path / "tensorboard" / run)

    rec = tensorboard_recorder(tmp_path)
    rec.write("resumed", site=0, round=1, step=4)
    rec.write("start", site=0, worker=0, resumed=True)
    for step in range(5, 8):
        rec.write("step", **step_fields(step, loss=20.0 + step))
    rec.eval(site=0, step=7, tokens=2048, wall=4.0, eval_loss=2.5, wan_bytes=14000, outer_rounds=1)
    rec.close()
    for reader in ("events", "server"):
        loss = read_scalars(tmp_path / "tensorboard" / "site0", reader=reader)["loss/train"]
        assert [(s, v) for s, v, _ in loss] == [(s, 10.0 + s) for s in range(5)] + [(s, 20.0 + s) for s in range(5, 8)]
        evals = read_scalars(tmp_path / "tensorboard" / GLOBAL_RUN, reader=reader)["loss/eval"]
        assert [(s, v) for s, v, _ in evals] == [(7, 2.5)]  # step 9's evaluation came before the resume


def test_a_healed_site_that_takes_over_the_evaluations_keeps_the_earlier_ones(tmp_path):
    """Site 0 evaluates at steps 7 and 15 and leaves; site 1, healed at step 3, is now the lowest member and
    evaluates at step 23: its heal restarts its own series, not the run's."""
    from geotrain.train.sinks import TensorBoardSink

    def recorder(site: int) -> Recorder:
        return Recorder(tmp_path / f"site{site}.jsonl", sinks=[TensorBoardSink(tmp_path / "tensorboard")])

    first = recorder(0)
    for step in (7, 15):
        first.eval(site=0, step=step, tokens=step, wall=1.0, eval_loss=3.0 - step / 10, wan_bytes=0, outer_rounds=1)
    first.close()
    as_if_earlier(tmp_path / "tensorboard" / GLOBAL_RUN)
    second = recorder(1)
    second.write("healed", site=1, healed_from=0, step=3)
    second.write("step", **step_fields(4, loss=4.0, site=1))
    second.eval(site=1, step=23, tokens=23, wall=1.0, eval_loss=0.5, wan_bytes=0, outer_rounds=1)
    second.close()
    for reader in ("events", "server"):
        evals = read_scalars(tmp_path / "tensorboard" / GLOBAL_RUN, reader=reader)["loss/eval"]
        assert [(s, round(v, 6)) for s, v, _ in evals] == [(7, 2.3), (15, 1.5), (23, 0.5)]


def test_a_run_stopped_between_evaluations_ends_the_series_with_its_final_loss(tmp_path):
    rec = tensorboard_recorder(tmp_path)
    rec.eval(site=0, step=9, tokens=2560, wall=5.0, eval_loss=2.5, wan_bytes=18000, outer_rounds=2)
    rec.write("done", site=0, steps=14, eval_loss=2.25, stopped_early=True)
    rec.close()
    loss = read_scalars(tmp_path / "tensorboard" / GLOBAL_RUN)["loss/eval"]
    assert [(s, v) for s, v, _ in loss] == [(9, 2.5), (13, 2.25)]


def test_a_run_that_models_power_adds_each_sites_draw_cap_energy_and_throttled_seconds(tmp_path):
    power = {"power_mw": 18.0, "cap_mw": 20.0, "energy_mwh": 2.25, "throttled_s": 1.5, "grid_hours": 0.25,
             "active": 0.9, "speed": 0.5}
    rec = tensorboard_recorder(tmp_path)
    rec.write("step", **step_fields(0, loss=3.0), **power)
    rec.write("step", **step_fields(1, loss=2.9), **{**power, "power_mw": 14.0, "cap_mw": 14.0, "energy_mwh": 4.0})
    rec.write("power_off", site=0, step=1, wall_s=1.0, grid_hours=0.5, back_at_s=None)  # adds no scalars
    rec.close()
    site = read_scalars(tmp_path / "tensorboard" / "site0")
    power_tags = {"power/draw_mw", "power/cap_mw", "power/energy_mwh", "time/throttled_seconds"}
    assert set(site) == SITE_TAGS | power_tags
    assert [(s, v) for s, v, _ in site["power/draw_mw"]] == [(0, 18.0), (1, 14.0)]
    assert [(s, v) for s, v, _ in site["power/cap_mw"]] == [(0, 20.0), (1, 14.0)]
    assert [(s, v) for s, v, _ in site["power/energy_mwh"]] == [(0, 2.25), (1, 4.0)]
    assert [(s, v) for s, v, _ in site["time/throttled_seconds"]] == [(0, 1.5), (1, 1.5)]


def test_a_failing_sink_is_dropped_with_a_warning_and_recording_goes_on(tmp_path):
    class Broken(ScalarSink):
        def add(self, run, step, values, *, wall_time):
            raise OSError("No space left on device")

    path = tmp_path / "site0.jsonl"
    rec = Recorder(path, sinks=[Broken()])
    rec.write("step", **step_fields(0, loss=3.0))
    rec.write("step", **step_fields(1, loss=2.9))
    rec.close()
    kinds = [(r["kind"], r.get("message")) for r in map(json.loads, path.read_text().splitlines())]
    assert kinds == [("step", None), ("warning", "Broken stopped: OSError: No space left on device"), ("step", None)]


def test_missing_tensorboard_is_bad_input_before_anything_starts(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    out = tmp_path / "run"
    for argv in (["run", "--tensorboard", "--quiet", "--tokens", "1", "--out", str(out)],
                 ["run", "--set", "run.tensorboard=true", "--dry-run", "--out", str(out)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: run.tensorboard") and "pip install 'geotrain[tensorboard]'" in err, err
        assert err.count("\n") == 1
    assert not (out / "sites").exists()  # no worker was started


def test_the_flag_the_key_and_a_resume_turn_it_on(tmp_path, capsys):
    from geotrain.api import make_config

    assert make_config().run.tensorboard is False
    assert make_config(tensorboard=True).run.tensorboard is True
    assert main(["run", "--dry-run", "--tensorboard", "--out", str(tmp_path)]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["run"]["tensorboard"] is True
    (tmp_path / "config.json").write_text(json.dumps({**config, "run": {**config["run"], "tensorboard": False}}))
    assert main(["run", "--dry-run", "--resume", str(tmp_path), "--tensorboard"]) == 0  # it only adds output
    assert json.loads(capsys.readouterr().out)["run"]["tensorboard"] is True


def test_importing_geotrain_does_not_import_tensorboard():
    code = ("import sys, geotrain, geotrain.cli, geotrain.api, geotrain.train.launch, geotrain.train.sinks\n"
            "from geotrain.api import make_config\n"
            "make_config(tensorboard=True)\n"
            "bad = [m for m in sys.modules if m.startswith(('tensorboard', 'torch.utils.tensorboard'))]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
