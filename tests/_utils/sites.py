"""Whole runs in one process: every worker of every site as a thread, on gloo, each site on its own virtual
clock, through the same wiring a site process uses (a real coordinator on loopback, ``geotrain.train.site``'s
``connect`` and ``prepare``) and the one training loop.

A site's workload "computes" by advancing its clock, so every figure of the run (compute, communication wait,
utilization, when a budget stops the run) is exact arithmetic that no machine load can change, while the
payloads really cross gloo and the strategies really average them.
"""

from __future__ import annotations

import datetime
import itertools
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from _utils.coordinator import running_coordinator
from _utils.gloo_threads import _store, run_threads
from geotrain.clock import VirtualClock
from geotrain.comm.groups import SiteEnv
from geotrain.config import load_config
from geotrain.membership.client import MembershipClient
from geotrain.train.loop import Boundary, LoopResult, train_loop
from geotrain.train.recorder import Recorder
from geotrain.train.site import connect, model_fingerprint, prepare
from geotrain.train.workload import Workload

__all__ = ["SiteRun", "clocked_workload", "run_comms", "run_sites", "site_client"]

FAST = {"heartbeat_s": 0.2, "heartbeat_timeout_s": 5.0, "quorum_timeout_s": 60.0, "join_timeout_s": 120.0}
"""Membership settings of in-process tests: liveness deadlines only, generous enough for a loaded machine."""


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


_INIT_LOCK = threading.Lock()


