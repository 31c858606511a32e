"""Fused numba kernels of the codecs: one pass over the input per encode, one over the payload per decode.

Imported lazily (``base.kernels()``) on the first encode or decode, so that ``import geotrain`` does not pay
for importing numba and LLVM.

Each kernel reproduces, value for value, the float32 arithmetic of the eager torch code it replaced
(tests/unit/test_codecs_kernels.py checks byte-identical payloads against that reference):

* blockwise quantizers: ``absmax`` of the block, ``s = clamp(absmax / L, 2^-126, s_max)`` (a float32
  division), ``inv = 1 / s``, ``q = rint(x * inv)`` (round half to even), decoded as ``float32(q) * s``;
* bf16: round to nearest even on the bit pattern, like torch's conversion, with the clamp to bfloat16's largest
  finite value that the eager code applied to finite values that would round to Inf.

An encode kernel writes the whole body (padding included) and returns its checksum (base.body_checksum),
summing each 32 KiB segment as soon as it is written, while it is still in the cache.

Non-finite input is found for free: absmax is taken on the bit patterns (``bits & 0x7FFFFFFF`` orders
non-negative floats like integers, with Inf and NaN above every finite value), an integer max that vectorises
without fast-math. A kernel that meets a non-finite value returns at once and the caller raises with the exact
count (``base.raise_nonfinite``). No kernel uses fast-math: it would let LLVM drop the NaN/Inf handling and
change rounding.

Loops index with unsigned integers, for which numba skips its negative-index wraparound, so that LLVM
vectorises them. Helpers are inlined into the kernels.

Kernels are compiled on first use and cached on disk (``cache=True``): in the package's ``__pycache__`` when it
is writable, else in numba's user-wide cache directory (``$NUMBA_CACHE_DIR`` when set, else
``~/.cache/numba``). Where no cache directory is writable at all, they are compiled in every process instead.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

__all__ = [
    "checksum",
    "encode_fp32",
    "encode_bf16",
    "quantize_int8",
    "quantize_nibbles",
    "dequantize_int8",
    "dequantize_nibbles",
]

_OPTIONS = {"nogil": True, "error_model": "numpy", "boundscheck": False}


def _jit(fn, **options):
    try:
        return numba.njit(cache=True, **_OPTIONS, **options)(fn)
    except RuntimeError:  # numba found no writable cache directory: compile in each process instead
        return numba.njit(cache=False, **_OPTIONS, **options)(fn)


def _helper(fn):
    return _jit(fn, inline="always")


@intrinsic
def _bits(typingctx, x):
    """The int32 bit pattern of a float32 (a register move)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _float(typingctx, b):
    """The float32 whose bit pattern is the int32 ``b``."""
    if b != types.int32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


_ABS = np.int32(0x7FFFFFFF)
_INF_BITS = np.int32(0x7F800000)
_ONE = np.float32(1.0)
_FLT_MIN = np.float32(2.0**-126)  # the scale floor: 1/scale stays finite, and an all-zero block decodes to 0
_FLT_MAX = np.float32(3.4028235e38)


# -- checksum --------------------------------------------------------------------------------------------


@_helper
def _sums(words, j0, j1, segment):
    """(S1, S2) contributions of segments j0..j1-1: s_j = sum of the segment's words, (s_j, (j+1) s_j)."""
    s1 = np.uint64(0)
    s2 = np.uint64(0)
    for j in range(j0, j1):
        w = words[j * segment : min(j * segment + segment, words.size)]
        s = np.uint64(0)
        for i in range(w.size):
            s += w[i]
        s1 += s
        s2 += s * np.uint64(j + 1)
    return s1, s2


