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
    common = {**MODEL, "run.sites": 2, "run.algorithm": "diloco", "outer.sync_every": 3, "wan.link": LINK,
              "run.tokens": 2 * 8 * 64 * 18, "run.eval_every_tokens": 10**9}
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
    saved = per_site(s, "wall_seconds") - per_site(o, "wall_seconds")
    assert saved >= 0.5 * 5 * t_round, (s["wall_seconds"], o["wall_seconds"], t_round)
    assert o["utilization"] > s["utilization"]
