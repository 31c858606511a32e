"""Byte-level corpora: the stdlib file list, deterministic splits, the on-disk cache, errors and batches."""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from geotrain.data.corpus import (
    DOCUMENT_SEPARATOR,
    BatchSampler,
    Corpus,
    eval_batches,
    load_corpus,
    open_corpus,
    save_corpus,
    stdlib_files,
)
from geotrain.errors import ConfigError

pytestmark = pytest.mark.timeout(60)

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def stdlib_corpus() -> Corpus:
    return load_corpus(None)


def _write_docs(root: Path, n: int, size: int = 3000) -> dict[str, bytes]:
    """n text files with distinct contents, some in subdirectories; returns relative path -> bytes."""
    docs = {}
    for i in range(n):
        rel = f"part{i % 3}/doc_{i:03d}.txt" if i % 2 else f"doc_{i:03d}.md"
        line = f"document {i}: the quick brown fox jumps over the lazy dog\n".encode()
        data = (line * (size // len(line) + 1))[:size]
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        docs[rel] = data
    return docs


def _pieces(arr: np.ndarray) -> list[bytes]:
    return arr.tobytes().split(DOCUMENT_SEPARATOR)


# ------------------------------------------------------------------------------------------- stdlib


def test_stdlib_files_are_sorted_deterministic_and_exclude_tests() -> None:
    files = stdlib_files()
    assert files == stdlib_files()
    rels = [p.relative_to(STDLIB).as_posix() for p in files]
    assert rels == sorted(rels)
    assert len(files) > 300
    assert all(r.endswith(".py") for r in rels)
    for r in rels:
        parts = r.split("/")
        dirs = parts[:-1]
        assert not any(d.startswith("test") or d in {"idle_test", "site-packages", "__pycache__"} for d in dirs), r
    assert "os.py" in rels and "json/decoder.py" in rels and "unittest/case.py" in rels
    assert not any(r.startswith("test/") for r in rels)


def test_stdlib_corpus_split_is_by_file(stdlib_corpus: Corpus) -> None:
    c = stdlib_corpus
    assert c.train.dtype == np.uint8 and c.val.dtype == np.uint8
    assert c.files_train + c.files_val > 300
    assert c.files_val >= 1 and c.files_train > c.files_val
    assert c.source.startswith("stdlib of Python ")
    assert f"{c.files_train} train files, {c.files_val} val files" in c.source
    # Roughly val_fraction of the bytes is held out (by files, so only roughly).
    share = c.val.size / (c.train.size + c.val.size)
    assert 0.01 < share < 0.15
    # os.py is one whole document on exactly one side.
    os_src = (STDLIB / "os.py").read_bytes()
    in_train = c.train.tobytes().find(os_src) != -1
    in_val = c.val.tobytes().find(os_src) != -1
    assert in_train != in_val


def test_directory_split_is_disjoint_by_file_and_deterministic(tmp_path: Path) -> None:
    docs = _write_docs(tmp_path, 40)
    a = load_corpus(tmp_path, val_fraction=0.2)
    b = load_corpus(tmp_path, val_fraction=0.2)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val) and a.source == b.source
    train, val = _pieces(a.train), _pieces(a.val)
    assert (len(train), len(val)) == (a.files_train, a.files_val)
    assert a.files_train + a.files_val == 40
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(docs.values())
    # Each side keeps the sorted relative-path order.
    order = [docs[r] for r in sorted(docs)]
    assert train == [d for d in order if d in train] and val == [d for d in order if d in val]
    # The held-out set of a file depends on its path only: adding another file leaves old choices alone.
    (tmp_path / "zzz_extra.txt").write_bytes(b"one more file\n" * 300)
    c = load_corpus(tmp_path, val_fraction=0.2)
    assert set(val) <= set(_pieces(c.val)) and set(train) <= set(_pieces(c.train))


def test_directory_with_two_files_gets_one_on_each_side(tmp_path: Path) -> None:
    _write_docs(tmp_path, 2, size=5000)
    c = load_corpus(tmp_path, val_fraction=0.01)
    assert (c.files_train, c.files_val) == (1, 1)


def test_directory_skips_binary_hidden_and_other_extensions(tmp_path: Path) -> None:
    docs = _write_docs(tmp_path, 6)
    (tmp_path / "image.png").write_bytes(b"not text but has a foreign suffix" * 200)
    (tmp_path / "blob").write_bytes(b"abc\x00def" * 1000)  # no extension, but binary
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "secret.txt").write_bytes(b"hidden\n" * 1000)
    (tmp_path / ".dotfile").write_bytes(b"dot\n" * 1000)
    (tmp_path / "README").write_bytes(b"readme text\n" * 400)
    c = load_corpus(tmp_path, val_fraction=0.2, min_bytes=1000)
    everything = c.train.tobytes() + c.val.tobytes()
    assert c.files_train + c.files_val == len(docs) + 1  # the docs and README
    for marker in (b"foreign suffix", b"\x00", b"hidden", b"dot\n"):
        assert marker not in everything
    assert b"readme text" in everything


