"""Train your own nn.Module with DiLoCo across 2 sites.

The model here is a small MLP that learns to imitate a fixed random "teacher" network on synthetic inputs:
nothing about it is a language model, which is the point. Run it with:

    .venv/bin/python examples/custom_model.py [OUT_DIR]
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator

import torch
from torch import nn

from geotrain.api import Workload, train

DIM, BATCH = 32, 64


class Student(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(DIM, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def teacher(x: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)  # the same target function on every site
    w = torch.randn(DIM, generator=g)
    return torch.sin(x @ w / DIM**0.5) + 0.5 * torch.cos(x[:, 0] * x[:, 1])


def batches(seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)  # each worker draws its own examples
    while True:
        x = torch.randn(BATCH, DIM, generator=g)
        yield x, teacher(x)


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def make_workload(config, *, worker: int, device: str) -> Workload:
    torch.manual_seed(config.run.seed)  # identical initial weights on every site
    model = Student().to(device)
    held_out = list(itertools.islice(batches(seed=10_000), 8))  # the same 8 batches on every site
    return Workload(
        model=model,
        loss=mse,
        batches=batches(seed=config.run.seed * 1000 + worker),
        tokens_per_batch=BATCH,  # here a "token" is one example
        eval_batches=held_out,
        optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3),
        meta={"model_params": sum(p.numel() for p in model.parameters()), "data": "synthetic teacher"},
    )


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "runs/custom-model"
    summary = train(make_workload, sites=2, algorithm="diloco", sync_every=10, tokens=64 * 2 * 200,
                    link="none", out=out, settings={"run.eval_every_tokens": 64 * 2 * 50})
    print(f"eval MSE {summary['eval_loss']:.4f} after {summary['outer_rounds']} outer rounds, "
          f"{summary['wan_bytes'] / 1e6:.1f} MB over the WAN; files in {out}")
