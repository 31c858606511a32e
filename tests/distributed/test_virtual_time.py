"""Whole runs on virtual clocks: overlap, the timing model, the wall-time budget and the settings a run
chooses, checked as exact arithmetic.

Every worker runs the real wiring and the one training loop on gloo threads (``_utils.sites``); a site's
compute advances its own virtual clock by a fixed time per step and the WAN emulator holds each transfer for
its analytic time on that clock. So these figures are the same on an idle machine and a loaded one.
"""

from __future__ import annotations

import math

import pytest

from _utils.sites import run_sites
from geotrain.algorithms.streaming import HIDE_MARGIN
from geotrain.algorithms.timing import predict_run, sync_seconds
from geotrain.config import load_config
from geotrain.topology import Topology, all_to_all, parse_link, ring_all_gather

pytestmark = pytest.mark.timeout(300)

LINK = "10mbit/25ms"
# The test model has 2 x (8 x 8 + 8) = 144 parameters. In the reduce_scatter pattern between two sites each
# sends the other its encoded half (48-byte header + 72 fp32 values = 336 bytes, 388 on the wire with one
# segment's headers), then each all-gathers its encoded mean half in two halves of 168 bytes (220 on the wire).
# Each of the two collectives waits a latency for the receiver's announcement and a latency for its last byte,
# and its burst (0.33 ms and 0.37 ms of serialisation at the 95% of the link a connection is paced at) leaves
# over a quarter of the 50 ms round trip, paced.
T = 4 * 0.025 + 2 * max(388 * 8 / (0.95 * 10e6), 0.0125, 2 * 220 * 8 / (0.95 * 10e6))


def _config(**values):
    base = {"run.sites": 2, "outer.sync_every": 10, "wan.link": LINK, "run.tokens": 480,  # 60 steps of 4 x 2
            "run.eval_every_tokens": 10**9, "outer.warmup_steps": 0, "comm.pattern": "reduce_scatter"}
    return load_config(values=base | values)


def test_the_transfer_time_is_the_hand_computed_one():
    config = _config()
    topology = Topology(2, default=parse_link(LINK))
    assert T == pytest.approx(all_to_all(672, topology.pairs(), sites=2).seconds
                              + ring_all_gather(336, topology.ring()).seconds, rel=1e-12)
    assert sync_seconds(config, 144) == pytest.approx(T, rel=1e-12)


@pytest.mark.parametrize("overlap", [False, True])
def test_overlapped_rounds_hide_the_transfer(overlap):
    """6 rounds of 10 steps of 0.02 s (0.2 s of compute against T = 0.125 s of transfer): a blocking round costs
    compute + T; overlapped, each transfer hides behind the next round and only the last one is exposed
    (the run ends on a synchronised model)."""
    runs = run_sites(_config(**{"comm.overlap": overlap}), step_seconds=0.02)
    for r in runs:
        f = r.figures
        assert f["steps"] == 60 and f["outer_rounds"] == 6
        assert f["compute_seconds"] == pytest.approx(1.2, rel=1e-12)
        assert f["comm_seconds"] == pytest.approx(T if overlap else 6 * T, rel=1e-9)
        assert f["wall_seconds"] == pytest.approx(1.2 + (T if overlap else 6 * T), rel=1e-9)


def test_a_transfer_longer_than_a_round_costs_max_of_the_two():
    """Overlapped DiLoCo with T = 0.125 s > 0.05 s of compute per round: the link is the bottleneck, so rounds
    settle at T each. Round 1's transfer runs 0.05-0.15 s, round 2's 0.15-0.25 s after waiting for the link,
    ...; round 6 ends its compute at 0.55 s, waits for round 5's transfer (0.55 s) and then its own (0.65 s)."""
    runs = run_sites(_config(**{"comm.overlap": True}), step_seconds=0.005)
    for r in runs:
        assert r.figures["wall_seconds"] == pytest.approx(0.05 + 6 * T, rel=1e-9)
        assert r.figures["comm_seconds"] == pytest.approx(6 * T - 5 * 0.05, rel=1e-9)


SCENARIOS = [
    # (id, settings, compute per step)
    ("ddp", {"run.algorithm": "ddp"}, 0.02),
    ("diloco", {"comm.overlap": False}, 0.02),
    ("diloco-overlap", {"comm.overlap": True}, 0.02),
    ("diloco-overlap-link-bound", {"comm.overlap": True}, 0.005),
    ("diloco-partial-last-round", {"comm.overlap": False, "outer.sync_every": 7}, 0.02),
    # 60 steps at H=7: a last round of 4 steps hides the transfer before it behind 4 steps only
    ("diloco-overlap-short-last-round", {"comm.overlap": True, "outer.sync_every": 7}, 0.02),
    ("diloco-overlap-short-last-round-link-bound", {"comm.overlap": True, "outer.sync_every": 7}, 0.005),
    # H=14, P=2, tau=5: fragment 0's last sync starts 4 steps before the end and is merged there, early
    ("streaming-merged-early-at-the-end", {"run.algorithm": "streaming", "streaming.fragments": 2,
                                           "streaming.overlap_steps": 5, "outer.sync_every": 14}, 0.02),

    ("streaming-tau0", {"run.algorithm": "streaming", "streaming.fragments": 2, "streaming.overlap_steps": 0}, 0.02),
    ("streaming-tau1", {"run.algorithm": "streaming", "streaming.fragments": 2, "streaming.overlap_steps": 1}, 0.02),
    ("streaming-queued", {"run.algorithm": "streaming", "streaming.fragments": 2, "streaming.overlap_steps": 2}, 0.005),
    ("3-sites-int4", {"run.sites": 3, "run.tokens": 720, "comm.codec": "int4", "comm.overlap": False}, 0.02),
    ("2-workers", {"run.workers_per_site": 2, "run.tokens": 960, "comm.overlap": True}, 0.005),
]