def test_single_text_file_is_split_at_a_line_boundary(tmp_path: Path) -> None:
    lines = [f"line {i:05d} of the play\n".encode() for i in range(2000)]
    data = b"".join(lines)
    path = tmp_path / "plays.txt"
    path.write_bytes(data)
    c = load_corpus(str(path), val_fraction=0.1)
    assert c.train.tobytes() + c.val.tobytes() == data
    assert c.train.tobytes().endswith(b"\n")
    assert c.val.tobytes() in set(b"".join(lines[i:]) for i in range(len(lines)))
    assert c.val.size == pytest.approx(0.1 * len(data), abs=len(lines[0]))
    assert (c.files_train, c.files_val) == (1, 1)


# ------------------------------------------------------------------------------------------- errors


def _assert_data_path_error(exc: pytest.ExceptionInfo[ConfigError], *needles: str) -> None:
    assert exc.value.field == "data.path"
    msg = str(exc.value)
    for needle in needles:
        assert needle in msg, msg


def test_missing_path_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError) as exc:
        load_corpus(missing)
    _assert_data_path_error(exc, str(missing), "does not exist", "omit --data")


def test_empty_directory_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "bin").write_bytes(b"\x00\x01" * 100)
    with pytest.raises(ConfigError) as exc:
        load_corpus(tmp_path)
    _assert_data_path_error(exc, str(tmp_path), "no usable text")


def test_empty_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ConfigError) as exc:
        load_corpus(tmp_path / "empty.txt")
    _assert_data_path_error(exc, "empty.txt", "no usable text")


def test_too_small_corpus_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "small.txt").write_bytes(b"hello world\n" * 100)  # 1200 bytes
    with pytest.raises(ConfigError) as exc:
        load_corpus(tmp_path / "small.txt")
    _assert_data_path_error(exc, "small.txt", "too small", "4096")
    _write_docs(tmp_path / "dir", 3, size=1500)
    with pytest.raises(ConfigError) as exc:
        load_corpus(tmp_path / "dir")
    _assert_data_path_error(exc, "too small")


def test_small_held_out_files_are_topped_up_to_min_bytes(tmp_path: Path) -> None:
    # 30 files of 1000 bytes: 5% would hold out one or two files, under min_bytes; more are held out.
    _write_docs(tmp_path, 30, size=1000)
    c = load_corpus(tmp_path, val_fraction=0.05, min_bytes=4096)
    assert c.val.size >= 4096 and c.train.size >= 4096
    assert c.files_val >= 4


def test_bad_val_fraction_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_corpus(None, val_fraction=1.5)
    assert exc.value.field == "data.val_fraction"


# ---------------------------------------------------------------------------------------------- cache


def test_save_open_round_trip(tmp_path: Path, stdlib_corpus: Corpus) -> None:
    save_corpus(stdlib_corpus, tmp_path / "cache")
    assert sorted(os.listdir(tmp_path / "cache")) == ["corpus.json", "train.bin", "val.bin"]  # no temp files left
    meta = json.loads((tmp_path / "cache" / "corpus.json").read_text())
    assert meta["train_bytes"] == stdlib_corpus.train.size and len(meta["val_sha256"]) == 64
    c = open_corpus(tmp_path / "cache", verify=True)
    assert isinstance(c.train, np.memmap) and not c.train.flags.writeable
    assert np.array_equal(c.train, stdlib_corpus.train) and np.array_equal(c.val, stdlib_corpus.val)
    assert (c.source, c.files_train, c.files_val) == (
        stdlib_corpus.source,
        stdlib_corpus.files_train,
        stdlib_corpus.files_val,
    )


