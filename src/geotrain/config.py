"""Typed, validated run configuration: TOML files plus dotted ``--set key=value`` overrides.

Every section is a ``@dataclass(kw_only=True, slots=True)`` with a docstring under each field. Values are
checked in ``__post_init__``; a user's mistake raises :class:`geotrain.errors.ConfigError` naming the field
and the fix, which the CLI turns into exit code 2. Unknown keys are refused with the closest valid name.

This module imports no torch, so validating a config (and the planner) stays cheap.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geotrain.errors import ConfigError
from geotrain.topology import Link, Topology, parse_link

__all__ = [
    "Config",
    "RunConfig",
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "OuterConfig",
    "WanConfig",
    "CommConfig",
    "StreamingConfig",
    "load_config",
    "parse_count",
    "SHORT_KEYS",
]

ALGORITHMS = ("ddp", "diloco", "streaming")

# Short names accepted by the CLI flags, compare variants and the Python API, and the fields they set.
SHORT_KEYS = {
    "sites": "run.sites",
    "workers_per_site": "run.workers_per_site",
    "algorithm": "run.algorithm",
    "tokens": "run.tokens",
    "wall_seconds": "run.wall_seconds",
    "seed": "run.seed",
    "out": "run.out",
    "device": "run.device",
    "sync_every": "outer.sync_every",
    "H": "outer.sync_every",
    "codec": "comm.codec",
    "overlap": "comm.overlap",
    "link": "wan.link",
    "data": "data.path",
    "fragments": "streaming.fragments",
    "overlap_steps": "streaming.overlap_steps",
    "mix_alpha": "streaming.mix_alpha",
}
DEMO_LINK = "2mbit/50ms"
QUANTIZERS = ("fp32", "bf16", "int8", "int4")  # fp4 (E3M0) is implemented but not yet as fast as int4
CODECS = (*QUANTIZERS, "topk", *(f"topk+{q}" for q in QUANTIZERS if q != "fp32"))
COMM_PATTERNS = ("auto", "reduce_scatter", "all_gather")


def parse_count(value: Any, *, field_name: str) -> int:
    """Accept 4000000, 4e6, "4M", "1.5k", "2g" for counts such as token budgets."""
    if isinstance(value, bool):
        raise ConfigError(f"expected a count such as 4000000 or '4M', got {value!r}", field=field_name)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgGbBtT]?)\s*", value)
        if m:
            scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9, "t": 1e12}[m.group(2).lower()]
            number = float(m.group(1)) * scale
            if math.isfinite(number) and number == int(number):
                return int(number)
    raise ConfigError(f"expected a count such as 4000000 or '4M', got {value!r}", field=field_name)


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"must be positive, got {value!r}", field=name)


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """What is trained, by how many sites, for how long."""

    sites: int = 4
    """Number of sites (datacenters); each runs as its own process group."""
    workers_per_site: int = 1
    """Data-parallel workers inside each site (gloo on CPU, NCCL with device = "cuda")."""
    algorithm: str = "diloco"
    """Training method: "ddp" (all-reduce every step), "diloco" or "streaming"."""
    tokens: int = 1_600_000
    """Training-token budget over all sites together."""
    wall_seconds: float | None = None
    """Optional training wall-time budget: stop at a sync point, before a round that would overrun it."""
    seed: int = 0
    """Seed of model initialisation and data sampling; the same seed gives the same run."""
    out: str = "runs/latest"
    """Output directory for summary.json, metrics.jsonl, report.html and model.safetensors."""
    device: str = "cpu"
    """"cpu" or "cuda" (NCCL inside a site; cross-site traffic always goes over gloo)."""
    log_every: int = 10
    """Inner steps between training-loss records in metrics.jsonl."""
    eval_every_tokens: int = 0
    """Evaluate the global model after every this many tokens (all sites); 0 means ten times per run."""
    eval_batches: int = 8
    """Batches of the held-out split used for each evaluation (the same windows for every algorithm)."""
    collective_timeout_s: float = 300.0
    """Seconds a cross-site collective may block before the run fails instead of hanging."""

    def __post_init__(self) -> None:
        self.tokens = parse_count(self.tokens, field_name="run.tokens")
        self.eval_every_tokens = parse_count(self.eval_every_tokens, field_name="run.eval_every_tokens")
        if self.sites < 1:
            raise ConfigError(f"needs at least 1 site, got {self.sites}; try --sites 4", field="run.sites")
        if self.workers_per_site < 1:
            raise ConfigError(f"needs at least 1 worker, got {self.workers_per_site}", field="run.workers_per_site")
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(_choice_message(self.algorithm, ALGORITHMS), field="run.algorithm")
        _positive("run.tokens", self.tokens)
        if self.wall_seconds is not None:
            _positive("run.wall_seconds", self.wall_seconds)
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(_choice_message(self.device, ("cpu", "cuda")), field="run.device")
        _positive("run.log_every", self.log_every)
        _positive("run.eval_batches", self.eval_batches)
        if self.eval_every_tokens < 0:
            raise ConfigError("must be 0 (ten evaluations per run) or positive", field="run.eval_every_tokens")
        _positive("run.collective_timeout_s", self.collective_timeout_s)


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """The demo byte-level GPT (ignored when you train your own nn.Module through the API)."""

    n_layer: int = 2
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide d_model."""
    d_model: int = 128
    """Width of the residual stream."""
    seq_len: int = 128
    """Context length in bytes."""

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "d_model", "seq_len"):
            _positive(f"model.{name}", getattr(self, name))
        if self.d_model % self.n_head:
            raise ConfigError(
                f"d_model={self.d_model} is not divisible by n_head={self.n_head}; pick n_head among "
                f"{[h for h in range(1, 17) if self.d_model % h == 0]}",
                field="model.n_head",
            )


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where training bytes come from and how each site samples them."""

    path: str | None = None
    """A text file or a directory of text files; unset means the interpreter's standard-library sources."""
    batch_size: int = 16
    """Sequences per inner step per worker."""
    val_fraction: float = 0.05
    """Share of files (or bytes, for one file) held out for evaluation."""

    def __post_init__(self) -> None:
        _positive("data.batch_size", self.batch_size)
        if not 0 < self.val_fraction < 0.5:
            raise ConfigError(f"must lie in (0, 0.5), got {self.val_fraction!r}", field="data.val_fraction")


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """The inner optimizer each site steps on its own (every step for ddp)."""

    name: str = "adamw"
    """"adamw" or "sgd"."""
    lr: float = 3e-3
    """Peak learning rate."""
    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW) or L2 (SGD)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    momentum: float = 0.0
    """SGD momentum."""
    warmup_steps: int = 20
    """Linear warm-up steps at the start."""
    schedule: str = "cosine"
    """"cosine" (decay to min_lr_ratio * lr at the end) or "constant"."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a share of lr, for the cosine schedule."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this; 0 turns clipping off."""

    def __post_init__(self) -> None:
        if self.name not in ("adamw", "sgd"):
            raise ConfigError(_choice_message(self.name, ("adamw", "sgd")), field="optim.name")
        _positive("optim.lr", self.lr)
        if self.weight_decay < 0:
            raise ConfigError("must be zero or positive", field="optim.weight_decay")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(_choice_message(self.schedule, ("cosine", "constant")), field="optim.schedule")
        if self.warmup_steps < 0:
            raise ConfigError("must be zero or positive", field="optim.warmup_steps")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("must lie in [0, 1]", field="optim.min_lr_ratio")
        if self.grad_clip < 0:
            raise ConfigError("must be zero (off) or positive", field="optim.grad_clip")


