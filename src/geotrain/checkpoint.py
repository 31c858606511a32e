"""Checkpoints on disk: every worker's state at an outer-round boundary, written durably and atomically, and
verified before it is used.

Layout under a root directory (a run's ``OUT/checkpoints/``)::

    round-000012/                # one directory per checkpoint, named by its outer round
      site0/                     # site 0's part, committed: renamed into place whole
        w0.safetensors           # worker 0's tensors, with its JSON meta in the safetensors metadata
        w1.safetensors
        manifest.json            # written last: round, site, each file's size and SHA-256, created, meta
      .site1.staging/            # site 1's part while it is being written (or left by a crash)

Writing a site's part takes its workers, which are separate processes, three steps; the caller supplies the
barriers (this module imports no ``torch.distributed``):

1. one worker of the site calls :meth:`CheckpointStore.begin_round` (clears what a crash left behind);
2. barrier; every worker calls :meth:`CheckpointStore.write_worker` and sends the :class:`FileRecord` it
   returns to that one worker (for instance with ``all_gather_object``);
3. barrier; that worker calls :meth:`CheckpointStore.commit_site` with all the records. It writes
   ``manifest.json`` into the staging directory, then renames the directory to ``site{k}``.

Every file and directory is fsynced before the rename that publishes it, so a crash or a kill at any moment
leaves either the previous state or the complete new part: a part is visible only once its manifest is in
place, and the previous checkpoint is never touched. Re-taking a round that already has a ``site{k}`` (a
resumed run) moves the old part aside, renames the new one in and then deletes the old one; a crash between
the two renames leaves that round without site k, so it is skipped and the one before it is used.

Reading (:meth:`CheckpointStore.latest`) picks the newest round whose parts are all present and verify: the
manifest parses and matches its own checksum, every file it lists exists with the listed size and SHA-256, and
all parts were written by the same launch of the run (so a round is never a mix of two attempts at it).
A round that fails is skipped with a warning naming the round, the file and what is wrong; the warnings come
back on the :class:`Checkpoint` for the caller to show. :meth:`CheckpointStore.load_worker` checks the file's
hash again before parsing it. A manifest or file from a newer format is an error, never skipped: skipping it
would quietly throw away the newer progress.

Several sites may share one root (a run on one machine) or each have its own disk (a real cluster): every
step touches only its own site's files, except :meth:`CheckpointStore.prune`, which tolerates another site
pruning at the same time.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from geotrain.errors import CheckpointError
from geotrain.files import fsync_dir, replacing, write_json_atomic

__all__ = ["FORMAT", "Checkpoint", "CheckpointStore", "FileRecord", "Manifest"]

FORMAT = 1
"""The on-disk format this version writes and reads (in ``manifest.json`` and in every worker file)."""

MANIFEST = "manifest.json"
_META_KEY = "geotrain.checkpoint"  # the safetensors metadata key that holds a worker file's JSON header
_BYTES = "__bytes__"  # meta values that are bytes travel as {"__bytes__": base64}
_ROUND = re.compile(r"round-(\d{6,})")
_SITE = re.compile(r"site(\d+)")
_BEGUN = re.compile(r"\.site(\d+)\.(?:staging|old-[0-9a-f]+)")  # a part being written, or being replaced
_WORKER_FILE = re.compile(r"w(\d+)\.safetensors")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


@dataclass(frozen=True, kw_only=True, slots=True)
class FileRecord:
    """One worker's file in a site's part, as :meth:`CheckpointStore.write_worker` wrote it and the manifest
    lists it. Picklable, so that a worker can send it to the one that commits the site."""

    name: str
    """File name inside the site's directory: ``w{worker}.safetensors``."""
    size: int
    """Length in bytes."""
    sha256: str
    """SHA-256 of the whole file, lower-case hex."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Manifest:
    """A site's committed part of one checkpoint: what its ``manifest.json`` says."""

    round: int
    """The outer round the checkpoint was taken at."""
    site: int
    """The site whose workers wrote the files."""
    files: tuple[FileRecord, ...]
    """One file per worker, in worker order."""
    created: float
    """When the part was committed (Unix seconds, from the store's clock)."""
    meta: dict[str, Any]
    """What the committing worker passed to :meth:`CheckpointStore.commit_site`."""
    launch: str | None
    """The store's ``launch`` when the part was committed."""

    @property
    def workers(self) -> list[int]:
        """The workers that have a file in this part."""
        return [_worker_of(f.name) for f in self.files]


