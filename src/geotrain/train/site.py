"""The per-site entry point: one worker of one site.

Runs in a process started by ``geotrain run`` (all sites on this machine) or by ``torchrun`` on a real
cluster, one torchrun job per site::

    # on the coordinator host (any machine every site can reach over a private network or VPN)
    geotrain coordinator --port 29400 --token-file run.token     # writes a fresh secret the first time
    # on each site k of N, with W workers (run.token copied there, mode 600):
    torchrun --nproc-per-node W --master-port 29500 -m geotrain.train.site \\
        --config run.toml --site-rank k --sites N --coordinator coordinator-host:29400 --token-file run.token

A worker joins the run through the coordinator (``geotrain.membership``). If the run has not started, it
waits for the first generation with the other sites; if it is going on (this site was killed and started
again, or cut off and dropped), it waits to be admitted at a round boundary and receives the current state
from a live peer. gloo between sites uses plain TCP with no encryption: keep cross-site links on a private
network or VPN.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SiteTask", "connect", "prepare", "site_main"]

MAX_REJOINS = 50
"""Times one site process may be dropped and join again before it gives up."""


@dataclass(slots=True)
class SiteTask:
    """What every worker process needs, picklable: the config, how to build the workload, the definitions
    of the algorithm and codec it names (so that ones registered at run time, not on import, reach the
    worker too), and the faults scheduled for the run."""

    config: Any
    workload_factory: Callable[..., Any]
    """Called as ``factory(config, worker=index, device=device, **factory_kwargs)`` inside the worker."""
    factory_kwargs: dict[str, Any] = field(default_factory=dict)
    definitions: list[Any] = field(default_factory=list)
    """Algorithm and codec definitions to register in the worker before anything reads the registries."""
    faults: list[Any] = field(default_factory=list)
    """``geotrain.faults.Fault`` scheduled for the run (every site reads the schedule)."""

    @classmethod
    def of(cls, config: Any, workload_factory: Callable[..., Any], factory_kwargs: dict[str, Any] | None = None,
           faults: list[Any] | None = None) -> SiteTask:
        from geotrain.comm.codecs.registry import get_codec_spec

        return cls(config=config, workload_factory=workload_factory, factory_kwargs=dict(factory_kwargs or {}),
                   definitions=[config.algorithm(), get_codec_spec(config.comm.codec)], faults=list(faults or []))


def _register(definitions: list[Any]) -> None:
    from geotrain.algorithms import Algorithm, register_algorithm
    from geotrain.comm.codecs.registry import CodecSpec, register_codec

    for d in definitions:
        if isinstance(d, Algorithm):
            register_algorithm(d)
        elif isinstance(d, CodecSpec):
            register_codec(d)


def measure_step_seconds(workload: Any, *, clock: Any, repeats: int = 3, precision: str = "fp32") -> float:
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
    autocast = torch.autocast("cuda" if cuda is not None else "cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    times = []
    with torch.random.fork_rng(devices=[cuda] if cuda is not None else []):
        for _ in range(repeats + 1):
            t0 = clock.now()
            with autocast:
                loss = workload.loss(model, batch)
            loss.backward()
            if cuda is not None:
                torch.cuda.synchronize(cuda)  # kernels run asynchronously: time them, not their launch
            times.append(clock.now() - t0)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    return statistics.median(times[1:])


def _agree_on_step_seconds(seconds: float, comm: Any, site_pg: Any, *, site: int, sites: int, workers: int) -> float:
    """The fastest site's step time, the same number on every worker of every site: a transfer must hide
    behind the compute of the site that waits for it first."""
    import torch

    mine = torch.tensor([seconds], dtype=torch.float64)
    if workers > 1:  # the site's workers agree first (each talks to the other sites on its own group)
        site_pg.allreduce([mine]).wait()
        mine /= workers
    votes = [0.0] * sites
    votes[site] = float(mine[0])
    return min(v for v in comm.control_sum("step_seconds", votes, count_wait=False) if v > 0)


def check_cuda() -> None:
    """``device = "cuda"`` needs a CUDA build of torch and a visible GPU (ConfigError, exit 2, otherwise)."""
    import torch

    from geotrain.errors import ConfigError

    if not torch.cuda.is_available():
        why = ("this torch is a CPU build (torch.version.cuda is None); install a CUDA build" if torch.version.cuda
               is None else "no CUDA device is visible (check CUDA_VISIBLE_DEVICES and the driver)")
        raise ConfigError(f"--device cuda, but {why}; or run with --device cpu", field="run.device")


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def connect(config: Any, env: Any, site_pg: Any, client: Any, *, generation: int, members: list[int],
            clock: Any = None, conditions: Any = None) -> Any:
    """This worker's cross-site collective: gloo groups rebuilt on each generation (through the coordinator's
    store), wrapped in the WAN emulation when the config sets a link, with the config's codec (its kernels
    compiled now, during setup: a first encode inside the training loop would charge seconds of JIT
    compilation to the first sync)."""
    import torch

    from geotrain.clock import REAL_CLOCK
    from geotrain.comm.collectives import CrossSiteComm
    from geotrain.comm.groups import cross_site_group
    from geotrain.comm.transport import GlooTransport
    from geotrain.faults import LinkConditions
    from geotrain.membership.deadlines import transfer_deadline
    from geotrain.membership.store import CoordinatorStore
    from geotrain.wan.emulator import EmulatedWan

    clock = REAL_CLOCK if clock is None else clock
    conditions = LinkConditions() if conditions is None else conditions
    store = CoordinatorStore(client, timeout_s=config.membership.transfer_floor_s)
    topology = config.topology()

    def make_transport(gen: int, group_members: list[int]) -> Any:
        pg = cross_site_group(store, env, generation=gen, members=group_members,
                              timeout_s=config.membership.transfer_floor_s, tcp_pacing=config.comm.tcp_pacing,
                              topology=topology)
        deadline = transfer_deadline(config, group_members, streams=env.workers)
        transport: Any = GlooTransport(pg, rank=group_members.index(env.site_rank), size=len(group_members),
                                       members=group_members, clock=clock, deadline=deadline)
        if topology.emulated and not env.real_network:
            transport = EmulatedWan(transport, topology=lambda: topology.slowed(conditions.slow),
                                    streams=env.workers, clock=clock, deadline=deadline)
        return transport

    nominal = transfer_deadline(config, list(range(config.run.sites)), streams=env.workers)
    comm = CrossSiteComm(
        membership=client, make_transport=make_transport, site=env.site_rank, sites=config.run.sites,
        site_pg=site_pg, local_rank=env.local_rank, workers=env.workers, codec=config.codec(),
        generation=generation, members=members, pattern=config.comm.pattern, guard=config.guard,
        max_attempts=config.membership.max_attempts,
        vote_deadline=lambda nbytes: nominal("reduce_scatter", nbytes) + config.membership.transfer_floor_s,
        clock=clock, sharded=config.run.fsdp and env.workers > 1)
    comm.codec.decode(comm.codec.encode(torch.ones(4096)))
    return comm


def prepare(config: Any, workload: Any, comm: Any, site_pg: Any, *, measure: bool = True) -> tuple[Any, Any, list[Any]]:
    """Choose the settings the config leaves to the run (from the measured step time, the same on every
    worker) and build the algorithm's strategy. Returns (config as run, strategy, the choices). A resumed or
    healed site passes ``measure=False``: its config as run comes with its state."""
    from geotrain.algorithms import ModelLayout
    from geotrain.algorithms.strategies.base import StrategyContext
    from geotrain.algorithms.timing import choose_unset, unset_settings

    ctx = StrategyContext(model=workload.model, comm=comm, site_pg=site_pg, workers=comm.workers)
    chosen: list[Any] = []
    if measure and unset_settings(config):
        seconds = _agree_on_step_seconds(measure_step_seconds(workload, clock=comm.clock,
                                                              precision=config.run.precision), comm, site_pg,
                                         site=comm.site, sites=config.run.sites, workers=comm.workers)
        layout = ModelLayout.of([(n, p.numel()) for n, p in workload.model.named_parameters() if p.requires_grad])
        config, chosen = choose_unset(config, layout, step_seconds=seconds, checkpoints=True)
    return config, config.algorithm().build(config, ctx), chosen


def model_fingerprint(config: Any, model: Any) -> dict[str, Any]:
    from geotrain.membership.fingerprint import fingerprint

    params = [(n, tuple(p.shape), str(p.dtype).removeprefix("torch.")) for n, p in model.named_parameters()
              if p.requires_grad]
    return fingerprint(params, config.to_dict())


class _Checkpoints:
    """This site's checkpoints: every worker writes its file, one commits the site's part (``geotrain.checkpoint``)."""

    def __init__(self, config: Any, env: Any, site_pg: Any) -> None:
        from geotrain.checkpoint import CheckpointStore

        self.env, self.site_pg = env, site_pg
        self.store = CheckpointStore(Path(config.run.out) / "checkpoints", keep=config.checkpoint.keep)

    def _barrier(self) -> None:
        if self.env.workers > 1:
            import torch

            self.site_pg.allreduce([torch.zeros(1)]).wait()

    def save(self, round_no: int, snapshot: Callable[[], Any]) -> None:
        import torch

        from geotrain.checkpoint import FileRecord
        from geotrain.train.state import flatten

        env = self.env
        tensors, skeleton = flatten(snapshot())
        if env.local_rank == 0:
            self.store.begin_round(round_no, env.site_rank)
        self._barrier()
        record = self.store.write_worker(round_no, env.site_rank, env.local_rank, tensors, {"state": skeleton})
        mine = torch.tensor([record.size, *bytes.fromhex(record.sha256)], dtype=torch.int64)
        rows = [mine]
        if env.workers > 1:
            rows = [torch.empty_like(mine) for _ in range(env.workers)]
            self.site_pg.allgather([rows], [mine]).wait()
        if env.local_rank == 0:
            files = [FileRecord(name=f"w{i}.safetensors", size=int(r[0]), sha256=bytes(int(b) for b in r[1:]).hex())
                     for i, r in enumerate(rows)]
            self.store.commit_site(round_no, env.site_rank, files, meta={"round": round_no})
            self.store.prune()
        self._barrier()

    def rounds(self) -> tuple[list[int], list[str]]:
        """Rounds whose part of this site is complete and verifies, and warnings about those that are not."""
        from geotrain.errors import ConfigError

        good: list[int] = []
        warnings: list[str] = []
        for r in sorted(self.store.rounds(), reverse=True):
            try:
                found = self.store.latest(sites=[self.env.site_rank], at_most=r)
            except ConfigError as e:
                warnings.append(str(e))
                break
            if found is None:
                break
            warnings += [w for w in found.warnings if w not in warnings]
            if found.round == r:
                good.append(r)
        return sorted(good), warnings

    def load(self, round_no: int) -> dict[str, Any]:
        from geotrain.train.state import unflatten

        tensors, meta = self.store.load_worker(round_no, self.env.site_rank, self.env.local_rank)
        return unflatten(tensors, meta["state"])


class _SiteFaults:
    """The faults that act inside this site at its step (slow, nan, outlier), and the records that tell the
    launcher when one of its own (kill, rejoin, partition, heal) is due. In the network lab (``real_network``)
    the launcher slows the real links too, so ``slow`` is its own there."""

    def __init__(self, faults: list[Any], *, site: int, recorder: Any, conditions: Any,
                 real_network: bool = False) -> None:
        from geotrain.faults import LAUNCHER_ACTIONS

        self.site, self.recorder, self.conditions = site, recorder, conditions
        self.launcher_actions = (*LAUNCHER_ACTIONS, "slow") if real_network else LAUNCHER_ACTIONS
        self.faults = [f for f in faults if f.action in LAUNCHER_ACTIONS or f.action == "slow" or f.site == site]
        self.fired: set[int] = set()
        self.by_step: dict[int, list[int]] = {}
        self.comm: Any = None

    def schedule(self, round_steps: int) -> None:
        """Place the faults not yet fired on inner steps, once the run's round length is known (a run that
        chooses its own H knows it only after measuring)."""
        from geotrain.faults import trigger_step

        self.by_step = {}
        for i, f in enumerate(self.faults):
            at = trigger_step(f, round_steps)
            if at is not None and i not in self.fired:
                self.by_step.setdefault(at, []).append(i)

    def __call__(self, step: int, wall: float) -> None:
        for i in self.by_step.pop(step, []):
            self.fired.add(i)
            f = self.faults[i]
            if f.action in self.launcher_actions:
                self.recorder.write("fault_due", site=self.site, step=step, fault=str(f))
            elif f.action == "slow":
                self.conditions.slow[f.site] = f.factor
                self.recorder.write("fault", site=self.site, step=step, fault=str(f))
            elif f.action == "nan":
                self.comm.poison_next = True
                self.recorder.write("fault", site=self.site, step=step, fault=str(f))
            elif f.action == "outlier":
                self.comm.scale_next = f.factor
                self.recorder.write("fault", site=self.site, step=step, fault=str(f))


def _site_pace(config: Any, env: Any, site_pg: Any) -> Any:
    """This site's pacing (``train/pace.py``): its ``run.site_speeds`` factor and, with ``[grid]``, its power
    controller (``geotrain.power``), which lives as long as the process, across departures and returns."""
    from geotrain.power import site_controllers
    from geotrain.train.pace import Pace

    speeds = config.run.site_speeds or [1.0] * config.run.sites
    controllers = site_controllers(config)
    gpu = None
    if controllers and config.run.device == "cuda":  # NVML limits the board's power (power/nvml.py)
        import torch

        from geotrain.power.nvml import GpuPower

        gpu = GpuPower.open(torch.cuda.current_device())
    return Pace(speed=speeds[env.site_rank], power=controllers[env.site_rank] if controllers else None,
                site_pg=site_pg, workers=env.workers, gpu=gpu)


def _install_partition_signals(client: Any) -> None:
    """The launcher cuts a site off with SIGUSR1 and restores it with SIGUSR2 (``--fault partition``/``heal``)."""
    with contextlib.suppress(ValueError, AttributeError):
        signal.signal(signal.SIGUSR1, lambda *_: client.cut(True))
        signal.signal(signal.SIGUSR2, lambda *_: client.cut(False))


def site_main(task: SiteTask) -> int:
    """Train as one worker; returns the process exit code (0 ok, 1 failed, 2 refused or bad input, 130
    interrupted)."""
    import torch

    from geotrain.comm.groups import SiteEnv, init_site_group
    from geotrain.comm.site_parallel import full_tensors, wrap_model
    from geotrain.config import config_from_tree
    from geotrain.errors import ConfigError
    from geotrain.faults import LinkConditions
    from geotrain.membership.client import Evicted, MembershipClient, RunFinished
    from geotrain.membership.wire import read_token_file
    from geotrain.power import rejoin_lead_seconds
    from geotrain.train.loop import Boundary, train_loop
    from geotrain.train.pace import PowerOff
    from geotrain.train.recorder import Recorder
    from geotrain.train.state import unpack

    t_process = time.monotonic()
    torch.set_num_threads(1)  # one thread per worker: several workers share the cores
    signal.signal(signal.SIGTERM, _raise_interrupt)
    _register(task.definitions)
    config = task.config
    env = SiteEnv.from_environ()
    out = Path(config.run.out)
    recorder = Recorder(out / "sites" / f"site{env.site_rank}.jsonl" if env.local_rank == 0 else None)
    client = None
    pace = None
    try:
        if config.run.tensorboard and env.local_rank == 0:  # live scalars beside the records (train/sinks.py)
            from geotrain.train.sinks import TensorBoardSink

            recorder.sinks.append(TensorBoardSink(out / "tensorboard"))
        device = config.run.device
        if device == "cuda":
            check_cuda()
            # the local launcher spreads all sites' workers over the GPUs; torchrun: one GPU per local rank
            gpu = os.environ.get("GEOTRAIN_CUDA_DEVICE") or os.environ.get("LOCAL_RANK", str(env.local_rank))
            torch.cuda.set_device(int(gpu))
        site_pg = init_site_group(device=device, timeout_s=config.run.collective_timeout_s)
        worker = env.site_rank * env.workers + env.local_rank
        workload = task.workload_factory(config, worker=worker, device=device, **task.factory_kwargs)
        if config.run.fsdp and workload.optimizer is not None and env.workers > 1:
            raise ConfigError("run.fsdp shards the parameters after the workload is built: leave Workload.optimizer "
                              "unset so the inner optimizer is built on the shards ([optim])", field="run.fsdp")
        module = wrap_model(workload.model, site_pg=site_pg, workers=env.workers, device=device, fsdp=config.run.fsdp)
        checkpoints = _Checkpoints(config, env, site_pg)
        resume_rounds: list[int] = []
        if env.resume:
            resume_rounds, warnings = checkpoints.rounds()
            for w in warnings:
                recorder.write("warning", site=env.site_rank, message=w)
        secret = read_token_file(Path(env.token_file))
        client = MembershipClient(env.coordinator, secret, site=env.site_rank, worker=env.local_rank,
                                  workers=env.workers, sites=config.run.sites,
                                  fingerprint=model_fingerprint(config, workload.model),
                                  settings={k: getattr(config.membership, k) for k in
                                            ("min_sites", "heartbeat_s", "heartbeat_timeout_s", "quorum_timeout_s",
                                             "join_timeout_s")})
        _install_partition_signals(client)
        joined = client.join(intent="resume" if env.resume else "start", resume_rounds=resume_rounds)
        conditions = LinkConditions()
        faults = _SiteFaults(task.faults, site=env.site_rank, recorder=recorder, conditions=conditions,
                             real_network=env.real_network)
        first = not joined.get("formed")
        pace = _site_pace(config, env, site_pg)
        heal_rule = _heal_rule(config, sum(p.numel() for p in workload.model.parameters()))
        wall_offset = 0.0  # the run's training seconds before this start (a site back from a power outage)
        outage = False  # this start follows a power outage
        for _ in range(MAX_REJOINS + 1):
            restore = None
            healer = None
            t_join = time.time()
            if first:
                formed = client.form()
                generation, members = formed["gen"], formed["members"]
                if formed.get("resume_round") is not None:
                    restore = checkpoints.load(formed["resume_round"])
                    recorder.write("resumed", site=env.site_rank, round=formed["resume_round"],
                                   step=restore["loop"]["step"])
            else:
                try:
                    admitted = client.await_admission()
                except RunFinished:
                    if not outage:  # not back from a power outage: waiting to be admitted was the point
                        raise
                    result = None  # back from an outage after the others finished: nothing left to train
                    break
                generation, members, healer = admitted["gen"], admitted["members"], admitted.get("healer")
            checkpoints.store.launch = client.view.launch  # this start of the run, named by the coordinator
            comm = connect(config, env, site_pg, client, generation=generation, members=members,
                           conditions=conditions)
            faults.comm = comm
            comm.background_heal = heal_rule
            background = healer is not None and comm.heals_in_background(healer, admitted["joined"])
            if healer is not None:
                t0 = time.time()
                blob = comm.receive_state(healer)
                if not background:
                    comm.healed_barrier(generation)
                restore = unpack(blob)
                seconds = time.time() - t0
                if admitted.get("position") is not None and workload.load_data_state is not None:
                    workload.load_data_state(admitted["position"])  # go on where this site left off
                client.event("healed", healed_from=healer, seconds=seconds, bytes=len(blob),
                             wait_seconds=t0 - t_join, step=restore["loop"]["step"], background=background)
                recorder.write("healed", site=env.site_rank, healed_from=healer, seconds=seconds, bytes=len(blob),
                               step=restore["loop"]["step"], generation=generation, background=background)
            run_config = config if restore is None else config_from_tree(restore["config"])
            run_config, strategy, chosen = prepare(run_config, workload, comm, site_pg, measure=restore is None)
            ctx = strategy.ctx
            from geotrain.config import inner_steps

            every = run_config.checkpoint.every_rounds or 0
            round_steps = run_config.algorithm().round_steps(run_config)
            faults.schedule(round_steps)
            boundary = Boundary(checkpoint=checkpoints.save if every else None, every_steps=every * round_steps,
                                admit=lambda snapshot: _admit(comm, snapshot, recorder, env.site_rank),
                                at_step=faults, round_steps=round_steps)
            recorder.write("start", site=env.site_rank, worker=env.local_rank, pid=os.getpid(),
                           steps_planned=inner_steps(run_config.run.tokens,
                                                     workload.tokens_per_batch * env.workers * run_config.run.sites),
                           param_bytes=4 * sum(p.numel() for p in ctx.params), sync_payloads=strategy.sync_payloads(),
                           payload_bytes_per_sync=strategy.sync_bytes_per_round(), collective=comm.pattern,
                           network="netlab" if env.real_network else "emulated", codec=comm.choice.name,
                           settings=run_config.algorithm().describe(run_config),
                           auto=[{"key": a.key, "value": a.value, "reason": a.reason} for a in chosen],
                           meta=workload.meta or {}, generation=generation, members=members,
                           healed_from=healer, resumed=restore is not None and healer is None)
            if healer is not None:  # the run's clock went on from the healer's snapshot: the transfer and the
                # set-up since (else this site's round and grid time would start late by as much)
                snapshot_wall = float(restore.get("run_wall", 0.0))
                restore["run_wall"] = snapshot_wall + (time.time() - t0)
                if background:  # the members' round began at the snapshot: this site's ends with theirs
                    restore["round_start"] = snapshot_wall
            try:
                result = train_loop(run_config, workload, strategy=strategy, comm=comm, recorder=recorder,
                                    site=env.site_rank, worker=worker, restore=restore, boundary=boundary,
                                    module=module, pace=pace, wall_offset=wall_offset)
            except Evicted as e:
                recorder.write("evicted", site=env.site_rank, reason=str(e))
                comm.close()
                client.rejoin()  # a new session, as a site waiting to be admitted and healed
                first = False
                continue
            except PowerOff as e:  # the grid cannot keep this site running: leave, wait for power, come back
                if e.powered_on is not None:  # it had come back, and failed again at its first step
                    recorder.write("power_on", site=env.site_rank, wall_s=e.powered_on,
                                   grid_hours=pace.power.grid_seconds(e.powered_on) / 3600)
                recorder.write("power_off", site=env.site_rank, wall_s=e.wall, grid_hours=e.grid_hours,
                               back_at_s=e.back_at, message=str(e))
                comm.close()
                client.leave(str(e))
                if e.back_at is None:  # the trace never gives the power back: the run goes on without this site
                    result = None
                    break
                # Ask to join again ahead of the power's return (the trace is a forecast), to be admitted and
                # healed meanwhile; the first step waits for the power (Pace.expect_power).
                ask_at = max(e.wall, e.back_at - rejoin_lead_seconds(run_config))
                time.sleep(ask_at - e.wall)  # the run's training clock runs on meanwhile
                pace.expect_power(e.back_at)
                client.rejoin()
                first, wall_offset, outage = False, ask_at, True
                continue
            break
        else:
            raise RuntimeError(f"site {env.site_rank} was dropped from the run {MAX_REJOINS} times; giving up")
        if result is None:  # left for good: its power did not come back, or came back after the run finished
            recorder.write("left", site=env.site_rank, reason="its power did not return before the run finished")
            client.close(reason="power")
            return 0

        if env.site_rank == min(comm.observed_members) and (env.local_rank == 0 or comm.sharded):  # FSDP gathers
            from safetensors.torch import save_file

            from geotrain.files import replacing

            names = [n for n, p in workload.model.named_parameters() if p.requires_grad]
            tensors = dict(zip(names, full_tensors(strategy.ctx.params, strategy.global_parameters()), strict=True))
            if env.local_rank == 0:
                with replacing(out / "model.safetensors") as tmp:
                    save_file(tensors, str(tmp), metadata={"params_sha256": result.params_sha256})
                if getattr(workload, "export", None) is not None:  # the workload's own format (an hf/ directory)
                    workload.export(out, [tensors[n] for n in names])
        _report_heal_errors(comm, recorder, env.site_rank)
        recorder.write("done", site=env.site_rank, eval_loss=result.eval_loss, params_sha256=result.params_sha256,
                       stopped_early=result.stopped_early, **result.figures)
        if not env.local and env.local_rank == 0:  # under torchrun the lowest member writes the run's files
            _write_run_files(config, comm, client, recorder, out, t_process)
        comm.close()
        client.close(done=True)
        return 0
    except KeyboardInterrupt:
        recorder.write("interrupted", site=env.site_rank)
        if client is not None:
            client.close(reason="interrupted")
        return 130
    except ConfigError as e:  # refused by the coordinator, a wrong secret, a corrupt checkpoint: bad input
        recorder.write("error", site=env.site_rank, message=str(e), refused=True)
        print(f"error: {e}", file=sys.stderr)
        if client is not None:
            client.close(reason=str(e))
        return 2
    except BaseException as e:  # noqa: BLE001 - the launcher shows this site's error
        recorder.write("error", site=env.site_rank, message=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        traceback.print_exc()
        if client is not None:
            client.close(reason=f"{type(e).__name__}: {e}")
        return 1
    finally:
        if pace is not None:
            pace.close()  # a GPU gets its power limit back
        recorder.close()


def _write_run_files(config: Any, comm: Any, client: Any, recorder: Any, out: Path, t_process: float) -> None:
    """Gather every member's record file to the lowest member, which writes summary.json, metrics.jsonl and
    report.html as the local launcher does (sites on separate machines do not share OUT)."""
    from geotrain.train.outputs import write_run_files

    recorder.flush()
    mine = out / "sites" / f"site{comm.site}.jsonl"
    files = comm.gather_bytes(mine.read_bytes() if mine.is_file() else b"")
    if files is None:
        return
    for k, blob in files.items():
        path = out / "sites" / f"site{k}.jsonl"
        if not path.is_file() or path.stat().st_size < len(blob):  # on a shared disk the file is already there
            path.write_bytes(blob)
    try:
        events = client.events()
    except Exception:  # noqa: BLE001 - the summary is still worth writing without them
        events = []
    summary = write_run_files(out, config.to_dict(), elapsed_seconds=time.monotonic() - t_process, ok=True,
                              membership=events)
    print(f"wrote {out / 'summary.json'}, {out / 'metrics.jsonl'} and {out / 'report.html'}"
          f" (eval loss {summary.get('eval_loss')})", flush=True)


def _heal_rule(config: Any, params: int) -> Callable[[int, list[int]], bool]:
    """``(healer, joiners) -> bool``: whether a heal goes in the background (``geotrain.membership.heal``),
    from the state a model of ``params`` values packs and the run's links; the same answer on every site."""
    from geotrain.membership.deadlines import nominal_topology
    from geotrain.membership.heal import heal_state_bytes, heal_transfer_seconds, heals_in_background

    topology = nominal_topology(config)
    nbytes = heal_state_bytes(config, params)

    def rule(healer: int, joiners: list[int]) -> bool:
        seconds = sum(heal_transfer_seconds(config, topology.link(healer, j), nbytes) for j in joiners)
        return heals_in_background(config, seconds)

    return rule


