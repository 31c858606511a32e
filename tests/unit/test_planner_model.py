"""Formula tests of the planner's cost model against cases computed by hand (acceptance A of issue 4)."""

from __future__ import annotations

import math

import pytest

from geotrain.errors import ConfigError
from geotrain.planner.model import AlgorithmSpec, ModelSpec, PlanSpec, SiteSpec, plan, sync_comm
from geotrain.planner.presets import Accelerator
from geotrain.topology import Link, Topology

# A toy world where the arithmetic is easy: 1e9 params, fp32 (4e9 bytes per payload), a global batch of 1e6
# tokens, one accelerator per site at 6e15 FLOP/s peak and MFU 0.5. With 2 sites each computes 3e15 FLOPs
# (half of 6 * 1e9 * 1e6) at 3e15 FLOP/s: exactly 1 s per inner step.
TOY = Accelerator(name="toy", peak_flops=6e15, watts=1000.0)


def toy_spec(*, algorithm: AlgorithmSpec, sites: int = 2, bandwidth: float = 8e9, latency: float = 0.0,
             codec: str = "fp32", tokens: float = 1e8, **site_kw) -> PlanSpec:
    site_kw = {"accelerator": TOY, "accelerators": 1, "mfu": 0.5, "pue": 1.0} | site_kw
    return PlanSpec(
        model=ModelSpec(params=1e9, tokens=tokens, batch_tokens=1e6, seq_len=1000),
        sites=[SiteSpec(name=f"s{i}", **site_kw) for i in range(sites)],
        topology=Topology(sites=sites, default=Link(bandwidth_bps=bandwidth, latency_s=latency)),
        algorithm=algorithm,
        codec=codec,
    )


def test_compute_per_step_is_six_n_b_over_achieved_flops():
    r = plan(toy_spec(algorithm=AlgorithmSpec(name="diloco", sync_every=10)))
    assert r.compute_step_seconds == pytest.approx(1.0)
    # 70B on 3 sites of 1000 H100 at MFU 0.4, batch 16M: 6 * 70e9 * 16e6 / 3 / (1000 * 989e12 * 0.4).
    spec = PlanSpec(
        model=ModelSpec(params=70e9, tokens=15e12, batch_tokens=16e6),
        sites=[SiteSpec(name=f"s{i}", accelerator="H100", accelerators=1000) for i in range(3)],
        topology=Topology(sites=3, default=Link(bandwidth_bps=10e9, latency_s=0.03)),
        algorithm=AlgorithmSpec(name="diloco", sync_every=500),
        codec="int4",
    )
    assert plan(spec).compute_step_seconds == pytest.approx(6 * 70e9 * 16e6 / 3 / (1000 * 989e12 * 0.4))


def test_ring_all_reduce_time_by_hand():
    # 3 sites, int4 payload of 70e9 params = 35e9 bytes; a ring all-reduce has 2(K-1) = 4 steps, each moving
    # a chunk of 35e9 / 3 bytes over a 10 Gbit/s link after 30 ms of latency.
    spec = PlanSpec(
        model=ModelSpec(params=70e9, tokens=15e12),
        sites=[SiteSpec(name=f"s{i}", accelerators=1000) for i in range(3)],
        topology=Topology(sites=3, default=Link(bandwidth_bps=10e9, latency_s=0.03)),
        algorithm=AlgorithmSpec(name="diloco", sync_every=500),
        codec="int4",
    )
    expected = 4 * (0.03 + 8 * 35e9 / 3 / 10e9)  # 37.4533 s
    assert sync_comm(spec).seconds == pytest.approx(expected)
    assert plan(spec).comm_seconds_per_sync == pytest.approx(expected)
    assert sync_comm(spec).bytes_sent == round(4 * 35e9 / 3)  # 2(K-1)/K of the payload leaves each site


def test_slowest_link_of_the_ring_sets_the_step():
    spec = toy_spec(algorithm=AlgorithmSpec(name="diloco", sync_every=10), sites=3)
    spec.topology.overrides[(0, 2)] = Link(bandwidth_bps=1e9, latency_s=0.05)
    # Every ring step waits for the 1 Gbit/s, 50 ms hop: 4 * (0.05 + 8 * (4e9 / 3) / 1e9).
    assert sync_comm(spec).seconds == pytest.approx(4 * (0.05 + 8 * 4e9 / 3 / 1e9))


