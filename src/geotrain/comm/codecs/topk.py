"""Chunked top-k sparsification, optionally with quantized values (``topk``, ``topk+bf16``, ``topk+int8``, ...).

The tensor is cut into chunks of ``chunk`` values; each chunk keeps its k = ceil(fraction * chunk) entries of
largest magnitude as (index within the chunk, value) and drops the rest. This is the compressor of SparseLoCo
(Sarfi et al., arXiv 2508.15706: chunked top-k of pseudo-gradients with error feedback and quantized values)
and the top-k variant of DeMo (Peng et al., arXiv 2411.19870). It is only sound with error feedback: what a
round drops must be carried into the next round by the sender, which ErrorFeedback does.

A fixed k per chunk keeps the payload size a function of numel alone, so all sites' payloads have equal
size, and a per-chunk top-k spreads the kept entries over the whole tensor instead of letting one layer
with large values take them all.

Body: indices (uint16 when chunk <= 65536, else int32; little-endian; chunk-local) | values, where the values
are encoded by the value codec's body format (fp32, bf16, or blockwise int8/int4 over the kept values in
chunk order). A last partial chunk of r values keeps ceil(k * r / chunk) entries.

Error bound, per chunk: a kept value has the value codec's error (0 for fp32, 2^-8 relative for bf16,
absmax/254 of its block of kept values for int8); a dropped value is decoded as 0 and its magnitude is at most
the smallest kept magnitude of its chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from geotrain.comm.codecs.base import CODEC_IDS, Codec, CodecError, codec_name_of_id, pad8, raise_nonfinite
from geotrain.comm.codecs.dense import TILE, Bf16Codec, Fp32Codec, Int4Codec, Int8Codec
from geotrain.comm.codecs.layout import (
    DEFAULT_BLOCK,
    DEFAULT_CHUNK,
    DEFAULT_FRACTION,
    VALUE_CODECS,
    check_topk,
    topk_body_size,
    topk_index_bytes,
    topk_k,
    topk_kept,
)

__all__ = ["TopKCodec", "VALUE_CODECS"]


@dataclass(frozen=True, kw_only=True, slots=True)
class TopKCodec(Codec):
    """Per-chunk top-k by magnitude: ``fraction`` of each ``chunk``, stored as indices plus encoded values."""

    fraction: float = DEFAULT_FRACTION
    """Fraction of each chunk that is kept, in (0, 1]. k = ceil(fraction * chunk)."""
    chunk: int = DEFAULT_CHUNK
    """Values per chunk. <= 65536 stores 2-byte indices, larger chunks 4-byte indices."""
    values: str = "fp32"
    """Codec of the kept values: fp32, bf16, int8 or int4."""
    block_size: int = DEFAULT_BLOCK
    """Block size of an int8/int4 value codec (over the kept values); unused for fp32 and bf16."""

    _inner: Codec = field(init=False, repr=False, compare=False)

    codec_id: ClassVar[int] = CODEC_IDS["topk"]

    def __post_init__(self) -> None:
        try:
            check_topk(self.fraction, self.chunk, self.values)
        except ValueError as exc:
            raise CodecError(str(exc)) from None
        inner: Codec
        if self.values == "fp32":
            inner = Fp32Codec()
        elif self.values == "bf16":
            inner = Bf16Codec()
        elif self.values == "int8":
            inner = Int8Codec(block_size=self.block_size)
        else:
            inner = Int4Codec(block_size=self.block_size)
        object.__setattr__(self, "_inner", inner)

    @property
    def name(self) -> str:
        return "topk" if self.values == "fp32" else f"topk+{self.values}"

    @property
    def k(self) -> int:
        """Entries kept per full chunk."""
        return topk_k(self.fraction, self.chunk)

    def _kept(self, numel: int) -> int:
        return topk_kept(numel, self.fraction, self.chunk)

    def _index_bytes(self) -> int:
        return topk_index_bytes(self.chunk)

    def _header_options(self) -> tuple[int, int, int, int]:
        block = self.block_size if self.values in ("int8", "int4") else 0
        return CODEC_IDS[self.values], block, self.chunk, self.k

    def _describe_options(self, value_id: int, a: int, b: int, c: int) -> str:
        values = codec_name_of_id(value_id)
        return f"values={values}" + (f", block_size={a}" if a else "") + f", chunk={b}, k={c}"

    def _body_size(self, numel: int) -> int:
        return topk_body_size(numel, fraction=self.fraction, chunk=self.chunk, values=self.values,
                              block_size=self.block_size)

    def _split_body(self, body: torch.Tensor, kept: int) -> tuple[torch.Tensor, torch.Tensor]:
        nidx = kept * self._index_bytes()
        idx = body[:nidx].view(torch.int16 if self._index_bytes() == 2 else torch.int32)
        return idx, body[pad8(nidx) :]

    def _encode_body(self, x: torch.Tensor, body: torch.Tensor) -> None:
        numel, chunk, k = x.numel(), self.chunk, self.k
        nfull, rem = divmod(numel, chunk)
        kept = self._kept(numel)
        idx_out, value_body = self._split_body(body, kept)
        body[idx_out.numel() * self._index_bytes() : pad8(idx_out.numel() * self._index_bytes())].zero_()
        vals = torch.empty(kept)
        if nfull:
            rows = max(1, TILE // chunk)
            ax = torch.empty(min(rows, nfull), chunk)
            top = torch.empty(min(rows, nfull), k)
            pos = torch.empty(min(rows, nfull), k, dtype=torch.int64)
            xt = x[: nfull * chunk].view(nfull, chunk).split(rows)
            it = idx_out[: nfull * k].view(nfull, k).split(rows)
            vt = vals[: nfull * k].view(nfull, k).split(rows)
            for xv, iv, vv in zip(xt, it, vt):
                r = xv.shape[0]
                # Magnitudes of a tile in the cache, then top-k of each row (unsorted: order is irrelevant).
                torch.topk(torch.abs(xv, out=ax[:r]), k, dim=1, sorted=False, out=(top[:r], pos[:r]))
                torch.gather(xv, 1, pos[:r], out=vv)  # the signed values
                iv.copy_(pos[:r])  # int64 -> int16 wraps modulo 2^16: read back as unsigned
        if rem:
            kt = topk_kept(rem, self.fraction, self.chunk)  # rem < chunk: the tail's share
            tail = x[nfull * chunk :].view(1, rem)
            _, pos = torch.topk(tail.abs(), kt, dim=1, sorted=False)
            vals[nfull * k :] = tail.gather(1, pos)[0]
            idx_out[nfull * k :].copy_(pos[0])
        # A chunk holding NaN or Inf keeps at least one of them (topk ranks NaN and Inf first), so checking the
        # kept values catches every non-finite input without another pass over x.
        if kept and not bool(torch.isfinite(vals).all()):
            raise_nonfinite(x)
        self._inner._encode_body(vals, value_body)

    def _decode_body(self, body: torch.Tensor, out: torch.Tensor) -> None:
        numel, chunk, k = out.numel(), self.chunk, self.k
        nfull, rem = divmod(numel, chunk)
        kept = self._kept(numel)
        idx_in, value_body = self._split_body(body, kept)
        idx = idx_in.to(torch.int64)
        if self._index_bytes() == 2:
            idx.bitwise_and_(0xFFFF)  # stored as uint16
        # The checksum guarantees what an encoder wrote; still refuse indices an encoder cannot write.
        if nfull and not (0 <= int(idx[: nfull * k].min()) and int(idx[: nfull * k].max()) < chunk):
            raise CodecError(f"payload holds a top-k index outside its chunk of {chunk}")
        if rem and not (0 <= int(idx[nfull * k :].min()) and int(idx[nfull * k :].max()) < rem):
            raise CodecError(f"payload holds a top-k index outside the last chunk of {rem}")
        vals = torch.empty(kept)
        self._inner._decode_body(value_body, vals)
        out.zero_()
        if nfull:
            ov = out[: nfull * chunk].view(nfull, chunk)
            ov.scatter_(1, idx[: nfull * k].view(nfull, k), vals[: nfull * k].view(nfull, k))
        if rem:
            out[nfull * chunk :].scatter_(0, idx[nfull * k :], vals[nfull * k :])
