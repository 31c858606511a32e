"""The planner's cost model against cases computed by hand (acceptance A of issue 4), in the run's vocabulary.

A plan is built from a run configuration (``geotrain.config``): ``plan(plan_spec(load_config(values=...)))``.
Every expected figure below is worked out in the comments from the definitions: compute 6 N B / (n F mfu),
gloo's collectives over TCP (``geotrain.topology``, written out below as ``ser``, ``message`` and ``gather``),
the codecs' exact encoded sizes (a 48-byte header, fp32 block scales and 8-byte aligned sections,
``geotrain.comm.codecs.layout``), steps = tokens // batch, and the end of the run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from geotrain.config import Config, load_config
from geotrain.errors import ConfigError
from geotrain.planner.model import PlanSpec, plan, plan_spec, sync_comm
from geotrain.topology import wire_bytes

ROOT = Path(__file__).resolve().parents[2]


# What a collective costs over one link, written out from the model (docs/planner.md) so that the figures below
# do not come from the code they check; ``wire_bytes`` (52 bytes of TCP/IP headers per 1448-byte segment) is
# checked by hand in test_ring_cost.py.
PACED = 0.95
"""Share of a link's rate a run paces each connection at, which the model charges (``comm.tcp_pacing``, "link";
``geotrain.topology.PACED_LINK_SHARE``, checked in test_ring_cost.py)."""


def ser(nbytes: int, bps: float, streams: int = 1) -> float:
    """Seconds to put ``nbytes`` of payload and their headers on a link of ``bps`` shared by ``streams``, each
    connection paced at ``PACED`` of the link's rate."""
    return 8 * wire_bytes(nbytes) * streams / (PACED * bps)


def message(nbytes: int, bps: float, latency: float, streams: int = 1) -> float:
    """One gloo message: the receiver's announcement (a latency), the bytes, the last byte's flight (a latency).
    An all-to-all lasts one message of a chunk over its slowest pair, every pair sending at once."""
    return 2 * latency + ser(nbytes, bps, streams)


