"""SparseLoCo (Sarfi et al., arXiv 2508.15706): its codec against a reference written with plain loops, its
accumulator identity, its payload sizes as the planner counts them, and its outer step by hand.

No processes: a scripted comm plays the other site, as in test_outer_steps.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from geotrain.algorithms import get_algorithm
from geotrain.algorithms.strategies.base import StrategyContext
from geotrain.algorithms.strategies.sparseloco import SparseLoCoStrategy
from geotrain.comm.codecs import ErrorFeedback, SparseCodec, choose_codec
from geotrain.comm.codecs.base import HEADER_SIZE, body_checksum, _write_header
from geotrain.comm.codecs.layout import pad8, sparse_counts
from geotrain.comm.codecs.registry import CodecError
from geotrain.comm.codecs.sparse import pack_bits, unpack_bits
from geotrain.comm.collectives import sender_mean
from geotrain.config import SparseLoCoConfig, load_config
from geotrain.errors import ConfigError


def _reference(x: np.ndarray, *, fraction: float, chunk: int, bits: int, segments: tuple[int, ...] = ()) -> np.ndarray:
    """Chunked top-k and sign-magnitude quantization, one tensor, one chunk and one value at a time."""
    out = np.zeros_like(x)
    k = max(1, min(chunk, math.ceil(round(fraction * chunk, 9))))
    levels = 2 ** (bits - 1)
    bounds = np.cumsum((0,) + (segments if sum(segments) == len(x) and segments else (len(x),)))
    for first, end in zip(bounds[:-1], bounds[1:]):  # chunks never cross from one tensor to the next
        for start in range(first, end, chunk):
            part = x[start:min(start + chunk, end)]
            kc = min(k, len(part))  # a short chunk (a small tensor, a tensor's tail) keeps min(k, its length)
            order = sorted(range(len(part)), key=lambda i: -abs(float(part[i])))[:kc]
            absmax = max(abs(float(part[i])) for i in order)
            scale = np.float32(np.float32(absmax) / np.float32(levels))
            for i in order:
                m = 0 if scale == 0 else min(levels - 1, math.floor(np.float32(abs(part[i])) / scale))
                value = np.float32((m + 0.5) * scale)
                out[start + i] = -value if part[i] < 0 else value
    return out


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("numel,chunk,fraction,segments", [
    (4096 * 3, 4096, 0.01, ()), (1000, 64, 0.1, ()), (1000 + 37, 64, 0.03, ()),
    # a model's tensors: matrices of several chunks, with a tail, and biases smaller than a chunk
    (1000 + 37, 64, 0.03, (128, 5, 300, 64, 40, 500)), (4096 * 2 + 300, 4096, 0.01, (4096, 128, 4096, 172)),
    (700, 64, 0.1, (0, 700)), (700, 64, 0.1, (600, 50))])  # (600, 50) adds up to 650: chunked as one run
def test_chunked_topk_matches_a_reference(bits, numel, chunk, fraction, segments):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(bits + numel)) * torch.linspace(0.1, 3, numel)
    codec = SparseCodec(fraction=fraction, chunk=chunk, bits=bits, segments=segments)
    decoded = codec.decode(codec.encode(x))
    expected = _reference(x.numpy(), fraction=fraction, chunk=chunk, bits=bits, segments=segments)
    np.testing.assert_array_equal(decoded.numpy(), expected)
    kept = sparse_counts(numel, fraction=fraction, chunk=chunk, segments=segments)[0]
    assert int((decoded != 0).sum()) == kept


def test_chunks_do_not_cross_tensors_and_small_tensors_are_one_chunk():
    x = torch.tensor([0.1, 0.2, 0.3] + [5.0] * 3 + [0.0] * 58)
    one_run = SparseCodec(fraction=1 / 64, chunk=64, bits=8)  # one entry of the 64
    per_tensor = SparseCodec(fraction=1 / 64, chunk=64, bits=8, segments=(3, 61))
    assert int((one_run.decode(one_run.encode(x))[:3] != 0).sum()) == 0
    decoded = per_tensor.decode(per_tensor.encode(x))
    assert decoded[2] > 0 and int((decoded != 0).sum()) == 2  # the largest of the small tensor, and of the other
    # a small tensor keeps min(k, its size): with k = 32 a tensor of 3 values is sent whole
    whole = SparseCodec(fraction=0.5, chunk=64, bits=8, segments=(3, 61))
    assert bool((whole.decode(whole.encode(x))[:3] != 0).all())
    starts, lengths, ks = per_tensor.chunks(64)
    assert starts.tolist() == [0, 3] and lengths.tolist() == [3, 61] and ks.tolist() == [1, 1]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_round_trip_error_is_within_half_a_level(bits):
    chunk = 256
    x = torch.randn(chunk * 8, generator=torch.Generator().manual_seed(bits))
    codec = SparseCodec(fraction=0.05, chunk=chunk, bits=bits)
    decoded = codec.decode(codec.encode(x))
    for c in range(8):
        xs, ds = x[c * chunk:(c + 1) * chunk], decoded[c * chunk:(c + 1) * chunk]
        kept = ds != 0
        absmax = xs[kept].abs().max()
        # a kept value is off by at most absmax / 2^bits (a quarter of it at 2 bits), with its sign kept
        slack = 4 * torch.finfo(torch.float32).eps * float(absmax)  # the rounding of x - decoded itself
        assert float((ds[kept] - xs[kept]).abs().max()) <= float(absmax) / 2**bits + slack
        assert bool((ds[kept].sign() == xs[kept].sign()).all())
        # a dropped value is no larger than the smallest kept one
        assert float(xs[~kept].abs().max()) <= float(xs[kept].abs().min())


@pytest.mark.parametrize("numel", [0, 1, 4095, 4096, 4097, 3 * 4096 + 5, 1_000_003])
def test_payload_size_is_exactly_as_accounted(numel):
    choice = choose_codec("sparse+int2")  # 1% of chunks of 4096: 41 kept per chunk, 12-bit indices
    nfull, rem = divmod(numel, 4096)
    kept, chunks = 41 * nfull + min(41, rem), nfull + (rem > 0)  # a short last chunk keeps min(k, its length)
    by_hand = HEADER_SIZE + pad8(-(-kept * 12 // 8)) + pad8(4 * chunks) + pad8(-(-kept * 2 // 8))
    assert choice.encoded_size(numel) == by_hand
    assert choice.build().encode(torch.randn(numel)).numel() == by_hand


def test_payload_size_of_a_model_is_exactly_as_accounted():
    config = load_config(values={"run.algorithm": "sparseloco"})
    sizes = [n for _, n in config.layout().tensors]
    # each tensor on its own: 41 per full chunk of 4096, min(41, n) of a shorter one
    kept = sum(41 * (n // 4096) + min(41, n % 4096) for n in sizes)
    chunks = sum(-(-n // 4096) for n in sizes)
    by_hand = HEADER_SIZE + pad8(-(-kept * 12 // 8)) + pad8(4 * chunks) + pad8(-(-kept * 2 // 8))
    choice = config.codec()
    assert choice.options["segments"] == tuple(sizes)
    assert choice.encoded_size(sum(sizes)) == by_hand
    payload = choice.build().encode(torch.randn(sum(sizes)))
    assert payload.numel() == by_hand
    assert choice.build().carried(payload).numel() == kept


def test_bits_per_parameter_at_the_defaults():
    # a chunk of 4096 sends 41 x (12 index + 2 value bits) + a 32-bit scale = 606 bits
    assert choose_codec("sparse+int2").bits_per_value(4096 * 4096) == pytest.approx(606 / 4096, abs=1e-4)
    assert 32 / choose_codec("sparse+int2").bits_per_value() > 200  # against fp32


def test_bit_packing_round_trips():
    rng = np.random.default_rng(0)
    for width in (1, 2, 3, 12, 17):
        values = rng.integers(0, 2**width, size=1001)
        out = np.zeros(pad8(-(-1001 * width // 8)), dtype=np.uint8)
        pack_bits(values, width, out)
        np.testing.assert_array_equal(unpack_bits(out, width, 1001), values)


def test_decode_refuses_indices_an_encoder_cannot_write():
    codec = SparseCodec(fraction=0.5, chunk=4, bits=2)  # 2 of 4 kept, 2-bit indices
    payload = codec.encode(torch.tensor([1.0, -2.0, 3.0, 0.5]))
    body = payload[HEADER_SIZE:]
    body[0] = 0b0101  # indices 1, 1: not ascending
    s1, s2 = body_checksum(body)
    _write_header(payload, codec.codec_id, 0, 4, *codec._header_options()[1:], s1, s2)
    with pytest.raises(CodecError, match="out of order"):
        codec.decode(payload)


def test_nonfinite_input_is_refused():
    with pytest.raises(CodecError, match="non-finite"):
        SparseCodec(fraction=0.01, chunk=64).encode(torch.tensor([1.0] * 63 + [math.nan]))


def test_accumulator_identity():
    """e <- beta * e + delta; what was sent plus what stays is what was accumulated, exactly. Where an entry was
    dropped that is trivial; where it was kept, e - sent is exact (Sterbenz) when the value lies within a factor
    of 2 of its decoded level: at 2 bits every value above 1/8 of its chunk's largest kept one, which holds for
    these Gaussian pseudo-gradients. In general the residual is e - sent rounded once."""
    codec = SparseCodec(fraction=0.02, chunk=512, bits=2, segments=(1024, 100, 1948))  # a small tensor, a tail
    acc = ErrorFeedback(codec, decay=0.9)
    gen = torch.Generator().manual_seed(3)
    previous = torch.zeros(512 * 6)
    for _ in range(5):
        delta = torch.randn(512 * 6, generator=gen)
        accumulated = torch.add(delta, previous, alpha=0.9)  # as the accumulator computes it
        sent = codec.decode(acc.encode(delta))
        residual = acc.residual
        assert torch.equal(residual, accumulated - sent)
        dropped = sent == 0
        assert torch.equal(residual[dropped], accumulated[dropped])
        assert torch.equal(sent + residual, accumulated)
        previous = residual.clone()


def test_carried_positions_are_the_decoded_entries():
    codec = SparseCodec(fraction=0.03, chunk=64, bits=2)
    x = torch.randn(64 * 5 + 37, generator=torch.Generator().manual_seed(5))
    x[:64] = 0.0  # a chunk of zeros still sends its k entries (at scale 0: decoded as 0)
    payload = codec.encode(x)
    positions = codec.carried(payload)
    assert positions.numel() == sparse_counts(x.numel(), fraction=0.03, chunk=64)[0] and positions.unique().numel() == positions.numel()
    decoded = codec.decode(payload)
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[positions] = True
    assert not bool(decoded[~mask].any())  # nothing decoded outside the carried positions
    assert bool((decoded[mask][2:] != 0).all())  # the zero chunk's 2 entries are carried although decoded as 0
    assert int((positions < 64).sum()) == 2


def test_sparse_payloads_are_averaged_over_the_sites_that_sent_each_value():
    """SparseLoCo's reference averages with scatter_reduce(reduce="mean", include_self=False): a value is
    divided by the number of senders that carried it, not by the number of sites; a value sent by none stays 0."""
    codec = SparseCodec(fraction=0.25, chunk=8, bits=8)  # 2 of 8 kept
    xs = [torch.tensor([8.0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]),
          torch.tensor([4.0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
          torch.tensor([0.0, 0, 0, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0])]
    payloads = [codec.encode(x) for x in xs]
    decoded = [codec.decode(p) for p in payloads]
    carried = {j: codec.carried(p) for j, p in enumerate(payloads)}
    mean = sender_mean(decoded, [0, 1, 2], carried=carried)
    # by hand, from the decoded values: every site sends 2 of each chunk of 8 (site 2's second chunk is zeros)
    by_hand = torch.zeros(16)
    for i in range(16):
        senders = [j for j in range(3) if bool((carried[j] == i).any())]
        if senders:
            by_hand[i] = sum(float(decoded[j][i]) for j in senders) / len(senders)
    torch.testing.assert_close(mean, by_hand, rtol=0, atol=0)
    assert float(mean[7]) == float(decoded[0][7])  # one sender: applied whole
    assert float(mean[0]) == (float(decoded[0][0]) + float(decoded[1][0])) / 2
    # only the accepted senders count
    left_out = sender_mean(decoded, [0, 2], carried={0: carried[0], 2: carried[2]})
    assert float(left_out[0]) == float(decoded[0][0]) and float(left_out[1]) == 0.0


def test_the_sender_mean_of_payloads_that_carry_everything_is_the_plain_mean():
    codec = SparseCodec(fraction=1.0, chunk=16, bits=8)
    gen = torch.Generator().manual_seed(0)
    payloads = [codec.encode(torch.randn(40, generator=gen)) for _ in range(4)]
    decoded = [codec.decode(p) for p in payloads]
    plain = sender_mean(decoded, [0, 1, 3])
    carried = {j: codec.carried(payloads[j]) for j in (0, 1, 3)}
    assert torch.equal(sender_mean(decoded, [0, 1, 3], carried=carried), plain)
    assert SparseCodec.mean_over_senders and not choose_codec("topk").build().mean_over_senders


# -- the strategy ------------------------------------------------------------------------------------------


class _Landed:
    def __init__(self, mean: torch.Tensor) -> None:
        self._mean = mean

    def wait(self) -> torch.Tensor:
        return self._mean


class _TwoSites:
    """This site and one other whose decoded sparse updates are scripted (the other sends its nonzero values);
    encodes this site's payload through the accumulator it is handed and averages as CrossSiteComm does."""

    def __init__(self, codec: SparseCodec, others: list[torch.Tensor]) -> None:
        self.codec, self.others = codec, others
        self.site, self.local_rank = 0, 0
        self.sent: list[torch.Tensor] = []

    def all_reduce_mean(self, flat: torch.Tensor, *, key: str, feedback: ErrorFeedback) -> _Landed:
        payload = feedback.encode(flat)
        sent = self.codec.decode(payload)
        self.sent.append(sent)
        other = self.others.pop(0)
        # as CrossSiteComm averages sparse payloads: each value over the sites that sent it
        carried = {0: self.codec.carried(payload), 1: other.nonzero().reshape(-1)}
        return _Landed(sender_mean([sent, other], [0, 1], carried=carried))


