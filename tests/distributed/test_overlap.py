"""Overlap really overlaps: with per-round transfer time T <= compute C, a round costs ~max(C, T), not C + T.

Two real site processes run DiLoCo over an emulated link with and without --overlap; everything else equal.
"""

from __future__ import annotations

from geotrain.topology import parse_link
from geotrain.wan.model import ring_all_reduce

from _utils.runs import run_tiny

LINK = "50mbit/10ms"
MODEL = {"model.n_layer": 2, "model.d_model": 128, "model.n_head": 4, "model.seq_len": 64, "data.batch_size": 8}


def test_overlapped_rounds_hide_the_transfer(tmp_path):
    # H=10 steps of ~0.05 s (idle machine) to ~0.15 s (loaded) of compute per round against T = 0.3 s
    common = {**MODEL, "run.sites": 2, "run.algorithm": "diloco", "outer.sync_every": 10, "wan.link": LINK,
              "run.tokens": 2 * 8 * 64 * 60, "run.eval_every_tokens": 10**9}
    sync = run_tiny(tmp_path / "sync", **common)
    over = run_tiny(tmp_path / "overlap", **common, **{"comm.overlap": True})
    assert sync.exit_code == 0 and over.exit_code == 0
    s, o = sync.summary, over.summary
    assert s["outer_rounds"] == o["outer_rounds"] == 6
    t_round = ring_all_reduce(s["payload_bytes_per_sync"], [parse_link(LINK)] * 2).seconds
    per_site = lambda summ, key: max(x[key] for x in summ["per_site"])  # noqa: E731
    compute_per_round = per_site(o, "compute_seconds") / 6
    assert compute_per_round >= t_round * 0.8, "the test needs compute >= transfer per round"
    # Without overlap every round waits for its transfer: C + T each.
    assert per_site(s, "comm_seconds") >= 6 * t_round * 0.9
    # With overlap only the last round's transfer is exposed (the run must end on a synchronised model).
    assert per_site(o, "comm_seconds") <= 2 * t_round + 0.35 * (6 * t_round)
    # Time not spent computing shrinks by most of the 5 hidden transfers (compared per run: less noisy than
    # comparing two runs' total wall time on a shared machine).
    idle = lambda summ: max(x["wall_seconds"] - x["compute_seconds"] for x in summ["per_site"])  # noqa: E731
    assert idle(s) - idle(o) >= 3 * t_round, (idle(s), idle(o), t_round)
    assert o["utilization"] > s["utilization"]
