"""Packed chunked top-k with low-bit values: the compressor of SparseLoCo (``sparse+int2``, ``+int4``, ``+int8``).

Sarfi et al., "Communication Efficient LLM Pre-training with SparseLoCo", arXiv 2508.15706: chunked top-k at
1-3% density with 2-bit values. The plain top-k codecs (``topk.py``) store each index as a uint16 and the values
at 4 bits or more, so at 1% density the indices alone cost 0.16 bits per parameter; here an index is stored
relative to its chunk in ceil(log2(chunk)) bits (12 for chunks of 4096) and a value in ``bits`` bits.

The payload is cut into chunks of ``chunk`` values that never cross from one of the model's tensors to the
next (``segments``, as the reference chunks each tensor on its own); each chunk keeps its k = ceil(fraction *
chunk) entries of largest magnitude, and a shorter one (a tensor smaller than a chunk, such as a bias or a
LayerNorm weight, or a tensor's last chunk) of r values keeps min(k, r), as the reference clamps its top-k to
the chunk: at the defaults a LayerNorm weight of 128 values sends 41 of them. A chunk's scale is s = absmax / L over
its kept values, with L = 2^(bits-1) magnitude levels; a kept value x is stored as its sign and
m = min(L-1, floor(|x| / s)), and decoded as sign * (m + 1/2) * s. So a kept value is off by at most s/2 =
absmax / 2^bits (a quarter of the chunk's largest kept magnitude at 2 bits), and a dropped one is decoded as 0.

Body (little-endian, each section zero padded to 8 bytes):

    indices  kept x ib bits, ib = ceil(log2(chunk)), in chunk order, ascending within a chunk, LSB first
    scales   one float32 per chunk (ceil(n / chunk) for each tensor of n values)
    codes    kept x ``bits`` bits, LSB first: bit 0 the sign (1 negative), the rest the magnitude level m

At the defaults (1%, chunks of 4096, 2 bits) a chunk costs 41 x (12 + 2) + 32 = 606 bits: 0.148 bits per
parameter, 216x fewer than fp32. Like every lossy codec it is only sound with error feedback
(``ErrorFeedback``; SparseLoCo's decayed accumulator is one with ``decay=beta``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from geotrain.comm.codecs.base import CODEC_IDS, HEADER_SIZE, Codec, CodecError, as_payload, pad8, raise_nonfinite
from geotrain.comm.codecs.layout import (
    DEFAULT_CHUNK,
    DEFAULT_FRACTION,
    check_segments,
    check_sparse,
    sparse_body_size,
    sparse_counts,
    sparse_index_bits,
    sparse_segments,
    topk_k,
)

__all__ = ["SparseCodec", "pack_bits", "unpack_bits"]


def pack_bits(values: np.ndarray, width: int, out: np.ndarray) -> None:
    """Write ``values`` (non-negative ints below 2^width) into ``out`` (uint8) at ``width`` bits each, LSB
    first, zeroing the rest of ``out``."""
    n = values.shape[0]
    out[:] = 0
    if n == 0:
        return
    bits = ((values.astype(np.int64)[:, None] >> np.arange(width, dtype=np.int64)) & 1).astype(np.uint8)
    packed = np.packbits(bits.reshape(-1), bitorder="little")
    out[: packed.shape[0]] = packed


def unpack_bits(data: np.ndarray, width: int, n: int) -> np.ndarray:
    """The ``n`` values of ``width`` bits packed LSB first in ``data`` (uint8), as int64."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    bits = np.unpackbits(data[: -(-n * width // 8)], count=n * width, bitorder="little").reshape(n, width)
    return bits.astype(np.int64) @ (np.int64(1) << np.arange(width, dtype=np.int64))