def gather(nbytes: int, bps: float, latency: float, sites: int, streams: int = 1) -> float:
    """geotrain's ring all-gather of one ``nbytes`` payload per site, each payload sent in two halves (nbytes // 2
    and the rest). Between 2 sites: the announcement, both halves back to back, the last one's flight. Among
    more, on a bandwidth-bound link (a half takes at least two latencies to serialise) each half is forwarded
    before the link is free again, so K - 1 payloads go back to back."""
    s0, s1 = ser(nbytes // 2, bps, streams), ser(nbytes - nbytes // 2, bps, streams)
    assert sites == 2 or min(s0, s1) >= 2 * latency, "latency-bound ring: this closed form does not hold"
    return 2 * latency + (sites - 1) * (s0 + s1)


# A toy world where the arithmetic is easy: 1e9 params sent as fp32 (a framed payload of a 48-byte header and
# 4e9 bytes of values), a global batch of 1e6 tokens, one accelerator per site at 6e15 FLOP/s peak and MFU 0.5.
# With 2 sites each computes 3e15 FLOPs (half of 6 * 1e9 * 1e6) at 3e15 FLOP/s: exactly 1 s per inner step.
# 1e8 tokens are 100 inner steps. Links of 8 Gbit/s and no latency: between 2 sites every codec is
# all-gathered, each site sending its whole payload to the other in K - 1 = 1 step, as two halves of
# 2,000,000,024 bytes, each 1,381,216 segments (2,071,823,256 bytes on the wire), at the 95% of the link's rate
# a connection is paced at, so T = 8 * 2 * 2,071,823,256 / (0.95 * 8e9) = 4.361733170526 s. Overlap settings are
# given explicitly (unset, a plan chooses them).
TOY_ACCELERATORS = {"toy": {"peak_flops": 6e15, "watts": 1000.0}}
TOY = {
    "model.params": 10**9,
    "model.seq_len": 1000,
    "run.tokens": 10**8,
    "plan.batch_tokens": 10**6,
    "run.sites": 2,
    "accelerators": TOY_ACCELERATORS,
    "sites.accelerator": "toy",
    "sites.accelerators": 1,
    "sites.mfu": 0.5,
    "sites.pue": 1.0,
    "wan.link": "8gbit/0ms",
    "comm.codec": "fp32",
    "run.algorithm": "diloco",
    "outer.sync_every": 10,
    "comm.overlap": False,
}


T = 8 * 2 * wire_bytes(2_000_000_024) / (0.95 * 8e9)  # 4.361733170526 s
"""The toy's sync of the whole model: one all-gather step of two 2,000,000,024-byte halves at 95% of 8 Gbit/s."""
T_F2 = 8 * 2 * wire_bytes(1_000_000_024) / (0.95 * 8e9)  # 2.180866610526 s
"""A fragment of P=2 (5e8 values, 2e9 + 48 bytes): one all-gather step of two 1,000,000,024-byte halves (690,608
segments, 1,035,911,640 bytes on the wire each) at 95% of 8 Gbit/s."""


def toy_config(values: dict[str, Any] | None = None, /) -> Config:
    """The toy world with dotted ``values`` written over it."""
    return load_config(values=TOY | (values or {}))


def toy_spec(values: dict[str, Any] | None = None, /) -> PlanSpec:
    return plan_spec(toy_config(values))


def toy_plan(values: dict[str, Any] | None = None, /):
    return plan(toy_spec(values))


def world_70b(values: dict[str, Any] | None = None, /) -> PlanSpec:
    """70B on 3 sites of 1000 H100 (MFU 0.4) over 10 Gbit/s, 30 ms links; a 16M-token batch."""
    base = {"model.params": "70b", "model.seq_len": 8192, "run.tokens": "15t", "plan.batch_tokens": "16m",
            "run.sites": 3, "sites.accelerators": 1000, "wan.link": "10gbit/30ms", "outer.sync_every": 500,
            "comm.codec": "int4", "comm.overlap": False}
    return plan_spec(load_config(values=base | (values or {})))


# -- compute ---------------------------------------------------------------------------------------------------


def test_compute_per_step_is_six_n_b_over_achieved_flops():
    assert toy_plan().compute_step_seconds == pytest.approx(1.0)
    # 70B on 3 sites of 1000 H100 at MFU 0.4, batch 16M: 6 * 70e9 * 16e6 / 3 / (1000 * 989e12 * 0.4).
    assert plan(world_70b()).compute_step_seconds == pytest.approx(6 * 70e9 * 16e6 / 3 / (1000 * 989e12 * 0.4))


def test_measured_step_seconds_replace_the_flop_model():
    r = toy_plan({"sites.step_seconds": 0.25})
    assert r.compute_step_seconds == pytest.approx(0.25)
    # DiLoCo H=10 blocking: 100 steps of 0.25 s and 10 syncs of T.
    assert r.time_to_train_seconds == pytest.approx(100 * 0.25 + 10 * T, rel=1e-12)


def test_steps_are_whole_batches_as_the_training_loop_counts_them():
    # tokens // batch, not ceil: 100,999,999 tokens at 1e6 per step are 100 steps (ceil would say 101).
    r = toy_plan({"run.tokens": 100_999_999})
    assert r.steps == 100 and r.time_to_train_seconds == pytest.approx(100 + 10 * T, rel=1e-12)


# -- one sync over the links -----------------------------------------------------------------------------------


def test_the_toy_sync_by_hand():
    # T and T_F2 are the all-gathers written out above, and what the plan charges.
    assert T == pytest.approx(4.361733170526316, rel=1e-15) == gather(4_000_000_048, 8e9, 0.0, sites=2)
    assert T_F2 == pytest.approx(2.1808666105263157, rel=1e-15) == gather(2_000_000_048, 8e9, 0.0, sites=2)
    assert sync_comm(toy_spec()).seconds == pytest.approx(T, rel=1e-12)
    # A latency is paid twice, not per half: the announcement, then the last half's flight.
    assert sync_comm(toy_spec({"wan.link": "8gbit/20ms"})).seconds == pytest.approx(0.04 + T, rel=1e-12)


def test_fp32_among_three_sites_time_by_hand():
    # fp32 among 3 sites travels framed in a reduce-scatter: each site cuts 70e9 values into 3 chunks of
    # ceil(70e9 / 3) = 23,333,333,334 values and encodes each as 48 + 4 * 23,333,333,334 = 48 + 93,333,333,336
    # (a multiple of 8) = 93,333,333,384 bytes. The all-to-all sends one chunk to each other site, every pair at
    # once over its own 10 Gbit/s, 30 ms link (a connection paced at 95% of it): one message,
    # 0.06 + 8 * 96,685,082,928 / (0.95 * 10e9) s (64,456,722 segments). Then the ring all-gathers the encoded mean
    # chunks: 2 steps of two 46,666,666,692-byte halves (48,342,541,464 bytes on the wire each, 40.71 s, far over
    # two latencies), back to back: 0.06 + 2 * 2 * 40.71 s.
    fp32 = world_70b({"comm.codec": "fp32"})
    chunk = 93_333_333_384
    expected = message(chunk, 10e9, 0.03) + gather(chunk, 10e9, 0.03, sites=3)  # 244.377 s
    assert expected == pytest.approx(0.06 + 8 * 96_685_082_928 / (0.95 * 10e9)
                                     + 0.06 + 4 * 8 * 48_342_541_464 / (0.95 * 10e9), rel=1e-15)
    assert fp32.collective == "reduce_scatter"
    assert sync_comm(fp32).seconds == pytest.approx(expected, rel=1e-12)
    assert plan(fp32).comm_seconds_per_sync == pytest.approx(expected, rel=1e-12)
    assert plan(fp32).payload_bytes_per_sync == 3 * chunk
    assert sync_comm(fp32).bytes_sent == 4 * chunk  # 2(K-1)/K of the encoded payload leaves each site
    # Asked to all-gather, each site sends its whole payload, 48 + 280e9 bytes, in K - 1 = 2 steps: four
    # 140,000,000,024-byte halves back to back behind one announcement, the last a latency in flight.
    gathered = world_70b({"comm.codec": "fp32", "comm.pattern": "all_gather"})
    assert gathered.collective == "all_gather"
    assert sync_comm(gathered).seconds == pytest.approx(0.06 + 4 * 8 * wire_bytes(140_000_000_024) / (0.95 * 10e9),
                                                        rel=1e-12)  # 488.574 s
    assert sync_comm(gathered).bytes_sent == 2 * 280_000_000_048


def test_dense_lossy_codec_among_three_sites_scatters_its_chunks_at_once_then_gathers_one_around_the_ring():
    # int4 among 3 sites: each site cuts 70e9 values into 3 chunks of ceil(70e9 / 3) = 23,333,333,334 values
    # and encodes each: 48 header + pad8(4 * ceil(23,333,333,334 / 256) = 4 * 91,145,834 = 364,583,336)
    # + pad8(ceil(23,333,333,334 / 2) = 11,666,666,667 -> 11,666,666,672) = 12,031,250,056 bytes per chunk
    # (8,308,875 segments, 12,463,311,556 bytes on the wire).
    # The all-to-all sends the 2 chunks for the other sites at once, each over its own link: one message,
    # 0.06 + 8 * 12,463,311,556 / (0.95 * 10e9) = 10.56 s, not 2 steps after one another as around a ring.
    # Then the ring all-gathers the re-encoded means: 2 steps of one chunk in two 6,015,625,028-byte halves
    # (6,231,655,804 bytes on the wire each, 5.25 s, far over 2 latencies): 0.06 + 4 * 5.25 = 21.05 s.
    spec = world_70b()
    chunk = 12_031_250_056
    assert spec.collective == "reduce_scatter"
    cost = sync_comm(spec)
    scatter = 0.06 + 8 * 12_463_311_556 / (0.95 * 10e9)
    assert scatter == pytest.approx(message(chunk, 10e9, 0.03), rel=1e-15)
    expected = scatter + 0.06 + 4 * 8 * 6_231_655_804 / (0.95 * 10e9)  # 31.61 s
    assert expected == pytest.approx(scatter + gather(chunk, 10e9, 0.03, sites=3), rel=1e-15)
    assert cost.seconds == pytest.approx(expected, rel=1e-12)
    # The chunks leave in one message over each pair: less than the 2 sequential steps a ring would take.
    assert cost.seconds < 2 * scatter + gather(chunk, 10e9, 0.03, sites=3)
    assert cost.bytes_sent == 4 * chunk
    r = plan(spec)
    assert r.collective == "reduce_scatter"
    assert r.payload_bytes_per_sync == 3 * chunk
    assert r.comm_seconds_per_sync == pytest.approx(expected, rel=1e-12)


def test_slowest_link_sets_the_all_to_all_and_the_ring():
    spec = toy_spec({"run.sites": 3, "wan.links": [{"between": [0, 2], "link": "1gbit/50ms"}]})
    # fp32 among 3 sites reduce-scatters chunks of ceil(1e9 / 3) = 333,333,334 values, 48 + 1,333,333,336
    # (a multiple of 8) = 1,333,333,384 bytes each. The all-to-all lasts as long as its slowest pair, 0 and 2:
    # one chunk over 1 Gbit/s, 50 ms. The ring 0 -> 1 -> 2 -> 0 crosses that link on its last hop, and is
    # charged as if it were everywhere: 2 steps of a chunk in two 666,666,692-byte halves (5.8 s each at 95% of
    # 1 Gbit/s, far over two latencies).
    expected = message(1_333_333_384, 1e9, 0.05) + gather(1_333_333_384, 1e9, 0.05, sites=3)  # 35.09 s
    assert expected == pytest.approx(0.1 + 8 * wire_bytes(1_333_333_384) / (0.95 * 1e9)
                                     + 0.1 + 4 * 8 * wire_bytes(666_666_692) / (0.95 * 1e9), rel=1e-15)
    assert sync_comm(spec).seconds == pytest.approx(expected, rel=1e-12)
    # Named sites work the same way.
    named = toy_spec({"run.sites": 3, "sites.names": ["a", "b", "c"],
                      "wan.links": [{"between": ["c", "a"], "link": "1gbit/50ms"}]})
    assert sync_comm(named).seconds == pytest.approx(expected, rel=1e-12)


def test_workers_share_their_site_link():
    # 4 workers per site each carry a quarter shard (2.5e8 values: 48 + 1e9 = 1,000,000,048 bytes) over the
    # site's link, as 4 streams of 2 Gbit/s: 1 all-gather step of two 500,000,024-byte halves (345,304 segments,
    # 517,955,832 bytes on the wire each) at 95% of that: 8 * 2 * 517,955,832 / (0.95 * 2e9) = 4.361733322 s, the
    # time of one worker with it all (T) plus that of the 3 more codec headers (the 8 halves need as many segments
    # as the 2 do).
    r = toy_plan({"run.workers_per_site": 4})
    assert r.payload_bytes_per_sync == 1_000_000_048  # one worker's share
    assert r.comm_seconds_per_sync == pytest.approx(8 * 2 * 517_955_832 / (0.95 * 2e9), rel=1e-12)
    assert r.comm_seconds_per_sync == pytest.approx(gather(1_000_000_048, 8e9, 0.0, sites=2, streams=4), rel=1e-12)
    assert r.comm_seconds_per_sync - T == pytest.approx(8 * 3 * 48 / (0.95 * 8e9), rel=1e-6)
    assert r.sites[0].bytes_per_sync == 4 * 1_000_000_048  # the site: 4 workers * 1 step * 1,000,000,048 bytes
    # the bytes of one worker per site (2 * 10 * 4,000,000,048) and 3 more headers per site and sync
    assert r.wan_bytes == pytest.approx(2 * 10 * 4 * 1_000_000_048, rel=1e-12)


# -- periods, overlap and the end of the run -----------------------------------------------------------------


# The toy: 100 steps of 1 s, T = 4.361733170526 s for the whole model; a fragment of P=2 (5e8 values, 2e9 + 48
# bytes) takes T_F2 = 2.180866610526 s.
@pytest.mark.parametrize(
    ("values", "wall"),
    [
        # ddp: every step syncs: 100 * (1 + T).
        ({"run.algorithm": "ddp"}, 100 * (1 + T)),
        # DiLoCo H=10: 100 s of compute and 10 blocking syncs of T.
        ({}, 100 + 10 * T),
        # H=7: the last, partial round syncs too: ceil(100 / 7) = 15 syncs.
        ({"outer.sync_every": 7}, 100 + 15 * T),
        # Overlapped: each T sync hides behind the next round's 10 s, except the last, which ends the run.
        ({"comm.overlap": True}, 100 + T),
        # Overlapped but H=2: a round lasts as long as its sync (T - 2 s exposed in each of 50 periods); the
        # last sync's remaining T - (T - 2) = 2 s come on top.
        ({"outer.sync_every": 2, "comm.overlap": True}, 100 + 50 * (T - 2) + 2),
        # Streaming H=10, P=2, tau=0: fragment 0 syncs after steps 10, 20, ..., 90 and fragment 1 after 5, 15,
        # ..., 95: 19 blocking syncs of T_F2; at the last step both fragments sync once more, at once: one sync
        # of the whole model, T.
        ({"run.algorithm": "streaming", "streaming.fragments": 2, "streaming.overlap_steps": 0},
         100 + 19 * T_F2 + T),
        # ... with tau=1 one second of each T_F2 sync hides behind one inner step.
        ({"run.algorithm": "streaming", "streaming.fragments": 2, "streaming.overlap_steps": 1},
         100 + 19 * (T_F2 - 1) + T),
        # ... with tau=3 all of it hides; the final sync of both fragments still stalls.
        ({"run.algorithm": "streaming", "streaming.fragments": 2, "streaming.overlap_steps": 3}, 100 + T),
    ],
    ids=["ddp", "diloco", "diloco-partial-round", "diloco-overlap", "diloco-overlap-h2", "streaming-tau0",
         "streaming-tau1", "streaming-tau3"],
)
def test_overlap_hiding_by_hand(values, wall):
    r = toy_plan(values)
    assert r.steps == 100
    assert r.time_to_train_seconds == pytest.approx(wall, rel=1e-12)
    assert r.step_seconds == pytest.approx(wall / 100)
    assert r.utilization == pytest.approx(100 / wall)
    assert r.hidden_seconds_per_sync + r.exposed_seconds_per_sync == pytest.approx(r.comm_seconds_per_sync)


def test_overlap_on_ddp_or_streaming_is_refused():
    # DDP needs every step's gradient before its optimizer step; streaming overlaps through tau.
    for algorithm in ("ddp", "streaming"):
        with pytest.raises(ConfigError) as info:
            toy_spec({"run.algorithm": algorithm, "comm.overlap": True})
        assert info.value.field == "comm.overlap"


def test_streaming_cannot_outrun_its_link():
    # 1 Gbit/s, P=10: a fragment (1e8 values, 4e8 + 48 bytes, all-gathered in one step as two 200,000,024-byte
    # halves of 138,122 segments, 207,182,368 bytes on the wire) takes 8 * 2 * 207,182,368 / (0.95 * 1e9) =
    # 3.489387251 s but a fragment is due every step (1 s). tau=5 would hide it, yet the link carries one
    # fragment at a time: a period lasts 3.489387251 s, 2.489387251 s of it exposed. Fragment 0 syncs after steps
    # 10, ..., 90 (9), fragments 1..9 after p, p + 10, ..., p + 90 (10 each): 99 periods; then one final sync of
    # every fragment at once: the whole model, 4e9 + 48 bytes, 8 * 2 * 2,071,823,256 / (0.95 * 1e9) =
    # 34.893865364 s (on a link without latency, as long as 10 fragment syncs but for their 9 more codec headers
    # and 8 more segments).
    r = toy_plan({"run.algorithm": "streaming", "streaming.fragments": 10, "streaming.overlap_steps": 5,
                  "wan.link": "1gbit/0ms"})
    fragment, whole = 8 * 2 * 207_182_368 / (0.95 * 1e9), 8 * 2 * 2_071_823_256 / (0.95 * 1e9)
    assert fragment == pytest.approx(gather(400_000_048, 1e9, 0.0, sites=2), rel=1e-15)
    assert whole == pytest.approx(8 * T, rel=1e-15)
    assert 10 * fragment - whole == pytest.approx(8 * (9 * 48 + 8 * 52) / (0.95 * 1e9), rel=1e-6)
    assert r.comm_seconds_per_sync == pytest.approx(fragment, rel=1e-12)
    assert r.exposed_seconds_per_sync == pytest.approx(fragment - 1, rel=1e-12)
    assert r.hidden_seconds_per_sync == pytest.approx(1.0, rel=1e-12)
    wall = 100 + 99 * (fragment - 1) + whole  # 381.3 s
    assert r.time_to_train_seconds == pytest.approx(wall, rel=1e-12)
    assert r.utilization == pytest.approx(100 / wall)
    assert r.syncs == 99 + 1


def test_fragment_peak_bandwidth_is_p_times_lower():
    # 1000 steps. Each site sends its whole 4e9 + 48-byte payload once per DiLoCo sync (one all-gather step);
    # in one 1 s step: 8 * 4,000,000,048 = 32,000,000,384 bit/s.
    diloco = toy_plan({"run.tokens": 10**9, "outer.sync_every": 100})
    assert diloco.peak_bandwidth_bps == pytest.approx(32_000_000_384, rel=1e-12)
    # Four fragments (2.5e8 values, 1e9 + 48 bytes each) each send a quarter (and a header) in the same one-step
    # window: 8 * 1,000,000,048 = 8,000,000,384 bit/s, 4 times less but for the headers.
    values = {"run.tokens": 10**9, "outer.sync_every": 100, "run.algorithm": "streaming",
              "streaming.fragments": 4, "streaming.overlap_steps": 0}
    streaming = toy_plan(values)
    assert streaming.peak_bandwidth_bps == pytest.approx(8_000_000_384, rel=1e-12)
    assert diloco.peak_bandwidth_bps / streaming.peak_bandwidth_bps == pytest.approx(4)
    # Total bytes: DiLoCo syncs 10 times (2 sites * 10 * 4,000,000,048). Streaming syncs fragment 0 after steps
    # 100..900 (9) and fragments 1-3 after 25 + 100j (10 each) on its schedule, then every fragment at once at
    # the end (one sync of 4,000,000,048 bytes): 40 syncs, 2 * (39 * 1,000,000,048 + 4,000,000,048) =
    # 2 * (43e9 + 40 * 48) bytes, the same bytes as DiLoCo (2 * (40e9 + 10 * 48)) plus P - 1 = 3 fragments
    # and 30 more headers.
    assert diloco.syncs == 10 and streaming.syncs == 39 + 1
    assert diloco.wan_bytes == pytest.approx(2 * 10 * 4_000_000_048, rel=1e-12)
    assert streaming.wan_bytes == pytest.approx(2 * (39 * 1_000_000_048 + 4_000_000_048), rel=1e-12)
    assert streaming.wan_bytes - diloco.wan_bytes == pytest.approx(2 * (3 * 1e9 + 30 * 48), rel=1e-9)
    # Overlapped DiLoCo spreads its sync over the next H=100 steps: 8 * 4,000,000,048 / 100 bit/s; streaming
    # with tau=5 spreads a fragment over 5.
    over = toy_plan({"run.tokens": 10**9, "outer.sync_every": 100, "comm.overlap": True})
    assert over.peak_bandwidth_bps == pytest.approx(8 * 4_000_000_048 / 100, rel=1e-12)
    assert toy_plan(values | {"streaming.overlap_steps": 5}).peak_bandwidth_bps == pytest.approx(
        8 * 1_000_000_048 / 5, rel=1e-12)


def test_wan_bytes_and_time_to_train():
    # 100 steps, 10 DiLoCo syncs, each site sending its 4e9 + 48-byte payload once per sync, in T.
    r = toy_plan()
    assert r.steps == 100 and r.syncs == 10
    assert r.wan_bytes == pytest.approx(10 * 2 * 4_000_000_048, rel=1e-12)
    assert r.time_to_train_seconds == pytest.approx(100 + 10 * T, rel=1e-12)
    # ddp with bf16 between 2 sites all-gathers: each site sends its whole encoded gradient once per step,
    # 48 + 2 * 1e9 = 2,000,000,048 bytes, in two 1,000,000,024-byte halves: T_F2 = 2.180866610526 s.
    ddp = toy_plan({"run.algorithm": "ddp", "comm.codec": "bf16"})
    assert ddp.collective == "all_gather"
    assert ddp.syncs == 100 and ddp.wan_bytes == pytest.approx(100 * 2 * 2_000_000_048)
    assert ddp.time_to_train_seconds == pytest.approx(100 * (1 + T_F2), rel=1e-12)


# 1e9 values; every codec between 2 sites is all-gathered: a site sends its encoded payload once, in two halves.
#   fp32       48 + 4e9                                                                         = 4,000,000,048
#   bf16       48 + 2e9                                                                         = 2,000,000,048
#   int8       48 + 4 * (1e9 / 256 = 3,906,250) scales + 1e9 codes = 48 + 15,625,000 + 1e9      = 1,015,625,048
#   int4       48 + 15,625,000 + 5e8                                                            =   515,625,048
# top-k keeps ceil(0.01 * 4096) = 41 of each 4096-value chunk: 244,140 full chunks and a last chunk of 2,560
# values keeping ceil(41 * 2560 / 4096) = 26: 10,009,766 entries, with uint16 indices (20,019,532 bytes,
# pad8 -> 20,019,536):
#   topk       + fp32 values 40,039,064                                        48 + 20,019,536 + 40,039,064 = 60,058,648
#   topk+bf16  + bf16 values pad8(20,019,532) = 20,019,536                     48 + 20,019,536 + 20,019,536 = 40,039,120
#   topk+int8  + scales pad8(4 * ceil(10,009,766 / 256) = 156,404) = 156,408, codes pad8(10,009,766) = 10,009,768
#                                                                              48 + 20,019,536 + 10,166,176 = 30,185,760
#   topk+int4  + scales 156,408, codes pad8(5,004,883) = 5,004,888             48 + 20,019,536 +  5,161,296 = 25,180,880
@pytest.mark.parametrize(
    ("codec", "nbytes"),
    [("fp32", 4_000_000_048), ("bf16", 2_000_000_048), ("int8", 1_015_625_048), ("int4", 515_625_048),
     ("topk", 60_058_648), ("topk+bf16", 40_039_120), ("topk+int8", 30_185_760), ("topk+int4", 25_180_880)],
)
def test_codec_payloads_are_the_exact_encoded_sizes(codec, nbytes):
    r = toy_plan({"comm.codec": codec})
    assert r.sites[0].bytes_per_sync == nbytes
    # 1 step of all of it: both halves with their headers, no latency
    half = nbytes // 2
    assert r.comm_seconds_per_sync == pytest.approx(8 * (wire_bytes(half) + wire_bytes(nbytes - half)) / (0.95 * 8e9),
                                                    rel=1e-12)
    assert r.wan_bytes == pytest.approx(2 * 10 * nbytes, rel=1e-12)
    assert r.codec_bits == pytest.approx(8 * nbytes / 1e9, rel=1e-12)  # the header counts, fp32's too


def test_topk_fraction_sets_the_kept_share():
    # 5%: ceil(0.05 * 4096) = ceil(204.8) = 205 per chunk, and ceil(205 * 2560 / 4096) = 129 of the last:
    # 244,140 * 205 + 129 = 50,048,829 entries; indices pad8(100,097,658) = 100,097,664, fp32 values
    # pad8(200,195,316) = 200,195,320; with the header 300,293,032 bytes.
    r = toy_plan({"comm.codec": "topk", "comm.topk_fraction": 0.05})
    assert r.payload_bytes_per_sync == 300_293_032
    # Among 3 sites a sparse payload is still all-gathered: 2 steps, each carrying a whole payload as two
    # 150,146,516-byte halves (103,693 segments, 155,538,552 bytes on the wire), back to back on a link
    # without latency.
    three = toy_plan({"comm.codec": "topk", "comm.topk_fraction": 0.05, "run.sites": 3})
    assert three.collective == "all_gather"
    assert three.sites[0].bytes_per_sync == 2 * 300_293_032
    assert three.comm_seconds_per_sync == pytest.approx(2 * 2 * 8 * 155_538_552 / (0.95 * 8e9), rel=1e-12)
    assert three.comm_seconds_per_sync == pytest.approx(gather(300_293_032, 8e9, 0.0, sites=3), rel=1e-12)


def test_dense_lossy_bytes_among_three_sites():
    # int8 among 3 sites reduce-scatters: chunks of ceil(1e9 / 3) = 333,333,334 values, encoded as
    # 48 + pad8(4 * ceil(333,333,334 / 256) = 4 * 1,302,084 = 5,208,336) + pad8(333,333,334) = 333,333,336
    # = 338,541,720 bytes. A worker hands over 3 chunks and sends 2 of them plus 2 re-encoded means. Without
    # latency: the 2 chunks leave at once, each over its own link (one chunk's time, 233,800 segments,
    # 350,699,320 bytes on the wire), then 2 ring steps of a mean in two 169,270,860-byte halves (116,900
    # segments, 175,349,660 bytes on the wire each).
    r = toy_plan({"comm.codec": "int8", "run.sites": 3})
    assert r.collective == "reduce_scatter"
    assert r.payload_bytes_per_sync == 3 * 338_541_720
    assert r.sites[0].bytes_per_sync == 4 * 338_541_720
    expected = 8 * 350_699_320 / (0.95 * 8e9) + 2 * 2 * 8 * 175_349_660 / (0.95 * 8e9)  # 1.107 s
    assert expected == pytest.approx(message(338_541_720, 8e9, 0.0) + gather(338_541_720, 8e9, 0.0, sites=3),
                                     rel=1e-15)
    assert r.comm_seconds_per_sync == pytest.approx(expected, rel=1e-12)
    # comm.pattern = "all_gather" sends every whole payload instead: 2 * 1,015,625,048 bytes per site.
    gathered = toy_plan({"comm.codec": "int8", "run.sites": 3, "comm.pattern": "all_gather"})
    assert gathered.collective == "all_gather"
    assert gathered.sites[0].bytes_per_sync == 2 * 1_015_625_048


# -- settings the plan chooses as a run does -----------------------------------------------------------------


def test_unset_overlap_is_chosen_as_a_run_chooses_it():
    # A blocking 4.36 s sync (T) would stall 44% of a 10 s round (more than 2%): overlap goes on, and the plan is
    # the overlapped one: 100 s + the last sync's T.
    r = toy_plan({"comm.overlap": None})
    assert [(a.key, a.value) for a in r.auto] == [("comm.overlap", True)]
    assert r.algorithm == "diloco H=10+overlap"
    assert r.time_to_train_seconds == pytest.approx(100 + T, rel=1e-12)
    assert r.to_dict()["auto"][0]["key"] == "comm.overlap" and r.to_dict()["auto"][0]["reason"]
    # At 32 Gbit/s and H=100 a sync takes T / 4 = 1.090433293 s, under 2% of a 100 s round: overlap stays off.
    # One blocking sync in 100 steps: 101.090433293 s.
    fast = toy_plan({"comm.overlap": None, "outer.sync_every": 100, "wan.link": "32gbit/0ms"})
    assert [(a.key, a.value) for a in fast.auto] == [("comm.overlap", False)]
    assert fast.time_to_train_seconds == pytest.approx(100 + T / 4, rel=1e-12)
    assert T / 4 == pytest.approx(1.090433292631579, rel=1e-15)
    # A setting the configuration gives is never chosen.
    assert toy_plan().auto == []


def test_unset_tau_covers_the_fragment_transfer_with_a_margin():
    # P=2: a fragment takes T_F2 = 2.180866611 s; tau is the fewest 1 s steps that cover 2 * T_F2 =
    # 4.361733221 s: 5, and with tau = 5 each sync hides (the final sync of both fragments at once, T, stalls):
    # 100 + T.
    r = toy_plan({"run.algorithm": "streaming", "streaming.fragments": 2})
    assert [(a.key, a.value) for a in r.auto] == [("streaming.overlap_steps", 5)]
    assert r.time_to_train_seconds == pytest.approx(100 + T, rel=1e-12)
    # At 1 Gbit/s, H=4: a fragment takes 8 * T_F2 = 17.446932884 s; tau stops at H - 1 = 3.
    slow = toy_plan({"run.algorithm": "streaming", "streaming.fragments": 2, "outer.sync_every": 4,
                     "wan.link": "1gbit/0ms"})
    assert [(a.key, a.value) for a in slow.auto] == [("streaming.overlap_steps", 3)]
    assert "raise outer.sync_every" in slow.auto[0].reason


# -- energy and power ------------------------------------------------------------------------------------------


def test_energy_by_hand():
    # One site, no links: 1000 H100 at 700 W and PUE 1.2 draw 0.84 MW; 1e8 tokens at 1e6 per step on
    # 1000 * 989e12 * 0.4 FLOP/s.
    config = load_config(values={"model.params": 10**9, "model.seq_len": 1000, "run.tokens": 10**8,
                                 "plan.batch_tokens": 10**6, "run.sites": 1, "run.algorithm": "ddp",
                                 "sites.accelerator": "H100", "sites.accelerators": 1000, "sites.mfu": 0.4,
                                 "sites.pue": 1.2})
    r = plan(plan_spec(config))
    seconds = 100 * 6 * 1e9 * 1e6 / (1000 * 989e12 * 0.4)
    assert r.time_to_train_seconds == pytest.approx(seconds)
    assert r.utilization == pytest.approx(1.0)
    assert r.energy_mwh == pytest.approx(1000 * 700 * 1.2 * seconds / 3.6e9)
    assert r.sites[0].power_mw == pytest.approx(0.84)


def test_energy_sums_over_sites():
    r = toy_plan({"sites.watts": 2000.0})
    # Two sites of one 2 kW accelerator at PUE 1 for 100 + 10 T = 143.61733170526 s.
    assert r.energy_mwh == pytest.approx(2 * 2000 * (100 + 10 * T) / 3.6e9, rel=1e-12)
    assert sum(s.energy_mwh for s in r.sites) == pytest.approx(r.energy_mwh)


def h100_site(**values: Any):
    config = load_config(values={"run.sites": 1, "sites.accelerator": "H100", "model.params": 10**9,
                                 "run.tokens": 10**12, "plan.batch_tokens": 10**6} | values)
    return plan_spec(config).sites[0]


def test_accelerators_under_a_power_cap():
    # floor(300e6 / (700 * 1.2)) = floor(357142.86) = 357142
    site = h100_site(**{"sites.power_cap_mw": 300, "sites.pue": 1.2})
    assert site.powered_under_cap == 357142
    assert site.accelerators == 357142  # no count given: fill the cap
    # An exact quotient does not lose one to rounding: 0.84 MW / 840 W = 1000.
    assert h100_site(**{"sites.power_cap_mw": 0.84, "sites.pue": 1.2}).powered_under_cap == 1000
    # 300e6 / (1000 * 1.25) = 240,000 B200.
    assert h100_site(**{"sites.accelerator": "B200", "sites.power_cap_mw": 300,
                        "sites.pue": 1.25}).powered_under_cap == 240000
    # Without a cap and a count: one accelerator per worker.
    assert h100_site(**{"run.workers_per_site": 3}).accelerators == 3
    assert h100_site().powered_under_cap is None


def test_a_cap_too_small_for_one_accelerator_is_refused():
    with pytest.raises(ConfigError) as info:
        h100_site(**{"sites.power_cap_mw": 0.0005})  # 500 W < 700 W * 1.2
    assert info.value.field == "sites.power_cap_mw" and "cannot power one H100" in str(info.value)


def test_caps_respected_flag():
    assert toy_plan({"sites.power_cap_mw": 0.0015}).caps_respected is True  # one 1 kW accelerator, 1.5 kW cap
    config = load_config(values={
        "model.params": 10**9, "model.seq_len": 1000, "run.tokens": 10**8, "plan.batch_tokens": 10**6,
        "site": [{"name": "a", "accelerators": 400_000, "power_cap_mw": 300},
                 {"name": "b", "accelerators": 1000, "power_cap_mw": 300}],
        "wan.link": "10gbit/10ms",
    })
    r = plan(plan_spec(config))
    assert r.caps_respected is False
    assert [s.cap_respected for s in r.sites] == [False, True]
    assert r.accelerators_powered == [357142, 357142]  # H100 at PUE 1.2 by default
    assert any("over the 300 MW cap" in n for n in r.notes)


def test_slowest_site_gates_sync():
    spec = toy_spec({"site": [{"name": "fast"}, {"name": "slow", "mfu": 0.25}]})  # the slow site: 2 s per step
    r = plan(spec)
    assert r.compute_step_seconds == pytest.approx(2.0)
    # 100 steps of 2 s and 10 syncs of T: 243.61733170526 s; the fast site computes 100 s of it, the slow one 200 s.
    wall = 200 + 10 * T
    assert r.step_seconds == pytest.approx(wall / 100, rel=1e-12)
    assert [s.utilization for s in r.sites] == pytest.approx([100 / wall, 200 / wall], rel=1e-12)
    assert r.utilization == pytest.approx((100 / wall + 200 / wall) / 2, rel=1e-12)
    # Balancing the batch by throughput gives the fast site 2/3 of it: both compute 4/3 s per step,
    # 133.3 s of 133.3 + 10 T s.
    b = plan(toy_spec({"site": [{"name": "fast"}, {"name": "slow", "mfu": 0.25}], "sites.balance": "throughput"}))
    assert b.compute_step_seconds == pytest.approx(4 / 3)
    assert [s.utilization for s in b.sites] == pytest.approx([(400 / 3) / (400 / 3 + 10 * T)] * 2, rel=1e-12)


def test_single_site_has_no_wan_traffic():
    r = toy_plan({"run.algorithm": "ddp", "run.sites": 1})
    assert r.wan_bytes == 0 and r.syncs == 0 and r.utilization == pytest.approx(1.0)
    assert r.time_to_train_seconds == pytest.approx(100 * 2.0)  # one site computes the whole batch: 2 s a step


# -- bad inputs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "field_", "words"),
    [
        ({"site": [{"name": "x", "mfu": 1.2}, {"name": "y"}]}, "site[x].mfu", "(0, 1]"),
        ({"site": [{"name": "x", "pue": 0.9}, {"name": "y"}]}, "site[x].pue", "[1, 10]"),
        ({"site": [{"name": "x", "power_cap_mw": -5}, {"name": "y"}]}, "site[x].power_cap_mw", "(0,"),
        ({"site": [{"name": "x", "watts": -700}, {"name": "y"}]}, "site[x].watts", "[1, 1e+06]"),
        ({"sites.accelerator": "H10"}, "sites.accelerator", "did you mean 'H100'"),
        ({"site": [{"name": "x", "accelerator": "H10"}, {"name": "y"}]}, "site[x].accelerator", "did you mean 'H100'"),
        ({"model.params": -1}, "model.params", "from 1"),
        ({"run.algorithm": "dilco"}, "run.algorithm", "did you mean 'diloco'"),
        ({"run.algorithm": "streaming", "outer.sync_every": 4, "streaming.fragments": 8}, "streaming.fragments",
         "fragments <= outer.sync_every"),
        ({"run.algorithm": "streaming", "outer.sync_every": 4, "streaming.overlap_steps": 4},
         "streaming.overlap_steps", "smaller"),
        ({"outer.sync_every": 0}, "outer.sync_every", "at least 1"),
        ({"comm.codec": "int3"}, "comm.codec", "unknown codec"),
        ({"comm.codec": "fp16"}, "comm.codec", "unknown codec"),  # the former planner's codecs are gone
        ({"comm.codec": "fp4"}, "comm.codec", "not enabled"),
        ({"comm.codec": "topk:0.01"}, "comm.codec", "did you mean 'topk'"),
        ({"comm.codec": "topk", "comm.topk_fraction": 2}, "comm.topk_fraction", "(0, 1]"),
        ({"sites.balance": "fair"}, "sites.balance", "equal, throughput"),
        ({"accelerators": {"TPU": {"watts": 300}}, "sites.accelerator": "TPU"}, "accelerators.TPU", "peak_flops"),
        ({"wan.link": "10gbit"}, "wan.link", "cannot parse link"),
        ({"run.sites": 0}, "run.sites", "at least 1 site"),
    ],
)
def test_bad_inputs_raise_config_error(values, field_, words):
    with pytest.raises(ConfigError) as info:
        toy_spec(values)
    assert info.value.field == field_
    assert words in str(info.value)


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [("mfu", 1.2, "(0, 1]"), ("mfu", 0, "(0, 1]"), ("pue", 0.9, "[1, 10]"), ("power_cap_mw", -5, "(0,"),
     ("watts", -700, "[1, 1e+06]"), ("accelerators", 0, "from 1"), ("step_seconds", -1, "(0,")],
)
def test_bad_site_defaults_raise_config_error_naming_the_key(key, value, words):
    with pytest.raises(ConfigError) as info:
        toy_spec({f"sites.{key}": value})
    assert key in str(info.value) and words in str(info.value)


