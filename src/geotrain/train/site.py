"""The per-site entry point: one worker of one site.

Runs in a process started by ``geotrain run`` (all sites on this machine) or by ``torchrun`` on a real
cluster, one torchrun job per site::

    # on the coordinator host (any machine every site can reach over a private network or VPN)
    geotrain coordinator --port 29400
    # on each site k of N, with W workers:
    torchrun --nproc-per-node W --master-port 29500 -m geotrain.train.site \\
        --config run.toml --site-rank k --sites N --coordinator coordinator-host:29400

gloo between sites uses plain TCP with no encryption: keep cross-site links on a private network or VPN.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SiteTask", "site_main"]


@dataclass(slots=True)
class SiteTask:
    """What every worker process needs, picklable: the config, how to build the workload, and the definitions
    of the algorithm and codec it names (so that ones registered at run time, not on import, reach the
    worker too)."""

    config: Any
    workload_factory: Callable[..., Any]
    """Called as ``factory(config, worker=index, device=device, **factory_kwargs)`` inside the worker."""
    factory_kwargs: dict[str, Any] = field(default_factory=dict)
    definitions: list[Any] = field(default_factory=list)
    """Algorithm and codec definitions to register in the worker before anything reads the registries."""

    @classmethod
    def of(cls, config: Any, workload_factory: Callable[..., Any], factory_kwargs: dict[str, Any] | None = None,
           ) -> SiteTask:
        from geotrain.comm.codecs.registry import get_codec_spec

        return cls(config=config, workload_factory=workload_factory, factory_kwargs=dict(factory_kwargs or {}),
                   definitions=[config.algorithm(), get_codec_spec(config.comm.codec)])


def _register(definitions: list[Any]) -> None:
    from geotrain.algorithms import Algorithm, register_algorithm
    from geotrain.comm.codecs.registry import CodecSpec, register_codec

    for d in definitions:
        if isinstance(d, Algorithm):
            register_algorithm(d)
        elif isinstance(d, CodecSpec):
            register_codec(d)


def measure_step_seconds(workload: Any, *, clock: Any, repeats: int = 3) -> float:
    """Compute seconds of one forward and backward pass on a training batch (the median of ``repeats`` after a
    warm-up), for the settings a run chooses itself. The batch goes back to the stream, the gradients and the
    buffers the passes touched (batch-norm statistics) are restored, the random state is forked (dropout) and
    no optimizer steps, so the run trains as it would have with the chosen settings given."""
    import itertools
    import statistics

    import torch

    model = workload.model
    batch = next(workload.batches)
    workload.batches = itertools.chain([batch], workload.batches)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    cuda = next((p.device for p in model.parameters() if p.device.type == "cuda"), None)
    times = []
    with torch.random.fork_rng(devices=[cuda] if cuda is not None else []):
        for _ in range(repeats + 1):
            t0 = clock.now()
            workload.loss(model, batch).backward()
            if cuda is not None:
                torch.cuda.synchronize(cuda)  # kernels run asynchronously: time them, not their launch
            times.append(clock.now() - t0)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    return statistics.median(times[1:])


def _agree_on_step_seconds(seconds: float, comm: Any, site_pg: Any, *, site: int, workers: int) -> float:
    """The fastest site's step time, the same number on every worker of every site: a transfer must hide
    behind the compute of the site that waits for it first."""
    import torch

    mine = torch.tensor([seconds], dtype=torch.float64)
    if workers > 1:  # the site's workers agree first (each talks to the other sites on its own group)
        site_pg.allreduce([mine]).wait()
        mine /= workers
    votes = [0.0] * comm.sites
    votes[site] = float(mine[0])
    return min(comm.control_sum(votes, count_wait=False))


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def connect(config: Any, groups: Any, *, clock: Any = None) -> Any:
    """This worker's cross-site collective: gloo on its cross-site group, wrapped in the WAN emulation when the
    config sets a link, with the config's codec (its kernels compiled now, during setup: a first encode inside
    the training loop would charge seconds of JIT compilation to the first sync)."""
    import torch

    from geotrain.clock import REAL_CLOCK
    from geotrain.comm.collectives import CrossSiteComm
    from geotrain.comm.transport import GlooTransport
    from geotrain.wan.emulator import EmulatedWan

    clock = REAL_CLOCK if clock is None else clock
    env = groups.env
    transport: Any = GlooTransport(groups.cross_pg, rank=env.site_rank, size=env.sites, control_pg=groups.control_pg,
                                   clock=clock)
    topology = config.topology()
    if topology.emulated:
        transport = EmulatedWan(transport, topology=topology, members=list(range(env.sites)), streams=env.workers,
                                clock=clock)
    comm = CrossSiteComm(transport, site_pg=groups.site_pg, local_rank=env.local_rank, workers=env.workers,
                         codec=config.codec(), pattern=config.comm.pattern, clock=clock)
    if comm.codec is not None:
        comm.codec.decode(comm.codec.encode(torch.ones(4096)))
    return comm


def prepare(config: Any, workload: Any, comm: Any, groups: Any) -> tuple[Any, Any, list[Any]]:
    """Choose the settings the config leaves to the run (from the measured step time, the same on every
    worker) and build the algorithm's strategy. Returns (config as run, strategy, the choices)."""
    from geotrain.algorithms import ModelLayout
    from geotrain.algorithms.strategies.base import StrategyContext
    from geotrain.algorithms.timing import choose_unset

    env = groups.env
    ctx = StrategyContext(model=workload.model, comm=comm, site_pg=groups.site_pg, workers=env.workers)
    chosen: list[Any] = []
    if config.algorithm().unset(config):
        seconds = _agree_on_step_seconds(measure_step_seconds(workload, clock=comm.clock), comm, groups.site_pg,
                                         site=env.site_rank, workers=env.workers)
        layout = ModelLayout.of([(n, p.numel()) for n, p in workload.model.named_parameters() if p.requires_grad])
        config, chosen = choose_unset(config, layout, step_seconds=seconds)
    return config, config.algorithm().build(config, ctx), chosen


