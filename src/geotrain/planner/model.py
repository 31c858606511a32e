"""The planner's cost model: how long a multi-site training run takes, how busy it keeps the accelerators,
how many bytes it moves over the WAN and how much energy it draws.

Compute follows the usual dense-transformer rule FLOPs = 6 * params * tokens (forward 2N, backward 4N per
token, attention ignored). A site with n accelerators of peak F FLOP/s at utilization ``mfu`` processes its
share of one global batch of B tokens in

    c_site = 6 * params * B * share / (n * F * mfu)            (seconds per inner step)

unless the site's measured ``step_seconds`` is given. Everything else comes from the definitions a run uses:

* the algorithm's communication pattern and the timing model (``geotrain.algorithms``: sync periods,
  overlap, stragglers, the end of the run), which also gives every run its ``predicted_utilization``;
* the codec's exact payload sizes and the collective it takes (``geotrain.comm.codecs``,
  ``geotrain.comm.pattern``);
* the collective costs the WAN emulation charges real runs (``geotrain.topology``).

So a plan and an emulated run cannot disagree about what a sync costs, and a plan of a run's own
configuration predicts the bytes that run sends. Settings the configuration leaves unset (DiLoCo's overlap,
Streaming DiLoCo's tau) are chosen as a run chooses them, from the predicted step time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from geotrain.algorithms import AutoSetting, ModelLayout
from geotrain.algorithms.timing import choose_unset, run_timing
from geotrain.comm.pattern import payload_bytes, resolve_pattern, sync_cost
from geotrain.config import DEMO_LINK, Config, inner_steps
from geotrain.errors import ConfigError
from geotrain.hardware import ACCELERATORS, Accelerator, resolve_accelerator
from geotrain.topology import CollectiveCost, Topology

__all__ = [
    "ModelSpec",
    "PlanResult",
    "PlanSpec",
    "SiteResult",
    "SiteSpec",
    "plan",
    "plan_spec",
    "site_step_seconds",
    "sync_comm",
]


@dataclass(kw_only=True, slots=True)
class ModelSpec:
    """The model and the training budget."""

    params: int
    """Trainable parameters."""
    tokens: int
    """Tokens to train on, all sites together."""
    batch_tokens: int
    """Global batch per inner step in tokens, summed over all sites (each site takes its share)."""
    seq_len: int
    """Sequence length; used to check that every accelerator gets whole sequences."""
    layout: ModelLayout
    """The tensors a sync carries (fragment sizes come from it)."""

    @property
    def steps(self) -> int:
        """Inner steps of the run, as the training loop counts them (``geotrain.config.inner_steps``)."""
        return inner_steps(self.tokens, self.batch_tokens)


@dataclass(kw_only=True, slots=True)
class SiteSpec:
    """One datacenter: its accelerators, how well it uses them, and its power envelope."""

    name: str
    accelerator: Accelerator
    accelerators: int
    """Accelerators the plan uses at this site."""
    mfu: float
    """Model FLOP utilization the site achieves while computing."""
    power_cap_mw: float | None
    """Grid limit of the site in MW (facility power), None for none."""
    pue: float
    """Power usage effectiveness: facility power over IT power."""
    watts: float
    """Power per accelerator."""
    peak_flops: float
    """Peak dense FLOP/s per accelerator."""
    step_seconds: float | None = None
    """Measured compute per inner step, which replaces the FLOP model when set."""

    @property
    def powered_under_cap(self) -> int | None:
        """How many accelerators the cap can feed: floor(cap / (watts * PUE)); None without a cap."""
        if self.power_cap_mw is None:
            return None
        # The tiny relative nudge keeps exact quotients (840 kW / 840 W) from flooring to 999 by rounding.
        return math.floor(self.power_cap_mw * 1e6 / (self.watts * self.pue) * (1 + 1e-12))

    def power_mw(self, accelerators: int | None = None) -> float:
        """Facility power drawn by ``accelerators`` (the planned count by default), in MW."""
        n = self.accelerators if accelerators is None else accelerators
        return n * self.watts * self.pue / 1e6

    def flops_per_second(self, accelerators: int | None = None) -> float:
        """Achieved FLOP/s of the site: n * peak * mfu."""
        n = self.accelerators if accelerators is None else accelerators
        return n * self.peak_flops * self.mfu


@dataclass(kw_only=True, slots=True)
class PlanSpec:
    """Everything one plan needs: the run's configuration and the hardware it runs on."""

    config: Config
    """The run: algorithm, codec, sites, workers, links and their settings."""
    model: ModelSpec
    sites: list[SiteSpec]
    """The datacenters, in ring order."""
    topology: Topology
    """Links between sites (the configuration's, or another bandwidth for the questions)."""

    @property
    def algorithm(self) -> Any:
        return self.config.algorithm()

    @property
    def codec(self) -> Any:
        return self.config.codec()

    @property
    def collective(self) -> str:
        return resolve_pattern(self.config.comm.pattern, codec=self.codec, sites=len(self.sites))

    def shares(self) -> list[float]:
        """Fraction of the global batch each site computes per inner step."""
        k = len(self.sites)
        if self.config.sites.balance == "equal" or any(s.step_seconds for s in self.sites):
            return [1.0 / k] * k
        rates = [s.flops_per_second() for s in self.sites]
        total = sum(rates)
        return [r / total for r in rates]

    def with_config(self, values: dict[str, Any]) -> PlanSpec:
        """The same plan with dotted settings changed (for example another algorithm or H)."""
        return replace(self, config=self.config.updated(values))