@dataclass(frozen=True, kw_only=True, slots=True)
class SparseCodec(Codec):
    """Per-chunk top-k by magnitude, with chunk-relative indices and ``bits``-bit values packed."""

    fraction: float = DEFAULT_FRACTION
    """Fraction of each chunk that is kept, in (0, 1]. k = ceil(fraction * chunk)."""
    chunk: int = DEFAULT_CHUNK
    """Values per chunk: sets the index width, ceil(log2(chunk)) bits, and the reach of one scale."""
    bits: int = 2
    """Bits per kept value: 2, 4 or 8 (one sign bit, the rest magnitude levels)."""
    segments: tuple[int, ...] = ()
    """Numels of the consecutive tensors a payload is made of (the model's, in parameter order): chunks never
    cross from one to the next. Applies to a payload of exactly their sum; any other (a worker's shard of the
    model, a test vector) is chunked as one run."""

    codec_id: ClassVar[int] = CODEC_IDS["sparse"]
    mean_over_senders: ClassVar[bool] = True

    def __post_init__(self) -> None:
        try:
            check_sparse(self.fraction, self.chunk, self.bits)
            check_segments(self.segments)
        except ValueError as exc:
            raise CodecError(str(exc)) from None

    @property
    def name(self) -> str:
        return f"sparse+int{self.bits}"

    @property
    def k(self) -> int:
        """Entries kept per full chunk."""
        return topk_k(self.fraction, self.chunk)

    @property
    def levels(self) -> int:
        """Magnitude levels L = 2^(bits-1)."""
        return 1 << (self.bits - 1)

    def chunks(self, numel: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(first position, length, entries kept) of each chunk of a payload of ``numel`` values, in order, as
        int64: each segment cut into chunks of ``chunk``, its last one possibly shorter, keeping min(k, length)."""
        starts, lengths, offset = [], [], 0
        for n in sparse_segments(numel, self.segments):
            nfull, rem = divmod(n, self.chunk)
            starts.append(offset + torch.arange(nfull + (rem > 0), dtype=torch.int64) * self.chunk)
            lengths.append(torch.full((nfull + (rem > 0),), self.chunk, dtype=torch.int64))
            if rem:
                lengths[-1][-1] = rem
            offset += n
        if not starts:
            empty = torch.zeros(0, dtype=torch.int64)
            return empty, empty, empty
        start, length = torch.cat(starts), torch.cat(lengths)
        return start, length, length.clamp(max=self.k)

    def _header_options(self) -> tuple[int, int, int, int]:
        return 0, self.bits, self.chunk, self.k

    def _describe_options(self, value_id: int, a: int, b: int, c: int) -> str:
        return f"bits={a}, chunk={b}, k={c}"

    def _body_size(self, numel: int) -> int:
        return sparse_body_size(numel, fraction=self.fraction, chunk=self.chunk, bits=self.bits,
                                segments=self.segments)

    def _sections(self, body: torch.Tensor, numel: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(index bytes, scales as float32, code bytes, kept) views of a body."""
        kept, chunks = sparse_counts(numel, fraction=self.fraction, chunk=self.chunk, segments=self.segments)
        b = body.numpy()
        ni = pad8(-(-kept * sparse_index_bits(self.chunk) // 8))
        ns = pad8(4 * chunks)
        return b[:ni], b[ni : ni + ns].view(np.float32)[:chunks], b[ni + ns :], kept

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The kept entries of ``x`` (1-D float32): (chunk-relative indices, ascending within each chunk, as
        int64; their values; the chunk of each), in chunk order."""
        chunk, k = self.chunk, self.k
        idx, row, pos_all = [], [], []
        offset = first = 0  # the segment's first value and first chunk
        for n in sparse_segments(x.numel(), self.segments):
            nfull, rem = divmod(n, chunk)
            if nfull:
                pos = torch.topk(x[offset : offset + nfull * chunk].view(nfull, chunk).abs(), k, dim=1,
                                 sorted=False).indices.sort(dim=1).values
                idx.append(pos.reshape(-1))
                rows = torch.arange(nfull)
                row.append(first + rows.repeat_interleave(k))
                pos_all.append((offset + rows[:, None] * chunk + pos).reshape(-1))
            if rem:
                tail = offset + nfull * chunk
                pos = torch.topk(x[tail : offset + n].abs(), min(k, rem), sorted=False).indices.sort().values
                idx.append(pos)
                row.append(torch.full((pos.numel(),), first + nfull, dtype=torch.int64))
                pos_all.append(tail + pos)
            offset += n
            first += nfull + (rem > 0)
        if not idx:
            empty = torch.zeros(0, dtype=torch.int64)
            return empty, torch.zeros(0), empty
        return torch.cat(idx), x[torch.cat(pos_all)], torch.cat(row)

    def _encode_body(self, x: torch.Tensor, body: torch.Tensor) -> None:
        numel = x.numel()
        idx_out, scales_out, codes_out, kept = self._sections(body, numel)
        local, vals, rows = self.select(x)
        # A chunk holding NaN or Inf keeps at least one of them (topk ranks them first).
        if kept and not bool(torch.isfinite(vals).all()):
            raise_nonfinite(x)
        chunks = scales_out.shape[0]
        absmax = torch.zeros(chunks).scatter_reduce_(0, rows, vals.abs(), reduce="amax", include_self=True)
        scale = absmax / self.levels  # exact: L is a power of two
        s = scale[rows]
        m = torch.where(s > 0, torch.floor(vals.abs() / torch.where(s > 0, s, 1.0)), 0.0).clamp_(0, self.levels - 1)
        codes = (m.to(torch.int64) << 1) | (vals < 0).to(torch.int64)
        pack_bits(local.numpy(), sparse_index_bits(self.chunk), idx_out)
        body.numpy()[idx_out.shape[0] : idx_out.shape[0] + pad8(4 * chunks)] = 0
        scales_out[:] = scale.numpy()
        pack_bits(codes.numpy(), self.bits, codes_out)

    def _unpack(self, body: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat positions, decoded values) of the entries a checksum-verified body carries."""
        idx_in, scales_in, codes_in, kept = self._sections(body, numel)
        local = torch.from_numpy(unpack_bits(idx_in, sparse_index_bits(self.chunk), kept))
        scales = torch.from_numpy(scales_in.copy())
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise CodecError("payload holds a non-finite or negative chunk scale")
        starts, lengths, ks = self.chunks(numel)
        rows = torch.repeat_interleave(torch.arange(starts.numel()), ks)
        # The checksum guarantees what an encoder wrote; still refuse indices an encoder cannot write (outside
        # the chunk, or not strictly ascending within it).
        same = rows[1:] == rows[:-1]
        if bool((local >= lengths[rows]).any()) or bool((local[1:][same] <= local[:-1][same]).any()):
            raise CodecError(f"payload holds top-k indices outside their chunk (of up to {self.chunk}) or out of order")
        codes = torch.from_numpy(unpack_bits(codes_in, self.bits, kept))
        mag = ((codes >> 1).to(torch.float32) + 0.5) * scales[rows]
        return starts[rows] + local, torch.where((codes & 1).bool(), -mag, mag)

    def _decode_body(self, body: torch.Tensor, out: torch.Tensor) -> None:
        positions, vals = self._unpack(body, out.numel())
        out.zero_()
        out[positions] = vals

    def carried(self, payload: torch.Tensor) -> torch.Tensor:
        payload = as_payload(payload)
        numel = int.from_bytes(bytes(payload[8:16].numpy()), "little")  # the header's numel (base.py)
        if payload.numel() != self.encoded_size(numel):
            raise CodecError(f"payload is {payload.numel()} bytes, not a {self.name!r} payload of {numel} values")
        return self._unpack(payload[HEADER_SIZE:], numel)[0]
