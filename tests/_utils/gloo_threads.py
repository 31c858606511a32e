"""Run K ranks of a gloo group as threads of this process (fast, no spawning), as torchft's tests do."""

from __future__ import annotations

import datetime
import threading
import uuid
from collections.abc import Callable
from typing import Any

import torch.distributed as dist


_STORE: list[Any] = []


def _store() -> Any:
    """One store per process, shared by every call under fresh prefixes (a second store server in the same
    process was seen to leave the next group's rendezvous waiting)."""
    if not _STORE:
        _STORE.append(dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=600)))
    return _STORE[0]


def run_threads(bodies: list[Callable[[], Any]], *, timeout_s: float, what: str = "a thread") -> list[Any]:
    """Call each of ``bodies`` on its own thread; returns their results in order, raises the first error, and
    fails if one is still running after ``timeout_s``."""
    results: list[Any] = [None] * len(bodies)
    errors: list[BaseException] = []

    def call(i: int) -> None:
        try:
            results[i] = bodies[i]()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread below
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads), f"{what} did not finish in time"
    return results


def run_ranks(k: int, body: Callable[[int, Any], Any], *, timeout_s: float = 60.0) -> list[Any]:
    """Call ``body(rank, pg)`` on K threads sharing one in-process store; returns their results by rank."""
    store = _store()
    prefix = f"t{uuid.uuid4().hex}/"  # never meet a previous call's keys, even on a reused port

    def worker(rank: int) -> Any:
        # each rank its own client connection: one store client is not safe to share between threads
        client = dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
        pg = dist.ProcessGroupGloo(dist.PrefixStore(prefix, client), rank, k, datetime.timedelta(seconds=timeout_s))
        return body(rank, pg)

    return run_threads([lambda r=r: worker(r) for r in range(k)], timeout_s=timeout_s, what="a rank")