# Toy links: 2 sites at 8 Gbit/s, no latency. fp32 all-reduce: 2 steps of 2e9 bytes = 2 * 2 s = 4 s.
@pytest.mark.parametrize(
    ("algorithm", "step_seconds", "utilization"),
    [
        (AlgorithmSpec(name="ddp"), 1 + 4, 1 / 5),
        # DDP overlap hides the all-reduce behind the backward pass, 2/3 of the step.
        (AlgorithmSpec(name="ddp", overlap=True), 1 + (4 - 2 / 3), 1 / (1 + 4 - 2 / 3)),
        # DiLoCo H=10: 10 s of compute then 4 s of all-reduce.
        (AlgorithmSpec(name="diloco", sync_every=10), 14 / 10, 10 / 14),
        # Overlapped: the 4 s hide entirely behind the next round's 10 s.
        (AlgorithmSpec(name="diloco", sync_every=10, overlap=True), 1.0, 1.0),
        # Overlapped but H=2: the round lasts as long as the 4 s all-reduce.
        (AlgorithmSpec(name="diloco", sync_every=2, overlap=True), 4 / 2, 2 / 4),
        # Streaming H=10, P=2: a fragment (2e9 bytes, 2 s) every 5 steps.
        (AlgorithmSpec(name="streaming", sync_every=10, fragments=2), 7 / 5, 5 / 7),
        # ... with tau=1 one second of the fragment's 2 s hides behind one inner step.
        (AlgorithmSpec(name="streaming", sync_every=10, fragments=2, overlap_steps=1), 6 / 5, 5 / 6),
        # ... with tau=3 all of it hides.
        (AlgorithmSpec(name="streaming", sync_every=10, fragments=2, overlap_steps=3), 1.0, 1.0),
        # overlap=True alone means tau=1 for streaming.
        (AlgorithmSpec(name="streaming", sync_every=10, fragments=2, overlap=True), 6 / 5, 5 / 6),
    ],
    ids=lambda x: getattr(x, "label", None),
)
def test_overlap_hiding_by_hand(algorithm, step_seconds, utilization):
    r = plan(toy_spec(algorithm=algorithm))
    assert r.step_seconds == pytest.approx(step_seconds)
    assert r.utilization == pytest.approx(utilization)
    assert r.hidden_seconds_per_sync + r.exposed_seconds_per_sync == pytest.approx(r.comm_seconds_per_sync)


def test_streaming_cannot_outrun_its_link():
    # 1 Gbit/s: a fragment of P=10 (4e8 bytes) takes 2 * 8 * 2e8 / 1e9 = 3.2 s but a fragment syncs every step
    # (1 s); tau=5 would hide it, yet the link carries one fragment at a time, so a period lasts 3.2 s.
    r = plan(toy_spec(algorithm=AlgorithmSpec(name="streaming", sync_every=10, fragments=10, overlap_steps=5),
                      bandwidth=1e9))
    assert r.comm_seconds_per_sync == pytest.approx(3.2)
    assert r.utilization == pytest.approx(1 / 3.2)


def test_fragment_peak_bandwidth_is_p_times_lower():
    # Each site sends 2(K-1)/K * 4e9 = 4e9 bytes per DiLoCo sync; in one 1 s step that is 32 Gbit/s.
    diloco = plan(toy_spec(algorithm=AlgorithmSpec(name="diloco", sync_every=100)))
    assert diloco.peak_bandwidth_bps == pytest.approx(32e9)
    # Four fragments each send a quarter: 8 Gbit/s.
    streaming = plan(toy_spec(algorithm=AlgorithmSpec(name="streaming", sync_every=100, fragments=4)))
    assert streaming.peak_bandwidth_bps == pytest.approx(8e9)
    assert diloco.peak_bandwidth_bps / streaming.peak_bandwidth_bps == pytest.approx(4)
    # Total bytes are the same: streaming moves less at once, not less in all.
    assert streaming.wan_bytes == pytest.approx(diloco.wan_bytes)
    # Overlapped DiLoCo spreads its sync over the next H=100 steps: 0.32 Gbit/s.
    over = plan(toy_spec(algorithm=AlgorithmSpec(name="diloco", sync_every=100, overlap=True)))
    assert over.peak_bandwidth_bps == pytest.approx(0.32e9)