def plan_spec(config: Config) -> PlanSpec:
    """The plan of ``config``: its run at the scale ``model.params``, ``plan.batch_tokens`` and the sites'
    hardware describe (by default the run's own model and batch, one accelerator per worker)."""
    layout = config.layout()
    run = config.run
    own_batch = config.data.batch_size * config.model.seq_len * run.sites * run.workers_per_site
    batch = config.plan.batch_tokens or own_batch
    if batch < config.model.seq_len:
        raise ConfigError(f"the global batch ({batch:,} tokens) is smaller than one sequence ({config.model.seq_len:,} "
                          "tokens); raise plan.batch_tokens or lower model.seq_len", field="plan.batch_tokens")
    model = ModelSpec(params=layout.params, tokens=run.tokens, batch_tokens=batch, seq_len=config.model.seq_len,
                      layout=layout)
    table = dict(ACCELERATORS)
    for name, entry in config.accelerators.items():
        preset = next((a for k, a in table.items() if k.lower() == name.lower()), None)
        if preset is None and (entry.peak_flops is None or entry.watts is None):
            raise ConfigError("a new accelerator needs both peak_flops (FLOP/s) and watts", field=f"accelerators.{name}")
        key = preset.name if preset else name
        table[key] = Accelerator(name=key, peak_flops=entry.peak_flops or preset.peak_flops,
                                 watts=entry.watts or preset.watts, source="configuration")
    names = config.site_names()
    sites = []
    for i in range(run.sites):
        own = config.site[i] if config.site else None

        def pick(key: str, own: Any = own) -> Any:
            value = getattr(own, key) if own is not None else None
            return getattr(config.sites, key) if value is None else value

        field = f"site[{names[i]}].accelerator" if own is not None and own.accelerator else "sites.accelerator"
        accel = resolve_accelerator(pick("accelerator"), table, field=field)
        site = SiteSpec(name=names[i], accelerator=accel, accelerators=1, mfu=pick("mfu"),
                        power_cap_mw=pick("power_cap_mw"), pue=pick("pue"),
                        watts=pick("watts") or accel.watts, peak_flops=pick("peak_flops") or accel.peak_flops,
                        step_seconds=pick("step_seconds"))
        count = pick("accelerators")
        if count is None:
            count = site.powered_under_cap if site.power_cap_mw is not None else run.workers_per_site
            if count < 1:
                raise ConfigError(f"site {site.name!r}: a cap of {site.power_cap_mw:g} MW cannot power one "
                                  f"{accel.name}", field="sites.power_cap_mw")
        site.accelerators = count
        sites.append(site)
    return PlanSpec(config=config, model=model, sites=sites, topology=config.topology())


