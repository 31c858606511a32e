"""gloo's rendezvous store, served by the coordinator over the authenticated wire.

gloo builds a group by exchanging addresses through a ``torch.distributed.Store``. geotrain's store is this
Python subclass, whose every operation is a request to the coordinator, so the only way into a run's store is
through the run's secret. Each generation's groups use their own key prefix.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch.distributed as dist

from geotrain.membership.client import MembershipClient

__all__ = ["CoordinatorStore"]


def _bytes(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode()
    return bytes(value)


class CoordinatorStore(dist.Store):
    """A ``torch.distributed.Store`` whose keys live in the coordinator."""

    def __init__(self, client: MembershipClient, *, timeout_s: float = 60.0) -> None:
        super().__init__()
        self.client = client
        self._timeout = datetime.timedelta(seconds=timeout_s)

    # torch calls these
    def set(self, key: str, value: Any) -> None:
        self.client.call("set", key=key, value=_bytes(value).hex())

    def get(self, key: str) -> bytes:
        reply = self.client.call("get", key=key, timeout=self._timeout.total_seconds())
        return bytes.fromhex(reply["value"])

    def add(self, key: str, amount: int) -> int:
        return int(self.client.call("add", key=key, amount=int(amount))["value"])

    def check(self, keys: list[str]) -> bool:
        return bool(self.client.call("check", keys=list(keys))["ok"])

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        for key in keys:
            self.client.call("get", key=key, timeout=(timeout or self._timeout).total_seconds())

    def compare_set(self, key: str, expected: Any, desired: Any) -> bytes:
        reply = self.client.call("cas", key=key, expected=_bytes(expected).hex(), desired=_bytes(desired).hex())
        return bytes.fromhex(reply["value"])

    def delete_key(self, key: str) -> bool:
        return bool(self.client.call("delete", key=key)["ok"])

    def num_keys(self) -> int:
        return int(self.client.call("num_keys")["value"])

    def set_timeout(self, timeout: datetime.timedelta) -> None:
        self._timeout = timeout

    @property
    def timeout(self) -> datetime.timedelta:
        return self._timeout
