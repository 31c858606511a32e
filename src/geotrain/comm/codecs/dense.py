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

Speed (one core, see docs/codecs.md): encode and decode run fused numba kernels (``_kernels``) that read each
input value once and write each output value once; the JIT compiler is imported on first use and its output
cached on disk. A partial last block is treated as if zero padded (zeros never change an absmax). Decoding
always produces float32 (the sum over sites is then taken in float32 by the caller).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from geotrain.comm.codecs.base import (
    CODEC_IDS,
    SEGMENT_WORDS,
    Codec,
    CodecError,
    kernels,
    raise_nonfinite,
)
from geotrain.comm.codecs.layout import DEFAULT_BLOCK, block_body_size, check_block_size, plain_body_size

__all__ = ["Fp32Codec", "Bf16Codec", "Int8Codec", "Int4Codec", "Fp4Codec", "DEFAULT_BLOCK"]

TILE = 1 << 18
"""Values per tile of the eager loops that remain (top-k's row selection): 1 MiB of float32, large enough that
the per-op overhead of eager torch costs little, small enough that a tile stays in the 1 MiB L2 / shared L3."""

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


def _array(t: torch.Tensor) -> np.ndarray:
    """The numpy view of a contiguous CPU tensor (detached: a pseudo-gradient may still require grad)."""
    return t.detach().numpy()


