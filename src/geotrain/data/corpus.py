"""Byte-level text corpora for the demo GPT: loading, a held-out split, a cache on disk and batches.

The demo model reads raw bytes (a vocabulary of 256), so a corpus is just two ``uint8`` arrays: the
training bytes and the held-out (validation) bytes. Byte-level modelling needs no tokenizer and no
download, which is what lets a newcomer train on any machine with one command.

Sources:

* ``None``: the running interpreter's own standard-library sources (about 12 MB without tests, PSF
  licence). Every machine that runs geotrain has them, so the demo needs no data at all.
* a text file: split by bytes; the last ``val_fraction`` of the file (cut at a line boundary) is held out.
* a directory: every text file under it; whole files are held out, chosen by a hash of their relative
  path, so the split is the same on every machine and does not move when a file is added elsewhere.

Holding out whole files (not the tail of one long stream) keeps near-duplicate neighbours, such as two
halves of the same module, from sitting on both sides of the split.

Training batches are random windows (``BatchSampler``, its own seeded generator so sites are
reproducible and independent of the global RNG); evaluation batches are fixed, evenly spaced windows
(``eval_batches``) so every run, algorithm and site is scored on exactly the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from geotrain.errors import ConfigError
from geotrain.files import atomic_write

__all__ = [
    "TEXT_SUFFIXES",
    "DOCUMENT_SEPARATOR",
    "Corpus",
    "stdlib_files",
    "load_corpus",
    "corpus_origin",
    "save_corpus",
    "saved_origin",
    "open_corpus",
    "BatchSampler",
    "eval_batches",
]

TEXT_SUFFIXES: frozenset[str] = frozenset({".txt", ".md", ".py", ".rst", ""})
"""File name endings read from a directory ("" is a file with no extension, such as ``README``)."""

DOCUMENT_SEPARATOR = b"\n\n"
"""Bytes placed between files, so one file's end does not run straight into the next file's start."""

_BINARY_PROBE = 8192  # a NUL byte in the first 8 KiB marks a file as binary (the heuristic git uses)
_FIELD = "data.path"
_BUILTIN_HINT = "or omit --data to train on the built-in corpus (the Python standard library sources)"


@dataclass(frozen=True, slots=True)
class Corpus:
    """A byte-level corpus split into training and held-out bytes."""

    train: np.ndarray
    """Concatenated training bytes, ``uint8``, shape ``(n_train,)``. Read-only."""
    val: np.ndarray
    """Held-out bytes, ``uint8``, shape ``(n_val,)``. Read-only."""
    source: str
    """Where the bytes came from, for logs and reports, e.g. ``"stdlib of Python 3.11.7: 812 train files, 43 val files"``."""
    files_train: int
    """Number of files in the training split (1 for a single file split by bytes)."""
    files_val: int
    """Number of files in the held-out split (1 for a single file split by bytes)."""


# --------------------------------------------------------------------------------------------- discovery


def _is_test_dir(name: str) -> bool:
    # Test suites are a large, repetitive share of the stdlib (test/ alone is over half of it), and
    # lib2to3's test data holds deliberately broken Python: neither is the code we want to model.
    return name.startswith("test") or name == "idle_test"


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library ``.py`` sources, without tests, sorted by relative path.

    Excludes any directory named ``test*`` or ``idle_test`` (``test/``, ``tests/``, ``ctypes/test/``, ...),
    ``site-packages``/``dist-packages`` (installed packages are not the stdlib and differ between machines)
    and ``__pycache__``. Symbolic links to directories are not followed. Sorted by relative POSIX path, so
    the list (and the corpus) is the same on every machine with the same Python version.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending into excluded trees at all.
        dirnames[:] = [d for d in dirnames if d not in skip and not _is_test_dir(d)]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath, name)
                if path.is_file():
                    found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


def _text_files(directory: Path) -> list[tuple[str, Path]]:
    """(relative posix path, path) of candidate text files under ``directory``, sorted by relative path."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        for name in filenames:
            # Hidden files (.gitignore, .DS_Store) are tooling, not text we want the model to learn.
            if name.startswith("."):
                continue
            path = Path(dirpath, name)
            if path.suffix.lower() in TEXT_SUFFIXES and path.is_file():
                found.append((path.relative_to(directory).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return found


def _is_binary(data: bytes) -> bool:
    return b"\x00" in data[:_BINARY_PROBE]


def _read(path: Path, shown: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"could not read {str(path)!r} under {str(shown)!r} ({exc.strerror or exc}). "
            f"Check its permissions, point --data elsewhere, {_BUILTIN_HINT}.",
            field=_FIELD,
        ) from exc


# ----------------------------------------------------------------------------------------------- split


def _file_key(rel: str) -> int:
    """A stable number in [0, 1000) for a relative path; crc32 is the same on every platform and run."""
    return zlib.crc32(rel.encode("utf-8", "surrogateescape")) % 1000


def _split_files(
    docs: list[tuple[str, bytes]], *, val_fraction: float, min_bytes: int
) -> tuple[list[bytes], list[bytes]]:
    """Split whole files into (train, val), keeping the original (sorted) order within each side.

    A file is held out when its key is below ``val_fraction * 1000``. With two or more files, each side gets
    at least one. If the held-out side is below ``min_bytes`` but the corpus is big enough, more files are
    held out in key order (the next files the rule would pick at a larger fraction), so that a directory of
    many small files still yields a usable validation set. Everything depends only on the paths and sizes.
    """
    assert len(docs) >= 2
    threshold = round(val_fraction * 1000)
    # Files ordered by how "eager" the rule is to hold them out; the path breaks ties deterministically.
    by_key = sorted(range(len(docs)), key=lambda i: (_file_key(docs[i][0]), docs[i][0]))
    val_idx = {i for i in by_key if _file_key(docs[i][0]) < threshold}
    if not val_idx:
        val_idx = {by_key[0]}
    if len(val_idx) == len(docs):
        val_idx.discard(by_key[-1])

    def val_bytes() -> int:
        return sum(len(docs[i][1]) for i in val_idx)

    total = sum(len(d) for _, d in docs)
    for i in by_key:
        if val_bytes() >= min_bytes:
            break
        if i in val_idx:
            continue
        # Stop before starving the training side or emptying it.
        if len(val_idx) + 1 == len(docs) or total - val_bytes() - len(docs[i][1]) < min_bytes:
            break
        val_idx.add(i)
    train = [d for i, (_, d) in enumerate(docs) if i not in val_idx]
    val = [d for i, (_, d) in enumerate(docs) if i in val_idx]
    return train, val


def _split_bytes(data: bytes, *, val_fraction: float) -> tuple[bytes, bytes]:
    """Hold out the last ``val_fraction`` of one text, cut at the line boundary nearest the target."""
    cut = int(len(data) * (1.0 - val_fraction))
    after = data.find(b"\n", cut)
    before = data.rfind(b"\n", 0, cut)
    candidates = [p + 1 for p in (after, before) if p != -1 and 0 < p + 1 < len(data)]
    if candidates:
        # Cut just after a newline, so the held-out part starts at the beginning of a line.
        cut = min(candidates, key=lambda p: abs(p - cut))
    return data[:cut], data[cut:]


def _join(parts: list[bytes]) -> np.ndarray:
    # np.frombuffer shares the bytes object's memory (no copy) and is read-only, like the memmap
    # that open_corpus returns, so both kinds of corpus behave the same.
    return np.frombuffer(DOCUMENT_SEPARATOR.join(parts), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------ load


def load_corpus(path: str | Path | None, *, val_fraction: float = 0.05, min_bytes: int = 4096) -> Corpus:
    """Load a byte-level corpus and split it into training and held-out bytes.

    Args:
        path: ``None`` for the standard-library corpus; a text file (split by bytes); or a directory (every
            non-hidden ``.txt``, ``.md``, ``.py``, ``.rst`` or extension-less file under it, split by file).
            Binary files (a NUL byte in the first 8 KiB) and empty files are skipped.
        val_fraction: share held out, in (0, 1).
        min_bytes: the least number of bytes each split must have.

    Raises:
        ConfigError: (field ``data.path``) the path does not exist, holds no usable text, or is too small to give
            ``min_bytes`` to each split; (field ``data.val_fraction``) ``val_fraction`` is outside (0, 1).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(
            f"must be between 0 and 1 (exclusive), got {val_fraction!r}. A typical value is 0.05.",
            field="data.val_fraction",
        )
    if min_bytes < 1:
        raise ValueError(f"min_bytes must be positive, got {min_bytes}")

    if path is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        docs = [(p.relative_to(root).as_posix(), p.read_bytes()) for p in stdlib_files()]
        docs = [(rel, data) for rel, data in docs if data]  # e.g. empty __init__.py files add nothing
        shown = f"the standard library at {root}"
        label = "stdlib of Python {}.{}.{}".format(*sys.version_info[:3])
        if len(docs) < 2:
            raise ConfigError(
                f"found no standard-library sources under {str(root)!r}. This Python installation ships "
                "without its .py sources; pass --data with a text file or directory instead.",
                field=_FIELD,
            )
        return _from_docs(docs, shown=shown, label=label, val_fraction=val_fraction, min_bytes=min_bytes)

    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(
            f"{str(path)!r} does not exist. Pass an existing text file or directory, {_BUILTIN_HINT}.",
            field=_FIELD,
        )
    if p.is_file():
        data = _read(p, p)
        if not data or _is_binary(data):
            what = "is empty" if not data else "looks binary (it has a NUL byte near the start)"
            raise ConfigError(
                f"{str(path)!r} {what}, so it gives no usable text. Pass a text file or a directory of text "
                f"files, {_BUILTIN_HINT}.",
                field=_FIELD,
            )
        return _from_single(data, name=f"file {p}", path=path, val_fraction=val_fraction, min_bytes=min_bytes)
    if not p.is_dir():
        raise ConfigError(
            f"{str(path)!r} is neither a regular file nor a directory. Pass a text file or a directory of "
            f"text files, {_BUILTIN_HINT}.",
            field=_FIELD,
        )

    docs = []
    for rel, file in _text_files(p):
        data = _read(file, p)
        if data and not _is_binary(data):
            docs.append((rel, data))
    if not docs:
        raise ConfigError(
            f"{str(path)!r} holds no usable text: no non-empty, non-binary files ending in .txt, .md, .py, "
            f".rst or with no extension (hidden files and directories are skipped). Add text files there, "
            f"{_BUILTIN_HINT}.",
            field=_FIELD,
        )
    if len(docs) == 1:
        # One file cannot be split by file; split its bytes instead.
        rel, data = docs[0]
        return _from_single(
            data, name=f"directory {p} (1 file, {rel})", path=path, val_fraction=val_fraction, min_bytes=min_bytes
        )
    return _from_docs(docs, shown=str(path), label=f"directory {p}", val_fraction=val_fraction, min_bytes=min_bytes)


def _too_small(shown: str, n_train: int, n_val: int, min_bytes: int) -> ConfigError:
    return ConfigError(
        f"{shown!r} is too small: it gives {n_train} training and {n_val} held-out bytes, but each split "
        f"needs at least {min_bytes}. Add more text (at least about {2 * min_bytes} bytes in all), {_BUILTIN_HINT}.",
        field=_FIELD,
    )


def _from_single(data: bytes, *, name: str, path: str | Path, val_fraction: float, min_bytes: int) -> Corpus:
    train, val = _split_bytes(data, val_fraction=val_fraction)
    if len(train) < min_bytes or len(val) < min_bytes:
        raise _too_small(str(path), len(train), len(val), min_bytes)
    source = f"{name}: {len(train)} train bytes, {len(val)} val bytes (split by bytes)"
    return Corpus(train=_join([train]), val=_join([val]), source=source, files_train=1, files_val=1)


def _from_docs(
    docs: list[tuple[str, bytes]], *, shown: str, label: str, val_fraction: float, min_bytes: int
) -> Corpus:
    train, val = _split_files(docs, val_fraction=val_fraction, min_bytes=min_bytes)
    train_arr, val_arr = _join(train), _join(val)
    if train_arr.size < min_bytes or val_arr.size < min_bytes:
        raise _too_small(shown, train_arr.size, val_arr.size, min_bytes)
    source = f"{label}: {len(train)} train files, {len(val)} val files"
    return Corpus(train=train_arr, val=val_arr, source=source, files_train=len(train), files_val=len(val))


# ----------------------------------------------------------------------------------------------- cache

_META = "corpus.json"
_FORMAT = 1


def corpus_origin(path: str | Path | None, *, val_fraction: float) -> dict[str, Any]:
    """What ``load_corpus(path, val_fraction=...)`` would read, cheaply: a record to store beside a saved corpus.

    Two calls give equal records (also after a round trip through JSON) while the source is unchanged: the same
    resolved path, ``val_fraction``, and the same names, sizes and modification times of the files under it (one
    ``stat`` per file, nothing read). For the built-in corpus it is the standard library's location and the
    Python version, which fix its files. An edit that keeps both a file's size and its modification time (to the
    file system's resolution) goes unnoticed; hashing every byte would notice it, but costs a full read of the
    corpus on every run.
    """
    if path is None:
        return {
            "path": None,
            "stdlib": sysconfig.get_paths()["stdlib"],
            "python": "{}.{}.{}".format(*sys.version_info[:3]),
            "val_fraction": val_fraction,
        }
    p = Path(path).expanduser()
    if p.is_file():
        files = [("", p)]
    elif p.is_dir():
        files = _text_files(p)  # the candidates load_corpus reads; it drops empty and binary ones by content
    else:
        files = []  # load_corpus will say what is wrong with the path
    digest = hashlib.sha256()
    for rel, file in files:
        try:
            st = file.stat()
        except OSError:  # removed or unreadable since the listing; load_corpus reports it if it matters
            continue
        digest.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return {
        "path": str(p.resolve()),
        "files": len(files),
        "fingerprint": digest.hexdigest(),
        "val_fraction": val_fraction,
    }


def save_corpus(corpus: Corpus, directory: Path, *, origin: dict[str, Any] | None = None) -> None:
    """Write ``train.bin`` and ``val.bin`` (raw ``uint8``) and ``corpus.json`` into ``directory``.

    Each file is written atomically. ``corpus.json`` is written last and records the sizes and sha256 of
    both arrays, so it acts as the commit marker: ``open_corpus`` rejects a directory whose ``.bin`` files
    do not match it (for example after a crash between the writes). ``origin`` (from ``corpus_origin``) is
    stored with them, so that a later run can tell whether the saved bytes still come from its source.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "format": _FORMAT,
        "source": corpus.source,
        "files_train": corpus.files_train,
        "files_val": corpus.files_val,
        "origin": origin,
    }
    for split, arr in (("train", corpus.train), ("val", corpus.val)):
        buf = np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
        atomic_write(directory / f"{split}.bin", lambda f, buf=buf: f.write(buf))
        meta[f"{split}_bytes"] = len(buf)
        meta[f"{split}_sha256"] = hashlib.sha256(buf).hexdigest()
    text = json.dumps(meta, indent=2) + "\n"
    atomic_write(directory / _META, lambda f: f.write(text.encode()))


def saved_origin(directory: Path) -> dict[str, Any] | None:
    """The ``origin`` that ``save_corpus`` recorded in ``directory``; None if there is none or it is unreadable."""
    try:
        meta = json.loads((Path(directory) / _META).read_text())
    except (OSError, ValueError):
        return None
    origin = meta.get("origin") if isinstance(meta, dict) else None
    return origin if isinstance(origin, dict) else None


def open_corpus(directory: Path, *, verify: bool = False) -> Corpus:
    """Open a corpus written by ``save_corpus``, memory-mapping the bytes (read-only, no copy).

    Opening is fast whatever the size: only ``corpus.json`` is read and the file sizes checked. With
    ``verify=True`` the sha256 of both files is checked too (reads every byte).

    Raises:
        ConfigError: (field ``data.path``) the directory holds no complete saved corpus.
    """
    directory = Path(directory)
    try:
        meta = json.loads((directory / _META).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{str(directory)!r} holds no saved corpus ({_META} is missing or unreadable: {exc}). "
            "Write one with save_corpus, or load the text with load_corpus.",
            field=_FIELD,
        ) from exc
    if meta.get("format") != _FORMAT:
        raise ConfigError(
            f"{str(directory / _META)!r} has format {meta.get('format')!r}, expected {_FORMAT}. Save the corpus again.",
            field=_FIELD,
        )
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "val"):
        file = directory / f"{split}.bin"
        expected = meta[f"{split}_bytes"]
        size = file.stat().st_size if file.is_file() else -1
        if size != expected:
            raise ConfigError(
                f"{str(file)!r} has {size} bytes but {_META} says {expected}: the saved corpus is incomplete "
                "or was changed. Save it again.",
                field=_FIELD,
            )
        # np.memmap cannot map an empty file; an empty split is an empty array.
        arr = np.memmap(file, dtype=np.uint8, mode="r") if size else np.zeros(0, dtype=np.uint8)
        if verify and hashlib.sha256(arr).hexdigest() != meta[f"{split}_sha256"]:
            raise ConfigError(
                f"{str(file)!r} does not match the sha256 in {_META}: the saved corpus was changed. Save it again.",
                field=_FIELD,
            )
        arrays[split] = arr
    return Corpus(
        train=arrays["train"],
        val=arrays["val"],
        source=meta["source"],
        files_train=int(meta["files_train"]),
        files_val=int(meta["files_val"]),
    )


# --------------------------------------------------------------------------------------------- batches


def _windows(data: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[Tensor, Tensor]:
    """Gather windows of ``seq_len + 1`` bytes at ``starts``; x is the first seq_len bytes, y the last seq_len."""
    # One fancy-indexing gather (B, T+1) instead of a Python loop; works on memmaps without loading them.
    buf = data[starts[:, None] + np.arange(seq_len + 1)]
    t = torch.from_numpy(buf.astype(np.int64))  # (B, T+1), a fresh writable copy
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class BatchSampler:
    """Random training windows: ``x`` of shape (B, T) and targets ``y`` = ``x`` shifted by one byte.

    Uses its own ``np.random.Generator(seed)``, so the batches depend only on the seed (give each site its
    own) and not on whatever else draws random numbers. ``state_dict``/``load_state_dict`` carry the
    generator's position for an exact resume.
    """

    def __init__(self, data: np.ndarray, *, batch_size: int, seq_len: int, seed: int) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if len(data) < seq_len + 1:
            raise ValueError(f"data has {len(data)} bytes; a window of seq_len={seq_len} needs {seq_len + 1}")
        self.data = data
        self.batch_size = batch_size
        self.seq_len = seq_len
        self._rng = np.random.Generator(np.random.PCG64(seed))

    def next(self) -> tuple[Tensor, Tensor]:
        """The next batch: ``x``, ``y`` int64 of shape (batch_size, seq_len)."""
        # Starts in [0, len - seq_len - 1] so that the target window (one byte further) stays inside.
        starts = self._rng.integers(0, len(self.data) - self.seq_len, size=self.batch_size)
        return _windows(self.data, starts, self.seq_len)

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state["rng"]


def eval_batches(data: np.ndarray, *, batch_size: int, seq_len: int, n_batches: int) -> list[tuple[Tensor, Tensor]]:
    """Fixed evaluation batches: evenly spaced, non-overlapping windows spread over all of ``data``.

    No randomness: every run, site and algorithm is scored on the same bytes, so held-out losses can be
    compared directly. Windows are ``seq_len`` apart or more, so no target byte is counted twice.

    If ``data`` is too short for ``n_batches`` full batches of non-overlapping windows, fewer batches are
    returned (as many as fit); at least one full batch must fit.

    Returns:
        A list of ``(x, y)``, each int64 of shape (batch_size, seq_len), with ``y`` = ``x`` shifted by one byte.
    """
    if batch_size < 1 or seq_len < 1 or n_batches < 1:
        raise ValueError(
            f"batch_size, seq_len and n_batches must be positive, got {batch_size}, {seq_len}, {n_batches}"
        )
    # The last window needs seq_len + 1 bytes; each earlier one occupies seq_len (its x span).
    fit = (len(data) - 1) // seq_len
    if fit < batch_size:
        raise ValueError(
            f"held-out data of {len(data)} bytes fits {fit} non-overlapping windows of {seq_len} bytes; "
            f"one batch needs {batch_size}. Use a smaller batch or seq_len, or a larger held-out split."
        )
    n_batches = min(n_batches, fit // batch_size)
    n = n_batches * batch_size
    last = len(data) - seq_len - 1  # the largest valid start
    # Integer spacing spreads windows from the very start to the very end of the data.
    starts = np.arange(n, dtype=np.int64) * last // max(n - 1, 1)
    batches = []
    for b in range(n_batches):
        batches.append(_windows(data, starts[b * batch_size : (b + 1) * batch_size], seq_len))
    return batches
