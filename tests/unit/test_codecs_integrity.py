"""Malformed payloads: every corruption, truncation or mismatch raises CodecError, never garbage."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geotrain.comm.codecs import HEADER_SIZE, CodecError, codec_names, get_codec
from geotrain.comm.codecs.dense import Fp4Codec

PROPS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAMES = codec_names()


def payload_of(name: str, n: int = 3001, seed: int = 0) -> torch.Tensor:
    return get_codec(name).encode(torch.randn(n, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("name", NAMES)
def test_every_header_byte_is_protected(name: str) -> None:
    codec = get_codec(name)
    good = payload_of(name)
    for pos in range(HEADER_SIZE):
        for flip in (0x01, 0x80):
            bad = good.clone()
            bad[pos] ^= flip
            with pytest.raises(CodecError):
                codec.decode(bad)


@PROPS
@given(name=st.sampled_from(NAMES), frac=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_any_flipped_body_bit_is_detected(name: str, frac: float, bit: int) -> None:
    codec = get_codec(name)
    bad = payload_of(name).clone()
    pos = HEADER_SIZE + int(frac * (bad.numel() - HEADER_SIZE))
    bad[pos] ^= 1 << bit
    with pytest.raises(CodecError, match="body checksum mismatch"):
        codec.decode(bad)


@PROPS
@given(name=st.sampled_from(NAMES), start=st.floats(0, 1, exclude_max=True), length=st.integers(2, 64), seed=st.integers(0, 2**32 - 1))
def test_random_burst_damage_is_detected(name: str, start: float, length: int, seed: int) -> None:
    codec = get_codec(name)
    good = payload_of(name)
    bad = good.clone()
    pos = HEADER_SIZE + int(start * (bad.numel() - HEADER_SIZE - length))
    noise = torch.randint(0, 256, (length,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    bad[pos : pos + length] = noise
    if torch.equal(bad, good):
        return
    with pytest.raises(CodecError):
        codec.decode(bad)


def test_swapped_segments_are_detected() -> None:
    """Two 32 KiB segments of the body exchanged (a misordered copy) change S2."""
    codec = get_codec("fp32")
    good = codec.encode(torch.randn(40_000))
    bad = good.clone()
    a, b = HEADER_SIZE, HEADER_SIZE + 32768
    bad[a : a + 32768], bad[b : b + 32768] = good[b : b + 32768].clone(), good[a : a + 32768].clone()
    with pytest.raises(CodecError, match="body checksum"):
        codec.decode(bad)


@pytest.mark.parametrize("name", NAMES)
def test_truncated_and_padded_payloads(name: str) -> None:
    codec = get_codec(name)
    good = payload_of(name)
    for cut in (0, 1, HEADER_SIZE - 1):
        with pytest.raises(CodecError, match="shorter than the 48-byte header"):
            codec.decode(good[:cut])
    for cut in (HEADER_SIZE, good.numel() - 1, good.numel() - 8):
        with pytest.raises(CodecError, match="truncated"):
            codec.decode(good[:cut])
    with pytest.raises(CodecError, match="padded"):
        codec.decode(torch.cat([good, torch.zeros(8, dtype=torch.uint8)]))


def test_wrong_magic_version_codec_and_options() -> None:
    good = payload_of("int8")
    bad = good.clone()
    bad[:4] = torch.tensor(list(b"NOPE"), dtype=torch.uint8)
    with pytest.raises(CodecError, match="not a geotrain codec payload"):
        get_codec("int8").decode(bad)
    with pytest.raises(CodecError, match="encoded with codec 'int8'; this codec is 'int4'"):
        get_codec("int4").decode(good)
    with pytest.raises(CodecError, match="block_size=256; this codec has block_size=1024"):
        get_codec("int8", block_size=1024).decode(good)
    topk = get_codec("topk+int8", fraction=0.01).encode(torch.randn(5000))
    with pytest.raises(CodecError, match="values=int8, block_size=256, chunk=4096, k=41; this codec has values=int8, block_size=256, chunk=4096, k=82"):
        get_codec("topk+int8", fraction=0.02).decode(topk)
    with pytest.raises(CodecError, match="values=int8.*this codec has values=bf16"):
        get_codec("topk+bf16", fraction=0.01).decode(topk)


def test_version_from_the_future_is_refused() -> None:
    import struct
    import zlib

    good = payload_of("int8")
    header = bytearray(good[:HEADER_SIZE].numpy().tobytes())
    header[4] = 2
    header[28:32] = b"\0\0\0\0"
    struct.pack_into("<I", header, 28, zlib.crc32(header))
    bad = good.clone()
    bad[:HEADER_SIZE] = torch.frombuffer(header, dtype=torch.uint8)
    with pytest.raises(CodecError, match="format version 2 is not supported"):
        get_codec("int8").decode(bad)


def test_numel_mismatch_with_the_caller() -> None:
    good = payload_of("int4", n=3001)
    assert get_codec("int4").decode(good, numel=3001).shape == (3001,)
    with pytest.raises(CodecError, match="holds 3001 values, the caller expects 3000"):
        get_codec("int4").decode(good, numel=3000)


def test_payload_types() -> None:
    good = payload_of("bf16")
    codec = get_codec("bf16")
    assert torch.equal(codec.decode(bytes(good.numpy())), codec.decode(good))
    with pytest.raises(CodecError, match="1-D torch.uint8"):
        codec.decode(good.to(torch.int16))
    with pytest.raises(CodecError, match="1-D torch.uint8"):
        codec.decode(good.view(1, -1))
    with pytest.raises(CodecError, match="1-D torch.uint8"):
        codec.decode("payload")  # type: ignore[arg-type]


def test_misaligned_payload_slice_decodes() -> None:
    """A payload at an odd offset of a receive buffer (as after all_gather into one flat tensor) still works."""
    codec = get_codec("int8")
    x = torch.randn(1001)
    payload = codec.encode(x)
    buffer = torch.zeros(payload.numel() + 3, dtype=torch.uint8)
    buffer[3:] = payload
    assert torch.equal(codec.decode(buffer[3:]), codec.decode(payload))


def test_forged_payload_with_valid_checksum_is_still_refused() -> None:
    """A buggy encoder that writes a NaN scale or an out-of-range index, with correct checksums."""
    from geotrain.comm.codecs.base import body_checksum

    def reseal(p: torch.Tensor) -> torch.Tensor:
        import struct
        import zlib

        s1, s2 = body_checksum(p[HEADER_SIZE:])
        header = bytearray(p[:HEADER_SIZE].numpy().tobytes())
        struct.pack_into("<QQ", header, 32, s1, s2)
        header[28:32] = b"\0\0\0\0"
        struct.pack_into("<I", header, 28, zlib.crc32(header))
        p[:HEADER_SIZE] = torch.frombuffer(header, dtype=torch.uint8)
        return p

    p = payload_of("int8")
    p[HEADER_SIZE : HEADER_SIZE + 4] = torch.frombuffer(bytearray(torch.tensor([float("nan")]).numpy().tobytes()), dtype=torch.uint8)
    with pytest.raises(CodecError, match="invalid block scale"):
        get_codec("int8").decode(reseal(p))
    codec = get_codec("topk", fraction=0.01, chunk=1000)
    p = codec.encode(torch.randn(3000))
    p[HEADER_SIZE : HEADER_SIZE + 2] = torch.tensor([0xE8, 0x03], dtype=torch.uint8)  # index 1000 in a chunk of 1000
    with pytest.raises(CodecError, match="index outside its chunk"):
        codec.decode(reseal(p))


def test_fp4_payloads_are_protected_too() -> None:
    codec = Fp4Codec()
    good = codec.encode(torch.randn(1000))
    bad = good.clone()
    bad[-1] ^= 0x10
    with pytest.raises(CodecError):
        codec.decode(bad)