def _admit(comm: Any, snapshot: Callable[[], Any], recorder: Any, site: int) -> None:
    """At a boundary where joiners wait: admit them; the healer packs and sends its state."""
    from geotrain.train.state import pack

    t0 = time.time()
    q = comm.admit(lambda: pack(snapshot()))
    if q["joined"]:
        recorder.write("admitted", site=site, joined=q["joined"], healer=q["healer"], generation=q["gen"],
                       members=q["members"], seconds=time.time() - t0, background=q["background"])
    _report_heal_errors(comm, recorder, site)


def _report_heal_errors(comm: Any, recorder: Any, site: int) -> None:
    """Warnings for heals that failed (the joiner went away; it joins again): after an admission, and at the end
    of a run for a heal sent in the background since."""
    for message in comm.heal_errors:
        recorder.write("warning", site=site, message=message)
    comm.heal_errors.clear()


def _load_factory(ref: str) -> Callable[..., Any]:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name or "workload")


def _workers_given(path: str | None, overrides: list[str]) -> Any:
    """``run.workers_per_site`` as the config file or a ``--set`` gives it (the last wins), None if neither does."""
    from geotrain.config import _parse_value, read_toml

    run = read_toml(path).get("run") if path is not None else None
    given = run.get("workers_per_site") if isinstance(run, dict) else None
    for item in overrides:
        key, _, text = item.partition("=")
        if key.strip() == "run.workers_per_site":
            given = _parse_value(text.strip())
    return given


