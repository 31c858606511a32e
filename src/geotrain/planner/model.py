"""The planner's cost model: how long a multi-site training run takes, how busy it keeps the accelerators,
how many bytes it moves over the WAN and how much energy it draws.

Compute follows the usual dense-transformer rule FLOPs = 6 * params * tokens (forward 2N, backward 4N per
token, attention ignored). A site with n accelerators of peak F FLOP/s at utilization ``mfu`` processes its
share of one global batch of B tokens in

    c_site = 6 * params * B * share / (n * F * mfu)            (seconds per inner step)

Communication is charged with the very functions the WAN emulation charges real runs
(``geotrain.wan.model.ring_all_reduce`` / ``ring_all_gather``), so a plan and an emulated run cannot disagree
about what a sync costs. Synchronous points are gated by the slowest site (c = max over sites of c_site).
Per algorithm, one *sync period* lasts:

* DDP: every step all-reduces the gradients, T = all_reduce(params * bits/8). With ``overlap`` the all-reduce
  hides behind the backward pass (2/3 of the step): wall = c + max(0, T - 2c/3).
* DiLoCo (arXiv 2311.08105): H inner steps, then one all-reduce of the pseudo-gradient. Without overlap
  wall = H c + T. With ``overlap`` the outer all-reduce of round t runs behind the H inner steps of round t+1
  (the outer update lands one round late): wall = max(H c, T).
* Streaming DiLoCo (arXiv 2501.18512): P fragments of params/P each, synced every H steps on a staggered
  schedule, so one fragment sync (bytes / P) happens every H/P steps. Its result is needed tau inner steps
  after it starts, so it hides behind tau steps of compute; the link carries one fragment at a time, so a
  period can never be shorter than the transfer: wall = max(H/P c + max(0, T_f - tau c), T_f).

Utilization of a site is its own compute over the wall time of a period; the overall figure is the mean over
sites, exactly as ``summary.json`` defines ``utilization`` for a run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from geotrain.errors import ConfigError
from geotrain.planner.presets import Accelerator, Codec, closest, parse_codec, resolve_accelerator
from geotrain.topology import Link, Topology
from geotrain.wan.model import CollectiveCost, ring_all_gather, ring_all_reduce

__all__ = [
    "ALGORITHMS",
    "AlgorithmSpec",
    "ModelSpec",
    "PlanResult",
    "PlanSpec",
    "SiteResult",
    "SiteSpec",
    "plan",
    "site_step_seconds",
    "sync_comm",
    "sync_period",
    "uniform_topology",
]

ALGORITHMS = ("ddp", "diloco", "streaming")

# Backward is 4N of the 6N FLOPs per token: the part of a DDP step that bucketed gradient all-reduce can hide behind.
_BACKWARD_FRACTION = 2.0 / 3.0
_JOULES_PER_MWH = 3.6e9


def _positive(value: float, name: str, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok:
        need = "zero or positive" if allow_zero else "positive"
        raise ConfigError(f"must be {need}, got {value!r}", field=name)


@dataclass(kw_only=True, slots=True)
class ModelSpec:
    """The model and the training budget."""

    params: float
    """Parameter count (70e9 for a 70B model)."""
    tokens: float
    """Tokens to train on, all sites together."""
    batch_tokens: float = 16e6
    """Global batch per inner step in tokens, summed over all sites (each site takes its share)."""
    seq_len: int = 8192
    """Sequence length; used to check that every site gets whole sequences."""

    def __post_init__(self) -> None:
        _positive(self.params, "model.params")
        _positive(self.tokens, "model.tokens")
        _positive(self.batch_tokens, "model.batch_tokens")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ConfigError(f"must be a positive integer, got {self.seq_len!r}", field="model.seq_len")
        if self.batch_tokens < self.seq_len:
            raise ConfigError(
                f"batch_tokens ({self.batch_tokens:g}) is smaller than one sequence ({self.seq_len}); "
                "raise batch_tokens or lower seq_len",
                field="model.batch_tokens",
            )
        if self.batch_tokens > self.tokens:
            raise ConfigError(
                f"batch_tokens ({self.batch_tokens:g}) exceeds the whole budget of tokens ({self.tokens:g})",
                field="model.batch_tokens",
            )


@dataclass(kw_only=True, slots=True)
class SiteSpec:
    """One datacenter: its accelerators, how well it uses them, and its power envelope."""

    name: str = "site"
    """Human name of the site."""
    accelerator: Accelerator | str = "H100"
    """Accelerator type: a preset name (A100, H100, H200, B200) or an ``Accelerator``."""
    accelerators: int | None = None
    """Accelerators the plan uses at this site; None means as many as the power cap can feed."""
    mfu: float = 0.4
    """Model FLOP utilization the site achieves while computing, in (0, 1]."""
    power_cap_mw: float | None = None
    """Grid limit of the site in MW (facility power, so PUE counts against it); None means no cap."""
    pue: float = 1.2
    """Power usage effectiveness: facility power over IT power, at least 1."""
    watts: float | None = None
    """Power per accelerator in watts; None takes the accelerator's board power."""
    peak_flops: float | None = None
    """Peak dense FLOP/s per accelerator; None takes the accelerator preset's figure."""

    def __post_init__(self) -> None:
        if isinstance(self.accelerator, str):
            self.accelerator = resolve_accelerator(self.accelerator)
        where = f"site {self.name!r}"
        if isinstance(self.mfu, bool) or not isinstance(self.mfu, (int, float)) or not (0 < self.mfu <= 1):
            raise ConfigError(
                f"{where}: mfu must be in (0, 1] (a fraction of peak, 0.4 is typical), got {self.mfu!r}", field="mfu"
            )
        if isinstance(self.pue, bool) or not isinstance(self.pue, (int, float)) or not (
            math.isfinite(self.pue) and self.pue >= 1
        ):
            raise ConfigError(f"{where}: pue must be at least 1.0 (1.1-1.5 is typical), got {self.pue!r}", field="pue")
        if self.power_cap_mw is not None:
            _positive(self.power_cap_mw, "power_cap_mw")
        if self.watts is not None:
            _positive(self.watts, "watts")
        if self.peak_flops is not None:
            _positive(self.peak_flops, "peak_flops")
        if self.accelerators is None:
            if self.power_cap_mw is None:
                raise ConfigError(
                    f"{where}: give accelerators (per site) or a power cap in MW to fill",
                    field="accelerators",
                )
            self.accelerators = self.powered_under_cap
            if self.accelerators < 1:
                raise ConfigError(
                    f"{where}: a cap of {self.power_cap_mw:g} MW cannot power one accelerator", field="power_cap_mw"
                )
        elif isinstance(self.accelerators, bool) or not isinstance(self.accelerators, int) or self.accelerators < 1:
            raise ConfigError(f"{where}: must be a positive integer, got {self.accelerators!r}", field="accelerators")

    @property
    def accel(self) -> Accelerator:
        assert isinstance(self.accelerator, Accelerator)
        return self.accelerator

    @property
    def watts_each(self) -> float:
        return self.accel.watts if self.watts is None else float(self.watts)

    @property
    def flops_each(self) -> float:
        return self.accel.peak_flops if self.peak_flops is None else float(self.peak_flops)

    @property
    def powered_under_cap(self) -> int | None:
        """How many accelerators the cap can feed: floor(cap / (watts * PUE)); None without a cap."""
        if self.power_cap_mw is None:
            return None
        # The tiny relative nudge keeps exact quotients (840 kW / 840 W) from flooring to 999 by rounding.
        return math.floor(self.power_cap_mw * 1e6 / (self.watts_each * self.pue) * (1 + 1e-12))

    def power_mw(self, accelerators: int | None = None) -> float:
        """Facility power drawn by ``accelerators`` (the planned count by default), in MW."""
        n = self.accelerators if accelerators is None else accelerators
        return n * self.watts_each * self.pue / 1e6

    def flops_per_second(self, accelerators: int | None = None) -> float:
        """Achieved FLOP/s of the site: n * peak * mfu."""
        n = self.accelerators if accelerators is None else accelerators
        return n * self.flops_each * self.mfu


