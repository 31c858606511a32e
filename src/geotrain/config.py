"""The one configuration vocabulary of ``geotrain run`` and ``geotrain plan``: TOML files plus dotted
``--set key=value`` overrides.

A run file and a plan file are the same kind of document. ``[run]``, ``[model]``, ``[data]``, ``[optim]``,
``[outer]``, ``[streaming]``, ``[wan]`` and ``[comm]`` describe a training run; ``[sites]``/``[[site]]``
(accelerators, power), ``[accelerators.NAME]``, ``[plan]`` (the questions and the planning scale) and
``[simulate]`` add what the planner needs, and a run ignores them. ``[grid]`` and ``[[grid.traces]]`` describe each
site's power from the grid over time (``geotrain.power``). So ``geotrain plan --config RUN.toml``
plans exactly the run that file describes, and flags such as ``--model-params 10b`` move it to another scale.

Every section is a ``@dataclass(kw_only=True, slots=True)`` with a docstring under each field. Values are
checked in ``__post_init__``, every number against a range; a user's mistake raises
:class:`geotrain.errors.ConfigError` naming the field and the fix, which the CLI turns into exit code 2.
Unknown keys are refused with the closest valid name, and keys of the planner's former vocabulary with
their new name. Algorithms and codecs are checked against their registries (``geotrain.algorithms``,
``geotrain.comm.codecs``), so a name the planner accepts is one a run accepts.

This module imports no torch, so validating a config (and the planner) stays cheap.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import sys
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geotrain.errors import ConfigError, SettingConflict
from geotrain.topology import LINK_PRESETS, Link, Topology, parse_link

__all__ = [
    "AcceleratorConfig",
    "CheckpointConfig",
    "GuardConfig",
    "MembershipConfig",
    "inner_steps",
    "CommConfig",
    "Config",
    "DataConfig",
    "DEMO_LINK",
    "GridConfig",
    "GridTraceConfig",
    "LinkOverride",
    "ModelConfig",
    "OptimConfig",
    "OuterConfig",
    "PlanConfig",
    "RunConfig",
    "SHORT_KEYS",
    "SimulateConfig",
    "SiteConfig",
    "SitesConfig",
    "SparseLoCoConfig",
    "StreamingConfig",
    "WanConfig",
    "config_from_tree",
    "defaults",
    "load_config",
    "parse_count",
    "read_toml",
]

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
    "precision": "run.precision",
    "fsdp": "run.fsdp",
    "model": "model.arch",
    "tensorboard": "run.tensorboard",
    "site_speeds": "run.site_speeds",
    "sync_every_seconds": "outer.sync_every_seconds",
    "sync_every": "outer.sync_every",
    "H": "outer.sync_every",
    "codec": "comm.codec",
    "overlap": "comm.overlap",
    "link": "wan.link",
    "data": "data.path",
    "fragments": "streaming.fragments",
    "overlap_steps": "streaming.overlap_steps",
    "tau": "streaming.overlap_steps",
    "mix_alpha": "streaming.mix_alpha",
}
DEMO_LINK = "2mbit/50ms"
MAX_SITES = 1000
"""Most sites a configuration may name (a plan of that many is seconds; a run on one machine is capped lower
by the launcher)."""

# Keys of the planner's former file format, and where they live now.
_MOVED = {
    "algorithm": "[run] algorithm, [outer] sync_every, [streaming] fragments and overlap_steps, [comm] codec "
                 "and overlap, [sites] balance",
    "link": "[wan] link",
    "links": "[[wan.links]]",
    "link_presets": "[wan.presets]",
    "question": "[plan]",
    "model.tokens": "run.tokens",
    "model.batch_tokens": "plan.batch_tokens",
    "sites.count": "run.sites",
}

# One way to match each number (no overlapping repeats), so a long string that does not parse fails fast.
_COUNT = re.compile(r"((?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e[-+]?[0-9]+)?)\s*([kmgbtp]?)")
_SCALE = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9, "t": 10**12, "p": 10**15}


def parse_count(value: Any, *, field_name: str) -> int:
    """A whole count: 4000000, 4e6, "4M", "1.5k", "70b", "15t", "1_000", "16,000"."""
    message = f"expected a count such as 4000000 or '4M' (suffixes k, m, b or g, t, p), got {value!r}"
    if isinstance(value, bool):
        raise ConfigError(message, field=field_name)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return int(value)
        raise ConfigError(message, field=field_name)
    if isinstance(value, str) and len(value) <= 64:
        m = _COUNT.fullmatch(value.strip().lower().replace("_", "").replace(",", ""))
        if m:
            number = float(m.group(1)) * _SCALE[m.group(2)]
            if math.isfinite(number) and number == int(number):
                return int(number)
    raise ConfigError(message, field=field_name)


def inner_steps(tokens: int, batch_tokens: int) -> int:
    """Inner steps of a run: its token budget over the global batch (all sites' workers together), at least
    one. The training loop, the start record and the planner all count this way."""
    return max(1, tokens // batch_tokens)


# -- range checks ---------------------------------------------------------------------------------------------


def _number(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False, what: str = "") -> None:
    """``value`` must be a finite number in [lo, hi] (or (lo, hi] with ``lo_open``)."""
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value > lo if lo_open else value >= lo) and value <= hi)
    if not ok:
        low = f"({lo:g}" if lo_open else f"[{lo:g}"
        raise ConfigError(f"must lie in {low}, {hi:g}]{what}, got {value!r}", field=name)


def parse_size(text: Any, *, field: str) -> int:
    """``65536``, ``"64kb"`` or ``"1mb"`` (powers of 1024) into bytes; ConfigError otherwise."""
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*(b|kb|k|mb|m)?\s*", str(text).lower())
    if not m:
        raise ConfigError(f"cannot read {text!r} as a size; write bytes such as 65536, 64kb or 1mb", field=field)
    scale = {None: 1, "b": 1, "k": 1024, "kb": 1024, "m": 1 << 20, "mb": 1 << 20}[m.group(2)]
    return int(float(m.group(1)) * scale)


def _integer(name: str, value: Any, lo: int, hi: int, *, what: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"must be an integer from {lo:,} to {hi:,}{what}, got {value!r}", field=name)


def _choice_message(value: Any, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown value {value!r}; choose one of {', '.join(choices)}{hint}"


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(_choice_message(value, choices), field=name)


# -- a run ------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """What is trained, by how many sites, for how long."""

    sites: int | None = None
    """Number of sites (datacenters); each runs as its own process group. Default 4, or one per [[site]]."""
    workers_per_site: int = 1
    """Data-parallel workers inside each site (gloo on CPU, NCCL with device = "cuda")."""
    algorithm: str = "diloco"
    """Training method: one of the registered algorithms (ddp, diloco, streaming)."""
    tokens: int = 1_600_000
    """Training-token budget over all sites together."""
    wall_seconds: float | None = None
    """Optional training wall-time budget: stop at a sync point, before a round that would overrun it."""
    seed: int = 0
    """Seed of model initialisation and data sampling; the same seed gives the same run."""
    out: str | None = None
    """Output directory for summary.json, metrics.jsonl, report.html and model.safetensors. Unset, ``geotrain
    run`` writes to a fresh ``runs/YYYYMMDD-HHMMSS`` and points the link ``runs/latest`` at it, and a torchrun
    site to ``runs/siteK``."""
    device: str = "cpu"
    """"cpu" or "cuda" (NCCL inside a site; cross-site traffic always goes over gloo)."""
    precision: str = "fp32"
    """"fp32", or "bf16": forward and backward under bf16 autocast; weights, gradients, the inner and outer
    optimizers' state and every cross-site payload stay fp32. Evaluation is always fp32."""
    fsdp: bool = False
    """Shard the model over the site's workers with FSDP2 (``fully_shard``) instead of replicating it with
    DistributedDataParallel: for models whose weights and optimizer state do not fit one device. Each worker
    then carries its own shard across sites."""
    log_every: int = 10
    """Inner steps between training-loss records in metrics.jsonl."""
    eval_every_tokens: int = 0
    """Evaluate the global model after every this many tokens (all sites); 0 means ten times per run."""
    eval_batches: int = 8
    """Batches of the held-out split used for each evaluation (the same windows for every algorithm)."""
    collective_timeout_s: float = 300.0
    """Seconds a collective inside a site (between its workers) may block before the site fails instead of
    hanging. Cross-site transfers have deadlines of their own that follow their size (``[membership]``)."""
    tensorboard: bool = False
    """Also write the records as TensorBoard scalars, live, under OUT/tensorboard/ (one run per site and a
    ``global`` one); needs ``pip install 'geotrain[tensorboard]'``."""
    site_speeds: list[float] | None = None
    """Speed of each site's compute relative to this machine, one factor in (0, 1] per site (``1,1,0.5,0.25``:
    two full-speed sites, one at half and one at a quarter speed), for heterogeneous hardware. Emulated by
    holding each step back after it computes (``geotrain.train.pace``); the time held back is reported as
    throttled. Unset: every site at full speed."""

    def __post_init__(self) -> None:
        from geotrain.algorithms import get_algorithm

        self.tokens = parse_count(self.tokens, field_name="run.tokens")
        self.eval_every_tokens = parse_count(self.eval_every_tokens, field_name="run.eval_every_tokens")
        if self.sites is not None:
            if isinstance(self.sites, int) and not isinstance(self.sites, bool) and self.sites < 1:
                raise ConfigError(f"needs at least 1 site, got {self.sites}; try --sites 4", field="run.sites")
            _integer("run.sites", self.sites, 1, MAX_SITES)
        if isinstance(self.workers_per_site, int) and self.workers_per_site < 1:
            raise ConfigError(f"needs at least 1 worker, got {self.workers_per_site}", field="run.workers_per_site")
        _integer("run.workers_per_site", self.workers_per_site, 1, 4096)
        self.algorithm = get_algorithm(self.algorithm).name
        _integer("run.tokens", self.tokens, 1, 10**18, what=" (a positive token budget such as 4M)")
        if self.wall_seconds is not None:
            _number("run.wall_seconds", self.wall_seconds, 0, 10**8, lo_open=True)
        _integer("run.seed", self.seed, 0, 2**63 - 1)
        _choice("run.device", self.device, ("cpu", "cuda"))
        _choice("run.precision", self.precision, ("fp32", "bf16"))
        if not isinstance(self.fsdp, bool):
            raise ConfigError(f"must be true or false, got {self.fsdp!r}", field="run.fsdp")
        _integer("run.log_every", self.log_every, 1, 10**9)
        _integer("run.eval_every_tokens", self.eval_every_tokens, 0, 10**18, what=" (0: ten evaluations per run)")
        _integer("run.eval_batches", self.eval_batches, 1, 100_000)
        _number("run.collective_timeout_s", self.collective_timeout_s, 0, 7 * 86400, lo_open=True,
                what=" seconds")
        if self.site_speeds is not None:
            if not isinstance(self.site_speeds, list) or not self.site_speeds:
                raise ConfigError(f"must list one speed factor per site, such as [1, 1, 0.5, 0.25]; got "
                                  f"{self.site_speeds!r}", field="run.site_speeds")
            for v in self.site_speeds:
                _number("run.site_speeds", v, 0, 1, lo_open=True,
                        what=" (a site's speed relative to this machine: 1 is full speed, 0.25 a quarter)")


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """The model a run trains when no workload of your own is given: the demo byte-level GPT, or a Hugging Face
    causal language model (ignored when you train your own nn.Module through the API)."""

    arch: str = "gpt"
    """"gpt" (the demo byte-level GPT), "hf:TYPE" for a transformers model type built from the sizes below with
    no download (hf:llama, hf:qwen2, hf:gpt2, ...), or "hf:PATH" for a local directory (a path with a "/", such
    as hf:./my-model) loaded with from_pretrained. Needs the hf extra (pip install 'geotrain[hf]')."""
    n_layer: int = 2
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide d_model."""
    d_model: int = 128
    """Width of the residual stream."""
    seq_len: int = 128
    """Context length in bytes."""
    dropout: float = 0.0
    """Dropout probability on embeddings, attention and residual branches, in [0, 1). 0 for small-data demos."""
    hf: dict[str, Any] = field(default_factory=dict)
    """hf: models only: more transformers config values, written over the ones mapped from the sizes above
    (for example intermediate_size, rope_theta, tie_word_embeddings); ``[model.hf]`` in a file."""
    params: int | None = None
    """Planning only: the model's parameter count (70b); unset, it is the demo GPT's count from its shape.
    A run's size always comes from n_layer, n_head, d_model and seq_len."""

    def __post_init__(self) -> None:
        _check_arch(self.arch, self.hf)
        _integer("model.n_layer", self.n_layer, 1, 1024)
        _integer("model.n_head", self.n_head, 1, 4096)
        _integer("model.d_model", self.d_model, 1, 1 << 17)
        _integer("model.seq_len", self.seq_len, 1, 1 << 20)
        if self.d_model % self.n_head:
            raise ConfigError(
                f"d_model={self.d_model} is not divisible by n_head={self.n_head}; pick n_head among "
                f"{[h for h in range(1, 17) if self.d_model % h == 0]}",
                field="model.n_head",
            )
        if not (isinstance(self.dropout, float | int) and not isinstance(self.dropout, bool) and 0 <= self.dropout < 1):
            raise ConfigError(f"must lie in [0, 1), got {self.dropout!r}", field="model.dropout")
        if self.params is not None:
            self.params = parse_count(self.params, field_name="model.params")
            _integer("model.params", self.params, 1, 10**16)

    def layout(self) -> list[tuple[str, int]]:
        """(name, numel) of every parameter of the demo GPT (``geotrain.models.gpt``; ``Config.layout`` covers
        hf: models too), in its order: the
        tied byte embedding, the position embedding, per block ln_1, attention (qkv and output projection),
        ln_2 and the MLP (4x wide), then the final LayerNorm."""
        c, out = self.d_model, [("wte.weight", 256 * self.d_model), ("wpe.weight", self.seq_len * self.d_model)]
        for i in range(self.n_layer):
            b = f"blocks.{i}."
            out += [(b + "ln_1.weight", c), (b + "ln_1.bias", c),
                    (b + "attn.c_attn.weight", 3 * c * c), (b + "attn.c_attn.bias", 3 * c),
                    (b + "attn.c_proj.weight", c * c), (b + "attn.c_proj.bias", c),
                    (b + "ln_2.weight", c), (b + "ln_2.bias", c),
                    (b + "mlp.c_fc.weight", 4 * c * c), (b + "mlp.c_fc.bias", 4 * c),
                    (b + "mlp.c_proj.weight", 4 * c * c), (b + "mlp.c_proj.bias", c)]
        return out + [("ln_f.weight", c), ("ln_f.bias", c)]


def _check_arch(arch: Any, hf: dict[str, Any]) -> None:
    """``model.arch`` names the demo GPT or an hf: model, and ``model.hf`` holds plain values for an hf: one.
    Whether transformers knows the type is checked where a run needs the model (``geotrain.models.hf``)."""
    if not isinstance(arch, str):
        raise ConfigError(f"expected a string, got {arch!r}", field="model.arch")
    if arch != "gpt" and not (arch.startswith("hf:") and arch[3:].strip()):
        shown = arch if len(arch) <= 80 else arch[:77] + "..."
        bare = arch.strip().lower()
        hint = ("; did you mean 'gpt'?" if bare == "gpt" else f"; did you mean 'hf:{bare}'?"
                if bare.isidentifier() else "")
        raise ConfigError(f"unknown model {shown!r}: use gpt (the demo byte-level GPT), hf:TYPE for a transformers "
                          "model type such as hf:llama, hf:qwen2 or hf:gpt2, or hf:PATH for a local directory"
                          + hint, field="model.arch")
    if hf and arch == "gpt":
        raise ConfigError("holds transformers config values, which only an hf: model reads; set model.arch (for "
                          "example --model hf:llama) or drop [model.hf]", field="model.hf")
    for key, value in hf.items():
        if not _plain(value):
            raise ConfigError(f"must be a string, a finite number, true or false, or a list or table of them, got "
                              f"{value!r}", field=f"model.hf.{key}")


def _plain(value: Any) -> bool:
    """A JSON value (what config.json and a transformers config.json can hold)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if value is None or isinstance(value, (str, int, bool)):
        return True
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where training bytes come from and how each site samples them."""

    path: str | None = None
    """A text file or a directory of text files; unset means the interpreter's standard-library sources."""
    batch_size: int = 16
    """Sequences per inner step per worker."""
    val_fraction: float = 0.05
    """Share of files (or bytes, for one file) held out for evaluation."""
    tokenizer: str | None = None
    """hf: models only: a local tokenizer directory (what AutoTokenizer.from_pretrained reads), or "bytes" for
    byte-level ids (0-255). Unset: the tokenizer in an hf:PATH model's directory if it holds one, else bytes."""

    def __post_init__(self) -> None:
        if self.path is not None and not self.path.strip():
            raise ConfigError("is empty; give a text file or a directory, or leave it unset for Python's standard "
                              "library", field="data.path")
        if self.tokenizer is not None and not self.tokenizer.strip():
            raise ConfigError('is empty; give a tokenizer directory or "bytes", or leave it unset',
                              field="data.tokenizer")
        _integer("data.batch_size", self.batch_size, 1, 1 << 20)
        if not (isinstance(self.val_fraction, float | int) and 0 < self.val_fraction < 0.5):
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
    """AdamW first-moment decay, in [0, 1)."""
    beta2: float = 0.95
    """AdamW second-moment decay, in [0, 1)."""
    momentum: float = 0.0
    """SGD momentum, in [0, 1)."""
    warmup_steps: int = 20
    """Linear warm-up steps at the start."""
    schedule: str = "cosine"
    """"cosine" (decay to min_lr_ratio * lr at the end) or "constant"."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a share of lr, for the cosine schedule."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this; 0 turns clipping off."""

    def __post_init__(self) -> None:
        _choice("optim.name", self.name, ("adamw", "sgd"))
        _number("optim.lr", self.lr, 0, 10, lo_open=True)
        _number("optim.weight_decay", self.weight_decay, 0, 10)
        for key in ("beta1", "beta2", "momentum"):
            value = getattr(self, key)
            if not (isinstance(value, float | int) and not isinstance(value, bool) and 0 <= value < 1):
                raise ConfigError(f"must lie in [0, 1), got {value!r}", field=f"optim.{key}")
        _integer("optim.warmup_steps", self.warmup_steps, 0, 10**9)
        _choice("optim.schedule", self.schedule, ("cosine", "constant"))
        _number("optim.min_lr_ratio", self.min_lr_ratio, 0, 1)
        _number("optim.grad_clip", self.grad_clip, 0, 1e6, what=" (0 turns clipping off)")


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
    sync_every_seconds: float | None = None
    """Time-based rounds: end each outer round after this many seconds of training on every site instead of
    after H steps. Each site contributes the inner steps it managed, and the pseudo-gradients are averaged
    with token weights, so unequal sites do not wait for the slowest. diloco only."""
    warmup_steps: int = 100
    """Outer rounds that end within this many inner steps plainly average the sites (no outer momentum).
    From scratch the first rounds' pseudo-gradients are huge and point in directions that stop mattering
    quickly; momentum would keep replaying them. The DiLoCo paper starts from a pre-trained model and needs
    no warm-up: set 0 for its exact method."""

    def __post_init__(self) -> None:
        _integer("outer.warmup_steps", self.warmup_steps, 0, 10**9)
        if isinstance(self.sync_every, int) and not isinstance(self.sync_every, bool) and self.sync_every < 1:
            raise ConfigError(f"H must be at least 1 inner step, got {self.sync_every}; try --sync-every 50",
                              field="outer.sync_every")
        _integer("outer.sync_every", self.sync_every, 1, 10**9)
        _number("outer.lr", self.lr, 0, 10, lo_open=True)
        if self.sync_every_seconds is not None:
            _number("outer.sync_every_seconds", self.sync_every_seconds, 0, 1e7, lo_open=True,
                    what=" seconds of training per round (try 10)")
        if not (isinstance(self.momentum, float | int) and not isinstance(self.momentum, bool)
                and 0 <= self.momentum < 1):
            raise ConfigError(f"must lie in [0, 1), got {self.momentum!r}", field="outer.momentum")
        if self.nesterov and self.momentum == 0:
            self.nesterov = False  # Nesterov without momentum is plain SGD; torch refuses the combination


@dataclass(kw_only=True, slots=True)
class StreamingConfig:
    """Streaming DiLoCo (arXiv 2501.18512): fragments synchronised in turn."""

    fragments: int = 4
    """P: number of parameter fragments, each synchronised every H steps on a staggered schedule."""
    overlap_steps: int | None = None
    """tau: inner steps a fragment's communication overlaps before it is merged. Unset, the run picks the
    fewest steps its predicted transfer hides behind, and says so."""
    mix_alpha: float = 0.5
    """Merge weight: fragment = alpha * local + (1 - alpha) * global."""

    def __post_init__(self) -> None:
        _integer("streaming.fragments", self.fragments, 1, 4096)
        if self.overlap_steps is not None:
            _integer("streaming.overlap_steps", self.overlap_steps, 0, 10**9)
        _number("streaming.mix_alpha", self.mix_alpha, 0, 1)


@dataclass(kw_only=True, slots=True)
class SparseLoCoConfig:
    """SparseLoCo (arXiv 2508.15706): a decayed error-feedback accumulator in place of outer momentum, and
    chunked top-k with low-bit values on the wire. The paper reports 1-3% density with 2-bit values; the chunk,
    beta and lr defaults are this project's guesses, not the paper's (``geotrain.algorithms.sparseloco``)."""

    density: float = 0.01
    """Share of each chunk of the accumulator that is sent (top-k by magnitude)."""
    chunk: int = 4096
    """Values per chunk: one scale each, and indices of ceil(log2(chunk)) bits (12 for 4096)."""
    bits: int = 2
    """Bits per sent value: 2, 4 or 8 (a sign and 2^(bits-1) magnitude levels, scaled per chunk)."""
    beta: float = 0.95
    """Decay of the accumulator: e <- beta * e + pseudo-gradient before the top-k is taken."""
    lr: float = 1.0
    """Outer learning rate on the average of the sites' sparse updates (there is no outer momentum)."""

    def __post_init__(self) -> None:
        _number("sparseloco.density", self.density, 0, 1, lo_open=True)
        _integer("sparseloco.chunk", self.chunk, 2, 1 << 24)
        if isinstance(self.bits, bool) or self.bits not in (2, 4, 8):
            raise ConfigError(f"must be 2, 4 or 8 bits per sent value, got {self.bits!r}", field="sparseloco.bits")
        _number("sparseloco.beta", self.beta, 0, 1)
        _number("sparseloco.lr", self.lr, 0, 10, lo_open=True)


@dataclass(kw_only=True, slots=True)
class LinkOverride:
    """One per-pair link, for sites joined by something other than the default link."""

    between: list[int | str]
    """The two sites this link joins: indices, or names from [sites] names / [[site]] name."""
    link: str
    """BANDWIDTH/LATENCY, for example "100mbit/20ms", or a link preset."""
    loss: float = 0.0
    """The network lab only: probability that a packet is lost on this link, in each direction."""
    queue: int | str | None = None
    """The network lab only: each direction's queue, in bytes (65536, "64kb", "1mb"); unset: the lab's default
    (one round trip's bandwidth-delay product, at least 64 KB)."""

    def __post_init__(self) -> None:
        if len(self.between) != 2:
            raise ConfigError(f"needs exactly two sites, got {self.between!r}", field="wan.links.between")
        _number("wan.links.loss", self.loss, 0, 1)
        if self.loss == 1:
            raise ConfigError("a link that loses every packet is no link; give a probability below 1",
                              field="wan.links.loss")
        if self.queue is not None:
            self.queue_bytes()

    def queue_bytes(self) -> int | None:
        """``queue`` in bytes (None when unset)."""
        return None if self.queue is None else parse_size(self.queue, field="wan.links.queue")


@dataclass(kw_only=True, slots=True)
class WanConfig:
    """The wide-area links between sites (emulated by a run, priced by the planner)."""

    link: str = DEMO_LINK
    """Default link between any two sites: BANDWIDTH/LATENCY (e.g. "10mbit/50ms"), a preset (metro,
    cross-country, intercontinental, internet), or "none" for no emulation."""
    links: list[LinkOverride] = field(default_factory=list)
    """Per-pair overrides: [[wan.links]] between = [0, 1], link = "1gbit/10ms"."""
    presets: dict[str, str] = field(default_factory=dict)
    """Link presets to add or override: [wan.presets] metro = "800gbit/1ms"."""

    def __post_init__(self) -> None:
        for name, text in self.presets.items():
            try:  # a preset is a link itself, not another preset's name
                if parse_link(text, presets={}) is None:
                    raise ValueError("a preset needs a real link, not 'none'")
            except ValueError as e:
                raise ConfigError(str(e), field=f"wan.presets.{name}") from None
        try:
            parse_link(self.link, presets=self.all_presets())
        except ValueError as e:
            raise ConfigError(f"{e}", field="wan.link") from None
        for o in self.links:
            try:
                if parse_link(o.link, presets=self.all_presets()) is None:
                    raise ValueError("a per-pair link needs a real link, not 'none'")
            except ValueError as e:
                raise ConfigError(str(e), field="wan.links.link") from None

    def all_presets(self) -> dict[str, str]:
        return {**LINK_PRESETS, **{k.lower(): v for k, v in self.presets.items()}}


@dataclass(kw_only=True, slots=True)
class CommConfig:
    """How pseudo-gradients travel between sites."""

    codec: str = "fp32"
    """Codec of cross-site payloads: one of the registered codecs (fp32, bf16, int8, int4, topk, topk+int8, ...)."""
    block_size: int = 0
    """Block size of blockwise quantizers; 0 keeps the codec's default."""
    topk_fraction: float = 0.01
    """Share of each chunk that top-k codecs keep."""
    overlap: bool | None = None
    """DiLoCo: run round t's outer all-reduce while round t+1 computes (one-step-delayed update). Unset, the
    run turns it on when a blocking transfer would stall more than 2% of a round, and says so."""
    pattern: str = "auto"
    """Collective of a lossy codec: "reduce_scatter" (encoded chunks to their owners, then an all-gather of the
    re-encoded means: a ring all-reduce's bytes), "all_gather" (every site's whole payload to every site: one
    quantization, (K-1)x the bytes), or "auto" (reduce_scatter for dense codecs among 3+ sites, else
    all_gather). See docs/codecs.md."""
    tcp_pacing: str = "link"
    """How the kernel paces the TCP connections between sites (``geotrain.comm.pacing``): "link" (each connection
    at 95% of its link's configured rate where the links are real, as in the network lab; uncapped where they are
    emulated), "uncapped" (pacing smooths bursts without a cap) or "off". A sender that never outruns the link
    never overflows the bottleneck's queue: over the network lab's grid (cubic, a one-round-trip queue) "link"
    dropped no packet where "uncapped" dropped hundreds per link. The cost model assumes "link": a link carries
    data at 95% of its rate (``geotrain.topology.PACED_LINK_SHARE``), and a sync smaller than one round trip's
    bandwidth-delay product leaves over a quarter of a round trip instead of at once. Linux only; BBR paces
    anyway."""

    def __post_init__(self) -> None:
        from geotrain.comm.codecs.registry import codec_choice
        from geotrain.comm.pacing import MODES
        from geotrain.comm.pattern import PATTERNS

        _choice("comm.tcp_pacing", self.tcp_pacing, MODES)
        _choice("comm.pattern", self.pattern, PATTERNS)
        _integer("comm.block_size", self.block_size, 0, 1 << 24, what=" (0: the codec's default)")
        _number("comm.topk_fraction", self.topk_fraction, 0, 1, lo_open=True)
        self.codec = codec_choice(self).name  # checks the name and the options it takes

    def choice(self) -> Any:
        """The codec with its options resolved (``geotrain.comm.codecs.CodecChoice``)."""
        from geotrain.comm.codecs.registry import codec_choice

        return codec_choice(self)


@dataclass(kw_only=True, slots=True)
class MembershipConfig:
    """Elastic membership: how long each wait may last, and how few sites the run goes on with.

    The deadlines form one hierarchy, checked here: a heartbeat every ``heartbeat_s``; a worker silent for
    ``heartbeat_timeout_s`` is dropped; a transfer may take ``transfer_floor_s`` plus ``transfer_margin``
    times its predicted time over the links; a site that does not reach a sync's quorum within
    ``quorum_timeout_s`` (while the others are there) is dropped; a joining site waits up to
    ``join_timeout_s`` to be admitted, and every site waits that long for a coordinator that went away.
    heartbeat < heartbeat timeout < transfer floor <= quorum < join."""

    min_sites: int = 1
    """The run goes on while at least this many sites are members; with fewer it waits at the next sync for
    sites to join (up to join_timeout_s), then stops."""
    heartbeat_s: float = 1.0
    """Seconds between a worker's heartbeats to the coordinator."""
    heartbeat_timeout_s: float = 10.0
    """A worker silent this long is dropped with its site (a closed connection drops it at once)."""
    transfer_margin: float = 8.0
    """A transfer's deadline is this many times its predicted time over the links, plus transfer_floor_s."""
    transfer_floor_s: float = 30.0
    """Seconds every transfer may take besides its predicted time (real networks and loaded machines vary)."""
    deadline_link: str = "100mbit/100ms"
    """The link transfer deadlines assume when the run emulates none (a real network): the slowest you expect."""
    quorum_timeout_s: float = 600.0
    """Seconds the members wait at a sync for a site that is alive but has not arrived (a slow or stuck site)."""
    join_timeout_s: float = 1800.0
    """Seconds a joining site waits to be admitted, and a site waits for the coordinator to come back."""
    max_attempts: int = 4
    """Tries of one sync (each on a new generation) before the run stops."""

    def __post_init__(self) -> None:
        _integer("membership.min_sites", self.min_sites, 1, MAX_SITES)
        _number("membership.heartbeat_s", self.heartbeat_s, 0, 3600, lo_open=True, what=" seconds")
        _number("membership.heartbeat_timeout_s", self.heartbeat_timeout_s, 0, 86400, lo_open=True, what=" seconds")
        _number("membership.transfer_margin", self.transfer_margin, 1, 1000)
        _number("membership.transfer_floor_s", self.transfer_floor_s, 0, 7 * 86400, lo_open=True, what=" seconds")
        _number("membership.quorum_timeout_s", self.quorum_timeout_s, 0, 30 * 86400, lo_open=True, what=" seconds")
        _number("membership.join_timeout_s", self.join_timeout_s, 0, 30 * 86400, lo_open=True, what=" seconds")
        _integer("membership.max_attempts", self.max_attempts, 1, 100)
        try:
            if parse_link(self.deadline_link) is None:
                raise ValueError("needs a real link, not 'none'")
        except ValueError as e:
            raise ConfigError(str(e), field="membership.deadline_link") from None
        order = [("heartbeat_s", self.heartbeat_s), ("heartbeat_timeout_s", self.heartbeat_timeout_s),
                 ("transfer_floor_s", self.transfer_floor_s), ("quorum_timeout_s", self.quorum_timeout_s),
                 ("join_timeout_s", self.join_timeout_s)]
        for (a, x), (b, y) in zip(order, order[1:]):
            if not (x < y or (a == "transfer_floor_s" and x <= y)):
                raise ConfigError(f"{a}={x:g} must be below {b}={y:g}: the deadlines go heartbeat < heartbeat "
                                  "timeout < transfer floor <= quorum < join", field=f"membership.{a}")


@dataclass(kw_only=True, slots=True)
class GuardConfig:
    """The receiving side's checks on every pseudo-gradient (``geotrain.comm.guard``)."""

    outlier_factor: float = 10.0
    """Leave out a sender whose norm exceeds this many times the running median norm; 0 turns the test off.
    Payloads that fail to decode or hold NaN or Inf are always left out."""
    history: int = 64
    """Accepted norms kept per payload for the median."""
    min_history: int = 4
    """Norms needed before the outlier test applies (the first syncs are not tested)."""

    def __post_init__(self) -> None:
        _number("guard.outlier_factor", self.outlier_factor, 0, 1e12, what=" (0 turns the norm test off)")
        _integer("guard.history", self.history, 1, 1_000_000)
        _integer("guard.min_history", self.min_history, 1, 1_000_000)
        if self.min_history > self.history:
            raise ConfigError(f"min_history={self.min_history} exceeds history={self.history}",
                              field="guard.min_history")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """Checkpoints at outer-round boundaries, under OUT/checkpoints/ (``geotrain.checkpoint``)."""

    every_rounds: int | None = None
    """Outer rounds between checkpoints; 0 turns them off. Unset, the run chooses about five minutes of
    training from its measured step time, and says so."""
    keep: int = 3
    """Complete checkpoints kept; older ones are deleted."""

    def __post_init__(self) -> None:
        if self.every_rounds is not None:
            _integer("checkpoint.every_rounds", self.every_rounds, 0, 10**9, what=" (0: no checkpoints)")
        _integer("checkpoint.keep", self.keep, 1, 10**6)


# -- what the planner adds ------------------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class SiteConfig:
    """One site's hardware and power; unset values come from [sites]."""

    name: str | None = None
    """Human name of the site."""
    accelerator: str | None = None
    """Accelerator type: a preset (A100, H100, H200, B200) or one defined under [accelerators.NAME]."""
    accelerators: int | None = None
    """Accelerators the site uses; unset: all that power_cap_mw feeds, else one per worker."""
    mfu: float | None = None
    """Model FLOP utilization the site achieves while computing, in (0, 1]."""
    power_cap_mw: float | None = None
    """Grid limit of the site in MW (facility power, so PUE counts against it)."""
    pue: float | None = None
    """Power usage effectiveness: facility power over IT power, at least 1."""
    watts: float | None = None
    """Power per accelerator in watts; unset: the accelerator's board power."""
    peak_flops: float | None = None
    """Peak dense FLOP/s per accelerator; unset: the accelerator preset's figure."""
    step_seconds: float | None = None
    """Measured compute per inner step at this site; when set, it replaces the FLOP model (6 N tokens)."""

    def __post_init__(self) -> None:
        self._check("site" if self.name is None else f"site[{self.name}]")

    def _check(self, where: str) -> None:
        """Range checks, naming each field as ``where.key``."""
        if self.accelerators is not None:
            self.accelerators = parse_count(self.accelerators, field_name=f"{where}.accelerators")
            _integer(f"{where}.accelerators", self.accelerators, 1, 10**8)
        if self.mfu is not None:
            _number(f"{where}.mfu", self.mfu, 0, 1, lo_open=True, what=" (a fraction of peak, 0.4 is typical)")
        if self.power_cap_mw is not None:
            _number(f"{where}.power_cap_mw", self.power_cap_mw, 0, 1e5, lo_open=True)
        if self.pue is not None:
            _number(f"{where}.pue", self.pue, 1, 10, what=" (1.1-1.5 is typical)")
        if self.watts is not None:
            _number(f"{where}.watts", self.watts, 1, 1e6, what=" watts per accelerator")
        if self.peak_flops is not None:
            _number(f"{where}.peak_flops", self.peak_flops, 1e6, 1e20, what=" FLOP/s per accelerator")
        if self.step_seconds is not None:
            _number(f"{where}.step_seconds", self.step_seconds, 0, 1e6, lo_open=True)


@dataclass(kw_only=True, slots=True)
class SitesConfig(SiteConfig):
    """Defaults for every site's hardware and power, and how the global batch is shared."""

    accelerator: str | None = "H100"
    mfu: float | None = 0.4
    pue: float | None = 1.2
    names: list[str] = field(default_factory=list)
    """Site names, one per site (default site0, site1, ...)."""
    balance: str = "equal"
    """"equal": every site takes 1/K of the global batch (the slowest gates each sync); "throughput": shares
    proportional to each site's FLOP/s, so sites finish inner steps together."""

    def __post_init__(self) -> None:
        if self.name is not None:
            raise ConfigError("[sites] holds what every site shares; name the sites with sites.names or each "
                              "[[site]] table's name", field="sites.name")
        self._check("sites")
        _choice("sites.balance", self.balance, ("equal", "throughput"))


@dataclass(kw_only=True, slots=True)
class AcceleratorConfig:
    """An accelerator type to define, or a preset's figures to override."""

    peak_flops: float | None = None
    """Peak dense (bf16) FLOP/s."""
    watts: float | None = None
    """Power per accelerator in watts."""

    def __post_init__(self) -> None:
        if self.peak_flops is not None:
            _number("accelerators.peak_flops", self.peak_flops, 1e6, 1e20, what=" FLOP/s")
        if self.watts is not None:
            _number("accelerators.watts", self.watts, 1, 1e6, what=" watts")


@dataclass(kw_only=True, slots=True)
class PlanConfig:
    """What ``geotrain plan`` is asked, and the scale it plans at."""

    batch_tokens: int | None = None
    """Global batch per inner step in tokens, all sites together; unset, the run's own batch
    (data.batch_size x model.seq_len x workers)."""
    target_utilization: float | None = None
    """Utilization to reach: asks for the bandwidth, H and codec it needs."""
    sweep: str | list[str] | None = None
    """Bandwidths to sweep: "1gbit,10gbit" or "START:STOP:POINTS" (log-spaced)."""
    plot: str | None = None
    """Where to draw the sweep (.png, .svg or .pdf)."""
    compare: bool = False
    """Show ddp, diloco, diloco+overlap and streaming side by side."""
    sync_every_candidates: list[int] = field(default_factory=lambda: [1, 5, 10, 25, 50, 100, 250, 500, 1000])
    """H values tried by the smallest-H question."""
    codec_candidates: list[str] = field(default_factory=lambda: ["fp32", "bf16", "int8", "int4"])
    """Codecs tried by the mildest-codec question."""

    def __post_init__(self) -> None:
        from geotrain.comm.codecs.registry import get_codec_spec

        if self.batch_tokens is not None:
            self.batch_tokens = parse_count(self.batch_tokens, field_name="plan.batch_tokens")
            _integer("plan.batch_tokens", self.batch_tokens, 1, 10**15)
        if self.target_utilization is not None:
            _number("plan.target_utilization", self.target_utilization, 0, 1, lo_open=True, what=" (e.g. 0.95)")
        if self.plot is not None and Path(self.plot).suffix.lower() not in (".png", ".svg", ".pdf"):
            raise ConfigError(f"{self.plot!r} must end in .png, .svg or .pdf", field="plan.plot")
        for key in ("sync_every_candidates", "codec_candidates"):
            if len(getattr(self, key)) > 100:
                raise ConfigError(f"holds {len(getattr(self, key))} entries; give at most 100", field=f"plan.{key}")
        for h in self.sync_every_candidates:
            _integer("plan.sync_every_candidates", h, 1, 10**9)
        for name in self.codec_candidates:
            get_codec_spec(name, field="plan.codec_candidates")


@dataclass(kw_only=True, slots=True)
class SimulateConfig:
    """``geotrain plan --simulate``: the run played round by round with noise, power caps and failures
    (``geotrain.planner.simulate``). An elastic failure's costs come from the run's own settings:
    ``[membership]`` (heartbeat timeout, transfer deadlines, min_sites), the links, and the state a healer sends."""

    enabled: bool = False
    """Simulate as well as plan (set by any failure setting given on the command line)."""
    seed: int = 0
    """Seed of the one random generator the simulation uses."""
    mtbf_hours: float | list[float] | None = None
    """Mean time between failures of each site in hours: one number, one per site (0: never fails), or unset."""
    restart_hours: float = 0.5
    """How long a failure keeps its site down. Elastic: the failed site comes back after this long, then joins
    at the next round boundary and is healed from a live peer; restart: the whole job is down this long."""
    recovery: str = "elastic"
    """"elastic" (what geotrain's elastic membership does, ``geotrain.membership``): the survivors detect the
    failure, redo a sync it interrupted without the failed site, re-form their cross-site group and go on with
    a smaller global batch; the failed site rejoins and is healed from a live peer over its link. "restart":
    every site rolls back to the last checkpoint (checkpoint_every_hours) and the job restarts."""
    checkpoint_every_hours: float = 1.0
    """Checkpoint interval. Restart rolls back to the last checkpoint at every failure; elastic only when every
    site is down at once, since no live site is then left to heal from."""
    silent_fraction: float = 1.0
    """Share of failures that are silent (a machine, power or network failure: no connection closes, so the
    survivors learn of it after membership.heartbeat_timeout_s, or at the transfer's deadline when it hits a
    sync); the rest are crashes of the site's processes, whose closed connections drop the site at once.
    1 (the default) is the pessimistic case."""
    reform_seconds: float | None = None
    """Seconds the survivors need to re-form their cross-site group on a new generation, after a failure and
    again when a site joins. Unset: 3 round trips of the slowest link among the members (the quorum or
    admission request to the coordinator, the new group's rendezvous through the coordinator's store, and
    gloo's connection handshake)."""
    jitter: float = 0.0
    """Coefficient of variation of a site's compute time per round (lognormal noise); 0 for none."""

    def __post_init__(self) -> None:
        _integer("simulate.seed", self.seed, 0, 2**63 - 1)
        values = self.mtbf_hours if isinstance(self.mtbf_hours, list) else [self.mtbf_hours]
        for v in values:
            if v is not None:
                _number("simulate.mtbf_hours", v, 0, 1e9, what=" hours (0 in a per-site list: never fails)")
                if v == 0 and not isinstance(self.mtbf_hours, list):
                    raise ConfigError("must be a positive number of hours (leave it unset for no failures)",
                                      field="simulate.mtbf_hours")
        _number("simulate.restart_hours", self.restart_hours, 0, 1e6)
        _choice("simulate.recovery", self.recovery, ("restart", "elastic"))
        _number("simulate.checkpoint_every_hours", self.checkpoint_every_hours, 0, 1e6, lo_open=True)
        _number("simulate.silent_fraction", self.silent_fraction, 0, 1, what=" (1: every failure is silent)")
        if self.reform_seconds is not None:
            _number("simulate.reform_seconds", self.reform_seconds, 0, 1e6, what=" seconds (unset: from the links)")
        _number("simulate.jitter", self.jitter, 0, 10)


# -- power ----------------------------------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class GridTraceConfig:
    """One site's available power over grid time (``geotrain.power.GridTrace``): points given inline (hours and
    values) or in a CSV file, not both."""

    site: int | str | None = None
    """The site this trace feeds (required): an index, or a name from [sites] names / [[site]] name."""
    hours: list[float] | None = None
    """Grid hours of the points, strictly increasing, the first >= 0 (a periodic trace: 0 ... its period)."""
    values: list[float] | None = None
    """Available power at those hours: fractions of the site's cap (of its full draw without a cap), or MW."""
    unit: str = "fraction"
    """"fraction" (values 0..1 of the cap) or "mw"."""
    interpolate: str = "linear"
    """"linear" between points, or "step" (each value holds until the next point)."""
    periodic: bool = False
    """Repeat the trace with a period of its last hour (hours 0 ... 24: every day); it must end as it starts.
    Otherwise the first value holds before the first point and the last after the last."""
    file: str | None = None
    """A CSV file instead of hours and values: the header hours,value[,carbon], then one point per row. A relative
    path is relative to the working directory the command runs in (as data.path is)."""
    carbon: list[float] | None = None
    """Carbon intensity of the site's power in kg CO2 per MWh at the same hours (same interpolation)."""

    def build(self, where: str = "grid.traces") -> Any:
        """The ``geotrain.power.GridTrace`` this entry describes; ConfigError naming ``where.KEY`` if it is
        wrong (reads the file, if one is given)."""
        from geotrain.power.trace import INTERPOLATIONS, UNITS, GridTrace

        _choice(f"{where}.unit", self.unit, UNITS)  # here, so that a file's trace names the setting, not the file
        _choice(f"{where}.interpolate", self.interpolate, INTERPOLATIONS)
        settings = {"unit": self.unit, "interpolate": self.interpolate, "periodic": self.periodic}
        if self.file is not None:
            if self.hours is not None or self.values is not None or self.carbon is not None:
                given = ", ".join(k for k in ("hours", "values", "carbon") if getattr(self, k) is not None)
                raise ConfigError(f"gives both a file and {given}; put the points in one place", field=f"{where}.file")
            if not self.file.strip():
                raise ConfigError("is empty; give a CSV file, or hours and values", field=f"{where}.file")
            return GridTrace.from_csv(self.file, where=f"{where}.file", **settings)
        for key in ("hours", "values"):
            if getattr(self, key) is None:
                raise ConfigError("is missing; give hours and values (one per hour), or a CSV file",
                                  field=f"{where}.{key}")
        return GridTrace(self.hours, self.values, carbon=self.carbon, where=where, **settings)


@dataclass(kw_only=True, slots=True)
class GridConfig:
    """Each site's power from the grid over time (``geotrain.power``): a trace of the available power per site,
    the grid's ramp limit, and how a site's draw follows its compute. Off unless a trace is given or
    ``enabled`` is set; ``geotrain.power.site_controllers`` builds the sites' controllers from it."""

    enabled: bool | None = None
    """Model each site's power. Unset: on when [[grid.traces]] are given."""
    time_scale: float = 1.0
    """Grid seconds per training second: 240 runs a day of grid in six minutes of training."""
    start_hours: float = 0.0
    """Grid time (hours into the traces) at which training starts."""
    ramp_mw_per_min: float | None = None
    """The most a site's draw may change per minute of grid time, in MW; unset: no limit. With a limit a site
    holds its draw through waits instead of dropping to idle, and starts lowering it ahead of a dip."""
    idle_fraction: float = 0.15
    """A powered site's draw with nothing computing, as a fraction of its full draw."""
    min_active: float = 0.05
    """The least share of its accelerators' dynamic range a site trains at; with less power it leaves the run
    until its power comes back."""
    traces: list[GridTraceConfig] = field(default_factory=list)
    """Per-site traces: [[grid.traces]] site = "site1", hours = [...], values = [...]."""

    def __post_init__(self) -> None:
        if self.enabled is not None and not isinstance(self.enabled, bool):
            raise ConfigError(f"must be true or false, got {self.enabled!r}", field="grid.enabled")
        _number("grid.time_scale", self.time_scale, 0, 1e7, lo_open=True,
                what=" grid seconds per training second")
        _number("grid.start_hours", self.start_hours, 0, 1e7, what=" hours")
        if self.ramp_mw_per_min is not None:
            _number("grid.ramp_mw_per_min", self.ramp_mw_per_min, 0, 1e7, lo_open=True,
                    what=" MW per minute (leave it unset for no limit)")
        _number("grid.idle_fraction", self.idle_fraction, 0, 1, what=" of the full draw (0.15 is typical)")
        if self.idle_fraction == 1:
            raise ConfigError("must be below 1: a site at idle would draw as much as a busy one",
                              field="grid.idle_fraction")
        _number("grid.min_active", self.min_active, 0, 1, lo_open=True, what=" (0.05: 5% of the dynamic range)")
        for i, trace in enumerate(self.traces):
            trace.build(f"grid.traces[{i}]")

    @property
    def on(self) -> bool:
        """Whether the run models its sites' power: ``enabled``, or unset with traces given."""
        return bool(self.traces) if self.enabled is None else self.enabled

    def site_traces(self, names: list[str]) -> dict[int, Any]:
        """Site index -> its ``geotrain.power.GridTrace``, for a run whose sites are ``names``. ConfigError for a
        trace naming no site, or two traces for one site."""
        out: dict[int, Any] = {}
        for i, trace in enumerate(self.traces):
            where = f"grid.traces[{i}]"
            site = trace.site
            if site is None:
                raise ConfigError('is missing; name the site this trace feeds (site = "site1" or an index)',
                                  field=f"{where}.site")
            if isinstance(site, int) and not isinstance(site, bool):
                if not 0 <= site < len(names):
                    raise ConfigError(f"names site {site}, but the run has sites 0..{len(names) - 1}",
                                      field=f"{where}.site")
                index = site
            elif isinstance(site, str) and site in names:
                index = names.index(site)
            else:
                close = difflib.get_close_matches(str(site), names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{site!r} is not a site; sites: {', '.join(names)}{hint}", field=f"{where}.site")
            if index in out:
                raise ConfigError(f"site {names[index]!r} already has a trace; give one trace per site",
                                  field=f"{where}.site")
            out[index] = trace.build(where)
        return out


# -- the whole document -----------------------------------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class Config:
    """A whole run, and what the planner needs to plan it at any scale."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    sparseloco: SparseLoCoConfig = field(default_factory=SparseLoCoConfig)
    wan: WanConfig = field(default_factory=WanConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sites: SitesConfig = field(default_factory=SitesConfig)
    site: list[SiteConfig] = field(default_factory=list)
    accelerators: dict[str, AcceleratorConfig] = field(default_factory=dict)
    plan: PlanConfig = field(default_factory=PlanConfig)
    simulate: SimulateConfig = field(default_factory=SimulateConfig)
    grid: GridConfig = field(default_factory=GridConfig)

    def __post_init__(self) -> None:
        if self.run.sites is None:
            self.run.sites = len(self.site) or 4
        elif self.site and len(self.site) != self.run.sites:
            raise ConfigError(f"{self.run.sites} sites asked for but {len(self.site)} [[site]] tables given; drop "
                              "one or the other", field="run.sites")
        if self.sites.names and len(self.sites.names) != self.run.sites:
            raise ConfigError(f"must list {self.run.sites} names, one per site, got {len(self.sites.names)}",
                              field="sites.names")
        names = self.site_names()
        if len(set(names)) != len(names):
            raise ConfigError(f"site names must be unique, got {names}", field="sites.names")
        if self.data.tokenizer not in (None, "bytes") and self.model.arch == "gpt":
            raise ConfigError("the demo GPT reads bytes; a tokenizer needs a Hugging Face model (for example "
                              "--model hf:llama), or leave data.tokenizer unset", field="data.tokenizer")
        self.topology()  # checks the per-pair links name real sites
        if self.run.site_speeds is not None and len(self.run.site_speeds) != self.run.sites:
            raise ConfigError(f"lists {len(self.run.site_speeds)} speed factors for {self.run.sites} sites; give "
                              "one per site", field="run.site_speeds")
        if self.outer.sync_every_seconds is not None and not self.algorithm().timed_rounds:
            raise ConfigError(f"time-based rounds apply to diloco, not {self.run.algorithm}; drop "
                              "--sync-every-seconds or use --algorithm diloco", field="outer.sync_every_seconds")
        self.grid.site_traces(names)  # checks the power traces name real sites, one trace each
        self.algorithm().check(self)

    # -- derived views -------------------------------------------------------------------------------------
    def algorithm(self) -> Any:
        """The algorithm's definition (``geotrain.algorithms.Algorithm``)."""
        from geotrain.algorithms import get_algorithm

        return get_algorithm(self.run.algorithm)

    def codec(self) -> Any:
        """The codec with its options (``geotrain.comm.codecs.CodecChoice``): the algorithm's choice, which is
        ``[comm]``'s for all but those that define their own payloads (sparseloco)."""
        return self.algorithm().codec(self)

    def layout(self) -> Any:
        """The parameters a run synchronises (``geotrain.algorithms.ModelLayout``): the demo GPT's tensors, an
        hf: model's (read from the model built on the meta device, which imports torch and transformers), or a
        bare count when ``model.params`` sets the planning size."""
        from geotrain.algorithms import ModelLayout

        if self.model.params is not None:
            return ModelLayout(params=self.model.params)
        if self.model.arch != "gpt":
            from geotrain.models.hf import hf_layout

            return ModelLayout.of(hf_layout(self))
        return ModelLayout.of(self.model.layout())

    def site_names(self) -> list[str]:
        if self.sites.names:
            return list(self.sites.names)
        return [s.name or f"site{i}" for i, s in enumerate(self.site)] or [f"site{i}" for i in range(self.run.sites)]

    def topology(self) -> Topology:
        presets = self.wan.all_presets()
        names = self.site_names()
        overrides: dict[tuple[int, int], Link] = {}
        for pair, o in self.link_pairs():
            link = parse_link(o.link, presets=presets)
            assert link is not None
            overrides[pair] = link
        default = parse_link(self.wan.link, presets=presets)
        return Topology(self.run.sites, default=default, overrides=overrides, names=names)

    def link_pairs(self) -> list[tuple[tuple[int, int], LinkOverride]]:
        """Each [[wan.links]] entry with the indices of the two sites it joins."""
        names = self.site_names()
        pairs = []
        for i, o in enumerate(self.wan.links):
            where = f"wan.links[{i}].between"
            idx = []
            for b in o.between:
                if isinstance(b, int) and not isinstance(b, bool):
                    if not 0 <= b < self.run.sites:
                        raise ConfigError(f"names site {b}, but the run has sites 0..{self.run.sites - 1}",
                                          field="wan.links.between")
                    idx.append(b)
                elif isinstance(b, str) and b in names:
                    idx.append(names.index(b))
                else:
                    raise ConfigError(f"{b!r} is not a site; sites: {', '.join(names)}", field=where)
            if idx[0] == idx[1]:
                raise ConfigError("a link joins two different sites", field=where)
            pairs.append(((idx[0], idx[1]), o))
        return pairs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def updated(self, values: dict[str, Any]) -> Config:
        """A new, validated Config with dotted ``values`` written over this one's."""
        tree = self.to_dict()
        for key, value in values.items():
            _set_dotted(tree, key, value, top=True)
        return _build(Config, tree, "")


# -- loading --------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int, float, str, bool, unions, list[...], dict[str, ...],
    dataclass)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        # A list goes to the list member; anything else to the first member that takes it.
        if isinstance(value, list) and any(typing.get_origin(a) is list for a in inner):
            return _coerce(value, next(a for a in inner if typing.get_origin(a) is list), name)
        errors = []
        for member in (a for a in inner if typing.get_origin(a) is not list):
            try:
                return _coerce(value, member, name)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if errors else ConfigError(f"expected a list, got {value!r}", field=name)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"expected a list, got {value!r}", field=name)
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"expected a table of settings, got {value!r}", field=name)
        _, item = typing.get_args(tp)
        return {str(k): _coerce(v, item, f"{name}.{k}") for k, v in value.items()}
    if tp is Any:  # checked by the section's own __post_init__
        return value
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
        try:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str) and len(value) <= 64:
                return float(value)
        except (ValueError, OverflowError):  # an integer too large for a float is no setting either
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
            dotted = f"{prefix}.{key}" if prefix else key
            moved = _MOVED.get(dotted)
            if moved:
                raise ConfigError(f"this key of the planner's former vocabulary is now {moved} (run and plan "
                                  "files share one vocabulary; see docs/planner.md)", field=dotted)
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else f"valid keys are {', '.join(names)}"
            raise ConfigError(f"unknown setting; {hint}", field=dotted)
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


