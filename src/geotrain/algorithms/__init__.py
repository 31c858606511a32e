"""Training methods as strategies of the one training loop (see ``algorithms.base``)."""

from __future__ import annotations

from geotrain.algorithms.base import Strategy, StrategyContext
from geotrain.config import Config

__all__ = ["Strategy", "StrategyContext", "build_strategy"]


def build_strategy(config: Config, ctx: StrategyContext) -> Strategy:
    name = config.run.algorithm
    if name == "ddp":
        from geotrain.algorithms.ddp import DDP

        return DDP(ctx)
    if name == "diloco":
        from geotrain.algorithms.diloco import DiLoCo

        return DiLoCo(ctx, outer=config.outer, overlap=config.comm.overlap)
    if name == "streaming":
        from geotrain.algorithms.streaming import StreamingDiLoCo

        return StreamingDiLoCo(ctx, outer=config.outer, streaming=config.streaming)
    raise AssertionError(f"unvalidated algorithm {name!r}")
