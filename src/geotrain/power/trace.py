"""A site's available grid power over grid time: :class:`GridTrace`.

A trace is a list of points (hour, value) with one interpolation between them, optionally with a carbon
intensity at the same hours. Values are a fraction of the site's cap (``unit="fraction"``, 0..1) or
megawatts (``unit="mw"``). Between points the value is interpolated linearly or held from the point before
(``"step"``); before the first point the first value holds and after the last point the last value, unless the
trace is periodic, when it repeats with a period of its last hour (a trace of hours 0..24 is one day).

The power controller (``geotrain.power.controller``) needs more than point values: the exact minimum of
``value + slope * (g' - g)`` over a window of grid time, and where a trace crosses a level. Both follow from
the trace being piecewise linear (or piecewise constant) between its knots, so :meth:`GridTrace.knots_s` and
:meth:`GridTrace.pieces` hand out the knots and the pieces over any window, periodic copies included.

Grid time is in seconds here (``grid_seconds``); hours appear only in the points as written.
"""

from __future__ import annotations

import bisect
import csv
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from geotrain.errors import ConfigError

__all__ = ["GridTrace", "INTERPOLATIONS", "UNITS"]

UNITS = ("fraction", "mw")
"""Units of a trace's values: a fraction of the site's cap, or megawatts."""
INTERPOLATIONS = ("linear", "step")
"""How a trace goes from one point to the next."""


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class GridTrace:
    """Available power over grid time for one site (see the module docstring).

    ``where`` names the trace in error messages (``grid.traces[0]`` for a configuration's first trace): every
    mistake raises :class:`ConfigError` naming ``where.hours``, ``where.values``, ``where.carbon``, ...
    """

    __slots__ = ("hours", "values", "unit", "interpolate", "periodic", "carbon", "where", "_knots_s")

    def __init__(self, hours: Sequence[float], values: Sequence[float], *, unit: str = "fraction",
                 interpolate: str = "linear", periodic: bool = False, carbon: Sequence[float] | None = None,
                 where: str = "trace") -> None:
        self.where = where
        if unit not in UNITS:
            raise ConfigError(f"unknown unit {unit!r}; choose fraction (of the site's cap, 0..1) or mw",
                              field=f"{where}.unit")
        if interpolate not in INTERPOLATIONS:
            raise ConfigError(f"unknown interpolation {interpolate!r}; choose linear or step",
                              field=f"{where}.interpolate")
        if not isinstance(periodic, bool):
            raise ConfigError(f"must be true or false, got {periodic!r}", field=f"{where}.periodic")
        self.hours = self._series(hours, "hours")
        for i, (a, b) in enumerate(zip(self.hours, self.hours[1:]), start=1):
            if not b > a:
                raise ConfigError(f"must be strictly increasing, but hours[{i}]={b:g} follows {a:g}",
                                  field=f"{where}.hours")
        self.values = self._series(values, "values")
        if unit == "fraction":
            for i, v in enumerate(self.values):
                if v > 1:
                    raise ConfigError(f"values[{i}]={v:g} is above 1, the whole cap; give fractions 0..1, or set "
                                      'unit = "mw" for megawatts', field=f"{where}.values")
        self.carbon = None if carbon is None else self._series(carbon, "carbon")
        self.unit, self.interpolate, self.periodic = unit, interpolate, periodic
        for name, series in (("values", self.values), ("carbon", self.carbon)):
            if series is not None and len(series) != len(self.hours):
                raise ConfigError(f"holds {len(series)} numbers but hours holds {len(self.hours)}; give one per "
                                  "hour", field=f"{where}.{name}")
        if periodic:
            if len(self.hours) < 2 or self.hours[0] != 0:
                raise ConfigError("a periodic trace starts at hour 0 and ends at its period (0 ... 24 for a day), "
                                  f"got hours from {self.hours[0]:g}", field=f"{where}.hours")
            for name, series in (("values", self.values), ("carbon", self.carbon)):
                if series is not None and series[0] != series[-1]:
                    raise ConfigError(f"a periodic trace's last point is its first again one period later, so "
                                      f"{name} must end where it starts ({series[0]:g}), got {series[-1]:g}",
                                      field=f"{where}.{name}")
        self._knots_s = [h * 3600.0 for h in self.hours]

    def _series(self, numbers: Sequence[float], name: str) -> list[float]:
        field = f"{self.where}.{name}"
        if isinstance(numbers, (str, bytes)) or not isinstance(numbers, Sequence):
            raise ConfigError(f"expected a list of numbers, got {numbers!r}", field=field)
        if not numbers:
            raise ConfigError("is empty; give at least one point", field=field)
        out = []
        for i, v in enumerate(numbers):
            if not _finite(v) or v < 0:
                raise ConfigError(f"{name}[{i}] must be a finite number >= 0, got {v!r}", field=field)
            out.append(float(v))
        return out

    def __repr__(self) -> str:
        return (f"GridTrace(hours={self.hours}, values={self.values}, unit={self.unit!r}, "
                f"interpolate={self.interpolate!r}, periodic={self.periodic}, carbon={self.carbon})")

    # -- values -----------------------------------------------------------------------------------------------

    @property
    def period_s(self) -> float | None:
        """The period in grid seconds (the last hour), or None for a trace that is not periodic."""
        return self._knots_s[-1] if self.periodic else None

    def _at(self, series: list[float], grid_seconds: float) -> float:
        knots = self._knots_s
        g = float(grid_seconds)
        if self.periodic:
            g = math.fmod(g, knots[-1])
            if g < 0:
                g += knots[-1]
        if g <= knots[0]:
            return series[0]
        if g >= knots[-1]:
            return series[-1]
        i = bisect.bisect_right(knots, g) - 1
        if self.interpolate == "step" or g == knots[i]:
            return series[i]
        a, b = knots[i], knots[i + 1]
        return series[i] + (series[i + 1] - series[i]) * (g - a) / (b - a)

    def value(self, grid_seconds: float) -> float:
        """The trace's own value at ``grid_seconds``, in its unit."""
        return self._at(self.values, grid_seconds)

    def trace_mw(self, grid_seconds: float, cap_mw: float) -> float:
        """The trace in MW, not bounded by the cap: ``value * cap_mw`` for fractions, the value for MW."""
        v = self.value(grid_seconds)
        return v * cap_mw if self.unit == "fraction" else v

    def available_mw(self, grid_seconds: float, cap_mw: float) -> float:
        """Power available at ``grid_seconds``: the trace in MW, never above ``cap_mw``."""
        return min(cap_mw, self.trace_mw(grid_seconds, cap_mw))

    def carbon_kg_per_mwh(self, grid_seconds: float) -> float | None:
        """Carbon intensity (kg CO2 per MWh) at ``grid_seconds``, interpolated as the values are; None without."""
        return None if self.carbon is None else self._at(self.carbon, grid_seconds)

    # -- knots and pieces --------------------------------------------------------------------------------------

    def knots_s(self, lo: float, hi: float) -> list[float]:
        """The trace's knots (grid seconds) strictly inside (lo, hi), in order, periodic copies included."""
        knots = self._knots_s
        if not self.periodic:
            return [k for k in knots if lo < k < hi]
        period = knots[-1]
        out = []
        for n in range(math.floor(lo / period), math.floor(hi / period) + 1):
            out += [n * period + k for k in knots[:-1] if lo < n * period + k < hi]
        return out

    def pieces(self, lo: float, hi: float, cap_mw: float) -> Iterator[tuple[float, float, float, float]]:
        """(a, b, va, vb) covering [lo, hi] in order: on [a, b) the trace in MW (``trace_mw``) goes linearly from
        va to vb (va == vb for a step trace, whose value changes at b). ``hi`` may be infinite (the last piece is
        then the constant tail of a trace that is not periodic)."""
        points = [lo, *self.knots_s(lo, hi), hi]
        for a, b in zip(points, points[1:]):
            va = self.trace_mw(a, cap_mw)
            if self.interpolate == "step" or math.isinf(b):
                yield a, b, va, va
            else:  # linear and continuous (a periodic trace ends where it starts)
                yield a, b, va, self.trace_mw(b, cap_mw)

    # -- files ------------------------------------------------------------------------------------------------

    @classmethod
    def from_csv(cls, path: str | Path, *, where: str | None = None, **kw: Any) -> GridTrace:
        """A trace from a CSV file with the header ``hours,value`` or ``hours,value,carbon`` and one point per
        row (blank lines and lines starting with ``#`` are skipped). ``kw`` are the constructor's settings
        (unit, interpolate, periodic); ``where`` names the setting that gave the path in error messages."""
        p = Path(path)
        field = where  # the message names the file and the line; the field, when the file came from a setting
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"trace file {str(p)!r} does not exist; check the path", field=field) from None
        except UnicodeDecodeError:
            raise ConfigError(f"trace file {str(p)!r} is not UTF-8 text", field=field) from None
        except OSError as e:
            raise ConfigError(f"cannot read trace file {str(p)!r} ({e.strerror or e})", field=field) from None
        rows = [(n, row) for n, row in enumerate(csv.reader(text.splitlines()), start=1)
                if row and any(c.strip() for c in row) and not row[0].lstrip().startswith("#")]
        if not rows:
            raise ConfigError(f"{p} holds no rows; start it with the header hours,value[,carbon]", field=field)
        line, header = rows[0]
        names = [c.strip().lower() for c in header]
        if names not in (["hours", "value"], ["hours", "value", "carbon"]):
            raise ConfigError(f"{p} line {line}: the header must be hours,value or hours,value,carbon, got "
                              f"{','.join(header)!r}", field=field)
        hours: list[float] = []
        values: list[float] = []
        carbon: list[float] = []
        for line, row in rows[1:]:
            if len(row) != len(names):
                raise ConfigError(f"{p} line {line}: expected {len(names)} columns ({','.join(names)}), got "
                                  f"{len(row)}", field=field)
            try:
                numbers = [float(c) for c in row]
            except ValueError:
                raise ConfigError(f"{p} line {line}: {','.join(row)!r} is not {len(names)} numbers", field=field) \
                    from None
            if not all(math.isfinite(x) and x >= 0 for x in numbers):
                raise ConfigError(f"{p} line {line}: every number must be finite and >= 0, got {','.join(row)!r}",
                                  field=field)
            if hours and not numbers[0] > hours[-1]:
                raise ConfigError(f"{p} line {line}: hours must be strictly increasing, {numbers[0]:g} follows "
                                  f"{hours[-1]:g}", field=field)
            hours.append(numbers[0])
            values.append(numbers[1])
            if len(numbers) == 3:
                carbon.append(numbers[2])
        if not hours:
            raise ConfigError(f"{p} holds a header but no points", field=field)
        return cls(hours, values, carbon=carbon or None, where=where or str(p), **kw)