@dataclass(kw_only=True, slots=True)
class OuterConfig:
    """DiLoCo's outer step on the averaged pseudo-gradient (arXiv 2311.08105 defaults)."""

    sync_every: int = 50
    """H: inner steps between outer rounds."""
    lr: float = 0.7
    """Outer learning rate."""
    momentum: float = 0.9
    """Outer SGD momentum."""
    nesterov: bool = True
    """Use Nesterov momentum in the outer SGD."""
    warmup_steps: int = 100
    """Outer rounds that end within this many inner steps plainly average the sites (no outer momentum).
    From scratch the first rounds' pseudo-gradients are huge and point in directions that stop mattering
    quickly; momentum would keep replaying them. The DiLoCo paper starts from a pre-trained model and needs
    no warm-up: set 0 for its exact method."""

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError("must be zero or positive", field="outer.warmup_steps")
        if self.sync_every < 1:
            raise ConfigError(
                f"H must be at least 1 inner step, got {self.sync_every}; try --sync-every 50",
                field="outer.sync_every",
            )
        _positive("outer.lr", self.lr)
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"must lie in [0, 1), got {self.momentum!r}", field="outer.momentum")
        if self.nesterov and self.momentum == 0:
            self.nesterov = False  # Nesterov without momentum is plain SGD; torch refuses the combination


