"""The codec registry: every codec's name, options, exchange pattern and exact payload size, in one place.

A run (``comm.codec``), the configuration's validation, ``geotrain plan`` and the summary all read this
table, so a codec the planner offers is one a run accepts, with the same bytes. The registry itself imports
no torch: a spec knows its sizes by arithmetic (``layout.py``) and builds its torch codec only when a run
asks for it (``build``). Adding a codec is one spec plus one ``register_codec`` line.

A spec's options are the keyword options of its codec (``block_size``, ``fraction``, ``chunk``, and the sparse
codecs' ``segments``, the sizes of the model's tensors, which chunks do not cross); a run takes
them from ``[comm]`` (``comm.block_size``, ``comm.topk_fraction``) through :func:`codec_choice`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from geotrain.comm.codecs import layout
from geotrain.errors import ConfigError
from geotrain.registry import Registry

__all__ = [
    "CodecChoice",
    "CodecConfigError",
    "CodecError",
    "CodecSpec",
    "choose_codec",
    "codec_choice",
    "codec_names",
    "get_codec",
    "get_codec_spec",
    "register_codec",
]


class CodecError(ValueError):
    """A payload that cannot be decoded, an input that cannot be encoded, or a bad codec name or option."""


class CodecConfigError(CodecError, ConfigError):
    """A bad codec name or option: a CodecError, and a ConfigError so that the CLI exits with code 2."""


class CodecSpec:
    """One codec as geotrain knows it before any tensor exists. Subclasses fill in the sizes and the builder.

    ``sparse``: a sum of two payloads is not a payload of the same size (top-k keeps other entries on every
    site), so sparse payloads cannot be reduced chunk by chunk on their way and are all-gathered.
    ``lossless``: payloads decode exactly (they still travel framed, with their checksums).
    """

    name: str = ""
    summary: str = ""
    sparse: bool = False
    lossless: bool = False
    options: tuple[str, ...] = ()
    """Keyword options of the codec (``block_size``, ``fraction``, ``chunk``)."""

    def defaults(self) -> dict[str, Any]:
        """The options' default values."""
        return {}

    def check(self, options: Mapping[str, Any]) -> None:
        """Raise ValueError for an option value the codec cannot take."""

    def encoded_size(self, numel: int, options: Mapping[str, Any]) -> int:
        """Exact bytes of one payload of ``numel`` values, header included."""
        raise NotImplementedError

    def build(self, options: Mapping[str, Any]) -> Any:
        """The torch codec (``geotrain.comm.codecs.base.Codec``) with these options."""
        raise NotImplementedError


class _Plain(CodecSpec):
    def __init__(self, name: str, summary: str, *, lossless: bool = False) -> None:
        self.name, self.summary, self.lossless = name, summary, lossless

    def encoded_size(self, numel: int, options: Mapping[str, Any]) -> int:
        return layout.HEADER_SIZE + layout.plain_body_size(self.name, numel)

    def build(self, options: Mapping[str, Any]) -> Any:
        from geotrain.comm.codecs.dense import Bf16Codec, Fp32Codec

        return Fp32Codec() if self.name == "fp32" else Bf16Codec()


class _Blockwise(CodecSpec):
    options = ("block_size",)

    def __init__(self, name: str, summary: str) -> None:
        self.name, self.summary = name, summary

    def defaults(self) -> dict[str, Any]:
        return {"block_size": layout.DEFAULT_BLOCK}

    def check(self, options: Mapping[str, Any]) -> None:
        layout.check_block_size(options["block_size"])

    def encoded_size(self, numel: int, options: Mapping[str, Any]) -> int:
        return layout.HEADER_SIZE + layout.block_body_size(self.name, numel, options["block_size"])

    def build(self, options: Mapping[str, Any]) -> Any:
        from geotrain.comm.codecs.dense import Int4Codec, Int8Codec

        return (Int8Codec if self.name == "int8" else Int4Codec)(block_size=options["block_size"])


class _TopK(CodecSpec):
    sparse = True
    options = ("fraction", "chunk", "block_size")

    def __init__(self, values: str) -> None:
        self.values = values
        self.name = "topk" if values == "fp32" else f"topk+{values}"
        kept = "fp32" if values == "fp32" else f"{values}"
        self.summary = f"chunked top-k with error feedback, kept values as {kept}"

    def defaults(self) -> dict[str, Any]:
        return {"fraction": layout.DEFAULT_FRACTION, "chunk": layout.DEFAULT_CHUNK, "block_size": layout.DEFAULT_BLOCK}

    def check(self, options: Mapping[str, Any]) -> None:
        layout.check_topk(options["fraction"], options["chunk"], self.values)
        if self.values in ("int8", "int4"):
            layout.check_block_size(options["block_size"])

    def encoded_size(self, numel: int, options: Mapping[str, Any]) -> int:
        return layout.HEADER_SIZE + layout.topk_body_size(
            numel, fraction=options["fraction"], chunk=options["chunk"], values=self.values,
            block_size=options["block_size"])

    def build(self, options: Mapping[str, Any]) -> Any:
        from geotrain.comm.codecs.topk import TopKCodec

        return TopKCodec(values=self.values, **options)