@dataclass(kw_only=True, slots=True)
class AlgorithmSpec:
    """How sites synchronise."""

    name: str = "diloco"
    """``ddp`` (all-reduce every step), ``diloco`` or ``streaming`` (Streaming DiLoCo)."""
    sync_every: int = 100
    """H: inner steps between two syncs of the same parameters (ignored by ddp)."""
    fragments: int = 1
    """P: fragments synced in turn (streaming only)."""
    overlap_steps: int = 0
    """tau: inner steps a fragment's sync may run behind before its result is needed (streaming only)."""
    overlap: bool = False
    """Hide communication behind compute: ddp behind the backward pass, diloco behind the next round; for
    streaming it turns on an overlap of one step when ``overlap_steps`` is 0."""

    def __post_init__(self) -> None:
        self.name = str(self.name).strip().lower()
        if self.name not in ALGORITHMS:
            raise ConfigError(
                f"unknown algorithm {self.name!r}{closest(self.name, ALGORITHMS)}; use one of {', '.join(ALGORITHMS)}",
                field="algorithm",
            )
        for key in ("sync_every", "fragments", "overlap_steps"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "overlap_steps" else 1):
                raise ConfigError(f"must be a {'non-negative' if key == 'overlap_steps' else 'positive'} integer, "
                                  f"got {v!r}", field=key)
        if not isinstance(self.overlap, bool):
            raise ConfigError(f"must be true or false, got {self.overlap!r}", field="overlap")
        if self.name != "streaming" and (self.fragments != 1 or self.overlap_steps != 0):
            raise ConfigError(
                f"fragments and overlap_steps apply to streaming only; set algorithm = 'streaming' or drop them "
                f"(got algorithm {self.name!r}, fragments {self.fragments}, overlap_steps {self.overlap_steps})",
                field="fragments" if self.fragments != 1 else "overlap_steps",
            )
        if self.name == "ddp":
            self.sync_every = 1
        if self.name == "streaming":
            if self.fragments > self.sync_every:
                raise ConfigError(
                    f"{self.fragments} fragments cannot each sync once every {self.sync_every} steps on a staggered "
                    "schedule; use fragments <= sync_every",
                    field="fragments",
                )
            if self.overlap_steps >= self.sync_every:
                raise ConfigError(
                    f"overlap_steps ({self.overlap_steps}) must be smaller than sync_every ({self.sync_every})",
                    field="overlap_steps",
                )

    @property
    def hide_steps(self) -> int:
        """Streaming's tau as the model uses it (``overlap`` alone means tau = 1)."""
        if self.name != "streaming":
            return 0
        return self.overlap_steps if self.overlap_steps > 0 else (1 if self.overlap else 0)

    @property
    def period_steps(self) -> float:
        """Inner steps between two consecutive syncs of this site's link."""
        if self.name == "ddp":
            return 1.0
        if self.name == "diloco":
            return float(self.sync_every)
        return self.sync_every / self.fragments

    @property
    def window_steps(self) -> float:
        """Inner steps of compute a sync may span without stalling, at least one (sets peak bandwidth)."""
        if self.name == "diloco" and self.overlap:
            return float(self.sync_every)
        return float(max(1, self.hide_steps))

    @property
    def label(self) -> str:
        if self.name == "ddp":
            return "ddp+overlap" if self.overlap else "ddp"
        if self.name == "diloco":
            return f"diloco H={self.sync_every}" + ("+overlap" if self.overlap else "")
        return f"streaming H={self.sync_every} P={self.fragments} tau={self.hide_steps}"