@dataclass(kw_only=True, slots=True)
class StreamingConfig:
    """Streaming DiLoCo (arXiv 2501.18512): fragments synchronised in turn."""

    fragments: int = 4
    """P: number of parameter fragments, each synchronised every H steps on a staggered schedule."""
    overlap_steps: int = 1
    """tau: inner steps a fragment's communication overlaps before it is merged."""
    mix_alpha: float = 0.5
    """Merge weight: fragment = alpha * local + (1 - alpha) * global."""

    def __post_init__(self) -> None:
        _positive("streaming.fragments", self.fragments)
        if self.overlap_steps < 0:
            raise ConfigError("must be zero or positive", field="streaming.overlap_steps")
        if not 0 <= self.mix_alpha <= 1:
            raise ConfigError(f"must lie in [0, 1], got {self.mix_alpha!r}", field="streaming.mix_alpha")


@dataclass(kw_only=True, slots=True)
class LinkOverride:
    """One per-pair link, for sites joined by something other than the default link."""

    between: list[int]
    """The two site indices this link joins."""
    link: str
    """BANDWIDTH/LATENCY, for example "100mbit/20ms"."""

    def __post_init__(self) -> None:
        if len(self.between) != 2:
            raise ConfigError(f"needs exactly two site indices, got {self.between!r}", field="wan.links.between")
        try:
            parse_link(self.link)
        except ValueError as e:
            raise ConfigError(str(e), field="wan.links.link") from None


@dataclass(kw_only=True, slots=True)
class WanConfig:
    """Wide-area link emulation applied to every cross-site collective."""

    link: str = DEMO_LINK
    """Default link between any two sites, BANDWIDTH/LATENCY (e.g. "10mbit/50ms"), or "none" for no emulation."""
    links: list[LinkOverride] = field(default_factory=list)
    """Per-pair overrides: [[wan.links]] between = [0, 1], link = "1gbit/10ms"."""

    def __post_init__(self) -> None:
        try:
            parse_link(self.link)
        except ValueError as e:
            raise ConfigError(f"{e}", field="wan.link") from None


@dataclass(kw_only=True, slots=True)
class CommConfig:
    """How pseudo-gradients travel between sites."""

    codec: str = "fp32"
    """Codec of cross-site payloads: fp32, bf16, int8, int4, topk, topk+int8, ..."""
    block_size: int = 0
    """Block size of blockwise quantizers; 0 keeps the codec's default."""
    topk_fraction: float = 0.01
    """Share of each chunk that top-k codecs keep."""
    overlap: bool = False
    """DiLoCo only: run round t's outer all-reduce while round t+1 computes (one-step-delayed update)."""
    pattern: str = "auto"
    """Collective of a lossy codec: "reduce_scatter" (encoded chunks to their owners, then an all-gather of the
    re-encoded means: a ring all-reduce's bytes), "all_gather" (every site's whole payload to every site: one
    quantization, (K-1)x the bytes), or "auto" (reduce_scatter for dense codecs among 3+ sites, else
    all_gather). See docs/codecs.md."""

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ConfigError(_choice_message(self.codec, CODECS), field="comm.codec")
        if self.pattern not in COMM_PATTERNS:
            raise ConfigError(_choice_message(self.pattern, COMM_PATTERNS), field="comm.pattern")
        if self.block_size < 0:
            raise ConfigError("must be 0 (codec default) or positive", field="comm.block_size")
        if not 0 < self.topk_fraction <= 1:
            raise ConfigError(f"must lie in (0, 1], got {self.topk_fraction!r}", field="comm.topk_fraction")


