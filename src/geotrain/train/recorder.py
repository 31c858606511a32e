"""Per-site metrics records, one JSON object per line.

Each site's first worker appends to ``OUT/sites/siteK.jsonl`` and flushes every record, so the launcher can
show live progress and still build a partial summary when a run is interrupted or a site crashes.
Record kinds: ``start`` (again after a site is healed or resumed), ``step``, ``eval`` (the lowest member
only), ``sync`` (one per cross-site transfer, numbered in ``transfer``), ``membership`` (sites left),
``rejected`` (an update the guards left out), ``retry`` (a sync tried again), ``healed``, ``admitted``,
``evicted``, ``resumed``, ``fault``/``fault_due`` (injected faults), ``power_off``/``power_on`` (a site whose
grid power failed and came back), ``left``, ``warning``, ``done``, ``error`` and ``interrupted``.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

__all__ = ["Recorder"]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; a missing figure is null
    return value


class Recorder:
    """Appends records to a JSONL file; a Recorder without a path drops them (workers other than the first).
    ``sinks`` (``geotrain.train.sinks``) get each record as written too (TensorBoard); a sink that fails is
    dropped with a ``warning`` record, and training goes on."""

    def __init__(self, path: Path | None, *, sinks: list[Any] | None = None) -> None:
        self.path = path
        self.sinks: list[Any] = list(sinks or [])
        self._file = None
        self._transfers = 0
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8", buffering=1)

    def write(self, kind: str, **fields: Any) -> None:
        if self._file is None:
            return
        record = {"kind": kind, "time": time.time(), **{k: _clean(v) for k, v in fields.items()}}
        self._file.write(json.dumps(record) + "\n")
        for sink in list(self.sinks):
            try:
                sink.record(record)
            except Exception as e:  # noqa: BLE001 - a tracker's failure must not stop training
                self._drop(sink, e, site=record.get("site"))

    def _drop(self, sink: Any, error: BaseException, *, site: Any) -> None:
        self.sinks.remove(sink)
        with contextlib.suppress(Exception):
            sink.close()
        self.write("warning", site=site, message=f"{type(sink).__name__} stopped: {type(error).__name__}: {error}")

    def step(self, *, step: int, tokens: int, loss: float, lr: float, timer: Any, comm: Any, outer_rounds: int,
             site: int, trained_tokens: int = 0, **extra: Any) -> None:
        """One ``step`` record; ``extra``: what pacing adds (``Pace.fields``: power draw and cap, energy)."""
        wall = timer.wall()
        self.write(
            "step",
            site=site,
            step=step,
            tokens=tokens,
            loss=loss,
            lr=lr,
            wall_s=wall,
            compute_s=timer.compute,
            comm_s=comm.stats.wait_seconds,
            wan_bytes=comm.stats.bytes_sent * comm.workers,
            outer_rounds=outer_rounds,
            utilization=timer.utilization(),
            trained_tokens=trained_tokens,
            **({"throttled_s": timer.throttled} if timer.throttled else {}),
            **({"powered_off_s": timer.powered_off} if timer.powered_off else {}),
            **extra,
        )

    def syncs(self, events: list[dict[str, Any]], *, step: int, site: int, wall: float) -> None:
        for e in events:
            self.write("sync", site=site, step=step, transfer=self._transfers, wall_s=wall, **e)
            self._transfers += 1

    def outcomes(self, comm: Any, *, step: int, site: int, wall: float) -> None:
        """What the syncs waited for decided besides their means: sites that left, updates left out, retries."""
        for o in comm.outcomes:
            if o.left:
                self.write("membership", site=site, step=step, wall_s=wall, sync=o.sync, generation=o.generation,
                           members=o.members, left=o.left, regroup_seconds=o.regroup_seconds)
            for r in o.rejected:
                self.write("rejected", site=site, step=step, wall_s=wall, sync=o.sync, key=o.key, round=comm.round,
                           rejected_site=r.site, reason=r.reason, norm=r.norm)
            if o.attempts > 1:
                self.write("retry", site=site, step=step, wall_s=wall, sync=o.sync, attempts=o.attempts,
                           errors=o.errors)
        comm.outcomes.clear()

    def eval(self, **fields: Any) -> None:
        self.write("eval", **{("wall_s" if k == "wall" else k): v for k, v in fields.items()})

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        for sink in list(self.sinks):
            try:
                sink.flush()
            except Exception as e:  # noqa: BLE001
                self._drop(sink, e, site=None)

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            with contextlib.suppress(Exception):  # the records are safe in the JSONL file
                sink.close()
        if self._file is not None:
            self._file.close()
            self._file = None
