"""Fresh run directories and the ``runs/latest`` link (``geotrain.rundirs``)."""

from __future__ import annotations

import os
import time

from geotrain.rundirs import follow_latest, fresh_run_dir, point_latest

NOON = time.mktime((2026, 12, 1, 12, 0, 0, 0, 0, -1))  # local time, as the directory names are


def test_runs_started_in_the_same_second_get_their_own_directories_and_latest_follows_the_newest(tmp_path):
    root = tmp_path / "runs"
    first = fresh_run_dir(root, now=NOON)
    second = fresh_run_dir(root, now=NOON)
    third = fresh_run_dir(root, now=NOON + 1)
    assert [p.name for p in (first, second, third)] == ["20261201-120000", "20261201-120000-2", "20261201-120001"]
    assert all(p.is_dir() and not any(p.iterdir()) for p in (first, second, third))
    link = root / "latest"
    assert link.is_symlink() and os.readlink(link) == "20261201-120001"  # relative: runs/ can move whole
    assert link.resolve() == third.resolve()
    assert sorted(p.name for p in root.iterdir()) == ["20261201-120000", "20261201-120000-2", "20261201-120001",
                                                      "latest"]  # no temporary link left behind


def test_the_runs_directory_can_move_and_latest_still_points_into_it(tmp_path):
    made = fresh_run_dir(tmp_path / "runs", now=NOON)
    (made / "summary.json").write_text("{}")
    (tmp_path / "runs").rename(tmp_path / "moved")
    assert (tmp_path / "moved" / "latest" / "summary.json").is_file()


def test_latest_left_as_a_real_directory_is_kept_with_a_warning(tmp_path, capsys):
    root = tmp_path / "runs"
    (root / "latest").mkdir(parents=True)
    (root / "latest" / "summary.json").write_text("{}")  # an older run's files
    made = fresh_run_dir(root, now=NOON)
    assert made.is_dir() and (root / "latest" / "summary.json").is_file()
    assert not (root / "latest").is_symlink()
    assert "is a directory, not a link" in capsys.readouterr().err


def test_follow_latest_gives_the_run_directory_itself(tmp_path):
    root = tmp_path / "runs"
    made = fresh_run_dir(root, now=NOON)
    assert follow_latest(root / "latest") == root / made.name
    assert follow_latest(made) == made  # not a link: as given
    point_latest(root, made)  # pointing again at the same run is harmless
    assert follow_latest(root / "latest") == root / made.name
