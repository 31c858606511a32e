"""Error feedback: the sum of what was decoded over R rounds tracks the sum of the inputs, with an error that
stays bounded as R grows (it is exactly one residual), while without feedback a biased codec drifts."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geotrain.comm.codecs import CodecError, ErrorFeedback, get_codec

PROPS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run_rounds(codec_name: str, rounds: int, n: int, seed: int, **opts) -> tuple[list[float], float, ErrorFeedback]:
    """max |sum(decoded) - sum(inputs)| after each round, the largest input magnitude, and the feedback."""
    codec = get_codec(codec_name, **opts)
    ef = ErrorFeedback(codec)
    g = torch.Generator().manual_seed(seed)
    # A persistent direction plus noise, like pseudo-gradients: biased codecs would accumulate the bias.
    bias = torch.randn(n, generator=g) * 0.3
    sent = torch.zeros(n, dtype=torch.float64)
    got = torch.zeros(n, dtype=torch.float64)
    gaps, biggest = [], 0.0
    for _ in range(rounds):
        x = bias + torch.randn(n, generator=g)
        biggest = max(biggest, x.abs().max().item())
        payload = ef.encode(x)
        sent += x.double()
        got += codec.decode(payload).double()
        gaps.append((sent - got).abs().max().item())
    return gaps, biggest, ef


@pytest.mark.parametrize("name", ["bf16", "int8", "int4"])
def test_quantizer_sum_error_is_one_round_of_error(name: str) -> None:
    gaps, biggest, ef = run_rounds(name, rounds=200, n=2000, seed=1)
    # The gap is -residual, and the residual is one quantization error of (x + residual): absmax/(2L) scale.
    per_round = {"bf16": 2.0**-8, "int8": 1 / 254, "int4": 1 / 14}[name] * (biggest * 1.5)
    assert max(gaps) <= per_round
    assert gaps[-1] == pytest.approx(ef.residual.abs().max().item(), rel=1e-3, abs=1e-6)


@PROPS
@given(
    name=st.sampled_from(["topk", "topk+int8", "topk+int4", "topk+bf16"]),
    fraction=st.sampled_from([0.01, 0.05, 0.2]),
    chunk=st.sampled_from([64, 500]),
    seed=st.integers(0, 2**31 - 1),
)
def test_topk_sum_error_is_bounded_and_does_not_grow(name: str, fraction: float, chunk: int, seed: int) -> None:
    opts = {"fraction": fraction, "chunk": chunk} | ({"block_size": 32} if name in ("topk+int8", "topk+int4") else {})
    gaps, biggest, _ = run_rounds(name, rounds=240, n=1000, seed=seed, **opts)
    # Top-k keeps k of d = chunk values: ||v - topk(v)||^2 <= (1 - k/d) ||v||^2 per chunk (a contraction), so
    # the residual of error feedback is bounded by q/(1-q) * max ||x_chunk|| with q = sqrt(1 - k/d) < 1,
    # independent of the number of rounds. The value quantizer adds a little; allow a factor 2.
    k = max(1, math.ceil(fraction * chunk))
    q = math.sqrt(1 - k / chunk)
    chunk_norm = biggest * math.sqrt(chunk)
    bound = 2 * (q / (1 - q) + 1) * chunk_norm
    assert max(gaps) <= bound
    # Not growing: the late rounds are no worse than twice the worst of the early ones (a random walk would
    # grow by sqrt(4) = 2 from round 60 to 240, a drift by 4).
    assert max(gaps[180:]) <= 2.0 * max(max(gaps[:60]), 1e-6)


def test_without_feedback_the_topk_sum_drifts() -> None:
    """The control: the same codec without error feedback loses most of the sum, and more every round."""
    codec = get_codec("topk", fraction=0.01, chunk=500)
    g = torch.Generator().manual_seed(0)
    bias = torch.randn(1000, generator=g)
    sent = got = torch.zeros(1000, dtype=torch.float64)
    for _ in range(100):
        x = bias + 0.1 * torch.randn(1000, generator=g)
        sent = sent + x.double()
        got = got + codec.decode(codec.encode(x)).double()
    gaps_no_ef = (sent - got).abs().max().item()
    gaps_ef, _, _ = run_rounds("topk", rounds=100, n=1000, seed=0, fraction=0.01, chunk=500)
    assert gaps_no_ef > 50 and gaps_no_ef > 3 * gaps_ef[-1]


def test_failed_encode_leaves_the_residual_alone() -> None:
    ef = ErrorFeedback(get_codec("int4"))
    ef.encode(torch.randn(100))
    before = ef.residual.clone()
    bad = torch.randn(100)
    bad[7] = float("nan")
    with pytest.raises(CodecError, match="index 7"):
        ef.encode(bad)
    assert torch.equal(ef.residual, before)


def test_residual_equals_what_the_receiver_lost() -> None:
    codec = get_codec("topk+int8", fraction=0.05, chunk=100)
    ef = ErrorFeedback(codec)
    x1, x2 = torch.randn(1000), torch.randn(1000)
    p1 = ef.encode(x1)
    assert torch.allclose(ef.residual, x1 - codec.decode(p1))
    r1 = ef.residual.clone()
    p2 = ef.encode(x2)
    assert torch.allclose(ef.residual, x2 + r1 - codec.decode(p2), atol=1e-6)


def test_lossless_codec_has_no_residual_and_decay() -> None:
    ef = ErrorFeedback(get_codec("fp32"))
    x = torch.randn(10)
    assert torch.equal(get_codec("fp32").decode(ef.encode(x)), x)
    assert ef.residual is None
    decayed = ErrorFeedback(get_codec("topk", fraction=0.1, chunk=10), decay=0.5)
    decayed.encode(torch.ones(10))
    r = decayed.residual.clone()
    p = decayed.encode(torch.zeros(10))
    assert torch.allclose(decayed.residual + get_codec("topk", fraction=0.1, chunk=10).decode(p), 0.5 * r)


def test_shape_mismatch_state_dict_and_reset() -> None:
    ef = ErrorFeedback(get_codec("int8"))
    ef.encode(torch.randn(50))
    with pytest.raises(CodecError, match="residual of 50 values but got 60"):
        ef.encode(torch.randn(60))
    state = ef.state_dict()
    other = ErrorFeedback(get_codec("int8"))
    other.load_state_dict(state)
    x = torch.randn(50)
    assert torch.equal(other.encode(x), ef.encode(x))
    ef.reset()
    assert ef.residual is None
    ef.encode(torch.randn(60))
    with pytest.raises(CodecError, match="wraps a Codec"):
        ErrorFeedback("int8")  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="decay"):
        ErrorFeedback(get_codec("int8"), decay=1.5)
