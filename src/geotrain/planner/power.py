"""A run predicted under each site's power and speed: ``[grid]`` traces and ``run.site_speeds``.

The closed form (``geotrain.planner.model``) takes every site at a constant speed. Under a grid trace a site's
speed changes from step to step, and a site may leave the run while its power is out. This module plays such a
run forward step by step, with the definitions training uses:

* **Power.** Each site has the :class:`geotrain.power.PowerController` training builds for it
  (``geotrain.power.site_controllers``). At each step's start ``begin_step`` gives the step's ``active``; after the
  step and its wait for a sync, ``end_step`` charges its energy. Energy, peak draw and carbon are the
  controllers' own integrals.
* **Pace** (``geotrain.train.pace``). A step whose compute takes ``c`` seconds at full speed runs at factor
  ``f = speed x active`` (``run.site_speeds``, 1 by default; ``active`` 1 without ``[grid]``) and lasts
  ``c / f``; the ``c / f - c`` beyond the compute is throttled time, busy like compute. Under a ramp limit a
  step may first wait for the draw to ramp up (``PowerController.start_delay``), also throttled time.
* **Syncs.** With H-step rounds every site computes H inner steps and the sync starts when the slowest live
  site arrives; it lasts the sync time of the live members over their links (``geotrain.planner.model.sync_comm``,
  the cost ``geotrain.algorithms.timing.sync_seconds`` gives the whole ring). A blocking sync holds every site
  until it lands. An overlapped one travels during the next round: each site waits at the end of that round for
  it to land, and the next sync starts once the link is free (it carries one sync at a time). The last sync
  of a run has nothing to hide behind. With time-based rounds (``outer.sync_every_seconds``) each site trains
  for T seconds of its own clock, ends the round at the first step past T (a site that has not trained in the
  round skips a step that would end more than half of it past the round's end: ``TimedRounds.skip_step``), and
  the round's tokens are the steps each live site managed; when the run ends and how long a shortened last
  round lasts is the rule training uses (``geotrain.algorithms.diloco.timed_round_length``), counting a
  blocking round at once and an overlapped one a round later.
* **Outages.** A step whose setpoint cannot keep the site training (``on`` False) is not computed: the site
  leaves (``leave``), the others go on without it, and its work since the last sync is not part of that sync.
  It asks to join again ``geotrain.power.rejoin_lead_seconds`` before its power returns at ``back_at`` (with
  time-based rounds one round early, else at ``back_at``) and waits to be admitted, as
  ``geotrain.comm.collectives`` does it: the quorum of the first sync that starts once it asks sees it
  waiting, and the members learn so when they wait for that sync (blocking: as it lands; overlapped: at the
  end of the next round). There they drain the sync in flight (whose quorum, overlapped, saw the joiner too,
  so the next sync point drains once more), the lowest live site sends the joiner its state
  (``geotrain.planner.simulate.heal_seconds``, the cost the WAN emulator charges) while every site waits, or,
  with time-based rounds and a heal of at most half a round, while the members train on
  (``geotrain.membership.heal``: the joiner's round is theirs, the healer's next sync starts after the
  transfer), and it trains on from the run's step, its first step waiting for ``back_at`` if the power is
  not back yet. It is powered again (``rejoin``, drawing idle) at ``back_at``. With fewer live sites than
  ``membership.min_sites`` a sync's quorum waits until enough are back. A site whose power never comes back
  stays out; if every site is out, the run waits for the first one back, which goes on alone without healing.

Left out: the re-forming of the cross-site group (round trips to the coordinator, which an emulated run on one
machine does not pay over its emulated links), evaluation and checkpoints, and noise. Streaming DiLoCo, whose
fragment syncs overlap a part of a round, is not covered; :func:`predict_power_run` refuses it.

The result, :class:`PowerPrediction`, has the figures ``summary.json`` reports for the same run: wall seconds,
tokens and utilization (busy over wall, busy being compute and throttled time) per site and overall, and each
site's energy, peak draw and carbon. ``geotrain.summary.predict_from_summary`` uses it for a run with
``[grid]`` or site speeds, and ``geotrain plan`` prints it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from geotrain.algorithms.diloco import timed_round_length
from geotrain.config import Config
from geotrain.errors import ConfigError
from geotrain.membership.heal import heals_in_background
from geotrain.planner.model import PlanSpec, plan_spec, resolve, site_step_seconds, sync_comm
from geotrain.planner.simulate import heal_seconds, heal_state_bytes
from geotrain.power import rejoin_lead_seconds, site_controllers
from geotrain.train.pace import WORK_MIN

__all__ = ["MAX_SITE_STEPS", "PowerPrediction", "SitePrediction", "models_power", "predict_power_run"]

MAX_SITE_STEPS = 2_000_000
"""The most inner steps, summed over sites, a prediction plays; a longer run is refused (its figures come from
the closed form at constant speed, ``geotrain plan`` without ``[grid]``)."""

_MAX_ROUNDS = 1_000_000


def models_power(config: Config) -> bool:
    """Whether the run ``config`` describes paces its sites: ``[grid]`` is on or ``run.site_speeds`` is set."""
    return bool(config.grid.on or config.run.site_speeds)


@dataclass(kw_only=True, slots=True)
class SitePrediction:
    """One site of a predicted run."""

    name: str
    steps: int
    """Inner steps the site computed."""
    tokens: int
    """Tokens the site trained: its steps times its share of the global batch."""
    compute_seconds: float
    """Compute at full speed: steps times the site's compute per step."""
    throttled_seconds: float
    """Time its steps were held back beyond the compute, by its speed factor and its power."""
    utilization: float
    """Busy time (compute and throttled) over the run's wall time."""
    away_seconds: float
    """Time between leaving the run for lack of power and training again (healing included)."""
    power_offs: int
    """Times the site left because its power could not keep it training."""
    energy_mwh: float | None
    """Its controller's energy over the run; None without ``[grid]``."""
    peak_mw: float | None
    """The highest draw held for a positive time; None without ``[grid]``."""
    carbon_kg: float | None
    """Its controller's carbon; None without ``[grid]`` or without a carbon trace."""
    smoothing_mwh: float | None
    """Energy held through waits under a ramp limit (part of energy_mwh); None without ``[grid]``."""

    @property
    def busy_seconds(self) -> float:
        return self.compute_seconds + self.throttled_seconds