class _Params(nn.Module):
    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(values))


def test_outer_step_applies_the_mean_of_sparse_updates_without_momentum():
    codec = SparseCodec(fraction=0.25, chunk=4, bits=8)  # one of 4 kept
    other = torch.tensor([0.0, 0.0, 0.0, 2.0])
    comm = _TwoSites(codec, [other, other])
    model = _Params([1.0, 1.0, 1.0, 1.0])
    strategy = SparseLoCoStrategy(StrategyContext(model=model, comm=comm, site_pg=None, workers=1), sync_every=2,
                                  sparseloco=SparseLoCoConfig(beta=0.5, lr=1.0))
    with torch.no_grad():
        model.w -= torch.tensor([0.0, 4.0, 0.0, 0.0])  # the pseudo-gradient (4 at index 1)
    assert not strategy.after_inner_step(0, last=False)
    assert strategy.after_inner_step(1, last=False)
    # 8 bits: 128 levels of 4/128, value (127 + 0.5) * 4/128 = 3.984375
    torch.testing.assert_close(comm.sent[0], torch.tensor([0.0, 3.984375, 0.0, 0.0]))
    # each value over the sites that sent it: index 1 only this site, index 3 only the other
    expected = torch.tensor([1.0, 1.0 - 3.984375, 1.0, 1.0 - 2.0])
    torch.testing.assert_close(model.w.detach(), expected)
    torch.testing.assert_close(strategy.global_parameters()[0], expected)
    # round 2: no new progress; the accumulator, decayed by beta, sends (the top level of) half of what it kept
    assert strategy.after_inner_step(3, last=False)
    torch.testing.assert_close(comm.sent[1], torch.tensor([0.0, 0.0078125 * 127.5 / 128, 0.0, 0.0]))
    state = strategy.state_dict()
    assert state["owner"] == [0, 0] and state["accumulator"]["residual"] is not None


