"""DiLoCo: H local steps per site, then one outer step on the averaged pseudo-gradient.

Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models", arXiv 2311.08105.
Settings: ``outer.*`` (H, the outer optimizer, its warm-up) and ``comm.overlap``: round t's average travels
while round t+1 computes and lands one round late (Kale et al. 2025, "Eager updates for overlapped
communication and computation in DiLoCo"). Left unset, the run turns overlap on when the predicted transfer
would otherwise stall a noticeable part of each round. Its strategy is
``geotrain.algorithms.strategies.diloco``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from geotrain.algorithms.base import Algorithm, AutoSetting, ModelLayout, SyncPattern

if TYPE_CHECKING:
    from geotrain.algorithms.strategies.base import Strategy, StrategyContext
    from geotrain.config import Config

__all__ = ["DiLoCo", "OVERLAP_THRESHOLD", "timed_round_length"]

OVERLAP_THRESHOLD = 0.02
"""Left unset, overlap is turned on when a blocking transfer would stall more than this share of a round's
compute: below it the one-round delay of the update is not worth the time it saves."""


def timed_round_length(*, seconds: float, budget: float, counted_tokens: float, counted_rounds: int,
                       rounds_in_flight: int, last_total: float) -> float | None:
    """Time-based rounds (``outer.sync_every_seconds``): how long the next round lasts, or None when the run
    is over. ``counted_tokens`` are the global tokens of the ``counted_rounds`` rounds whose token sums are
    known; ``rounds_in_flight`` more have been sent but not counted (overlapped rounds: one), and each is
    projected at ``last_total``, the newest counted round's global tokens. The run ends at the first round
    whose projected total reaches ``budget``; a round that would overshoot it is shortened in proportion.
    Before any round is counted every round lasts ``seconds``. The training strategy
    (``geotrain.algorithms.strategies.rounds``) and the planner's power-aware prediction both decide with this."""
    projected = counted_tokens + rounds_in_flight * last_total
    if counted_rounds > 0 and projected >= budget:
        return None
    if counted_rounds > 0 and projected + last_total > budget:
        return seconds * (budget - projected) / last_total
    return seconds


class DiLoCo(Algorithm):
    name = "diloco"
    summary = "H inner steps per site, then an outer step on the averaged pseudo-gradient"
    timed_rounds = True
    settings = ("outer.sync_every", "outer.sync_every_seconds", "outer.lr", "outer.momentum", "outer.nesterov",
                "outer.warmup_steps", "comm.overlap")

    def describe(self, config: Config) -> dict[str, Any]:
        out = {"sync_every": config.outer.sync_every, "fragments": 1, "overlap_steps": 0,
               "overlap": config.comm.overlap}
        if config.outer.sync_every_seconds is not None:
            out["sync_every_seconds"] = config.outer.sync_every_seconds
        return out

    def label(self, config: Config) -> str:
        overlap = {True: "+overlap", False: "", None: " overlap=auto"}[config.comm.overlap]
        rounds = (f"H={config.outer.sync_every}" if config.outer.sync_every_seconds is None
                  else f"T={config.outer.sync_every_seconds:g}s")
        return f"{self.name} {rounds}{overlap}"

    def compare_variants(self, config: Config) -> dict[str, dict[str, Any]]:
        return {self.name: {"comm.overlap": False}, f"{self.name}+overlap": {"comm.overlap": True}}

    def unset(self, config: Config) -> list[str]:
        return ["comm.overlap"] if config.comm.overlap is None else []

    def auto_settings(self, config: Config, layout: ModelLayout, *, step_seconds: float,
                      sync_seconds: Any) -> list[AutoSetting]:
        if config.comm.overlap is not None:
            return []
        h = config.outer.sync_every
        t = float(sync_seconds(config, layout.params))
        round_compute = h * step_seconds
        on = bool(t > OVERLAP_THRESHOLD * round_compute)
        if t == 0:
            why = "no emulated link: a sync takes no time, so the update is not delayed"
        else:
            share = t / round_compute if round_compute > 0 else math.inf
            why = (f"one sync takes {t:.3g} s over the link against {round_compute:.3g} s of compute per round "
                   f"({h} steps of {step_seconds:.3g} s): a blocking sync would stall {100 * share:.3g}% of it")
            why += (", so round t's average travels during round t+1" if on
                    else f"; under {100 * OVERLAP_THRESHOLD:g}%, the update is not delayed")
        why += f" (set --{'no-' if not on else ''}overlap to repeat this run exactly)"
        return [AutoSetting("comm.overlap", on, why)]

    def pattern(self, config: Config, layout: ModelLayout) -> SyncPattern:
        h = config.outer.sync_every
        return SyncPattern(round_steps=h, period_steps=float(h), hide_steps=float(h) if config.comm.overlap else 0.0,
                           payloads=(layout.params,))

    def sync_counts(self, config: Config, steps: int, *, stopped_early: bool = False) -> list[int]:
        return [self.sync_periods(config, steps)]

    def sync_periods(self, config: Config, steps: int, *, stopped_early: bool = False) -> int:
        return -(-steps // config.outer.sync_every)  # the last, partial round syncs too

    def end_exposed(self, config: Config, *, steps: int, step_seconds: float, comm_seconds: float,
                    final_seconds: float, exposed_per_sync: float, stopped_early: bool) -> float:
        if not config.comm.overlap:
            return 0.0
        # The last round's transfer has no next round to hide behind; and a short last round of r < H steps
        # hides the one before only behind r steps.
        h, t, c = config.outer.sync_every, comm_seconds, step_seconds
        r = steps - (self.sync_periods(config, steps) - 1) * h
        short = max(0.0, t - r * c) - max(0.0, t - h * c) if steps > h else 0.0
        return t - exposed_per_sync + short

    def build(self, config: Config, ctx: StrategyContext) -> Strategy:
        from geotrain.algorithms.strategies.diloco import DiLoCoStrategy

        return DiLoCoStrategy(ctx, outer=config.outer, overlap=bool(config.comm.overlap),
                              budget_tokens=config.run.tokens)
