"""Fault injection: ``--fault ACTION[:ARG]:TARGET@WHEN``, repeatable, on ``geotrain run`` and in the API.

Actions (TARGET is a site, ``2`` or ``site2``, or ``coordinator``):

=================  ===============================================================================
``kill``           SIGKILL of every process of the site (or of the coordinator, which the launcher
                   then starts again on the same port and secret)
``rejoin``         start the killed site's processes again; they join and are healed from a peer
``partition``      cut the site off from everyone (no heartbeats, no requests) until ``heal``
``heal``           restore a partitioned site; it finds itself dropped, joins again, is healed
``slow:FACTOR``    the site's links carry FACTOR times fewer bits per second from then on
``nan``            the site's next pseudo-gradient arrives as NaNs (with valid checksums)
``outlier:FACTOR`` the site's next pseudo-gradient is FACTOR times larger
=================  ===============================================================================

WHEN is an outer round, ``@3`` (the middle of round 3: inner step 2H + H/2, counting rounds from 1), or
seconds of training, ``@30s``. The launcher carries out kill, rejoin, partition and heal from outside the
site, as the world would; slow, nan and outlier act inside the sites at their step, so every site applies a
``slow`` to the same transfer. Nothing here imports torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from geotrain.errors import ConfigError

__all__ = ["ACTIONS", "Fault", "LAUNCHER_ACTIONS", "LinkConditions", "check_faults", "parse_fault", "trigger_step"]

ACTIONS = ("kill", "rejoin", "partition", "heal", "slow", "nan", "outlier")
LAUNCHER_ACTIONS = ("kill", "rejoin", "partition", "heal")
"""Done to a site from outside (the launcher); the rest happen inside the sites at their step."""
_WITH_FACTOR = ("slow", "outlier")
_SPEC = re.compile(r"^(?P<action>[a-z]+)(?::(?P<arg>[0-9.eE+-]+))?:(?P<target>site[0-9]+|[0-9]+|coordinator)"
                   r"@(?P<when>[0-9.eE+-]+s?)$")


@dataclass(frozen=True, slots=True)
class Fault:
    """One scheduled fault."""

    action: str
    site: int | None
    """The site it strikes; None for the coordinator."""
    round: int | None = None
    """The outer round in whose middle it strikes (from 1)."""
    seconds: float | None = None
    """Or the seconds of training after which it strikes."""
    factor: float | None = None

    @property
    def target(self) -> str:
        return "coordinator" if self.site is None else f"site{self.site}"

    def __str__(self) -> str:
        arg = f":{self.factor:g}" if self.factor is not None else ""
        when = f"{self.round}" if self.round is not None else f"{self.seconds:g}s"
        return f"{self.action}{arg}:{'coordinator' if self.site is None else self.site}@{when}"

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "site": self.site, "round": self.round, "seconds": self.seconds,
                "factor": self.factor, "spec": str(self)}


def parse_fault(text: str) -> Fault:
    """One ``--fault`` value; ConfigError naming the fix."""
    s = str(text).strip().lower()
    m = _SPEC.match(s) if len(s) <= 64 else None
    if not m:
        raise ConfigError(f"cannot read fault {text!r}; write ACTION[:ARG]:SITE@WHEN such as kill:2@3, rejoin:2@6, "
                          "slow:4:1@2, partition:3@30s or kill:coordinator@4 (actions: " + ", ".join(ACTIONS) + ")",
                          field="--fault")
    action, arg, target, when = m["action"], m["arg"], m["target"], m["when"]
    if action not in ACTIONS:
        raise ConfigError(f"unknown fault action {action!r}; choose one of {', '.join(ACTIONS)}", field="--fault")
    factor = None
    if action in _WITH_FACTOR:
        try:
            factor = float(arg) if arg is not None else math.nan
        except ValueError:
            factor = math.nan
        if not (math.isfinite(factor) and 1 <= factor <= 1e6):
            raise ConfigError(f"{action} needs a factor from 1 to 1e6, as in {action}:4:1@2; got {text!r}",
                              field="--fault")
    elif arg is not None:
        raise ConfigError(f"{action} takes no argument; write {action}:SITE@WHEN", field="--fault")
    site = None if target == "coordinator" else int(target.removeprefix("site"))
    if site is None and action != "kill":
        raise ConfigError(f"only kill applies to the coordinator (the launcher starts it again), not {action}",
                          field="--fault")
    try:
        if when.endswith("s"):
            seconds = float(when[:-1])
            if not (math.isfinite(seconds) and 0 <= seconds <= 10**7):
                raise ValueError
            return Fault(action, site, seconds=seconds, factor=factor)
        rnd = int(when)
        if not 1 <= rnd <= 10**9:
            raise ValueError
        return Fault(action, site, round=rnd, factor=factor)
    except ValueError:
        raise ConfigError(f"WHEN in {text!r} must be an outer round from 1 (@3) or seconds of training (@30s)",
                          field="--fault") from None


def check_faults(faults: list[Fault], config: Any) -> None:
    """What a schedule needs from the run: real sites, an emulated link for slow, a kill before each rejoin, a
    partition before each heal, and sites left to carry on."""
    sites = config.run.sites
    down: set[int] = set()
    cut: set[int] = set()
    for f in sorted(faults, key=_order):
        if f.site is not None and not 0 <= f.site < sites:
            raise ConfigError(f"{f} names site {f.site}, but the run has sites 0 to {sites - 1}", field="--fault")
        if f.action == "slow" and not config.topology().emulated:
            raise ConfigError(f"{f} slows an emulated link, but this run emulates none (--link none); give a link",
                              field="--fault")
        if f.action == "kill" and f.site is not None:
            down.add(f.site)
        elif f.action == "rejoin":
            if f.site not in down:
                raise ConfigError(f"{f} rejoins site {f.site}, which no earlier kill stopped", field="--fault")
            down.discard(f.site)
        elif f.action == "partition":
            cut.add(f.site)  # type: ignore[arg-type]
        elif f.action == "heal":
            if f.site not in cut:
                raise ConfigError(f"{f} heals site {f.site}, which no earlier partition cut off", field="--fault")
            cut.discard(f.site)
        if len(down | cut) >= sites:
            raise ConfigError(f"after {f} no site would be left to carry the run", field="--fault")


def _order(f: Fault) -> tuple[float, float]:
    # rounds and seconds cannot be compared without running; order rounds first, each kind by its value
    return (0, f.round) if f.round is not None else (1, f.seconds or 0.0)


def trigger_step(fault: Fault, sync_every: int) -> int | None:
    """The inner step (from 0) after which a round-timed fault strikes: the middle of its round."""
    if fault.round is None:
        return None
    return (fault.round - 1) * sync_every + max(0, sync_every // 2 - 1)


@dataclass(slots=True)
class LinkConditions:
    """What faults did to the links so far: per site, how many times slower its links are. Shared by a site's
    transports (the WAN emulator reads it at every transfer)."""

    slow: dict[int, float]

    def __init__(self) -> None:
        self.slow = {}