@dataclass(kw_only=True, slots=True)
class PlanSpec:
    """Everything one plan needs."""

    model: ModelSpec
    """The model and the budget."""
    sites: list[SiteSpec]
    """The datacenters, in ring order."""
    topology: Topology
    """Links between sites (``Topology.default`` for every pair, ``overrides`` per pair)."""
    algorithm: AlgorithmSpec = field(default_factory=AlgorithmSpec)
    """How sites synchronise."""
    codec: Codec | str = "fp32"
    """How payloads are encoded: fp32, bf16, int8, int4, fp4 or topk:F."""
    balance: str = "equal"
    """``equal``: every site takes 1/K of the global batch (the slowest gates each sync); ``throughput``: sites
    take shares proportional to their FLOP/s, so they finish inner steps together."""

    def __post_init__(self) -> None:
        if isinstance(self.codec, str):
            self.codec = parse_codec(self.codec)
        if not self.sites:
            raise ConfigError("a plan needs at least one site", field="sites")
        if self.topology.sites != len(self.sites):
            raise ConfigError(
                f"the links describe {self.topology.sites} sites but {len(self.sites)} are given", field="sites"
            )
        if self.balance not in ("equal", "throughput"):
            raise ConfigError(f"must be 'equal' or 'throughput', got {self.balance!r}", field="balance")
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ConfigError(f"site names must be unique, got {names}", field="sites")

    @property
    def codec_spec(self) -> Codec:
        assert isinstance(self.codec, Codec)
        return self.codec

    def shares(self) -> list[float]:
        """Fraction of the global batch each site computes per inner step."""
        k = len(self.sites)
        if self.balance == "equal":
            return [1.0 / k] * k
        rates = [s.flops_per_second() for s in self.sites]
        total = sum(rates)
        return [r / total for r in rates]