@dataclass(frozen=True, kw_only=True, slots=True)
class Checkpoint:
    """The checkpoint :meth:`CheckpointStore.latest` chose: every part it looked at is present and verifies."""

    round: int
    """The outer round it was taken at."""
    path: Path
    """Its directory (``root/round-000012``)."""
    manifests: dict[int, Manifest]
    """The verified parts, by site."""
    warnings: list[str]
    """Newer rounds that were skipped, one line each naming the round, the file and what is wrong, for the
    caller to show (the library prints nothing)."""

    @property
    def sites(self) -> list[int]:
        return sorted(self.manifests)


class _Bad(Exception):
    """A part that does not verify: ``file`` (relative to the round's directory) and what is wrong with it."""

    def __init__(self, file: str, what: str) -> None:
        super().__init__(f"{file}: {what}")
        self.file = file
        self.what = what


class CheckpointStore:
    """Checkpoints under ``root``, one directory per outer round; see the module docstring for the protocol.

    ``keep`` is how many complete checkpoints :meth:`prune` leaves. ``launch`` names this start of the run: the
    same string in every site, a new one each time the run is started or resumed (for instance a random id the
    launcher hands out). It is written into each part's manifest, and :meth:`latest` refuses a round whose parts
    name different launches: one launch stopped while re-taking the round after another had written some of
    it, so the round would mix two trajectories. Without it (None) that one case goes unnoticed. ``now`` gives
    the ``created`` time written into manifests (Unix seconds).
    """

    def __init__(self, root: Path, *, keep: int = 3, launch: str | None = None,
                 now: Callable[[], float] = time.time) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an integer >= 1 (the newest checkpoint is always kept), got {keep!r}")
        if launch is not None and not isinstance(launch, str):
            raise TypeError(f"launch must be a string or None, got {type(launch).__name__}")
        self.root = Path(root)
        self.keep = keep
        self.launch = launch
        self._now = now

    def __repr__(self) -> str:
        return f"CheckpointStore({str(self.root)!r}, keep={self.keep}, launch={self.launch!r})"

    # ------------------------------------------------------------------------------------------- paths

    def round_dir(self, round: int) -> Path:
        return self.root / f"round-{_index(round, 'round'):06d}"

    def site_dir(self, round: int, site: int) -> Path:
        return self.round_dir(round) / f"site{_index(site, 'site')}"

    def _staging_dir(self, round: int, site: int) -> Path:
        return self.round_dir(round) / f".site{_index(site, 'site')}.staging"

    # ----------------------------------------------------------------------------------------- writing

    def begin_round(self, round: int, site: int) -> None:
        """Prepare site ``site``'s part of round ``round``: remove what a crash left of an earlier attempt
        (the staging directory, a part moved aside while being replaced) and create an empty staging directory.

        Also removes this site's parts of rounds newer than ``round``. There are some only when the run resumed
        from an older checkpoint: they belong to the trajectory it abandoned, and keeping them could later pair
        this site's old part with another site's new one. One worker of the site calls this, then a barrier,
        before any worker of the site calls :meth:`write_worker`.
        """
        round_dir = self.round_dir(round)
        prefix = f"site{_index(site, 'site')}"
        for r, path in self._round_dirs().items():
            if r > round and _discard_site(path, site):
                fsync_dir(path)
        round_dir.mkdir(parents=True, exist_ok=True)
        for entry in _entries(round_dir):
            if entry.startswith(f".{prefix}.old-") or entry == f".{prefix}.staging":
                _remove_tree(round_dir / entry)
        self._staging_dir(round, site).mkdir(exist_ok=True)
        fsync_dir(round_dir)
        fsync_dir(self.root)

    def write_worker(self, round: int, site: int, worker: int, tensors: Mapping[str, torch.Tensor],
                     meta: Mapping[str, Any] | None = None) -> FileRecord:
        """Write worker ``worker``'s ``tensors`` and ``meta`` into site ``site``'s staging directory for
        ``round`` as ``w{worker}.safetensors``, durably, and return its name, size and SHA-256.

        ``tensors`` may have any dtype safetensors stores and live on any device; they are copied to contiguous
        CPU memory where needed (and where two share memory, such as tied weights). ``meta`` is a dict of JSON
        values (integers of any size round-trip exactly), plus ``bytes`` values, which come back as ``bytes``;
        tuples come back as lists. Keys must be strings.
        """
        name = f"w{_index(worker, 'worker')}.safetensors"
        header = _dumps({"format": FORMAT, "round": _index(round, "round"), "site": _index(site, "site"),
                         "worker": worker, "meta": _encode_meta(meta)})
        cpu = _cpu_tensors(tensors)
        staging = self._staging_dir(round, site)
        staging.mkdir(parents=True, exist_ok=True)  # begin_round made it; exist_ok for workers racing on it
        with replacing(staging / name) as tmp:
            save_file(cpu, str(tmp), metadata={_META_KEY: header})
            size, digest = _digest(tmp)
        return FileRecord(name=name, size=size, sha256=digest)

    def commit_site(self, round: int, site: int, files: Iterable[FileRecord],
                    meta: Mapping[str, Any] | None = None) -> Path:
        """Publish site ``site``'s part of ``round``: the files every worker wrote (their ``files`` records) and
        ``meta``. Writes ``manifest.json``, then renames the staging directory to ``site{site}``, replacing a
        part of the same round that is already there. Returns the part's directory.

        Called by the one worker that called :meth:`begin_round`, after every worker's :meth:`write_worker`.
        """
        encoded_meta = _encode_meta(meta)
        records = sorted(files, key=lambda f: _worker_of(f.name))
        if not records:
            raise ValueError("commit_site needs the FileRecord of at least one worker")
        if len({f.name for f in records}) != len(records):
            raise ValueError(f"commit_site got the same worker's file twice: {[f.name for f in records]}")
        staging = self._staging_dir(round, site)
        for f in records:
            try:
                size = (staging / f.name).stat().st_size
            except FileNotFoundError:
                raise CheckpointError(f"{staging / f.name} is missing at commit; every worker must call "
                                      "write_worker after begin_round and before commit_site") from None
            if size != f.size:
                raise CheckpointError(f"{staging / f.name} is {size} bytes at commit, its record says {f.size}; "
                                      "another process wrote it since (call begin_round once per attempt)")
        body = {"format": FORMAT, "round": round, "site": site, "launch": self.launch, "created": self._now(),
                "files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in records],
                "meta": encoded_meta}
        write_json_atomic(staging / MANIFEST, {**body, "checksum": _checksum(body)})  # fsyncs it and staging

        round_dir, final = staging.parent, self.site_dir(round, site)
        old = None
        if final.exists():  # re-taking this round: move the old part aside, so the new one can take its name
            old = round_dir / f".site{site}.old-{uuid.uuid4().hex}"
            os.rename(final, old)
        os.rename(staging, final)
        fsync_dir(round_dir)
        fsync_dir(self.root)
        if old is not None:
            _remove_tree(old)
        return final

    # ----------------------------------------------------------------------------------------- reading

    def has_checkpoints(self) -> bool:
        """Whether any round has a committed part (so that starting afresh would overwrite a run's progress)."""
        return bool(self.rounds())

    def rounds(self) -> list[int]:
        """Rounds with at least one committed site part, ascending. Nothing is verified here."""
        return sorted(r for r, path in self._round_dirs().items() if _parts(path)[0])

    def latest(self, sites: Iterable[int] | None = None, *, at_most: int | None = None) -> Checkpoint | None:
        """The newest round (no newer than ``at_most``) whose parts of ``sites`` are all committed and verify.

        With ``sites`` None, the sites expected in a round are those that committed a part or began one (a
        staging directory, a part being replaced): a round some site was still writing is incomplete. A resuming
        run should pass its sites, so that a round a site never began is incomplete too. Sites with a disk each
        see only their own part: each asks for its own site, the run takes the smallest round they found, and
        each asks again with ``at_most`` set to it, until all agree (at most once per round on disk).

        Returns None when no round (no newer than ``at_most``) has a committed part. Raises
        :class:`CheckpointError` when some do but none is complete and verifies (starting afresh would silently
        lose the run's progress), or when a part was written by a newer format.
        """
        wanted = None if sites is None else sorted({_index(k, "site") for k in sites})
        if wanted is not None and not wanted:
            raise ValueError("latest(sites=...) needs at least one site")
        problems: list[str] = []
        committed_anywhere = False
        for round, path in sorted(self._round_dirs().items(), reverse=True):
            if at_most is not None and round > at_most:
                continue
            committed, begun = _parts(path)
            committed_anywhere |= bool(committed)
            if not committed:
                if begun:
                    problems.append(f"round {round}: no site committed its part (stopped while writing)")
                continue
            expected = wanted if wanted is not None else sorted(committed | begun)
            missing = [k for k in expected if k not in committed]
            if missing:
                problems += [f"round {round}, site{k}: no committed part "
                             f"({'stopped while writing it' if k in begun else 'never written'})" for k in missing]
                continue
            try:
                manifests = {k: self._verify(round, k, hashes=True) for k in expected}
            except _Bad as bad:
                problems.append(f"round {round}, {bad.file}: {bad.what}")
                continue
            first = manifests[expected[0]]
            other = next((m for m in manifests.values() if m.launch != first.launch), None)
            if other is not None:
                problems.append(f"round {round}, site{other.site}/{MANIFEST}: written by launch {other.launch!r}, "
                                f"site{first.site}'s by {first.launch!r} (stopped while re-taking this round)")
                continue
            return Checkpoint(round=round, path=path, manifests=manifests,
                              warnings=[f"{p}; using round {round}" for p in problems])
        if not committed_anywhere:
            return None
        raise CheckpointError(f"no checkpoint under {self.root} is complete and verifies: " + "; ".join(problems))

    def load_worker(self, round: int, site: int, worker: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Worker ``worker``'s tensors (on the CPU) and meta from site ``site``'s part of ``round``.

        The file's size and SHA-256 are checked against the manifest before it is parsed; anything wrong
        raises :class:`CheckpointError` naming the file.
        """
        round_dir = self.round_dir(round)
        name = f"w{_index(worker, 'worker')}.safetensors"
        path = self.site_dir(round, site) / name
        try:
            manifest = self._read_manifest(round, site)
            record = next((f for f in manifest.files if f.name == name), None)
            if record is None:
                raise _Bad(f"site{site}/{name}", f"not in the site's manifest (it lists workers {manifest.workers})")
            _check_file(path, record, f"site{site}/{name}", hashes=True)
        except _Bad as bad:
            raise CheckpointError(f"{round_dir / bad.file}: {bad.what}") from None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open is no dict
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        header = _parse_header(path, metadata.get(_META_KEY))
        if (header.get("round"), header.get("site"), header.get("worker")) != (round, site, worker):
            raise CheckpointError(f"{path}: holds round {header.get('round')}, site {header.get('site')}, worker "
                                  f"{header.get('worker')}, not round {round}, site {site}, worker {worker}")
        try:
            return tensors, _decode_meta(header.get("meta", {}))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: its meta is malformed ({_short(e)})") from None

    # ----------------------------------------------------------------------------------------- pruning

    def prune(self) -> list[int]:
        """Delete all but the newest ``keep`` complete checkpoints; returns the rounds it deleted.

        Complete here means every site that committed or began a part of the round committed it, each part's
        manifest and file sizes check out (hashes are left to :meth:`latest`, to keep this cheap), and all parts
        name the same launch. Deletes every round older than the newest complete one that is not kept, including
        ones some site never finished, and staging leftovers in the kept ones; rounds newer than the newest
        complete one are being written and are left alone. (Sites write rounds in step, so no site is still
        writing a round older than one another site completed.) Safe while another site prunes the same
        directory: a round is renamed away before it is deleted.
        """
        rounds = self._round_dirs()
        complete = [r for r in sorted(rounds) if self._complete(r, rounds[r])]
        if not complete:
            return []
        kept = complete[-self.keep:]
        newest = kept[-1]
        deleted = []
        for r, path in sorted(rounds.items()):
            if r < newest and r not in kept and _remove_round(path):
                deleted.append(r)
        for r in kept:
            committed, _ = _parts(rounds[r])
            for entry in _entries(rounds[r]):
                if not (m := _BEGUN.fullmatch(entry)):
                    continue
                replaced = ".old-" in entry and int(m.group(1)) in committed  # the new part is in place
                if replaced or r < newest:  # in an older round, any attempt is a leftover
                    _remove_tree(rounds[r] / entry)
        for entry in _entries(self.root):
            if entry.startswith(".deleting-"):  # left by a prune that was killed, or in progress elsewhere
                _remove_tree(self.root / entry)
        return deleted

    # -------------------------------------------------------------------------------------------- inner

    def _round_dirs(self) -> dict[int, Path]:
        """Round directories by round (only canonical names: ``round-`` and at least six digits)."""
        found: dict[int, Path] = {}
        for entry in _entries(self.root):
            m = _ROUND.fullmatch(entry)
            if m and entry == f"round-{int(m.group(1)):06d}" and (self.root / entry).is_dir():
                found[int(m.group(1))] = self.root / entry
        return found

    def _complete(self, round: int, path: Path) -> bool:
        committed, begun = _parts(path)
        if not committed or not begun <= committed:
            return False
        try:
            launches = {self._verify(round, k, hashes=False).launch for k in committed}
        except (_Bad, CheckpointError, FileNotFoundError):
            return False  # corrupt, from a newer format, or deleted meanwhile by another site's prune
        return len(launches) == 1

    def _verify(self, round: int, site: int, *, hashes: bool) -> Manifest:
        manifest = self._read_manifest(round, site)
        for f in manifest.files:
            _check_file(self.site_dir(round, site) / f.name, f, f"site{site}/{f.name}", hashes=hashes)
        return manifest

    def _read_manifest(self, round: int, site: int) -> Manifest:
        """The part's manifest; :class:`_Bad` if it is missing or malformed, :class:`CheckpointError` if it is
        from a newer format."""
        path = self.site_dir(round, site) / MANIFEST
        rel = f"site{site}/{MANIFEST}"
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise _Bad(rel, "is missing") from None
        except OSError as e:
            raise _Bad(rel, f"cannot be read ({e.strerror})") from None
        except ValueError as e:  # not UTF-8 or not JSON
            raise _Bad(rel, f"does not parse ({_short(e)})") from None
        if not isinstance(data, dict) or not _is_int(data.get("format")):
            raise _Bad(rel, "is not a checkpoint manifest (no format number)")
        _check_format(path, data["format"])
        body = {k: v for k, v in data.items() if k != "checksum"}
        if data.get("checksum") != _checksum(body):
            raise _Bad(rel, "does not match its checksum (it was changed or is corrupt)")
        try:
            files = tuple(FileRecord(name=f["name"], size=f["size"], sha256=f["sha256"]) for f in data["files"])
            manifest = Manifest(round=data["round"], site=data["site"], files=files, created=data["created"],
                                meta=_decode_meta(data["meta"]), launch=data["launch"])
        except (KeyError, TypeError, ValueError) as e:
            raise _Bad(rel, f"is malformed ({_short(e)})") from None
        if not isinstance(manifest.created, int | float) or not isinstance(manifest.launch, str | None):
            raise _Bad(rel, "is malformed (created is not a number, or launch not a string)")
        if (manifest.round, manifest.site) != (round, site):
            raise _Bad(rel, f"is for round {manifest.round} site {manifest.site} (a part moved from elsewhere)")
        for f in files:
            if not (isinstance(f.name, str) and _WORKER_FILE.fullmatch(f.name) and _is_int(f.size) and f.size >= 0
                    and isinstance(f.sha256, str) and _SHA256.fullmatch(f.sha256)):
                raise _Bad(rel, f"lists a malformed file record {f!r}")
        return manifest


# ------------------------------------------------------------------------------------------- helpers


def _index(value: int, what: str) -> int:
    if not _is_int(value) or value < 0:
        raise ValueError(f"a checkpoint's {what} must be an integer >= 0, got {value!r}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _worker_of(name: str) -> int:
    m = _WORKER_FILE.fullmatch(name) if isinstance(name, str) else None
    if m is None:
        raise ValueError(f"not a worker file name (w<worker>.safetensors): {name!r}")
    return int(m.group(1))


def _short(e: BaseException, limit: int = 160) -> str:
    text = str(e)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _entries(directory: Path) -> list[str]:
    """Names in ``directory``; none when it does not exist (or was removed meanwhile)."""
    try:
        return sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _parts(round_dir: Path) -> tuple[set[int], set[int]]:
    """(sites with a committed part, sites that began one: a staging directory or a part moved aside)."""
    committed, begun = set(), set()
    for entry in _entries(round_dir):
        if (m := _SITE.fullmatch(entry)) and entry == f"site{int(m.group(1))}" and (round_dir / entry).is_dir():
            committed.add(int(m.group(1)))
        elif m := _BEGUN.fullmatch(entry):
            begun.add(int(m.group(1)))
    return committed, begun


def _remove_tree(path: Path) -> None:
    """Remove a directory tree; parts of it vanishing meanwhile (another process removing it) is no error."""

    def ignore_vanished(_func: Any, _path: Any, exc: Any) -> None:
        err = exc[1] if isinstance(exc, tuple) else exc  # onerror passes exc_info, onexc the exception
        if not isinstance(err, FileNotFoundError):
            raise err

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=ignore_vanished)
    else:
        shutil.rmtree(path, onerror=ignore_vanished)


def _discard(path: Path, hidden_name: str) -> bool:
    """Rename ``path`` to ``hidden_name`` beside it (atomic: it no longer counts), then remove it. False if it
    was already gone."""
    aside = path.with_name(hidden_name)
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    _remove_tree(aside)
    return True


def _remove_round(path: Path) -> bool:
    return _discard(path, f".deleting-{path.name}-{uuid.uuid4().hex}")


def _discard_site(round_dir: Path, site: int) -> bool:
    """Remove site ``site``'s part of a round, committed or begun; True if there was any."""
    found = False
    for entry in _entries(round_dir):
        if entry == f"site{site}":
            found |= _discard(round_dir / entry, f".site{site}.old-{uuid.uuid4().hex}")
        elif (m := _BEGUN.fullmatch(entry)) and int(m.group(1)) == site:
            _remove_tree(round_dir / entry)
            found = True
    return found


def _digest(path: Path) -> tuple[int, str]:
    """(size, SHA-256 hex) of the file's bytes as read now."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _check_file(path: Path, record: FileRecord, rel: str, *, hashes: bool) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise _Bad(rel, "is missing") from None
    if size != record.size:
        raise _Bad(rel, f"is {size} bytes, the manifest says {record.size} (truncated or overwritten)")
    if hashes:
        try:
            size, digest = _digest(path)
        except OSError as e:
            raise _Bad(rel, f"cannot be read ({e.strerror})") from None
        if size != record.size or digest != record.sha256:
            raise _Bad(rel, "SHA-256 differs from the manifest (the file is corrupt)")


def _check_format(path: Path, fmt: int) -> None:
    if fmt > FORMAT:
        raise CheckpointError(f"{path}: written by a newer geotrain (checkpoint format {fmt}; this version reads "
                              f"format {FORMAT}); upgrade geotrain to resume from it")
    if fmt < 1:
        raise CheckpointError(f"{path}: unknown checkpoint format {fmt}")


def _parse_header(path: Path, text: str | None) -> dict[str, Any]:
    if text is None:
        raise CheckpointError(f"{path}: not a geotrain checkpoint file (no {_META_KEY!r} metadata)")
    try:
        header = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{path}: its {_META_KEY!r} metadata does not parse ({_short(e)})") from None
    if not isinstance(header, dict) or not _is_int(header.get("format")):
        raise CheckpointError(f"{path}: its {_META_KEY!r} metadata has no format number")
    _check_format(path, header["format"])
    return header


def _cpu_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors as contiguous CPU tensors that share no memory (safetensors refuses shared ones)."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a dict of name -> torch.Tensor, got {type(tensors).__name__}")
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors must map str to torch.Tensor; {name!r} is a {type(t).__name__}")
        t = t.detach()
        if not t.is_contiguous():
            t = t.contiguous()  # on its own device first: one copy to the CPU, not two
        t = t.to("cpu")
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in storages:  # tied weights, or two views of one buffer
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            storages.add(ptr)
        out[name] = t
    return out


def _encode_meta(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    if meta is None:
        return {}
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    return _encode(meta, "meta")


def _encode(value: Any, where: str) -> Any:
    """``value`` as JSON values, with bytes as {"__bytes__": base64}; a TypeError names what cannot round-trip."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value  # json writes non-finite floats as NaN/Infinity, which it reads back
    if isinstance(value, bytes | bytearray | memoryview):
        return {_BYTES: base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: key {key!r} is not a string (JSON would bring it back as one)")
            if key == _BYTES:
                raise ValueError(f"{where}: the key {_BYTES!r} is reserved for bytes values")
            out[key] = _encode(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, list | tuple):
        return [_encode(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise TypeError(f"{where}: a {type(value).__name__} is not a JSON value; store arrays and tensors as tensors")


def _decode_meta(value: Any) -> dict[str, Any]:
    decoded = _decode(value)
    if not isinstance(decoded, dict):
        raise TypeError(f"meta is a {type(decoded).__name__}, not a dict")
    return decoded


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {_BYTES}:
            return base64.b64decode(value[_BYTES], validate=True)
        return {key: _decode(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode(item) for item in value]
    return value


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _checksum(body: Mapping[str, Any]) -> str:
    """SHA-256 of the manifest's fields in a canonical form, so a flipped digit in a size or the meta shows."""
    return hashlib.sha256(_dumps(body).encode("utf-8")).hexdigest()

