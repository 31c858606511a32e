"""Process groups of a run: one group inside each site, and cross-site groups between sites.

A site is a set of ``W`` workers joined by fast fabric (gloo on CPU, NCCL on GPU). Sites are joined by slow
links. Worker ``l`` of every site belongs to cross-site group ``l``, so each site's cross-site traffic is
split over its ``W`` workers (each carries a 1/W shard of every payload). Each cross-site group has a twin,
the control group, for the few floats of run control (stop votes, eval losses): on its own group a vote never
queues behind a payload still crossing the link.

The same environment contract serves the local launcher and ``torchrun`` on real clusters:

* ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` (set by torchrun, or by ``geotrain run``) describe
  the worker's own site: the site group is the default process group of that site's job.
* ``GEOTRAIN_SITE_RANK``, ``GEOTRAIN_SITES`` and ``GEOTRAIN_COORDINATOR=host:port`` place the site in the
  run; the coordinator hosts the key-value store the cross-site groups rendezvous on.

Groups are always passed explicitly to the code that uses them; world size 1 is not a special case.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from geotrain.errors import ConfigError

__all__ = ["SiteGroups", "SiteEnv", "connect_store", "init_groups", "new_cross_site_group"]


@dataclass(frozen=True, slots=True)
class SiteEnv:
    """Where this worker sits in the run, read from the environment."""

    site_rank: int
    sites: int
    local_rank: int
    workers: int
    coordinator: str

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> SiteEnv:
        env = os.environ if environ is None else environ
        missing = [k for k in ("GEOTRAIN_SITE_RANK", "GEOTRAIN_SITES", "GEOTRAIN_COORDINATOR") if k not in env]
        if missing:
            raise ConfigError(
                f"missing environment {', '.join(missing)}; start sites with 'geotrain run' or, on a cluster, "
                "'torchrun ... -m geotrain.train.site' with --site-rank, --sites and --coordinator",
                field="site",
            )
        return cls(
            site_rank=int(env["GEOTRAIN_SITE_RANK"]),
            sites=int(env["GEOTRAIN_SITES"]),
            local_rank=int(env.get("RANK", "0")),
            workers=int(env.get("WORLD_SIZE", "1")),
            coordinator=env["GEOTRAIN_COORDINATOR"],
        )


@dataclass(slots=True)
class SiteGroups:
    """The groups one worker talks on."""

    env: SiteEnv
    site_pg: Any
    """This site's workers (the fast fabric)."""
    cross_pg: Any
    """Worker ``local_rank`` of every site (the slow links)."""
    control_pg: Any
    """The same workers, for run control only (stop votes, eval losses)."""
    store: Any
    """The coordinator's store; cross-site groups are rebuilt on fresh prefixes of it."""
    generation: int = 0

    @property
    def site_rank(self) -> int:
        return self.env.site_rank

    @property
    def sites(self) -> int:
        return self.env.sites

    @property
    def local_rank(self) -> int:
        return self.env.local_rank

    @property
    def workers(self) -> int:
        return self.env.workers


def connect_store(address: str, *, is_server: bool = False, timeout_s: float = 60.0) -> dist.TCPStore:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"coordinator address {address!r} must be HOST:PORT", field="coordinator")
    return dist.TCPStore(
        host,
        int(port),
        is_master=is_server,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout_s),
        use_libuv=True,
    )


def new_cross_site_group(store: Any, env: SiteEnv, *, generation: int, timeout_s: float, channel: str = "cross") -> Any:
    """A gloo group of worker ``env.local_rank`` of each site, on a fresh prefix of the store (``channel``
    "cross" for payloads, "control" for run control)."""
    prefix = dist.PrefixStore(f"{channel}/{env.local_rank}/gen{generation}/", store)
    return dist.ProcessGroupGloo(prefix, env.site_rank, env.sites, datetime.timedelta(seconds=timeout_s))


def init_groups(env: SiteEnv, *, device: str, timeout_s: float) -> SiteGroups:
    """Join this worker's site group (default group of the site's job) and its cross-site group."""
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "nccl" if device == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timeout)
    site_pg = dist.group.WORLD
    store = connect_store(env.coordinator, timeout_s=timeout_s)
    cross_pg = new_cross_site_group(store, env, generation=0, timeout_s=timeout_s)
    control_pg = new_cross_site_group(store, env, generation=0, timeout_s=timeout_s, channel="control")
    return SiteGroups(env=env, site_pg=site_pg, cross_pg=cross_pg, control_pg=control_pg, store=store)
