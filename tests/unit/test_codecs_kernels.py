"""The numba kernels against the eager torch code they replaced: byte-identical payloads, identical decodes.

Two references:

* SHA-256 digests of whole payloads (header and checksums included) that the eager implementation (geotrain
  before the kernels) produced for fixed inputs: the payloads did not change by a single byte;
* an eager torch implementation of every body format below, the same ops the eager codecs ran (absmax, divide,
  clamp, reciprocal, multiply, round half to even, narrow, pack), run on many more inputs: random,
  heavy-tailed, zero, tiny (1e-37), subnormal, huge (3e38), float32 max, exact rounding ties, odd lengths,
  block sizes 2..1024, and bodies of many 32 KiB checksum segments (the kernels sum segments as they go).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geotrain.comm.codecs import HEADER_SIZE, CodecError, get_codec
from geotrain.comm.codecs.dense import Fp4Codec

FLT_MIN = 2.0**-126
FLT_MAX = float(np.finfo(np.float32).max)
BF16_MAX = float(torch.finfo(torch.bfloat16).max)
SEGMENT_WORDS = 4096
LEVELS = {"int8": 127.0, "int4": 7.0, "fp4": 1.0}
PROPS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make(name: str, block: int | None = None):
    opts = {} if block is None else {"block_size": block}
    return Fp4Codec(**opts) if name == "fp4" else get_codec(name, **opts)


# --- the eager reference ----------------------------------------------------------------------------------


def ref_checksum(body: bytes) -> tuple[int, int]:
    """The body checksum as the eager code computed it, in numpy's wrapping uint64 arithmetic."""
    words = np.frombuffer(body, dtype=np.uint64)
    nseg = -(-words.size // SEGMENT_WORDS)
    sums = np.array(
        [np.add.reduce(words[j * SEGMENT_WORDS : (j + 1) * SEGMENT_WORDS], dtype=np.uint64) for j in range(nseg)],
        dtype=np.uint64,
    )
    s2 = np.add.reduce(sums * np.arange(1, nseg + 1, dtype=np.uint64), dtype=np.uint64)
    return int(np.add.reduce(sums, dtype=np.uint64)), int(s2)


def pad8(b: bytes) -> bytes:
    return b + bytes(-len(b) % 8)


def largest_scale(levels: float) -> float:
    s = np.float32(FLT_MAX / levels)
    with np.errstate(over="ignore"):
        while not np.isfinite(np.float32(levels) * s):
            s = np.nextafter(s, np.float32(0))
    return float(s)


def ref_blocks(x: torch.Tensor, block: int, levels: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales (nb, 1), x / s before rounding (nb, block)) of the zero-padded blocks, as the eager code did."""
    nb = -(-x.numel() // block)
    v = torch.zeros(nb * block)
    v[: x.numel()] = x
    v = v.view(nb, block)
    scale = torch.div(v.abs().amax(1, keepdim=True), levels).clamp_(FLT_MIN, largest_scale(levels))
    return scale, torch.mul(v, torch.reciprocal(scale))


def pack(nibbles: torch.Tensor, n: int) -> bytes:
    """Value 2i in the low nibble, 2i+1 in the high one; ceil(n / 2) bytes."""
    pairs = nibbles.reshape(-1, 2).to(torch.int32)
    return (pairs[:, 0] | pairs[:, 1] << 4).to(torch.uint8).numpy().tobytes()[: -(-n // 2)]


def unpack(codes: bytes, n: int) -> torch.Tensor:
    c = torch.frombuffer(bytearray(codes), dtype=torch.uint8).to(torch.int32)
    return torch.stack([c & 15, c >> 4], 1).reshape(-1)[:n]


def ref_body(name: str, x: torch.Tensor, block: int) -> bytes:
    n = x.numel()
    if name == "fp32":
        return pad8(x.numpy().tobytes())
    if name == "bf16":  # the eager code clamped only when a value rounded to Inf; clamping first is the same
        return pad8(x.clamp(-BF16_MAX, BF16_MAX).to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    scale, y = ref_blocks(x, block, LEVELS[name])
    if name == "int8":
        codes = y.round().to(torch.int8).numpy().tobytes()[:n]
    elif name == "int4":
        codes = pack((y.round().to(torch.int8).to(torch.int32) & 15) ^ 8, n)
    else:  # fp4: the nearest power of two by an integer add on the bit pattern (dense.Fp4Codec)
        e = (y.contiguous().view(torch.int32) + 0x00400000) >> 23
        codes = pack((e.clamp(120, 127) + e.clamp(-136, -128)) & 15, n)
    return pad8(scale.numpy().tobytes()) + pad8(codes)


def ref_decode(name: str, body: bytes, n: int, block: int) -> torch.Tensor:
    if name == "fp32":
        return torch.frombuffer(bytearray(body[: 4 * n]), dtype=torch.float32)
    if name == "bf16":
        return torch.frombuffer(bytearray(body[: 2 * n]), dtype=torch.bfloat16).float()
    nb = -(-n // block)
    scale = torch.frombuffer(bytearray(body[: 4 * nb]), dtype=torch.float32).repeat_interleave(block)[:n]
    codes = body[(4 * nb + 7) & ~7 :]
    if name == "int8":
        return torch.frombuffer(bytearray(codes[:n]), dtype=torch.int8).float() * scale
    nib = unpack(codes[: -(-n // 2)], n)
    if name == "int4":
        return (nib - 8).float() * scale
    # fp4, the eager route: float16 with exponent field m and sign bit p (positives negative), times -256 * s.
    h = (((nib & 8) << 12) | ((nib & 7) << 10)).to(torch.int16).view(torch.float16).float()
    factor = scale * -256.0
    return torch.where(torch.isinf(factor), (h * -256.0) * scale, h * factor)


# --- inputs -------------------------------------------------------------------------------------------------


def sample(kind: str, n: int, seed: int, block: int = 256) -> torch.Tensor:
    """Test inputs from numpy's legacy RandomState, whose streams are fixed across numpy versions."""
    rs = np.random.RandomState(seed)
    x = rs.standard_normal(n).astype(np.float32)
    if kind == "student":
        x = rs.standard_t(2, n).astype(np.float32)
    elif kind == "zeros":
        x = np.zeros(n, np.float32)
    elif kind == "negzeros":
        x = -np.zeros(n, np.float32)
    elif kind == "tiny":
        x = (x * 1e-37).astype(np.float32)
    elif kind == "subnormal":
        x = (x * 1e-42).astype(np.float32)
    elif kind == "huge":
        x = (x / np.abs(x).max() * 3e38).astype(np.float32)
    elif kind == "fmax":
        x = np.where(rs.rand(n) < 0.3, np.float32(FLT_MAX), x) * np.sign(rs.standard_normal(n)).astype(np.float32)
    elif kind == "wide":
        x = (x * 10.0 ** rs.randint(-30, 31, n)).astype(np.float32)
    elif kind in ("ties8", "ties4"):
        # Scale exactly 1 (the block's first value is the absmax 127 or 7), so every x.5 is a rounding tie.
        top = 127 if kind == "ties8" else 7
        x = (rs.randint(-2 * top, 2 * top + 1, n) / 2).astype(np.float32)
        x[::block] = top
    elif kind == "sparse":
        x = x * (rs.rand(n) < 0.05)
    elif kind == "bits":  # random finite bit patterns: every exponent, subnormals, -0.0
        x = rs.randint(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
        x = np.where(np.isfinite(x), x, np.float32(1.0))
    elif kind != "normal":
        raise AssertionError(kind)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


KINDS = ["normal", "student", "zeros", "negzeros", "tiny", "subnormal", "huge", "fmax", "wide", "ties8", "ties4",
         "sparse", "bits"]  # fmt: skip
DENSE = ["fp32", "bf16", "int8", "int4", "fp4"]


def check_against_reference(name: str, x: torch.Tensor, block: int) -> None:
    codec = make(name, None if name in ("fp32", "bf16") else block)
    payload = codec.encode(x)
    want = ref_body(name, x, block)
    got = payload[HEADER_SIZE:].numpy().tobytes()
    if got != want:
        first = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        raise AssertionError(f"{name} block={block} n={x.numel()}: body byte {first} differs")
    header = payload[:HEADER_SIZE].numpy()
    assert (int(header[32:40].view(np.uint64)[0]), int(header[40:48].view(np.uint64)[0])) == ref_checksum(want)
    y = codec.decode(payload)
    assert torch.equal(y.view(torch.int32), ref_decode(name, want, x.numel(), block).view(torch.int32))


@pytest.mark.parametrize("name", DENSE)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("n", "block"), [(1, 2), (3, 2), (255, 16), (257, 256), (1001, 1024), (4097, 256), (70_001, 256), (20_001, 2)]
)
def test_payloads_and_decodes_match_the_eager_reference(name: str, kind: str, n: int, block: int) -> None:
    check_against_reference(name, sample(kind, n, seed=n + block, block=block), block)


@pytest.mark.parametrize("name", ["int8", "int4", "fp4", "bf16", "fp32"])
def test_bodies_of_many_segments(name: str) -> None:
    """Bodies of ~40 checksum segments, a scales region that spans segments (block 4), odd lengths."""
    for n, block in [(300_001, 256), (300_001, 4), (262_144, 1024)]:
        check_against_reference(name, sample("student", n, seed=7, block=block), block)


@PROPS
@given(
    name=st.sampled_from(DENSE),
    values=st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=600),
    block=st.sampled_from([2, 4, 8, 256]),
)
def test_arbitrary_finite_floats_match_the_eager_reference(name: str, values: list[float], block: int) -> None:
    check_against_reference(name, torch.tensor(values, dtype=torch.float32), block)


