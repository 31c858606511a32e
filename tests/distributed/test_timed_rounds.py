"""Sites of unequal speed: steps held back by a speed factor, and time-based rounds averaged with token weights.

Whole runs on virtual clocks (``_utils.sites``): each site's step costs exactly 1/32 s of compute, and a site
with speed factor f is held back to 1/(32 f) s per step, so every figure is exact binary arithmetic. The
token-weighted mean is checked on real cross-site collectives against its definition.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from _utils.sites import run_comms, run_sites
from geotrain.algorithms.strategies.rounds import TimedRounds
from geotrain.config import load_config
from geotrain.errors import ConfigError
from geotrain.train.pace import Pace

pytestmark = pytest.mark.timeout(300)

STEP = 1 / 32  # compute per step; the test workload trains 4 tokens per step


def _config(**values):
    base = {"run.sites": 2, "outer.sync_every": 8, "wan.link": "none", "run.eval_every_tokens": 10**9,
            "outer.warmup_steps": 0, "comm.overlap": False}
    return load_config(values=base | values)


def _paced(speeds):
    return lambda site: Pace(speed=speeds[site])


def test_a_slower_site_is_held_back_to_its_speed_and_the_hold_is_throttled_time():
    """H-step rounds, 32 steps each: the quarter-speed site computes 1 s and is held 3 s more."""
    runs = run_sites(_config(**{"run.tokens": 256}), step_seconds=STEP, pace=_paced([1.0, 0.25]))
    fast, slow = (r.figures for r in runs)
    assert fast["steps"] == slow["steps"] == 32
    assert fast["compute_seconds"] == slow["compute_seconds"] == 1.0
    assert (fast["throttled_seconds"], slow["throttled_seconds"]) == (0.0, 3.0)
    assert (fast["wall_seconds"], slow["wall_seconds"]) == (1.0, 4.0)
    assert slow["utilization"] == 1.0  # held back, its accelerators are computing, not waiting


@pytest.mark.parametrize("overlap", [False, True])
def test_time_based_rounds_take_the_steps_each_site_managed(overlap):
    """T = 0.5 s: the full-speed site trains 16 steps (64 tokens) a round, the quarter-speed one 4 (16). A
    budget of 800 tokens is 10 rounds of 80, reached exactly, blocking or overlapped."""
    config = _config(**{"run.tokens": 800, "outer.sync_every_seconds": 0.5, "comm.overlap": overlap})
    runs = run_sites(config, step_seconds=STEP, pace=_paced([1.0, 0.25]))
    fast, slow = runs
    assert (fast.figures["steps"], slow.figures["steps"]) == (160, 40)
    assert fast.figures["outer_rounds"] == slow.figures["outer_rounds"] == 10
    assert fast.result.tokens == slow.result.tokens == 800
    assert fast.figures["wall_seconds"] == slow.figures["wall_seconds"] == 5.0
    assert fast.result.params_sha256 == slow.result.params_sha256  # one global model


def test_sites_of_unequal_speed_apply_the_outer_warm_up_in_the_same_rounds():
    """Plain averaging for the first warmup_steps // H rounds (48 // 16: 3), on every site: their own step
    counts differ (16 and 4 a round), so a warm-up read from them would make the sites apply different outer
    steps and end with different models."""
    config = _config(**{"run.tokens": 800, "outer.sync_every": 16, "outer.sync_every_seconds": 0.5,
                        "outer.warmup_steps": 48})
    fast, slow = run_sites(config, step_seconds=STEP, pace=_paced([1.0, 0.25]))
    assert fast.figures["outer_rounds"] == slow.figures["outer_rounds"] == 10
    assert fast.result.params_sha256 == slow.result.params_sha256


def test_a_budget_between_rounds_shortens_the_last_round():
    """760 tokens: 9 rounds of 80, then a round of half the time (8 + 2 steps, 40 tokens)."""
    config = _config(**{"run.tokens": 760, "outer.sync_every_seconds": 0.5})
    fast, slow = run_sites(config, step_seconds=STEP, pace=_paced([1.0, 0.25]))
    assert (fast.figures["steps"], slow.figures["steps"]) == (152, 38)
    assert fast.result.tokens == slow.result.tokens == 760
    assert fast.figures["outer_rounds"] == 10


def test_time_based_rounds_of_equal_sites_are_diloco_with_h_steps():
    """Equal sites at T = 16 steps' time train exactly as H = 16: the same steps, the same model."""
    timed = run_sites(_config(**{"run.tokens": 512, "outer.sync_every_seconds": 0.5}), step_seconds=STEP)
    steps = run_sites(_config(**{"run.tokens": 512, "outer.sync_every": 16}), step_seconds=STEP)
    assert [r.figures["outer_rounds"] for r in timed] == [r.figures["outer_rounds"] for r in steps] == [4, 4]
    assert timed[0].result.params_sha256 == steps[0].result.params_sha256


