"""How long a run takes: the one timing model behind ``geotrain plan``, every run's predicted utilization and
the overlap settings a run chooses for itself. Pure Python and numpy (no torch).

An algorithm describes its traffic as a :class:`~geotrain.algorithms.base.SyncPattern`: a sync every
``period_steps`` inner steps, whose result is needed ``hide_steps`` inner steps after it starts. With compute
``c`` per inner step (the slowest site's: synchronous points wait for it) and ``t`` seconds per sync, one
period lasts

    period = max(period_steps * c + max(0, t - hide_steps * c), t)

because the sync hides behind ``hide_steps`` steps of compute and the link carries one sync at a time. DDP
(every step, blocking): c + t. DiLoCo (arXiv 2311.08105), H steps then a blocking sync: H c + t; overlapped
with the next round: max(H c, t). Streaming DiLoCo (arXiv 2501.18512), one fragment every H/P steps hidden
behind tau steps: max(H/P c + max(0, t - tau c), t).

Two terms come on top. **Stragglers**: at a blocking sync every site waits for the slowest one *in that
period*; with each site's period time lognormal around its mean (coefficient of variation ``jitter``), a
period costs E[max over sites] rather than the largest mean (:func:`expected_slowest`). Overlapped syncs
absorb that spread. **The end of the run**: a run ends on one synchronised model, so a transfer that would
have hidden behind the next round has nothing to hide behind (``Algorithm.end_exposed``).

Utilization of a site is its compute over the run's wall time; the run's figure is the mean over sites, as
``summary.json`` defines ``utilization``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from geotrain.algorithms.base import AutoSetting
from geotrain.errors import ConfigError

if TYPE_CHECKING:
    from geotrain.algorithms.base import Algorithm, SyncPattern

__all__ = ["RunTiming", "choose_unset", "expected_slowest", "lognormal_sigma", "period_seconds", "predict_run",
           "run_timing", "sync_seconds"]


def period_seconds(pattern: SyncPattern, *, step_seconds: Any, comm_seconds: Any) -> Any:
    """Wall seconds of one sync period given the gating compute per step; element-wise on numpy arrays."""
    c, t = step_seconds, comm_seconds
    return np.maximum(pattern.period_steps * c + np.maximum(0.0, t - pattern.hide_steps * c), t)


def lognormal_sigma(cv: float) -> float:
    """The sigma of a lognormal factor with mean 1 and coefficient of variation ``cv`` (its mu is -sigma^2/2)."""
    return math.sqrt(math.log1p(cv * cv))


_ERF = np.frompyfunc(math.erf, 1, 1)


def expected_slowest(means: Sequence[float], cv: float) -> float:
    """E[max_k X_k] for independent lognormal X_k with means ``means`` and one coefficient of variation ``cv``:
    the expected wall time of a period that waits for the slowest of several sites; ``cv = 0`` gives
    ``max(means)``, and the result is never below it.

    E[max] is the integral over x > 0 of 1 - prod_k F_k(x). Below ``lo`` (9 sigma under the largest mean, in
    log space) the slowest site has not finished, so the integrand is 1; above ``hi`` (9 sigma over it) every
    site has. In between the integral is taken over u = log x on a uniform grid, which keeps its accuracy
    (about 1e-8 relative) from tiny spreads to cv of several."""
    top = max(means)
    if cv <= 0 or len(means) < 2 or top <= 0:
        return float(top)
    sigma = lognormal_sigma(cv)
    mid = math.log(top) - sigma * sigma / 2
    u = np.linspace(mid - 9 * sigma, mid + 9 * sigma, 4001)
    cdf = np.ones_like(u)
    for m in means:
        if m > 0:
            z = (u - (math.log(m) - sigma * sigma / 2)) / (sigma * math.sqrt(2.0))
            cdf *= 0.5 * (1.0 + _ERF(z).astype(float))
    f = (1.0 - cdf) * np.exp(u)
    integral = (u[1] - u[0]) * (f.sum() - 0.5 * (f[0] + f[-1]))
    return max(float(top), math.exp(u[0]) + float(integral))


@dataclass(kw_only=True, slots=True)
class RunTiming:
    """Where a run's wall time goes, predicted."""

    steps: int
    """Inner steps of the run."""
    syncs: int
    """Sync periods (DiLoCo rounds, Streaming DiLoCo fragment syncs, DDP steps); 0 for one site."""
    step_seconds: float
    """Compute per inner step, mean over sites."""
    slowest_step_seconds: float
    """Compute per inner step of the slowest site, which gates every synchronous point."""
    comm_seconds_per_sync: float
    """Duration of one sync over the links."""
    hidden_seconds_per_sync: float
    """Part of it hidden behind compute."""
    exposed_seconds_per_sync: float
    """Part of it that stalls compute."""
    exposed_seconds: float
    """All exposed communication, the end of the run included."""
    straggler_seconds: float
    """Waiting at blocking syncs for the slowest site of each period."""
    wall_seconds: float
    """Predicted training wall time."""
    utilization: float
    """Mean over sites of compute over wall time."""
    site_utilization: list[float] = field(default_factory=list)
    """Each site's compute over wall time."""

    @property
    def compute_seconds(self) -> float:
        """Compute of the mean site over the run."""
        return self.steps * self.step_seconds