def test_bad_site_defaults_name_the_dotted_key():
    with pytest.raises(ConfigError) as info:
        toy_spec({"sites.mfu": 1.2})
    assert info.value.field == "sites.mfu"


def test_a_batch_smaller_than_one_sequence_is_refused():
    with pytest.raises(ConfigError) as info:
        toy_spec({"plan.batch_tokens": 100})
    assert info.value.field == "plan.batch_tokens"


# -- presets and the result ------------------------------------------------------------------------------------


def test_accelerator_presets_are_the_datasheet_figures():
    from geotrain.hardware import ACCELERATORS, resolve_accelerator

    assert {k: (a.peak_flops, a.watts) for k, a in ACCELERATORS.items()} == {
        "A100": (312e12, 400.0),
        "H100": (989e12, 700.0),
        "H200": (989e12, 700.0),
        "B200": (2.25e15, 1000.0),
    }
    assert all(a.source for a in ACCELERATORS.values())
    assert resolve_accelerator("h100").name == "H100"  # case-insensitive
    assert h100_site(**{"sites.accelerator": "b200"}).accelerator.name == "B200"


def test_configured_accelerators_define_new_ones_and_override_presets():
    spec = toy_spec({"accelerators": TOY_ACCELERATORS | {"H100": {"watts": 1275}},
                     "site": [{"name": "a"}, {"name": "b", "accelerator": "h100"}]})
    assert (spec.sites[0].accelerator.name, spec.sites[0].peak_flops, spec.sites[0].watts) == ("toy", 6e15, 1000.0)
    assert (spec.sites[1].accelerator.name, spec.sites[1].peak_flops, spec.sites[1].watts) == ("H100", 989e12, 1275)
    # A site's own watts or peak_flops win over its accelerator's.
    own = toy_spec({"site": [{"name": "a", "watts": 500, "peak_flops": 3e15}, {"name": "b"}]})
    assert (own.sites[0].watts, own.sites[0].peak_flops) == (500, 3e15)
    assert own.sites[1].watts == 1000.0


