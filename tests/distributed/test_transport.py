"""``GlooTransport``'s collectives on real gloo groups: every rank gets every payload exactly, for any number of
sites, dtype, shape and odd sizes (the halves of a ring are cut by element)."""

from __future__ import annotations

import pytest
import torch

from _utils.gloo_threads import run_ranks
from geotrain.comm.transport import GlooTransport


def _payload(rank: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(rank)
    return (torch.randn(shape, generator=g) * 100).to(dtype)


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("shape,dtype", [((1,), torch.float32), ((3, 5), torch.bfloat16), ((100_001,), torch.uint8)])
def test_all_gather_brings_every_payload_in_rank_order(k, shape, dtype):
    def body(rank, pg):
        t = GlooTransport(pg, rank=rank, size=k)
        out, traffic = t.all_gather(_payload(rank, shape, dtype))
        again, _ = t.all_gather(_payload(rank + k, shape, dtype))  # a second call on the same group matches up
        return out, again, traffic

    for out, again, traffic in run_ranks(k, body):
        assert [o.shape for o in out] == [torch.Size(shape)] * k
        assert all(torch.equal(out[j], _payload(j, shape, dtype)) for j in range(k))
        assert all(torch.equal(again[j], _payload(j + k, shape, dtype)) for j in range(k))
        assert traffic.bytes_sent == (k - 1) * _payload(0, shape, dtype).nbytes


@pytest.mark.parametrize("k", [2, 3, 4])
def test_all_to_all_delivers_chunk_i_of_every_rank_to_rank_i(k):
    n = 6 * k

    def body(rank, pg):
        out, _ = GlooTransport(pg, rank=rank, size=k).all_to_all(_payload(rank, (n,), torch.float32))
        return out

    for me, out in enumerate(run_ranks(k, body)):
        expected = torch.cat([_payload(j, (n,), torch.float32).chunk(k)[me] for j in range(k)])
        assert torch.equal(out, expected)