def _checked_steps(step_seconds: Sequence[float]) -> list[float]:
    values = list(step_seconds)
    if not values:
        raise ConfigError("needs the compute seconds per step of at least one site", field="step_seconds")
    for v in values:
        if isinstance(v, bool) or not (isinstance(v, numbers.Real) and math.isfinite(v) and v > 0):
            raise ConfigError(f"must be positive seconds per inner step, got {v!r}", field="step_seconds")
    return [float(v) for v in values]


def run_timing(
    algorithm: Algorithm,
    config: Any,
    pattern: SyncPattern,
    *,
    steps: int,
    step_seconds: Sequence[float],
    comm_seconds: float,
    final_seconds: float = 0.0,
    jitter: float = 0.0,
    stopped_early: bool = False,
) -> RunTiming:
    """Predict the timing of ``steps`` inner steps of ``algorithm`` (configured by ``config``) whose sites
    compute ``step_seconds`` per inner step each (one figure per site, or one for all) and whose syncs take
    ``comm_seconds`` each (``final_seconds`` the pattern's final sync). ``jitter`` is the coefficient of
    variation of a site's compute between the loop's sync points; ``stopped_early`` is a run that a wall-time
    budget ended at a sync point."""
    per_site = _checked_steps(step_seconds)
    if isinstance(jitter, bool) or not (isinstance(jitter, numbers.Real) and math.isfinite(jitter) and jitter >= 0):
        raise ConfigError(f"must be zero or a positive coefficient of variation, got {jitter!r}", field="jitter")
    sites = int(config.run.sites)
    mean_step = sum(per_site) / len(per_site)
    gate = max(per_site)
    syncs = algorithm.sync_periods(config, steps, stopped_early=stopped_early) if sites > 1 else 0
    t = float(comm_seconds) if syncs else 0.0
    period_compute = pattern.period_steps * gate
    exposed_per_sync = float(period_seconds(pattern, step_seconds=gate, comm_seconds=t)) - period_compute
    # period - compute loses the last bits of t when compute dwarfs it; snap such crumbs to the exact split.
    exposed_per_sync = max(0.0, exposed_per_sync)
    if exposed_per_sync <= 1e-9 * t:
        exposed_per_sync = 0.0
    elif t - exposed_per_sync <= 1e-9 * t:
        exposed_per_sync = t
    exposed = syncs * exposed_per_sync
    straggler = 0.0
    if pattern.blocking and syncs > 0 and jitter > 0:
        # The spread is measured between the loop's sync points (round_steps); a period of period_steps steps
        # has sqrt(round / period) times the spread if steps vary independently.
        cv = jitter * math.sqrt(pattern.round_steps / pattern.period_steps)
        means = [pattern.period_steps * c for c in per_site] if len(per_site) == sites else [period_compute] * sites
        full_periods = min(syncs, int(steps // pattern.period_steps))  # a short last round is left out
        straggler = full_periods * (expected_slowest(means, cv) - period_compute)
    if syncs > 0:
        exposed += algorithm.end_exposed(config, steps=steps, step_seconds=gate, comm_seconds=t,
                                         final_seconds=float(final_seconds), exposed_per_sync=exposed_per_sync,
                                         stopped_early=stopped_early)
    wall = steps * gate + exposed + straggler
    site_utilization = [min(1.0, steps * c / wall) if wall > 0 else 1.0 for c in per_site]
    return RunTiming(
        steps=steps,
        syncs=syncs,
        step_seconds=mean_step,
        slowest_step_seconds=gate,
        comm_seconds_per_sync=t,
        hidden_seconds_per_sync=t - exposed_per_sync,
        exposed_seconds_per_sync=exposed_per_sync,
        exposed_seconds=exposed,
        straggler_seconds=straggler,
        wall_seconds=wall,
        utilization=min(1.0, steps * mean_step / wall) if wall > 0 else 1.0,
        site_utilization=site_utilization,
    )


def sync_seconds(config: Any, numel: int, *, topology: Any = None) -> float:
    """Seconds of one sync of ``numel`` values in the run ``config`` describes: its codec, collective, links
    and workers per site (``geotrain.comm.pattern.sync_cost``)."""
    from geotrain.comm.pattern import resolve_pattern, sync_cost

    topology = config.topology() if topology is None else topology
    codec = config.codec()
    pattern = resolve_pattern(config.comm.pattern, codec=codec, sites=config.run.sites)
    return sync_cost(numel, codec=codec, pattern=pattern, ring=topology.ring(), pairs=topology.pairs(),
                     workers=config.run.workers_per_site).seconds


CHECKPOINT_SECONDS = 300.0
"""The training time between checkpoints a run chooses when ``checkpoint.every_rounds`` is unset."""


def unset_settings(config: Any) -> list[str]:
    """Settings a run chooses itself from its measured step time: its algorithm's, and the checkpoint interval."""
    return config.algorithm().unset(config) + (["checkpoint.every_rounds"] if config.checkpoint.every_rounds is None
                                               else [])


def choose_unset(config: Any, layout: Any, *, step_seconds: float, topology: Any = None,
                 checkpoints: bool = False) -> tuple[Any, list]:
    """``config`` with the settings it leaves unset chosen by its algorithm (``Algorithm.auto_settings``) for the
    model ``layout`` and compute of ``step_seconds`` per inner step, and the choices with their reasons. With
    ``checkpoints`` (a run), the checkpoint interval too: about CHECKPOINT_SECONDS of training."""
    algorithm = config.algorithm()
    chosen = algorithm.auto_settings(
        config, layout, step_seconds=step_seconds,
        sync_seconds=lambda cfg, numel: sync_seconds(cfg, numel, topology=topology))
    if checkpoints and config.checkpoint.every_rounds is None:
        per_round = step_seconds * algorithm.round_steps(config)
        every = max(1, math.ceil(CHECKPOINT_SECONDS / per_round)) if per_round > 0 else 1
        chosen.append(AutoSetting("checkpoint.every_rounds", every,
                                  f"a round computes in {per_round:.3g} s: a checkpoint every {every} rounds is about "
                                  f"{every * per_round / 60:.1f} minutes of training"))
    if chosen:
        config = config.updated({a.key: a.value for a in chosen})
    return config, chosen


def predict_run(config: Any, *, payloads: Sequence[int] | None, steps: int, step_seconds: Sequence[float],
                jitter: float = 0.0, stopped_early: bool = False) -> RunTiming:
    """The timing of the run ``config`` describes (its unset settings already chosen), from its compute per
    inner step: what a run's summary reports as ``predicted_utilization``. ``payloads`` are the values of each
    sync as the run's strategy sent them (None: the algorithm's pattern of the configured model)."""
    algorithm = config.algorithm()
    pattern = algorithm.pattern(config, config.layout())
    if payloads:
        sizes = tuple(int(n) for n in payloads)
        pattern = dataclasses.replace(pattern, payloads=sizes,
                                      final_payload=sum(sizes) if pattern.final_payload else 0)
    comm = sync_seconds(config, pattern.mean_payload)
    final = sync_seconds(config, pattern.final_payload) if pattern.final_payload else 0.0
    return run_timing(algorithm, config, pattern, steps=steps, step_seconds=step_seconds, comm_seconds=comm,
                      final_seconds=final, jitter=jitter, stopped_early=stopped_early)