def test_link_presets():
    from geotrain.topology import LINK_PRESETS, parse_link

    assert {k: str(parse_link(v)) for k, v in LINK_PRESETS.items()} == {
        "metro": "400gbit/1ms", "cross-country": "100gbit/30ms", "intercontinental": "10gbit/75ms",
        "internet": "1gbit/50ms"}
    link = toy_spec({"wan.link": "metro"}).topology.link(0, 1)
    assert (link.bandwidth_bps, link.latency_s) == (400e9, 0.001)
    added = toy_spec({"wan.link": "metro", "wan.presets": {"metro": "800gbit/2ms"}}).topology.link(0, 1)
    assert (added.bandwidth_bps, added.latency_s) == (800e9, 0.002)


def test_result_dict_has_the_contract_keys():
    d = toy_plan().to_dict()
    for key in ("utilization", "step_seconds", "time_to_train_seconds", "time_to_train_days", "wan_bytes",
                "peak_bandwidth_bps", "energy_mwh", "accelerators_powered", "caps_respected", "per_site",
                "collective", "payload_bytes_per_sync", "auto", "steps", "syncs", "comm_seconds_per_sync",
                "hidden_seconds_per_sync", "exposed_seconds_per_sync", "notes"):
        assert key in d, key
    assert all(math.isfinite(v) for v in (d["utilization"], d["step_seconds"], d["energy_mwh"]))
    assert d["time_to_train_days"] == pytest.approx((100 + 10 * T) / 86400, rel=1e-12)
    assert len(d["per_site"]) == 2 and d["per_site"][0]["name"] == "site0"


