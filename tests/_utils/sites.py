"""Whole runs in one process: every worker of every site as a thread, on gloo, each site on its own virtual
clock, through the same wiring a site process uses (``geotrain.train.site.connect`` and ``prepare``) and the
one training loop.

A site's workload "computes" by advancing its clock, so every figure of the run (compute, communication wait,
utilization, when a budget stops the run) is exact arithmetic that no machine load can change, while the
payloads really cross gloo and the strategies really average them.
"""

from __future__ import annotations

import datetime
import itertools
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from _utils.gloo_threads import _store, run_threads
from geotrain.clock import VirtualClock
from geotrain.comm.groups import SiteEnv, SiteGroups
from geotrain.train.loop import LoopResult, train_loop
from geotrain.train.recorder import Recorder
from geotrain.train.site import connect, prepare
from geotrain.train.workload import Workload

__all__ = ["SiteRun", "clocked_workload", "run_sites"]


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def clocked_workload(config: Any, *, worker: int, clock: VirtualClock, step_seconds: float,
                     eval_seconds: float = 0.0) -> Workload:
    """A small regression whose training step costs exactly ``step_seconds`` on ``clock`` (evaluation
    ``eval_seconds``, which the loop pauses). Every site starts from the same model (seeded by run.seed)."""
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
    return Workload(model=model, loss=loss, batches=batches(), tokens_per_batch=4, eval_batches=evals)


class SiteRun:
    """What one worker of an in-process run ended with."""

    def __init__(self, site: int, worker: int, clock: VirtualClock, result: LoopResult, config: Any,
                 chosen: list[Any], strategy: Any) -> None:
        self.site, self.worker, self.clock, self.result = site, worker, clock, result
        self.config, self.chosen, self.strategy = config, chosen, strategy

    @property
    def figures(self) -> dict[str, Any]:
        return self.result.figures


def run_sites(config: Any, *, workload: Callable[..., Workload] | None = None, step_seconds: float | list[float] = 0.1,
              timeout_s: float = 120.0) -> list[SiteRun]:
    """Run ``config`` (sites x workers_per_site threads) to the end; returns each worker's outcome, site by site.

    ``step_seconds`` is the virtual compute of one training step, one figure or one per site.
    """
    k, w = config.run.sites, config.run.workers_per_site
    per_site = step_seconds if isinstance(step_seconds, list) else [step_seconds] * k
    clocks = [VirtualClock() for _ in range(k)]
    store = _store()
    prefix = f"sites{uuid.uuid4().hex}/"
    timeout = datetime.timedelta(seconds=timeout_s)

    def group(name: str, rank: int, size: int) -> Any:
        client = dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=timeout)
        return dist.ProcessGroupGloo(dist.PrefixStore(prefix + name, client), rank, size, timeout)

    def body(site: int, local: int) -> SiteRun:
        torch.set_num_threads(1)
        env = SiteEnv(site_rank=site, sites=k, local_rank=local, workers=w, coordinator="in-process")
        groups = SiteGroups(env=env, site_pg=group(f"site{site}/", local, w),
                            cross_pg=group(f"cross{local}/", site, k), control_pg=group(f"control{local}/", site, k),
                            store=None)
        factory = workload or clocked_workload
        wl = factory(config, worker=site * w + local, clock=clocks[site], step_seconds=per_site[site])
        comm = connect(config, groups, clock=clocks[site])
        run_config, strategy, chosen = prepare(config, wl, comm, groups)
        result = train_loop(run_config, wl, strategy=strategy, comm=comm, recorder=Recorder(None), site=site,
                            worker=site * w + local)
        comm.close()
        return SiteRun(site, local, clocks[site], result, run_config, chosen, strategy)

    return run_threads([lambda s=s, l=l: body(s, l) for s, l in itertools.product(range(k), range(w))],
                       timeout_s=timeout_s, what="a worker")