def test_wan_bytes_and_time_to_train():
    # 1e8 tokens at 1e6 per step: 100 steps, 10 DiLoCo syncs, each site sending 4e9 bytes per sync.
    r = plan(toy_spec(algorithm=AlgorithmSpec(name="diloco", sync_every=10)))
    assert r.steps == 100 and r.syncs == 10
    assert r.wan_bytes == pytest.approx(10 * 2 * 4e9)
    assert r.time_to_train_seconds == pytest.approx(100 * 1.4)
    ddp = plan(toy_spec(algorithm=AlgorithmSpec(name="ddp"), codec="bf16"))
    assert ddp.syncs == 100 and ddp.wan_bytes == pytest.approx(100 * 2 * 2e9)


def test_codec_bits_scale_the_payload():
    spec = toy_spec(algorithm=AlgorithmSpec(name="diloco", sync_every=10))
    fp32 = sync_comm(spec).bytes_sent
    for codec, bits in (("bf16", 16), ("int8", 8), ("int4", 4), ("fp4", 4)):
        assert sync_comm(toy_spec(algorithm=spec.algorithm, codec=codec)).bytes_sent == fp32 * bits // 32
    topk = plan(toy_spec(algorithm=spec.algorithm, codec="topk:0.01"))
    # 1% of 1e9 entries at 48 bits, all-gathered over a 2-site ring: one step of 6e7 bytes.
    assert topk.sites[0].bytes_per_sync == 60_000_000


def test_energy_by_hand():
    # One site, no links: 1000 H100 at 700 W and PUE 1.2 draw 0.84 MW; 1e8 tokens at 1e6 per step on
    # 1000 * 989e12 * 0.4 FLOP/s.
    spec = PlanSpec(
        model=ModelSpec(params=1e9, tokens=1e8, batch_tokens=1e6, seq_len=1000),
        sites=[SiteSpec(name="only", accelerator="H100", accelerators=1000, mfu=0.4, pue=1.2)],
        topology=Topology(sites=1),
        algorithm=AlgorithmSpec(name="ddp"),
    )
    r = plan(spec)
    seconds = 100 * 6 * 1e9 * 1e6 / (1000 * 989e12 * 0.4)
    assert r.time_to_train_seconds == pytest.approx(seconds)
    assert r.utilization == pytest.approx(1.0)
    assert r.energy_mwh == pytest.approx(1000 * 700 * 1.2 * seconds / 3.6e9)
    assert r.sites[0].power_mw == pytest.approx(0.84)


def test_energy_sums_over_sites():
    r = plan(toy_spec(algorithm=AlgorithmSpec(name="diloco", sync_every=10), watts=2000.0))
    # Two sites of one 2 kW accelerator at PUE 1 for 140 s.
    assert r.energy_mwh == pytest.approx(2 * 2000 * 140 / 3.6e9)
    assert sum(s.energy_mwh for s in r.sites) == pytest.approx(r.energy_mwh)


def test_accelerators_under_a_power_cap():
    # floor(300e6 / (700 * 1.2)) = floor(357142.86) = 357142
    site = SiteSpec(name="dc", accelerator="H100", power_cap_mw=300, pue=1.2)
    assert site.powered_under_cap == 357142
    assert site.accelerators == 357142  # no count given: fill the cap
    # An exact quotient does not lose one to rounding: 0.84 MW / 840 W = 1000.
    assert SiteSpec(name="dc", accelerator="H100", power_cap_mw=0.84, pue=1.2).powered_under_cap == 1000
    assert SiteSpec(name="dc", accelerator="B200", power_cap_mw=300, pue=1.25).powered_under_cap == 240000


def test_caps_respected_flag():
    spec = toy_spec(algorithm=AlgorithmSpec(name="diloco", sync_every=10), power_cap_mw=0.0015)
    assert plan(spec).caps_respected is True  # one 1 kW accelerator under a 1.5 kW cap
    spec = PlanSpec(
        model=ModelSpec(params=1e9, tokens=1e8, batch_tokens=1e6, seq_len=1000),
        sites=[SiteSpec(name="a", accelerators=400_000, power_cap_mw=300),
               SiteSpec(name="b", accelerators=1000, power_cap_mw=300)],
        topology=Topology(sites=2, default=Link(bandwidth_bps=1e10, latency_s=0.01)),
    )
    r = plan(spec)
    assert r.caps_respected is False
    assert [s.cap_respected for s in r.sites] == [False, True]
    assert r.accelerators_powered == [357142, 357142]
    assert any("over the 300 MW cap" in n for n in r.notes)


