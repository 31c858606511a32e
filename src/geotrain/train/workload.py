"""What is trained: a model, its loss, its data and its inner optimizer, for any ``nn.Module``.

geotrain's loop and strategies never look inside the model. A :class:`Workload` bundles the pieces a user
supplies; the demo GPT is one workload among others (``demo_workload``). Factories are called inside each
site process, so a workload built by a top-level function works with every launcher (local processes, the
Python API, torchrun).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from geotrain.config import Config, OptimConfig
from geotrain.errors import ConfigError

__all__ = ["Workload", "demo_workload", "inner_optimizer", "lr_schedule", "prepare_corpus"]

Batch = Any


@dataclass(kw_only=True)
class Workload:
    """The user's side of a run."""

    model: nn.Module
    """The model, initialised identically on every site (seed before building it)."""
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    """Mean loss of one batch."""
    batches: Iterator[Batch]
    """This worker's endless stream of training batches."""
    tokens_per_batch: int
    """Tokens (or examples) in one batch, for budgets and reports."""
    eval_batches: Sequence[Batch] = ()
    """The held-out batches; identical for every algorithm so eval losses compare."""
    optimizer: torch.optim.Optimizer | None = None
    """Inner optimizer; None builds the one the config describes."""
    meta: dict[str, Any] | None = None
    """Anything worth recording in summary.json (data source, model size)."""
    data_state: Callable[[], Any] | None = None
    """This worker's position in its data stream, as JSON values (for checkpoints, and for a site that rejoins
    to go on where it left off); None: the stream cannot say, and a resumed run restarts it."""
    load_data_state: Callable[[Any], None] | None = None
    """Go back to a position ``data_state`` returned."""
    export: Callable[[Path, list[torch.Tensor]], None] | None = None
    """Called once at the end of a run, where ``OUT/model.safetensors`` is written, as ``export(OUT, params)``
    with the global trainable parameters in ``named_parameters()`` order: write the model in a format of
    your own (the Hugging Face workload writes ``OUT/hf/``). None: nothing more."""


def inner_optimizer(params: Sequence[nn.Parameter], config: OptimConfig) -> torch.optim.Optimizer:
    if config.name == "adamw":
        decay = [p for p in params if p.dim() >= 2]  # no weight decay on gains and biases
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def lr_schedule(config: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at a step: linear warm-up, then cosine or constant."""
    import math

    warmup = min(config.warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _gpt_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return model(x, y)[1]


def prepare_corpus(config: Config, directory: Path) -> Path:
    """Read the configured corpus once and store it as memory-mappable files (raises ConfigError on bad data).

    Files already in ``directory`` are reused only if they were prepared from the same source: the same
    ``data.path`` (resolved) and ``data.val_fraction``, with its files' names, sizes and modification times
    unchanged (``corpus_origin``). Otherwise, as when a second run into the same --out names another --data,
    the corpus is read and saved again. A Hugging Face model with a tokenizer also gets the corpus's token ids,
    in ``directory/tokens`` (``geotrain.models.hf.prepare_tokens``, reused the same way).
    """
    from geotrain.data.corpus import corpus_origin, load_corpus, open_corpus, save_corpus, saved_origin

    origin = corpus_origin(config.data.path, val_fraction=config.data.val_fraction)
    fresh = saved_origin(directory) == origin
    if fresh:
        try:
            open_corpus(directory)  # cheap (sizes only); catches .bin files left by a crash mid-save
        except ConfigError:
            fresh = False
    if not fresh:
        save_corpus(load_corpus(config.data.path, val_fraction=config.data.val_fraction), directory, origin=origin)
    if config.model.arch != "gpt":  # a tokenizer's ids, once for every worker (geotrain.models.hf)
        from geotrain.models.hf import prepare_tokens

        prepare_tokens(config, directory)
    return directory


def demo_workload(config: Config, *, worker: int, device: str = "cpu", data_dir: Path | None = None) -> Workload:
    """The model ``model.arch`` names on a prepared corpus: the byte-level GPT, or a Hugging Face causal LM
    (``geotrain.models.hf.hf_workload``). ``worker`` is the worker's index in the whole run."""
    from geotrain.data.corpus import BatchSampler, eval_batches, open_corpus
    from geotrain.models.gpt import init_gpt

    if config.model.arch != "gpt":
        from geotrain.models.hf import hf_workload

        return hf_workload(config, worker=worker, device=device, data_dir=data_dir)

    if data_dir is None:  # under torchrun each site prepares its own copy
        data_dir = prepare_corpus(config, Path(config.run.out) / "data")

    m = config.model
    model = init_gpt(m, seed=config.run.seed)
    model.to(device)
    corpus = open_corpus(data_dir)
    sampler = BatchSampler(corpus.train, batch_size=config.data.batch_size, seq_len=m.seq_len, seed=config.run.seed * 1_000_003 + worker)

    def stream() -> Iterator[Batch]:
        while True:
            x, y = sampler.next()
            yield x.to(device), y.to(device)

    evals = eval_batches(corpus.val, batch_size=config.data.batch_size, seq_len=m.seq_len, n_batches=config.run.eval_batches)
    return Workload(
        model=model,
        loss=_gpt_loss,
        batches=stream(),
        tokens_per_batch=config.data.batch_size * m.seq_len,
        eval_batches=[(x.to(device), y.to(device)) for x, y in evals],
        meta={"data": corpus.source, "model_params": sum(p.numel() for p in model.parameters())},
        data_state=sampler.state_dict,
        load_data_state=sampler.load_state_dict,
    )
