"""Payload sizes of the codecs, as pure arithmetic (no torch).

The size of a payload depends only on the number of values and the codec's options, never on the data
(``base.py`` explains the format). The codecs (``dense.py``, ``topk.py``) compute their sizes here, and so
does the planner through the codec registry (``registry.py``): a plan and a run count the same bytes.
"""

from __future__ import annotations

import math

__all__ = [
    "DEFAULT_BLOCK",
    "DEFAULT_CHUNK",
    "DEFAULT_FRACTION",
    "HEADER_SIZE",
    "VALUE_CODECS",
    "block_body_size",
    "check_block_size",
    "check_topk",
    "pad8",
    "plain_body_size",
    "SPARSE_BITS",
    "check_segments",
    "check_sparse",
    "sparse_body_size",
    "sparse_counts",
    "sparse_segments",
    "sparse_index_bits",
    "topk_body_size",
    "topk_k",
    "topk_kept",
]

HEADER_SIZE = 48
"""Bytes of the header every payload starts with (``base.py``)."""
DEFAULT_BLOCK = 256
"""Default block size of the blockwise quantizers (see docs/codecs.md for the error/size trade-off)."""
DEFAULT_CHUNK = 4096
"""Default chunk of the top-k codecs."""
DEFAULT_FRACTION = 0.01
"""Default share of each chunk that top-k keeps."""
VALUE_CODECS = ("fp32", "bf16", "int8", "int4")
"""Codecs the kept values of top-k can be stored with."""

# Bytes per value of the code section, as (numerator, denominator): two 4-bit codes share a byte.
_CODE_BYTES = {"int8": (1, 1), "int4": (1, 2), "fp4": (1, 2)}
_PLAIN_BYTES = {"fp32": 4, "bf16": 2}


def pad8(nbytes: int) -> int:
    """``nbytes`` rounded up to a multiple of 8, so that every body section starts 8-byte aligned."""
    return (nbytes + 7) & ~7


def check_block_size(block_size: object) -> int:
    """The block size of a blockwise quantizer, or ValueError: an even int in [2, 2^24]."""
    if not isinstance(block_size, int) or isinstance(block_size, bool):
        raise ValueError(f"block_size must be an int, got {block_size!r}")
    if not 2 <= block_size <= 1 << 24 or block_size % 2:
        raise ValueError(f"block_size must be an even number in [2, 16777216], got {block_size}")
    return block_size


def check_topk(fraction: object, chunk: object, values: object) -> None:
    """Raise ValueError unless ``fraction`` is in (0, 1], ``chunk`` an int in [1, 2^30] and ``values`` a value codec."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
    if not 0.0 < fraction <= 1.0 or math.isnan(fraction):
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or not 1 <= chunk <= 1 << 30:
        raise ValueError(f"chunk must be an int in [1, 2^30], got {chunk!r}")
    if values not in VALUE_CODECS:
        raise ValueError(f"values must be one of {', '.join(VALUE_CODECS)}; got {values!r}")


def plain_body_size(kind: str, numel: int) -> int:
    """Body bytes of ``fp32`` or ``bf16``: the values themselves."""
    return pad8(_PLAIN_BYTES[kind] * numel)


def block_body_size(kind: str, numel: int, block_size: int) -> int:
    """Body bytes of a blockwise quantizer (``int8``, ``int4``, ``fp4``): float32 scales, then the codes."""
    num, den = _CODE_BYTES[kind]
    return pad8(4 * -(-numel // block_size)) + pad8(-(-numel * num // den))


def topk_k(fraction: float, chunk: int) -> int:
    """Entries top-k keeps per full chunk: ceil(fraction * chunk), at least 1."""
    # round() first so that fraction * chunk = 40.000000000000004 does not become 41.
    return max(1, min(chunk, math.ceil(round(fraction * chunk, 9))))


def topk_kept(numel: int, fraction: float, chunk: int) -> int:
    """Entries kept from ``numel`` values: k per full chunk, ceil(k * r / chunk) of a last partial chunk of r."""
    k = topk_k(fraction, chunk)
    nfull, rem = divmod(numel, chunk)
    return nfull * k + (0 if rem == 0 else min(rem, -(-k * rem // chunk)))


def topk_index_bytes(chunk: int) -> int:
    """Bytes per stored index: uint16 within chunks of up to 65536 values, else int32."""
    return 2 if chunk <= 1 << 16 else 4


def topk_body_size(numel: int, *, fraction: float, chunk: int, values: str, block_size: int) -> int:
    """Body bytes of top-k: chunk-local indices, then the kept values in the value codec's body format."""
    kept = topk_kept(numel, fraction, chunk)
    if values in _PLAIN_BYTES:
        value_body = plain_body_size(values, kept)
    else:
        value_body = block_body_size(values, kept, block_size)
    return pad8(kept * topk_index_bytes(chunk)) + value_body


