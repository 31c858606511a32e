"""The coordinator: who is in the run, at which generation, and what every site decided together.

One asyncio process (``geotrain coordinator``, or started by ``geotrain run`` on loopback) serves one run.
It is the run's control plane; gloo between the sites is the data plane. Nothing here imports torch.

What it keeps:

* **Membership.** Each worker process of each site joins over an authenticated connection (``wire.py``) and
  heartbeats on it. A site is present while all of its workers are; a worker whose connection closes (a
  crash, SIGKILL) is gone at once, one silent past ``heartbeat_timeout_s`` is dropped. Either way the whole
  site leaves, and the coordinator names it: the survivors' collectives only see a closed connection.
* **Generations.** The members at a generation are the sites whose cross-site groups were built together.
  A generation changes only at a sync's quorum (a member left) or at an admission (joiners came in); groups
  are rebuilt on the new generation's store prefix.
* **Barriers**, each decided once and answered the same to everyone who asks, again if asked again:
  ``form`` (the first generation), ``quorum`` (before each cross-site sync: who takes part), ``vote`` (after
  it: did it succeed everywhere, with the guards' statistics summed), ``admit`` (at a round boundary: bring
  the waiting joiners in, name the live peer that heals them) and ``sum`` (a few floats summed over the
  members: evaluation losses, stop votes).
* **A key-value store** for gloo's rendezvous (``store.py`` gives gloo a ``torch.distributed.Store`` over it).
* **Events**: joined, left, rejoined, healed, each with the round and the wall time.

A coordinator that dies loses all of this, and none of it is needed between syncs: sites keep training,
reconnect when it is back (a new process on the same port and secret) and re-join with the generation and
members they last saw; it adopts the newest such view and goes on. Decisions it had made but not yet
delivered are made again from the same inputs, and a site that already holds one reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geotrain.config import MembershipConfig
from geotrain.membership.fingerprint import describe_difference
from geotrain.membership.wire import (
    MAX_FRAME,
    MAX_HANDSHAKE_FRAME,
    PROTOCOL_VERSION,
    Channel,
    client_proof,
    encode_body,
    server_proof,
    session_key,
)

__all__ = ["Coordinator", "serve"]

_DECIDED_KEEP = 256
"""Decided barriers kept per kind, for late or repeated requests."""


_DEFAULTS = MembershipConfig()
"""What a setting is when the sites did not send it: the one definition, in geotrain.config."""


@dataclass
class _Worker:
    site: int
    index: int
    incarnation: str
    last_seen: float
    session: Any = None
    """The writer of the connection that joined (its closing is the worker's death)."""
    cut: bool = False


@dataclass
class _Site:
    id: int
    status: str = "waiting"
    """waiting (joined, not yet a member) | member | gone | finished."""
    workers: dict[int, _Worker] = field(default_factory=dict)
    intent: str = "start"
    was_member: bool = False
    reason: str = ""
    resume_rounds: list[int] = field(default_factory=list)
    joined_at: float = 0.0
    finished_workers: set[int] = field(default_factory=set)


@dataclass
class _Barrier:
    kind: str
    key: Any
    started: float
    deadline: float
    arrived: dict[tuple[int, int], dict] = field(default_factory=dict)
    waiters: list[tuple[tuple[int, int], asyncio.Future]] = field(default_factory=list)
    result: dict | None = None
    waiting_at: int = 0
    """Where in the members the last member still awaited was found (``Coordinator._awaiting_member``)."""


class _Decision(dict):
    """A barrier's result. Everyone who asks gets the same reply, so its frame body is encoded once: at 1,000
    sites a vote's summed statistics make each reply tens of kilobytes of JSON."""

    __slots__ = ("_body",)

    def body(self) -> bytes:
        try:
            return self._body
        except AttributeError:
            self._body = encode_body(self)
            return self._body


class Refused(Exception):
    """A request the coordinator answers with an error the site must stop on (exit 2)."""


class Coordinator:
    """The state machine and its server. ``now`` is monotonic seconds, ``wall`` epoch seconds."""

    def __init__(self, secret: bytes, *, events_path: Path | None = None, now: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, log: Callable[[str], None] | None = None) -> None:
        self.secret = secret
        self.now = now
        self.wall = wall
        self.log = log or (lambda msg: None)
        self.events_path = events_path
        self.events: list[dict] = []
        self._reset_run()
        self.store: dict[str, bytes] = {}
        self._store_waiters: dict[str, list[asyncio.Future]] = {}
        self._server: asyncio.AbstractServer | None = None
        self._ticker: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self.requests = 0

    def _reset_run(self) -> None:
        self.formed = False
        self.finished = False
        self.sites_max = 0
        self.workers = 0
        self.settings: dict[str, Any] = {}
        self.fingerprint: dict[str, Any] | None = None
        self.sites: dict[int, _Site] = {}
        self.gen = -1
        self.members: list[int] = []
        self.gen_members: dict[int, list[int]] = {}
        self.round = 0
        self.positions: dict[str, Any] = {}
        self.barriers: dict[str, OrderedDict[Any, _Barrier]] = {
            k: OrderedDict() for k in ("form", "quorum", "vote", "admit", "sum")}
        self.adopted_at: float | None = None
        self._admission_waiters: dict[int, list[asyncio.Future]] = {}
        self._asking: dict[tuple[int, int, str], int] = {}
        """(site, worker, incarnation) -> its await_admission requests waiting now."""
        self.launch = secrets.token_hex(8)
        """Names this start of the run: every site of it writes its checkpoints under the same launch."""

    # -- settings the sites bring ----------------------------------------------------------------------------
    def _s(self, key: str, default: float) -> float:
        v = self.settings.get(key, default)
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) and v > 0 else default

    @property
    def heartbeat_timeout(self) -> float:
        return self._s("heartbeat_timeout_s", _DEFAULTS.heartbeat_timeout_s)

    @property
    def quorum_timeout(self) -> float:
        return self._s("quorum_timeout_s", _DEFAULTS.quorum_timeout_s)

    @property
    def join_timeout(self) -> float:
        return self._s("join_timeout_s", _DEFAULTS.join_timeout_s)

    @property
    def min_sites(self) -> int:
        return max(1, int(self._s("min_sites", _DEFAULTS.min_sites)))

    # -- events -----------------------------------------------------------------------------------------------
    def event(self, kind: str, site: int, **fields: Any) -> None:
        e = {"site": site, "kind": kind, "round": self.round, "time": self.wall(), "generation": self.gen, **fields}
        self.events.append(e)
        self.log(f"{kind}: site {site}" + (f" ({fields['reason']})" if fields.get("reason") else ""))
        if self.events_path is not None:
            with contextlib.suppress(OSError), open(self.events_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(e) + "\n")

    # -- who is alive -----------------------------------------------------------------------------------------
    def _present(self, s: _Site) -> bool:
        return s.status not in ("gone",) and len(s.workers) == self.workers

    def _alive_members(self) -> list[int]:
        return [k for k in self.members if self.sites.get(k) is not None and self.sites[k].status == "member"]

    def _joiners(self) -> list[int]:
        """Waiting sites whose every worker is asking to be admitted: only they will take a healer's state (a
        dropped site's session can come back on its own, from its heartbeat thread, while it trains on)."""
        return sorted(k for k, s in self.sites.items() if s.status == "waiting" and self._present(s)
                      and all(self._asking.get((k, w.index, w.incarnation)) for w in s.workers.values()))

    def _site_gone(self, site: int, reason: str) -> None:
        s = self.sites.get(site)
        if s is None or s.status in ("gone", "finished"):
            return
        was = s.status
        s.status, s.reason = "gone", reason
        for w in s.workers.values():
            if w.session is not None:
                with contextlib.suppress(Exception):
                    w.session.close()
        s.workers.clear()
        if was == "member":
            self.event("left", site, reason=reason)
        else:
            self.log(f"site {site} stopped waiting to join ({reason})")
        self._recheck()

    def _worker_gone(self, site: int, index: int, incarnation: str, reason: str) -> None:
        s = self.sites.get(site)
        if s is None:
            return
        w = s.workers.get(index)
        if w is None or w.incarnation != incarnation:
            return  # an older incarnation's connection closing after the site was replaced
        if index in s.finished_workers:
            return  # it said done: its process ending is not its site leaving (the others may still be at work)
        self._site_gone(site, reason)

    # -- barriers ---------------------------------------------------------------------------------------------
    def _barrier(self, kind: str, key: Any, timeout: float) -> _Barrier:
        table = self.barriers[kind]
        b = table.get(key)
        if b is None:
            b = table[key] = _Barrier(kind, key, self.now(), self.now() + timeout)
            while len(table) > _DECIDED_KEEP:
                old_key, old = next(iter(table.items()))
                if old.result is None:
                    break
                del table[old_key]
        return b

    async def _wait(self, b: _Barrier, who: tuple[int, int], payload: dict) -> dict:
        if b.result is not None:
            return b.result
        b.arrived[who] = payload
        fut = asyncio.get_running_loop().create_future()
        b.waiters.append((who, fut))
        self._check(b)
        return await fut

    def _decide(self, b: _Barrier, result: dict) -> None:
        b.result = result = _Decision(result)
        for _, fut in b.waiters:
            if not fut.done():
                fut.set_result(result)
        b.waiters.clear()
        # Decided barriers are kept (up to _DECIDED_KEEP per kind) for late askers; with their payloads, 256
        # votes of 1,000 sites would hold 256,000 statistics vectors of 3,000 floats. Who arrived stays: a
        # check that was going through the late sites when this decision came still asks.
        b.arrived = dict.fromkeys(b.arrived)

    def _recheck(self) -> None:
        for table in self.barriers.values():
            for b in list(table.values()):
                if b.result is None:
                    self._check(b)

    def _check(self, b: _Barrier) -> None:
        getattr(self, f"_check_{b.kind}")(b)

    def _arrived_sites(self, b: _Barrier, sites: list[int], *, worker: int | None = None) -> bool:
        need = range(self.workers) if worker is None else [worker]
        if len(b.arrived) < len(need) * len(set(sites)):
            return False  # fewer arrivals than requests awaited: checked on every arrival, so count first
        return all((k, w) in b.arrived for k in sites for w in need)

    def _awaiting_member(self, b: _Barrier, *, worker: int | None = None) -> bool:
        """Whether a live member has not arrived at ``b`` yet: ``not self._arrived_sites(b, self._alive_members(),
        worker=worker)``, but checked on every arrival, so it does not list the members. It looks first where
        it last found one still awaited (usually still awaited, or followed by one that is) and goes round
        the members from there."""
        need = range(self.workers) if worker is None else (worker,)
        members, n = self.members, len(self.members)
        for j in range(b.waiting_at, b.waiting_at + n):
            k = members[j % n]
            s = self.sites.get(k)
            if s is not None and s.status == "member" and not all((k, w) in b.arrived for w in need):
                b.waiting_at = j % n
                return True
        return False

    # form: the first generation
    def _check_form(self, b: _Barrier) -> None:
        late = self.now() >= b.deadline
        if not late and len(b.arrived) < self.sites_max * self.workers:
            return  # not every site has asked yet (this runs on every join and every arrival)
        ready = [k for k, s in sorted(self.sites.items()) if s.status == "waiting" and self._present(s)
                 and self._arrived_sites(b, [k])]
        if len(ready) < self.sites_max and not (late and len(ready) >= self.min_sites):
            if late:
                self._decide(b, {"error": f"only {len(ready)} of {self.sites_max} sites joined within "
                                          f"{self.join_timeout:g} s (membership.min_sites is {self.min_sites}); "
                                          "start the missing sites or lower membership.min_sites"})
            return
        rounds = None
        if any(self.sites[k].intent == "resume" for k in ready):
            common = set.intersection(*(set(self.sites[k].resume_rounds) for k in ready))
            if not common:
                self._decide(b, {"error": "the sites hold no checkpoint of a common round: " + "; ".join(
                    f"site {k}: {self.sites[k].resume_rounds or 'none'}" for k in ready)})
                return
            rounds = max(common)
        self._new_generation(ready, reason="formed")
        for k in ready:
            self.event("joined", k)
        self.formed = True
        self._decide(b, {"gen": self.gen, "members": self.members, "resume_round": rounds, "launch": self.launch})

    def _new_generation(self, members: list[int], *, reason: str) -> None:
        self.gen += 1
        self.members = sorted(members)
        self.gen_members[self.gen] = self.members
        for k in self.members:
            s = self.sites[k]
            s.status, s.was_member = "member", True
        self.log(f"generation {self.gen}: sites {self.members} ({reason})")

    # quorum: before each sync
    def _check_quorum(self, b: _Barrier) -> None:
        if self._awaiting_member(b) and self.now() < b.deadline:
            return  # the common case, answered without listing the live members
        alive = self._alive_members()
        late = self.now() >= b.deadline
        if not self._arrived_sites(b, alive):
            if not late:
                return
            for k in alive:
                if not self._arrived_sites(b, [k]):
                    self._site_gone(k, f"did not reach sync {b.key[0]} within membership.quorum_timeout_s="
                                       f"{self.quorum_timeout:g} s")
            return  # _site_gone rechecked this barrier
        joiners = self._joiners()
        if len(alive) < self.min_sites and len(alive) + len(joiners) < self.min_sites:
            if self.now() >= b.started + self.join_timeout:
                self._decide(b, {"error": f"{len(alive)} sites left, fewer than membership.min_sites="
                                          f"{self.min_sites}, and no site joined within {self.join_timeout:g} s"})
            return  # wait for joiners to make up the minimum
        left = [k for k in self.members if k not in alive]
        if left or b.key[1] > 0:  # a retry rebuilds the groups even with the same members: a failed one may be broken
            self._new_generation(alive, reason=f"sites {left} left" if left else f"retry {b.key[1]} of sync {b.key[0]}")
        self._decide(b, {"gen": self.gen, "members": self.members, "left": left, "admit": bool(joiners)})

    # vote: after each sync (and between the phases of one)
    def _check_vote(self, b: _Barrier) -> None:
        gen = b.key[0]
        voters = self.gen_members.get(gen, [])
        if not voters:
            self._decide(b, {"commit": False, "failed": [], "gone": [], "stats": None,
                             "errors": {"coordinator": f"generation {gen} is not known here (it restarted)"}})
            return
        gone = [k for k in voters if self.sites.get(k) is None or self.sites[k].status != "member"]
        if not gone and not self._arrived_sites(b, voters):
            if self.now() < b.deadline:
                return
            for k in voters:
                if not self._arrived_sites(b, [k]):
                    self._site_gone(k, f"did not vote on sync {b.key[1]} within its transfer deadline")
            return
        failed = sorted(set(gone) | {who[0] for who, p in b.arrived.items() if not p.get("ok")})
        stats: list[float] | None = None
        for p in b.arrived.values():
            v = p.get("stats")
            if isinstance(v, list) and v:
                stats = list(v) if stats is None else [a + float(x) for a, x in zip(stats, v)]
        errors = {f"site {who[0]} worker {who[1]}": p["error"] for who, p in b.arrived.items() if p.get("error")}
        if not failed:
            for who, p in b.arrived.items():
                if p.get("position") is not None:
                    self.positions[f"{who[0]}/{who[1]}"] = p["position"]
        self._decide(b, {"commit": not failed, "failed": failed, "gone": gone, "stats": stats, "errors": errors})

    # admit: joiners come in at a round boundary
    def _check_admit(self, b: _Barrier) -> None:
        if self._awaiting_member(b) and self.now() < b.deadline:
            return
        alive = self._alive_members()
        if not self._arrived_sites(b, alive):
            if self.now() < b.deadline:
                return
            for k in alive:
                if not self._arrived_sites(b, [k]):
                    self._site_gone(k, "did not reach the admission within membership.quorum_timeout_s")
            return
        joiners = self._joiners()
        if not alive:
            self._decide(b, {"error": "no live site is left to heal joiners from"})
            return
        if joiners:
            healer = alive[0]
            returning = {k: self.sites[k].was_member for k in joiners}
            self._new_generation(alive + joiners, reason=f"sites {joiners} joined")
            for k in joiners:
                self.event("rejoined" if returning[k] else "joined", k, healed_from=healer)
            result = {"gen": self.gen, "members": self.members, "joined": joiners, "healer": healer,
                      "launch": self.launch}
        else:
            result = {"gen": self.gen, "members": self.members, "joined": [], "healer": None, "launch": self.launch}
        self._decide(b, result)
        for k in joiners:
            self._admitted(k, result)

    def _admitted(self, site: int, result: dict) -> None:
        for fut in self._admission_waiters.pop(site, []):
            if not fut.done():
                fut.set_result(result)

    # sum: a few floats over the members (per worker index)
    def _check_sum(self, b: _Barrier) -> None:
        _, worker = b.key
        if self._awaiting_member(b, worker=worker) and self.now() < b.deadline:
            return
        alive = self._alive_members()
        if not self._arrived_sites(b, alive, worker=worker):
            if self.now() < b.deadline:
                return
            for k in alive:
                if (k, worker) not in b.arrived:
                    self._site_gone(k, f"did not contribute to {b.key[0]} within membership.quorum_timeout_s")
            return
        total: list[float] | None = None
        for p in b.arrived.values():  # every member that contributed counts, even one that left since
            v = [float(x) for x in p["values"]]
            total = v if total is None else [a + x for a, x in zip(total, v)]
        self._decide(b, {"values": total or [], "sites": sorted({k for k, _ in b.arrived})})

    # -- joining ----------------------------------------------------------------------------------------------
    def join(self, msg: dict, writer: Any) -> dict:
        """A worker's first message on its session connection. Returns the reply; raises Refused."""
        site, index = int(msg["site"]), int(msg["worker"])
        sites_max, workers = int(msg["sites"]), int(msg["workers"])
        intent = msg.get("intent", "start")
        view = msg.get("view") or {}
        if self.finished:
            raise Refused("the run has finished; start a new coordinator for a new run")
        if self.sites and not any(s.status in ("member", "waiting") for s in self.sites.values()) and not self.formed:
            self._reset_run()
        if self.formed and intent in ("start", "resume") and not self._alive_members():
            self._reset_run()  # every member is gone: a resumed or restarted run forms anew
        if not self.sites_max:
            self.sites_max, self.workers = sites_max, workers
            self.settings = dict(msg.get("settings") or {})
            self.fingerprint = msg.get("fingerprint")
        if sites_max != self.sites_max or workers != self.workers:
            raise Refused(f"this run has {self.sites_max} sites of {self.workers} workers; this site says "
                          f"{sites_max} sites of {workers} workers")
        if not 0 <= site < self.sites_max:
            raise Refused(f"site rank {site} is out of range: this run's sites are 0 to {self.sites_max - 1}")
        if not 0 <= index < self.workers:
            raise Refused(f"worker {index} is out of range: sites have workers 0 to {self.workers - 1}")
        diff = describe_difference(self.fingerprint, msg.get("fingerprint"))
        if diff:
            raise Refused(f"site {site} does not match the run: {diff}")
        if view.get("gen", -1) >= 0 and (not self.formed or (self.adopted_at is not None and view["gen"] > self.gen)):
            self._adopt(view)
        s = self.sites.get(site)
        if s is not None and s.status in ("member", "waiting") and index in s.workers:
            old = s.workers[index]
            if old.incarnation != msg["incarnation"]:
                if self.now() - old.last_seen <= self.heartbeat_timeout and old.session is not None:
                    raise Refused(f"site {site} worker {index} is already in the run (a duplicate site rank?); "
                                  "give each site its own --site-rank")
                self._site_gone(site, "replaced by a new process")
                s = self.sites.get(site)
        if s is None or s.status in ("gone", "finished"):
            s = self.sites[site] = _Site(site, status="waiting", intent=intent, joined_at=self.now(),
                                         was_member=s is not None and s.was_member)
        s.intent = intent
        s.resume_rounds = [int(r) for r in msg.get("resume_rounds") or []]
        s.workers[index] = _Worker(site, index, msg["incarnation"], self.now(), writer)
        self._recheck()
        return {"ok": True, "status": s.status, "gen": self.gen, "members": self.members, "formed": self.formed}

    def _adopt(self, view: dict) -> None:
        """A restarted coordinator takes the newest view a returning member reports."""
        gen, members = int(view["gen"]), [int(k) for k in view.get("members", [])]
        if gen < self.gen:
            return
        self.gen, self.members, self.formed = gen, sorted(members), True
        self.gen_members[gen] = self.members
        self.launch = str(view.get("launch") or self.launch)
        self.round = max(self.round, int(view.get("round", 0)))
        self.adopted_at = self.now()
        for k, s in self.sites.items():
            if s.status == "member" and k not in self.members:
                s.status = "waiting"  # a stale view adopted first: this site must join again
        for k in self.members:
            s = self.sites.setdefault(k, _Site(k))
            if s.status != "member":
                s.status, s.was_member = "member", True
        for d in view.get("decisions", []):
            kind, key, result = d["kind"], d["key"], d["result"]
            if kind in self.barriers:
                key = tuple(key) if isinstance(key, list) else key
                b = self._barrier(kind, key, self.quorum_timeout)
                b.result = result
        self.log(f"adopted generation {gen} with sites {self.members} from a returning site")

    # -- the periodic check -----------------------------------------------------------------------------------
    def tick(self) -> None:
        t = self.now()
        for s in list(self.sites.values()):
            if s.status in ("gone", "finished"):
                continue
            for w in list(s.workers.values()):
                if w.index in s.finished_workers:
                    continue  # done, and quiet because its process has ended
                if t - w.last_seen > self.heartbeat_timeout:
                    self._site_gone(s.id, f"no heartbeat from worker {w.index} for "
                                          f"{self.heartbeat_timeout:g} s (membership.heartbeat_timeout_s)")
                    break
            # after a restart every worker of every site reconnects at once: twice the usual grace
            if s.status == "member" and len(s.workers) < self.workers and self.adopted_at is not None \
                    and t - self.adopted_at > 2 * self.heartbeat_timeout:
                self._site_gone(s.id, "did not reconnect after the coordinator restarted")
            if s.status == "waiting" and self.formed and t - s.joined_at > self.join_timeout:
                for fut in self._admission_waiters.pop(s.id, []):
                    if not fut.done():
                        fut.set_result({"error": f"not admitted within membership.join_timeout_s="
                                                 f"{self.join_timeout:g} s; is the run still making progress?"})
        self._recheck()

    # -- requests ---------------------------------------------------------------------------------------------
    async def request(self, who: tuple[int, int], msg: dict) -> dict:
        """One request of a joined worker; returns the reply."""
        self.requests += 1
        op = msg.get("op")
        site, worker = who
        s = self.sites.get(site)
        w = None if s is None else s.workers.get(worker)
        if w is not None:
            w.last_seen = self.now()
        if op == "heartbeat":
            return {"gen": self.gen}
        if op in ("set", "get", "add", "check", "cas", "delete", "num_keys"):
            return await self._store_op(op, msg)
        if op == "events":
            return {"events": self.events}
        if op == "status":
            return self.status()
        if s is not None and s.status == "gone":
            return {"evicted": f"site {site} is no longer in the run ({s.reason}); it must join again"}
        if s is None or w is None:  # a restarted coordinator this worker has not joined yet
            return {"rejoin": f"site {site} worker {worker} has not joined this coordinator"}
        if "round" in msg:
            self.round = max(self.round, int(msg["round"]))
        if op == "form":
            return await self._wait(self._barrier("form", 0, self.join_timeout), who, msg)
        if op == "quorum":
            if s.status != "member":
                return {"evicted": f"site {site} is not a member of the run; it must join again"}
            key = (int(msg["sync"]), int(msg.get("attempt", 0)))
            return await self._wait(self._barrier("quorum", key, self.quorum_timeout), who, msg)
        if op == "vote":
            key = (int(msg["gen"]), int(msg["sync"]), int(msg.get("attempt", 0)), str(msg.get("phase", "commit")))
            timeout = max(1.0, float(msg.get("deadline_s", self.quorum_timeout)))
            return await self._wait(self._barrier("vote", key, timeout), who, msg)
        if op == "admit":
            if s.status != "member":
                return {"evicted": f"site {site} is not a member of the run; it must join again"}
            return await self._wait(self._barrier("admit", int(msg["sync"]), self.quorum_timeout), who, msg)
        if op == "await_admission":
            if s.status == "member":
                return {"gen": self.gen, "members": self.members, "joined": [], "healer": None, "launch": self.launch}
            if not self._alive_members():
                return {"error": "no live site is left to heal from; resume the run from its last checkpoint "
                                 "with geotrain run --resume"}
            fut = asyncio.get_running_loop().create_future()
            self._admission_waiters.setdefault(site, []).append(fut)
            asking = (site, worker, w.incarnation)
            self._asking[asking] = self._asking.get(asking, 0) + 1
            self._recheck()  # a quorum short of min_sites may be waiting for this joiner
            try:
                result = dict(await fut)
            finally:
                if self._asking.get(asking, 0) > 1:
                    self._asking[asking] -= 1
                else:
                    self._asking.pop(asking, None)
            if "error" not in result:
                result["position"] = self.positions.get(f"{site}/{worker}")
            return result
        if op == "sum":
            key = (str(msg["name"]), worker)
            return await self._wait(self._barrier("sum", key, self.quorum_timeout), who, msg)
        if op == "event":
            fields = {k: v for k, v in msg.items() if k not in ("op", "kind", "site")}
            self.event(str(msg["kind"]), site, **fields)
            return {"ok": True}
        if op == "done":
            s.finished_workers.add(worker)
            if len(s.finished_workers) < self.workers:
                return {"ok": True}  # the site is finished when all of its workers are
            s.status = "finished"
            if not self._alive_members():
                self.finished = True
                for k in list(self._admission_waiters):
                    self._admitted(k, {"error": "the run finished before this site could be admitted",
                                          "finished": True})
            self._recheck()
            return {"ok": True}
        if op == "leave":
            self._site_gone(site, str(msg.get("reason", "left")))
            return {"ok": True}
        return {"error": f"unknown request {op!r}"}

    def status(self) -> dict:
        return {"gen": self.gen, "members": self.members, "formed": self.formed, "finished": self.finished,
                "sites": {k: {"status": s.status, "workers": sorted(s.workers), "reason": s.reason}
                          for k, s in sorted(self.sites.items())},
                "requests": self.requests}

    # -- the store --------------------------------------------------------------------------------------------
    def _store_set(self, key: str, value: bytes) -> None:
        self.store[key] = value
        for fut in self._store_waiters.pop(key, []):
            if not fut.done():
                fut.set_result(value)

    async def _store_op(self, op: str, msg: dict) -> dict:
        key = str(msg.get("key", ""))
        if op == "set":
            self._store_set(key, bytes.fromhex(msg["value"]))
            return {"ok": True}
        if op == "get":
            if key not in self.store:
                fut = asyncio.get_running_loop().create_future()
                self._store_waiters.setdefault(key, []).append(fut)
                try:
                    await asyncio.wait_for(fut, timeout=float(msg.get("timeout", 60.0)))
                except asyncio.TimeoutError:
                    return {"error": f"timed out waiting for key {key!r}"}
            return {"value": self.store[key].hex()}
        if op == "add":
            value = int(self.store.get(key, b"0") or b"0") + int(msg["amount"])
            self._store_set(key, str(value).encode())
            return {"value": value}
        if op == "check":
            return {"ok": all(k in self.store for k in msg["keys"])}
        if op == "cas":
            expected, desired = bytes.fromhex(msg["expected"]), bytes.fromhex(msg["desired"])
            current = self.store.get(key)
            if (current is None and not expected) or current == expected:
                self._store_set(key, desired)
            return {"value": self.store.get(key, expected).hex()}
        if op == "delete":
            return {"ok": self.store.pop(key, None) is not None}
        return {"value": len(self.store)}

    # -- the server -------------------------------------------------------------------------------------------
    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Channel | None:
        async def read_plain() -> dict:
            n = int.from_bytes(await reader.readexactly(4), "big")
            if n > MAX_HANDSHAKE_FRAME:
                raise ValueError("handshake frame too long")
            obj = json.loads(await reader.readexactly(n))
            if not isinstance(obj, dict):
                raise ValueError("handshake frame is not an object")
            return obj

        def plain(obj: dict) -> bytes:
            body = json.dumps(obj).encode()
            return len(body).to_bytes(4, "big") + body

        hello = await read_plain()
        if hello.get("hello") != "geotrain" or hello.get("version") != PROTOCOL_VERSION \
                or not isinstance(hello.get("nonce"), str):
            writer.write(plain({"error": f"expected a geotrain site speaking protocol {PROTOCOL_VERSION}"}))
            await writer.drain()
            return None
        nonce = bytes.fromhex(hello["nonce"])
        mine = secrets.token_bytes(32)
        writer.write(plain({"nonce": mine.hex(), "proof": server_proof(self.secret, nonce, mine).hex()}))
        await writer.drain()
        answer = await read_plain()
        try:
            proof = bytes.fromhex(str(answer.get("proof", "")))
        except ValueError:
            proof = b""
        if not hmac.compare_digest(proof, client_proof(self.secret, nonce, mine)):
            writer.write(plain({"ok": False, "error": "authentication failed: this site holds another secret"}))
            await writer.drain()
            self.log("refused a connection that failed authentication")
            return None
        writer.write(plain({"ok": True}))
        await writer.drain()
        return Channel(writer.get_extra_info("socket"), session_key(self.secret, nonce, mine), is_client=False)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        who: tuple[int, int] | None = None
        incarnation = ""
        session = False
        try:
            channel = await asyncio.wait_for(self._handshake(reader, writer), timeout=10.0)
            if channel is None:
                return

            async def recv() -> Any:
                n = int.from_bytes(await reader.readexactly(4), "big")
                if n > MAX_FRAME + 32:
                    raise ValueError("frame too long")
                return channel.open(await reader.readexactly(n))

            async def send(obj: Any) -> None:
                writer.write(channel.seal_body(obj.body()) if isinstance(obj, _Decision) else channel.seal(obj))
                await writer.drain()

            first = await recv()
            op = first.get("op")
            try:
                if op == "join":
                    reply = self.join(first, writer)
                    session = True
                elif op == "attach":
                    reply = {"ok": True}
                else:
                    reply = {"refused": f"expected join or attach, got {op!r}"}
                if "refused" not in reply:
                    who = (int(first["site"]), int(first["worker"]))
            except Refused as e:
                reply = {"refused": str(e)}
            except (KeyError, TypeError, ValueError) as e:
                reply = {"refused": f"malformed {op} ({e})"}
            await send(reply)
            if "refused" in reply:
                self.log(f"refused site {first.get('site')}: {reply['refused']}")
                return
            if op == "join":
                self.log(f"site {first['site']} worker {first['worker']} connected ({reply['status']})")
            incarnation = str(first.get("incarnation", ""))
            while True:
                msg = await recv()
                try:
                    reply = await self.request(who, msg)
                except (KeyError, TypeError, ValueError) as e:
                    reply = {"error": f"malformed request ({type(e).__name__}: {e})"}
                await send(reply)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError, ValueError, OSError):
            pass
        finally:
            if session and who is not None:
                self._worker_gone(who[0], who[1], incarnation, "connection closed (the process ended or was killed)")
            with contextlib.suppress(Exception):
                writer.close()

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(min(0.25, self.heartbeat_timeout / 4))
            self.tick()

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the port (useful with port 0)."""
        self._server = await asyncio.start_server(self._connection, host, port, reuse_address=True, limit=1 << 20)
        self._ticker = asyncio.get_running_loop().create_task(self._tick_forever())
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()


def serve(secret: bytes, host: str, port: int, *, events_path: Path | None = None, hours: float = math.inf,
          log: Callable[[str], None] | None = None, ready: Callable[[int], None] | None = None,
          parent: int | None = None) -> None:
    """Run a coordinator until ``hours`` pass or the process is interrupted, or, given ``parent`` (the
    launcher's PID), until this process is no longer its child (a launcher killed with SIGKILL leaves no
    coordinator behind)."""

    async def main() -> None:
        c = Coordinator(secret, events_path=events_path, log=log)
        bound = await c.start(host, port)
        if ready is not None:
            ready(bound)
        end = time.monotonic() + hours * 3600
        try:
            while time.monotonic() < end:  # hours may be inf: bounded by the parent or an interrupt
                await asyncio.sleep(min(1.0, max(0.0, end - time.monotonic())))
                if parent is not None and os.getppid() != parent:
                    if log is not None:
                        log(f"the launcher (PID {parent}) is gone; stopping")
                    break
        finally:
            await c.stop()

    asyncio.run(main())