@_jit
def checksum(words, segment):
    """(S1, S2) of the body checksum over uint64 ``words`` cut into ``segment``-word segments (mod 2^64)."""
    return _sums(words, 0, (words.size + segment - 1) // segment, segment)


# -- raw formats -----------------------------------------------------------------------------------------


@_jit
def encode_fp32(x, body, segment):
    """Copy float32 bit patterns ``x`` (int32) into ``body`` (uint8) and zero its padding. Returns (finite,
    S1, S2); on a non-finite value it returns (False, 0, 0) at once."""
    n = x.size
    body[4 * n :] = 0
    out = body[: 4 * n].view(np.int32)
    words = body.view(np.uint64)
    per = 2 * segment  # values per segment
    s1 = np.uint64(0)
    s2 = np.uint64(0)
    for j in range((words.size + segment - 1) // segment):
        xs = x[j * per : min(j * per + per, n)]
        os = out[j * per : j * per + xs.size]
        m = np.int32(0)
        for i in range(xs.size):
            v = xs[i]
            os[i] = v
            m = max(m, np.int32(v & _ABS))  # np.int32: numba widens int32 & int32 to int64
        if m >= _INF_BITS:
            return False, np.uint64(0), np.uint64(0)
        d1, d2 = _sums(words, j, j + 1, segment)
        s1 += d1
        s2 += d2
    return True, s1, s2


@_jit
def encode_bf16(x, body, segment):
    """bfloat16 bit patterns of float32 bit patterns ``x`` (int32) into ``body``, rounded to nearest even;
    finite values that round past bfloat16's largest finite value are clamped to it. Returns as encode_fp32."""
    n = x.size
    body[2 * n :] = 0
    out = body[: 2 * n].view(np.int16)
    words = body.view(np.uint64)
    per = 4 * segment
    s1 = np.uint64(0)
    s2 = np.uint64(0)
    for j in range((words.size + segment - 1) // segment):
        xs = x[j * per : min(j * per + per, n)]
        os = out[j * per : j * per + xs.size]
        m = np.int32(0)
        for i in range(xs.size):
            v = xs[i]
            a = np.int32(v & _ABS)
            m = max(m, a)
            # |x| rounded to nearest even: at most 0x7F80 (Inf) for finite |x|, and no int32 overflow.
            r = np.int32(np.int32(a + np.int32(0x7FFF) + np.int32((a >> 16) & 1)) >> 16)
            r = min(r, np.int32(0x7F7F))  # Inf only from rounding here; NaN and Inf inputs are refused
            os[i] = np.int16(r | np.int32((v >> 16) & np.int32(-0x8000)))
        if m >= _INF_BITS:
            return False, np.uint64(0), np.uint64(0)
        d1, d2 = _sums(words, j, j + 1, segment)
        s1 += d1
        s2 += d2
    return True, s1, s2


# -- blockwise quantizers --------------------------------------------------------------------------------
#
# Block b covers x[lo:hi] with lo = b * block, hi = min(lo + block, n). The loops below index with unsigned
# integers (range(_U(lo), _U(hi))), for which numba skips its negative-index wraparound, so that LLVM
# vectorises them; per-block slices would do the same but cost reference counting on every block.

_U = np.uint64


@_helper
def _block_scale(x, lo, hi, levels, scale_max):
    """The scale of x[lo:hi], or -1 when it holds NaN or Inf."""
    m = np.int32(0)
    for i in range(_U(lo), _U(hi)):
        m = max(m, np.int32(_bits(x[i]) & _ABS))  # np.int32: numba widens int32 & int32 to int64
    if m >= _INF_BITS:
        return np.float32(-1.0)
    s = _float(np.int32(m)) / np.float32(levels)  # a float32 division, as torch.div did
    return min(max(s, _FLT_MIN), np.float32(scale_max))


@_helper
def _round(x, lo, hi, inv, q, q0):
    """q[q0 + i] = rint(x[lo + i] * inv) as int8, for i < hi - lo (round half to even)."""
    for i in range(_U(0), _U(hi - lo)):
        q[_U(q0) + i] = np.int8(np.rint(x[_U(lo) + i] * inv))


@_helper
def _fp4_nibble(y):
    """E3M0 code p << 3 | m of y = x / absmax in [-1, 1] (dense.Fp4Codec explains the arithmetic)."""
    e = np.int32(np.int32(_bits(y) + np.int32(0x00400000)) >> 23)  # E for y >= 0, E - 256 for y < 0
    v = np.int32(min(max(e, np.int32(-136)), np.int32(-128)) + min(max(e, np.int32(120)), np.int32(127)))
    return np.int32(v & 15)


@_helper
def _round_fp4(x, lo, hi, inv, t):
    for i in range(_U(0), _U(hi - lo)):
        t[i] = np.int8(_fp4_nibble(x[_U(lo) + i] * inv))


@_helper
def _pack(t, t16, m, codes, c0, flip):
    """codes[c0 + j] = t[2j] & 15 | (t[2j+1] & 15) << 4 for the m values in t, each nibble XOR ``flip``; an odd
    last value gets the high nibble 8, the code of the zero padding in int4 and fp4.

    ``t16`` is ``t`` (int8) read as uint16 pairs (little-endian: value 2j in the low byte), so that the loop is
    contiguous and vectorises; strided even/odd access does not.
    """
    for j in range(_U(0), _U(m >> 1)):
        w = np.int32(t16[j])
        codes[_U(c0) + j] = np.uint8(((w & 0x0F) | ((w >> 4) & 0xF0)) ^ (flip * 0x11))
    if m & 1:
        codes[c0 + (m >> 1)] = np.uint8(((np.int32(t[m - 1]) & 15) ^ flip) | 0x80)


@_helper
def _unpack(codes, c0, nbytes, t16):
    """t[2j] = codes[c0 + j] & 15, t[2j+1] = codes[c0 + j] >> 4 for j < nbytes, written as uint16 pairs."""
    for j in range(_U(0), _U(nbytes)):
        c = np.int32(codes[_U(c0) + j])
        t16[j] = np.uint16((c & 0x0F) | ((c & 0xF0) << 4))


@_helper
def _layout(n, body, block, ncode):
    """Views of a quantizer's body (float32 scales | ``ncode`` code bytes, each zero padded to 8 bytes), the
    body as uint64 words, and the offset of the codes."""
    nb = (n + block - 1) // block
    off = (4 * nb + 7) & ~7
    return body[: 4 * nb].view(np.float32), body[off : off + ncode], body.view(np.uint64), off


@_helper
def _start(body, scales, ncode, off, segment):
    """Zero the padding; return the first segment after the scales (segments before it are summed last)."""
    body[4 * scales.size : off] = 0
    body[off + ncode :] = 0
    words = body.size >> 3
    return min((off + 8 * segment - 1) // (8 * segment), (words + segment - 1) // segment)


@_helper
def _progress(words, written, done, segment, s1, s2):
    """Sum the segments that the first ``written`` bytes of the body now complete, from segment ``done``."""
    full = written // (8 * segment)
    if full > done:
        d1, d2 = _sums(words, done, full, segment)
        return full, s1 + d1, s2 + d2
    return done, s1, s2


@_helper
def _finish(words, first, done, segment, s1, s2):
    """Add the segments holding scales (before ``first``) and the ones not yet summed (from ``done``)."""
    d1, d2 = _sums(words, 0, first, segment)
    e1, e2 = _sums(words, done, (words.size + segment - 1) // segment, segment)
    return s1 + d1 + e1, s2 + d2 + e2


# A quantizer's encode kernel returns (-1, S1, S2), or (b, 0, 0) for the first block b that holds NaN or Inf
# (the body is then partly written). It sums each segment that holds only codes right after the block that
# completes it, while it is in the cache, and the segments holding scales at the end.


@_jit
def quantize_int8(x, body, block, levels, scale_max, segment):
    """int8 codes rint(x / s) in [-127, 127], one byte per value."""
    n = x.size
    scales, codes, words, off = _layout(n, body, block, n)
    done = first = _start(body, scales, n, off, segment)
    q = codes.view(np.int8)
    s1 = s2 = np.uint64(0)
    for b in range(scales.size):
        lo = b * block
        hi = min(lo + block, n)
        s = _block_scale(x, lo, hi, levels, scale_max)
        if s < 0:
            return b, np.uint64(0), np.uint64(0)
        scales[b] = s
        _round(x, lo, hi, _ONE / s, q, lo)
        done, s1, s2 = _progress(words, off + hi, done, segment, s1, s2)
    s1, s2 = _finish(words, first, done, segment, s1, s2)
    return -1, s1, s2


@_jit
def quantize_nibbles(x, body, block, levels, scale_max, segment, fp4):
    """4-bit codes, two values per byte: int4's nibble q + 8 (1..15) of q = rint(x / s) in [-7, 7], or with
    ``fp4`` the E3M0 nibble (the choice is made once per block, outside the per-value loops)."""
    n = x.size
    scales, codes, words, off = _layout(n, body, block, (n + 1) >> 1)
    done = first = _start(body, scales, codes.size, off, segment)
    t = np.empty(block, np.int8)  # one block's codes before packing
    t16 = t.view(np.uint16)  # block is even
    s1 = s2 = np.uint64(0)
    for b in range(scales.size):
        lo = b * block
        hi = min(lo + block, n)
        s = _block_scale(x, lo, hi, levels, scale_max)
        if s < 0:
            return b, np.uint64(0), np.uint64(0)
        scales[b] = s
        if fp4:
            _round_fp4(x, lo, hi, _ONE / s, t)
            _pack(t, t16, hi - lo, codes, lo >> 1, 0)
        else:
            _round(x, lo, hi, _ONE / s, t, 0)
            _pack(t, t16, hi - lo, codes, lo >> 1, 8)  # the nibble q + 8 is (q & 15) ^ 8
        done, s1, s2 = _progress(words, off + ((hi + 1) >> 1), done, segment, s1, s2)
    s1, s2 = _finish(words, first, done, segment, s1, s2)
    return -1, s1, s2


@_helper
def _fp4_value(c):
    """+-2^(m-7) (m = 1..7) or +-0.0 for nibble c = p << 3 | m; p = 1 is positive."""
    m = np.int32(c & 7)
    mag = np.int32((m + 120) << 23) if m != 0 else np.int32(0)  # exponent field m + 120 is 2^(m-7)
    return _float(np.int32(mag | np.int32(((c >> 3) ^ 1) << 31)))  # p = 0 sets the sign bit


@_helper
def _scales_valid(scales):
    """Every scale a normal positive float32 (NaN fails the comparison). A forged payload can hold others:
    the checksum guarantees what an encoder wrote, not that the encoder was right."""
    for b in range(scales.size):
        if not (_FLT_MIN <= scales[b] <= _FLT_MAX):
            return False
    return True


# A decode kernel returns False, writing nothing, when a scale is invalid.


@_jit
def dequantize_int8(body, out, block):
    n = out.size
    scales, codes, _, _ = _layout(n, body, block, n)
    if not _scales_valid(scales):
        return False
    q = codes.view(np.int8)
    for b in range(scales.size):
        s = scales[b]
        for i in range(_U(b * block), _U(min(b * block + block, n))):
            out[i] = np.float32(q[i]) * s
    return True


@_jit
def dequantize_nibbles(body, out, block, fp4):
    n = out.size
    scales, codes, _, _ = _layout(n, body, block, (n + 1) >> 1)
    if not _scales_valid(scales):
        return False
    t = np.empty(block, np.int8)  # one block's nibbles
    t16 = t.view(np.uint16)
    for b in range(scales.size):
        s = scales[b]
        lo = b * block
        hi = min(lo + block, n)
        _unpack(codes, lo >> 1, (hi - lo + 1) >> 1, t16)
        if fp4:
            # +-2^(m-7) * s: one rounding of the exact product, as the eager float16 route gave.
            for i in range(_U(0), _U(hi - lo)):
                out[_U(lo) + i] = _fp4_value(np.int32(t[i])) * s
        else:
            for i in range(_U(0), _U(hi - lo)):
                out[_U(lo) + i] = np.float32(np.int32(t[i]) - 8) * s
    return True
