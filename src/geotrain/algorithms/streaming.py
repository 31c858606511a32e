"""Streaming DiLoCo: fragments of the model are synchronised in turn while compute goes on.

Douillard et al., "Streaming DiLoCo with overlapping communication", arXiv 2501.18512.

* The parameters are split into P fragments (``split_fragments``). Layers are dealt out strided (layer i to
  fragment i mod P), so every fragment spans the depth of the network; parameters outside numbered layers go
  to the lightest fragment (and a model with fewer layers than fragments is split tensor by tensor, balancing
  sizes).
* Fragment p is synchronised every H steps, offset by p*H/P steps, so at most one fragment's payload is
  on the link at a time: the peak bandwidth is about P times lower than DiLoCo's for the same H.
* A fragment's all-reduce overlaps tau inner steps (``streaming.overlap_steps``). When it lands, the
  fragment's own outer optimizer steps the global fragment, and the local fragment is merged as
  alpha * local + (1 - alpha) * global, keeping the local progress made meanwhile.
* At the last step every fragment is synchronised at once, in one collective, so the run ends on one model.
* Left unset, tau is the fewest inner steps that the predicted transfer of one fragment hides behind, with
  room for the spread of compute time between sites.

Its strategy is ``geotrain.algorithms.strategies.streaming``.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from geotrain.algorithms.base import Algorithm, AutoSetting, ModelLayout, SyncPattern
from geotrain.errors import ConfigError, SettingConflict

if TYPE_CHECKING:
    from geotrain.algorithms.strategies.base import Strategy, StrategyContext
    from geotrain.config import Config

__all__ = ["HIDE_MARGIN", "StreamingDiLoCo", "fragment_offsets", "split_fragments"]

HIDE_MARGIN = 2.0
"""Left unset, tau covers this many times the predicted transfer of one fragment. A fragment's sync completes
only when the slowest site has started it, and sites drift apart by more than a step's compute as their
speed varies: a tau that just covers the transfer stalls the faster sites at every merge."""

_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def split_fragments(names: list[str], fragments: int, sizes: list[int] | None = None) -> list[list[int]]:
    """Indices of the parameters in each fragment.

    With at least P numbered layers, layer i goes to fragment i mod P (strided, as in the paper, so every
    fragment spans the depth of the network) and the remaining tensors (embeddings, final norm) go, largest
    first, to the lightest fragment. With fewer layers than fragments, single tensors are dealt out that way.
    Balanced fragments matter: the largest one sets the peak bandwidth and the time a sync must hide in.
    """
    sizes = sizes if sizes is not None else [1] * len(names)
    if len(names) < fragments:
        raise ValueError(f"the model has {len(names)} parameter tensors, fewer than {fragments} fragments; "
                         "lower streaming.fragments")
    layers: dict[int, list[int]] = {}
    others: list[int] = []
    for i, name in enumerate(names):
        m = _LAYER.search(name)
        (layers.setdefault(int(m.group(1)), []) if m else others).append(i)
    out: list[list[int]] = [[] for _ in range(fragments)]
    load = [0] * fragments
    if len(layers) >= fragments:
        for j, key in enumerate(sorted(layers)):
            out[j % fragments].extend(layers[key])
            load[j % fragments] += sum(sizes[i] for i in layers[key])
    else:
        others = list(range(len(names)))
    for i in sorted(others, key=lambda i: (-sizes[i], i)):
        k = min(range(fragments), key=lambda k: (load[k], k))
        out[k].append(i)
        load[k] += sizes[i]
    return [sorted(f) for f in out]


def fragment_offsets(sync_every: int, fragments: int) -> list[int]:
    """Inner steps after each multiple of H at which fragment p's sync starts: p*H//P."""
    return [(p * sync_every) // fragments for p in range(fragments)]


def fragment_sizes(layout: ModelLayout, fragments: int) -> list[int]:
    """Values in each fragment: from the tensors when they are known, else an even split of the count."""
    if layout.tensors:
        names = [n for n, _ in layout.tensors]
        sizes = [s for _, s in layout.tensors]
        try:
            groups = split_fragments(names, fragments, sizes)
        except ValueError as e:
            raise ConfigError(str(e), field="streaming.fragments") from None
        return [sum(sizes[i] for i in idx) for idx in groups]
    base, extra = divmod(layout.params, fragments)
    return [base + (1 if p < extra else 0) for p in range(fragments)]


class StreamingDiLoCo(Algorithm):
    name = "streaming"
    summary = "DiLoCo with P fragments synchronised in turn, each overlapping tau inner steps"
    settings = ("outer.sync_every", "outer.lr", "outer.momentum", "outer.nesterov", "outer.warmup_steps",
                "streaming.fragments", "streaming.overlap_steps", "streaming.mix_alpha")

    def check(self, config: Config) -> None:
        h, p, tau = config.outer.sync_every, config.streaming.fragments, config.streaming.overlap_steps
        if p > h:
            raise ConfigError(f"{p} fragments cannot each sync once every H={h} steps on a staggered schedule; "
                              "use fragments <= outer.sync_every", field="streaming.fragments")
        if tau is not None and tau >= h:
            raise ConfigError(f"tau={tau} must be smaller than H={h}: a fragment's sync has to land before its "
                              "next one starts", field="streaming.overlap_steps")
        if config.comm.overlap:
            raise SettingConflict("streaming overlaps each fragment's sync through streaming.overlap_steps (tau); "
                              "comm.overlap is for diloco", field="comm.overlap")

    def describe(self, config: Config) -> dict[str, Any]:
        return {"sync_every": config.outer.sync_every, "fragments": config.streaming.fragments,
                "overlap_steps": config.streaming.overlap_steps, "overlap": None}

    def label(self, config: Config) -> str:
        tau = config.streaming.overlap_steps
        return (f"streaming H={config.outer.sync_every} P={config.streaming.fragments} "
                f"tau={'auto' if tau is None else tau}")

    def compare_variants(self, config: Config) -> dict[str, dict[str, Any]]:
        return {self.name: {"comm.overlap": None}}  # tau as configured, or chosen so a fragment hides

    def unset(self, config: Config) -> list[str]:
        return ["streaming.overlap_steps"] if config.streaming.overlap_steps is None else []

    def auto_settings(self, config: Config, layout: ModelLayout, *, step_seconds: float,
                      sync_seconds: Any) -> list[AutoSetting]:
        if config.streaming.overlap_steps is not None:
            return []
        h, p = config.outer.sync_every, config.streaming.fragments
        t = float(sync_seconds(config, max(fragment_sizes(layout, p))))  # the largest fragment must hide
        need = HIDE_MARGIN * t / step_seconds if step_seconds > 0 else math.inf
        tau = (h - 1 if not math.isfinite(need) else int(min(h - 1, max(1, math.ceil(need))))) if h > 1 else 0
        why = (f"one fragment's sync takes {t:.3g} s over the link and an inner step {step_seconds:.3g} s of "
               f"compute: tau={tau} steps cover {HIDE_MARGIN:g}x the transfer")
        if t == 0:
            why = "no emulated link: a sync takes no time; tau=1 keeps one step of overlap"
        elif need > h - 1:
            why = (f"one fragment's sync takes {t:.3g} s, more than the {h - 1} inner steps of "
                   f"{step_seconds:.3g} s it may overlap (tau < H): tau={tau}, and part of each sync will "
                   "stall; raise outer.sync_every or use a smaller codec")
        elif t > (h / p) * step_seconds:
            why += (f"; the link still carries one fragment per {h / p:g} steps at most, so fragments queue "
                    "behind each other")
        why += f" (set --overlap-steps {tau} to repeat this run exactly)"
        return [AutoSetting("streaming.overlap_steps", tau, why)]

    def pattern(self, config: Config, layout: ModelLayout) -> SyncPattern:
        h, p = config.outer.sync_every, config.streaming.fragments
        sizes = tuple(fragment_sizes(layout, p))
        return SyncPattern(round_steps=h, period_steps=h / p, hide_steps=float(config.streaming.overlap_steps or 0),
                           payloads=sizes, final_payload=sum(sizes))

    def sync_counts(self, config: Config, steps: int, *, stopped_early: bool = False) -> list[int]:
        # Fragment p starts a sync after inner steps off + j*H (j >= 0, never after 0 steps), up to the step
        # before the last (at the last step every fragment syncs at once: the pattern's final_payload) or, for
        # a run stopped early at a sync point, up to that point.
        h = config.outer.sync_every
        last_start = steps if stopped_early else steps - 1
        counts = []
        for off in fragment_offsets(h, config.streaming.fragments):
            first = off if off > 0 else h
            counts.append(0 if last_start < first else (last_start - first) // h + 1)
        return counts

    def sync_periods(self, config: Config, steps: int, *, stopped_early: bool = False) -> int:
        # the fragment syncs on the staggered schedule; the sync of every fragment at the end is end_exposed's
        return sum(self.sync_counts(config, steps, stopped_early=stopped_early))

    def end_exposed(self, config: Config, *, steps: int, step_seconds: float, comm_seconds: float,
                    final_seconds: float, exposed_per_sync: float, stopped_early: bool) -> float:
        if stopped_early:  # the fragment a time-budget stop finds on the link is landed at once
            return comm_seconds - exposed_per_sync
        # A fragment started fewer than tau steps before the last step is merged there, early: it hid behind
        # only the steps since its start. (On a saturated link, where a sync outlasts the steps between two, the
        # periods already wait for the whole queue.) Then every fragment is synchronised at once.
        h, tau, t, c = config.outer.sync_every, config.streaming.overlap_steps or 0, comm_seconds, step_seconds
        p = config.streaming.fragments
        last = steps - 1
        early = 0.0
        for off in fragment_offsets(h, p) if t < h / p * c else ():
            first = off if off > 0 else h
            if last - 1 < first - 1:
                continue  # never started
            start = first - 1 + (last - first) // h * h  # the step after which its last sync started
            if last - start < tau:
                early += max(0.0, t - (last - start) * c) - max(0.0, t - tau * c)
        return final_seconds + early

    def build(self, config: Config, ctx: StrategyContext) -> Strategy:
        from geotrain.algorithms.strategies.streaming import StreamingStrategy

        return StreamingStrategy(ctx, outer=config.outer, streaming=config.streaming)
