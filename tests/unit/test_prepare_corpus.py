"""prepare_corpus reuses a saved corpus only while it comes from the same source, and prepares it again otherwise."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from _utils.runs import tiny_config
from geotrain.data.corpus import corpus_origin, open_corpus
from geotrain.train.workload import prepare_corpus

pytestmark = pytest.mark.timeout(60)


def _text_file(path: Path, word: str, size: int = 100_000) -> Path:
    line = f"{word}: the quick brown fox jumps over the lazy dog\n"
    path.write_text(line * (size // len(line) + 1))
    return path


def _prepare(tmp_path: Path, data: Path | None, **values) -> tuple[str, int]:
    """(source of the prepared corpus, mtime_ns of its corpus.json: changes only when it is written again)."""
    directory = prepare_corpus(tiny_config(tmp_path / "out", **{"data.path": data and str(data), **values}),
                               tmp_path / "out" / "data")
    return open_corpus(directory).source, (directory / "corpus.json").stat().st_mtime_ns


def test_another_data_path_prepares_the_corpus_again(tmp_path):
    a, b = _text_file(tmp_path / "alpha.txt", "alpha"), _text_file(tmp_path / "bravo.txt", "bravo")
    source, written = _prepare(tmp_path, a)
    assert "alpha.txt" in source
    assert _prepare(tmp_path, a) == (source, written)  # same source: reused, not written again
    assert "bravo.txt" in _prepare(tmp_path, b)[0]
    assert "alpha.txt" in _prepare(tmp_path, a)[0]


def test_a_changed_file_or_split_prepares_the_corpus_again(tmp_path):
    a = _text_file(tmp_path / "alpha.txt", "alpha")
    first, _ = _prepare(tmp_path, a)
    _text_file(a, "alpha", size=120_000)  # edited in place: same path, other size
    second, _ = _prepare(tmp_path, a)
    assert second != first
    third, _ = _prepare(tmp_path, a, **{"data.val_fraction": 0.2})
    assert third != second  # the split moved


def test_a_directory_notices_an_added_file(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    _text_file(d / "one.txt", "one")
    _text_file(d / "two.txt", "two")
    origin = corpus_origin(d, val_fraction=0.05)
    assert json.loads(json.dumps(origin)) == origin  # survives corpus.json unchanged
    assert corpus_origin(d, val_fraction=0.05) == origin
    _text_file(d / "three.txt", "three")
    assert corpus_origin(d, val_fraction=0.05) != origin


def test_a_corpus_saved_without_an_origin_is_prepared_again(tmp_path):
    a, b = _text_file(tmp_path / "alpha.txt", "alpha"), _text_file(tmp_path / "bravo.txt", "bravo")
    _prepare(tmp_path, a)
    meta_path = tmp_path / "out" / "data" / "corpus.json"
    meta = json.loads(meta_path.read_text())
    del meta["origin"]  # as an earlier geotrain saved it
    meta_path.write_text(json.dumps(meta))
    assert "bravo.txt" in _prepare(tmp_path, b)[0]


def test_bin_files_that_do_not_match_corpus_json_are_prepared_again(tmp_path):
    a = _text_file(tmp_path / "alpha.txt", "alpha")
    source, _ = _prepare(tmp_path, a)
    train = tmp_path / "out" / "data" / "train.bin"
    os.truncate(train, train.stat().st_size // 2)  # as a crash between the writes could leave it
    assert _prepare(tmp_path, a)[0] == source
    open_corpus(tmp_path / "out" / "data", verify=True)
