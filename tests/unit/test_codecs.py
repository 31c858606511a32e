"""Codec round trips: error bounds as properties, exact sizes, accepted dtypes, extreme values, NaN/Inf.

Each codec's bound is checked against a reference computed here from the input (blockwise absmax, top-k by
magnitude), not from the payload, so a codec cannot pass by writing a wrong scale.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geotrain.comm.codecs import (
    Codec,
    CodecConfigError,
    CodecError,
    codec_names,
    get_codec,
)
from geotrain.comm.codecs.dense import Fp4Codec
from geotrain.errors import ConfigError

FLT_MIN = 2.0**-126
BF16_MAX = float(torch.finfo(torch.bfloat16).max)
PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DENSE = ["fp32", "bf16", "int8", "int4"]
TOPK = ["topk", "topk+bf16", "topk+int8", "topk+int4"]


def make(name: str, **opts) -> Codec:
    if name == "fp4":
        return Fp4Codec(**opts)
    return get_codec(name, **opts)


# --- inputs ---------------------------------------------------------------------------------------------

# Lengths: 1, odd, around block multiples, a few blocks.
lengths = st.one_of(st.integers(1, 9), st.integers(1, 1500), st.sampled_from([255, 256, 257, 511, 512, 513, 1023]))
kinds = st.sampled_from(["normal", "wide", "tiny", "huge", "sparse", "const", "zeros", "student"])


def sample(kind: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    if kind == "wide":  # mixed scales: 1e-30 .. 1e30 within one tensor (and within blocks)
        x = x * torch.pow(10.0, torch.randint(-30, 31, (n,), generator=g).float())
    elif kind == "tiny":
        x = x * 1e-37  # subnormal range after scaling
    elif kind == "huge":
        x = (x / x.abs().max().clamp_min(1e-30)) * 3.4e38
    elif kind == "sparse":
        x = x * (torch.rand(n, generator=g) < 0.05)
    elif kind == "const":
        x = torch.full((n,), -1.5e-3)
    elif kind == "zeros":
        x = torch.zeros(n)
    elif kind == "student":
        x = torch.distributions.StudentT(2.0).sample((n,)).float()
    return x


def block_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per-value absmax of its block (reference for the blockwise bounds)."""
    n = x.numel()
    nb = -(-n // block)
    padded = torch.zeros(nb * block, dtype=torch.float64)
    padded[:n] = x.double().abs()
    return padded.view(nb, block).amax(1, keepdim=True).expand(nb, block).reshape(-1)[:n]


def dense_bound(name: str, x: torch.Tensor, block: int) -> torch.Tensor:
    """The documented per-value error bound of a dense codec (float64), with float32 rounding slack."""
    ax = x.double().abs()
    if name == "fp32":
        return torch.zeros_like(ax)
    if name == "bf16":
        # Round to nearest with 8 significant bits: 2^-8 relative (also for the clamp beyond bf16's max);
        # subnormals: half the smallest spacing, 2^-134.
        return 2.0**-8 * ax + 2.0**-134
    am = block_absmax(x, block)
    if name in ("int8", "int4"):
        levels = 127.0 if name == "int8" else 7.0
        scale = torch.clamp(am / levels, min=FLT_MIN)
        return scale / 2 * (1 + 1e-5) + 1e-45
    if name == "fp4":
        scale = torch.clamp(am, min=FLT_MIN)
        return torch.maximum(ax / 3, 1.5 * 2.0**-7 * scale) * (1 + 1e-5) + 1e-45
    raise AssertionError(name)


# --- round-trip bounds --------------------------------------------------------------------------------


@PROPS
@given(
    name=st.sampled_from(["fp32", "bf16", "int8", "int4", "fp4"]),
    n=lengths,
    kind=kinds,
    seed=st.integers(0, 2**31 - 1),
    block=st.sampled_from([2, 16, 64, 256, 1024]),
)
def test_dense_round_trip_error_bound(name: str, n: int, kind: str, seed: int, block: int) -> None:
    opts = {"block_size": block} if name in ("int8", "int4", "fp4") else {}
    codec = make(name, **opts)
    x = sample(kind, n, seed)
    payload = codec.encode(x)
    assert payload.dtype == torch.uint8 and payload.dim() == 1
    assert payload.numel() == codec.encoded_size(n)
    y = codec.decode(payload)
    assert y.dtype == torch.float32 and y.shape == (n,)
    assert torch.isfinite(y).all()
    err = (x.double() - y.double()).abs()
    bound = dense_bound(name, x, block)
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), f"{name} block={block}: x={x[worst].item()} y={y[worst].item()}"
    if name == "fp32":
        assert torch.equal(x.view(torch.int32), y.view(torch.int32))  # bit exact, -0.0 included


