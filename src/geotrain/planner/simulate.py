"""Round-by-round simulation of a multi-site run, for what the closed-form plan cannot capture.

The formula in ``geotrain.planner.model`` gives steady-state averages. This simulation plays a run forward
one *round* at a time (one step for DDP, H inner steps for DiLoCo and Streaming DiLoCo) and adds:

* **Heterogeneous, noisy sites.** Each site computes its share at its own speed, optionally with per-round
  noise (``jitter``, the coefficient of variation of a site's round time). Every sync waits for the slowest
  live site, so noise costs more than its mean: E[max] > max E.
* **Power caps.** A site runs only the accelerators its cap can feed: min(planned, floor(cap / (W * PUE))).
* **Failures.** Each site fails after an exponential time with mean ``mtbf_hours``. Two recovery models:

  - ``elastic`` (the default): what geotrain's elastic membership does (``geotrain.membership``,
    ``geotrain.comm.collectives``), which DiLoCo's robustness to dropped workers makes worth doing
    (arXiv 2311.08105). Every cost comes from the run's own configuration, with the definitions training uses:

    * *Detection.* A crash closes the site's connections and the coordinator drops it at once (0 s). A silent
      failure (a machine, power or network loss) is noticed ``membership.heartbeat_timeout_s`` after it; if
      it hits a sync, the survivors' transfer hangs until its deadline, ``transfer_floor_s + transfer_margin
      x`` the sync's predicted time (``geotrain.membership.deadlines``). ``silent_fraction`` sets the mix;
      1, every failure silent, is the default and the pessimistic case.
    * *The round in flight.* A failure during inner steps loses the failed site's work since its last sync;
      the survivors go on and wait at the next sync's quorum only for a detection that has not come yet. A
      failure mid-sync fails the commit vote: the attempt is lost for every site, and the sync is redone
      without the failed site (the survivors keep their pseudo-gradients; the failed site's round is lost,
      and with overlapped syncs the round that was travelling too).
    * *Re-forming.* The survivors build their cross-site group again on a new generation, and once more when
      the site joins: ``reform_seconds``, by default :data:`REFORM_ROUND_TRIPS` round trips of the slowest
      link among the members (:func:`reform_seconds`).
    * *Healing.* The failed site is down ``restart_hours``, waits for the next round boundary and is admitted;
      the lowest live site (the coordinator's choice) sends it its state point to point,
      :func:`heal_state_bytes` over the link between the two at the cost the WAN emulator charges
      (``geotrain.topology.point_to_point``). The next sync waits for the healer, so every site stalls that
      long; syncs in flight (overlapped DiLoCo, Streaming DiLoCo) are drained first. If every site is down at
      once, no live site is left to heal from: the run resumes from its last checkpoint, as training does.
    * While sites are down the survivors' global batch shrinks; with fewer than ``membership.min_sites``
      members the run waits for sites to come back.

  - ``restart`` (classic checkpoint/restart): any failure stops every site, rolls the job back to its last
    checkpoint and costs ``restart_hours``. Checkpoints are taken every N rounds, N being
    ``checkpoint_every_hours`` over the full-membership round time, as trainers checkpoint every N steps.

:func:`failure_costs` gives the per-event figures (detection, re-forming, healing) of a run configuration, so
that what a fault benchmark measures can be set beside what the planner predicts. The settings are the
configuration's ``[simulate]`` section (``geotrain.config.SimulateConfig``).

Everything random comes from one ``numpy.random.Generator`` seeded with ``seed``: the same inputs give the
same run. Rounds between two events (a failure, a rejoin, a checkpoint) are processed as numpy blocks, so
a million DDP steps cost a few blocks, not a million Python iterations. With no jitter and no failures the
simulation reproduces the formula exactly where a run ends on a sync point (DDP, blocking DiLoCo); for
overlapped DiLoCo and Streaming DiLoCo the formula also charges the end of the run (the last transfer, the
final sync of every fragment), which the simulation leaves out. The tests check both.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from geotrain.algorithms import ModelLayout
from geotrain.algorithms.timing import lognormal_sigma, period_seconds
from geotrain.config import Config, SimulateConfig
from geotrain.errors import ConfigError
from geotrain.membership.heal import heal_state_bytes as _heal_state_bytes
from geotrain.membership.heal import heal_transfer_seconds
from geotrain.planner.model import PlanSpec, plan_spec, resolve, site_step_seconds, sync_comm
from geotrain.topology import Topology

__all__ = [
    "REFORM_ROUND_TRIPS",
    "FailureCosts",
    "SimulationResult",
    "failure_costs",
    "heal_seconds",
    "heal_state_bytes",
    "hung_transfer_seconds",
    "mtbf_seconds",
    "reform_seconds",
    "simulate",
]

_BLOCK = 1 << 16  # rounds sampled at once between events
_MAX_EVENTS = 500_000
_MAX_BLOCKS = 2_000  # rounds a simulation plays without failures: 2,000 blocks of 65,536 take a few seconds

REFORM_ROUND_TRIPS = 3
"""Round trips over the slowest link among the members that re-forming takes when ``simulate.reform_seconds``
is unset: the quorum (or admission) request to the coordinator and its answer; the new group's rendezvous
through the coordinator's store; gloo's connection handshake between the members. The work on each machine
(destroying the old gloo group, building the new one) took 3-40 ms in our measurements on one machine and
is left out."""

# -- the costs of one failure ------------------------------------------------------------------------------------


def heal_state_bytes(config: Config, layout: ModelLayout | None = None) -> int:
    """Bytes of the state a healer sends a joining site (``geotrain.membership.heal.heal_state_bytes``) for the
    model ``layout`` (the configuration's by default)."""
    return _heal_state_bytes(config, (layout if layout is not None else config.layout()).params)


def heal_seconds(spec: PlanSpec, *, healer: int, joiner: int, nbytes: int | None = None) -> float:
    """Seconds for ``healer`` to send its state (``nbytes``, :func:`heal_state_bytes` by default) to ``joiner``
    over the link between the two sites (``geotrain.membership.heal.heal_transfer_seconds``). No link (no
    emulation): no time."""
    if nbytes is None:
        nbytes = heal_state_bytes(spec.config, spec.model.layout)
    return heal_transfer_seconds(spec.config, spec.topology.link(healer, joiner), nbytes)


def reform_seconds(sim: SimulateConfig, topology: Topology, members: Sequence[int]) -> float:
    """Seconds the ``members`` need to re-form their cross-site group on a new generation:
    ``sim.reform_seconds`` when set, else :data:`REFORM_ROUND_TRIPS` round trips (twice the one-way latency)
    of the slowest link among them."""
    if sim.reform_seconds is not None:
        return float(sim.reform_seconds)
    latency = 0.0
    for a in members:
        for b in members:
            link = topology.link(a, b) if a < b else None
            if link is not None:
                latency = max(latency, link.latency_s)
    return REFORM_ROUND_TRIPS * 2.0 * latency


def _reform_source(sim: SimulateConfig, topology: Topology, members: Sequence[int]) -> str:
    if sim.reform_seconds is not None:
        return "simulate.reform_seconds"
    rtt = reform_seconds(sim, topology, members) / REFORM_ROUND_TRIPS
    return f"{REFORM_ROUND_TRIPS} round trips of {rtt * 1e3:.3g} ms (the slowest link among the sites)"


def hung_transfer_seconds(membership: Any, sync_seconds: float) -> float:
    """How long a sync can hang on a silent site before the survivors' transfer fails: its deadline,
    ``transfer_floor_s + transfer_margin x`` its predicted time (``geotrain.membership.deadlines``; training
    gives each transfer of a sync its own deadline, the simulation one for the whole sync)."""
    return membership.transfer_floor_s + membership.transfer_margin * sync_seconds


@dataclass(frozen=True, kw_only=True, slots=True)
class FailureCosts:
    """What one failure of a site costs an elastic run, predicted from the run's configuration: the figures a
    fault benchmark measures (from the fault until the site is dropped, the survivors' re-forming, the joiner's
    healing), each from the definition training uses."""

    site: int
    """The site that fails and rejoins."""
    healer: int | None
    """The site that heals it: the lowest other site, as the coordinator picks (None with one site)."""
    link: str | None
    """The link between the two as BANDWIDTH/LATENCY (None: no emulated link, and healing takes no time)."""
    detection_crash_seconds: float
    """A crash: the site's processes die, their connections close and the coordinator drops the site at once."""
    detection_silent_seconds: float
    """A silent failure during inner steps: ``membership.heartbeat_timeout_s``."""
    detection_hung_seconds: float
    """A silent failure as a sync of all sites starts: the survivors' transfer fails at its deadline
    (:func:`hung_transfer_seconds`); one that strikes later in the sync is found that much sooner."""
    detection_seconds: float
    """The configured mix during inner steps: ``simulate.silent_fraction`` x ``detection_silent_seconds``."""
    reform_seconds: float
    """One re-forming of the group of all sites (:func:`reform_seconds`). A failure costs two: the survivors
    drop the site, then admit it again."""
    reform_source: str
    """Where ``reform_seconds`` comes from: the setting, or the round trips of the slowest link."""
    heal_bytes: int
    """The state the healer sends (:func:`heal_state_bytes`)."""
    heal_seconds: float
    """Its transfer over the link (:func:`heal_seconds`)."""
    sync_seconds: float
    """One sync of all sites over the links (the plan's ``comm_seconds_per_sync``)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def failure_costs(config: Config | PlanSpec, *, site: int | None = None,
                  sim: SimulateConfig | None = None) -> FailureCosts:
    """The predicted detection, re-forming and healing of one failure of ``site`` in the run ``config``
    describes (a run configuration at its own scale, or a plan), under ``sim`` (the configuration's
    ``[simulate]`` section by default). ``site`` unset: the site whose healing takes longest (the last of
    several alike)."""
    spec = config if isinstance(config, PlanSpec) else plan_spec(config)
    sim = spec.config.simulate if sim is None else sim
    k = len(spec.sites)
    nbytes = heal_state_bytes(spec.config, spec.model.layout)

    def healer_of(j: int) -> int | None:
        return next((i for i in range(k) if i != j), None)

    def heal_of(j: int) -> float:
        h = healer_of(j)
        return 0.0 if h is None else heal_seconds(spec, healer=h, joiner=j, nbytes=nbytes)

    if site is None:
        site = max(range(k), key=lambda j: (heal_of(j), j))
    elif isinstance(site, bool) or not isinstance(site, int) or not 0 <= site < k:
        raise ConfigError(f"site {site!r} is not in the run: its sites are 0 to {k - 1}", field="site")
    healer = healer_of(site)
    link = spec.topology.link(site, healer) if healer is not None else None
    everyone = list(range(k))
    sync_s = sync_comm(spec, members=everyone).seconds if k > 1 else 0.0
    membership = spec.config.membership
    return FailureCosts(
        site=site,
        healer=healer,
        link=None if link is None else str(link),
        detection_crash_seconds=0.0,
        detection_silent_seconds=float(membership.heartbeat_timeout_s),
        detection_hung_seconds=hung_transfer_seconds(membership, sync_s),
        detection_seconds=sim.silent_fraction * membership.heartbeat_timeout_s,
        reform_seconds=reform_seconds(sim, spec.topology, everyone),
        reform_source=_reform_source(sim, spec.topology, everyone),
        heal_bytes=nbytes,
        heal_seconds=heal_of(site),
        sync_seconds=sync_s,
    )


# -- the simulation ------------------------------------------------------------------------------------------------


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
    since its last committed sync for the failed site (elastic)."""
    lost_compute_hours: float
    """The compute part of that progress, in site-hours."""
    downtime_hours: float
    """Site-hours spent down or restarting (elastic: from the failure until the site is healed)."""
    energy_mwh: float
    """Energy over the run; a site draws its power for the whole run, down or not."""
    per_site: list[dict] = field(default_factory=list)
    silent_failures: int = 0
    """Elastic: failures that were silent (the rest were crashes)."""
    rejoins: int = 0
    """Elastic: sites healed from a live peer and admitted again."""
    outages: int = 0
    """Elastic: times the last live site failed, so that the run resumed from its last checkpoint (these failures
    have no survivors to detect them, re-form or heal)."""
    detection_seconds: float = 0.0
    """Elastic: detection delays summed over failures: 0 for a crash, ``heartbeat_timeout_s`` for a silent
    failure during inner steps, what was left of the transfer deadline for one that hit a sync."""
    reform_seconds: float = 0.0
    """Elastic: re-forming summed over failures and admissions."""
    heal_seconds: float = 0.0
    """Elastic: healing summed over rejoins."""
    heal_bytes: int = 0
    """Elastic: the state a healer sends one joiner."""
    stall_seconds: float = 0.0
    """Elastic: wall time the running sites lost to failures, beyond the failed site's own lost work: waiting at
    a sync for a detection, the aborted part of an interrupted sync, re-forming, draining and healing."""

    @property
    def lost_hours(self) -> float:
        """Lost progress plus downtime, in site-hours."""
        return self.lost_progress_hours + self.downtime_hours

    @property
    def detection_seconds_per_failure(self) -> float:
        return self.detection_seconds / self.failures if self.failures else 0.0

    @property
    def reform_seconds_per_failure(self) -> float:
        """Re-forming per failure: after it and, usually, when the site is admitted again."""
        return self.reform_seconds / self.failures if self.failures else 0.0

    @property
    def heal_seconds_per_rejoin(self) -> float:
        return self.heal_seconds / self.rejoins if self.rejoins else 0.0

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
            "silent_failures": self.silent_failures,
            "rejoins": self.rejoins,
            "outages": self.outages,
            "detection_seconds": self.detection_seconds,
            "detection_seconds_per_failure": self.detection_seconds_per_failure,
            "reform_seconds": self.reform_seconds,
            "reform_seconds_per_failure": self.reform_seconds_per_failure,
            "heal_seconds": self.heal_seconds,
            "heal_seconds_per_rejoin": self.heal_seconds_per_rejoin,
            "heal_bytes": self.heal_bytes,
            "stall_seconds": self.stall_seconds,
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
    elastic = sim.recovery == "elastic"
    membership = spec.config.membership

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
    min_members = max(1, min(membership.min_sites, k))

    def draw_failure(now: float, i: int) -> float:
        return now + rng.exponential(mtbf[i]) if math.isfinite(mtbf[i]) else math.inf

    comm_cache: dict[tuple[int, ...], float] = {}

    def comm_seconds(members: tuple[int, ...]) -> float:
        if members not in comm_cache:
            comm_cache[members] = sync_comm(spec, members=list(members)).seconds if len(members) > 1 else 0.0
        return comm_cache[members]

    reform_cache: dict[tuple[int, ...], float] = {}

    def reform(members: tuple[int, ...]) -> float:
        if members not in reform_cache:
            reform_cache[members] = reform_seconds(sim, spec.topology, members)
        return reform_cache[members]

    heal_bytes = heal_state_bytes(spec.config, spec.model.layout) if elastic else 0
    heal_cache: dict[tuple[int, int], float] = {}

    def heal(healer: int, joiner: int) -> float:
        if (healer, joiner) not in heal_cache:
            heal_cache[(healer, joiner)] = heal_seconds(spec, healer=healer, joiner=joiner, nbytes=heal_bytes)
        return heal_cache[(healer, joiner)]

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
    silent_failures = rejoins = outages = 0
    detect_total = reform_total = heal_total = stall_total = 0.0
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

    def admit(now: float) -> float:
        """Sites whose downtime is over join at this round boundary: the members re-form with them and the
        lowest live site heals each in turn (syncs in flight drained first). Returns when the run goes on."""
        nonlocal rejoins, reform_total, heal_total, stall_total
        joiners = [int(i) for i in np.flatnonzero(~alive & (down_until <= now))]
        live = [int(i) for i in np.flatnonzero(alive)]
        for i in joiners:
            alive[i] = True
            next_fail[i] = draw_failure(now, i)
        seconds = reform(tuple(sorted(live + joiners)))
        reform_total += seconds
        if live:  # else no live site is left: the sites back resume from the last checkpoint, healed by none
            healing = sum(heal(live[0], i) for i in joiners)
            drain = 0.0 if pattern.blocking else comm_seconds(tuple(live))
            rejoins += len(joiners)
            heal_total += healing
            seconds += drain + healing
            stall_total += seconds
        for i in joiners:
            downtime[i] += now + seconds - failed_at[i]
        return now + seconds

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
            t = admit(t)
        members = tuple(int(i) for i in np.flatnonzero(alive))
        if len(members) < min_members:  # every site down, or fewer than membership.min_sites: wait for one back
            t = max(t, float(down_until[~alive].min()))
            continue
        m = np.array(members)
        # A site that "failed" during a stall (re-forming, healing, a restart) fails now, at the round boundary.
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
        # The latest checkpoint among the rounds this block completes (one every ckpt_rounds rounds). An elastic
        # run needs one only when every site is down at once.
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
        if not elastic:
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
            continue

        silent = sim.silent_fraction >= 1 or (sim.silent_fraction > 0 and float(rng.random()) < sim.silent_fraction)
        silent_failures += int(silent)
        comp_j = float(comp[n_clean, jj])
        done_j = min(elapsed, comp_j)  # compute the failed site did in this round
        alive[j] = False
        failed_at[j] = fail_t
        down_until[j] = fail_t + restart_s
        next_fail[j] = math.inf
        others = [i for i in range(len(members)) if i != jj]
        if not others:
            # The last member failed: no live site is left to heal from, and the run resumes from its last
            # checkpoint when a site is back (training's coordinator says so and ``geotrain run --resume`` does it).
            outages += 1
            lost_compute += np.maximum(useful - ckpt_useful, 0.0)
            lost_compute[j] += done_j
            lost_wall[j] += fail_t - ckpt_t
            useful[:] = ckpt_useful
            tokens, progress = ckpt_tokens, ckpt_progress
            t = fail_t
            ckpt_t = float(down_until.min())  # the state is restored when the first site is back
            continue

        survivors = tuple(members[i] for i in others)
        comm_after = comm_seconds(survivors)
        reform_s = reform(survivors)
        period_w = float(walls[n_clean]) / periods_per_round
        pos = elapsed % period_w  # where in its sync period the failure struck
        c_gate = float(comp[n_clean].max()) / round_steps
        compute_end = pattern.period_steps * c_gate  # a blocking sync starts here; an overlapped one lands by
        hide = pattern.hide_steps * c_gate  # ... its start plus this much compute (or its own time, if longer)
        if pattern.blocking:
            mid_sync = comm > 0 and pos >= compute_end
        else:  # the previous period's sync travels during [0, comm) of this one (none in the first period)
            mid_sync = comm > 0 and pos < comm and (progress > 0 or elapsed >= period_w)
        if mid_sync:
            # The commit vote fails: the attempt is lost for everyone and redone without the failed site.
            in_sync = pos - compute_end if pattern.blocking else pos
            detect = max(0.0, hung_transfer_seconds(membership, comm) - in_sync) if silent else 0.0
            if pattern.blocking:
                stall = in_sync + detect + reform_s
                extra = stall + comm_after - comm  # the redone sync, among fewer sites, replaces the rest of this one
            else:
                extra = stall = max(0.0, pos + detect + reform_s + comm_after - max(hide, comm))
                # The sync that failed carried the failed site's previous period: lost as well.
                prev = min(float(round_compute[j]) / periods_per_round, float(useful[j]))
                useful[j] -= prev
                lost_compute[j] += prev
                lost_wall[j] += period_w
                tokens -= float(round_tokens[j]) * prev / float(round_compute[j])
        else:
            # During inner steps: the survivors go on and wait at the next sync's quorum for the detection.
            detect = float(membership.heartbeat_timeout_s) if silent else 0.0
            wait = max(0.0, pos + detect - compute_end)
            if pattern.blocking:
                stall = wait + reform_s
                extra = stall + comm_after - comm
            else:
                extra = stall = max(0.0, wait + reform_s + comm_after - max(hide, comm_after))
        # The failed site keeps what it synced: its work up to its last sync in this round (earlier fragment
        # syncs for streaming); the rest is lost. The others finish the round without it.
        lost_j = min(pos, done_j)
        useful[j] += done_j - lost_j
        lost_compute[j] += lost_j
        lost_wall[j] += pos
        tokens += round_tokens[j] * (done_j - lost_j) / comp_j
        useful[m[others]] += comp[n_clean, others]
        tokens += float(round_tokens[m[others]].sum())
        progress += 1
        t = max(fail_t, float(ends[n_clean]) + extra)
        detect_total += detect
        reform_total += reform_s
        stall_total += stall

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
        silent_failures=silent_failures,
        rejoins=rejoins,
        outages=outages,
        detection_seconds=detect_total,
        reform_seconds=reform_total,
        heal_seconds=heal_total,
        heal_bytes=heal_bytes,
        stall_seconds=stall_total,
    )
