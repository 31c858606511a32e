"""A worker's side of the coordinator: join, heartbeat, and the blocking requests of the control plane.

One :class:`MembershipClient` per worker process. It opens a *session* connection that joins the run and
carries heartbeats (its closing is how the coordinator learns that the process died), and one connection per
thread that makes requests, so that the training thread's sums, the communication thread's quorums and votes
and gloo's rendezvous never queue behind one another.

When the coordinator goes away, every request retries: it reconnects (a restarted coordinator on the same
address and secret), joins again with the generation and members this worker last saw, and sends the
request again; requests are idempotent (each names its barrier). It gives up after
``membership.join_timeout_s`` without a coordinator. Training does not need the coordinator between syncs,
so a short outage only delays the next one.

Nothing here imports torch (``store.py`` wraps a client as a ``torch.distributed.Store``).
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from geotrain.config import MembershipConfig
from geotrain.errors import ConfigError
from geotrain.membership.wire import AuthError, Channel, WireError, client_handshake

__all__ = ["Evicted", "MembershipClient", "MembershipError", "Refused", "RunFinished", "View"]

_DEFAULTS = MembershipConfig()
"""What a setting is when the sites did not send it: the one definition, in geotrain.config."""


class MembershipError(RuntimeError):
    """The run cannot go on here: too few sites, no coordinator for too long, a sync that kept failing."""


class Refused(ConfigError):
    """The coordinator refused this site (another model or settings, a duplicate or out-of-range rank, a run
    that has finished): bad input, exit code 2."""


class RunFinished(MembershipError):
    """The run finished while this site waited to be admitted (it came back too late to take part)."""


class Evicted(Exception):
    """This site is no longer a member (it was cut off, too slow, or the others moved on without it): it must
    join again and be healed from a live peer."""


@dataclass(slots=True)
class View:
    """The membership this worker last saw."""

    gen: int = -1
    members: list[int] = field(default_factory=list)
    round: int = 0
    decisions: deque = field(default_factory=lambda: deque(maxlen=8))
    """The latest decisions received, reported when joining a restarted coordinator."""
    launch: str | None = None
    """This start of the run, as the coordinator named it (checkpoints are written under it)."""

    def rank(self, site: int) -> int:
        return self.members.index(site)

    def to_dict(self) -> dict[str, Any]:
        return {"gen": self.gen, "members": list(self.members), "round": self.round,
                "decisions": list(self.decisions), "launch": self.launch}


def _parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"coordinator address {address!r} must be HOST:PORT", field="coordinator")
    return host.strip("[]"), int(port)


class MembershipClient:
    """One worker's connection to the coordinator."""

    def __init__(self, address: str, secret: bytes, *, site: int, worker: int, workers: int, sites: int,
                 fingerprint: dict[str, Any] | None = None, settings: dict[str, Any] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.address = address
        self.host, self.port = _parse_address(address)
        self.secret = secret
        self.site, self.worker, self.workers, self.sites = site, worker, workers, sites
        self.fingerprint = fingerprint
        self.settings = dict(settings or {})
        self.incarnation = secrets.token_hex(8)
        self.view = View()
        self.intent = "start"
        self.resume_rounds: list[int] = []
        self.now = clock
        self.coordination_seconds = 0.0
        """Time this worker spent in blocking requests (quorums, votes, sums, admissions)."""
        self._local = threading.local()
        self._session: Channel | None = None
        self.joined = False
        """Whether the coordinator ever accepted this site (only then is there anyone to say goodbye to)."""
        self._session_lock = threading.Lock()
        self._stop = threading.Event()
        self._cut = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._channels: list[Channel] = []
        self._channels_lock = threading.Lock()

    # -- settings ---------------------------------------------------------------------------------------------
    def _setting(self, key: str, default: float) -> float:
        return float(self.settings.get(key, default))

    @property
    def heartbeat_s(self) -> float:
        return self._setting("heartbeat_s", _DEFAULTS.heartbeat_s)

    @property
    def retry_s(self) -> float:
        """How long a request keeps trying to reach a coordinator that went away."""
        return self._setting("join_timeout_s", _DEFAULTS.join_timeout_s)

    # -- connections ------------------------------------------------------------------------------------------
    def _open(self, timeout: float = 10.0) -> Channel:
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            channel = client_handshake(sock, self.secret, address=self.address)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)  # requests block as long as their barrier; deadlines live in the coordinator
        with self._channels_lock:
            if self._stop.is_set():  # close() has closed every channel it knew: this one would outlive it
                channel.close()
                raise WireError("the membership client was closed")
            self._channels.append(channel)
        return channel

    def _join_message(self) -> dict[str, Any]:
        return {"op": "join", "site": self.site, "worker": self.worker, "workers": self.workers,
                "sites": self.sites, "incarnation": self.incarnation, "intent": self.intent,
                "fingerprint": self.fingerprint, "settings": self.settings, "view": self.view.to_dict(),
                "resume_rounds": self.resume_rounds}

    def _join(self) -> dict[str, Any]:
        """Open the session connection and join (again). Refused and AuthError are bad input."""
        channel = self._open()
        channel.send(self._join_message())
        reply = channel.recv()
        if "refused" in reply:
            channel.close()
            raise Refused(f"the coordinator refused site {self.site}: {reply['refused']}", field="site")
        self._session = channel
        return reply

    def join(self, *, intent: str = "start", resume_rounds: list[int] | None = None, connect_s: float = 60.0) -> dict:
        """Join the run (retrying for ``connect_s`` while the coordinator is not up yet) and start heartbeating."""
        self.intent = intent
        self.resume_rounds = list(resume_rounds or [])
        deadline = self.now() + connect_s
        delay = 0.05
        while True:
            try:
                with self._session_lock:
                    reply = self._join()
                break
            except (OSError, WireError) as e:
                if self.now() + delay > deadline:
                    raise MembershipError(f"cannot reach the coordinator at {self.address} "
                                          f"({getattr(e, 'strerror', None) or e}) after {connect_s:g} s; is it "
                                          "running, and is the address right?") from None
                time.sleep(delay)
                delay = min(1.0, delay * 2)
        self.joined = True
        if self._heartbeat is None:
            self._heartbeat = threading.Thread(target=self._beat, name="geotrain-heartbeat", daemon=True)
            self._heartbeat.start()
        return reply

    def rejoin(self) -> dict[str, Any]:
        """After this site was dropped: join again as a new member-to-be (waits for the coordinator as ``join``)."""
        with self._session_lock:
            if self._session is not None:
                self._session.close()
                self._session = None
        self.view = View()
        return self.join(intent="rejoin", connect_s=self.retry_s)

    def _rejoin_session(self) -> None:
        """After the session broke (a restarted coordinator): join again with the last view."""
        with self._session_lock:
            session = self._session  # see _beat
            if session is not None:
                with contextlib.suppress(WireError, OSError):
                    session.send({"op": "heartbeat"})
                    session.recv()
                    return  # still fine: another thread rejoined first
                session.close()
                self._session = None
            self.intent = "member" if self.view.gen >= 0 else self.intent
            self._join()

    def _beat(self) -> None:
        """Heartbeats until close(); a broken session is re-joined (bounded by the retry deadline)."""
        lost_since: float | None = None
        while not self._stop.wait(self.heartbeat_s):
            if self._cut.is_set():
                continue
            try:
                with self._session_lock:
                    session = self._session  # close() may clear it at any moment; it then closes the channel
                    if session is None:
                        raise WireError("no session")
                    session.send({"op": "heartbeat"})
                    session.recv()
                lost_since = None
            except (WireError, OSError):
                lost_since = lost_since if lost_since is not None else self.now()
                if self.now() - lost_since > self.retry_s:
                    return
                with contextlib.suppress(WireError, OSError, Refused, AuthError):
                    self._rejoin_session()

    def _channel(self) -> Channel:
        ch = getattr(self._local, "channel", None)
        if ch is None:
            ch = self._open()
            ch.send({"op": "attach", "site": self.site, "worker": self.worker, "incarnation": self.incarnation})
            reply = ch.recv()
            if "refused" in reply:
                raise Refused(reply["refused"], field="site")
            self._local.channel = ch
        return ch

    def _drop_channel(self) -> None:
        ch = getattr(self._local, "channel", None)
        if ch is not None:
            ch.close()
            self._local.channel = None

    # -- requests ---------------------------------------------------------------------------------------------
    def call(self, op: str, *, retry_s: float | None = None, **fields: Any) -> dict[str, Any]:
        """One request, retried through coordinator outages (for ``retry_s``, by default the join timeout).
        Raises Evicted, MembershipError or Refused."""
        msg = {"op": op, **fields}
        t0 = self.now()
        deadline = t0 + (self.retry_s if retry_s is None else retry_s)
        delay = 0.05
        try:
            while True:
                if self._cut.is_set():  # cut off from everyone: wait for the link to come back
                    if self._stop.wait(0.05) or self.now() > deadline:
                        raise MembershipError(f"cut off from the coordinator for {self.retry_s:g} s")
                    continue
                try:
                    ch = self._channel()
                    ch.send(msg)
                    reply = ch.recv()
                except (WireError, OSError) as e:
                    self._drop_channel()
                    if self._stop.is_set():
                        raise MembershipError("the membership client was closed") from None
                    if self.now() + delay > deadline:
                        raise MembershipError(f"lost the coordinator at {self.address} for {self.retry_s:g} s "
                                              f"({getattr(e, 'strerror', None) or e})") from None
                    time.sleep(delay)
                    delay = min(1.0, delay * 2)
                    with contextlib.suppress(WireError, OSError):
                        self._rejoin_session()
                    continue
                if "rejoin" in reply:  # a restarted coordinator that has not seen this worker's session yet
                    with contextlib.suppress(WireError, OSError):
                        self._rejoin_session()
                    time.sleep(delay)
                    delay = min(1.0, delay * 2)
                    if self.now() > deadline:
                        raise MembershipError(f"could not join the restarted coordinator at {self.address}")
                    continue
                if "evicted" in reply:
                    raise Evicted(reply["evicted"])
                if "error" in reply:
                    raise (RunFinished if reply.get("finished") else MembershipError)(f"coordinator: {reply['error']}")
                return reply
        finally:
            if op not in ("set", "add", "check", "cas", "delete", "num_keys", "event", "events", "status"):
                self.coordination_seconds += self.now() - t0

    def remember(self, kind: str, key: Any, result: dict[str, Any]) -> None:
        self.view.decisions.append({"kind": kind, "key": key, "result": result})

    def form(self) -> dict[str, Any]:
        """Wait for the first generation; returns it (with ``resume_round`` when resuming)."""
        reply = self.call("form")
        self.view.gen, self.view.members = reply["gen"], list(reply["members"])
        self.view.launch = reply.get("launch")
        return reply

    def quorum(self, sync: int, *, round: int, attempt: int = 0) -> dict[str, Any]:
        """Who takes part in attempt ``attempt`` of sync ``sync`` (a retry always gets a new generation)."""
        self.view.round = round
        reply = self.call("quorum", sync=sync, attempt=attempt, gen=self.view.gen, round=round)
        self.view.gen, self.view.members = reply["gen"], list(reply["members"])
        self.remember("quorum", [sync, attempt], reply)
        return reply

    def vote(self, sync: int, *, gen: int, attempt: int, phase: str, ok: bool, stats: list[float] | None = None,
             error: str | None = None, position: Any = None, deadline_s: float | None = None) -> dict[str, Any]:
        fields: dict[str, Any] = {"sync": sync, "gen": gen, "attempt": attempt, "phase": phase, "ok": ok}
        if stats is not None:
            fields["stats"] = stats
        if error:
            fields["error"] = error
        if position is not None:
            fields["position"] = position
        if deadline_s is not None:
            fields["deadline_s"] = deadline_s
        reply = self.call("vote", **fields)
        self.remember("vote", [gen, sync, attempt, phase], reply)
        return reply

    def admit(self, sync: int) -> dict[str, Any]:
        reply = self.call("admit", sync=sync, gen=self.view.gen)
        self.view.gen, self.view.members = reply["gen"], list(reply["members"])
        self.remember("admit", sync, reply)
        return reply

    def await_admission(self) -> dict[str, Any]:
        reply = self.call("await_admission")
        self.view.gen, self.view.members = reply["gen"], list(reply["members"])
        self.view.launch = reply.get("launch")
        return reply

    def sum(self, name: str, values: list[float]) -> list[float]:
        return [float(v) for v in self.call("sum", name=name, values=list(values))["values"]]

    def event(self, kind: str, **fields: Any) -> None:
        with contextlib.suppress(MembershipError, Evicted):
            self.call("event", kind=kind, **fields)

    def events(self) -> list[dict[str, Any]]:
        return list(self.call("events")["events"])

    # -- faults -----------------------------------------------------------------------------------------------
    def cut(self, on: bool) -> None:
        """Emulate a network partition: no heartbeats, requests wait until the cut is healed."""
        (self._cut.set if on else self._cut.clear)()

    @property
    def is_cut(self) -> bool:
        return self._cut.is_set()

    def leave(self, reason: str) -> None:
        """Leave the run now, and stay able to :meth:`rejoin` later (a site whose power failed): the
        coordinator drops this site at once instead of waiting for its heartbeats to stop."""
        with contextlib.suppress(MembershipError, Evicted, ConfigError, WireError, OSError):
            self.call("leave", reason=reason, retry_s=10.0)

    # -- the end ----------------------------------------------------------------------------------------------
    def close(self, *, done: bool = False, reason: str | None = None) -> None:
        """Say goodbye (``done``: finished training; otherwise leaving with ``reason``) and close everything."""
        if self.joined and not self._stop.is_set() and not self._cut.is_set():
            with contextlib.suppress(MembershipError, Evicted, ConfigError, WireError, OSError):
                # through call(): a coordinator restarted since this thread last spoke is reconnected to
                self.call("done", retry_s=min(self.retry_s, 60.0)) if done else self.call(
                    "leave", reason=reason or "left", retry_s=10.0)
        self._stop.set()
        with self._channels_lock:
            for ch in self._channels:
                ch.close()
            self._channels.clear()
        self._session = None
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join(timeout=5.0)