@PROPS
@given(
    name=st.sampled_from(["int8", "int4", "fp4", "bf16"]),
    values=st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=300),
    block=st.sampled_from([2, 8, 256]),
)
def test_dense_bound_on_arbitrary_finite_floats(name: str, values: list[float], block: int) -> None:
    """Hypothesis' floats: float32 max, subnormals, -0.0, mixtures of all scales in one block."""
    x = torch.tensor(values, dtype=torch.float32)
    codec = make(name, **({"block_size": block} if name != "bf16" else {}))
    y = codec.decode(codec.encode(x))
    assert bool(((x.double() - y.double()).abs() <= dense_bound(name, x, block)).all())


@pytest.mark.parametrize("name", ["int8", "int4", "fp4"])
def test_bounds_are_attained_order_of_magnitude(name: str) -> None:
    """The stated bound is the right one: uniform data gets within a factor ~2 of it, not 100x below."""
    x = torch.linspace(-1, 1, 4096)
    codec = make(name, block_size=256)
    err = (x - codec.decode(codec.encode(x))).abs().max().item()
    stated = {"int8": 1 / 254, "int4": 1 / 14, "fp4": 1 / 6}[name]  # fp4: x/3 at |x| = 0.5 -> 1/6
    assert stated / 2 < err <= stated * (1 + 1e-5)


@pytest.mark.parametrize("name", ["int8", "int4", "fp4", "bf16", "fp32"] + TOPK)
@pytest.mark.parametrize("n", [1, 2, 3, 257, 5000])
def test_zeros_round_trip_exactly(name: str, n: int) -> None:
    codec = make(name)
    y = codec.decode(codec.encode(torch.zeros(n)))
    assert torch.equal(y, torch.zeros(n))


def test_zero_block_next_to_large_block_stays_zero() -> None:
    x = torch.cat([torch.zeros(256), torch.full((256,), 1e30), torch.zeros(3)])
    for name in ("int8", "int4", "fp4"):
        y = make(name, block_size=256).decode(make(name, block_size=256).encode(x))
        assert torch.equal(y[:256], torch.zeros(256)) and torch.equal(y[512:], torch.zeros(3))


@pytest.mark.parametrize("name", ["int8", "int4", "fp4", "bf16", "topk+int8", "topk+int4"])
def test_float32_max_does_not_decode_to_inf(name: str) -> None:
    """Regression: fl(FLT_MAX / 127) * 127 rounds up to Inf unless the scale is capped."""
    big = float(torch.finfo(torch.float32).max)
    x = torch.tensor([big, -big, big / 2, 1.0] * 64)
    opts = {"fraction": 0.5, "chunk": 4} if name.startswith("topk") else {}
    y = make(name, **opts).decode(make(name, **opts).encode(x))
    assert torch.isfinite(y).all()
    assert y[0].item() == pytest.approx(big, rel=2**-7) and y[1].item() == pytest.approx(-big, rel=2**-7)