def test_the_token_weighted_mean_over_real_collectives():
    """Three sites with 48, 16 and 8 tokens in the round: the mean is sum(n_k delta_k) / sum(n)."""
    tokens = [48, 16, 8]
    deltas = [torch.arange(6, dtype=torch.float32) * (k + 1) - k for k in range(3)]
    expected = sum(n * d for n, d in zip(tokens, deltas, strict=True)) / sum(tokens)

    def body(site, comm):
        rounds = TimedRounds(seconds=1.0, budget_tokens=10**6, site_pg=None, workers=1, lag=0)
        rounds.begin(lambda: 0.0, step_tokens=8)
        rounds.round_steps = tokens[site] // 8
        return rounds.weigh(deltas[site], comm, n_ref=40.0, key="outer").wait()

    for mean in run_comms(3, body):
        torch.testing.assert_close(mean, expected, rtol=1e-6, atol=1e-6)


class _SlowFirstStep(Pace):
    """Site 1's first step of its second round is expected to last 2 s (as a site back from an outage whose
    power is ramping up): more than twice what is left of its round. Every other step is ordinary."""

    def __init__(self, site: int) -> None:
        super().__init__()
        self.site, self.calls = site, 0

    def begin_step(self, wall: float) -> float:
        self.calls += 1
        self.t_step, self.step = wall, SimpleNamespace(active=1.0)
        return 0.0

    def step_seconds(self) -> float:
        return 2.0 if (self.site, self.calls) == (1, 17) else STEP


def test_a_site_whose_first_step_would_end_past_its_round_goes_to_the_sync_without_it():
    """T = 0.5 s, 16 steps of 4 tokens per site a round. Site 1 skips its step at the start of round 2: that
    round is site 0's 64 tokens alone and site 1 waits at its sync; the other rounds have 128. 448 tokens are
    4 rounds: site 0 trains 64 steps and site 1 48, and they end with one global model."""
    config = _config(**{"run.tokens": 448, "outer.sync_every_seconds": 0.5})
    runs = run_sites(config, step_seconds=STEP, pace=_SlowFirstStep)
    first, second = (r.figures for r in runs)
    assert (first["steps_trained"], second["steps_trained"]) == (64, 48)
    assert first["outer_rounds"] == second["outer_rounds"] == 4
    assert runs[0].result.tokens == runs[1].result.tokens == 448
    # each site's virtual clock counts its own time (not its waits for a peer): site 1 spent none on round 2
    assert first["wall_seconds"] == 2.0 and second["wall_seconds"] == second["compute_seconds"] == 48 * STEP
    assert runs[0].result.params_sha256 == runs[1].result.params_sha256


def test_only_a_round_without_steps_skips_and_only_a_step_ending_past_half_of_it():
    rounds = TimedRounds(seconds=1.0, budget_tokens=10**6, site_pg=None, workers=1, lag=0)
    now = [0.0]
    rounds.begin(lambda: now[0], step_tokens=4)
    assert not rounds.skip_step(0.0, 2.0)  # ends 1 s past the round's end, but only half of it: 0 + 1 = 1
    assert rounds.skip_step(0.0, 2.0 + 1e-9)
    now[0] = 0.25
    assert rounds.due(last=False) and rounds.round_steps == 0  # the skipped step ends the round, uncounted
    rounds.end_round()
    assert rounds.round_start == 0.25
    assert not rounds.skip_step(0.25, 0.1)
    now[0] = 1.0
    assert not rounds.due(last=False) and rounds.round_steps == 1
    assert not rounds.skip_step(1.0, 10.0)  # it has trained in this round: it finishes the step as usual


def test_time_based_rounds_and_speeds_are_checked():
    with pytest.raises(ConfigError, match="outer.sync_every_seconds"):
        _config(**{"run.algorithm": "streaming", "outer.sync_every_seconds": 5.0})
    with pytest.raises(ConfigError, match="run.site_speeds"):
        _config(**{"run.site_speeds": [1.0, 0.5, 0.25]})
    with pytest.raises(ConfigError, match="run.site_speeds"):
        _config(**{"run.site_speeds": [1.0, 0.0]})
    with pytest.raises(ConfigError, match="outer.sync_every_seconds"):
        _config(**{"outer.sync_every_seconds": -1})
