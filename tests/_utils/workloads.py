"""Workload factories for tests; importable by the worker processes (tests/ is on their sys.path)."""

from __future__ import annotations

from typing import Any

from geotrain.train.workload import Workload, demo_workload


def crashing_workload(config: Any, *, worker: int, device: str, crash_site: int = 1, crash_step: int = 3,
                      **kwargs: Any) -> Workload:
    """The demo workload, except that worker ``crash_site`` (every worker: -1) raises at its ``crash_step``-th loss."""
    w = demo_workload(config, worker=worker, device=device, **kwargs)
    inner = w.loss
    calls = {"n": 0}

    def loss(model: Any, batch: Any) -> Any:
        if model.training:
            calls["n"] += 1
            if crash_site in (worker, -1) and calls["n"] == crash_step:
                raise RuntimeError(f"injected failure on site {crash_site} at step {crash_step}")
        return inner(model, batch)

    w.loss = loss
    return w