class _Sparse(CodecSpec):
    """Packed chunked top-k with ``bits``-bit values (``sparse.py``): SparseLoCo's compressor."""

    sparse = True
    options = ("fraction", "chunk", "segments")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.name = f"sparse+int{bits}"
        self.summary = f"chunked top-k, chunk-relative packed indices, {bits}-bit values (SparseLoCo)"

    def defaults(self) -> dict[str, Any]:
        return {"fraction": layout.DEFAULT_FRACTION, "chunk": layout.DEFAULT_CHUNK, "segments": ()}

    def check(self, options: Mapping[str, Any]) -> None:
        layout.check_sparse(options["fraction"], options["chunk"], self.bits)
        layout.check_segments(options["segments"])

    def encoded_size(self, numel: int, options: Mapping[str, Any]) -> int:
        return layout.HEADER_SIZE + layout.sparse_body_size(numel, fraction=options["fraction"],
                                                            chunk=options["chunk"], bits=self.bits,
                                                            segments=options["segments"])

    def build(self, options: Mapping[str, Any]) -> Any:
        from geotrain.comm.codecs.sparse import SparseCodec

        return SparseCodec(bits=self.bits, **options)


_REGISTRY: Registry[CodecSpec] = Registry("codec")


def register_codec(spec: CodecSpec) -> CodecSpec:
    """Make ``spec`` known to runs, validation and the planner by its name (replacing one of that name)."""
    return _REGISTRY.register(spec.name, spec)


register_codec(_Plain("fp32", "raw float32, lossless", lossless=True))
register_codec(_Plain("bf16", "bfloat16, 8 significant bits"))
register_codec(_Blockwise("int8", "blockwise absmax int8 (OpenDiLoCo)"))
register_codec(_Blockwise("int4", "blockwise absmax int4"))
for _values in layout.VALUE_CODECS:
    register_codec(_TopK(_values))
for _bits in layout.SPARSE_BITS:
    register_codec(_Sparse(_bits))
# The E3M0 4-bit float of Streaming DiLoCo (dense.Fp4Codec) is implemented but not registered: it takes
# 1.1-1.2x the time of int4 for the same bytes (docs/codecs.md).
_UNREGISTERED = {"fp4": "the E3M0 4-bit float is implemented (dense.Fp4Codec) but not registered; it takes "
                        "1.1-1.2x the time of int4 for the same bytes (docs/codecs.md); use int4, or topk+int4"}


def codec_names() -> list[str]:
    """Names of the registered codecs, in registration order."""
    return _REGISTRY.names()


def get_codec_spec(name: object, *, field: str = "comm.codec") -> CodecSpec:
    """The spec registered as ``name``, or a CodecConfigError naming the choices."""
    if not isinstance(name, str):
        raise CodecConfigError(f"codec name must be a string, got {type(name).__name__}", field=field)
    key = name.strip().lower()
    if key == "topk+fp32":
        key = "topk"  # another name of plain top-k
    spec = _REGISTRY.find(key)
    if spec is not None:
        return spec
    if key in _UNREGISTERED or key.partition("+")[2] in _UNREGISTERED:
        raise CodecConfigError(f"codec {name!r} is not enabled: {_UNREGISTERED[key.partition('+')[2] or key]}",
                               field=field)
    raise CodecConfigError(_REGISTRY.unknown(name), field=field)


@dataclass(frozen=True, slots=True)
class CodecChoice:
    """A registered codec with its options resolved: what a run uses and the planner prices."""

    spec: CodecSpec
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def sparse(self) -> bool:
        return self.spec.sparse

    @property
    def lossless(self) -> bool:
        return self.spec.lossless

    def encoded_size(self, numel: int) -> int:
        return self.spec.encoded_size(numel, self.options)

    def bits_per_value(self, numel: int = 1 << 24) -> float:
        """Bits on the wire per value for a payload of ``numel`` values (headers and scales included)."""
        return 8.0 * self.encoded_size(numel) / numel if numel else 0.0

    def build(self) -> Any:
        return self.spec.build(self.options)

    def __str__(self) -> str:
        return self.name


def choose_codec(name: str, *, field: str = "codec", **options: Any) -> CodecChoice:
    """The codec registered as ``name`` with keyword ``options`` (its defaults for the rest), checked."""
    return _choose(get_codec_spec(name, field=field), options, field)


def _choose(spec: CodecSpec, given: Mapping[str, Any], field: str) -> CodecChoice:
    unknown = sorted(set(given) - set(spec.options))
    if unknown:
        raise CodecConfigError(f"codec {spec.name!r} has no option {', '.join(unknown)} (its options: "
                               f"{', '.join(spec.options) or 'none'})", field=field)
    options = {**spec.defaults(), **given}
    try:
        spec.check(options)
    except ValueError as exc:
        raise CodecConfigError(f"codec {spec.name!r}: {exc}", field=field) from None
    return CodecChoice(spec, options)


def codec_choice(comm: Any) -> CodecChoice:
    """The codec a ``[comm]`` section describes: ``codec`` with ``block_size`` (0: the default) and
    ``topk_fraction`` where the codec takes them."""
    spec = get_codec_spec(comm.codec)
    given: dict[str, Any] = {}
    if "block_size" in spec.options and comm.block_size:
        given["block_size"] = comm.block_size
    if "fraction" in spec.options:
        given["fraction"] = comm.topk_fraction
    field = "comm.block_size" if "block_size" in given else "comm.codec"
    return _choose(spec, given, field)


def get_codec(name: str, **options: Any) -> Any:
    """The torch codec registered as ``name`` with keyword ``options`` (e.g. ``get_codec("int8", block_size=64)``).

    Raises CodecConfigError for an unknown name or option, or a bad option value.
    """
    return choose_codec(name, **options).build()
