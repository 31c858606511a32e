"""Round-by-round simulation of a multi-site run, for what the closed-form plan cannot capture.

The formula in ``geotrain.planner.model`` gives steady-state averages. This simulation plays a run forward
one *round* at a time (one step for DDP, H inner steps for DiLoCo and Streaming DiLoCo) and adds:

* **Heterogeneous, noisy sites.** Each site computes its share at its own speed, optionally with per-round
  noise (``jitter``, the coefficient of variation of a site's round time). Every sync waits for the slowest
  live site, so noise costs more than its mean: E[max] > max E.
* **Power caps.** A site runs only the accelerators its cap can feed: min(planned, floor(cap / (W * PUE))).
* **Failures.** Each site fails after an exponential time with mean ``mtbf_hours``. Two recovery models:

  - ``restart`` (the default; classic checkpoint/restart): any failure stops every site, rolls the job back
    to its last checkpoint and costs ``restart_hours``. Checkpoints are taken every N rounds, N being
    ``checkpoint_every_hours`` over the full-membership round time, as trainers checkpoint every N steps.
  - ``elastic`` (after DiLoCo's robustness to dropped workers, arXiv 2311.08105; what geotrain's elastic
    membership is to do, while training today stops on a failure): the failed site loses its work since
    its last sync; the others finish the round without it, pay ``rebuild_seconds`` to rebuild the
    cross-site group, and go on with a smaller global batch. The failed site is down ``restart_hours`` and
    rejoins at the next round boundary, healed from its peers.

The settings are the configuration's ``[simulate]`` section (``geotrain.config.SimulateConfig``).

Everything random comes from one ``numpy.random.Generator`` seeded with ``seed``: the same inputs give the
same run. Rounds between two events (a failure, a rejoin, a checkpoint) are processed as numpy blocks, so
a million DDP steps cost a few blocks, not a million Python iterations. With no jitter and no failures the
simulation reproduces the formula exactly where a run ends on a sync point (DDP, blocking DiLoCo); for
overlapped DiLoCo and Streaming DiLoCo the formula also charges the end of the run (the last transfer, the
final sync of every fragment), which the simulation leaves out. The tests check both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from geotrain.algorithms.timing import lognormal_sigma, period_seconds
from geotrain.config import SimulateConfig
from geotrain.errors import ConfigError
from geotrain.planner.model import PlanSpec, resolve, site_step_seconds, sync_comm

__all__ = ["SimulationResult", "mtbf_seconds", "simulate"]

_BLOCK = 1 << 16  # rounds sampled at once between events
_MAX_EVENTS = 500_000
_MAX_BLOCKS = 2_000  # rounds a simulation plays without failures: 2,000 blocks of 65,536 take a few seconds


def mtbf_seconds(sim: SimulateConfig, sites: int) -> np.ndarray:
    """Each site's mean time between failures in seconds (inf: never fails)."""
    if isinstance(sim.mtbf_hours, list):
        if len(sim.mtbf_hours) != sites:
            raise ConfigError(f"{len(sim.mtbf_hours)} MTBF values for {sites} sites; give one number or one per site",
                              field="simulate.mtbf_hours")
        values = sim.mtbf_hours
    else:
        values = [sim.mtbf_hours] * sites
    return np.array([math.inf if not v else float(v) * 3600.0 for v in values])


@dataclass(kw_only=True, slots=True)
class SimulationResult:
    """What a simulated run did."""

    seed: int
    rounds: int
    """Rounds computed, rolled-back ones included (a round is one step for ddp, H inner steps otherwise)."""
    time_to_train_seconds: float
    utilization: float
    """Effective utilization: useful (kept) compute over wall time, mean over sites."""
    failures: int
    lost_progress_hours: float
    """Site-hours of progress thrown away by failures: since the last checkpoint for every site (restart),
    since its last sync for the failed site (elastic)."""
    lost_compute_hours: float
    """The compute part of that progress, in site-hours."""
    downtime_hours: float
    """Site-hours spent down or restarting."""
    energy_mwh: float
    """Energy over the run; a site draws its power for the whole run, down or not."""
    per_site: list[dict] = field(default_factory=list)

    @property
    def lost_hours(self) -> float:
        """Lost progress plus downtime, in site-hours."""
        return self.lost_progress_hours + self.downtime_hours

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "rounds": self.rounds,
            "time_to_train_seconds": self.time_to_train_seconds,
            "time_to_train_days": self.time_to_train_seconds / 86400.0,
            "utilization": self.utilization,
            "failures": self.failures,
            "lost_hours": self.lost_hours,
            "lost_progress_hours": self.lost_progress_hours,
            "lost_compute_hours": self.lost_compute_hours,
            "downtime_hours": self.downtime_hours,
            "energy_mwh": self.energy_mwh,
            "per_site": [dict(s) for s in self.per_site],
        }