# -- a plan of a run's own configuration ------------------------------------------------------------------------

RUN_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.toml") if not p.name.startswith("plan-"))


@pytest.mark.parametrize("n_layer", [1, 2, 5])
def test_model_layout_is_the_demo_gpts_parameters(n_layer):
    from geotrain.config import ModelConfig
    from geotrain.models.gpt import init_gpt

    cfg = ModelConfig(n_layer=n_layer, n_head=2, d_model=16, seq_len=24)
    model = init_gpt(cfg, seed=0)
    real = [(name, p.numel()) for name, p in model.named_parameters() if p.requires_grad]
    assert cfg.layout() == real
    # By hand for d = 16, seq 24: 256 * 16 + 24 * 16 embeddings, per block 2 LayerNorms (4 * 16), qkv
    # (3 * 256 + 48), out proj (256 + 16), MLP (4 * 256 + 64, 4 * 256 + 16), and the final LayerNorm (32).
    per_block = 4 * 16 + (3 * 256 + 48) + (256 + 16) + (4 * 256 + 64) + (4 * 256 + 16)
    assert sum(n for _, n in cfg.layout()) == 256 * 16 + 24 * 16 + n_layer * per_block + 32


def test_demo_layout_by_hand():
    # d = 128, seq 128, 2 layers: 32,768 + 16,384 embeddings, 2 * 198,272 per block, 256 for ln_f: 445,952.
    config = load_config(ROOT / "configs" / "demo.toml")
    assert config.layout().params == 445_952
    assert plan_spec(config).model.params == 445_952


