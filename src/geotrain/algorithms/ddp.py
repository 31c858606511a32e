"""DDP across sites: fully synchronous data parallelism, every step's gradient crosses the WAN.

The baseline every low-communication method is measured against. Its strategy is
``geotrain.algorithms.strategies.ddp``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from geotrain.algorithms.base import Algorithm, ModelLayout, SyncPattern
from geotrain.errors import ConfigError, SettingConflict

if TYPE_CHECKING:
    from geotrain.algorithms.strategies.base import Strategy, StrategyContext
    from geotrain.config import Config

__all__ = ["DDP"]


class DDP(Algorithm):
    name = "ddp"
    summary = "all-reduce the gradient across sites every step"
    baseline = True

    def check(self, config: Config) -> None:
        if config.comm.overlap:
            raise SettingConflict("overlap applies to diloco, not ddp (ddp needs every step's gradient before its "
                              "optimizer step); drop --overlap", field="comm.overlap")

    def compare_variants(self, config: Config) -> dict[str, dict[str, Any]]:
        # Beside another method, DDP sends bf16 gradients, the usual mixed-precision all-reduce.
        codec = config.comm.codec if config.run.algorithm == self.name else "bf16"
        return {self.name: {"comm.overlap": None, "comm.codec": codec}}

    def pattern(self, config: Config, layout: ModelLayout) -> SyncPattern:
        return SyncPattern(round_steps=1, period_steps=1.0, hide_steps=0.0, payloads=(layout.params,))

    def sync_counts(self, config: Config, steps: int, *, stopped_early: bool = False) -> list[int]:
        return [steps]

    def sync_periods(self, config: Config, steps: int, *, stopped_early: bool = False) -> int:
        return steps

    def round_steps(self, config: Config) -> int:
        return 1  # every step is a sync

    def build(self, config: Config, ctx: StrategyContext) -> Strategy:
        from geotrain.algorithms.strategies.ddp import DDPStrategy

        return DDPStrategy(ctx)
