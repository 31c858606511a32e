"""Streaming DiLoCo: fragments of the model are synchronised in turn while compute goes on.

Douillard et al., "Streaming DiLoCo with overlapping communication", arXiv 2501.18512.

* The parameters are split into P fragments. Layers are dealt out strided (layer i to fragment i mod P), so
  every fragment spans the depth of the network; parameters outside numbered layers go to the lightest
  fragment (and a model with fewer layers than fragments is split tensor by tensor, balancing sizes).
* Fragment p is synchronised every H steps, offset by p*H/P steps, so at most one fragment's payload is
  on the link at a time: the peak bandwidth is about P times lower than DiLoCo's for the same H.
* A fragment's all-reduce overlaps tau inner steps. When it lands, the fragment's own outer optimizer steps
  the global fragment, and the local fragment is merged as alpha * local + (1 - alpha) * global, keeping
  the local progress made meanwhile (with tau = 0 the global fragment simply replaces the local one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from geotrain.algorithms.base import Strategy, StrategyContext
from geotrain.algorithms.outer import OuterOptimizer
from geotrain.comm.collectives import Pending
from geotrain.comm.flat import flatten, unflatten_into
from geotrain.config import OuterConfig, StreamingConfig

__all__ = ["StreamingDiLoCo", "split_fragments"]

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


class StreamingDiLoCo(Strategy):
    name = "streaming"

    def __init__(self, ctx: StrategyContext, *, outer: OuterConfig, streaming: StreamingConfig) -> None:
        super().__init__(ctx)
        self.sync_every = outer.sync_every
        self.tau = streaming.overlap_steps
        self.warmup_steps = outer.warmup_steps
        self.alpha = streaming.mix_alpha
        named = [(n, p) for n, p in ctx.model.named_parameters() if p.requires_grad]
        groups = split_fragments([n for n, _ in named], streaming.fragments, [p.numel() for _, p in named])
        self.fragments = [
            _Fragment(index=k, params=[named[i][1] for i in idx], outer=OuterOptimizer(flatten([named[i][1] for i in idx]), outer),
                      offset=(k * self.sync_every) // streaming.fragments)
            for k, idx in enumerate(groups)
        ]
        # global_parameters() must follow the model's parameter order
        order = {id(p): n for n, (_, p) in enumerate(named)}
        self._views: list[tuple[int, torch.Tensor]] = []
        for f in self.fragments:
            offset = 0
            for p in f.params:
                self._views.append((order[id(p)], f.outer.params.detach()[offset : offset + p.numel()].view_as(p)))
                offset += p.numel()
        self._views.sort(key=lambda t: t[0])
        self._rounds = 0

    def after_inner_step(self, step: int, *, last: bool) -> bool:
        for f in self.fragments:
            if f.pending is not None and (step >= f.due or last):
                self._merge(f)
            if last:
                self._sync_now(f)
            elif (step + 1 - f.offset) % self.sync_every == 0 and step + 1 >= f.offset:
                self._start(f, step)
        if last:
            self.outer_rounds = self._rounds // len(self.fragments)
            return True
        self.outer_rounds = self._rounds // len(self.fragments)
        return (step + 1) % self.sync_every == 0

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
    def _sync_now(self, f: _Fragment) -> None:
        """End of training: one last synchronous sync so every site holds the same final model."""
        delta = f.outer.params.detach() - flatten(f.params)
        f.outer.step(self.ctx.comm.all_reduce_mean(delta, key=f"fragment{f.index}").wait())
        self._rounds += 1
        unflatten_into(f.outer.params.detach(), f.params)

    def global_parameters(self) -> list[torch.Tensor]:
        return [v for _, v in self._views]

    def sync_bytes_per_round(self) -> int:
        """Bytes one worker sends per H steps: every fragment once (the whole model)."""
        return sum(self.ctx.comm.payload_bytes(sum(p.numel() for p in f.params)) for f in self.fragments)

    def syncs_in_flight(self) -> int:
        return sum(f.pending is not None for f in self.fragments)

    def close(self) -> None:
        """A run stopped early (time budget): apply the fragments still in flight to the global model."""
        for f in self.fragments:
            if f.pending is not None:
                self._merge(f)