def site_step_seconds(spec: PlanSpec, *, accelerators: list[int] | None = None) -> list[float]:
    """Seconds of compute per inner step at each site (its share of the global batch)."""
    counts = accelerators if accelerators is not None else [s.accelerators for s in spec.sites]
    flops_per_step = 6.0 * spec.model.params * spec.model.batch_tokens
    return [
        site.step_seconds if site.step_seconds is not None
        else flops_per_step * share / site.flops_per_second(n)
        for site, share, n in zip(spec.sites, spec.shares(), counts, strict=True)
    ]


def sync_comm(spec: PlanSpec, numel: int | None = None, *, members: list[int] | None = None) -> CollectiveCost:
    """What one sync of ``numel`` values (the algorithm's mean payload by default) costs: seconds, and bytes
    ONE WORKER sends. ``members`` restricts the ring to some sites (the simulation uses it while a site is
    down)."""
    if numel is None:
        numel = spec.algorithm.pattern(spec.config, spec.model.layout).mean_payload
    return sync_cost(numel, codec=spec.codec, pattern=spec.collective, ring=spec.topology.ring(members),
                     pairs=spec.topology.pairs(members), workers=spec.config.run.workers_per_site)


@dataclass(kw_only=True, slots=True)
class SiteResult:
    """One site's figures in a plan."""

    name: str
    """The site's name."""
    accelerator: str
    """Accelerator type."""
    accelerators: int
    """Accelerators the plan uses."""
    accelerators_powered: int | None
    """How many the power cap can feed (None without a cap)."""
    power_mw: float
    """Facility power drawn by the planned accelerators (accelerators * watts * PUE)."""
    power_cap_mw: float | None
    """The site's cap, None without one."""
    cap_respected: bool
    """Whether ``power_mw`` fits under the cap."""
    compute_step_seconds: float
    """This site's compute per inner step."""
    utilization: float
    """Compute time over wall time."""
    peak_bandwidth_bps: float
    """Rate this site's link must sustain to move its largest sync within the compute it may span."""
    bytes_per_sync: int
    """Bytes this site sends per sync (the mean payload)."""
    energy_mwh: float
    """Energy of this site over the run."""