def site_step_seconds(spec: PlanSpec, *, accelerators: list[int] | None = None) -> list[float]:
    """Seconds of compute per inner step at each site (its share of the global batch)."""
    counts = accelerators if accelerators is not None else [s.accelerators for s in spec.sites]
    flops_per_step = 6.0 * spec.model.params * spec.model.batch_tokens
    return [
        flops_per_step * share / site.flops_per_second(n)
        for site, share, n in zip(spec.sites, spec.shares(), counts, strict=True)
    ]


def sync_comm(spec: PlanSpec, *, members: list[int] | None = None) -> CollectiveCost:
    """What one sync costs one site: the same ring collective the WAN emulation charges real runs.

    ``members`` restricts the ring to some sites (the simulation uses it while a site is down).
    """
    alg, codec = spec.algorithm, spec.codec_spec
    payload = spec.model.params * codec.bits / 8.0
    if alg.name == "streaming":
        payload /= alg.fragments
    ring = spec.topology.ring(members)
    collective = ring_all_reduce if codec.collective == "all_reduce" else ring_all_gather
    return collective(int(round(payload)), ring, streams=1)


def lognormal_sigma(cv: float) -> float:
    """The sigma of a lognormal factor with mean 1 and coefficient of variation ``cv`` (its mu is -sigma^2/2):
    how the simulation and the calibration model a site's round time around its mean."""
    return math.sqrt(math.log1p(cv * cv))


def sync_period(alg: AlgorithmSpec, *, step_seconds, comm_seconds):
    """Wall seconds of one sync period (``alg.period_steps`` inner steps) given the gating step time.

    Works element-wise on numpy arrays too, so the simulation can time many rounds at once.
    """
    c, t = step_seconds, comm_seconds
    if alg.name == "ddp":
        hide = _BACKWARD_FRACTION * c if alg.overlap else 0.0 * c
        return c + np.maximum(0.0, t - hide)
    compute = alg.period_steps * c
    if alg.name == "diloco":
        return np.maximum(compute, t) if alg.overlap else compute + t
    tau = alg.hide_steps
    return np.maximum(compute + np.maximum(0.0, t - tau * c), t)


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
    """Rate this site's link must sustain to move one sync's bytes within the compute it may span."""
    bytes_per_sync: int
    """Bytes this site sends per sync."""
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
    """Bits per parameter on the wire."""
    steps: int
    """Inner steps to train on all tokens."""
    syncs: int
    """Cross-site collectives over the whole run (fragment syncs for streaming)."""
    compute_step_seconds: float
    """Compute per inner step of the slowest site (which gates syncs)."""
    step_seconds: float
    """Wall time per inner step, exposed communication included."""
    comm_seconds_per_sync: float
    """Duration of one cross-site collective."""
    hidden_seconds_per_sync: float
    """Part of ``comm_seconds_per_sync`` hidden behind compute."""
    exposed_seconds_per_sync: float
    """Part of it that stalls compute."""
    utilization: float
    """Mean over sites of compute time over wall time."""
    time_to_train_seconds: float
    """Inner steps times wall time per step."""
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
    notes: list[str] = field(default_factory=list)
    """Warnings about assumptions the inputs stretch."""

    @property
    def accelerators_powered(self) -> list[int | None]:
        return [s.accelerators_powered for s in self.sites]

    def to_dict(self) -> dict:
        out = {
            "algorithm": self.algorithm,
            "codec": self.codec,
            "codec_bits": self.codec_bits,
            "steps": self.steps,
            "syncs": self.syncs,
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
            "per_site": [
                {k: getattr(s, k) for k in SiteResult.__dataclass_fields__} for s in self.sites
            ],
            "notes": list(self.notes),
        }
        return out


