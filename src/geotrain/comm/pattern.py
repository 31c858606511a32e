"""How one sync crosses the sites: the collective a codec takes, the bytes a worker contributes, and the time
and traffic of the whole exchange over the links. Pure Python (no torch).

``CrossSiteComm`` moves payloads this way, the WAN emulator charges each of its collectives with the
costs of ``geotrain.topology``, and the planner and a run's predicted utilization price a sync with
:func:`sync_cost`, so all three count the same bytes.

Patterns (docs/codecs.md compares their bytes and error). Every codec takes one of them, lossless fp32
included: the receivers then see each sender's payload (with its checksums), which is what lets them leave a
corrupt, non-finite or outlying one out (``geotrain.comm.guard``).

* ``reduce_scatter`` (dense codecs among 3 or more sites by default): the payload is cut into one chunk
  per site; each site sends encoded chunk j to site j, which sums them in fp32, encodes the mean chunk once
  and all-gathers it. A ring all-reduce's bytes and time on the encoded payload.
* ``all_gather`` (sparse codecs, and every codec between 2 sites): every site sends its whole encoded
  payload to every other site; (K-1) times the payload per site, one quantization.

With ``W`` workers per site each worker carries a 1/W shard of every payload over its own cross-site group,
and the W streams share the site's link.
"""

from __future__ import annotations

from collections.abc import Sequence

from geotrain.comm.codecs.registry import CodecChoice
from geotrain.topology import CollectiveCost, Link, all_to_all, ring_all_gather

__all__ = ["PATTERNS", "payload_bytes", "resolve_pattern", "shard_numel", "sync_cost"]

PATTERNS = ("auto", "reduce_scatter", "all_gather")
"""What ``comm.pattern`` may ask for."""


def resolve_pattern(pattern: str, *, codec: CodecChoice, sites: int) -> str:
    """The collective a run uses: the pattern asked for, with "auto" picking "reduce_scatter" for dense codecs
    among 3 or more sites and "all_gather" otherwise."""
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; choose one of {', '.join(PATTERNS)}")
    if pattern != "auto":
        return pattern
    return "all_gather" if codec.sparse or sites < 3 else "reduce_scatter"


def shard_numel(numel: int, workers: int) -> int:
    """Values one worker carries of a payload of ``numel`` (the last shard is zero padded to this length)."""
    return -(-numel // workers)


def payload_bytes(numel: int, *, codec: CodecChoice, pattern: str, sites: int, workers: int) -> int:
    """Bytes one worker contributes to one sync of ``numel`` fp32 values (its encoded shard, as handed to gloo)."""
    shard = shard_numel(numel, workers)
    if pattern == "reduce_scatter":
        return sites * codec.encoded_size(-(-shard // sites))
    return codec.encoded_size(shard)


def sync_cost(numel: int, *, codec: CodecChoice, pattern: str, ring: Sequence[Link | None],
              pairs: Sequence[Link | None], workers: int) -> CollectiveCost:
    """Time of one sync of ``numel`` values over the links (``ring``: ``Topology.ring``, ``pairs``:
    ``Topology.pairs`` of the same sites) and the bytes ONE WORKER sends for it (a site sends ``workers`` times
    that), as the emulator charges and the transport counts them."""
    sites = len(ring) if ring else 1
    nbytes = payload_bytes(numel, codec=codec, pattern=pattern, sites=sites, workers=workers)
    if pattern == "all_gather":
        return ring_all_gather(nbytes, ring, streams=workers)
    # reduce_scatter: encoded chunks to their owners, then an all-gather of the re-encoded mean chunks
    scatter = all_to_all(nbytes, pairs, sites=sites, streams=workers)
    gather = ring_all_gather(nbytes // max(sites, 1), ring, streams=workers)
    return CollectiveCost(scatter.seconds + gather.seconds, scatter.bytes_sent + gather.bytes_sent,
                          scatter.steps + gather.steps)