def main(argv: list[str] | None = None) -> int:
    """``python -m geotrain.train.site``: one worker under torchrun (or any launcher that sets RANK etc.)."""
    from geotrain.config import load_config
    from geotrain.errors import ConfigError

    p = argparse.ArgumentParser(prog="python -m geotrain.train.site", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="run configuration (TOML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    p.add_argument("--site-rank", type=int, required=True, help="this site's index, 0 to --sites minus 1")
    p.add_argument("--sites", type=int, required=True, help="sites in the run")
    p.add_argument("--coordinator", required=True, help="HOST:PORT of 'geotrain coordinator'")
    p.add_argument("--token-file", required=True, help="the run's secret, the file the coordinator wrote (mode 600)")
    p.add_argument("--resume", action="store_true", help="resume from this site's checkpoints under run.out")
    p.add_argument("--workload", default="geotrain.train.workload:demo_workload",
                   help="MODULE:FUNCTION building the Workload, called in every worker as FUNCTION(config, "
                        "worker=, device=) with config.run.workers_per_site set to torchrun's WORLD_SIZE")
    p.add_argument("--data-dir", help="prepared corpus directory for the demo workload (default: OUT/data, prepared on first use)")
    args = p.parse_args(argv)
    # The site's workers are torchrun's world (one process per worker): the config says so, the factory reads it.
    world = int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1
    try:
        given = _workers_given(args.config, args.set)
        config = load_config(args.config, overrides=args.set,
                             values={"run.sites": args.sites, "run.workers_per_site": world})
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if given is not None and given != world and os.environ.get("RANK", "0") == "0":
        print(f"note: the config sets run.workers_per_site = {given!r}, but this site's torchrun job has "
              f"WORLD_SIZE={world} workers; using {world}", file=sys.stderr, flush=True)
    if config.run.out is None:  # one fixed directory per site, so that a site's job started again finds it
        config = config.updated({"run.out": f"runs/site{args.site_rank}"})
    if os.environ.get("RANK", "0") == "0":  # config.json beside the run's files, as geotrain run writes it
        from geotrain.files import write_json_atomic

        try:
            Path(config.run.out).mkdir(parents=True, exist_ok=True)
            write_json_atomic(Path(config.run.out) / "config.json", config.to_dict())
        except OSError as e:
            print(f"error: run.out: cannot write to {config.run.out!r} ({e.strerror or e}); choose another with "
                  "--set run.out=DIR", file=sys.stderr)
            return 2
    if "RANK" not in os.environ:  # started without torchrun: a site of one worker, its group on loopback
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(GEOTRAIN_SITE_RANK=str(args.site_rank), GEOTRAIN_SITES=str(args.sites),
                      GEOTRAIN_COORDINATOR=args.coordinator, GEOTRAIN_TOKEN_FILE=args.token_file,
                      GEOTRAIN_RESUME="1" if args.resume else "")
    kwargs = {"data_dir": Path(args.data_dir)} if args.data_dir else {}
    return site_main(SiteTask.of(config, _load_factory(args.workload), kwargs))


if __name__ == "__main__":
    sys.exit(main())
