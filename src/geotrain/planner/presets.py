"""Named accelerators, links and codecs the planner knows, and the parsers for the numbers users type.

Every preset is a starting point, not a truth: a plan's TOML can override any figure (``[accelerators.H100]
watts = 1275`` for an all-in per-GPU figure that includes host, NICs and fans) or add new ones. The figures
below are vendor peaks; what a run achieves is ``peak * mfu``, and ``mfu`` is the user's input.

Pure Python: the planner imports no torch (see ``geotrain.planner``).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass

from geotrain.errors import ConfigError
from geotrain.topology import Link, parse_bandwidth, parse_latency

__all__ = [
    "ACCELERATORS",
    "CODECS",
    "LINK_PRESETS",
    "Accelerator",
    "Codec",
    "closest",
    "parse_codec",
    "parse_count",
    "parse_link_text",
    "parse_bandwidth_text",
    "parse_latency_text",
    "resolve_accelerator",
]


@dataclass(frozen=True, slots=True)
class Accelerator:
    """One accelerator type: its peak dense bf16 throughput and its board power."""

    name: str
    """Name as users write it (case-insensitive on input)."""
    peak_flops: float
    """Peak dense (no 2:4 sparsity) bf16 tensor throughput, FLOP/s."""
    watts: float
    """Board power (TDP) in watts; host, network and cooling come on top (cooling via PUE)."""
    source: str = ""
    """Where the figures come from."""


# Dense bf16 figures: NVIDIA's datasheets print the 2:4-sparse figure first, the dense one is half of it.
# Training does not use structured sparsity, so the dense figure is the honest peak for MFU.
ACCELERATORS: dict[str, Accelerator] = {
    # NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM): BF16 312 TFLOPS dense (624 sparse), max TDP 400 W.
    "A100": Accelerator(name="A100", peak_flops=312e12, watts=400.0, source="NVIDIA A100 datasheet, SXM"),
    # NVIDIA H100 Tensor Core GPU datasheet (H100 SXM): BF16 1,979 TFLOPS with sparsity -> 989 dense; up to 700 W.
    "H100": Accelerator(name="H100", peak_flops=989e12, watts=700.0, source="NVIDIA H100 datasheet, SXM"),
    # NVIDIA H200 Tensor Core GPU datasheet (H200 SXM): same Hopper tensor cores as H100 (1,979 sparse -> 989
    # dense); more and faster HBM, which the 6*N*T model does not see. Up to 700 W.
    "H200": Accelerator(name="H200", peak_flops=989e12, watts=700.0, source="NVIDIA H200 datasheet, SXM"),
    # NVIDIA HGX B200 datasheet, per GPU at the 1,000 W configuration: BF16 4.5 PFLOPS sparse -> 2.25 dense.
    "B200": Accelerator(name="B200", peak_flops=2.25e15, watts=1000.0, source="NVIDIA HGX B200 datasheet"),
}


# One link between two sites: usable bandwidth of the pair and one-way latency. Each is a round figure for a
# link you can buy, chosen so the presets span the 1-400 Gbit/s and 1-75 ms range the guide describes.
LINK_PRESETS: dict[str, str] = {
    # Two datacenters in one metro area (< 100 km of fibre, ~5 us/km): a leased DWDM 400G wavelength.
    # 1 ms one-way covers the fibre and the optical/switching equipment.
    "metro": "400gbit/1ms",
    # Coast to coast in one country (~4,500 km of routed fibre): a leased 100G wave; ~30 ms one-way is the
    # usual half of a 60 ms round trip.
    "cross-country": "100gbit/30ms",
    # Across an ocean: a 10G wavelength or transit share on a submarine cable; ~75 ms one-way is half a
    # transatlantic-to-transpacific round trip.
    "intercontinental": "10gbit/75ms",
    # Public internet between two sites that buy commodity transit: a 1G port, ~50 ms one-way between regions.
    "internet": "1gbit/50ms",
}


@dataclass(frozen=True, slots=True)
class Codec:
    """How a pseudo-gradient (or gradient) is put on the wire."""

    name: str
    """Name as written by the user, normalised (``int4``, ``topk:0.01``)."""
    bits: float
    """Effective bits per model parameter on the wire."""
    collective: str = "all_reduce"
    """``all_reduce`` for dense payloads; ``all_gather`` for sparse ones, because a sum of sparse vectors is
    not sparse and cannot be reduced hop by hop in a ring."""


CODECS: dict[str, Codec] = {
    "fp32": Codec(name="fp32", bits=32),
    "bf16": Codec(name="bf16", bits=16),
    "fp16": Codec(name="fp16", bits=16),
    "int8": Codec(name="int8", bits=8),
    "int4": Codec(name="int4", bits=4),
    # E3M0-style 4-bit floats as in Streaming DiLoCo (arXiv 2501.18512): the same bytes as int4.
    "fp4": Codec(name="fp4", bits=4),
}

# A top-k entry is a bf16 value plus an int32 index.
_TOPK_BITS_PER_ENTRY = 16 + 32


def closest(word: str, choices: list[str] | tuple[str, ...] | set[str]) -> str:
    """``" (did you mean 'X'?)"`` for the closest of ``choices``, or an empty string."""
    match = difflib.get_close_matches(str(word), sorted(choices), n=1, cutoff=0.5)
    if not match:
        # Case differences ("h100") defeat the ratio cutoff for short words; retry case-insensitively.
        lowered = {c.lower(): c for c in choices}
        match = [lowered[m] for m in difflib.get_close_matches(str(word).lower(), sorted(lowered), n=1, cutoff=0.5)]
    return f" (did you mean {match[0]!r}?)" if match else ""


def resolve_accelerator(name: str, table: dict[str, Accelerator] | None = None) -> Accelerator:
    """Look up ``name`` (case-insensitive) in ``table`` (the presets by default)."""
    table = ACCELERATORS if table is None else table
    by_lower = {k.lower(): v for k, v in table.items()}
    found = by_lower.get(str(name).strip().lower())
    if found is None:
        raise ConfigError(
            f"unknown accelerator {name!r}{closest(name, list(table))}; known: {', '.join(table)}. "
            "Define a new one in the plan's TOML as [accelerators.NAME] with peak_flops and watts.",
            field="accelerator",
        )
    return found


_COUNT_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12, "p": 1e15}
_COUNT_RE = re.compile(r"^([0-9][0-9_]*\.?[0-9_]*(?:e[-+]?[0-9]+)?)\s*([kmbgtp]?)$")


def parse_count(value: object, *, field: str) -> float:
    """A positive count written as a number (``70e9``) or with a suffix (``70b``, ``15t``, ``16m``, ``8k``)."""
    if isinstance(value, bool):
        raise ConfigError(f"expected a number, got {value!r}", field=field)
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        text = str(value).strip().lower().replace(",", "")
        m = _COUNT_RE.match(text)
        if not m:
            raise ConfigError(
                f"cannot parse {value!r}; write a number such as 70e9, or with a suffix k, m, b, t (70b, 15t, 16m)",
                field=field,
            )
        number = float(m.group(1)) * _COUNT_SUFFIX.get(m.group(2), 1.0)
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"must be a positive number, got {value!r}", field=field)
    return number


def parse_bandwidth_text(value: object, *, field: str = "bandwidth") -> float:
    """Bits per second from ``10gbit``, ``10gbit/s`` or a bare number (bits per second)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"must be a positive rate, got {value!r}", field=field)
        return float(value)
    text = str(value).strip()
    if text.lower().endswith("/s"):
        text = text[:-2]
    try:
        return float(text) if _is_plain_number(text) and float(text) > 0 else parse_bandwidth(text)
    except ValueError as exc:
        raise ConfigError(str(exc), field=field) from None


