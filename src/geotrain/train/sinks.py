"""Live metric sinks: a site's records as scalar series for an experiment tracker (TensorBoard).

The :class:`~geotrain.train.recorder.Recorder` hands every record it writes to its sinks as well, so a sink
sees exactly what ``OUT/sites/siteK.jsonl`` holds, as it is written. :func:`scalar_series` turns a record into
scalars: one *run* per site (``site0``, ``site1``, ...) from its ``step`` records, and one for the whole run
(``global``) from the ``eval`` records the lowest member writes. Tags are the same in every run, so a tracker
overlays them:

- ``loss/train`` (sites): training loss of the site's last batch; ``loss/eval`` (global): held-out loss of the
  global model;
- ``optim/lr`` (sites): the inner learning rate;
- ``progress/tokens``, ``progress/outer_rounds``: tokens trained per site (in ``global``, by all sites) and
  outer rounds completed;
- ``wan/bytes``: bytes sent over the WAN (by the site; in ``global``, by all sites);
- ``time/utilization``, ``time/compute_seconds``, ``time/comm_wait_seconds`` (sites) and
  ``time/wall_seconds``: compute over wall time, compute time, time blocked on cross-site syncs and training
  wall time, so far;
- in a run that models its sites' power (sites): ``power/draw_mw`` (the site's draw while the step computed),
  ``power/cap_mw`` (the grid's power available to it), ``power/energy_mwh`` (its energy so far) and
  ``time/throttled_seconds`` (training seconds its compute was held back by its power or speed, so far).

Values are the records' own: a healed site's bytes and times count from its admission, as its records do.
Every series is keyed by the inner step (``step`` in the records, from 0), the same on every site, and
TensorBoard keeps each value as a 32-bit float.

A site that resumes from a checkpoint or is healed goes on from an earlier step than its files may hold:
:meth:`ScalarSink.restart` says so, and the points it writes from there replace the old ones (TensorBoard drops
the old ones at the session start each new event file begins with).

A new tracker is a subclass of :class:`ScalarSink` with ``add`` (and ``flush``/``close``): see
:class:`TensorBoardSink`. Nothing here imports TensorBoard until a :class:`TensorBoardSink` is made.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from geotrain.errors import ConfigError

__all__ = ["FLUSH_SECONDS", "GLOBAL_RUN", "ScalarSink", "Sink", "TensorBoardSink", "check_tensorboard",
           "require_tensorboard", "scalar_series"]

GLOBAL_RUN = "global"
FLUSH_SECONDS = 5
"""Longest a scalar waits in memory before it reaches the event file (TensorBoard shows it on its next reload)."""

# (record field, tag) per record kind; the run is the record's site, or the global one for evaluations.
_SITE_TAGS = (("loss", "loss/train"), ("lr", "optim/lr"), ("tokens", "progress/tokens"),
              ("outer_rounds", "progress/outer_rounds"), ("wan_bytes", "wan/bytes"),
              ("utilization", "time/utilization"), ("compute_s", "time/compute_seconds"),
              ("comm_s", "time/comm_wait_seconds"), ("wall_s", "time/wall_seconds"),
              ("power_mw", "power/draw_mw"), ("cap_mw", "power/cap_mw"), ("energy_mwh", "power/energy_mwh"),
              ("throttled_s", "time/throttled_seconds"))
_GLOBAL_TAGS = (("eval_loss", "loss/eval"), ("tokens", "progress/tokens"), ("outer_rounds", "progress/outer_rounds"),
                ("wan_bytes", "wan/bytes"), ("wall_s", "time/wall_seconds"))


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def scalar_series(record: Mapping[str, Any]) -> list[tuple[str, int, dict[str, float]]]:
    """The scalars one record adds: ``[(run, step, {tag: value})]``; empty for kinds that carry none. A
    figure the record lacks (or wrote as null, a non-finite value) is left out."""
    kind, step = record.get("kind"), record.get("step")
    if kind == "step":
        run, tags = f"site{record.get('site')}", _SITE_TAGS
    elif kind == "eval":
        run, tags = GLOBAL_RUN, _GLOBAL_TAGS
    else:
        return []
    if not _number(step):
        return []
    values = {tag: float(record[key]) for key, tag in tags if _number(record.get(key))}
    return [(run, int(step), values)] if values else []


class Sink:
    """Where a site's records go besides its JSONL file. ``record`` gets each record as written (non-finite
    floats already null)."""

    def record(self, record: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None


class ScalarSink(Sink):
    """A sink of scalar series (:func:`scalar_series`). Subclasses implement ``add`` and may override
    ``restart``, ``flush`` and ``close``."""

    def __init__(self) -> None:
        self._last_eval_step: int | None = None

    def record(self, record: Mapping[str, Any]) -> None:
        kind = record.get("kind")
        if kind in ("resumed", "healed") and _number(record.get("step")):
            # the state is that of this step: what follows is written anew (by every site after a resume)
            self.restart(int(record["step"]) + 1, whole_run=kind == "resumed")
        for run, step, values in scalar_series(record):
            self.add(run, step, values, wall_time=record.get("time"))
            if run == GLOBAL_RUN:
                self._last_eval_step = step
        if kind == "done":
            self._final_eval(record)
        if kind in ("eval", "done"):
            self.flush()

    def _final_eval(self, done: Mapping[str, Any]) -> None:
        """A run stopped by its time budget between evaluations evaluates once more at the end; that loss is
        in the ``done`` record only. The site that wrote the evaluations adds it to the global series."""
        steps, loss = done.get("steps"), done.get("eval_loss")
        if self._last_eval_step is None or not _number(steps) or not _number(loss):
            return
        if int(steps) - 1 > self._last_eval_step:
            self.add(GLOBAL_RUN, int(steps) - 1, {"loss/eval": float(loss)}, wall_time=done.get("time"))
            self._last_eval_step = int(steps) - 1

    def add(self, run: str, step: int, values: dict[str, float], *, wall_time: float | None) -> None:
        """Write ``values`` (tag to value) at ``step`` of ``run``."""
        raise NotImplementedError

    def restart(self, step: int, *, whole_run: bool) -> None:
        """The site goes on from ``step``: points from there on replace earlier ones, in the site's own series
        (a heal, a resume) and with ``whole_run`` in the global one too (a resume: the run went back)."""
        return None


def _missing(detail: str) -> ConfigError:
    return ConfigError(f"needs the tensorboard package, which is not installed ({detail}); install it with "
                       "pip install 'geotrain[tensorboard]', or drop --tensorboard", field="run.tensorboard")


def check_tensorboard() -> None:
    """ConfigError saying how to install TensorBoard when it is not installed; imports nothing (the
    launcher's check before any worker starts)."""
    if importlib.util.find_spec("tensorboard") is None:
        raise _missing("no module named 'tensorboard'")


def require_tensorboard() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``, or ConfigError saying how to install TensorBoard."""
    check_tensorboard()
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise _missing(str(e)) from None
    return SummaryWriter


class TensorBoardSink(ScalarSink):
    """Scalars as TensorBoard event files: ``root/siteK/`` for this site, ``root/global/`` for the run's
    evaluations (written by the lowest member). Each process adds its own event files; TensorBoard reads all
    the files of a run's directory in order. Watch them with ``tensorboard --logdir OUT/tensorboard``."""

    def __init__(self, root: Path, *, flush_secs: int = FLUSH_SECONDS) -> None:
        super().__init__()
        self._summary_writer = require_tensorboard()
        self.root = Path(root)
        self.flush_secs = flush_secs
        self._writers: dict[str, Any] = {}
        self._restart_site: int | None = None
        self._restart_run: int | None = None

    def _writer(self, run: str, step: int) -> Any:
        w = self._writers.get(run)
        if w is None:
            # Every file begins with a session start at the first step it holds (purge_step): TensorBoard drops
            # the points the directory's earlier files hold from that step on, which after a restart are stale.
            # A file that does not restart anything starts where its series goes on, and drops nothing.
            restart = self._restart_run if run == GLOBAL_RUN else self._restart_site
            w = self._summary_writer(log_dir=str(self.root / run), flush_secs=self.flush_secs,
                                     purge_step=step if restart is None else min(step, restart))
            self._writers[run] = w
        return w

    def add(self, run: str, step: int, values: dict[str, float], *, wall_time: float | None) -> None:
        w = self._writer(run, step)
        for tag, value in values.items():
            w.add_scalar(tag, value, global_step=step, walltime=wall_time)

    def restart(self, step: int, *, whole_run: bool) -> None:
        self.close()  # the next points go to new files that begin with the restart
        self._restart_site = step
        if whole_run:
            self._restart_run = step

    def flush(self) -> None:
        for w in self._writers.values():
            w.flush()

    def close(self) -> None:
        writers, self._writers = self._writers, {}
        for w in writers.values():
            w.close()
