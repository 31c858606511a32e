"""SparseLoCo: DiLoCo's rounds with a decayed error-feedback accumulator in place of outer momentum, and only a
chunked top-k of it, at 2 bits a value, on the wire.

Sarfi, Thérien, Lidin, Belilovsky, "Communication Efficient LLM Pre-training with SparseLoCo", arXiv 2508.15706.
Each site runs H inner steps from the global θ and forms its pseudo-gradient Δ = θ − θ_site. Per round:

    e ← β e + Δ                  the site's own accumulator (its state; beta = ``sparseloco.beta``)
    Δ̂ = Q(TopK(e))               chunked top-k at ``sparseloco.density``, ``sparseloco.bits``-bit values
    e ← e − Δ̂                    what was sent leaves the accumulator; the rest waits for later rounds
    θ ← θ − lr · mean(Δ̂)         every site's Δ̂ all-gathered and averaged, no outer momentum; each value
                                  over the sites that sent it (a value one site sent is applied whole, one
                                  nobody sent stays 0), as the reference's scatter_reduce(mean)

The paper's observations: the decayed accumulator stands in for DiLoCo's outer momentum, and averaging sparse
updates acts as a regulariser. Its reported best is 1-3% density with 2-bit values; the chunk of 4096, beta =
0.95 and lr = 1 here are this project's guesses, to be settled by ``benchmarks/sparseloco_study.py``.

The payload is the ``sparse+int{bits}`` codec (``geotrain.comm.codecs.sparse``): chunk-relative indices of
ceil(log2(chunk)) bits, one float32 scale per chunk, and the values; about 0.15 bits per parameter at the
defaults. Chunks are cut per tensor (the model's layout, ``Config.layout``), never across two, and a tensor
smaller than a chunk is one chunk; with several workers per site each worker's shard is chunked as one run.
Sparse payloads cannot be summed on their way, so they are all-gathered: each site receives every other site's
payload and decodes them all in rank order, so every site applies a bit-identical mean (the codec's
``mean_over_senders``: ``geotrain.comm.collectives.sender_mean``). ``comm.overlap`` works
as for DiLoCo: round t's payloads travel while round t+1 computes. The strategy is
``geotrain.algorithms.strategies.sparseloco``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from geotrain.algorithms.base import ModelLayout, SyncPattern
from geotrain.algorithms.diloco import DiLoCo
from geotrain.errors import ConfigError, SettingConflict

if TYPE_CHECKING:
    from geotrain.algorithms.strategies.base import Strategy, StrategyContext
    from geotrain.config import Config

__all__ = ["SparseLoCo"]


class SparseLoCo(DiLoCo):
    """DiLoCo's schedule (H, overlap, the end of a run) with its own payloads and outer step."""

    name = "sparseloco"
    timed_rounds = False
    summary = "H inner steps, then a 2-bit chunked top-k of a decayed error-feedback accumulator, averaged"
    settings = ("outer.sync_every", "comm.overlap", "sparseloco.density", "sparseloco.chunk", "sparseloco.bits",
                "sparseloco.beta", "sparseloco.lr")
    own_codec = True

    def check(self, config: Config) -> None:
        if config.comm.codec != "fp32":
            raise SettingConflict(
                f"sparseloco sends its own payloads (sparse+int{config.sparseloco.bits}); comm.codec "
                f"{config.comm.codec!r} does not apply: set sparseloco.bits and sparseloco.density instead",
                field="comm.codec")
        if config.comm.pattern == "reduce_scatter":
            raise ConfigError("sparse payloads cannot be summed on their way: sparseloco all-gathers them; use "
                              "comm.pattern = \"auto\" or \"all_gather\"", field="comm.pattern")

    def codec(self, config: Config) -> Any:
        from geotrain.comm.codecs.registry import choose_codec

        s = config.sparseloco
        # chunks stay within one tensor (a worker's shard, with several workers per site, is chunked as one run)
        segments = tuple(n for _, n in config.layout().tensors)
        return choose_codec(f"sparse+int{s.bits}", field="sparseloco.density", fraction=s.density, chunk=s.chunk,
                            segments=segments)

    def label(self, config: Config) -> str:
        s = config.sparseloco
        overlap = {True: "+overlap", False: "", None: " overlap=auto"}[config.comm.overlap]
        return f"sparseloco H={config.outer.sync_every} {100 * s.density:g}% {s.bits}-bit{overlap}"

    def compare_variants(self, config: Config) -> dict[str, dict[str, Any]]:
        # its own payloads whatever [comm] names for the others
        return {self.name: {"comm.overlap": False, "comm.codec": "fp32"},
                f"{self.name}+overlap": {"comm.overlap": True, "comm.codec": "fp32"}}

    def pattern(self, config: Config, layout: ModelLayout) -> SyncPattern:
        h = config.outer.sync_every
        return SyncPattern(round_steps=h, period_steps=float(h), hide_steps=float(h) if config.comm.overlap else 0.0,
                           payloads=(layout.params,))

    def build(self, config: Config, ctx: StrategyContext) -> Strategy:
        from geotrain.algorithms.strategies.sparseloco import SparseLoCoStrategy

        return SparseLoCoStrategy(ctx, sync_every=config.outer.sync_every, sparseloco=config.sparseloco,
                                  overlap=bool(config.comm.overlap))
