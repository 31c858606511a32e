"""Human-readable numbers for reports, tables and the live display.

Every formatter accepts ``None`` (or a value of the wrong type, as found in a partial or hand-edited
``summary.json``) and returns :data:`MISSING` instead of raising: a report of a crashed run must still
render whatever it has.

Bytes use decimal SI units (1 MB = 10^6 bytes) because link speeds are decimal (``10mbit`` is 10^7 bit/s),
so "MB sent" and "Mbit/s" convert by a plain factor of 8.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "MISSING",
    "as_float",
    "fmt_bandwidth",
    "fmt_bytes",
    "fmt_count",
    "fmt_float",
    "fmt_loss",
    "fmt_percent",
    "fmt_quantity",
    "fmt_ratio",
    "fmt_seconds",
    "fmt_tokens",
]

MISSING = "—"

_SI = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))
_BYTE_UNITS = ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB"))
_BIT_RATE_UNITS = ((1e12, "Tbit/s"), (1e9, "Gbit/s"), (1e6, "Mbit/s"), (1e3, "kbit/s"))


def as_float(value: Any) -> float | None:
    """``value`` as a finite-or-not float, or None when it is missing or not a number.

    ``bool`` is refused on purpose: ``True`` in a numeric field is a bug upstream, not the number 1.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    return None


def _scaled(v: float, units: tuple[tuple[float, str], ...]) -> tuple[str, str]:
    """``v`` divided by the largest unit it reaches, as (number text, unit); three significant digits.

    The unit is chosen after rounding so that 999_999 prints as 1.00M rather than 1000k.
    """
    for i, (scale, unit) in enumerate(units):
        if abs(v) >= scale * 0.9995:
            x = v / scale
            text = f"{x:.3g}" if abs(x) < 99.95 else f"{x:.0f}"
            if abs(float(text)) >= 1000 and i > 0:
                bigger_scale, bigger_unit = units[i - 1]
                return f"{v / bigger_scale:.3g}", bigger_unit
            return text, unit
    return "", ""


def fmt_count(value: Any, *, suffix: str = "") -> str:
    """A count with an SI prefix: 950, 1.23k, 3.4M, 5.6G (then ``suffix``)."""
    v = as_float(value)
    if v is None or not math.isfinite(v):
        return MISSING
    text, prefix = _scaled(v, _SI)
    if prefix:
        return f"{text}{prefix}{suffix}"
    return f"{v:.0f}{suffix}" if v == int(v) else f"{v:.3g}{suffix}"


def fmt_tokens(value: Any) -> str:
    """Tokens as 950, 12.3k, 1.2M, 7.0B (billions are "B" by convention in ML, not "G")."""
    text = fmt_count(value)
    return text[:-1] + "B" if text.endswith("G") else text


def fmt_bytes(value: Any) -> str:
    """Bytes in decimal units: 512 B, 1.5 kB, 12.3 MB, 4.56 GB."""
    v = as_float(value)
    if v is None or not math.isfinite(v):
        return MISSING
    text, unit = _scaled(v, _BYTE_UNITS)
    if unit:
        return f"{text} {unit}"
    return f"{v:.0f} B"


def fmt_bandwidth(bits_per_second: Any) -> str:
    """A rate in bits per second: 950 bit/s, 12.5 Mbit/s, 1 Gbit/s."""
    v = as_float(bits_per_second)
    if v is None or not math.isfinite(v):
        return MISSING
    text, unit = _scaled(v, _BIT_RATE_UNITS)
    if unit:
        return f"{text} {unit}"
    return f"{v:.3g} bit/s"


def fmt_seconds(value: Any) -> str:
    """A duration: 0.42 s, 12.3 s, 4m 05s, 1h 02m 03s."""
    v = as_float(value)
    if v is None or not math.isfinite(v):
        return MISSING
    if v < 60:
        return f"{v:.2g} s" if v < 1 else f"{v:.1f} s"
    total = int(round(v))
    hours, rest = divmod(total, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {seconds:02d}s" if hours else f"{minutes}m {seconds:02d}s"


def fmt_percent(fraction: Any, *, digits: int = 1) -> str:
    """A fraction in [0, 1] as a percentage: 0.873 -> 87.3%."""
    v = as_float(fraction)
    if v is None or not math.isfinite(v):
        return MISSING
    return f"{100 * v:.{digits}f}%"


def fmt_loss(value: Any) -> str:
    """A loss to four significant decimals (what distinguishes two runs at equal tokens)."""
    v = as_float(value)
    if v is None:
        return MISSING
    if not math.isfinite(v):
        return str(v)  # "nan" / "inf" is information: the run diverged
    return f"{v:.4f}"


def fmt_ratio(value: Any) -> str:
    """A ratio such as 0.98x or 412x."""
    v = as_float(value)
    if v is None or not math.isfinite(v):
        return MISSING
    if abs(v) >= 100:
        return f"{v:.0f}x"
    return f"{v:.3g}x" if abs(v) >= 10 else f"{v:.3f}x"


def fmt_float(value: Any, *, digits: int = 4) -> str:
    """Any number with ``digits`` significant digits, or MISSING."""
    v = as_float(value)
    if v is None:
        return MISSING
    return f"{v:.{digits}g}"


def fmt_quantity(value: Any, unit: str) -> str:
    """A physical quantity in a fixed unit, three significant digits and no exponent: 0.0123 MW, 4.56 MWh,
    1,234 kg."""
    v = as_float(value)
    if v is None or not math.isfinite(v):
        return MISSING
    if abs(v) >= 100:
        return f"{v:,.0f} {unit}"
    if v == 0 or abs(v) >= 1e-3:
        return f"{float(f'{v:.3g}'):g} {unit}"
    return f"{v:.2e} {unit}"