@dataclass(kw_only=True, slots=True)
class PowerPrediction:
    """A run predicted under its sites' power and speeds (:func:`predict_power_run`)."""

    wall_seconds: float
    """Training time until the token budget is reached and the last sync has landed."""
    steps: int
    """The run's inner steps (H-step rounds: the loop's count; time-based rounds: the most any site took)."""
    rounds: int
    """Outer rounds (sync points) the run went through."""
    tokens: int
    """Tokens trained, all sites together (the sum of ``per_site[*].tokens``, as ``summary.json`` counts them)."""
    sync_seconds: float
    """One sync of all sites over the links."""
    heal_seconds: float
    """Time every site waited for healers, summed over the admissions that healed blocking (one healed in the
    background holds no member up: ``geotrain.membership.heal``)."""
    per_site: list[SitePrediction] = field(default_factory=list)
    timed_rounds: bool = False
    """The rounds ended after ``outer.sync_every_seconds`` rather than after H steps."""

    @property
    def utilization(self) -> float:
        """Mean over sites of busy time over wall time, as ``summary.json`` defines ``utilization``."""
        return sum(s.utilization for s in self.per_site) / len(self.per_site) if self.per_site else 0.0

    @property
    def time_to_train_seconds(self) -> float:
        return self.wall_seconds

    @property
    def throttled_share(self) -> float:
        """Throttled time over busy time, all sites together."""
        busy = sum(s.busy_seconds for s in self.per_site)
        return sum(s.throttled_seconds for s in self.per_site) / busy if busy > 0 else 0.0

    @property
    def energy_mwh(self) -> float | None:
        """All sites' energy; None without ``[grid]``."""
        values = [s.energy_mwh for s in self.per_site]
        return None if not values or any(v is None for v in values) else float(sum(values))  # type: ignore[arg-type]

    @property
    def carbon_kg(self) -> float | None:
        """All sites' carbon; None unless every site has a carbon trace (as ``summary.json`` totals it)."""
        values = [s.carbon_kg for s in self.per_site]
        return None if not values or any(v is None for v in values) else float(sum(values))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return {
            "wall_seconds": self.wall_seconds,
            "time_to_train_seconds": self.wall_seconds,
            "steps": self.steps,
            "rounds": self.rounds,
            "tokens": self.tokens,
            "utilization": self.utilization,
            "throttled_share": self.throttled_share,
            "sync_seconds": self.sync_seconds,
            "heal_seconds": self.heal_seconds,
            "energy_mwh": self.energy_mwh,
            "carbon_kg": self.carbon_kg,
            "timed_rounds": self.timed_rounds,
            "per_site": [dataclasses.asdict(s) | {"busy_seconds": s.busy_seconds} for s in self.per_site],
        }