def plan(spec: PlanSpec) -> PlanResult:
    """Predict one run: timing, utilization, bytes, bandwidth, energy and power caps."""
    alg = spec.algorithm
    k = len(spec.sites)
    site_c = site_step_seconds(spec)
    c = max(site_c)
    cost = sync_comm(spec)
    period = float(sync_period(alg, step_seconds=c, comm_seconds=cost.seconds))
    per_steps = alg.period_steps
    compute_in_period = per_steps * c
    exposed = max(0.0, period - compute_in_period)
    hidden = max(0.0, cost.seconds - exposed)
    # period - compute loses the last bits of T when compute dwarfs it; snap such crumbs to the exact split.
    if hidden <= 1e-9 * cost.seconds:
        hidden, exposed = 0.0, cost.seconds
    elif exposed <= 1e-9 * cost.seconds:
        hidden, exposed = cost.seconds, 0.0

    steps = math.ceil(spec.model.tokens / spec.model.batch_tokens)
    step_wall = period / per_steps
    time_to_train = steps * step_wall
    if k == 1:
        syncs = 0
    elif alg.name == "ddp":
        syncs = steps
    else:
        # Integer arithmetic: fragment syncs are steps * P / H (a float period would round unpredictably).
        syncs = math.ceil(steps * (alg.fragments if alg.name == "streaming" else 1) / alg.sync_every)
    wan_bytes = float(syncs) * k * cost.bytes_sent

    window = alg.window_steps * c
    peak_bps = 8.0 * cost.bytes_sent / window if cost.bytes_sent else 0.0

    notes: list[str] = []
    site_results: list[SiteResult] = []
    for site, cs in zip(spec.sites, site_c, strict=True):
        powered = site.powered_under_cap
        n = site.accelerators
        assert n is not None
        respected = powered is None or n <= powered
        energy = site.power_mw() * time_to_train / 3600.0  # MW * h = MWh
        site_results.append(
            SiteResult(
                name=site.name,
                accelerator=site.accel.name,
                accelerators=n,
                accelerators_powered=powered,
                power_mw=site.power_mw(),
                power_cap_mw=site.power_cap_mw,
                cap_respected=respected,
                compute_step_seconds=cs,
                utilization=per_steps * cs / period,
                peak_bandwidth_bps=peak_bps,
                bytes_per_sync=cost.bytes_sent,
                energy_mwh=energy,
            )
        )
        if not respected:
            notes.append(
                f"{site.name}: {n} accelerators draw {site.power_mw():.1f} MW, over the {site.power_cap_mw:g} MW cap "
                f"(the cap powers {powered})"
            )
    seqs_per_accel = spec.model.batch_tokens / spec.model.seq_len / sum(s.accelerators or 0 for s in spec.sites)
    if seqs_per_accel < 1:
        notes.append(
            f"the global batch holds {spec.model.batch_tokens / spec.model.seq_len:.0f} sequences for "
            f"{sum(s.accelerators or 0 for s in spec.sites)} accelerators ({seqs_per_accel:.3g} each): the assumed MFU "
            "needs tensor/pipeline parallelism inside each site, or a larger batch"
        )
    if k > 1 and exposed > compute_in_period:
        notes.append("communication-bound: exposed communication exceeds compute")

    return PlanResult(
        algorithm=alg.label,
        codec=spec.codec_spec.name,
        codec_bits=spec.codec_spec.bits,
        steps=steps,
        syncs=syncs,
        compute_step_seconds=c,
        step_seconds=step_wall,
        comm_seconds_per_sync=cost.seconds,
        hidden_seconds_per_sync=hidden,
        exposed_seconds_per_sync=exposed,
        utilization=sum(s.utilization for s in site_results) / k,
        time_to_train_seconds=time_to_train,
        wan_bytes=wan_bytes,
        peak_bandwidth_bps=peak_bps,
        energy_mwh=sum(s.energy_mwh for s in site_results),
        caps_respected=all(s.cap_respected for s in site_results),
        sites=site_results,
        notes=notes,
    )


def uniform_topology(sites: int, link: Link | None) -> Topology:
    """Every pair of ``sites`` joined by ``link``."""
    return Topology(sites=sites, default=link)

