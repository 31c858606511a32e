"""The checkpoint store: round trips, choosing the newest checkpoint that verifies, corruption, kills while
writing (real child processes and SIGKILL), re-taking a round, pruning and clearing what a crash left."""

from __future__ import annotations

import json
import os
import pickle
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import geotrain
import geotrain.checkpoint as ck
from geotrain.checkpoint import CheckpointStore, FileRecord
from geotrain.errors import CheckpointError, ConfigError

pytestmark = pytest.mark.timeout(180)

SITES = (0, 1)
WORKERS = (0, 1)
BIG = 2**64 + 12345  # beyond 2^53: a float would round it


def _state(round: int, site: int, worker: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A worker's state whose values say which round, site and worker it belongs to."""
    gen = torch.Generator().manual_seed(1000 * round + 10 * site + worker)
    tensors = {
        "w": torch.randn(8, 4, generator=gen),
        "w_bf16": torch.randn(5, generator=gen).to(torch.bfloat16),
        "step": torch.tensor([round, site, worker, 2**40], dtype=torch.int64),
        "rng": torch.get_rng_state(),  # a uint8 tensor
    }
    rng = np.random.default_rng(round * 100 + site * 10 + worker)
    rng.random(3)
    meta = {
        "round": round,
        "numpy_rng": rng.bit_generator.state,  # PCG64: ints near 2^128
        "nested": {"big": BIG, "neg": -BIG, "list": [1, 2.5, None, True, "x"], "empty": {}},
        "raw": bytes(range(256)),
    }
    return tensors, meta


def _write_site(store: CheckpointStore, round: int, site: int, workers=WORKERS, *, commit: bool = True) -> list:
    store.begin_round(round, site)
    records = [store.write_worker(round, site, w, *_state(round, site, w)) for w in workers]
    if commit:
        store.commit_site(round, site, records, {"round": round, "site": site})
    return records


def _write_round(store: CheckpointStore, round: int, sites=SITES) -> None:
    for k in sites:
        _write_site(store, round, k)


def _assert_worker(store: CheckpointStore, round: int, site: int, worker: int) -> None:
    tensors, meta = store.load_worker(round, site, worker)
    want_tensors, want_meta = _state(round, site, worker)
    assert tensors.keys() == want_tensors.keys()
    for name, want in want_tensors.items():
        assert tensors[name].dtype == want.dtype, name
        assert torch.equal(tensors[name], want), name
    assert meta == want_meta


# ------------------------------------------------------------------------------------------ round trip


def test_round_trip_of_tensors_and_meta_for_two_sites_of_two_workers(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    assert not store.has_checkpoints() and store.rounds() == [] and store.latest() is None
    _write_round(store, 12)

    assert store.has_checkpoints() and store.rounds() == [12]
    assert (store.root / "round-000012" / "site1" / "w0.safetensors").is_file()
    found = store.latest(SITES)
    assert found is not None and found.round == 12 and found.sites == [0, 1] and found.warnings == []
    assert found.path == store.root / "round-000012"
    assert found.manifests[1].workers == [0, 1] and found.manifests[1].meta == {"round": 12, "site": 1}
    for k in SITES:
        for w in WORKERS:
            _assert_worker(store, 12, k, w)

    # The random states restore exactly: numpy's PCG64 from its big ints, torch's from its uint8 tensor.
    tensors, meta = store.load_worker(12, 0, 1)
    restored, original = np.random.default_rng(), np.random.default_rng(12 * 100 + 1)
    original.random(3)
    restored.bit_generator.state = meta["numpy_rng"]
    assert np.array_equal(restored.random(5), original.random(5))
    torch.set_rng_state(tensors["rng"])
    first = torch.randn(4)
    torch.set_rng_state(tensors["rng"])
    assert torch.equal(torch.randn(4), first)
    assert meta["nested"]["big"] == BIG and type(meta["raw"]) is bytes


def test_views_tied_and_noncontiguous_tensors_are_stored_by_value(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    weight = torch.nn.Parameter(torch.randn(3, 3))
    tensors = {"base": base, "tied": base, "transposed": base.t(), "row": base[1], "column": base[:, 2],
               "param": weight, "empty": torch.empty(0), "empty2": torch.empty(0, 3)}
    store.begin_round(0, 0)
    record = store.write_worker(0, 0, 0, tensors)
    assert pickle.loads(pickle.dumps(record)) == record  # a worker can send it to the committing one
    store.commit_site(0, 0, [record])
    loaded, meta = store.load_worker(0, 0, 0)
    assert meta == {}
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t.detach()), name
        assert loaded[name].is_contiguous()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_tensors_are_copied_to_the_cpu(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    t = torch.randn(5, 7, device="cuda")
    store.begin_round(0, 0)
    store.commit_site(0, 0, [store.write_worker(0, 0, 0, {"t": t.t(), "h": t.half()})])
    loaded, _ = store.load_worker(0, 0, 0)
    assert loaded["t"].device.type == "cpu" and torch.equal(loaded["t"], t.t().cpu())
    assert torch.equal(loaded["h"], t.half().cpu())


@pytest.mark.parametrize(("meta", "error", "words"), [
    ({1: "int key"}, TypeError, "not a string"),
    ({"a": np.zeros(2)}, TypeError, "ndarray"),
    ({"a": {"__bytes__": "x"}}, ValueError, "reserved"),
    ({"a": object()}, TypeError, "object"),
])
def test_meta_that_would_not_come_back_equal_is_refused_before_writing(tmp_path: Path, meta, error, words) -> None:
    store = CheckpointStore(tmp_path)
    store.begin_round(1, 0)
    with pytest.raises(error, match=words):
        store.write_worker(1, 0, 0, {"x": torch.zeros(1)}, meta)
    assert list((store.root / "round-000001" / ".site0.staging").iterdir()) == []


# --------------------------------------------------------------------------------------------- latest


def test_latest_picks_the_newest_complete_round_and_skips_a_missing_site_part(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    for r in (4, 8):
        _write_round(store, r)
    _write_site(store, 12, 0)  # site 1 never wrote round 12
    assert store.rounds() == [4, 8, 12]

    found = store.latest(SITES)
    assert found.round == 8
    assert found.warnings == ["round 12, site1: no committed part (never written); using round 8"]
    assert store.latest([0]).round == 12  # site 0's part of round 12 is complete
    assert store.latest().round == 12  # nothing says that site 1 was meant to write round 12
    assert store.latest(SITES, at_most=7).round == 4

    # A site that began its part but did not commit it makes the round incomplete even without `sites`.
    _write_site(store, 16, 0)
    _write_site(store, 16, 1, commit=False)
    found = store.latest()
    assert found.round == 12
    assert found.warnings == ["round 16, site1: no committed part (stopped while writing it); using round 12"]


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "delete", "garble_manifest", "edit_manifest"])
def test_a_damaged_part_is_an_error_to_load_and_latest_falls_back(tmp_path: Path, damage: str) -> None:
    store = CheckpointStore(tmp_path)
    for r in (1, 2):
        _write_round(store, r)
    site_dir = store.root / "round-000002" / "site1"
    file, manifest = site_dir / "w0.safetensors", site_dir / "manifest.json"
    if damage == "flip_byte":
        data = bytearray(file.read_bytes())
        data[len(data) // 2] ^= 0x01
        file.write_bytes(bytes(data))
        named, what = "site1/w0.safetensors", "SHA-256 differs"
    elif damage == "truncate":
        os.truncate(file, file.stat().st_size - 7)
        named, what = "site1/w0.safetensors", "truncated"
    elif damage == "delete":
        file.unlink()
        named, what = "site1/w0.safetensors", "is missing"
    elif damage == "garble_manifest":
        manifest.write_bytes(manifest.read_bytes()[:40] + b"\x00garbled")
        named, what = "site1/manifest.json", "does not parse"
    else:  # valid JSON, one digit changed: the manifest's own checksum notices
        data = json.loads(manifest.read_text())
        data["meta"]["round"] = 9
        manifest.write_text(json.dumps(data))
        named, what = "site1/manifest.json", "checksum"

    with pytest.raises(CheckpointError) as info:
        store.load_worker(2, 1, 0)
    message = str(info.value)
    assert named.split("/")[1] in message and what in message and "\n" not in message
    assert message.startswith("checkpoint: ") and isinstance(info.value, ConfigError)
    assert info.value.field == "checkpoint"

    found = store.latest(SITES)
    assert found.round == 1
    assert len(found.warnings) == 1
    assert found.warnings[0].startswith(f"round 2, {named}: ") and what in found.warnings[0]
    assert found.warnings[0].endswith("; using round 1")
    _assert_worker(store, 1, 1, 0)
    _assert_worker(store, 2, 0, 0)  # the other site's part of round 2 is intact
    assert store.latest([0]).round == 2


def test_no_checkpoint_that_verifies_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    _write_round(store, 1)
    (store.root / "round-000001" / "site0" / "w1.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no checkpoint under .* verifies: round 1, site0/w1.safetensors: is"):
        store.latest(SITES)


def test_files_from_a_newer_format_are_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = CheckpointStore(tmp_path)
    _write_round(store, 1)
    manifest = store.root / "round-000001" / "site1" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"format": 1', '"format": 2'))
    with pytest.raises(CheckpointError, match="newer geotrain .*format 2.*upgrade"):
        store.latest()  # not skipped: that would quietly drop newer progress
    with pytest.raises(CheckpointError, match="manifest.json: written by a newer geotrain"):
        store.load_worker(1, 1, 0)

    monkeypatch.setattr(ck, "FORMAT", 3)  # a worker file whose own header is from a newer format
    store.begin_round(2, 0)
    record = store.write_worker(2, 0, 0, {"x": torch.ones(2)})
    monkeypatch.undo()
    store.commit_site(2, 0, [record])
    with pytest.raises(CheckpointError, match=r"w0.safetensors: written by a newer geotrain \(checkpoint format 3"):
        store.load_worker(2, 0, 0)


# ---------------------------------------------------------------------------------- killed while writing

# The child writes round 1 completely, then stops at the named point of writing round 2, tells the test on
# stdout and blocks on stdin until the test kills it. The stop points are reached deterministically by wrapping
# the functions the store calls; "loop" instead is killed at whatever point it has reached.
CHILD = r"""
import os, sys
from pathlib import Path
import torch
import geotrain.checkpoint as ck

root, stage = Path(sys.argv[1]), sys.argv[2]
store = ck.CheckpointStore(root, launch=sys.argv[3])

def stop():
    print("stopped", flush=True)
    sys.stdin.read()
    os._exit(3)  # only if the test closed stdin instead of killing

def write_site(r, site, value, workers=2, commit=True):
    store.begin_round(r, site)
    records = [store.write_worker(r, site, w, {"x": torch.full((250_000,), float(value))}, {"value": value})
               for w in range(workers)]
    if commit:
        store.commit_site(r, site, records, {"value": value})

for site in (0, 1):
    write_site(1, site, 1.0)

if stage == "mid_file":  # the file as a kill in the middle of writing it leaves it: half written
    real_save = ck.save_file
    def save_half(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        os.truncate(filename, os.path.getsize(filename) // 2)
        stop()
    ck.save_file = save_half
    write_site(2, 0, 2.0)
elif stage == "loop":  # many files, killed wherever it is
    store.begin_round(2, 0)
    for w in range(200):
        store.write_worker(2, 0, w, {"x": torch.full((250_000,), 2.0)})
        if w == 0:
            print("stopped", flush=True)
    stop()
elif stage == "before_manifest":
    write_site(2, 0, 2.0, commit=False)
    stop()
elif stage in ("before_rename", "replacing"):
    if stage == "replacing":  # round 2 is complete; re-taking site 0's part stops between the two renames
        for site in (0, 1):
            write_site(2, site, 2.0)
    real_rename = os.rename
    def rename(src, dst):
        if str(src).endswith(".staging"):
            stop()
        real_rename(src, dst)
    os.rename = rename
    write_site(2, 0, 3.0)
print("finished without stopping", flush=True)
"""


def _kill_child_at(root: Path, stage: str, log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(geotrain.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(root), stage, "first"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, env=env, text=True)
        try:
            ready, _, _ = select.select([proc.stdout], [], [], 60)  # generous: it only has to import torch
            line = proc.stdout.readline() if ready else "(nothing within 60 s)"
            assert line.strip() == "stopped", f"child said {line!r}; its stderr:\n{log.read_text()}"
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
            proc.stdin.close()
            proc.stdout.close()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
@pytest.mark.parametrize("stage", ["mid_file", "loop", "before_manifest", "before_rename", "replacing"])
def test_a_kill_while_writing_leaves_the_previous_checkpoint_loadable(tmp_path: Path, stage: str) -> None:
    root = tmp_path / "checkpoints"
    _kill_child_at(root, stage, tmp_path / "child.log")
    store = CheckpointStore(root, launch="second")

    if stage == "replacing":  # site 1's part of round 2 was committed; site 0's was being replaced
        assert store.rounds() == [1, 2]
        want = "round 2, site0: no committed part (stopped while writing it); using round 1"
    else:
        assert store.rounds() == [1]  # the partial round is not listed
        want = "round 2: no site committed its part (stopped while writing); using round 1"
    for sites in (SITES, None):
        found = store.latest(sites)
        assert found.round == 1 and found.warnings == [want]
    for k in SITES:
        for w in (0, 1):
            tensors, meta = store.load_worker(1, k, w)
            assert torch.equal(tensors["x"], torch.full((250_000,), 1.0)) and meta == {"value": 1.0}
    with pytest.raises(CheckpointError, match="site0/manifest.json: is missing"):
        store.load_worker(2, 0, 0)

    # The resumed run takes round 2 again; what the kill left behind is cleared and the round completes.
    for k in SITES:
        store.begin_round(2, k)
        records = [store.write_worker(2, k, w, {"x": torch.full((3,), 4.0)}) for w in (0, 1)]
        store.commit_site(2, k, records)
    found = store.latest(SITES)
    assert found.round == 2 and found.warnings == []
    assert sorted(p.name for p in (root / "round-000002").iterdir()) == ["site0", "site1"]
    assert torch.equal(store.load_worker(2, 0, 1)[0]["x"], torch.full((3,), 4.0))


# ------------------------------------------------------------------------------ re-taking, pruning, staging


def test_re_committing_a_round_replaces_it(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    _write_round(store, 3)
    store.begin_round(3, 1)
    record = store.write_worker(3, 1, 0, {"x": torch.full((2,), 9.0)}, {"again": True})
    assert store.commit_site(3, 1, [record], {"again": True}) == store.root / "round-000003" / "site1"

    found = store.latest(SITES)
    assert found.round == 3 and found.manifests[1].meta == {"again": True} and found.manifests[1].workers == [0]
    tensors, meta = store.load_worker(3, 1, 0)
    assert torch.equal(tensors["x"], torch.full((2,), 9.0)) and meta == {"again": True}
    with pytest.raises(CheckpointError, match=r"w1.safetensors: not in the site's manifest \(it lists workers \[0\]\)"):
        store.load_worker(3, 1, 1)
    assert sorted(p.name for p in found.path.iterdir()) == ["site0", "site1"]  # nothing left aside
    _assert_worker(store, 3, 0, 1)


def test_a_round_mixing_two_launches_is_not_used(tmp_path: Path) -> None:
    first = CheckpointStore(tmp_path, launch="first")
    for r in (1, 2):
        _write_round(first, r)
    # A second launch (resumed from round 1, say) re-takes round 2, but only site 0 commits before it stops.
    second = CheckpointStore(tmp_path, launch="second")
    _write_site(second, 2, 0)
    found = second.latest(SITES)
    assert found.round == 1
    assert found.warnings == ["round 2, site1/manifest.json: written by launch 'first', site0's by 'second' "
                              "(stopped while re-taking this round); using round 1"]
    assert second.prune() == []  # round 2 is not complete, so it does not count as one to keep


def test_begin_round_clears_a_stale_staging_dir_and_the_site_s_abandoned_newer_parts(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    for r in (1, 2, 3):
        _write_round(store, r)
    staging = store.root / "round-000004" / ".site0.staging"
    staging.mkdir(parents=True)
    for name in ("w0.safetensors", "w5.safetensors", ".w1.safetensors.0123.tmp", "manifest.json"):
        (staging / name).write_bytes(b"left by a crash")

    store.begin_round(4, 0)
    assert staging.is_dir() and list(staging.iterdir()) == []
    store.commit_site(4, 0, [store.write_worker(4, 0, 0, {"x": torch.ones(1)})])
    assert sorted(p.name for p in (store.root / "round-000004" / "site0").iterdir()) == ["manifest.json",
                                                                                         "w0.safetensors"]

    # Resumed from round 1: taking round 2 again drops this site's parts of rounds 3 and 4, which belong to the
    # abandoned trajectory; the other site's parts stay until it begins round 2 itself.
    store.begin_round(2, 0)
    assert not (store.root / "round-000003" / "site0").exists() and (store.root / "round-000003" / "site1").exists()
    assert not (store.root / "round-000004" / "site0").exists()
    assert (store.root / "round-000002" / "site0").is_dir()  # replaced only when the new part is committed
    assert store.latest(SITES).round == 2


def test_prune_keeps_the_newest_complete_rounds_and_clears_leftovers(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    for r in (1, 2, 3):
        _write_round(store, r)
    _write_site(store, 4, 0)
    _write_site(store, 4, 1, commit=False)  # round 4: site 1 never finished
    _write_round(store, 5)
    (store.root / "round-000003" / ".site0.staging").mkdir()  # a leftover in a round that is kept
    _write_site(store, 6, 0)
    _write_site(store, 6, 1, commit=False)  # round 6: still being written, newer than the newest complete
    (store.root / ".deleting-round-000000-abc").mkdir()  # left by a prune that was killed

    assert store.prune() == [1, 2, 4]
    assert store.rounds() == [3, 5, 6]
    assert sorted(p.name for p in store.root.iterdir()) == ["round-000003", "round-000005", "round-000006"]
    assert sorted(p.name for p in (store.root / "round-000003").iterdir()) == ["site0", "site1"]
    assert (store.root / "round-000006" / ".site1.staging").is_dir()
    assert store.latest(SITES).round == 5
    assert store.prune() == []

    _write_round(store, 7)
    store.keep = 1
    assert store.prune() == [3, 5, 6]
    assert store.rounds() == [7]


def test_two_sites_pruning_the_same_directory_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site0, site1 = CheckpointStore(tmp_path, keep=2), CheckpointStore(tmp_path, keep=2)
    for r in range(1, 6):
        _write_round(site0, r)
    # Site 1 lists the rounds, then site 0 prunes everything old before site 1 looks at any of them.
    real_complete, pruned_by_0 = site1._complete, []

    def racing(round: int, path: Path) -> bool:
        if not pruned_by_0:
            pruned_by_0.append(site0.prune())
        return real_complete(round, path)

    monkeypatch.setattr(site1, "_complete", racing)
    assert site1.prune() == []
    assert pruned_by_0 == [[1, 2, 3]]
    assert site0.rounds() == [4, 5]


def test_commit_without_the_worker_files_is_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.begin_round(1, 0)
    good = store.write_worker(1, 0, 0, {"x": torch.ones(1)})
    missing = FileRecord(name="w1.safetensors", size=10, sha256="0" * 64)
    with pytest.raises(CheckpointError, match=r"w1.safetensors is missing at commit"):
        store.commit_site(1, 0, [good, missing])
    with pytest.raises(ValueError, match="same worker's file twice"):
        store.commit_site(1, 0, [good, good])
    assert store.rounds() == []
    with pytest.raises(ValueError, match="keep must be"):
        CheckpointStore(tmp_path, keep=0)
    with pytest.raises(ValueError, match="round must be an integer >= 0"):
        store.begin_round(-1, 0)