@dataclass(kw_only=True, slots=True)
class Config:
    """A whole run."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    wan: WanConfig = field(default_factory=WanConfig)
    comm: CommConfig = field(default_factory=CommConfig)

    def __post_init__(self) -> None:
        for o in self.wan.links:
            for s in o.between:
                if not 0 <= s < self.run.sites:
                    raise ConfigError(
                        f"names site {s}, but the run has sites 0..{self.run.sites - 1}", field="wan.links.between"
                    )
        if self.run.algorithm == "streaming" and self.streaming.overlap_steps >= self.outer.sync_every:
            raise ConfigError(
                f"tau={self.streaming.overlap_steps} must be smaller than H={self.outer.sync_every}: a fragment's "
                "sync has to land before its next one starts",
                field="streaming.overlap_steps",
            )
        if self.run.algorithm == "ddp" and self.comm.overlap:
            raise ConfigError("overlap applies to diloco and streaming, not ddp", field="comm.overlap")

    # -- derived views -------------------------------------------------------------------------------------
    def topology(self) -> Topology:
        overrides: dict[tuple[int, int], Link] = {}
        for o in self.wan.links:
            link = parse_link(o.link)
            if link is not None:
                overrides[(o.between[0], o.between[1])] = link
        return Topology(self.run.sites, default=parse_link(self.wan.link), overrides=overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- loading --------------------------------------------------------------------------------------------------


def _choice_message(value: Any, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown value {value!r}; choose one of {', '.join(choices)}{hint}"


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int, float, str, bool, X | None, list[...], dataclass)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"expected a list, got {value!r}", field=name)
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"expected a table of settings, got {value!r}", field=name)
        return _build(tp, value, name)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, (str, float)) and not isinstance(value, bool):
            try:
                return parse_count(value, field_name=name)
            except ConfigError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"expected {_type_name(tp)}, got {value!r}", field=name)


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean '{prefix}.{close[0]}'?" if close else f"valid keys are {', '.join(names)}"
            raise ConfigError(f"unknown setting; {hint}", field=f"{prefix}.{key}" if prefix else key)
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a component's own ValueError still names its section
        raise ConfigError(str(e), field=prefix or None) from None


def _parse_value(text: str) -> Any:
    """Read an override's value as TOML (numbers, booleans, lists, quoted strings); else as a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {key!r} must be SECTION.KEY=VALUE, for example run.sites=4", field=key)
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{p!r} is a value, not a section", field=key)
        node = child
    node[parts[-1]] = value


def load_config(
    path: str | Path | None = None,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    values: dict[str, Any] | None = None,
) -> Config:
    """Build a Config from an optional TOML file, ``--set`` style overrides, then already-typed ``values``.

    Later sources win: file < overrides < values. ``values`` maps dotted keys (``"run.sites"``) to Python values.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; check the path", field="--config")
        try:
            tree = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p} is not valid TOML ({e}); fix the line it names", field="--config") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{p} is not UTF-8 text", field="--config") from None
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} needs the form key=value, for example run.sites=4", field="--set")
        _set_dotted(tree, key.strip(), _parse_value(text.strip()))
    for key, value in (values or {}).items():
        _set_dotted(tree, key, value)
    return _build(Config, tree, "")
