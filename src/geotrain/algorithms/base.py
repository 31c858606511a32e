"""What an algorithm is, for every part of geotrain: one definition object per training method.

An :class:`Algorithm` holds everything that is said about a method outside its training code:

* which settings it reads and how they must relate (``check``), and what it reports about them
  (``describe``, ``label``);
* its communication per sync period (``pattern``: how often, how many values, what hides behind compute)
  and over a whole run (``sync_counts``, ``sync_periods``, ``end_exposed``): the planner, a run's predicted
  utilization and a run's automatic overlap settings all read these;
* the settings it chooses itself when the user leaves them unset (``auto_settings``);
* the codec of its payloads (``codec``: ``[comm]``'s unless the method defines its own);
* how it is built for a run (``build``, which imports the torch strategy only then).

This module imports no torch, so the configuration and the planner can read every algorithm cheaply. A
new algorithm is a subclass (with its strategy, ``geotrain.algorithms.strategies.base.Strategy``) plus one
``register_algorithm`` line in ``geotrain.algorithms``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from geotrain.algorithms.strategies.base import Strategy, StrategyContext
    from geotrain.config import Config

__all__ = ["Algorithm", "AutoSetting", "ModelLayout", "SyncPattern"]


@dataclass(frozen=True, slots=True)
class ModelLayout:
    """The trainable tensors a run synchronises, by name and number of values, in parameter order. A model
    known only by its size (a plan at 70B) has ``tensors`` empty."""

    params: int
    """Trainable values in all."""
    tensors: tuple[tuple[str, int], ...] = ()
    """(name, numel) of each trainable tensor, when known."""

    @classmethod
    def of(cls, tensors: Sequence[tuple[str, int]]) -> ModelLayout:
        return cls(params=sum(n for _, n in tensors), tensors=tuple((str(a), int(n)) for a, n in tensors))


@dataclass(frozen=True, kw_only=True, slots=True)
class SyncPattern:
    """An algorithm's traffic on one site's link, as the timing model reads it (``algorithms/timing.py``)."""

    round_steps: int
    """Inner steps between the loop's sync points, where every site holds the same global model (H; 1 for
    ddp). Spreads of compute time are measured over these."""
    period_steps: float
    """Inner steps between two consecutive syncs on a site's link (H, or H/P for fragments)."""
    hide_steps: float
    """Inner steps of compute one sync overlaps before the loop needs its result; 0 means it blocks."""
    payloads: tuple[int, ...]
    """Values in each distinct sync, in turn (one entry for a whole-model sync, one per fragment)."""
    final_payload: int = 0
    """Values synchronised in one more sync when a run reaches its last step (Streaming DiLoCo: every fragment
    at once); 0 for none."""

    @property
    def blocking(self) -> bool:
        return self.hide_steps == 0

    @property
    def window_steps(self) -> float:
        """Inner steps of compute a sync may span without stalling, at least one: sets the peak bandwidth."""
        return max(1.0, float(self.hide_steps))

    @property
    def mean_payload(self) -> int:
        return round(sum(self.payloads) / len(self.payloads)) if self.payloads else 0


@dataclass(frozen=True, slots=True)
class AutoSetting:
    """A setting the run chose because the user left it unset, and why."""

    key: str
    """Dotted config key, e.g. ``streaming.overlap_steps``."""
    value: Any
    reason: str


class Algorithm:
    """Base class of the algorithm definitions. Subclasses set the class attributes and the hooks."""

    name: ClassVar[str] = ""
    """What ``run.algorithm`` says."""
    baseline: ClassVar[bool] = False
    """The fully synchronous method the others are compared against (``geotrain compare``'s ratios)."""
    summary: ClassVar[str] = ""
    """One line for help texts."""
    settings: ClassVar[tuple[str, ...]] = ()
    """Dotted config keys the method reads, beyond the common ones."""
    timed_rounds: ClassVar[bool] = False
    """The method can end its rounds after a time (``outer.sync_every_seconds``) instead of after H steps."""
    own_codec: ClassVar[bool] = False
    """The method chooses its payload codec from its own settings (``codec``), not from ``comm.codec``."""

    # -- settings ------------------------------------------------------------------------------------------
    def check(self, config: Config) -> None:
        """Raise ConfigError (naming the field) for settings that cannot work together."""

    def describe(self, config: Config) -> dict[str, Any]:
        """The settings as ``summary.json`` reports them: ``sync_every``, ``fragments``, ``overlap_steps``,
        ``overlap``."""
        return {"sync_every": 1, "fragments": 1, "overlap_steps": 0, "overlap": False}

    def label(self, config: Config) -> str:
        """A short name of the method with its settings, e.g. ``diloco H=50+overlap``."""
        return self.name

    def compare_variants(self, config: Config) -> dict[str, dict[str, Any]]:
        """The forms of this method ``geotrain plan --compare`` shows beside the planned run: a label for each
        and the dotted settings it changes (the rest is the plan's own configuration)."""
        return {self.name: {}}

    def unset(self, config: Config) -> list[str]:
        """Settings left for the run to choose (``auto_settings``)."""
        return []

    def auto_settings(self, config: Config, layout: ModelLayout, *, step_seconds: float,
                      sync_seconds: Any) -> list[AutoSetting]:
        """Values for the settings the user left unset, so that the predicted transfer hides behind compute.

        ``layout`` is the model the run synchronises, ``step_seconds`` the compute per inner step it expects,
        ``sync_seconds(config, numel)`` the time of one sync of ``numel`` values over the run's links. Settings
        the user gave are never changed.
        """
        return []

    # -- communication ---------------------------------------------------------------------------------------
    def codec(self, config: Config) -> Any:
        """The codec of its payloads (``geotrain.comm.codecs.CodecChoice``): ``[comm]``'s, unless the method
        defines its own payloads (sparseloco takes its compressor from its own settings)."""
        return config.comm.choice()

    def pattern(self, config: Config, layout: ModelLayout) -> SyncPattern:
        raise NotImplementedError

    def sync_counts(self, config: Config, steps: int, *, stopped_early: bool = False) -> list[int]:
        """How many times each payload of ``pattern`` crosses the links in a run of ``steps`` inner steps (that
        ended at its last step, or at a sync point when ``stopped_early``); the pattern's ``final_payload``
        comes on top when the run reaches its last step."""
        raise NotImplementedError

    def round_steps(self, config: Config) -> int:
        """Inner steps of one outer round (the unit of ``checkpoint.every_rounds``): H by default."""
        return config.outer.sync_every

    def sync_periods(self, config: Config, steps: int, *, stopped_early: bool = False) -> int:
        """Sync periods in a run of ``steps`` inner steps, for the timing model: the syncs on the algorithm's
        regular schedule (the final sync of a pattern's ``final_payload`` is ``end_exposed``'s)."""
        raise NotImplementedError

    def end_exposed(self, config: Config, *, steps: int, step_seconds: float, comm_seconds: float,
                    final_seconds: float, exposed_per_sync: float, stopped_early: bool) -> float:
        """Exposed communication the end of a run adds beyond ``exposed_per_sync`` per period: the run ends
        on one synchronised model, so a transfer that would have hidden behind the next round (or the rest of
        a round a short last one cuts off) cannot. ``step_seconds`` is the gating compute per step,
        ``final_seconds`` the time of the pattern's ``final_payload`` sync."""
        return 0.0

    # -- training ----------------------------------------------------------------------------------------------
    def build(self, config: Config, ctx: StrategyContext) -> Strategy:
        """The strategy the training loop calls (imports torch)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<algorithm {self.name}>"