@dataclass(kw_only=True, slots=True)
class PlanResult:
    """Everything the planner says about one plan."""

    algorithm: str
    """Label such as ``diloco H=100+overlap``."""
    codec: str
    """Codec name."""
    codec_bits: float
    """Bits per parameter on the wire (headers and block scales included)."""
    collective: str
    """all_reduce, reduce_scatter or all_gather: how a sync crosses the sites."""
    steps: int
    """Inner steps to train on all tokens."""
    syncs: int
    """Cross-site collectives over the whole run (fragment syncs for streaming)."""
    payload_bytes_per_sync: int
    """Bytes one worker contributes per full-model sync (summary.json's field of the same name)."""
    compute_step_seconds: float
    """Compute per inner step of the slowest site (which gates syncs)."""
    step_seconds: float
    """Wall time per inner step, exposed communication included."""
    comm_seconds_per_sync: float
    """Duration of one cross-site collective (the mean payload)."""
    hidden_seconds_per_sync: float
    """Part of ``comm_seconds_per_sync`` hidden behind compute."""
    exposed_seconds_per_sync: float
    """Part of it that stalls compute."""
    utilization: float
    """Mean over sites of compute time over wall time."""
    time_to_train_seconds: float
    """Predicted wall time of the run."""
    wan_bytes: float
    """Bytes all sites put on WAN links over the run."""
    peak_bandwidth_bps: float
    """Highest per-site peak bandwidth."""
    energy_mwh: float
    """Energy of all sites over the run (accelerators * watts * PUE * time)."""
    caps_respected: bool
    """Whether every site fits under its cap."""
    sites: list[SiteResult]
    """Per-site figures, in site order."""
    auto: list[AutoSetting] = field(default_factory=list)
    """Settings the configuration left unset and the plan chose, as a run would."""
    notes: list[str] = field(default_factory=list)
    """Warnings about assumptions the inputs stretch."""

    @property
    def accelerators_powered(self) -> list[int | None]:
        return [s.accelerators_powered for s in self.sites]

    def to_dict(self) -> dict:
        return {
            "algorithm": self.algorithm,
            "codec": self.codec,
            "codec_bits": self.codec_bits,
            "collective": self.collective,
            "steps": self.steps,
            "syncs": self.syncs,
            "payload_bytes_per_sync": self.payload_bytes_per_sync,
            "compute_step_seconds": self.compute_step_seconds,
            "step_seconds": self.step_seconds,
            "comm_seconds_per_sync": self.comm_seconds_per_sync,
            "hidden_seconds_per_sync": self.hidden_seconds_per_sync,
            "exposed_seconds_per_sync": self.exposed_seconds_per_sync,
            "utilization": self.utilization,
            "time_to_train_seconds": self.time_to_train_seconds,
            "time_to_train_days": self.time_to_train_seconds / 86400.0,
            "wan_bytes": self.wan_bytes,
            "peak_bandwidth_bps": self.peak_bandwidth_bps,
            "energy_mwh": self.energy_mwh,
            "accelerators_powered": self.accelerators_powered,
            "caps_respected": self.caps_respected,
            "auto": [{"key": a.key, "value": a.value, "reason": a.reason} for a in self.auto],
            "per_site": [{k: getattr(s, k) for k in SiteResult.__dataclass_fields__} for s in self.sites],
            "notes": list(self.notes),
        }


def resolve(spec: PlanSpec) -> tuple[PlanSpec, list[AutoSetting]]:
    """The plan with the settings its configuration leaves unset chosen, as a run chooses them: from the
    compute per step of the fastest site, the one that reaches a merge first and would wait for the transfer."""
    if not spec.algorithm.unset(spec.config):
        return spec, []
    config, chosen = choose_unset(spec.config, spec.model.layout, step_seconds=min(site_step_seconds(spec)),
                                  topology=spec.topology)
    return replace(spec, config=config), chosen


