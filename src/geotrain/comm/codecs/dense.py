"""Dense codecs: raw fp32, bf16, and blockwise-scaled int8, int4 and fp4 (E3M0).

int8 and int4 follow the blockwise absmax scheme used for int8 pseudo-gradients by OpenDiLoCo/INTELLECT-1
(arXiv 2407.07852): every block of ``block_size`` consecutive values gets one float32 scale
``s = absmax / L`` (L = 127 for int8, 7 for int4), values are stored as ``round(x / s)`` in [-L, L] and decoded
as ``q * s``, so ``|x - decode(x)| <= s / 2 = absmax / (2L)`` in every block.

fp4 is the 4-bit E3M0 format of Streaming DiLoCo (Douillard et al., arXiv 2501.18512, "4-bit (E3M0) outer
gradients with FP32 accumulation"): a sign bit and a 3-bit exponent, no mantissa. Exponent code 0 means zero
(like an IEEE exponent field of 0 with no mantissa bits) and codes m = 1..7 mean 2^(m-7), all times the block's
absmax. So a block holds 0 and +-absmax * {2^-6, ..., 2^-1, 1}; values round to the nearest power of two
(within a third of |x|) and those below 1.5 * 2^-7 * absmax to zero:
``|x - decode(x)| <= max(|x| / 3, 1.5 * 2^-7 * absmax)``. It is implemented but not registered (see Fp4Codec).

Speed (one core, see docs/codecs.md): every pass over a tensor that does not fit in the cache costs about as
much as the memcpy we compare against, so encode and decode walk the tensor in tiles of about 256 Ki values:
the first op of a tile pulls it into the cache and the remaining ops (absmax, scale, round, narrow, pack) run
on cached data. Per-op overhead in eager torch is ~5 us, which sets the tile size from below.

Blocks that do not fill a tile, and the last partial block, go through the same kernels; a partial block is
zero padded (zeros never change an absmax). Decoding always produces float32 (the sum over sites is then taken
in float32 by the caller).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from geotrain.comm.codecs.base import CODEC_IDS, Codec, CodecError, pad8, raise_nonfinite

__all__ = ["Fp32Codec", "Bf16Codec", "Int8Codec", "Int4Codec", "Fp4Codec", "DEFAULT_BLOCK"]

DEFAULT_BLOCK = 256
"""Default block size of the blockwise quantizers (see docs/codecs.md for the error/size trade-off)."""

TILE = 1 << 18
"""Values per tile of the encode/decode loops (1 MiB of float32): large enough that the ~10 eager ops per
tile cost little, small enough that a tile and its temporaries stay in the 1 MiB L2 / shared L3."""

_FLT_MIN = 2.0**-126
"""Smallest normal float32. Scales are clamped to it so that 1/scale is finite and scales are never
subnormal; an all-zero block then still decodes to exact zeros (0 * scale)."""

_BF16_MAX = float(torch.finfo(torch.bfloat16).max)


def _largest_scale(levels: float) -> float:
    """The largest float32 scale s with levels * s still finite in float32.

    Without this cap a block whose absmax is within an ulp of float32's max (3.4028235e38) gets the scale
    fl(absmax / 127), and decoding 127 * scale rounds up to Inf.
    """
    s = np.float32(np.finfo(np.float32).max / levels)
    with np.errstate(over="ignore"):
        while not np.isfinite(np.float32(levels) * s):
            s = np.nextafter(s, np.float32(0))
    return float(s)


def _tiles(n: int, step: int):
    for start in range(0, n, step):
        yield start, min(n, start + step)


# ------------------------------------------------------------------------------------------------------
# Raw formats
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Fp32Codec(Codec):
    """Raw little-endian float32: 4 bytes per value, lossless. The reference against which others are judged."""

    codec_id: ClassVar[int] = CODEC_IDS["fp32"]
    lossless: ClassVar[bool] = True

    @property
    def name(self) -> str:
        return "fp32"

    def _body_size(self, numel: int) -> int:
        return pad8(4 * numel)

    def _encode_body(self, x: torch.Tensor, body: torch.Tensor) -> None:
        n = x.numel()
        out = body[: 4 * n].view(torch.float32)
        body[4 * n :].zero_()
        total = 0.0
        for s, e in _tiles(n, TILE):
            out[s:e].copy_(x[s:e])
            # The sum of a tile is NaN/Inf if the tile holds any NaN/Inf (or, rarely, if finite values overflow
            # the sum; the exact check below then finds nothing). It reads the tile while it is cached.
            total += float(out[s:e].sum())
        if not torch.isfinite(torch.tensor(total)):
            raise_nonfinite(x)

    def _decode_body(self, body: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(body[: 4 * out.numel()].view(torch.float32))


@dataclass(frozen=True, kw_only=True, slots=True)
class Bf16Codec(Codec):
    """bfloat16 (round to nearest even): 2 bytes per value, ``|err| <= 2^-8 * |x|`` (8 significant bits;
    subnormals below 1.2e-38: ``|err| <= 2^-134``).

    Values beyond bfloat16's largest finite value (3.39e38, just under float32's 3.40e38) are clamped to it
    instead of becoming Inf, which stays within the same 2^-8 relative bound.
    """

    codec_id: ClassVar[int] = CODEC_IDS["bf16"]

    @property
    def name(self) -> str:
        return "bf16"

    def _body_size(self, numel: int) -> int:
        return pad8(2 * numel)

    def _encode_body(self, x: torch.Tensor, body: torch.Tensor) -> None:
        n = x.numel()
        out = body[: 2 * n].view(torch.bfloat16)
        body[2 * n :].zero_()
        total = 0.0
        for s, e in _tiles(n, TILE):
            out[s:e].copy_(x[s:e])
            total += float(out[s:e].sum(dtype=torch.float32))
        if not torch.isfinite(torch.tensor(total)):
            raise_nonfinite(x)  # raises if the input itself holds NaN/Inf
            # Finite input whose bf16 rounding overflowed (|x| > 3.396e38), or whose sum overflowed: clamp.
            out.copy_(x.clamp(-_BF16_MAX, _BF16_MAX))

    def _decode_body(self, body: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(body[: 2 * out.numel()].view(torch.bfloat16))


# ------------------------------------------------------------------------------------------------------
# Blockwise quantizers
# ------------------------------------------------------------------------------------------------------


class _Scratch:
    """Temporaries for one encode/decode call, sized for one tile of ``rows`` blocks."""

    __slots__ = ("f32", "i8", "i16a", "i16b", "i16c", "i16d", "i32a", "i32b", "col")

    def __init__(self, rows: int, block: int, *, fp4: bool = False) -> None:
        self.f32 = torch.empty(rows, block)
        self.i8 = torch.empty(rows, block, dtype=torch.int8)
        self.i16a = torch.empty(rows, block // 2, dtype=torch.int16)
        self.i16b = torch.empty(rows, block // 2, dtype=torch.int16)
        self.col = torch.empty(rows, 1)
        # Extra temporaries of the fp4 kernels only (allocating 3 MiB per call for nothing is not free).
        shape = (rows, block) if fp4 else (0, block)
        self.i16c = torch.empty(shape, dtype=torch.int16)
        self.i16d = torch.empty(shape, dtype=torch.int16)
        self.i32a = torch.empty(shape[0], block // 2, dtype=torch.int32)
        self.i32b = torch.empty(shape[0], block // 2, dtype=torch.int32)


class _BlockQuantizer(Codec):
    """Shared tile loop of the blockwise quantizers. Body: float32 scales [nblocks] | codes, each 8-aligned.

    A subclass defines ``_levels`` (scale = absmax / levels), the code bytes per value and two row kernels,
    which work on ``r`` whole blocks at a time:

    * ``_quantize_rows(xv (r, block) f32, ax (r, block) f32 = |xv|, inv (r, 1) = 1/scale, codes (r, cb) uint8, ws)``
    * ``_decode_rows(codes (r, cb) uint8, scale (r, 1), out (r, block) f32, ws)``
    """

    __slots__ = ()
    block_size: int
    _levels: ClassVar[float]
    _scale_max: ClassVar[float]  # _largest_scale(_levels)
    _code_bytes_num: ClassVar[int]  # code bytes per value = num / den
    _code_bytes_den: ClassVar[int]

    def _check_block(self) -> None:
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool):
            raise CodecError(f"block_size must be an int, got {self.block_size!r}")
        if not 2 <= self.block_size <= 1 << 24 or self.block_size % 2:
            raise CodecError(f"block_size must be an even number in [2, 16777216], got {self.block_size}")

    def _header_options(self) -> tuple[int, int, int, int]:
        return 0, self.block_size, 0, 0

    def _describe_options(self, value_id: int, a: int, b: int, c: int) -> str:
        return f"block_size={a}"

    def _nblocks(self, numel: int) -> int:
        return -(-numel // self.block_size)

    def _code_bytes(self, numel: int) -> int:
        return -(-numel * self._code_bytes_num // self._code_bytes_den)

    def _body_size(self, numel: int) -> int:
        return pad8(4 * self._nblocks(numel)) + pad8(self._code_bytes(numel))

    def _split_body(self, body: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        nb = self._nblocks(numel)
        off = pad8(4 * nb)
        scales = body[: 4 * nb].view(torch.float32).view(nb, 1)
        codes = body[off : off + self._code_bytes(numel)]
        return scales, codes

    def _encode_rows(
        self, xv: torch.Tensor, absmax: torch.Tensor, scale: torch.Tensor, codes: torch.Tensor, ws: _Scratch
    ) -> None:
        """Quantize whole blocks: write their absmax (r, 1), scales (r, 1) and codes (r, cb)."""
        r = xv.shape[0]
        # |x| first: it is the op that pulls the tile in from memory (an elementwise op streams better than a
        # row reduction), and the reductions and the fp4 exponent math then read it from the cache.
        ax = torch.abs(xv, out=ws.f32[:r])
        torch.amax(ax, 1, keepdim=True, out=absmax)  # NaN/Inf propagate; encode checks them once at the end
        torch.div(absmax, self._levels, out=scale).clamp_(_FLT_MIN, self._scale_max)
        inv = torch.reciprocal(scale, out=ws.col[:r])
        self._quantize_rows(xv, ax, inv, codes, ws)

    def _encode_body(self, x: torch.Tensor, body: torch.Tensor) -> None:
        numel, block = x.numel(), self.block_size
        scales, codes = self._split_body(body, numel)
        nfull = numel // block
        cb = block * self._code_bytes_num // self._code_bytes_den  # code bytes per full block
        rows = max(1, TILE // block)
        ws = _Scratch(min(rows, max(nfull, 1)), block, fp4=self.codec_id == CODEC_IDS["fp4"])
        absmax = torch.empty(scales.shape)  # kept apart from the (clamped) scales for the NaN/Inf check
        if nfull:
            # split() makes all tile views in one call: cheaper than slicing four tensors per tile.
            xt = x[: nfull * block].view(nfull, block).split(rows)
            ct = codes[: nfull * cb].view(nfull, cb).split(rows)
            for xv, av, sv, cv in zip(xt, absmax[:nfull].split(rows), scales[:nfull].split(rows), ct):
                self._encode_rows(xv, av, sv, cv, ws)
        rem = numel - nfull * block
        if rem:
            # The last partial block: zero pad it to a whole block and keep only the code bytes it needs.
            padded = torch.zeros(1, block)
            padded[0, :rem] = x[nfull * block :]
            tail_codes = torch.empty(1, cb, dtype=torch.uint8)
            self._encode_rows(padded, absmax[nfull:], scales[nfull:], tail_codes, ws)
            codes[nfull * cb :].copy_(tail_codes[0, : codes.numel() - nfull * cb])
        # Zero the alignment padding so that equal inputs give byte-identical payloads.
        off = pad8(4 * scales.numel())
        body[4 * scales.numel() : off].zero_()
        body[off + codes.numel() :].zero_()
        # A block's absmax is NaN/Inf exactly when the block holds NaN/Inf: one small check for the whole input.
        if not bool(torch.isfinite(absmax).all()):
            raise_nonfinite(x)

    def _decode_body(self, body: torch.Tensor, out: torch.Tensor) -> None:
        block, numel = self.block_size, out.numel()
        scales, codes = self._split_body(body, numel)
        # Only an encoder bug or a forged payload with a valid checksum gets here with bad scales; refuse it.
        if scales.numel() and not bool(((scales >= _FLT_MIN) & torch.isfinite(scales)).all()):
            raise CodecError("payload holds an invalid block scale (negative, zero, NaN or Inf)")
        nfull = numel // block
        cb = block * self._code_bytes_num // self._code_bytes_den
        rows = max(1, TILE // block)
        ws = _Scratch(min(rows, max(nfull, 1)), block, fp4=self.codec_id == CODEC_IDS["fp4"])
        if nfull:
            ct = codes[: nfull * cb].view(nfull, cb).split(rows)
            ot = out[: nfull * block].view(nfull, block).split(rows)
            for cv, sv, ov in zip(ct, scales[:nfull].split(rows), ot):
                self._decode_rows(cv, sv, ov, ws)
        rem = numel - nfull * block
        if rem:
            tail_codes = torch.zeros(1, cb, dtype=torch.uint8)
            tail_codes[0, : codes.numel() - nfull * cb] = codes[nfull * cb :]
            tail = torch.empty(1, block)
            self._decode_rows(tail_codes, scales[nfull:], tail, ws)
            out[nfull * block :] = tail[0, :rem]

    def _quantize_rows(
        self, xv: torch.Tensor, ax: torch.Tensor, inv: torch.Tensor, codes: torch.Tensor, ws: _Scratch
    ) -> None:
        raise NotImplementedError

    def _decode_rows(self, codes: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, ws: _Scratch) -> None:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True, slots=True)
class Int8Codec(_BlockQuantizer):
    """Blockwise absmax int8: 1 byte per value + 4 bytes per block. ``|err| <= absmax / 254`` per block."""

    block_size: int = DEFAULT_BLOCK
    """Values per scale. Smaller blocks isolate outliers better and cost 4/block extra bytes per value."""

    codec_id: ClassVar[int] = CODEC_IDS["int8"]
    _levels: ClassVar[float] = 127.0
    _scale_max: ClassVar[float] = _largest_scale(127.0)
    _code_bytes_num: ClassVar[int] = 1
    _code_bytes_den: ClassVar[int] = 1

    def __post_init__(self) -> None:
        self._check_block()

    @property
    def name(self) -> str:
        return "int8"

    def _quantize_rows(
        self, xv: torch.Tensor, ax: torch.Tensor, inv: torch.Tensor, codes: torch.Tensor, ws: _Scratch
    ) -> None:
        y = torch.mul(xv, inv, out=ax)  # in [-127, 127] up to float rounding, never past 127.5
        y.round_()  # half to even; float32 -> int8 below truncates, so round first
        codes.view(torch.int8).copy_(y)

    def _decode_rows(self, codes: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, ws: _Scratch) -> None:
        out.copy_(codes.view(torch.int8))
        out.mul_(scale)


class _Nibbles(_BlockQuantizer):
    """Two 4-bit codes per byte: value 2i in the low nibble, value 2i+1 in the high nibble.

    Packing and unpacking work on int16 views (two codes per int16, little-endian) so that every op is a
    contiguous vectorised op; strided even/odd views are 5-10x slower in eager torch, and int8 shifts are
    emulated on AVX2 (3x the cost of an int8 AND) while int16 shifts are native.
    """

    __slots__ = ()
    _code_bytes_num: ClassVar[int] = 1
    _code_bytes_den: ClassVar[int] = 2

    @staticmethod
    def _pack(q8: torch.Tensor, codes: torch.Tensor, ws: _Scratch, *, flip: int = 0) -> None:
        """q8 (r, block) int8 whose low nibbles are the codes -> codes (r, block/2) uint8.

        ``flip`` is XORed into every nibble (0x8 turns a two's complement nibble into offset binary).
        """
        r = q8.shape[0]
        m = torch.bitwise_and(q8.view(torch.int16), 0x0F0F, out=ws.i16a[:r])  # low nibbles of both bytes
        if flip:
            m.bitwise_xor_(flip * 0x0101)
        m.bitwise_or_(torch.bitwise_right_shift(m, 4, out=ws.i16b[:r]))  # low byte = lo | hi << 4
        codes.copy_(m)  # int16 -> uint8 keeps the low byte (modular conversion)

    @staticmethod
    def _unpack_unsigned(codes: torch.Tensor, ws: _Scratch) -> torch.Tensor:
        """codes (r, block/2) uint8 -> (r, block) uint8 view of the nibbles (0..15), in value order."""
        r = codes.shape[0]
        w = ws.i16a[:r]
        w.copy_(codes)  # zero-extend each byte into an int16: bits 0-3 = lo, bits 4-7 = hi
        w.bitwise_or_(torch.bitwise_left_shift(w, 4, out=ws.i16b[:r]))  # hi now also at bits 8-11
        return w.bitwise_and_(0x0F0F).view(torch.uint8)  # byte 2i = lo, byte 2i+1 = hi


@dataclass(frozen=True, kw_only=True, slots=True)
class Int4Codec(_Nibbles):
    """Blockwise absmax int4: 0.5 byte per value + 4 bytes per block. ``|err| <= absmax / 14`` per block.

    q = round(x / s) in -7..7 with s = absmax / 7, stored as the offset-binary nibble q + 8 (1..15).
    """

    block_size: int = DEFAULT_BLOCK
    """Values per scale (even). Smaller blocks isolate outliers better and cost 4/block extra bytes per value."""

    codec_id: ClassVar[int] = CODEC_IDS["int4"]
    _levels: ClassVar[float] = 7.0
    _scale_max: ClassVar[float] = _largest_scale(7.0)

    def __post_init__(self) -> None:
        self._check_block()

    @property
    def name(self) -> str:
        return "int4"

    def _quantize_rows(
        self, xv: torch.Tensor, ax: torch.Tensor, inv: torch.Tensor, codes: torch.Tensor, ws: _Scratch
    ) -> None:
        y = torch.mul(xv, inv, out=ax)
        y.round_()
        q8 = ws.i8[: xv.shape[0]]
        q8.copy_(y)  # -7..7 in two's complement; XOR 8 of its low nibble is q + 8
        self._pack(q8, codes, ws, flip=8)

    def _decode_rows(self, codes: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, ws: _Scratch) -> None:
        q = self._unpack_unsigned(codes, ws).view(torch.int8).sub_(8)  # q + 8 (1..15) -> q
        out.copy_(q)
        out.mul_(scale)


@dataclass(frozen=True, kw_only=True, slots=True)
class Fp4Codec(_Nibbles):
    """Blockwise E3M0 (sign + 3-bit exponent, no mantissa; Streaming DiLoCo): 0.5 byte per value + 4 per block.

    Nibble = p << 3 | m: m is the exponent code (0 is zero, 1..7 is 2^(m-7)), p is 1 for a positive value and
    0 for a negative one (inverted from IEEE so that the encoder's arithmetic lands on it for free; the decoder
    multiplies by -scale). The block scale is absmax itself.
    ``|err| <= max(|x| / 3, 1.5 * 2^-7 * absmax)`` per value: values round to the nearest power of two (within
    a third of |x|), and |x| < 1.5 * 2^-7 * absmax rounds to zero.

    Not registered in get_codec(): issue 3 wants fp4 only if it is about as fast as int4, and in eager
    torch it takes about 1.5x int4's encode+decode time (docs/codecs.md). It is kept, tested, so that it
    can be registered with one line if 4-bit floating point's accuracy on heavy tails is worth the time.
    """

    block_size: int = DEFAULT_BLOCK
    """Values per scale (even)."""

    codec_id: ClassVar[int] = CODEC_IDS["fp4"]
    _levels: ClassVar[float] = 1.0
    _scale_max: ClassVar[float] = _largest_scale(1.0)

    def __post_init__(self) -> None:
        self._check_block()

    @property
    def name(self) -> str:
        return "fp4"

    def _quantize_rows(
        self, xv: torch.Tensor, ax: torch.Tensor, inv: torch.Tensor, codes: torch.Tensor, ws: _Scratch
    ) -> None:
        r = xv.shape[0]
        # y = x / absmax in [-1, 1]. Rounding |y| to the nearest power of two is an integer add on its bit
        # pattern: half an exponent step (0x400000) carries into the exponent exactly when the mantissa is
        # >= 0.5, i.e. when |y| >= 1.5 * 2^k, the midpoint of 2^k and 2^(k+1). The sign bit is untouched since
        # the exponent field stays <= 127.
        bits = torch.mul(xv, inv, out=ax).view(torch.int32)
        bits.add_(0x00400000).bitwise_right_shift_(23)  # E for y >= 0, E - 256 for y < 0 (arithmetic shift)
        v = ws.i16c[:r]
        v.copy_(bits)  # both ranges fit int16
        # With m = clamp(E - 120, 0, 7): for y >= 0, clamp(v, 120, 127) = 120 + m and clamp(v, -136, -128) = -128,
        # which sum to m - 8 = m + 8 (mod 16); for y < 0 they are 120 and -136 + m, which sum to m - 16 = m
        # (mod 16). So the low nibble of the sum is p << 3 | m with p = 1 for y >= 0: no branches, no sign op.
        c1 = torch.clamp(v, 120, 127, out=ws.i16d[:r])
        v.clamp_(-136, -128).add_(c1)
        # Pack two int16 codes per byte through an int32 view: low nibble of each half, then hi << 4 | lo.
        w = torch.bitwise_and(v.view(torch.int32), 0x000F000F, out=ws.i32a[:r])
        w.bitwise_or_(torch.bitwise_right_shift(w, 12, out=ws.i32b[:r]))
        codes.copy_(w)  # int32 -> uint8 keeps the low byte

    def _decode_rows(self, codes: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, ws: _Scratch) -> None:
        n = self._unpack_unsigned(codes, ws)  # (r, block) uint8 nibbles p<<3 | m
        # float16 with exponent field m and no mantissa is 2^(m-15) for m >= 1 and exactly 0 for m = 0: the
        # E3M0 magnitude times 2^-8. Bit 3 (p) goes to the float16 sign bit, which makes positives negative;
        # the final multiply by -scale * 2^8 undoes both.
        w = ws.i16c[: codes.shape[0]]
        w.copy_(n)
        sign = torch.bitwise_and(w, 8, out=ws.i16d[: codes.shape[0]]).bitwise_left_shift_(12)
        w.bitwise_and_(7).bitwise_left_shift_(10).bitwise_or_(sign)
        out.copy_(w.view(torch.float16))
        factor = scale * -256.0
        if bool(torch.isinf(factor).any()):  # absmax > 1.3e36: apply 2^8 and the scale separately
            out.mul_(-256.0)
            factor = scale
        out.mul_(factor)
