"""The training code of Streaming DiLoCo (``geotrain.algorithms.streaming``): fragments of the model are
synchronised in turn while compute goes on.

Douillard et al., "Streaming DiLoCo with overlapping communication", arXiv 2501.18512. The definition module
explains the schedule, the fragment split and the merge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from geotrain.algorithms.streaming import fragment_offsets, split_fragments
from geotrain.algorithms.strategies.base import Strategy, StrategyContext
from geotrain.algorithms.strategies.outer import OuterOptimizer
from geotrain.comm.collectives import Pending
from geotrain.comm.flat import flatten, unflatten_into
from geotrain.comm.site_parallel import local
from geotrain.config import OuterConfig, StreamingConfig

__all__ = ["StreamingStrategy"]


@dataclass(slots=True)
class _Fragment:
    index: int
    params: list[torch.nn.Parameter]
    outer: OuterOptimizer
    offset: int
    """Steps after each multiple of H at which this fragment's sync starts."""
    pending: Pending | None = None
    plain: bool = False
    """The pending sync started within the outer warm-up: apply it as plain averaging."""
    due: int = -1
    """Inner step after which the pending all-reduce is merged."""


class StreamingStrategy(Strategy):
    def __init__(self, ctx: StrategyContext, *, outer: OuterConfig, streaming: StreamingConfig) -> None:
        super().__init__(ctx)
        self.sync_every = outer.sync_every
        assert streaming.overlap_steps is not None, "tau is chosen before the strategy is built"
        self.tau = streaming.overlap_steps
        self.warmup_steps = outer.warmup_steps
        self.alpha = streaming.mix_alpha
        named = [(n, p) for n, p in ctx.model.named_parameters() if p.requires_grad]
        groups = split_fragments([n for n, _ in named], streaming.fragments, [p.numel() for _, p in named])
        offsets = fragment_offsets(self.sync_every, streaming.fragments)
        self.fragments = [
            _Fragment(index=k, params=[named[i][1] for i in idx],
                      outer=OuterOptimizer(flatten([named[i][1] for i in idx]), outer), offset=offsets[k])
            for k, idx in enumerate(groups)
        ]
        # global_parameters() must follow the model's parameter order
        order = {id(p): n for n, (_, p) in enumerate(named)}
        self._views: list[tuple[int, torch.Tensor]] = []
        for f in self.fragments:
            offset = 0
            for p in f.params:
                shard = local(p)
                view = f.outer.params.detach()[offset : offset + shard.numel()].view_as(shard)
                self._views.append((order[id(p)], view))
                offset += shard.numel()
        self._views.sort(key=lambda t: t[0])
        self._rounds = 0

    def after_inner_step(self, step: int, *, last: bool) -> bool:
        for f in self.fragments:
            if f.pending is not None and (step >= f.due or last):
                self._merge(f)
            if not last and (step + 1 - f.offset) % self.sync_every == 0 and step + 1 >= f.offset:
                self._start(f, step)
        if last:
            self._sync_all(plain=step < self.warmup_steps)
        self.outer_rounds = self._rounds // len(self.fragments)
        return last or (step + 1) % self.sync_every == 0

    @torch.no_grad()
    def _start(self, f: _Fragment, step: int) -> None:
        delta = f.outer.params.detach() - flatten(f.params)  # this site's pseudo-gradient for fragment f
        f.pending = self.ctx.comm.all_reduce_mean(delta, key=f"fragment{f.index}")
        f.due = step + self.tau
        f.plain = step < self.warmup_steps
        if self.tau == 0:
            self._merge(f)

    @torch.no_grad()
    def _merge(self, f: _Fragment) -> None:
        assert f.pending is not None
        f.outer.step(f.pending.wait(), plain=f.plain)
        f.pending = None
        self._rounds += 1
        global_flat = f.outer.params.detach()
        if self.tau == 0:
            unflatten_into(global_flat, f.params)
        else:  # keep the local progress of the tau overlapped steps
            unflatten_into(self.alpha * flatten(f.params) + (1 - self.alpha) * global_flat, f.params)

    @torch.no_grad()
    def _sync_all(self, *, plain: bool) -> None:
        """End of training: every fragment synchronised at once, in one collective (P fragment syncs one after
        another would pay the links' latency P times), so every site holds the same final model. A plain
        average within the outer warm-up, as every other sync there."""
        deltas = [f.outer.params.detach() - flatten(f.params) for f in self.fragments]
        mean = self.ctx.comm.all_reduce_mean(torch.cat(deltas), key="final").wait()
        offset = 0
        for f, delta in zip(self.fragments, deltas, strict=True):
            f.outer.step(mean[offset : offset + delta.numel()], plain=plain)
            offset += delta.numel()
            self._rounds += 1
            unflatten_into(f.outer.params.detach(), f.params)

    def global_parameters(self) -> list[torch.Tensor]:
        return [v for _, v in self._views]

    def sync_payloads(self) -> list[int]:
        return [sum(p.numel() for p in f.params) for f in self.fragments]

    def syncs_in_flight(self) -> int:
        return sum(f.pending is not None for f in self.fragments)

    def state_dict(self) -> dict:
        fragments = [{"outer": f.outer.state_dict(), "pending": None if f.pending is None else f.pending.wait(),
                      "plain": f.plain, "due": f.due} for f in self.fragments]
        return {**super().state_dict(), "fragments": fragments, "merged": self._rounds}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for f, s in zip(self.fragments, state["fragments"], strict=True):
            f.outer.load_state_dict(s["outer"])
            f.pending = None if s["pending"] is None else Pending.completed(s["pending"], self.ctx.comm)
            f.plain, f.due = bool(s["plain"]), int(s["due"])
        self._rounds = int(state["merged"])

    def close(self) -> None:
        """A run stopped early (time budget): apply the fragments still in flight to the global model."""
        for f in self.fragments:
            if f.pending is not None:
                self._merge(f)
        self.outer_rounds = self._rounds // len(self.fragments)
