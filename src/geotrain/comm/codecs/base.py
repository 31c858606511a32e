"""The codec contract, the payload header and its checksums.

A codec turns a 1-D float32 tensor into a 1-D ``torch.uint8`` payload and back. Payloads are plain uint8
tensors so that they go through gloo's ``all_gather`` unchanged, and the size of a payload depends only on
``numel`` and the codec's options (never on the data), so every site's payload has the same size.

Payload layout (little-endian), shared by every codec::

    offset size field
    0      4    magic b"GTCP"
    4      1    format version (1)
    5      1    codec id (1 fp32, 2 bf16, 3 int8, 4 int4, 5 fp4, 6 topk, 7 sparse)
    6      1    value codec id (topk only: the codec of the kept values; 0 otherwise)
    7      1    reserved, 0
    8      8    numel
    16     4    option a (quantizers and topk values: block size)
    20     4    option b (topk: chunk size)
    24     4    option c (topk: values kept per full chunk)
    28     4    CRC-32 of the 48 header bytes with this field zeroed
    32     8    body checksum S1
    40     8    body checksum S2
    48     ...  body, a multiple of 8 bytes (codec specific, zero padded)

Body checksum. zlib's CRC-32 runs at about 3.3 GB/s on one core here, which alone costs an int8 round trip
more than a memcpy of its input (see docs/codecs.md). We use a two-level additive checksum instead: the body
is read as little-endian uint64 words, cut into segments of 4096 words (32 KiB); s_j is the sum of segment j
mod 2^64, ``S1 = sum_j s_j`` and ``S2 = sum_j (j+1) * s_j`` (mod 2^64). It runs at memory speed in a numba
loop of unsigned (well-defined, wrapping) 64-bit adds. It detects every change confined to one
64-bit word (so every flipped byte or bit), truncation and padding (through the length check), reordered
segments (through S2), and random damage with probability 1 - 2^-64 or so. It does not detect two words
swapped inside one 32 KiB segment; TCP and Ethernet checksums sit under gloo for the wire itself, so this
checksum is a guard against software faults (wrong or stale buffers, bad offsets, truncation), which move or
damage whole regions. The 48-byte header itself is covered by a real CRC-32.
"""

from __future__ import annotations

import struct
import sys
import zlib
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import torch

from geotrain.comm.codecs.layout import HEADER_SIZE, pad8
from geotrain.comm.codecs.registry import CodecError

__all__ = ["Codec", "CodecError", "HEADER_SIZE", "CODEC_IDS", "pad8"]

# Views such as ``body.view(torch.float32)`` and the uint64 checksum words assume little-endian memory, which
# holds on every platform torch ships for (x86-64, aarch64).
assert sys.byteorder == "little", "geotrain codecs assume a little-endian machine"

MAGIC = b"GTCP"
VERSION = 1
_HEADER = struct.Struct("<4sBBBBQIIIIQQ")
assert _HEADER.size == HEADER_SIZE
_CRC_OFFSET = 28
SEGMENT_WORDS = 4096

CODEC_IDS: dict[str, int] = {"fp32": 1, "bf16": 2, "int8": 3, "int4": 4, "fp4": 5, "topk": 6, "sparse": 7}
_CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}

# Float dtypes that encode() converts to float32 (a copy). float64 values beyond the float32 range become
# Inf in that conversion and are then rejected like any other non-finite input.
_CONVERTIBLE = (torch.float16, torch.bfloat16, torch.float64)


_kernels = None


def kernels():
    """The numba kernel module ``_kernels``, imported (and numba with it) on the first encode or decode."""
    global _kernels
    if _kernels is None:
        from geotrain.comm.codecs import _kernels as module

        _kernels = module
    return _kernels


def body_checksum(body: torch.Tensor) -> tuple[int, int]:
    """(S1, S2) of a body (uint8 tensor, length a multiple of 8), as described in the module docstring."""
    s1, s2 = kernels().checksum(body.numpy().view(np.uint64), SEGMENT_WORDS)
    return int(s1), int(s2)


def raise_nonfinite(x: torch.Tensor, *, what: str = "input") -> None:
    """Raise CodecError naming how many values of ``x`` are NaN or Inf and where the first one is.

    Codecs detect non-finite input cheaply as a side effect of work they do anyway (a block's absmax or a
    sum turns NaN/Inf); only then is this exact and slower count made.
    """
    bad = ~torch.isfinite(x)
    count = int(bad.sum())
    if count == 0:
        return
    first = int(bad.nonzero()[0, 0])
    raise CodecError(
        f"{what} has {count} non-finite value{'s' if count > 1 else ''} (NaN or Inf) out of {x.numel()}; "
        f"the first is at index {first} (value {x[first].item()}). Pseudo-gradients must be finite: check the "
        "loss for divergence before syncing"
    )