def clocked_workload(config: Any, *, worker: int, clock: VirtualClock, step_seconds: float,
                     eval_seconds: float = 0.0) -> Workload:
    """A small regression whose training step costs exactly ``step_seconds`` on ``clock`` (evaluation
    ``eval_seconds``, which the loop pauses). Every site starts from the same model (seeded by run.seed)."""
    with _INIT_LOCK:  # the global generator is shared by the sites' threads: seed and build in one go
        torch.manual_seed(config.run.seed)
        model = _Net()
        target = _Net()
    gen = torch.Generator().manual_seed(1000 + worker)

    def batches() -> Iterator[torch.Tensor]:
        while True:
            yield torch.randn(4, 8, generator=gen)

    def loss(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        clock.advance(step_seconds if m.training else eval_seconds)
        with torch.no_grad():
            y = target(x)
        return ((m(x) - y) ** 2).mean()

    evals = [torch.randn(4, 8, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    return Workload(model=model, loss=loss, batches=batches(), tokens_per_batch=4, eval_batches=evals,
                    data_state=lambda: {"rng": gen.get_state().tolist()},
                    load_data_state=lambda s: gen.set_state(torch.tensor(s["rng"], dtype=torch.uint8)))


class SiteRun:
    """What one worker of an in-process run ended with."""

    def __init__(self, site: int, worker: int, clock: VirtualClock, result: LoopResult, config: Any,
                 chosen: list[Any], strategy: Any, comm: Any = None) -> None:
        self.site, self.worker, self.clock, self.result = site, worker, clock, result
        self.config, self.chosen, self.strategy, self.comm = config, chosen, strategy, comm

    @property
    def figures(self) -> dict[str, Any]:
        return self.result.figures


def _site_group(site: int, local: int, workers: int, prefix: str, timeout_s: float) -> Any:
    store = _store()
    client = dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.ProcessGroupGloo(dist.PrefixStore(f"{prefix}site{site}/", client), local, workers,
                                 datetime.timedelta(seconds=timeout_s))


def site_client(address: str, secret: bytes, config: Any, *, site: int, local: int, model: nn.Module | None = None,
                ) -> MembershipClient:
    """A worker's membership client, joined (not yet formed)."""
    client = MembershipClient(address, secret, site=site, worker=local, workers=config.run.workers_per_site,
                              sites=config.run.sites,
                              fingerprint=None if model is None else model_fingerprint(config, model),
                              settings={k: getattr(config.membership, k) for k in
                                        ("min_sites", "heartbeat_s", "heartbeat_timeout_s", "quorum_timeout_s",
                                         "join_timeout_s")})
    client.join()
    return client


def _fast(config: Any) -> Any:
    """The config with liveness deadlines of in-process tests, unless the test set its own."""
    given = config.membership
    defaults = type(given)()
    keep = {f"membership.{k}": v for k, v in FAST.items() if getattr(given, k) == getattr(defaults, k)}
    if config.checkpoint.every_rounds is None:
        keep["checkpoint.every_rounds"] = 0  # no checkpoints unless a test asks (they need a directory)
    return config.updated(keep) if keep else config


def run_comms(k: int, body: Callable[[int, Any], Any], *, config: Any = None, clocks: list[Any] | None = None,
              timeout_s: float = 120.0, **settings: Any) -> list[Any]:
    """``body(site, comm)`` on ``k`` threads, one site each, every ``comm`` a CrossSiteComm joined through a
    real coordinator (``settings``: dotted config keys such as ``comm.codec``). Returns the bodies' results."""
    config = _fast(config or load_config(values={"run.sites": k, "wan.link": "none", **settings}))
    prefix = f"c{uuid.uuid4().hex}/"
    with running_coordinator() as rc:
        def worker(site: int) -> Any:
            torch.set_num_threads(1)
            client = site_client(rc.address, rc.secret, config, site=site, local=0)
            formed = client.form()
            env = SiteEnv(site_rank=site, sites=k, local_rank=0, workers=1, coordinator=rc.address)
            comm = connect(config, env, _site_group(site, 0, 1, prefix, timeout_s), client,
                           generation=formed["gen"], members=formed["members"],
                           clock=None if clocks is None else clocks[site])
            try:
                return body(site, comm)
            finally:
                comm.close()
                client.close(done=True)

        return run_threads([lambda s=s: worker(s) for s in range(k)], timeout_s=timeout_s, what="a site")


def run_sites(config: Any, *, workload: Callable[..., Workload] | None = None, step_seconds: float | list[float] = 0.1,
              timeout_s: float = 120.0, boundary: Callable[[int, int, Any], Boundary | None] | None = None,
              pace: Callable[[int], Any] | None = None) -> list[SiteRun]:
    """Run ``config`` (sites x workers_per_site threads) to the end; returns each worker's outcome, site by site.

    ``step_seconds`` is the virtual compute of one training step, one figure or one per site. ``boundary``:
    ``boundary(site, worker, comm)`` gives a worker's checkpoints, admissions and step hooks; ``pace(site)``
    its speed factor and power controller (``geotrain.train.pace.Pace``).
    """
    config = _fast(config)
    k, w = config.run.sites, config.run.workers_per_site
    per_site = step_seconds if isinstance(step_seconds, list) else [step_seconds] * k
    clocks = [VirtualClock() for _ in range(k)]
    prefix = f"sites{uuid.uuid4().hex}/"

    with running_coordinator() as rc:
        def body(site: int, local: int) -> SiteRun:
            torch.set_num_threads(1)
            site_pg = _site_group(site, local, w, prefix, timeout_s)
            factory = workload or clocked_workload
            wl = factory(config, worker=site * w + local, clock=clocks[site], step_seconds=per_site[site])
            client = site_client(rc.address, rc.secret, config, site=site, local=local, model=wl.model)
            formed = client.form()
            env = SiteEnv(site_rank=site, sites=k, local_rank=local, workers=w, coordinator=rc.address)
            comm = connect(config, env, site_pg, client, generation=formed["gen"], members=formed["members"],
                           clock=clocks[site])
            run_config, strategy, chosen = prepare(config, wl, comm, site_pg)
            result = train_loop(run_config, wl, strategy=strategy, comm=comm, recorder=Recorder(None), site=site,
                                worker=site * w + local,
                                boundary=None if boundary is None else boundary(site, local, comm),
                                pace=None if pace is None else pace(site))
            comm.close()
            client.close(done=True)
            return SiteRun(site, local, clocks[site], result, run_config, chosen, strategy, comm)

        return run_threads([lambda s=s, l=l: body(s, l) for s, l in itertools.product(range(k), range(w))],
                           timeout_s=timeout_s, what="a worker")