def plan(spec: PlanSpec) -> PlanResult:
    """Predict one run: timing, utilization, bytes, bandwidth, energy and power caps."""
    spec, chosen = resolve(spec)
    config, alg, k = spec.config, spec.algorithm, len(spec.sites)
    workers = config.run.workers_per_site
    layout = spec.model.layout
    pattern = alg.pattern(config, layout)
    site_c = site_step_seconds(spec)
    c = max(site_c)
    steps = spec.model.steps
    mean_cost = sync_comm(spec)
    final_cost = sync_comm(spec, pattern.final_payload) if pattern.final_payload else None
    timing = run_timing(alg, config, pattern, steps=steps, step_seconds=site_c, comm_seconds=mean_cost.seconds,
                        final_seconds=final_cost.seconds if final_cost else 0.0)

    costs = [sync_comm(spec, n) for n in pattern.payloads]
    counts = alg.sync_counts(config, steps) if k > 1 else [0] * len(pattern.payloads)
    sent = sum(n * cost.bytes_sent for n, cost in zip(counts, costs, strict=True))
    if final_cost is not None and k > 1:
        sent += final_cost.bytes_sent
    wan_bytes = float(k * workers * sent)
    codec, collective = spec.codec, spec.collective
    payload = sum(payload_bytes(n, codec=codec, pattern=collective, sites=k, workers=workers)
                  for n in pattern.payloads)
    largest = max(cost.bytes_sent for cost in costs) * workers
    peak_bps = 8.0 * largest / (pattern.window_steps * c) if largest else 0.0
    shard = max(1, -(-pattern.mean_payload // workers))
    codec_bits = codec.bits_per_value(shard)

    notes: list[str] = []
    site_results: list[SiteResult] = []
    for site, cs, util in zip(spec.sites, site_c, timing.site_utilization, strict=True):
        powered = site.powered_under_cap
        respected = powered is None or site.accelerators <= powered
        site_results.append(
            SiteResult(
                name=site.name,
                accelerator=site.accelerator.name,
                accelerators=site.accelerators,
                accelerators_powered=powered,
                power_mw=site.power_mw(),
                power_cap_mw=site.power_cap_mw,
                cap_respected=respected,
                compute_step_seconds=cs,
                utilization=util,
                peak_bandwidth_bps=peak_bps,
                bytes_per_sync=mean_cost.bytes_sent * workers,
                energy_mwh=site.power_mw() * timing.wall_seconds / 3600.0,  # MW * h = MWh
            )
        )
        if not respected:
            notes.append(
                f"{site.name}: {site.accelerators} accelerators draw {site.power_mw():.1f} MW, over the "
                f"{site.power_cap_mw:g} MW cap (the cap powers {powered})"
            )
    total_accel = sum(s.accelerators for s in spec.sites)
    sequences = spec.model.batch_tokens / spec.model.seq_len
    if sequences / total_accel < 1:
        notes.append(
            f"the global batch holds {sequences:.0f} sequences for {total_accel} accelerators "
            f"({sequences / total_accel:.3g} each): the assumed MFU needs tensor/pipeline parallelism inside "
            "each site, or a larger batch"
        )
    if k > 1 and timing.exposed_seconds_per_sync > pattern.period_steps * c:
        notes.append("communication-bound: exposed communication exceeds compute")
    if spec.model.tokens < spec.model.batch_tokens:
        notes.append(f"the budget of {spec.model.tokens:,} tokens is less than one global batch "
                     f"({spec.model.batch_tokens:,}): one step, as a run trains it")
    measured = all(s.step_seconds is not None for s in spec.sites)
    if k > 1 and config.model.params is None and not measured and not config.site and config.sites.accelerators is None \
            and config.sites.power_cap_mw is None:
        notes.append("the run's own model is priced on one accelerator per worker at the given MFU; for the speed of "
                     "the machine it runs on, give its measured step time with --step-seconds")
    if k > 1 and config.model.params is not None and config.wan.link == DEMO_LINK and not config.wan.links:
        notes.append(f"the link is the demo's default, {DEMO_LINK}; give the datacenters' links with --link (a "
                     "preset such as cross-country, or BANDWIDTH/LATENCY)")

    return PlanResult(
        algorithm=alg.label(config),
        codec=codec.name,
        codec_bits=codec_bits,
        collective=collective,
        steps=steps,
        syncs=sum(counts) + (1 if final_cost is not None and k > 1 else 0),
        payload_bytes_per_sync=payload,
        compute_step_seconds=c,
        step_seconds=timing.wall_seconds / steps,
        comm_seconds_per_sync=timing.comm_seconds_per_sync,
        hidden_seconds_per_sync=timing.hidden_seconds_per_sync,
        exposed_seconds_per_sync=timing.exposed_seconds_per_sync,
        utilization=timing.utilization,
        time_to_train_seconds=timing.wall_seconds,
        wan_bytes=wan_bytes,
        peak_bandwidth_bps=peak_bps,
        energy_mwh=sum(s.energy_mwh for s in site_results),
        caps_respected=all(s.cap_respected for s in site_results),
        sites=site_results,
        auto=chosen,
        notes=notes,
    )
