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


def floored_workload(config: Any, *, worker: int, device: str, floor_s: float = 0.01, **kwargs: Any) -> Workload:
    """The demo workload whose every training step takes at least ``floor_s`` seconds (the loss waits out the
    rest): a run of N steps then lasts at least N x floor_s of training however fast the machine, so a test
    can place grid events inside it. A loaded machine only makes the run longer."""
    import time

    w = demo_workload(config, worker=worker, device=device, **kwargs)
    inner = w.loss

    def loss(model: Any, batch: Any) -> Any:
        if not model.training:
            return inner(model, batch)
        t0 = time.perf_counter()
        out = inner(model, batch)
        time.sleep(max(0.0, floor_s - (time.perf_counter() - t0)))
        return out

    w.loss = loss
    return w


def site_batch_workload(config: Any, *, worker: int, device: str, site_rows: int = 8, **kwargs: Any) -> Workload:
    """The demo GPT on random tokens where each site draws one batch of ``site_rows`` sequences per step and its
    workers split it: a site of W workers sees the same data as a site of one worker, so data parallelism inside
    the site may change only the arithmetic's rounding."""
    import torch

    from geotrain.models.gpt import init_gpt

    workers = config.run.workers_per_site
    site, local = divmod(worker, workers)
    rows = site_rows // workers
    seq = config.model.seq_len
    model = init_gpt(config.model, seed=config.run.seed).to(device)

    def stream():
        for step in range(1_000_000):
            g = torch.Generator().manual_seed(config.run.seed * 1_000_003 + site * 10_007 + step)
            tokens = torch.randint(0, 256, (site_rows, seq + 1), generator=g)[local * rows: (local + 1) * rows]
            yield tokens[:, :-1].to(device), tokens[:, 1:].to(device)

    g = torch.Generator().manual_seed(12345)
    evals = [torch.randint(0, 256, (4, seq + 1), generator=g) for _ in range(2)]
    return Workload(model=model, loss=lambda m, b: m(b[0], b[1])[1], batches=stream(), tokens_per_batch=rows * seq,
                    eval_batches=[(e[:, :-1].to(device), e[:, 1:].to(device)) for e in evals],
                    meta={"model_params": sum(p.numel() for p in model.parameters())})
