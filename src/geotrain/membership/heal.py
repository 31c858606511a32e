"""Healing a joining site: how much state a healer sends, how long that takes, and whether the members wait.

One definition for training (``geotrain.train.site``, ``geotrain.comm.collectives``) and the planner
(``geotrain.planner.simulate``, ``geotrain.planner.power``). Pure Python: no torch.

Blocking or in the background
-----------------------------
At an admission the healer packs its state at the round boundary and sends it to each joiner over the link
between them. Blocking, every member waits at a barrier until the state has arrived and the next round starts
for all of them together: the healer's link is busy meanwhile, and a sync begun on it would wait behind the
transfer, past its deadline if the transfer is long.

With time-based rounds (``outer.sync_every_seconds`` T) a round's end is known in advance, so the heal goes in
the background whenever the healer's transfers take at most half a round (:func:`heals_in_background`): the
members start the next round at once and the healer trains on while its state travels. Its link carries the
transfer first and then the round's sync, which starts at T, long after the transfer is done. The joiner's
round began with the others' (at the healer's snapshot), so it ends with theirs; the joiner trains what is left
of it once the state has arrived, and the round's token weights count only that. A heal longer than half a
round, and any heal under H-step rounds (where the members would simply wait for the joiner's H steps at the
next sync instead), stays blocking.
"""

from __future__ import annotations

from typing import Any

from geotrain.topology import Link, point_to_point

__all__ = ["BACKGROUND_SHARE", "VALUE_BYTES", "heal_state_bytes", "heal_transfer_seconds", "heals_in_background"]

VALUE_BYTES = 4
"""Training keeps every tensor of a site's state in fp32."""

BACKGROUND_SHARE = 0.5
"""A heal goes in the background when it takes at most this share of a time-based round."""


def heal_state_bytes(config: Any, params: int) -> int:
    """Bytes of the state a healer sends a joining site: the tensors ``geotrain.train.loop`` packs for it (its
    ``snapshot`` without the worker's own counters), all in fp32, for a model of N = ``params`` values:

    * the model's parameters: N;
    * the inner optimizer's state (``optim.name``): AdamW's two moments, 2N; SGD's momentum, N (none without
      momentum);
    * the strategy's state: DiLoCo's global parameters, the start of the round and the outer momentum, 3N
      (2N without outer momentum); Streaming DiLoCo's global fragments and their outer momentum, 2N (or N);
      nothing for ddp; an algorithm not listed here is taken to keep global parameters and outer momentum.

    Syncs in flight are drained before an admission, so none travels with the state, and error-feedback
    residuals stay with their sender (``CrossSiteComm.shared_state``). Headers, counters and the configuration
    (tens of kB) are left out: about 1% of the demo model's state.
    """
    inner = 2 if config.optim.name == "adamw" else int(config.optim.momentum > 0)
    momentum = int(config.outer.momentum > 0)
    strategy = {"ddp": 0, "diloco": 2 + momentum, "streaming": 1 + momentum}.get(config.run.algorithm, 1 + momentum)
    return VALUE_BYTES * int(params) * (1 + inner + strategy)


def heal_transfer_seconds(config: Any, link: Link | None, nbytes: int) -> float:
    """Seconds for a healer to send ``nbytes`` of state to one joiner over ``link``: each of its W workers sends
    one shard, the W streams sharing the link (``CrossSiteComm.admit``), at the cost the WAN emulator charges
    (``geotrain.topology.point_to_point``): one message, the joiner's announcement, the bytes and their
    headers, a latency. No link: no time."""
    workers = config.run.workers_per_site
    shard = -(-int(nbytes) // workers)
    return point_to_point(shard, link, streams=workers).seconds


def heals_in_background(config: Any, seconds: float) -> bool:
    """Whether a heal whose transfers take ``seconds`` goes in the background (see the module's text): with
    time-based rounds, when it takes at most :data:`BACKGROUND_SHARE` of a round."""
    timed = config.outer.sync_every_seconds
    if not timed or not config.algorithm().timed_rounds:
        return False
    return seconds <= BACKGROUND_SHARE * float(timed)
