"""Process groups of a run: one group inside each site, and cross-site groups between sites, one per generation.

A site is a set of ``W`` workers joined by fast fabric (gloo on CPU; NCCL for GPU tensors and gloo for CPU
tensors on GPUs). Sites are joined by slow
links. Worker ``l`` of every member site belongs to cross-site group ``l`` of the current generation, so each
site's cross-site traffic is split over its ``W`` workers (each carries a 1/W shard of every payload). When
membership changes, every member builds its cross-site group again on the new generation's key prefix of the
coordinator's store (``geotrain.membership.store``); ranks in it follow the members' order.

The same environment contract serves the local launcher and ``torchrun`` on real clusters:

* ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` (set by torchrun, or by ``geotrain run``) describe
  the worker's own site: the site group is the default process group of that site's job.
* ``GEOTRAIN_SITE_RANK``, ``GEOTRAIN_SITES``, ``GEOTRAIN_COORDINATOR=host:port`` and
  ``GEOTRAIN_TOKEN_FILE`` place the site in the run; ``GEOTRAIN_RESUME=1`` resumes it from its checkpoints.

Groups are always passed explicitly to the code that uses them; world size 1 is not a special case.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from geotrain.comm.pacing import paced
from geotrain.comm.site_parallel import site_backend
from geotrain.errors import ConfigError
from geotrain.topology import Topology, pacing_rate

__all__ = ["SiteEnv", "cross_site_group", "init_site_group"]


@dataclass(frozen=True, slots=True)
class SiteEnv:
    """Where this worker sits in the run, read from the environment."""

    site_rank: int
    sites: int
    local_rank: int
    workers: int
    coordinator: str
    token_file: str | None = None
    """The run's secret (``geotrain coordinator --token-file``); None only where no coordinator is used."""
    resume: bool = False
    """Resume from this site's checkpoints (``geotrain run --resume``)."""
    local: bool = False
    """Started by ``geotrain run`` on one machine (which writes the run's files), not by torchrun."""
    real_network: bool = False
    """The links are real (``GEOTRAIN_NETWORK=netlab``: the network lab shapes them), so the WAN emulator adds no
    time; deadlines and predictions still use the configured links."""

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> SiteEnv:
        env = os.environ if environ is None else environ
        missing = [k for k in ("GEOTRAIN_SITE_RANK", "GEOTRAIN_SITES", "GEOTRAIN_COORDINATOR", "GEOTRAIN_TOKEN_FILE")
                   if k not in env]
        if missing:
            raise ConfigError(
                f"missing environment {', '.join(missing)}; start sites with 'geotrain run' or, on a cluster, "
                "'torchrun ... -m geotrain.train.site' with --site-rank, --sites, --coordinator and --token-file",
                field="site",
            )
        return cls(
            site_rank=int(env["GEOTRAIN_SITE_RANK"]),
            sites=int(env["GEOTRAIN_SITES"]),
            local_rank=int(env.get("RANK", "0")),
            workers=int(env.get("WORLD_SIZE", "1")),
            coordinator=env["GEOTRAIN_COORDINATOR"],
            token_file=env["GEOTRAIN_TOKEN_FILE"],
            resume=env.get("GEOTRAIN_RESUME", "") == "1",
            local=env.get("GEOTRAIN_LOCAL_LAUNCHER") == "1",
            real_network=env.get("GEOTRAIN_NETWORK") == "netlab",
        )


def init_site_group(*, device: str, timeout_s: float) -> Any:
    """Join this worker's site group: the default process group of the site's job."""
    if not dist.is_initialized():
        backend = site_backend(device)  # on GPUs both: NCCL for CUDA tensors, gloo for CPU-side sums
        timeout = datetime.timedelta(seconds=timeout_s)
        store = os.environ.get("GEOTRAIN_SITE_STORE")  # geotrain run: a file; torchrun: MASTER_ADDR/PORT
        if store:
            dist.init_process_group(backend=backend, init_method=f"file://{store}", rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    return dist.group.WORLD


def cross_site_group(store: Any, env: SiteEnv, *, generation: int, members: list[int], timeout_s: float,
                     tcp_pacing: str, topology: Topology | None = None) -> Any:
    """The gloo group of worker ``env.local_rank`` of each member site at ``generation``, on a fresh prefix of
    the coordinator's store. The kernel paces its connections as ``tcp_pacing`` says (``geotrain.comm.pacing``):
    with "link", where the links are real (``env.real_network``), the connection to each member site at
    ``geotrain.topology.pacing_rate`` of ``topology``'s link to it, shared by the site's workers."""
    prefix = dist.PrefixStore(f"cross/{env.local_rank}/gen{generation}/", store)
    me = members.index(env.site_rank)

    def rate_to(j: int) -> int | None:
        link = topology.link(env.site_rank, members[j]) if topology is not None else None
        return None if link is None else pacing_rate(link, streams=env.workers)

    capped = tcp_pacing == "link" and env.real_network and topology is not None and topology.emulated
    return paced(lambda: dist.ProcessGroupGloo(prefix, me, len(members), datetime.timedelta(seconds=timeout_s)),
                 mode=tcp_pacing if capped or tcp_pacing == "off" else "uncapped",
                 rate_to=rate_to, store=prefix, key="pacing", me=me, size=len(members))