SPARSE_BITS = (2, 4, 8)
"""Bits per kept value the packed sparse codecs (``sparse+int2`` ...) store: one sign bit and the magnitude."""


def check_sparse(fraction: object, chunk: object, bits: object) -> None:
    """Raise ValueError unless ``fraction`` is in (0, 1], ``chunk`` an int in [2, 2^24] and ``bits`` in SPARSE_BITS."""
    check_topk(fraction, chunk, "fp32")
    if chunk < 2 or chunk > 1 << 24:
        raise ValueError(f"chunk must be an int in [2, 16777216], got {chunk!r}")
    if bits not in SPARSE_BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, SPARSE_BITS))}; got {bits!r}")


def sparse_index_bits(chunk: int) -> int:
    """Bits of one chunk-relative index: ceil(log2(chunk)) (12 for chunks of 4096)."""
    return max(1, (chunk - 1).bit_length())


def sparse_segments(numel: int, segments: tuple[int, ...] = ()) -> tuple[int, ...]:
    """The tensors a sparse payload of ``numel`` values is cut into: ``segments`` (the numels of consecutive
    tensors) when they add up to ``numel``, else the whole payload as one (a worker's shard of a model)."""
    return tuple(segments) if segments and sum(segments) == numel else (numel,)


def sparse_counts(numel: int, *, fraction: float, chunk: int, segments: tuple[int, ...] = ()) -> tuple[int, int]:
    """(kept entries, chunks) of a packed sparse payload. Each segment is cut into chunks of ``chunk`` values
    (a chunk never crosses a segment's end); a full chunk keeps k = ``topk_k``, a shorter one (a small tensor,
    or the tail of a segment) of r values keeps min(k, r), as the reference clamps its top-k to the chunk."""
    k = topk_k(fraction, chunk)
    kept = chunks = 0
    for n in sparse_segments(numel, segments):
        nfull, rem = divmod(n, chunk)
        kept += nfull * k + min(k, rem)
        chunks += nfull + (rem > 0)
    return kept, chunks


def sparse_body_size(numel: int, *, fraction: float, chunk: int, bits: int, segments: tuple[int, ...] = ()) -> int:
    """Body bytes of a packed sparse payload: the kept entries' chunk-relative indices packed at
    ``sparse_index_bits(chunk)`` bits each, one float32 scale per chunk, then the values packed at ``bits`` each."""
    kept, chunks = sparse_counts(numel, fraction=fraction, chunk=chunk, segments=segments)
    return pad8(-(-kept * sparse_index_bits(chunk) // 8)) + pad8(4 * chunks) + pad8(-(-kept * bits // 8))


def check_segments(segments: object) -> None:
    """Raise ValueError unless ``segments`` is a tuple of non-negative ints."""
    if not isinstance(segments, tuple) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in segments):
        raise ValueError(f"segments must be a tuple of tensor sizes (non-negative ints), got {segments!r}")