def test_open_rejects_missing_or_truncated_cache(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        open_corpus(tmp_path)
    _assert_data_path_error(exc, "corpus.json")
    corpus = Corpus(
        train=np.arange(5000, dtype=np.uint8) % 251, val=np.zeros(0, np.uint8), source="t", files_train=1, files_val=0
    )
    save_corpus(corpus, tmp_path)
    assert open_corpus(tmp_path).val.size == 0
    with open(tmp_path / "train.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ConfigError) as exc:
        open_corpus(tmp_path)
    _assert_data_path_error(exc, "train.bin")


# -------------------------------------------------------------------------------------------- batches


def test_batch_sampler_is_deterministic_per_seed_and_y_is_x_shifted() -> None:
    data = np.frombuffer(bytes(range(256)) * 40, dtype=np.uint8)
    a = BatchSampler(data, batch_size=4, seq_len=16, seed=1)
    b = BatchSampler(data, batch_size=4, seq_len=16, seed=1)
    c = BatchSampler(data, batch_size=4, seq_len=16, seed=2)
    for _ in range(3):
        xa, ya = a.next()
        xb, yb = b.next()
        xc, _ = c.next()
        assert xa.shape == ya.shape == (4, 16) and xa.dtype == ya.dtype == torch.int64
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert not torch.equal(xa, xc)
        # Consecutive bytes in this data differ by one (mod 256), so y must be x shifted by one byte.
        assert torch.equal(ya[:, :-1], xa[:, 1:])
        assert torch.equal(ya[:, -1], (xa[:, -1] + 1) % 256)


def test_batch_sampler_uses_own_rng_and_resumes_exactly() -> None:
    data = np.random.default_rng(0).integers(0, 256, size=10_000, dtype=np.uint8)
    a = BatchSampler(data, batch_size=2, seq_len=8, seed=3)
    a.next()
    state = a.state_dict()
    np.random.seed(99)
    torch.manual_seed(99)  # global RNGs do not matter
    expected = a.next()
    b = BatchSampler(data, batch_size=2, seq_len=8, seed=0)
    b.load_state_dict(state)
    got = b.next()
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])


def test_batch_sampler_covers_the_last_byte_and_rejects_short_data() -> None:
    data = np.arange(10, dtype=np.uint8)
    s = BatchSampler(data, batch_size=64, seq_len=9, seed=0)
    x, y = s.next()
    assert torch.equal(x[0], torch.arange(9)) and torch.equal(y[0], torch.arange(1, 10))
    with pytest.raises(ValueError):
        BatchSampler(data, batch_size=1, seq_len=10, seed=0)


def test_eval_batches_are_fixed_spread_and_non_overlapping() -> None:
    data = np.random.default_rng(1).integers(0, 256, size=20_000, dtype=np.uint8)
    a = eval_batches(data, batch_size=4, seq_len=32, n_batches=5)
    b = eval_batches(data, batch_size=4, seq_len=32, n_batches=5)
    assert len(a) == 5
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert xa.shape == (4, 32) and xa.dtype == torch.int64
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(ya[:, :-1], xa[:, 1:])
    # Recover each window's start, check spacing and that the windows reach both ends of the data.
    flat = data.tobytes()
    starts = [flat.find(bytes(row.tolist())) for x, _ in a for row in x]
    assert starts[0] == 0
    assert starts[-1] + 32 + 1 == len(data)
    assert all(b - a >= 32 for a, b in zip(starts, starts[1:]))


def test_eval_batches_shrink_to_what_fits() -> None:
    data = np.zeros(1000, dtype=np.uint8)
    batches = eval_batches(data, batch_size=4, seq_len=100, n_batches=10)  # 9 windows fit -> 2 batches
    assert len(batches) == 2
    with pytest.raises(ValueError, match="held-out"):
        eval_batches(data, batch_size=16, seq_len=100, n_batches=1)