def as_float32_vector(x: torch.Tensor) -> torch.Tensor:
    """The input of encode() as a 1-D contiguous float32 CPU tensor (a view of ``x`` when it already is one).

    Any shape is flattened. float16, bfloat16 and float64 are converted to float32; other dtypes are rejected.
    """
    if not isinstance(x, torch.Tensor):
        raise CodecError(f"encode() takes a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        if x.dtype not in _CONVERTIBLE:
            raise CodecError(
                f"encode() takes a floating-point tensor (float32, or float16/bfloat16/float64 which are "
                f"converted to float32), got {x.dtype}"
            )
        x = x.to(torch.float32)
    if x.device.type != "cpu":
        x = x.cpu()
    return x.reshape(-1).contiguous()


def as_payload(payload: torch.Tensor | bytes | bytearray | memoryview) -> torch.Tensor:
    """A payload as a 1-D contiguous uint8 CPU tensor whose data is 8-byte aligned (copied if it is not)."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        payload = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    if not isinstance(payload, torch.Tensor):
        raise CodecError(f"decode() takes a 1-D torch.uint8 tensor, got {type(payload).__name__}")
    if payload.dtype != torch.uint8 or payload.dim() != 1:
        raise CodecError(
            f"decode() takes a 1-D torch.uint8 tensor, got a {payload.dim()}-D {payload.dtype} tensor"
        )
    if payload.device.type != "cpu":
        payload = payload.cpu()
    # A payload sliced out of a larger receive buffer may start at any byte; the float32/uint64 views of
    # its body need alignment, so such a payload is copied once.
    if not payload.is_contiguous() or payload.data_ptr() % 8:
        payload = payload.clone()
    return payload


class Codec(ABC):
    """A pure encode/decode pair: no state between calls and no process groups.

    ``encode(x)`` takes a float tensor (flattened; float16/bfloat16/float64 are converted to float32) and
    returns a 1-D uint8 payload of exactly ``encoded_size(x.numel())`` bytes, header included. ``decode``
    returns a new 1-D float32 tensor of the original numel and raises CodecError, never garbage, on anything
    malformed. Subclasses implement the body: ``_body_size``, ``_encode_body`` and ``_decode_body``.
    """

    __slots__ = ()

    codec_id: ClassVar[int]
    lossless: ClassVar[bool] = False
    mean_over_senders: ClassVar[bool] = False
    """Receivers average each value over the accepted sites whose payload carries it (``carried``), not over all
    accepted sites. True for sparse payloads (SparseLoCo's reference, ``scatter_reduce(reduce="mean",
    include_self=False)``): a value one site of four sent is applied whole, not at a quarter, and a value no site
    sent stays 0."""

    def carried(self, payload: torch.Tensor) -> torch.Tensor:
        """Flat positions (int64, ascending within each chunk) of the values a payload carries, for a payload
        that ``decode`` accepted; only codecs with ``mean_over_senders`` have them."""
        raise NotImplementedError(f"{self.name} payloads carry every value")

    @property
    @abstractmethod
    def name(self) -> str:
        """The name get_codec() knows this codec by, e.g. ``"int8"`` or ``"topk+int8"``."""

    def _header_options(self) -> tuple[int, int, int, int]:
        """(value codec id, option a, option b, option c) as written to and checked against the header."""
        return 0, 0, 0, 0

    def _describe_options(self, value_id: int, a: int, b: int, c: int) -> str:
        return f"options ({value_id}, {a}, {b}, {c})"

    @abstractmethod
    def _body_size(self, numel: int) -> int:
        """Bytes of the body for ``numel`` values; a multiple of 8."""

    @abstractmethod
    def _encode_body(self, x: torch.Tensor, body: torch.Tensor) -> tuple[int, int] | None:
        """Write the body of ``x`` (1-D float32 contiguous) into ``body`` (uint8, ``_body_size`` bytes).

        Returns the body's checksum (S1, S2) when it computed it on the way (the fused kernels do), else None.
        Must raise CodecError (through ``raise_nonfinite``) when ``x`` holds NaN or Inf.
        """

    @abstractmethod
    def _decode_body(self, body: torch.Tensor, out: torch.Tensor) -> None:
        """Decode a checksum-verified body into ``out`` (1-D float32, the payload's numel).

        Must validate what the checksum cannot (a forged payload with a correct checksum) before writing
        anything that could be garbage, and raise CodecError instead.
        """

    # -- the public contract -------------------------------------------------------------------------

    def encoded_size(self, numel: int) -> int:
        """Exact byte size of ``encode(x)`` for a tensor of ``numel`` elements."""
        if numel < 0:
            raise CodecError(f"numel must be >= 0, got {numel}")
        return HEADER_SIZE + self._body_size(numel)

    def encode(self, x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Encode ``x`` into a 1-D uint8 payload (header included) and return it.

        ``out``, when given, is written instead of a new tensor: a contiguous 1-D uint8 CPU tensor of exactly
        ``encoded_size(x.numel())`` bytes, 8-byte aligned (for example a slice of a send buffer). Reusing
        buffers matters for large tensors: a fresh 64 MB tensor costs more in page faults than the encode.
        If encode raises (NaN or Inf in ``x``), the contents of ``out`` are unspecified.
        """
        x = as_float32_vector(x)
        numel = x.numel()
        size = self.encoded_size(numel)
        if out is None:
            payload = torch.empty(size, dtype=torch.uint8)
        else:
            if not (
                isinstance(out, torch.Tensor)
                and out.dtype == torch.uint8
                and out.dim() == 1
                and out.numel() == size
                and out.is_contiguous()
                and out.device.type == "cpu"
                and out.data_ptr() % 8 == 0
            ):
                raise CodecError(
                    f"out must be a contiguous 1-D uint8 CPU tensor of {size} bytes, 8-byte aligned; got "
                    f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
                )
            payload = out
        body = payload[HEADER_SIZE:]
        sums = self._encode_body(x, body)
        s1, s2 = body_checksum(body) if sums is None else sums
        value_id, a, b, c = self._header_options()
        _write_header(payload, self.codec_id, value_id, numel, a, b, c, s1, s2)
        return payload

    def decode(
        self, payload: torch.Tensor, *, numel: int | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Decode a payload into a 1-D float32 tensor (new, or ``out``) and return it.

        ``numel``, when given, is the number of values the caller expects; a payload of another length is
        rejected. ``out``, when given, is a contiguous 1-D float32 CPU tensor of the payload's numel that the
        values are written into (nothing is written when the payload is rejected). Raises CodecError for a short payload, wrong magic, unsupported version, another codec or
        other options, a bad header or body checksum, or a length that does not match the header's numel.
        """
        payload = as_payload(payload)
        size = payload.numel()
        if size < HEADER_SIZE:
            raise CodecError(
                f"payload is {size} bytes, shorter than the {HEADER_SIZE}-byte header (truncated or not a payload)"
            )
        header = bytes(payload[:HEADER_SIZE].numpy())
        magic, version, codec_id, value_id, _, hdr_numel, a, b, c, crc, s1, s2 = _HEADER.unpack(header)
        if magic != MAGIC:
            raise CodecError(f"not a geotrain codec payload: magic {magic!r}, expected {MAGIC!r}")
        zeroed = bytearray(header)
        zeroed[_CRC_OFFSET : _CRC_OFFSET + 4] = b"\0\0\0\0"
        if zlib.crc32(zeroed) != crc:
            raise CodecError("payload header checksum mismatch: the header was corrupted")
        if version != VERSION:
            raise CodecError(f"payload format version {version} is not supported (this geotrain reads {VERSION})")
        if codec_id != self.codec_id:
            got = _CODEC_NAMES.get(codec_id, f"unknown codec id {codec_id}")
            raise CodecError(f"payload was encoded with codec {got!r}; this codec is {self.name!r}")
        mine = self._header_options()
        if (value_id, a, b, c) != mine:
            raise CodecError(
                f"payload was encoded by {self.name!r} with {self._describe_options(value_id, a, b, c)}; "
                f"this codec has {self._describe_options(*mine)}"
            )
        expected = self.encoded_size(hdr_numel)
        if size != expected:
            raise CodecError(
                f"payload is {size} bytes but a {self.name!r} payload of {hdr_numel} values is {expected} bytes "
                "(truncated, padded, or numel corrupted)"
            )
        if numel is not None and numel != hdr_numel:
            raise CodecError(f"payload holds {hdr_numel} values, the caller expects {numel}")
        if out is not None and not (
            isinstance(out, torch.Tensor)
            and out.dtype == torch.float32
            and out.dim() == 1
            and out.numel() == hdr_numel
            and out.is_contiguous()
            and out.device.type == "cpu"
        ):
            raise CodecError(f"out must be a contiguous 1-D float32 CPU tensor of {hdr_numel} values")
        body = payload[HEADER_SIZE:]
        if body_checksum(body) != (s1, s2):
            raise CodecError("payload body checksum mismatch: the payload was corrupted in transit or in memory")
        if out is None:
            out = torch.empty(hdr_numel, dtype=torch.float32)
        self._decode_body(body, out)
        return out

    def __str__(self) -> str:
        return self.name


def _write_header(payload: torch.Tensor, codec_id: int, value_id: int, numel: int, a: int, b: int, c: int,
                  s1: int, s2: int) -> None:
    header = bytearray(_HEADER.pack(MAGIC, VERSION, codec_id, value_id, 0, numel, a, b, c, 0, s1, s2))
    struct.pack_into("<I", header, _CRC_OFFSET, zlib.crc32(header))
    payload.numpy()[:HEADER_SIZE] = np.frombuffer(header, dtype=np.uint8)


def poison_payload(payload: torch.Tensor) -> None:
    """Fill a payload's body with 0xFF bytes and re-seal its checksums, in place: a well-formed payload that
    decodes to NaN (fp32, bf16) or carries NaN block scales (int8, int4, top-k values), as a site with a bug
    or bad intent could send. For fault injection: receivers must reject it on its contents, not its checksum."""
    _, _, codec_id, value_id, _, numel, a, b, c, _, _, _ = _HEADER.unpack(bytes(payload[:HEADER_SIZE].numpy()))
    body = payload[HEADER_SIZE:]
    body.fill_(0xFF)
    s1, s2 = body_checksum(body)
    _write_header(payload, codec_id, value_id, numel, a, b, c, s1, s2)


def codec_name_of_id(codec_id: int) -> str:
    return _CODEC_NAMES.get(codec_id, f"<id {codec_id}>")
