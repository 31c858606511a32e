"""The compressed cross-site all-reduce: reduce-scatter of encoded chunks, then all-gather of the re-encoded
means, checked against a reference computed in one process, for its bytes, and for error feedback."""

from __future__ import annotations

import pytest
import torch

from _utils.gloo_threads import run_ranks
from geotrain.comm.codecs import choose_codec, get_codec
from geotrain.comm.collectives import CrossSiteComm
from geotrain.comm.pattern import resolve_pattern
from geotrain.comm.transport import GlooTransport


def _comm(rank, pg, k, codec, pattern="auto", **kw):
    return CrossSiteComm(GlooTransport(pg, rank=rank, size=k), site_pg=None, local_rank=0, workers=1,
                         codec=choose_codec(codec), pattern=pattern, **kw)


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
    assert resolve_pattern("auto", codec=None, sites=4) == "all_reduce"
    assert resolve_pattern("auto", codec=choose_codec("fp32"), sites=4) == "all_reduce"
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

    def body(rank, pg):
        comm = _comm(rank, pg, k, codec, error_feedback=False)
        try:
            assert comm.pattern == "reduce_scatter"
            return comm.all_reduce_mean(xs[rank].clone()).wait(), comm.stats.bytes_sent, comm.payload_bytes(n)
        finally:
            comm.close()

    chunk_bytes = get_codec(codec).encoded_size(-(-n // k))
    for mean, sent, payload in run_ranks(k, body):
        assert torch.equal(mean, expected)  # bit-identical on every site
        assert payload == k * chunk_bytes
        assert sent == 2 * (k - 1) * chunk_bytes  # a ring all-reduce's bytes: 2(K-1)/K of the payload


def test_reduce_scatter_sends_half_the_bytes_of_all_gather_at_four_sites():
    k, n = 4, 1 << 16
    xs = [torch.randn(n) for _ in range(k)]
    exact = torch.stack(xs).mean(0)

    def body(rank, pg):
        out = {}
        for pattern in ("reduce_scatter", "all_gather"):
            comm = _comm(rank, pg, k, "int8", pattern, error_feedback=False)
            try:
                mean = comm.all_reduce_mean(xs[rank].clone()).wait()
                out[pattern] = (float((mean - exact).abs().max()), comm.stats.bytes_sent)
            finally:
                comm.close()
        return out

    res = run_ranks(k, body)[0]
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

    def body(rank, pg):
        sums = {}
        for ef in (True, False):
            comm = _comm(rank, pg, k, "int4", "reduce_scatter", error_feedback=ef)
            try:
                total = torch.zeros(n)
                for r in range(rounds):
                    total += comm.all_reduce_mean(data[r][rank].clone(), key="g").wait()
                sums[ef] = float((total - exact).norm() / exact.norm())
            finally:
                comm.close()
        return sums

    res = run_ranks(k, body)[0]
    assert res[True] < 0.5 * res[False]