def _reject_nonfinite(x: torch.Tensor) -> None:
    """Raise for an input a kernel found NaN or Inf in."""
    raise_nonfinite(x)
    raise AssertionError("a kernel reported a non-finite value that torch.isfinite does not see")


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
        return plain_body_size("fp32", numel)

    def _encode_body(self, x: torch.Tensor, body: torch.Tensor) -> tuple[int, int]:
        # The copy, the NaN/Inf check and the checksum in one pass.
        ok, s1, s2 = kernels().encode_fp32(_array(x).view(np.int32), _array(body), SEGMENT_WORDS)
        if not ok:
            _reject_nonfinite(x)
        return int(s1), int(s2)

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
        return plain_body_size("bf16", numel)

    def _encode_body(self, x: torch.Tensor, body: torch.Tensor) -> tuple[int, int]:
        ok, s1, s2 = kernels().encode_bf16(_array(x).view(np.int32), _array(body), SEGMENT_WORDS)
        if not ok:
            _reject_nonfinite(x)
        return int(s1), int(s2)

    def _decode_body(self, body: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(body[: 2 * out.numel()].view(torch.bfloat16))


# ------------------------------------------------------------------------------------------------------
# Blockwise quantizers
# ------------------------------------------------------------------------------------------------------


class _BlockQuantizer(Codec):
    """Blockwise quantizers. Body: float32 scales [nblocks] | codes, each section zero padded to 8 bytes.

    A subclass defines ``_levels`` (scale = absmax / levels) and ``_kernel``, the
    name of its kernel pair ``quantize_<kernel>`` / ``dequantize_<kernel>`` in ``_kernels``, called with the
    extra arguments ``_kernel_args``.
    """

    __slots__ = ()
    block_size: int
    _levels: ClassVar[float]
    _scale_max: ClassVar[float]  # _largest_scale(_levels)
    _kernel: ClassVar[str]
    _kernel_args: ClassVar[tuple] = ()

    def _check_block(self) -> None:
        try:
            check_block_size(self.block_size)
        except ValueError as exc:
            raise CodecError(str(exc)) from None

    def _header_options(self) -> tuple[int, int, int, int]:
        return 0, self.block_size, 0, 0

    def _describe_options(self, value_id: int, a: int, b: int, c: int) -> str:
        return f"block_size={a}"

    def _body_size(self, numel: int) -> int:
        return block_body_size(self.name, numel, self.block_size)

    def _encode_body(self, x: torch.Tensor, body: torch.Tensor) -> tuple[int, int]:
        quantize = getattr(kernels(), f"quantize_{self._kernel}")
        # bad is the first block whose absmax is NaN/Inf, which happens exactly when the block holds NaN/Inf.
        args = (self.block_size, self._levels, self._scale_max, SEGMENT_WORDS, *self._kernel_args)
        bad, s1, s2 = quantize(_array(x), _array(body), *args)
        if bad >= 0:
            _reject_nonfinite(x)
        return int(s1), int(s2)

    def _decode_body(self, body: torch.Tensor, out: torch.Tensor) -> None:
        dequantize = getattr(kernels(), f"dequantize_{self._kernel}")
        # Only an encoder bug or a forged payload with a valid checksum has bad scales; the kernel then writes
        # nothing and returns False.
        if not dequantize(_array(body), _array(out), self.block_size, *self._kernel_args):
            raise CodecError("payload holds an invalid block scale (negative, zero, NaN or Inf)")


@dataclass(frozen=True, kw_only=True, slots=True)
class Int8Codec(_BlockQuantizer):
    """Blockwise absmax int8: 1 byte per value + 4 bytes per block. ``|err| <= absmax / 254`` per block.

    q = round_half_even(x * (1 / s)) in -127..127 with s = max(absmax / 127, 2^-126), decoded as q * s.
    """

    block_size: int = DEFAULT_BLOCK
    """Values per scale. Smaller blocks isolate outliers better and cost 4/block extra bytes per value."""

    codec_id: ClassVar[int] = CODEC_IDS["int8"]
    _levels: ClassVar[float] = 127.0
    _scale_max: ClassVar[float] = _largest_scale(127.0)
    _kernel: ClassVar[str] = "int8"

    def __post_init__(self) -> None:
        self._check_block()

    @property
    def name(self) -> str:
        return "int8"


class _Nibbles(_BlockQuantizer):
    """Two 4-bit codes per byte: value 2i in the low nibble, value 2i+1 in the high nibble."""

    __slots__ = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class Int4Codec(_Nibbles):
    """Blockwise absmax int4: 0.5 byte per value + 4 bytes per block. ``|err| <= absmax / 14`` per block.

    q = round_half_even(x * (1 / s)) in -7..7 with s = max(absmax / 7, 2^-126), stored as the offset-binary
    nibble q + 8 (1..15).
    """

    block_size: int = DEFAULT_BLOCK
    """Values per scale (even). Smaller blocks isolate outliers better and cost 4/block extra bytes per value."""

    codec_id: ClassVar[int] = CODEC_IDS["int4"]
    _levels: ClassVar[float] = 7.0
    _scale_max: ClassVar[float] = _largest_scale(7.0)
    _kernel: ClassVar[str] = "nibbles"
    _kernel_args: ClassVar[tuple] = (False,)

    def __post_init__(self) -> None:
        self._check_block()

    @property
    def name(self) -> str:
        return "int4"


@dataclass(frozen=True, kw_only=True, slots=True)
class Fp4Codec(_Nibbles):
    """Blockwise E3M0 (sign + 3-bit exponent, no mantissa; Streaming DiLoCo): 0.5 byte per value + 4 per block.

    Nibble = p << 3 | m: m is the exponent code (0 is zero, 1..7 is 2^(m-7)), p is 1 for a positive value and
    0 for a negative one (inverted from IEEE so that the encoder's arithmetic lands on it for free; the decoder
    multiplies by -scale). The block scale is absmax itself.
    ``|err| <= max(|x| / 3, 1.5 * 2^-7 * absmax)`` per value: values round to the nearest power of two (within
    a third of |x|), and |x| < 1.5 * 2^-7 * absmax rounds to zero.

    Encoding rounds y = x / absmax to the nearest power of two with an integer add on its bit pattern: half an
    exponent step (0x400000) carries into the exponent exactly when the mantissa is >= 0.5, i.e. when
    |y| >= 1.5 * 2^k, the midpoint of 2^k and 2^(k+1). With E the bits shifted right by 23 (arithmetic: E - 256
    for y < 0) and m = clamp(E - 120, 0, 7), the low nibble of clamp(E, 120, 127) + clamp(E, -136, -128) is
    p << 3 | m: for y >= 0 the sum is m - 8, for y < 0 it is m - 16, with no branch and no separate sign op.

    Not registered in get_codec(): issue 3 wants fp4 only if it is about as fast as int4; with the numba kernels
    it takes 1.1-1.2x int4's encode+decode time (docs/codecs.md). It is kept, tested, so that it can be
    registered with one line if 4-bit floating point's accuracy on heavy tails is worth the time.
    """

    block_size: int = DEFAULT_BLOCK
    """Values per scale (even)."""

    codec_id: ClassVar[int] = CODEC_IDS["fp4"]
    _levels: ClassVar[float] = 1.0
    _scale_max: ClassVar[float] = _largest_scale(1.0)
    _kernel: ClassVar[str] = "nibbles"
    _kernel_args: ClassVar[tuple] = (True,)

    def __post_init__(self) -> None:
        self._check_block()

    @property
    def name(self) -> str:
        return "fp4"
