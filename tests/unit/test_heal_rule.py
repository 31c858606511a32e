"""When a heal goes in the background (``geotrain.membership.heal``): with time-based rounds, a heal of at most
half a round; never with H-step rounds. And what the rule's inputs add up to: the state's bytes and the
transfer's seconds over a link, as the WAN emulator charges them."""

from __future__ import annotations

import pytest

from geotrain.config import load_config
from geotrain.membership.heal import BACKGROUND_SHARE, heal_state_bytes, heal_transfer_seconds, heals_in_background
from geotrain.topology import parse_link


def test_a_heal_of_at_most_half_a_time_based_round_goes_in_the_background():
    timed = load_config(values={"outer.sync_every_seconds": 4.0})
    assert BACKGROUND_SHARE == 0.5
    assert heals_in_background(timed, 0.0) and heals_in_background(timed, 2.0)
    assert not heals_in_background(timed, 2.0 + 1e-9)
    steps = load_config(values={"outer.sync_every": 50})
    assert not heals_in_background(steps, 0.0)  # H-step rounds: the members would wait at the next sync anyway


def test_the_state_and_its_transfer():
    config = load_config(values={"optim.name": "adamw", "outer.momentum": 0.9, "run.workers_per_site": 2})
    # DiLoCo with AdamW and outer momentum: the model, two moments, global parameters, round start, momentum
    assert heal_state_bytes(config, 1000) == 4 * 1000 * 6
    # two workers each send half (12,000 bytes: 9 segments, 12,468 on the wire) over the one link, so each gets
    # half the 95% of its rate a connection is paced at (21 ms); the joiner's announcement and the last byte each
    # take a latency
    assert heal_transfer_seconds(config, parse_link("10mbit/5ms"), 24_000) == pytest.approx(
        2 * 0.005 + 8 * 2 * 12_468 / (0.95 * 10e6))
    # over a longer link the send is one paced burst, spread over a quarter of the 100 ms round trip at least
    assert heal_transfer_seconds(config, parse_link("10mbit/50ms"), 24_000) == pytest.approx(2 * 0.05 + 0.025)
    assert heal_transfer_seconds(config, None, 24_000) == 0.0
