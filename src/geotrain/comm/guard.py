"""Guards on what peers send: a pseudo-gradient that is corrupt, not finite, or far larger than usual is left
out of the average, the same way on every site.

Checked on the receiving side. In the ``reduce_scatter`` pattern site j receives chunk j of every sender's
payload; in ``all_gather`` every site receives every payload and reports on the sender after it in the ring,
so that over the sites (and a site's workers, each with its shard) every value of every sender is looked at
once. Each receiver reports, per sender, three numbers (:data:`STATS`): the payload failed to decode, it
decoded to NaN or Inf, and the sum of its squares. The coordinator sums the reports of a sync (the guard
vote), so every site holds the same totals and takes the same decision with :meth:`Guard.decide`.

The norm test compares each sender's norm with the median of the norms accepted over the last
``guard.history`` syncs of the same payload (a fragment, the whole model, a gradient), once at least
``guard.min_history`` are known; ``guard.outlier_factor = 0`` switches it off. The history is part of the
state a checkpoint saves and a healed site receives, so the decision stays the same everywhere.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from geotrain.config import GuardConfig

__all__ = ["STATS", "Guard", "GuardConfig", "Rejection"]

STATS = 3
"""Numbers reported per sender: [failed to decode, non-finite values, sum of squares]."""


@dataclass(frozen=True, slots=True)
class Rejection:
    """One sender left out of one sync."""

    site: int
    reason: str
    norm: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "reason": self.reason, "norm": self.norm}


@dataclass(slots=True)
class Guard:
    config: GuardConfig = field(default_factory=GuardConfig)
    norms: dict[str, deque] = field(default_factory=dict)

    def decide(self, key: str, stats: list[float], members: list[int]) -> tuple[list[int], list[Rejection]]:
        """Ranks (positions in ``members``) whose payloads are averaged, and the senders left out, from the
        summed reports ``stats`` (STATS numbers per rank). Records the accepted norms."""
        k = len(members)
        if len(stats) != STATS * k:
            raise ValueError(f"guard statistics of length {len(stats)} for {k} senders")
        history = self.norms.setdefault(key, deque(maxlen=self.config.history))
        median = statistics.median(history) if len(history) >= self.config.min_history else None
        accepted, rejected = [], []
        for r in range(k):
            failed, nonfinite, squares = stats[STATS * r: STATS * r + STATS]
            norm = math.sqrt(squares) if math.isfinite(squares) and squares >= 0 else math.inf
            if failed > 0:
                rejected.append(Rejection(members[r], "its payload failed to decode (corrupt, or a forged block scale)"))
            elif nonfinite > 0 or not math.isfinite(norm):
                rejected.append(Rejection(members[r], f"{int(nonfinite)} non-finite values (NaN or Inf)"))
            elif (median is not None and self.config.outlier_factor > 0 and median > 0
                  and norm > self.config.outlier_factor * median):
                rejected.append(Rejection(members[r], f"norm {norm:.4g} is {norm / median:.0f}x the running median "
                                                      f"{median:.4g} (guard.outlier_factor={self.config.outlier_factor:g})",
                                          norm))
            else:
                accepted.append(r)
        for r in accepted:
            history.append(math.sqrt(stats[STATS * r + 2]))
        return accepted, rejected

    def state_dict(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.norms.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self.norms = {k: deque((float(x) for x in v), maxlen=self.config.history) for k, v in state.items()}