def _run_payloads(config: Config) -> list[int]:
    """The values of each sync as the run's strategy sends them, from the real demo GPT."""
    from geotrain.algorithms.streaming import split_fragments
    from geotrain.models.gpt import init_gpt

    model = init_gpt(config.model, seed=config.run.seed)
    named = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
    if config.run.algorithm != "streaming":
        return [sum(n for _, n in named)]
    groups = split_fragments([n for n, _ in named], config.streaming.fragments, [n for _, n in named])
    return [sum(named[i][1] for i in g) for g in groups]


def _encoded_bytes(codec: str, numel: int) -> int:
    """The bytes the real (torch) codec produces for ``numel`` values."""
    import torch

    from geotrain.comm.codecs import get_codec

    return get_codec(codec).encode(torch.zeros(numel)).numel()


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_plan_of_a_run_config_predicts_the_bytes_the_run_sends(path):
    from geotrain.models.gpt import init_gpt

    config = load_config(path)
    real = [(n, p.numel()) for n, p in init_gpt(config.model, seed=0).named_parameters() if p.requires_grad]
    assert config.model.layout() == real
    r = plan(plan_spec(config))
    k, w, codec = config.run.sites, config.run.workers_per_site, config.comm.codec
    # Every codec travels framed, fp32 included: a dense codec among 3+ sites reduce-scatters encoded chunks;
    # otherwise (2 sites, or top-k) every site all-gathers its whole encoded payload.
    collective = "reduce_scatter" if k >= 3 and not codec.startswith("topk") else "all_gather"
    assert r.collective == collective
    expected = 0
    for n in _run_payloads(config):
        shard = -(-n // w)  # each worker carries a 1/W shard
        if collective == "reduce_scatter":
            expected += k * _encoded_bytes(codec, -(-shard // k))  # one encoded chunk per site
        else:
            expected += _encoded_bytes(codec, shard)
    assert r.payload_bytes_per_sync == expected


def test_shipped_run_configs_payloads_by_hand():
    # demo: fp32 among 4 sites, a reduce-scatter of chunks of ceil(445,952 / 4) = 111,488 values:
    # 48 + 4 * 111,488 = 48 + 445,952 (a multiple of 8) = 446,000 bytes each.
    demo = plan(plan_spec(load_config(ROOT / "configs" / "demo.toml")))
    assert demo.collective == "reduce_scatter"
    assert demo.payload_bytes_per_sync == 4 * 446_000
    # uneven-links: int8 among 3 sites, reduce-scatter of chunks of ceil(445,952 / 3) = 148,651 values:
    # 48 + pad8(4 * ceil(148,651 / 256) = 4 * 581 = 2,324) = 2,328 + pad8(148,651) = 148,656 -> 151,032 bytes.
    uneven = plan(plan_spec(load_config(ROOT / "configs" / "uneven-links.toml")))
    assert uneven.collective == "reduce_scatter"
    assert uneven.payload_bytes_per_sync == 3 * 151_032