# --- golden payloads of the eager implementation ---------------------------------------------------------

# (codec, options, kind, n, seed) -> SHA-256 of the whole payload, produced by the eager torch codecs that the
# kernels replaced.
GOLDEN_CASES = [
    (name, opts, kind, n, seed)
    for name, opts in [
        ("fp32", {}),
        ("bf16", {}),
        ("int8", {}),
        ("int8", {"block_size": 2}),
        ("int4", {}),
        ("int4", {"block_size": 64}),
        ("fp4", {}),
        ("topk+int8", {"fraction": 0.05, "chunk": 1000}),
        ("topk+int4", {"fraction": 0.05, "chunk": 1000}),
        ("topk+bf16", {"fraction": 0.05, "chunk": 1000}),
    ]
    for kind, n, seed in [("student", 70_001, 1), ("wide", 4097, 2), ("tiny", 333, 3), ("ties4", 1001, 4)]
]
GOLDEN: dict[str, str] = {
    "fp32 [] student 70001 1":
        "1f0747bbbdb5de2408ae065a6e6b703c1231c68cadd2f52d774492c3bd857e13",
    "fp32 [] wide 4097 2":
        "d278b56b2d7729912e2d3ca092f79afd2d97e94fb9998cde21a73e3ae3a3612b",
    "fp32 [] tiny 333 3":
        "2fd037277133e9add1cba279dbf3bc5d6f7f13afcbe3c74cd7e792eacdba7175",
    "fp32 [] ties4 1001 4":
        "085d75c69b5e08fabf273f096dd151e4a8908818d6f93d0103800833ce9fe926",
    "bf16 [] student 70001 1":
        "57a374a9ac90678782b2b383c8001fbd001365a989b5539726db2c77345c483e",
    "bf16 [] wide 4097 2":
        "59122f061dce03ea449f9c9b2e1e69b6d2d45e4423058923b2c76118a7e079c4",
    "bf16 [] tiny 333 3":
        "c57572ca5734196e7df70c71fc029e5fb3447b98a80561bb80eba9f462021a03",
    "bf16 [] ties4 1001 4":
        "820ca8644bc89b283133e32ad1775f485d35d1965adbe406d462d33613234e2b",
    "int8 [] student 70001 1":
        "517524a21079e36c56ca67ec5f53ae7063d7029e17fbd1e68a9f43a5d32cb44f",
    "int8 [] wide 4097 2":
        "f06416233c41d21ec0bbaf603920b2b5da529831c542e6491070aebb2a54e8f4",
    "int8 [] tiny 333 3":
        "4938771dbd5feb1196635428e9a2c91cbb55f9482e3d702d7e25a199e260629e",
    "int8 [] ties4 1001 4":
        "23ab9f5cc1877f5ae53db8232f7a7367c30cef9eabd2d0b744e882f8abf99db6",
    "int8 [('block_size', 2)] student 70001 1":
        "4c87152ffa3394df795a251a169e86712a0ac9cdd8ac66442115c22cb3a7c361",
    "int8 [('block_size', 2)] wide 4097 2":
        "627330afbfec40a0fc063976734388842986012c207b8c6fadc2669d3391c037",
    "int8 [('block_size', 2)] tiny 333 3":
        "dba0ea5dc3f11fd0dcf4ca726b9a5a98d566f90a24f92778736256e678d36a3a",
    "int8 [('block_size', 2)] ties4 1001 4":
        "8834809241bb1dd4d41928dbba4e72741c4a8b1f617f6ca5700de819841e82f5",
    "int4 [] student 70001 1":
        "20db176decc23cf4d970b9af7da9b5ad7c624c7b0b2c742f18408ce4a6683afc",
    "int4 [] wide 4097 2":
        "3038955bb8f6048d5a9d942a4a32580e69ba633d40f2f8c252f117f5750eae73",
    "int4 [] tiny 333 3":
        "1a3840c4b0bcc6bac37839c600e9dcae5dc685dc9518f9cfa8e072d41199fd1a",
    "int4 [] ties4 1001 4":
        "bf99bc38a1b253c1497e2e4aeb294e782e337c7ee9b0e81a3cd92f02fd5cf86a",
    "int4 [('block_size', 64)] student 70001 1":
        "463ae82a5693b0ce677b9024b526a939ac975c5979b0c2e357db4b17b8d09d67",
    "int4 [('block_size', 64)] wide 4097 2":
        "094f7b5eb69595d9914c08958dc7f0dfde770cd39950a4035f16812a706e8eb8",
    "int4 [('block_size', 64)] tiny 333 3":
        "c99f43034a1196afe63cd5429d4129357526ef139a869318c778cc695c2fd0e8",
    "int4 [('block_size', 64)] ties4 1001 4":
        "c81ddcb94b0acd65d575490f03b549bb7bb08769cfc1d630293b9689f2e51d21",
    "fp4 [] student 70001 1":
        "82c46e65892d640c5b374a29c3a3016031c1b12d6693fe8ad0ee8a180f06d242",
    "fp4 [] wide 4097 2":
        "24d5f2c92040555427872e6f3d19d8c3b9572dd8f7c0ac247cd18367bbc1702e",
    "fp4 [] tiny 333 3":
        "a4f3b56db01b751711b2af59a648c4649e19da2f22fd7a88ea1af80952a2ca2b",
    "fp4 [] ties4 1001 4":
        "137dcfc559dd953de80f11c9e1766efd236aca7d01540f03f85ef3569d68a79d",
    "topk+int8 [('chunk', 1000), ('fraction', 0.05)] student 70001 1":
        "1183685cd8addaa08adea1463c597cdb66ddbee2848eee8e7bc4a48179a6bc4c",
    "topk+int8 [('chunk', 1000), ('fraction', 0.05)] wide 4097 2":
        "eff673f4147734091e46da9bf8589033c6fbf2d2513b409a79d8c5d40ccb1161",
    "topk+int8 [('chunk', 1000), ('fraction', 0.05)] tiny 333 3":
        "73b90d06c04dfd33c7d49c3777d22f150f74edf314aff26d8f72742c5cc52b7d",
    "topk+int8 [('chunk', 1000), ('fraction', 0.05)] ties4 1001 4":
        "67bc6db24dfac923ef49f6fabeec24caccad7e8447fbc2b58f0f39696a07e6fd",
    "topk+int4 [('chunk', 1000), ('fraction', 0.05)] student 70001 1":
        "edc890c2773d06e9bc40b9c9b937bd19472f1c08a479850a8fe0f66e2441af21",
    "topk+int4 [('chunk', 1000), ('fraction', 0.05)] wide 4097 2":
        "68093f67e75a463a77f3fc6b5b94a7f4ebb1eddb8cbef0fc36961c961f9967de",
    "topk+int4 [('chunk', 1000), ('fraction', 0.05)] tiny 333 3":
        "29643fbd88123598beb85f9281106836ff4c183c765b59fbfee63063acd316f8",
    "topk+int4 [('chunk', 1000), ('fraction', 0.05)] ties4 1001 4":
        "bf9c6ac5f8ff48117a93dc062eb5ef6003427ff6de6b10072900c1d1dad9622d",
    "topk+bf16 [('chunk', 1000), ('fraction', 0.05)] student 70001 1":
        "ee54c247a41e97ce24e2f9802f7b50b2105333dddae5494e799e1ee6d3c2145b",
    "topk+bf16 [('chunk', 1000), ('fraction', 0.05)] wide 4097 2":
        "92c5247a67eed0ef9650687f9dc68fa78f5c1e8511d0f884bcc13efff2ed70b5",
    "topk+bf16 [('chunk', 1000), ('fraction', 0.05)] tiny 333 3":
        "a8644ce0fba26a3cdefaa31b28eddd73c66c0505025474105604a64872225979",
    "topk+bf16 [('chunk', 1000), ('fraction', 0.05)] ties4 1001 4":
        "2cc67497923e0e7c9a73df5c8d0b8f88996f3e4d92af27d7462796d80b7d944b",
}