def test_a_drained_round_restarts_from_the_global_parameters():
    """drain() (before joiners take the state) lands the overlapped round in flight and moves the local
    parameters to the new global θ: the next round's pseudo-gradient is measured from there, so a round
    without progress sends only what the accumulator kept."""
    codec = SparseCodec(fraction=0.25, chunk=4, bits=8)
    comm = _TwoSites(codec, [torch.zeros(4), torch.zeros(4)])
    model = _Params([1.0, 1.0, 1.0, 1.0])
    strategy = SparseLoCoStrategy(StrategyContext(model=model, comm=comm, site_pg=None, workers=1), sync_every=1,
                                  sparseloco=SparseLoCoConfig(beta=0.5, lr=1.0), overlap=True)
    with torch.no_grad():
        model.w -= torch.tensor([0.0, 4.0, 0.0, 0.0])
    assert strategy.after_inner_step(0, last=False) and strategy.syncs_in_flight() == 1
    strategy.drain()
    expected = torch.tensor([1.0, 1.0 - 3.984375, 1.0, 1.0])  # only this site sent index 1
    torch.testing.assert_close(model.w.detach(), expected)
    torch.testing.assert_close(strategy.start, expected)
    assert strategy.after_inner_step(1, last=True)  # no inner progress since the drain
    # only the decayed residual of round 1, (4 - 3.984375) / 2, at its top 8-bit level
    torch.testing.assert_close(comm.sent[1], torch.tensor([0.0, 0.0078125 * 127.5 / 128, 0.0, 0.0]))