def site_main(task: SiteTask) -> int:
    """Train as one worker; returns the process exit code (0 ok, 1 failed, 130 interrupted)."""
    import torch

    from geotrain.comm.groups import SiteEnv, init_groups
    from geotrain.config import inner_steps
    from geotrain.train.loop import train_loop
    from geotrain.train.recorder import Recorder

    torch.set_num_threads(1)  # one thread per worker: several workers share the cores
    signal.signal(signal.SIGTERM, _raise_interrupt)
    _register(task.definitions)
    config = task.config
    env = SiteEnv.from_environ()
    out = Path(config.run.out)
    recorder = Recorder(out / "sites" / f"site{env.site_rank}.jsonl" if env.local_rank == 0 else None)
    comm = None
    try:
        device = config.run.device
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", env.local_rank)))
        groups = init_groups(env, device=device, timeout_s=config.run.collective_timeout_s)
        worker = env.site_rank * env.workers + env.local_rank
        workload = task.workload_factory(config, worker=worker, device=device, **task.factory_kwargs)

        comm = connect(config, groups)
        config, strategy, chosen = prepare(config, workload, comm, groups)
        ctx = strategy.ctx
        recorder.write("start", site=env.site_rank, worker=env.local_rank, pid=os.getpid(),
                       steps_planned=inner_steps(config.run.tokens, workload.tokens_per_batch * env.workers * env.sites),
                       param_bytes=4 * sum(p.numel() for p in ctx.params), sync_payloads=strategy.sync_payloads(),
                       payload_bytes_per_sync=strategy.sync_bytes_per_round(), collective=comm.pattern,
                       settings=config.algorithm().describe(config),
                       auto=[{"key": a.key, "value": a.value, "reason": a.reason} for a in chosen],
                       meta=workload.meta or {})

        result = train_loop(config, workload, strategy=strategy, comm=comm, recorder=recorder,
                            site=env.site_rank, worker=worker)

        if env.site_rank == 0 and env.local_rank == 0:
            from safetensors.torch import save_file

            from geotrain.files import replacing

            names = [n for n, p in workload.model.named_parameters() if p.requires_grad]
            tensors = {n: t.detach().to("cpu").contiguous().clone() for n, t in zip(names, strategy.global_parameters())}
            with replacing(out / "model.safetensors") as tmp:
                save_file(tensors, str(tmp), metadata={"params_sha256": result.params_sha256})
        recorder.write("done", site=env.site_rank, eval_loss=result.eval_loss, params_sha256=result.params_sha256,
                       stopped_early=result.stopped_early, **result.figures)
        return 0
    except KeyboardInterrupt:
        recorder.write("interrupted", site=env.site_rank)
        return 130
    except BaseException as e:  # noqa: BLE001 - the launcher shows this site's error and stops the run
        recorder.write("error", site=env.site_rank, message=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        traceback.print_exc()
        return 1
    finally:
        recorder.close()


def _load_factory(ref: str) -> Callable[..., Any]:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name or "workload")


def main(argv: list[str] | None = None) -> int:
    """``python -m geotrain.train.site``: one worker under torchrun (or any launcher that sets RANK etc.)."""
    from geotrain.config import load_config
    from geotrain.errors import ConfigError

    p = argparse.ArgumentParser(prog="python -m geotrain.train.site", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="run configuration (TOML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    p.add_argument("--site-rank", type=int, required=True)
    p.add_argument("--sites", type=int, required=True)
    p.add_argument("--coordinator", required=True, help="HOST:PORT of 'geotrain coordinator'")
    p.add_argument("--workload", default="geotrain.train.workload:demo_workload",
                   help="MODULE:FUNCTION building the Workload (called with config, worker=, device=)")
    p.add_argument("--data-dir", help="prepared corpus directory for the demo workload (default: OUT/data, prepared on first use)")
    args = p.parse_args(argv)
    try:
        config = load_config(args.config, overrides=args.set, values={"run.sites": args.sites})
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ.update(GEOTRAIN_SITE_RANK=str(args.site_rank), GEOTRAIN_SITES=str(args.sites),
                      GEOTRAIN_COORDINATOR=args.coordinator)
    kwargs = {"data_dir": Path(args.data_dir)} if args.data_dir else {}
    return site_main(SiteTask.of(config, _load_factory(args.workload), kwargs))


if __name__ == "__main__":
    sys.exit(main())