@pytest.mark.parametrize("name", ["int8", "int4", "fp4"])
def test_extreme_scales_in_separate_blocks(name: str) -> None:
    """1e30, 1e-30 and 3.4e38 blocks each keep their own relative precision."""
    codec = make(name, block_size=4)
    x = torch.tensor([1e30, -5e29, 2.5e29, 1e29, 1e-30, -3e-31, 7e-31, 0.0, 3.4e38, -3.4e38, 1.0, 2.0])
    y = codec.decode(codec.encode(x))
    assert bool(((x.double() - y.double()).abs() <= dense_bound(name, x, 4)).all())
    assert torch.isfinite(y).all()


# --- top-k ----------------------------------------------------------------------------------------------


@PROPS
@given(
    n=st.integers(1, 3000),
    chunk=st.sampled_from([1, 7, 64, 256, 1000]),
    fraction=st.sampled_from([0.001, 0.01, 0.1, 0.33, 1.0]),
    kind=kinds,
    seed=st.integers(0, 2**31 - 1),
)
def test_topk_keeps_the_largest_exactly(n: int, chunk: int, fraction: float, kind: str, seed: int) -> None:
    codec = get_codec("topk", fraction=fraction, chunk=chunk)
    x = sample(kind, n, seed)
    payload = codec.encode(x)
    assert payload.numel() == codec.encoded_size(n)
    y = codec.decode(payload)
    k = codec.k
    for start in range(0, n, chunk):
        xc, yc = x[start : start + chunk], y[start : start + chunk]
        kc = k if xc.numel() == chunk else min(xc.numel(), math.ceil(k * xc.numel() / chunk))
        kept = yc != 0
        assert int(kept.sum()) <= kc
        # Kept values are exact; dropped values are no larger than the smallest kept one.
        assert torch.equal(yc[kept], xc[kept])
        if kept.any() and (~kept).any():
            assert xc[~kept].abs().max() <= xc[kept].abs().min()
        if not kept.any():
            assert int((xc != 0).sum()) == 0 or kc == 0
    if fraction == 1.0:
        assert torch.equal(y, x)