def test_a_healed_site_starts_its_own_accumulator():
    codec = SparseCodec(fraction=0.25, chunk=4, bits=2)
    comm = _TwoSites(codec, [torch.zeros(4)])
    model = _Params([1.0, 2.0, 3.0, 4.0])
    make = lambda: SparseLoCoStrategy(StrategyContext(model=model, comm=comm, site_pg=None, workers=1),  # noqa: E731
                                      sync_every=1, sparseloco=SparseLoCoConfig())
    a = make()
    with torch.no_grad():
        model.w -= 1.0
    a.after_inner_step(0, last=False)
    state = a.state_dict()
    b = make()
    b.load_state_dict(state)
    assert torch.equal(b.accumulator.residual, a.accumulator.residual)  # its own checkpoint
    comm.site = 1
    c = make()
    c.load_state_dict(state)  # another site's state
    assert c.accumulator.residual is None and torch.equal(c.params, a.params)


# -- the definition ----------------------------------------------------------------------------------------


def test_the_plan_prices_the_codec_the_run_sends():
    config = load_config(values={"run.algorithm": "sparseloco", "sparseloco.density": 0.03,
                                 "sparseloco.bits": 4, "sparseloco.chunk": 1024})
    choice = config.codec()
    layout = config.layout()
    assert choice.name == "sparse+int4" and choice.options == {
        "fraction": 0.03, "chunk": 1024, "segments": tuple(n for _, n in layout.tensors)}
    assert get_algorithm("sparseloco").pattern(config, layout).payloads == (layout.params,)
    # the other algorithms keep [comm]'s codec
    assert load_config(values={"run.algorithm": "diloco", "comm.codec": "int4"}).codec().name == "int4"


@pytest.mark.parametrize("values,field", [({"comm.codec": "int4"}, "comm.codec"),
                                          ({"comm.pattern": "reduce_scatter"}, "comm.pattern"),
                                          ({"sparseloco.bits": 3}, "sparseloco.bits"),
                                          ({"sparseloco.density": 0}, "sparseloco.density")])
def test_settings_that_cannot_work_are_refused(values, field):
    with pytest.raises(ConfigError) as info:
        load_config(values={"run.algorithm": "sparseloco", **values})
    assert info.value.field == field


def test_the_planner_offers_sparseloco_its_own_codec_only():
    from geotrain.planner.questions import compare_variants, mildest_codec
    from test_planner_model import toy_spec

    spec = toy_spec({"run.algorithm": "sparseloco", "outer.sync_every": 50})
    assert spec.codec.name == "sparse+int2"
    assert mildest_codec(spec, target=0.0) == "sparse+int2"  # never comm.codec's candidates, which it refuses
    assert mildest_codec(spec, target=1.01) is None
    plan_with_int4 = compare_variants(toy_spec({"comm.codec": "int4", "outer.sync_every": 50}))
    assert plan_with_int4["sparseloco+overlap"].codec.name == "sparse+int2"
