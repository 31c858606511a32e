"""The Python API: train your own ``nn.Module`` across sites.

Write a top-level function that builds a :class:`~geotrain.train.workload.Workload` (model, loss, batches)
and hand it to :func:`train`::

    from geotrain.api import Workload, train

    def make_workload(config, *, worker, device):
        torch.manual_seed(config.run.seed)          # the same initial model on every site
        model = MyNet()
        return Workload(model=model, loss=my_loss, batches=my_batches(seed=worker), tokens_per_batch=64)

    if __name__ == "__main__":
        summary = train(make_workload, sites=2, algorithm="diloco", sync_every=20, tokens=200_000, link="none")

The factory runs inside every worker process, so it must be importable (defined at module level). Without
one, ``train`` trains the model the config names, as ``geotrain run`` does: ``train(model="hf:llama", ...)``.
Settings are the short names of the CLI flags (``sites``, ``algorithm``, ``sync_every``, ``codec``, ``link``,
``tokens``, ``out``...) or dotted config keys given as ``settings={"optim.lr": 1e-3}``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from geotrain.config import SHORT_KEYS, Config, load_config
from geotrain.errors import ConfigError
from geotrain.train.workload import Workload

__all__ = ["Workload", "Config", "train", "make_config"]


def make_config(config: str | Path | None = None, *, settings: dict[str, Any] | None = None, **short: Any) -> Config:
    values: dict[str, Any] = {}
    for key, value in short.items():
        if key not in SHORT_KEYS:
            raise ConfigError(f"unknown setting; use one of {', '.join(sorted(SHORT_KEYS))} or settings={{...}}",
                              field=key)
        values[SHORT_KEYS[key]] = value
    values.update(settings or {})
    return load_config(config, values=values)


def train(
    workload_factory: Callable[..., Workload] | None = None,
    *,
    config: str | Path | Config | None = None,
    settings: dict[str, Any] | None = None,
    progress: bool = False,
    faults: list[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    **short: Any,
) -> dict[str, Any]:
    """Train across sites on this machine; returns the run's summary (also written to OUT/summary.json).

    ``workload_factory``: builds each worker's ``Workload``; None trains the model ``model.arch`` names (the
    demo GPT, or a Hugging Face model such as ``model="hf:llama"``) on the configured corpus.

    ``faults``: ``--fault`` specs to inject, such as ``["kill:2@3", "rejoin:2@6"]``. ``resume``: continue the
    run in ``out`` from its last checkpoint. ``overwrite``: start afresh where an earlier run left checkpoints.
    Raises RuntimeError when the run fails (the summary's ``error`` says which site and why).
    """
    from geotrain.faults import parse_fault
    from geotrain.train.launch import launch

    cfg = config if isinstance(config, Config) else make_config(config, settings=settings, **short)
    outcome = launch(cfg, workload_factory=workload_factory, progress=progress,
                     faults=[parse_fault(f) for f in faults or []], resume=resume, overwrite=overwrite)
    if outcome.exit_code != 0:
        raise RuntimeError(f"run failed: {outcome.summary.get('error')}")
    return outcome.summary