@pytest.mark.parametrize("values,step", [s[1:] for s in SCENARIOS], ids=[s[0] for s in SCENARIOS])
def test_the_timing_model_predicts_the_run_exactly(values, step):
    """The planner's timing model (``geotrain.algorithms.timing``) and a run agree to rounding error: same
    periods, same hiding, same queueing on the link, same end of run."""
    runs = run_sites(_config(**values), step_seconds=step)
    first = runs[0]
    f = first.figures
    predicted = predict_run(first.config, payloads=first.strategy.sync_payloads(), steps=f["steps"],
                            step_seconds=[step] * first.config.run.sites)
    for r in runs:
        assert r.figures["utilization"] == pytest.approx(predicted.utilization, rel=1e-9)
        assert r.figures["comm_seconds"] == pytest.approx(predicted.exposed_seconds, rel=1e-9, abs=1e-12)
        assert r.figures["wall_seconds"] == pytest.approx(predicted.wall_seconds, rel=1e-9)


def test_a_saturated_link_with_a_fragment_merged_early_is_predicted_within_a_step():
    """Where the model is not exact: fragments queue on a link too slow for them (a fragment's 0.125 s sync every
    7 steps of 0.005 s) and one started 4 steps before the end is merged there, before its tau of 5. Merges
    then hold compute back while transfers queue, which the per-period arithmetic does not follow; the
    prediction stays within one step of compute (0.005 s) of the run."""
    config = _config(**{"run.algorithm": "streaming", "streaming.fragments": 2, "streaming.overlap_steps": 5,
                        "outer.sync_every": 14})
    first = run_sites(config, step_seconds=0.005)[0]
    f = first.figures
    predicted = predict_run(first.config, payloads=first.strategy.sync_payloads(), steps=f["steps"],
                            step_seconds=[0.005, 0.005])
    assert abs(f["wall_seconds"] - predicted.wall_seconds) <= 0.005 + 1e-9


def test_a_wall_time_budget_stops_every_site_and_worker_at_the_same_step():
    """2 sites of 2 workers, overlapped DiLoCo without a link (transfers take no time), 0.125 s per step, H=4:
    rounds end at 0.5, 1.0, 1.5, ... The vote cast at a sync point says whether the round after next would end
    past the budget of 2.25 s: at 1.5 s it does (1.5 + 2 x 0.5 = 2.5), the vote is read at the next sync point,
    2.0 s, and every worker stops there, after 16 steps, within the budget."""
    config = load_config(values={"run.sites": 2, "run.workers_per_site": 2, "outer.sync_every": 4,
                                 "comm.overlap": True, "wan.link": "none", "run.tokens": 10**6,
                                 "run.wall_seconds": 2.25, "run.eval_every_tokens": 10**9})
    runs = run_sites(config, step_seconds=0.125)
    assert len(runs) == 4
    for r in runs:
        assert r.result.stopped_early is True
        assert r.result.steps == 16
        assert r.figures["wall_seconds"] == pytest.approx(2.0, rel=1e-12)


def test_a_run_chooses_tau_so_a_fragment_hides_and_says_why():
    """Streaming with tau unset: every site measures 0.02 s per step (its virtual compute), so tau is the fewest
    steps covering 2 x T of one fragment's sync. (H=20: a fragment every 10 steps, 0.2 s, so the link is not
    saturated by one fragment's 0.125 s sync.)"""
    config = _config(**{"run.algorithm": "streaming", "streaming.fragments": 2, "outer.sync_every": 20})
    runs = run_sites(config, step_seconds=0.02)
    t_fragment = sync_seconds(config, 72)  # each fragment is one 8x8 layer and its bias
    expected = math.ceil(HIDE_MARGIN * t_fragment / 0.02)
    assert expected == 13  # 2 x (4 x 25 ms + two paced bursts of 12.5 ms) = 0.25 s, over 0.02 s steps
    for r in runs:
        assert r.config.streaming.overlap_steps == expected
        (choice,) = r.chosen
        assert choice.key == "streaming.overlap_steps" and choice.value == expected
        assert "0.02 s" in choice.reason and "tau=13" in choice.reason
    # and the chosen tau hides every fragment: only the final sync of both fragments at once is exposed
    assert runs[0].figures["comm_seconds"] == pytest.approx(sync_seconds(config, 144), rel=1e-9)


def test_a_run_turns_overlap_on_only_when_the_transfer_matters():
    slow = run_sites(_config(), step_seconds=0.02)  # T = 0.125 s against 0.2 s per round: 62.5%
    fast = run_sites(_config(**{"wan.link": "10gbit/0.1ms"}), step_seconds=0.02)  # 0.2 ms: 0.1%
    assert all(r.config.comm.overlap is True for r in slow)
    assert all(r.config.comm.overlap is False for r in fast)
    assert f"{100 * T / 0.2:.3g}%" in slow[0].chosen[0].reason and "not delayed" in fast[0].chosen[0].reason