@PROPS
@given(
    values=st.sampled_from(["bf16", "int8", "int4"]),
    n=st.integers(1, 3000),
    chunk=st.sampled_from([16, 256, 1000]),
    fraction=st.sampled_from([0.02, 0.1, 0.5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_topk_quantized_values_bound(values: str, n: int, chunk: int, fraction: float, seed: int) -> None:
    """Kept entries have the value codec's error; dropped ones are at most the smallest kept magnitude."""
    codec = get_codec(f"topk+{values}", fraction=fraction, chunk=chunk, **({"block_size": 32} if values != "bf16" else {}))
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))  # continuous: no ties in magnitude
    y = codec.decode(codec.encode(x))
    # Reference top-k, chunk by chunk, and the kept values in payload order (chunk order).
    kept = torch.zeros(n, dtype=torch.bool)
    k = codec.k
    for start in range(0, n, chunk):
        xc = x[start : start + chunk]
        kc = k if xc.numel() == chunk else min(xc.numel(), math.ceil(k * xc.numel() / chunk))
        kept[start + xc.abs().topk(kc).indices] = True
        dropped = ~kept[start : start + chunk]
        if dropped.any():
            assert xc[dropped].abs().max() <= xc[~dropped].abs().min()
    assert torch.equal(y[~kept], torch.zeros(int((~kept).sum())))
    # The value codec's bound over the kept values. Their order inside a chunk is the encoder's; the blockwise
    # bound only needs the block's absmax, which the maximum over the whole kept set bounds from above.
    kx, ky = x[kept].double(), y[kept].double()
    if values == "bf16":
        bound = 2.0**-8 * kx.abs() + 2.0**-134
    else:
        levels = 127.0 if values == "int8" else 7.0
        bound = torch.full_like(kx, kx.abs().max().item() / levels / 2 * (1 + 1e-5))
    assert bool(((kx - ky).abs() <= bound).all())


def test_topk_large_chunk_uses_int32_indices() -> None:
    codec = get_codec("topk", fraction=0.001, chunk=100_000)
    x = torch.randn(250_000)
    y = codec.decode(codec.encode(x))
    assert codec.encoded_size(250_000) > get_codec("topk", fraction=0.001, chunk=65536).encoded_size(250_000) - 200
    top = x[:100_000].abs().topk(codec.k).indices
    assert torch.equal(y[:100_000][top], x[:100_000][top])


def test_topk_index_above_32767_survives_uint16_storage() -> None:
    x = torch.zeros(65536)
    x[65535] = 5.0
    x[40000] = -4.0
    y = get_codec("topk", fraction=2 / 65536, chunk=65536).decode(get_codec("topk", fraction=2 / 65536, chunk=65536).encode(x))
    assert torch.equal(y, x)


# --- sizes ----------------------------------------------------------------------------------------------


@PROPS
@given(
    name=st.sampled_from(codec_names()),
    n=st.integers(0, 5000),
    block=st.sampled_from([2, 64, 256, 4096]),
    chunk=st.sampled_from([1, 100, 4096]),
    fraction=st.floats(1e-4, 1.0),
)
def test_encoded_size_is_exact_and_data_independent(name: str, n: int, block: int, chunk: int, fraction: float) -> None:
    opts: dict = {}
    if name in ("int8", "int4", "topk+int8", "topk+int4"):
        opts["block_size"] = block
    if name.startswith("topk"):
        opts |= {"chunk": chunk, "fraction": fraction}
    codec = get_codec(name, **opts)
    sizes = {codec.encode(sample(kind, n, 1)).numel() for kind in ("normal", "zeros", "wide")} if n else {codec.encode(torch.zeros(0)).numel()}
    assert sizes == {codec.encoded_size(n)}
    assert codec.encoded_size(n) % 8 == 0


def test_bytes_per_value() -> None:
    n = 1 << 20
    assert get_codec("fp32").encoded_size(n) == 48 + 4 * n
    assert get_codec("bf16").encoded_size(n) == 48 + 2 * n
    assert get_codec("int8").encoded_size(n) == 48 + n + 4 * n // 256
    assert get_codec("int4").encoded_size(n) == 48 + n // 2 + 4 * n // 256
    k = math.ceil(0.01 * 4096)
    assert get_codec("topk", fraction=0.01).encoded_size(n) == 48 + (n // 4096) * k * (2 + 4)


# --- inputs we accept and reject --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", ["int8", "topk+int4", "fp32"])
def test_other_float_dtypes_are_converted_to_float32(dtype: torch.dtype, name: str) -> None:
    x = torch.randn(1000).to(dtype)
    codec = get_codec(name)
    assert torch.equal(codec.encode(x), codec.encode(x.float()))
    assert codec.decode(codec.encode(x)).dtype == torch.float32


def test_any_shape_and_non_contiguous_input_is_flattened() -> None:
    x = torch.randn(30, 40)
    codec = get_codec("int8")
    assert torch.equal(codec.encode(x.t()), codec.encode(x.t().reshape(-1)))
    assert codec.decode(codec.encode(x)).shape == (1200,)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64])
def test_non_float_input_is_rejected(dtype: torch.dtype) -> None:
    with pytest.raises(CodecError, match="floating-point"):
        get_codec("int8").encode(torch.zeros(10, dtype=dtype))
    with pytest.raises(CodecError, match="torch.Tensor"):
        get_codec("int8").encode([1.0, 2.0])  # type: ignore[arg-type]


