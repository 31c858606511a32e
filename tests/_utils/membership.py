"""Helpers of the membership tests: a clock the test moves by hand, calls on background threads with bounded
waits, and membership clients that are closed however the test ends."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from _utils.coordinator import RunningCoordinator, running_coordinator
from geotrain.membership.client import MembershipClient

__all__ = ["Background", "Clients", "FakeClock", "background", "closing_clients", "serving", "wait_until"]

WAIT_S = 30.0
"""The longest a test waits for something that happens at once on an idle machine (a bound, never a measure)."""


class FakeClock:
    """Seconds that pass only when the test says so (``advance``); readable from any thread."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = float(start)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.t

    def advance(self, seconds: float) -> float:
        assert seconds >= 0, "a clock does not go back"
        with self._lock:
            self.t += seconds
            return self.t


class Background:
    """``fn(*args)`` on a daemon thread; ``result()`` waits a bounded time and re-raises its error."""

    def __init__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self._box: list[Any] = []
        self._error: list[BaseException] = []

        def run() -> None:
            try:
                self._box.append(fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread by result()
                self._error.append(e)

        self.thread = threading.Thread(target=run, name=f"test-{getattr(fn, '__name__', 'call')}", daemon=True)
        self.thread.start()

    def done(self) -> bool:
        return not self.thread.is_alive()

    def result(self, timeout: float = WAIT_S) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"{self.thread.name} did not return within {timeout:g} s"
        if self._error:
            raise self._error[0]
        return self._box[0]


def background(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Background:
    return Background(fn, *args, **kwargs)


def wait_until(predicate: Callable[[], Any], *, what: str, timeout: float = WAIT_S, every: float = 0.01) -> Any:
    """Poll ``predicate`` until it is truthy (returned) or ``timeout`` real seconds pass (the test fails)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


class Clients:
    """Membership clients of one test, every one closed at the end (before the coordinator stops)."""

    def __init__(self, address: str, secret: bytes, *, sites: int = 2, workers: int = 1,
                 settings: dict[str, Any] | None = None) -> None:
        self.address, self.secret, self.sites, self.workers = address, secret, sites, workers
        self.settings = dict(settings or {})
        self.all: list[MembershipClient] = []

    def new(self, site: int, worker: int = 0, *, address: str | None = None, secret: bytes | None = None,
            fingerprint: dict[str, Any] | None = None, settings: dict[str, Any] | None = None,
            sites: int | None = None, workers: int | None = None) -> MembershipClient:
        client = MembershipClient(address or self.address, secret or self.secret, site=site, worker=worker,
                                  workers=self.workers if workers is None else workers,
                                  sites=self.sites if sites is None else sites, fingerprint=fingerprint,
                                  settings={**self.settings, **(settings or {})})
        self.all.append(client)
        return client

    def close_all(self) -> None:
        for c in self.all:
            c.cut(True)  # no goodbye: a test that ends early must not wait on a coordinator's reply
            c.close()


@contextmanager
def closing_clients(address: str, secret: bytes, **kwargs: Any) -> Iterator[Clients]:
    clients = Clients(address, secret, **kwargs)
    try:
        yield clients
    finally:
        clients.close_all()


@contextmanager
def serving(secret: bytes | None = None, **kwargs: Any) -> Iterator[RunningCoordinator]:
    """``running_coordinator`` whose event loop is also closed at the end (it holds a selector and sockets)."""
    box: list[RunningCoordinator] = []
    try:
        with running_coordinator(secret, **kwargs) as rc:
            box.append(rc)
            yield rc
    finally:
        if box and not box[0].loop.is_running():
            box[0].loop.close()