def simulate(spec: PlanSpec, sim: SimulateConfig | None = None) -> SimulationResult:
    """Play ``spec`` forward round by round under ``sim``'s noise, caps and failures (its configuration's
    ``[simulate]`` section by default)."""
    sim = spec.config.simulate if sim is None else sim
    spec, _ = resolve(spec)
    rng = np.random.default_rng(sim.seed)
    pattern = spec.algorithm.pattern(spec.config, spec.model.layout)
    k = len(spec.sites)

    # Power caps limit what runs; the formula plans what was asked and only flags it.
    active = [
        site.accelerators if site.powered_under_cap is None else min(site.accelerators, site.powered_under_cap)
        for site in spec.sites
    ]
    for site, n in zip(spec.sites, active, strict=True):
        if n < 1:
            raise ConfigError(f"site {site.name!r}: its cap of {site.power_cap_mw:g} MW powers no "
                              f"{site.accelerator.name}, so the simulation has nothing to run there; raise the cap",
                              field="sites.power_cap_mw")
    step_c = np.array(site_step_seconds(spec, accelerators=active))
    round_steps = pattern.round_steps
    periods_per_round = round_steps / pattern.period_steps  # 1, except P fragment syncs per streaming round
    round_compute = step_c * round_steps
    round_tokens = np.array(spec.shares()) * spec.model.batch_tokens * round_steps
    total_tokens = spec.model.tokens
    mtbf = mtbf_seconds(sim, k)
    restart_s = sim.restart_hours * 3600.0
    checkpoint_s = sim.checkpoint_every_hours * 3600.0
    sigma = lognormal_sigma(sim.jitter)

    def draw_failure(now: float, i: int) -> float:
        return now + rng.exponential(mtbf[i]) if math.isfinite(mtbf[i]) else math.inf

    comm_cache: dict[tuple[int, ...], float] = {}

    def comm_seconds(members: tuple[int, ...]) -> float:
        if members not in comm_cache:
            comm_cache[members] = sync_comm(spec, members=list(members)).seconds if len(members) > 1 else 0.0
        return comm_cache[members]

    t = 0.0
    tokens = 0.0
    rounds = 0  # rounds computed, rolled-back ones included
    alive = np.ones(k, dtype=bool)
    down_until = np.zeros(k)
    failed_at = np.zeros(k)
    next_fail = np.array([draw_failure(0.0, i) for i in range(k)])
    useful = np.zeros(k)  # compute seconds whose result the model kept, per site
    lost_compute = np.zeros(k)  # compute seconds thrown away
    lost_wall = np.zeros(k)  # wall seconds of progress thrown away
    downtime = np.zeros(k)
    failures = np.zeros(k, dtype=int)
    # Trainers checkpoint every N steps, not every N seconds: N rounds of the full-membership round time.
    full_round = float(period_seconds(pattern, step_seconds=step_c.max(), comm_seconds=comm_seconds(tuple(range(k))))) * periods_per_round
    ckpt_rounds = max(1, round(checkpoint_s / full_round))
    rate = float(np.sum(1.0 / mtbf))
    rounds_needed = total_tokens / float(round_tokens.sum())
    if rounds_needed / _BLOCK > _MAX_BLOCKS:
        raise ConfigError(
            f"the run is {rounds_needed:,.3g} rounds long, too many to simulate one by one (the formula's figures "
            "stand without failures); plan fewer tokens or a larger batch (--batch-tokens)", field="run.tokens")
    expected_failures = rate * rounds_needed * full_round
    if expected_failures > _MAX_EVENTS / 10:
        raise ConfigError(
            f"the run would meet about {expected_failures:,.0f} failures in its {rounds_needed * full_round / 86400:,.3g} "
            "days without them, too many to simulate one by one: raise mtbf_hours, or make the run shorter "
            "(a faster link with --link, more accelerators, fewer tokens)",
            field="simulate.mtbf_hours",
        )
    if sim.recovery == "restart":
        # A checkpoint is kept only if no site fails before it: with failures at a combined rate r, the chance
        # that an interval of ckpt_rounds rounds passes clean is exp(-r * interval). Below 1e-6 the run would need
        # about a million restarts per checkpoint: say so now instead of simulating them.
        interval = ckpt_rounds * full_round
        if rate * interval > math.log(1e6):
            raise ConfigError(
                f"the simulated run cannot keep a checkpoint: one checkpoint interval ({interval / 3600:.3g} h of "
                f"rounds) is {rate * interval:.3g} times the mean time between failures of any site "
                f"({1 / rate / 3600:.3g} h). Raise mtbf_hours, shorten checkpoint_every_hours or the round time "
                "(a faster link: --link), or use recovery = 'elastic'",
                field="simulate.mtbf_hours",
            )
    progress = 0  # rounds of kept progress (restored on a rollback)
    ckpt_t, ckpt_progress, ckpt_tokens, ckpt_useful = 0.0, 0, 0.0, useful.copy()

    events = 0
    while tokens < total_tokens * (1 - 1e-12):
        events += 1
        if events > _MAX_EVENTS:
            fix = ("shorten checkpoint_every_hours or use recovery = 'elastic'" if sim.recovery == "restart"
                   else "shorten restart_hours")
            raise ConfigError(
                f"the simulated run makes no headway: failures come faster than work is kept. Raise mtbf_hours or {fix}",
                field="simulate.mtbf_hours",
            )
        if not alive.all() and (down_until[~alive] <= t).any():
            _rejoin(t, alive, down_until, failed_at, downtime, next_fail, draw_failure)
            t += sim.rebuild_seconds  # the group is rebuilt with the joiner
        members = tuple(int(i) for i in np.flatnonzero(alive))
        if not members:  # every site is down: wait for the first to come back
            t = float(down_until[~alive].min())
            continue
        m = np.array(members)
        # A site that "failed" during a stall (a rebuild, a restart) fails now, at the round boundary.
        next_fail[m] = np.maximum(next_fail[m], t)
        comm = comm_seconds(members)
        tokens_per_round = float(round_tokens[m].sum())
        remaining = math.ceil((total_tokens - tokens) / tokens_per_round - 1e-9)
        fail_t = float(next_fail[m].min())
        rejoin_t = float(down_until[~alive].min()) if not alive.all() else math.inf
        horizon = min(fail_t, rejoin_t)
        typical = float(period_seconds(pattern, step_seconds=step_c[m].max(), comm_seconds=comm)) * periods_per_round
        n = min(remaining, _BLOCK)
        if math.isfinite(horizon):  # sample little more than reaches the next event
            n = min(n, max(1, math.ceil((horizon - t) / typical * 1.25) + 2))

        # A block of rounds: (n, members) compute times; each round is gated by its slowest live site.
        noise = rng.lognormal(-0.5 * sigma**2, sigma, size=(n, len(members))) if sim.jitter > 0 else 1.0
        comp = round_compute[m] * noise * np.ones((n, 1))
        walls = period_seconds(pattern, step_seconds=comp.max(axis=1) / round_steps, comm_seconds=comm) * periods_per_round
        ends = t + np.cumsum(walls)

        n_clean = int(np.searchsorted(ends, fail_t, side="right"))  # rounds that end before the failure
        n_done = min(n, int(np.searchsorted(ends, rejoin_t, side="left")) + 1)  # stop where a site rejoins
        completed = min(n_clean, n_done)
        if sim.recovery == "restart":
            # The latest checkpoint among the rounds this block completes (one every ckpt_rounds rounds).
            last_ckpt = (progress + completed) // ckpt_rounds * ckpt_rounds
            if last_ckpt > progress:
                last = last_ckpt - progress - 1  # block index of the checkpointed round
                ckpt_t, ckpt_progress = float(ends[last]), last_ckpt
                ckpt_tokens = tokens + (last + 1) * tokens_per_round
                ckpt_useful = useful.copy()
                ckpt_useful[m] += comp[: last + 1].sum(axis=0)

        useful[m] += comp[:completed].sum(axis=0)
        tokens += completed * tokens_per_round
        rounds += completed
        progress += completed
        if n_clean >= n_done:  # no failure in this block
            t = float(ends[n_done - 1])  # a site whose restart is over rejoins at the top of the loop
            continue

        # A failure in round n_clean, which started at `start`.
        start = float(ends[n_clean - 1]) if n_clean else t
        elapsed = fail_t - start
        jj = int(np.argmin(next_fail[m]))
        j = members[jj]
        failures[j] += 1
        rounds += 1
        if sim.recovery == "elastic":
            # The failed site keeps what it synced: everything up to its last sync inside this round
            # (earlier fragment syncs for streaming); the rest is lost. The others finish the round without it.
            period_w = float(walls[n_clean]) / periods_per_round
            done_j = min(elapsed, float(comp[n_clean, jj]))
            since_sync = elapsed % period_w
            lost_j = min(since_sync, done_j)
            useful[j] += done_j - lost_j
            lost_compute[j] += lost_j
            lost_wall[j] += since_sync
            tokens += round_tokens[j] * (done_j - lost_j) / float(comp[n_clean, jj])
            others = [i for i in range(len(members)) if i != jj]
            if others:
                useful[m[others]] += comp[n_clean, others]
                tokens += float(round_tokens[m[others]].sum())
                progress += 1
                t = float(ends[n_clean]) + sim.rebuild_seconds
            else:
                t = fail_t
            alive[j] = False
            failed_at[j] = fail_t
            down_until[j] = fail_t + restart_s
            next_fail[j] = math.inf
        else:
            # Every site rolls back to the last checkpoint; the partial round is lost too.
            partial = np.minimum(elapsed, comp[n_clean])
            lost_compute[m] += (useful[m] - ckpt_useful[m]) + partial
            lost_wall[m] += fail_t - ckpt_t
            useful[:] = ckpt_useful
            tokens, progress = ckpt_tokens, ckpt_progress
            t = fail_t + restart_s
            downtime += restart_s
            for i in range(k):  # memoryless: redrawing from the restart is exact
                next_fail[i] = draw_failure(t, i)
            ckpt_t = t  # the restored state counts as the latest checkpoint

    for i in np.flatnonzero(~alive):  # still down when the run ends
        downtime[i] += t - failed_at[i]

    energy = [n * site.watts * site.pue * t / 3.6e9 for site, n in zip(spec.sites, active, strict=True)]
    per_site = [
        {
            "name": site.name,
            "accelerators_active": active[i],
            "failures": int(failures[i]),
            "utilization": float(useful[i] / t) if t > 0 else 0.0,
            "lost_progress_hours": float(lost_wall[i] / 3600.0),
            "lost_compute_hours": float(lost_compute[i] / 3600.0),
            "downtime_hours": float(downtime[i] / 3600.0),
            "energy_mwh": energy[i],
        }
        for i, site in enumerate(spec.sites)
    ]
    return SimulationResult(
        seed=sim.seed,
        rounds=rounds,
        time_to_train_seconds=t,
        utilization=float(useful.sum() / (k * t)) if t > 0 else 0.0,
        failures=int(failures.sum()),
        lost_progress_hours=float(lost_wall.sum() / 3600.0),
        lost_compute_hours=float(lost_compute.sum() / 3600.0),
        downtime_hours=float(downtime.sum() / 3600.0),
        energy_mwh=float(sum(energy)),
        per_site=per_site,
    )


def _rejoin(now, alive, down_until, failed_at, downtime, next_fail, draw_failure) -> None:
    """Sites whose restart is over rejoin at this round boundary, healed from their peers."""
    for i in np.flatnonzero(~alive & (down_until <= now)):
        alive[i] = True
        downtime[i] += now - failed_at[i]
        next_fail[i] = draw_failure(now, int(i))
