"""Codecs for pseudo-gradients crossing the WAN: pure encode/decode pairs with an exact payload size.

``get_codec(name, **options)`` returns a codec; ``available_codecs()`` lists the names. A codec encodes a float
tensor into a 1-D ``torch.uint8`` payload (header and checksums included; its size depends only on numel and the
options, so all sites' payloads have the same size and go straight through gloo's all_gather) and decodes it
back to float32, raising CodecError on anything malformed. ``ErrorFeedback`` is the one stateful piece: the
sender's residual for lossy codecs.

Codecs (docs/codecs.md has formats, error bounds and measured speed):

* ``fp32``: raw, lossless, 4 bytes per value.
* ``bf16``: 2 bytes per value, relative error <= 2^-8 (8 significant bits).
* ``int8``: blockwise absmax int8 (OpenDiLoCo, arXiv 2407.07852), ~1.016 bytes per value, error <= absmax/254.
* ``int4``: blockwise absmax 4-bit, ~0.516 bytes per value, error <= absmax/14.
* ``topk``, ``topk+bf16``, ``topk+int8``, ``topk+int4``: chunked top-k (DeMo arXiv 2411.19870, SparseLoCo
  arXiv 2508.15706) with the kept values stored as fp32/bf16/int8/int4; use with ErrorFeedback.

The E3M0 4-bit float of Streaming DiLoCo (arXiv 2501.18512) is implemented (``dense.Fp4Codec``) but not
registered: issue 3 wants fp4 only at about int4's speed, and it takes 1.1-1.2x the time of int4
(docs/codecs.md).
"""

from __future__ import annotations

from typing import Any

from geotrain.comm.codecs.base import HEADER_SIZE, Codec, CodecError
from geotrain.comm.codecs.dense import DEFAULT_BLOCK, Bf16Codec, Fp32Codec, Int4Codec, Int8Codec
from geotrain.comm.codecs.feedback import ErrorFeedback
from geotrain.comm.codecs.topk import VALUE_CODECS, TopKCodec
from geotrain.errors import ConfigError

__all__ = [
    "Codec",
    "CodecError",
    "CodecConfigError",
    "ErrorFeedback",
    "get_codec",
    "available_codecs",
    "HEADER_SIZE",
    "DEFAULT_BLOCK",
    "Fp32Codec",
    "Bf16Codec",
    "Int8Codec",
    "Int4Codec",
    "TopKCodec",
]


class CodecConfigError(CodecError, ConfigError):
    """A bad codec name or option: a CodecError, and a ConfigError so that the CLI exits with code 2."""


_DENSE: dict[str, type[Codec]] = {"fp32": Fp32Codec, "bf16": Bf16Codec, "int8": Int8Codec, "int4": Int4Codec}
_OPTIONS = {
    "fp32": (),
    "bf16": (),
    "int8": ("block_size",),
    "int4": ("block_size",),
    "topk": ("fraction", "chunk", "block_size"),
}


def available_codecs() -> list[str]:
    """Names get_codec() accepts (``topk+fp32`` is also accepted, as another name of ``topk``)."""
    return [*_DENSE, "topk", *(f"topk+{v}" for v in VALUE_CODECS if v != "fp32")]


def get_codec(name: str, **options: Any) -> Codec:
    """The codec called ``name`` with keyword ``options``.

    Options: ``block_size`` for int8/int4 (default 256) and for the values of topk+int8/topk+int4; ``fraction``
    (default 0.01) and ``chunk`` (default 4096) for the topk family. Raises CodecConfigError (a CodecError and a
    ConfigError) for an unknown name or option, or a bad option value.
    """
    if not isinstance(name, str):
        raise CodecConfigError(f"codec name must be a string, got {type(name).__name__}", field="codec")
    key = name.strip().lower()
    base, plus, values = key.partition("+")
    if key in _DENSE:
        factory, kwargs = _DENSE[key], {}
    elif base == "topk" and (not plus or values in VALUE_CODECS):
        factory, kwargs = TopKCodec, {"values": values or "fp32"}
        key = "topk"
    elif key == "fp4" or values == "fp4":
        raise CodecConfigError(
            f"codec {name!r} is not enabled: the E3M0 4-bit float is implemented (dense.Fp4Codec) but not "
            "registered; it takes 1.1-1.2x the time of int4 (docs/codecs.md); use int4, or topk+int4",
            field="codec",
        )
    else:
        raise CodecConfigError(
            f"unknown codec {name!r}; choose one of {', '.join(available_codecs())}", field="codec"
        )
    unknown = sorted(set(options) - set(_OPTIONS[key]))
    if unknown:
        allowed = ", ".join(_OPTIONS[key]) or "none"
        raise CodecConfigError(
            f"codec {name!r} has no option {', '.join(unknown)} (its options: {allowed})", field="codec"
        )
    try:
        return factory(**kwargs, **options)
    except CodecError as exc:
        raise CodecConfigError(f"codec {name!r}: {exc}", field="codec") from None