def parse_latency_text(value: object, *, field: str = "latency") -> float:
    """One-way seconds from ``30ms``/``0.03s``; a bare number means milliseconds (as in ``tc``)."""
    try:
        return parse_latency(str(value))
    except ValueError as exc:
        raise ConfigError(str(exc), field=field) from None


def parse_link_text(value: str, *, presets: dict[str, str] | None = None, field: str = "link") -> Link:
    """A link from a preset name (``metro``) or ``BANDWIDTH/LATENCY`` (``10gbit/30ms``)."""
    presets = LINK_PRESETS if presets is None else presets
    text = str(value).strip()
    if text.lower() in presets:
        text = presets[text.lower()]
    elif "/" not in text:
        raise ConfigError(
            f"unknown link {value!r}{closest(text.lower(), list(presets))}; use a preset "
            f"({', '.join(presets)}) or BANDWIDTH/LATENCY such as '10gbit/30ms'",
            field=field,
        )
    bw, _, lat = text.partition("/")
    return Link(
        bandwidth_bps=parse_bandwidth_text(bw, field=field), latency_s=parse_latency_text(lat, field=field)
    )


def parse_codec(value: str, *, field: str = "codec") -> Codec:
    """A codec by name (``int4``), or ``topk:F`` keeping a fraction F of the entries (``topk:0.01``)."""
    text = str(value).strip().lower()
    if text in CODECS:
        return CODECS[text]
    if text.startswith("topk"):
        frac_text = text[4:].lstrip(":=")
        try:
            fraction = float(frac_text)
        except ValueError:
            fraction = -1.0
        if not (0 < fraction <= 1):
            raise ConfigError(
                f"cannot parse {value!r}; write topk:F with F the kept fraction in (0, 1], e.g. 'topk:0.01'",
                field=field,
            )
        return Codec(name=f"topk:{fraction:g}", bits=fraction * _TOPK_BITS_PER_ENTRY, collective="all_gather")
    raise ConfigError(
        f"unknown codec {value!r}{closest(text, list(CODECS) + ['topk:0.01'])}; use one of "
        f"{', '.join(CODECS)} or topk:F",
        field=field,
    )


def _is_plain_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