def test_slowest_site_gates_sync():
    spec = toy_spec(algorithm=AlgorithmSpec(name="diloco", sync_every=10))
    spec.sites[1] = SiteSpec(name="slow", accelerator=TOY, accelerators=1, mfu=0.25, pue=1.0)  # 2 s per step
    r = plan(spec)
    assert r.compute_step_seconds == pytest.approx(2.0)
    assert r.step_seconds == pytest.approx((20 + 4) / 10)
    assert [s.utilization for s in r.sites] == pytest.approx([10 / 24, 20 / 24])
    assert r.utilization == pytest.approx((10 / 24 + 20 / 24) / 2)
    # Balancing the batch by throughput gives the fast site 2/3 of it: both compute 4/3 s per step.
    spec.balance = "throughput"
    b = plan(spec)
    assert b.compute_step_seconds == pytest.approx(4 / 3)
    assert [s.utilization for s in b.sites] == pytest.approx([13.333333 / 17.333333] * 2)


def test_single_site_has_no_wan_traffic():
    r = plan(toy_spec(algorithm=AlgorithmSpec(name="ddp"), sites=1))
    assert r.wan_bytes == 0 and r.syncs == 0 and r.utilization == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("make", "field_", "words"),
    [
        (lambda: SiteSpec(name="x", accelerators=1, power_cap_mw=-5), "power_cap_mw", "positive"),
        (lambda: SiteSpec(name="x", accelerators=1, watts=-700), "watts", "positive"),
        (lambda: SiteSpec(name="x", accelerators=1, mfu=1.2), "mfu", "(0, 1]"),
        (lambda: SiteSpec(name="x", accelerators=1, mfu=0), "mfu", "(0, 1]"),
        (lambda: SiteSpec(name="x", accelerators=1, pue=0.9), "pue", "at least 1.0"),
        (lambda: SiteSpec(name="x", accelerator="H10", accelerators=1), "accelerator", "did you mean 'H100'"),
        (lambda: SiteSpec(name="x"), "accelerators", "power cap"),
        (lambda: SiteSpec(name="x", accelerators=0), "accelerators", "positive integer"),
        (lambda: ModelSpec(params=-1, tokens=1e9), "model.params", "positive"),
        (lambda: ModelSpec(params=1e9, tokens=1e9, batch_tokens=100, seq_len=1000), "model.batch_tokens", "sequence"),
        (lambda: AlgorithmSpec(name="dilco"), "algorithm", "did you mean 'diloco'"),
        (lambda: AlgorithmSpec(name="diloco", fragments=4), "fragments", "streaming only"),
        (lambda: AlgorithmSpec(name="streaming", sync_every=4, fragments=8), "fragments", "fragments <= sync_every"),
        (lambda: AlgorithmSpec(name="streaming", sync_every=4, overlap_steps=4), "overlap_steps", "smaller"),
        (lambda: AlgorithmSpec(name="diloco", sync_every=0), "sync_every", "positive"),
        (lambda: toy_spec(algorithm=AlgorithmSpec(), codec="int3"), "codec", "unknown codec"),
        (lambda: toy_spec(algorithm=AlgorithmSpec(), codec="topk:2"), "codec", "(0, 1]"),
    ],
)
def test_bad_inputs_raise_config_error(make, field_, words):
    with pytest.raises(ConfigError) as info:
        make()
    assert info.value.field == field_
    assert words in str(info.value)


def test_accelerator_presets_are_the_datasheet_figures():
    from geotrain.planner.presets import ACCELERATORS

    assert {k: (a.peak_flops, a.watts) for k, a in ACCELERATORS.items()} == {
        "A100": (312e12, 400.0),
        "H100": (989e12, 700.0),
        "H200": (989e12, 700.0),
        "B200": (2.25e15, 1000.0),
    }
    assert all(a.source for a in ACCELERATORS.values())
    assert SiteSpec(name="x", accelerator="h100", accelerators=1).accel.name == "H100"  # case-insensitive


def test_result_dict_has_the_contract_keys():
    d = plan(toy_spec(algorithm=AlgorithmSpec(name="diloco", sync_every=10))).to_dict()
    for key in ("utilization", "step_seconds", "time_to_train_seconds", "wan_bytes", "peak_bandwidth_bps",
                "energy_mwh", "accelerators_powered", "caps_respected", "per_site"):
        assert key in d
    assert all(math.isfinite(v) for v in (d["utilization"], d["step_seconds"], d["energy_mwh"]))
