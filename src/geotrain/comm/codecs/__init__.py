"""Codecs for pseudo-gradients crossing the WAN: pure encode/decode pairs with an exact payload size.

``get_codec(name, **options)`` returns a codec; ``codec_names()`` lists the registered names
(``registry.py``, which the configuration and the planner read too). A codec encodes a float tensor into a
1-D ``torch.uint8`` payload (header and checksums included; its size depends only on numel and the options,
so all sites' payloads have the same size and go straight through the transport's all_gather) and decodes it back to
float32, raising CodecError on anything malformed. ``ErrorFeedback`` is the one stateful piece: the sender's
residual for lossy codecs.

Codecs (docs/codecs.md has formats, error bounds and measured speed):

* ``fp32``: raw, lossless, 4 bytes per value.
* ``bf16``: 2 bytes per value, relative error <= 2^-8 (8 significant bits).
* ``int8``: blockwise absmax int8 (OpenDiLoCo, arXiv 2407.07852), ~1.016 bytes per value, error <= absmax/254.
* ``int4``: blockwise absmax 4-bit, ~0.516 bytes per value, error <= absmax/14.
* ``topk``, ``topk+bf16``, ``topk+int8``, ``topk+int4``: chunked top-k (DeMo arXiv 2411.19870, SparseLoCo
  arXiv 2508.15706) with the kept values stored as fp32/bf16/int8/int4; use with ErrorFeedback.
* ``sparse+int2``, ``sparse+int4``, ``sparse+int8``: SparseLoCo's compressor, chunked top-k with chunk-relative
  indices packed at ceil(log2(chunk)) bits and 2/4/8-bit values with one scale per chunk (0.148 bits per value
  at 1% of chunks of 4096, 2 bits); what the ``sparseloco`` algorithm sends.

The E3M0 4-bit float of Streaming DiLoCo (arXiv 2501.18512) is implemented (``dense.Fp4Codec``) but not
registered: it takes 1.1-1.2x the time of int4 (docs/codecs.md).

Importing this package imports no torch: the registry and the size arithmetic are pure Python, and the
torch codecs below load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from geotrain.comm.codecs.layout import DEFAULT_BLOCK, HEADER_SIZE
from geotrain.comm.codecs.registry import (
    CodecChoice,
    CodecConfigError,
    CodecError,
    CodecSpec,
    choose_codec,
    codec_choice,
    codec_names,
    get_codec,
    get_codec_spec,
    register_codec,
)

__all__ = [
    "Bf16Codec",
    "Codec",
    "CodecChoice",
    "CodecConfigError",
    "CodecError",
    "CodecSpec",
    "DEFAULT_BLOCK",
    "ErrorFeedback",
    "Fp32Codec",
    "HEADER_SIZE",
    "Int4Codec",
    "Int8Codec",
    "SparseCodec",
    "TopKCodec",
    "choose_codec",
    "codec_choice",
    "codec_names",
    "get_codec",
    "get_codec_spec",
    "register_codec",
]

# The torch side, imported on first use (PEP 562).
_LAZY = {
    "Codec": "base",
    "ErrorFeedback": "feedback",
    "Fp32Codec": "dense",
    "Bf16Codec": "dense",
    "Int8Codec": "dense",
    "Int4Codec": "dense",
    "TopKCodec": "topk",
    "SparseCodec": "sparse",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"geotrain.comm.codecs.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'geotrain.comm.codecs' has no attribute {name!r}")
