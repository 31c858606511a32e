"""The cross-site all-reduce, through a real coordinator: reduce-scatter of encoded chunks, then all-gather of
the re-encoded means, checked against a reference computed in one process, for its bytes, for error feedback,
and for the guards that leave a bad sender out."""

from __future__ import annotations

import pytest
import torch

from _utils.sites import run_comms
from geotrain.comm.codecs import choose_codec, get_codec
from geotrain.comm.pattern import resolve_pattern


def _run(k, body, codec, pattern="auto", **settings):
    return run_comms(k, body, **{"comm.codec": codec, "comm.pattern": pattern, **settings})


def _reference(xs, codec):
    """What every site must end with, by the definition: chunk j is owned by site j, which sums its own chunk
    unencoded with the others' decoded chunks (in site order), divides by K, and the decoded re-encoding of that
    mean is what everyone gets."""
    k, n = len(xs), xs[0].numel()
    c = -(-n // k)
    padded = [torch.cat([x, x.new_zeros(c * k - n)]) for x in xs]
    out = []
    for j in range(k):
        acc = padded[j][j * c:(j + 1) * c].clone()
        for i in range(k):
            if i != j:
                acc += codec.decode(codec.encode(padded[i][j * c:(j + 1) * c]))
        out.append(codec.decode(codec.encode(acc.div_(k))))
    return torch.cat(out)[:n]


def test_auto_pattern():
    int8, topk = choose_codec("int8"), choose_codec("topk")
    assert resolve_pattern("auto", codec=choose_codec("fp32"), sites=4) == "reduce_scatter"  # framed, checked
    assert resolve_pattern("auto", codec=choose_codec("fp32"), sites=2) == "all_gather"
    assert resolve_pattern("auto", codec=int8, sites=4) == "reduce_scatter"
    assert resolve_pattern("auto", codec=int8, sites=2) == "all_gather"  # same bytes at K=2, one quantization
    assert resolve_pattern("auto", codec=topk, sites=4) == "all_gather"  # no re-sparsification of the sum
    assert resolve_pattern("all_gather", codec=int8, sites=4) == "all_gather"
    with pytest.raises(ValueError, match="unknown pattern"):
        resolve_pattern("ring", codec=int8, sites=4)


@pytest.mark.parametrize("codec,k,n", [("int8", 4, 10_001), ("int4", 3, 999), ("bf16", 5, 7)])
def test_reduce_scatter_equals_reference_on_every_site(codec, k, n):
    torch.manual_seed(k)
    xs = [torch.randn(n) * (i + 1) for i in range(k)]
    expected = _reference(xs, get_codec(codec))

    def body(rank, comm):
        comm.error_feedback = False
        assert comm.pattern == "reduce_scatter"
        return comm.all_reduce_mean(xs[rank].clone()).wait(), comm.stats.bytes_sent, comm.payload_bytes(n)

    chunk_bytes = get_codec(codec).encoded_size(-(-n // k))
    for mean, sent, payload in _run(k, body, codec):
        assert torch.equal(mean, expected)  # bit-identical on every site
        assert payload == k * chunk_bytes
        assert sent == 2 * (k - 1) * chunk_bytes  # a ring all-reduce's bytes: 2(K-1)/K of the payload


def test_reduce_scatter_sends_half_the_bytes_of_all_gather_at_four_sites():
    k, n = 4, 1 << 16
    xs = [torch.randn(n) for _ in range(k)]
    exact = torch.stack(xs).mean(0)

    res = {}
    for pattern in ("reduce_scatter", "all_gather"):
        def body(rank, comm):
            comm.error_feedback = False
            mean = comm.all_reduce_mean(xs[rank].clone()).wait()
            return float((mean - exact).abs().max()), comm.stats.bytes_sent

        res[pattern] = _run(k, body, "int8", pattern)[0]
    assert res["reduce_scatter"][1] * 2 < res["all_gather"][1] * 1.01
    # two int8 quantizations: each value within the owner's re-encoding bound plus the averaged senders' bounds
    absmax = max(float(x.abs().max()) for x in xs)
    assert res["reduce_scatter"][0] <= absmax / 254 * 2


def test_error_feedback_keeps_the_sum_over_rounds_close():
    """Over R rounds the decoded means sum to the exact means' sum within one round's error, not R of them."""
    k, n, rounds = 3, 4096, 12
    gen = torch.Generator().manual_seed(1)
    data = [[torch.randn(n, generator=gen) for _ in range(k)] for _ in range(rounds)]
    exact = sum(torch.stack(r).mean(0) for r in data)

    res = {}
    for ef in (True, False):
        def body(rank, comm):
            comm.error_feedback = ef
            total = torch.zeros(n)
            for r in range(rounds):
                total += comm.all_reduce_mean(data[r][rank].clone(), key="g").wait()
            return float((total - exact).norm() / exact.norm())

        res[ef] = _run(k, body, "int4", "reduce_scatter")[0]
    assert res[True] < 0.5 * res[False]


@pytest.mark.parametrize("codec,pattern", [("fp32", "reduce_scatter"), ("fp32", "all_gather"), ("int8", "reduce_scatter"),
                                           ("int4", "all_gather"), ("topk", "all_gather")])
def test_a_nan_payload_is_left_out_the_same_way_on_every_site(codec, pattern):
    """Site 1 sends NaNs with valid checksums (what ``--fault nan`` does): every receiver sees it, every site
    leaves site 1 out and averages the other three, and site 1's own residual is rolled back."""
    k, n = 4, 3001
    xs = [torch.randn(n, generator=torch.Generator().manual_seed(i)) for i in range(k)]

    def body(rank, comm):
        comm.error_feedback = False
        if rank == 1:
            comm.poison_next = True
        pending = comm.all_reduce_mean(xs[rank].clone())
        mean = pending.wait()
        return mean, [r.to_dict() for r in pending.outcome.rejected]

    results = _run(k, body, codec, pattern)
    means = [m for m, _ in results]
    assert all(torch.equal(m, means[0]) for m in means)  # the same decision, bit-identical means everywhere
    for _, rejected in results:
        assert [r["site"] for r in rejected] == [1]
        assert "non-finite" in rejected[0]["reason"] or "failed to decode" in rejected[0]["reason"]
    exact = (xs[0] + xs[2] + xs[3]) / 3
    tolerance = {"fp32": 1e-6, "int8": 0.05, "int4": 0.5, "topk": 10.0}[codec]  # within each codec's error bound
    assert float((means[0] - exact).abs().max()) <= tolerance


def test_an_outlier_is_left_out_once_the_median_is_known():
    """After four syncs of ordinary norms, a site whose pseudo-gradient is 100x larger is left out; the rest
    are averaged, and the outlier's norm is named."""
    k, n = 3, 2000
    gen = torch.Generator().manual_seed(3)
    data = [[torch.randn(n, generator=gen) for _ in range(k)] for _ in range(6)]

    def body(rank, comm):
        outcomes = []
        for r in range(6):
            if r == 5 and rank == 2:
                comm.scale_next = 100.0
            pending = comm.all_reduce_mean(data[r][rank].clone(), key="g")
            mean = pending.wait()
            outcomes.append((mean, [x.to_dict() for x in pending.outcome.rejected]))
        return outcomes

    results = _run(k, body, "fp32", **{"guard.min_history": 4})
    for outcomes in results:
        assert all(not rej for _, rej in outcomes[:5])
        mean, rejected = outcomes[5]
        assert [x["site"] for x in rejected] == [2] and "x the running median" in rejected[0]["reason"]
        assert torch.allclose(mean, (data[5][0] + data[5][1]) / 2, atol=1e-6)