def _set_dotted(tree: dict[str, Any], key: str, value: Any, *, top: bool = False) -> None:
    """Write ``value`` at dotted ``key``; ``top`` also allows a whole top-level entry (``site``)."""
    parts = key.split(".")
    if len(parts) < (1 if top else 2) or not all(parts):
        raise ConfigError(f"override {key!r} must be SECTION.KEY=VALUE, for example run.sites=4", field=key)
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{p!r} is a value, not a section", field=key)
        node = child
    node[parts[-1]] = value


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict, or ConfigError naming the problem."""
    p = Path(path)
    try:
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; check the path", field="--config")
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p} is not valid TOML ({e}); fix the line it names", field="--config") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p} is not UTF-8 text", field="--config") from None
    except OSError as e:
        raise ConfigError(f"cannot read {p} ({e.strerror or e})", field="--config") from None


@functools.cache
def defaults() -> Config:
    """The configuration with nothing set: what help texts quote as defaults."""
    return load_config()


def load_config(
    path: str | Path | None = None,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    values: dict[str, Any] | None = None,
    fit: bool = False,
    soft: tuple[str, ...] = (),
) -> Config:
    """Build a Config from an optional TOML file, ``--set`` style overrides, then already-typed ``values``.

    Later sources win: file < overrides < values. ``values`` maps dotted keys (``"run.sites"``) to Python values.
    ``fit`` and ``soft``: see :func:`config_from_tree`.
    """
    return config_from_tree(read_toml(path) if path is not None else {}, overrides=overrides, values=values,
                            fit=fit, soft=soft)


def config_from_tree(
    tree: dict[str, Any],
    *,
    overrides: list[str] | tuple[str, ...] = (),
    values: dict[str, Any] | None = None,
    fit: bool = False,
    soft: tuple[str, ...] = (),
) -> Config:
    """Build a Config from a parsed TOML document (a dict, changed in place), ``--set`` style overrides and
    typed dotted ``values``, in that order.

    With ``fit`` (the command line) and the algorithm chosen by a flag: a setting from the file, or from ``soft``
    keys (flags that several ``geotrain compare`` variants share), that the chosen algorithm cannot take is
    dropped, so one file serves every algorithm; a setting the user gave for this run is refused when the
    algorithm cannot take it and ignored with a warning when it only does not read it. A file that contradicts
    itself (ddp with overlap) is refused either way.
    """
    explicit: set[str] = set()
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} needs the form key=value, for example run.sites=4", field="--set")
        _set_dotted(tree, key.strip(), _parse_value(text.strip()))
        explicit.add(key.strip())
    for key, value in (values or {}).items():
        _set_dotted(tree, key, value, top=True)
        explicit.add(key)
    hard = explicit - set(soft)
    droppable, ignored = _unread_settings(tree, hard) if fit else (set(), {})
    if "run.algorithm" not in explicit:
        droppable = set()  # the file chose the algorithm: its own contradictions are refused
    while True:
        try:
            config = _build(Config, tree, "")
            for key, who in ignored.items():
                print(f"warning: {key} applies to {who}, not {config.run.algorithm}; ignored", file=sys.stderr)
            return config
        except SettingConflict as e:  # a file's setting (or a shared flag) the chosen algorithm cannot take
            if e.field not in droppable:
                raise
            droppable.discard(e.field)
            section, _, leaf = str(e.field).partition(".")
            tree[section].pop(leaf, None)


def _unread_settings(tree: dict[str, Any], explicit: set[str]) -> tuple[set[str], dict[str, str]]:
    """Settings in ``tree`` that only other algorithms read, apart from the ``explicit`` ones: the file's and
    the shared flags', which are dropped if the chosen algorithm cannot take them (see config_from_tree).
    An explicit one is kept, and the chosen algorithm refuses it or ignores it (with a warning)."""
    from geotrain.algorithms import algorithm_names, get_algorithm

    run = tree.get("run") if isinstance(tree.get("run"), dict) else {}
    name = run.get("algorithm", next(f.default for f in dataclasses.fields(RunConfig) if f.name == "algorithm"))
    try:
        chosen = get_algorithm(name)
    except ConfigError:
        return set(), {}  # the build names the unknown algorithm
    readers: dict[str, list[str]] = {}
    for other in algorithm_names():
        for key in get_algorithm(other).settings:
            readers.setdefault(key, []).append(other)
    present, ignored = set(), {}
    for key, who in readers.items():
        if key in chosen.settings:
            continue
        section, _, leaf = key.partition(".")
        if key in explicit:
            ignored[key] = ", ".join(who)
        elif isinstance(tree.get(section), dict) and leaf in tree[section]:
            present.add(key)
    return present, ignored
