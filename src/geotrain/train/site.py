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
    """What every worker process needs, picklable: the config and how to build the workload."""

    config: Any
    workload_factory: Callable[..., Any]
    """Called as ``factory(config, worker=index, device=device, **factory_kwargs)`` inside the worker."""
    factory_kwargs: dict[str, Any] = field(default_factory=dict)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def site_main(task: SiteTask) -> int:
    """Train as one worker; returns the process exit code (0 ok, 1 failed, 130 interrupted)."""
    import torch

    from geotrain.algorithms import StrategyContext, build_strategy
    from geotrain.comm.collectives import CrossSiteComm
    from geotrain.comm.groups import SiteEnv, init_groups
    from geotrain.comm.transport import GlooTransport
    from geotrain.train.loop import train_loop
    from geotrain.train.recorder import Recorder
    from geotrain.wan.emulator import EmulatedWan

    torch.set_num_threads(1)  # one thread per worker: several workers share the cores
    signal.signal(signal.SIGTERM, _raise_interrupt)
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

        transport: Any = GlooTransport(groups.cross_pg, rank=env.site_rank, size=env.sites, control_pg=groups.control_pg)
        topology = config.topology()
        if topology.emulated:
            transport = EmulatedWan(transport, topology=topology, members=list(range(env.sites)), streams=env.workers)
        codec = None
        if config.comm.codec != "fp32":
            from geotrain.comm.codecs import get_codec

            opts: dict[str, Any] = {}
            if config.comm.block_size:
                opts["block_size"] = config.comm.block_size
            if config.comm.codec.startswith("topk"):
                opts["fraction"] = config.comm.topk_fraction
            codec = get_codec(config.comm.codec, **opts)
            # Compile (or load from cache) the codec's kernels now, during setup: a first encode inside the
            # training loop would charge seconds of JIT compilation to the first sync.
            codec.decode(codec.encode(torch.ones(4096)))
        comm = CrossSiteComm(transport, site_pg=groups.site_pg, local_rank=env.local_rank, workers=env.workers, codec=codec,
                              pattern=config.comm.pattern)
        ctx = StrategyContext(model=workload.model, comm=comm, site_pg=groups.site_pg, workers=env.workers)
        strategy = build_strategy(config, ctx)
        recorder.write("start", site=env.site_rank, worker=env.local_rank, pid=os.getpid(), steps_planned=max(1, config.run.tokens // (workload.tokens_per_batch * env.workers * env.sites)),
                       param_bytes=4 * sum(p.numel() for p in ctx.params),
                       payload_bytes_per_sync=strategy.sync_bytes_per_round(), collective=comm.pattern, meta=workload.meta or {})

        result = train_loop(config, workload, strategy=strategy, comm=comm, recorder=recorder,
                            site=env.site_rank, worker=worker)

        if env.site_rank == 0 and env.local_rank == 0:
            from safetensors.torch import save_file

            names = [n for n, p in workload.model.named_parameters() if p.requires_grad]
            tensors = {n: t.detach().to("cpu").contiguous().clone() for n, t in zip(names, strategy.global_parameters())}
            tmp = out / "model.safetensors.tmp"
            save_file(tensors, str(tmp), metadata={"params_sha256": result.params_sha256})
            os.replace(tmp, out / "model.safetensors")
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
    return site_main(SiteTask(config=config, workload_factory=_load_factory(args.workload), factory_kwargs=kwargs))


if __name__ == "__main__":
    sys.exit(main())