def golden_key(name: str, opts: dict, kind: str, n: int, seed: int) -> str:
    return f"{name} {sorted(opts.items())} {kind} {n} {seed}"


def golden_digest(name: str, opts: dict, kind: str, n: int, seed: int) -> str:
    codec = Fp4Codec(**opts) if name == "fp4" else get_codec(name, **opts)
    return hashlib.sha256(codec.encode(sample(kind, n, seed)).numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("case", GOLDEN_CASES, ids=lambda c: golden_key(*c))
def test_payloads_are_byte_identical_to_the_eager_codecs(case: tuple) -> None:
    assert golden_digest(*case) == GOLDEN[golden_key(*case)]


# --- failure paths and the lazy import -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["int8", "int4", "fp4", "bf16", "fp32"])
@pytest.mark.parametrize("where", [0, 1000, 69_999])
def test_nan_anywhere_is_refused(name: str, where: int) -> None:
    x = sample("normal", 70_000, seed=5)
    x[where] = float("nan")
    with pytest.raises(CodecError, match=f"1 non-finite value .* index {where} "):
        make(name).encode(x)


@pytest.mark.parametrize("name", ["int8", "int4", "fp4"])
def test_invalid_scale_leaves_out_untouched(name: str) -> None:
    """A payload whose scale is NaN is refused before anything is written to out (checksums made valid)."""
    codec = make(name)
    payload = codec.encode(sample("normal", 1000, seed=6))
    body = payload[HEADER_SIZE:]
    body[4:8] = torch.tensor([0, 0, 0xC0, 0x7F], dtype=torch.uint8)  # the second block's scale: NaN
    s1, s2 = ref_checksum(body.numpy().tobytes())
    header = payload[:HEADER_SIZE].numpy()
    header[32:48] = np.array([s1, s2], dtype=np.uint64).view(np.uint8)
    header[28:32] = 0
    header[28:32] = np.array([zlib.crc32(header.tobytes())], dtype=np.uint32).view(np.uint8)
    out = torch.full((1000,), 7.0)
    with pytest.raises(CodecError, match="invalid block scale"):
        codec.decode(payload, out=out)
    assert torch.equal(out, torch.full((1000,), 7.0))


@pytest.mark.slow  # starts a process
def test_importing_the_codecs_does_not_import_numba() -> None:
    code = "import sys, geotrain, geotrain.comm.codecs; assert 'numba' not in sys.modules, 'numba imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