@dataclass(slots=True)
class _Site:
    """A site's state while the prediction plays the run."""

    t: float = 0.0
    present: bool = True
    back: float | None = None
    """While out of the run: when its power returns."""
    power_at: float | None = None
    """Back in the run: when its power returns, until its first step there."""
    left_at: float = 0.0
    steps: int = 0
    compute: float = 0.0
    throttled: float = 0.0
    away: float = 0.0
    power_offs: int = 0
    round_steps: int = 0
    round_from: float | None = None
    """Healed in the background: when its first round began (the members', at the healer's snapshot)."""


def _checked_step_seconds(values: Sequence[float], sites: int) -> list[float]:
    out = list(values)
    if len(out) != sites:
        raise ConfigError(f"gives {len(out)} figures for {sites} sites; give one per site", field="step_seconds")
    for v in out:
        if isinstance(v, bool) or not (isinstance(v, numbers.Real) and math.isfinite(v) and v > 0):
            raise ConfigError(f"must be positive seconds per inner step, got {v!r}", field="step_seconds")
    return [float(v) for v in out]


def predict_power_run(config: Config | PlanSpec, *, step_seconds: Sequence[float] | None = None,
                      payloads: Sequence[int] | None = None, steps: int | None = None) -> PowerPrediction:
    """Predict the run ``config`` describes (a run configuration, or a plan of one) under its ``[grid]`` traces
    and ``run.site_speeds``, stepping each site forward in training time with its power controller and pace
    factor (see the module docstring).

    ``step_seconds``: each site's compute per inner step at full speed (one figure per site); by default the
    plan's (``[sites]``/``[[site]]`` ``step_seconds``, else the FLOP model). ``payloads``: the values of each
    sync as the run sent them (their mean is one sync's payload; default the algorithm's pattern of the
    configured model). ``steps``: the run's inner steps with H-step rounds (default the loop's rule from
    ``run.tokens``). Settings the configuration leaves unset (DiLoCo's overlap) are chosen as a run chooses
    them, from the fastest site's compute per step."""
    spec = config if isinstance(config, PlanSpec) else plan_spec(config)
    k = len(spec.sites)
    if step_seconds is not None:
        measured = _checked_step_seconds(step_seconds, k)
        spec = dataclasses.replace(spec, sites=[dataclasses.replace(s, step_seconds=c)
                                                for s, c in zip(spec.sites, measured, strict=True)])
    spec, _ = resolve(spec)
    cfg = spec.config
    algorithm = spec.algorithm
    pattern = algorithm.pattern(cfg, spec.model.layout)
    if (pattern.final_payload or len(pattern.payloads) != 1 or pattern.period_steps != pattern.round_steps
            or pattern.hide_steps not in (0, pattern.period_steps)):
        raise ConfigError(f"the power-aware prediction covers algorithms that sync the whole model once a round "
                          f"(ddp, diloco, sparseloco), not {cfg.run.algorithm!r}; plan it without [grid] and "
                          "run.site_speeds", field="run.algorithm")
    overlap = not pattern.blocking
    numel = round(sum(payloads) / len(payloads)) if payloads else pattern.mean_payload
    c = site_step_seconds(spec)
    speeds = [float(v) for v in cfg.run.site_speeds] if cfg.run.site_speeds else [1.0] * k
    pcs = site_controllers(cfg) or [None] * k
    step_tokens = [spec.model.batch_tokens * share for share in spec.shares()]
    timed = cfg.outer.sync_every_seconds if algorithm.timed_rounds else None
    round_steps = int(pattern.round_steps)
    total_steps = int(steps) if steps is not None else spec.model.steps
    if total_steps < 1:
        raise ConfigError(f"needs at least one inner step, got {total_steps}", field="steps")
    expected = total_steps * k if timed is None else cfg.run.tokens / min(step_tokens)
    if timed is not None:
        # a round's steps, at most: every site trains T seconds before the token budget is known (the first
        # round at least), however few steps the budget needs
        per_round = timed * sum(speeds[i] / c[i] for i in range(k))
        if per_round > MAX_SITE_STEPS:
            raise ConfigError(f"a round of {timed:g} s is about {per_round:,.0f} inner steps over the sites at "
                              f"{min(c):.3g} s per step, more than the {MAX_SITE_STEPS:,} a prediction plays step "
                              "by step; plan shorter rounds or give the sites' step_seconds (its constant-speed "
                              "figures stand in the plan)", field="outer.sync_every_seconds")
    if expected > MAX_SITE_STEPS:
        raise ConfigError(f"the run is about {expected:,.0f} inner steps over its sites, more than the "
                          f"{MAX_SITE_STEPS:,} a prediction plays step by step; plan fewer tokens or a larger batch "
                          "(its constant-speed figures stand in the plan)", field="run.tokens")
    heal_bytes = heal_state_bytes(cfg, spec.model.layout)
    min_sites = min(cfg.membership.min_sites, k)
    lead = rejoin_lead_seconds(cfg)

    def asks(x: _Site) -> float:
        """When a site out of the run asks to join again (``train/site.py``)."""
        assert x.back is not None
        return max(x.left_at, x.back - lead)

    comm_cache: dict[tuple[int, ...], float] = {}

    def comm(members: tuple[int, ...]) -> float:
        if members not in comm_cache:
            comm_cache[members] = sync_comm(spec, numel, members=list(members)).seconds if len(members) > 1 else 0.0
        return comm_cache[members]

    sites = [_Site() for _ in range(k)]
    played = 0

    def step(i: int, round_end: float | None = None) -> bool | None:
        """Site i computes one inner step from its clock; False when its power cannot keep it training (it has
        left the run); None when it goes to the sync of its time-based round ending at ``round_end`` without the
        step (``TimedRounds.skip_step``: none trained in the round yet, and the step would end more than half of
        it past the round's end)."""
        nonlocal played
        played += 1
        if played > MAX_SITE_STEPS:
            raise ConfigError(f"the run is longer than {MAX_SITE_STEPS:,} inner steps over its sites, too many to "
                              "play step by step; plan fewer tokens or a larger batch", field="run.tokens")
        s, pc = sites[i], pcs[i]
        factor = speeds[i]
        if s.power_at is not None:  # admitted before its power returned: wait for it, then power on
            assert pc is not None
            s.t = max(s.t, s.power_at)
            pc.rejoin(s.power_at)
            s.power_at = None
        if pc is not None:
            work = c[i] / speeds[i] if s.steps >= WORK_MIN else None  # as training paces it (train/pace.py)
            if work is not None:
                delay = pc.start_delay(s.t, work)
                s.t += delay
                s.throttled += delay
            sp = pc.begin_step(s.t, work)
            if not sp.on:
                pc.leave(s.t)
                s.present, s.left_at, s.back = False, s.t, pc.back_at(s.t, work)
                s.power_offs += 1
                return False
            factor *= sp.active
            if (round_end is not None and work is not None and s.round_steps == 0
                    and s.t + work / sp.active / 2 > round_end):
                return None
        duration = c[i] / factor
        s.compute += c[i]
        s.throttled += duration - c[i]
        s.t += duration
        s.steps += 1
        s.round_steps += 1
        return True

    def close(i: int, t_end: float) -> None:
        """Site i's open step computed until its clock and waited until ``t_end``."""
        s, pc = sites[i], pcs[i]
        if pc is not None:
            pc.end_step(s.t, t_end)
        s.t = t_end

    run_steps = 0  # H-step rounds: the loop's step index
    in_flight: float | None = None  # landing time of an overlapped sync
    in_flight_admits = False  # its quorum saw a site waiting to join
    admission_due = False  # the members admit at this sync point
    counted_tokens, counted_rounds, last_total = 0.0, 0, 0.0
    unsettled: list[float] = []
    length = timed
    lag = 1 if overlap else 0
    rounds = 0
    healing = 0.0
    heal_end = 0.0  # when the latest heal sent in the background reached its joiners
    wall = 0.0
    for _ in range(_MAX_ROUNDS):
        members = [i for i in range(k) if sites[i].present]
        if not members:  # every site is out: the first back goes on alone, with no live peer to heal from
            backs = [s.back for s in sites if s.back is not None]
            if not backs:
                break  # the power never returns
            t0 = min(backs)
            for j, s in enumerate(sites):
                if s.back is not None and s.back <= t0:
                    s.away += t0 - s.left_at
                    s.t, s.present, s.power_at, s.back = t0, True, s.back, None
            in_flight, in_flight_admits, admission_due = None, False, False
            continue
        for i in members:
            sites[i].round_steps = 0
        if timed is None:
            n = min(round_steps, total_steps - run_steps)
            for i in members:
                for j in range(n):
                    if not step(i):
                        break
                    if j < n - 1:
                        close(i, sites[i].t)
            run_steps += n
        else:
            assert length is not None
            for i in members:
                start = sites[i].t if sites[i].round_from is None else sites[i].round_from
                sites[i].round_from = None
                while True:
                    if not step(i, start + length):
                        break
                    if sites[i].t - start >= length:
                        break
                    close(i, sites[i].t)
        live = [i for i in members if sites[i].present]
        if not live:
            in_flight, in_flight_admits, admission_due = None, False, False
            continue
        rounds += 1
        ends = [sites[i].t for i in live]
        t_sync = comm(tuple(live))
        begin = max(ends) if in_flight is None else max(max(ends), in_flight)  # the link carries one at a time
        begin = max(begin, heal_end)  # after a heal sent in the background, as the healer's link carries it
        short = min_sites - len(live)
        if short > 0:  # the quorum waits until enough sites are back to make up membership.min_sites
            backs = sorted(asks(x) for x in sites if not x.present and x.back is not None)  # joiners count
            if len(backs) < short:
                raise ConfigError(f"the run stops: {len(live)} sites are left and their power does not bring back "
                                  f"the {short} more it needs", field="membership.min_sites")
            begin = max(begin, backs[short - 1])
        land = begin + t_sync
        if timed is None:
            last = run_steps >= total_steps
        else:
            unsettled.append(sum(sites[i].round_steps * step_tokens[i] for i in live))
            while len(unsettled) > lag:
                last_total = unsettled.pop(0)
                counted_tokens += last_total
                counted_rounds += 1
            length = timed_round_length(seconds=timed, budget=cfg.run.tokens, counted_tokens=counted_tokens,
                                        counted_rounds=counted_rounds, rounds_in_flight=len(unsettled),
                                        last_total=last_total)
            last = length is None
        # A sync's quorum, as it starts, sees whether a site is waiting to join; the members learn it when they
        # wait for that sync (blocking: now; overlapped: at the end of the next round, or when it is drained).
        waiting = any(not x.present and x.back is not None and asks(x) <= begin for x in sites)
        if overlap and not last:
            for i in live:
                close(i, sites[i].t if in_flight is None else max(sites[i].t, in_flight))
            admission_due = admission_due or in_flight_admits
            in_flight, in_flight_admits = land, waiting
        else:
            for i in live:
                close(i, land)
            admission_due = admission_due or in_flight_admits or waiting
            in_flight, in_flight_admits = None, False
        if last:
            wall = land
            break
        if admission_due:  # the members drain what is in flight, then the coordinator admits who waits now
            admission_due = False
            now = max(sites[i].t for i in live)
            if in_flight is not None:
                now = max(now, in_flight)
                admission_due = in_flight_admits  # observed while draining: the next sync point admits again
                in_flight, in_flight_admits = None, False
            joiners = [j for j, x in enumerate(sites) if not x.present and x.back is not None and asks(x) <= now]
            heal = sum(heal_seconds(spec, healer=live[0], joiner=j, nbytes=heal_bytes) for j in joiners)
            background = bool(joiners) and heals_in_background(cfg, heal)
            for j in joiners:
                x = sites[j]
                x.away += max(now + heal, x.back) - x.left_at  # until it trains: healed, and powered
                x.present, x.power_at, x.back = True, x.back, None
                if background:  # its round is the members', begun now; it trains once the state is there
                    x.t, x.round_from = now + heal, now
            if background:  # the members train on while the healer's link carries the state
                heal_end = now + heal
            else:  # every site waits for the state, then the next round starts for all
                healing += heal
                for i in live + joiners:
                    sites[i].t = now + heal
    else:
        raise ConfigError(f"the run takes more than {_MAX_ROUNDS:,} rounds, too many to play one by one",
                          field="run.tokens")
    if wall == 0.0:  # every site left for good
        wall = max(s.left_at if not s.present else s.t for s in sites)

    per_site = []
    for i, (site, s, pc) in enumerate(zip(spec.sites, sites, pcs, strict=True)):
        busy = s.compute + s.throttled
        per_site.append(SitePrediction(
            name=site.name, steps=s.steps, tokens=int(round(s.steps * step_tokens[i])), compute_seconds=s.compute,
            throttled_seconds=s.throttled, utilization=min(1.0, busy / wall) if wall > 0 else 1.0,
            away_seconds=s.away + (wall - s.left_at if not s.present else 0.0), power_offs=s.power_offs,
            energy_mwh=None if pc is None else pc.energy_mwh, peak_mw=None if pc is None else pc.peak_mw,
            carbon_kg=None if pc is None else pc.carbon_kg, smoothing_mwh=None if pc is None else pc.smoothing_mwh))
    return PowerPrediction(
        wall_seconds=wall,
        steps=run_steps if timed is None else max(s.steps for s in sites),
        rounds=rounds,
        tokens=sum(p.tokens for p in per_site),
        sync_seconds=comm(tuple(range(k))),
        heal_seconds=healing,
        per_site=per_site,
        timed_rounds=timed is not None,
    )
