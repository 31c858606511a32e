"""A real coordinator on loopback, in a background thread of the test process."""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from geotrain.membership.coordinator import Coordinator

__all__ = ["running_coordinator"]


class RunningCoordinator:
    def __init__(self, coordinator: Coordinator, loop: asyncio.AbstractEventLoop, port: int, secret: bytes) -> None:
        self.coordinator, self.loop, self.port, self.secret = coordinator, loop, port, secret

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the coordinator's loop and return its result (state is touched only there)."""
        done = threading.Event()
        box: list[Any] = []

        def run() -> None:
            try:
                box.append(fn(*args))
            finally:
                done.set()

        self.loop.call_soon_threadsafe(run)
        assert done.wait(30), "the coordinator's loop did not answer"
        return box[0] if box else None


@contextmanager
def running_coordinator(secret: bytes | None = None, port: int = 0, **kwargs: Any) -> Iterator[RunningCoordinator]:
    secret = secret or secrets.token_bytes(32)
    loop = asyncio.new_event_loop()
    coordinator = Coordinator(secret, **kwargs)
    started = threading.Event()
    box: list[int] = []

    def main() -> None:
        asyncio.set_event_loop(loop)
        box.append(loop.run_until_complete(coordinator.start("127.0.0.1", port)))
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=main, name="test-coordinator", daemon=True)
    thread.start()
    assert started.wait(30), "the coordinator did not start"
    try:
        yield RunningCoordinator(coordinator, loop, box[0], secret)
    finally:
        asyncio.run_coroutine_threadsafe(coordinator.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