@pytest.mark.parametrize("name", codec_names() + ["fp4"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_rejected_with_count_and_first_index(name: str, bad: float) -> None:
    x = torch.randn(3000)
    x[1234] = bad
    x[2999] = bad
    with pytest.raises(CodecError, match=r"2 non-finite values .* first is at index 1234"):
        make(name).encode(x)


def test_float64_beyond_float32_range_is_rejected() -> None:
    x = torch.ones(10, dtype=torch.float64)
    x[3] = 1e300
    with pytest.raises(CodecError, match="1 non-finite value .* index 3"):
        get_codec("int8").encode(x)


def test_bf16_clamps_finite_values_beyond_its_range() -> None:
    x = torch.tensor([3.4e38, -3.4e38, 1.0])
    y = get_codec("bf16").decode(get_codec("bf16").encode(x))
    assert torch.isfinite(y).all() and y[0] == BF16_MAX and y[1] == -BF16_MAX and y[2] == 1.0


def test_empty_tensor_round_trips() -> None:
    for name in codec_names():
        codec = get_codec(name)
        assert codec.decode(codec.encode(torch.zeros(0))).shape == (0,)


def test_encoding_is_deterministic() -> None:
    x = torch.randn(10_000)
    for name in codec_names():
        codec = get_codec(name)
        assert torch.equal(codec.encode(x), codec.encode(x.clone()))


def test_out_buffers() -> None:
    codec = get_codec("int4")
    x = torch.randn(5000)
    buf = torch.empty(codec.encoded_size(5000), dtype=torch.uint8)
    assert codec.encode(x, out=buf).data_ptr() == buf.data_ptr()
    dec = torch.empty(5000)
    assert codec.decode(buf, out=dec).data_ptr() == dec.data_ptr()
    assert torch.equal(dec, codec.decode(codec.encode(x)))
    with pytest.raises(CodecError, match="out must be"):
        codec.encode(x, out=torch.empty(10, dtype=torch.uint8))
    with pytest.raises(CodecError, match="out must be"):
        codec.decode(buf, out=torch.empty(4999))


# --- registry -------------------------------------------------------------------------------------------


def test_registry_names_and_options() -> None:
    assert codec_names() == ["fp32", "bf16", "int8", "int4", "topk", "topk+bf16", "topk+int8", "topk+int4",
                             "sparse+int2", "sparse+int4", "sparse+int8"]
    for name in codec_names():
        assert get_codec(name).name == name
    assert get_codec("topk+fp32").name == "topk"
    assert get_codec(" INT8 ").name == "int8"
    assert get_codec("int8", block_size=1024).block_size == 1024
    assert get_codec("topk+int8", fraction=0.01).k == 41
    assert get_codec("fp32").lossless and not get_codec("int8").lossless


@pytest.mark.parametrize(
    ("name", "opts", "match"),
    [
        ("int9", {}, "unknown codec 'int9'; choose one of fp32"),
        ("fp4", {}, "'fp4' is not enabled: the E3M0 4-bit float is implemented"),
        ("topk+fp4", {}, "is not enabled"),
        ("topk+int16", {}, "unknown codec"),
        ("int8", {"fraction": 0.1}, r"has no option fraction \(its options: block_size\)"),
        ("int8", {"block_size": 3}, "block_size must be an even number"),
        ("int8", {"block_size": 0}, "block_size must be an even number"),
        ("topk", {"fraction": 0.0}, r"fraction must be in \(0, 1\]"),
        ("topk", {"fraction": 1.5}, r"fraction must be in \(0, 1\]"),
        ("topk", {"chunk": 0}, "chunk must be"),
    ],
)
def test_bad_names_and_options_are_config_errors(name: str, opts: dict, match: str) -> None:
    with pytest.raises(CodecConfigError, match=match) as info:
        get_codec(name, **opts)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, CodecError)
    assert info.value.field == "codec"


def test_numpy_free_of_float_warnings() -> None:
    """The checksum's uint64 arithmetic wraps silently (no overflow warnings leak to users)."""
    with np.errstate(all="raise"):
        codec = get_codec("fp32")
        codec.decode(codec.encode(torch.full((100_000,), -1.0)))
