"""Live progress of a running job for the launcher, drawn with rich.

:class:`LiveProgress` is fed the same records that go to ``metrics.jsonl`` (``step``, ``eval``, ``sync``; other
kinds are ignored) and shows one row per site: tokens against the site's share of the budget (with a bar), last
train loss, WAN bytes sent, utilization and outer rounds, plus a footer with the latest eval loss and elapsed time.
In a run that models its sites' power, a column shows each site's draw against the grid's cap (from its latest
``step``), or ``off`` between its ``power_off`` and ``power_on``.

Settings the run chose itself (a ``start`` record's ``auto``: tau, overlap) are shown under the table with
the reason, once the sites have chosen them.

On a terminal it redraws in place. When stdout is a file or a pipe (CI logs, ``nohup``, ``| tee``), redrawing
would either spam the log or be lost, so it prints a plain block instead (one line per site and one footer line)
at most every ``plain_interval_s`` seconds, and a last block on exit so the log ends with the final state.

:func:`final_table` renders a finished run's ``summary.json`` as a table for the end of ``geotrain run``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from geotrain.report.metrics import run_status
from geotrain.report.units import (
    MISSING,
    as_float,
    fmt_bytes,
    fmt_loss,
    fmt_percent,
    fmt_quantity,
    fmt_seconds,
    fmt_tokens,
)

__all__ = ["LiveProgress", "final_table"]


@dataclass(slots=True)
class _SiteState:
    tokens: float = 0.0
    loss: float | None = None
    wan_bytes: float = 0.0
    sync_bytes: float = 0.0
    utilization: float | None = None
    outer_rounds: int | None = None
    step: int | None = None
    power_mw: float | None = None
    cap_mw: float | None = None
    power_off: bool = False

    @property
    def sent(self) -> float:
        # Step records carry the cumulative count, sync records arrive between steps; show whichever is ahead.
        return max(self.wan_bytes, self.sync_bytes)

    @property
    def powered(self) -> bool:
        """Whether the site's records model power."""
        return self.power_mw is not None or self.power_off

    def power(self) -> str:
        """``draw/cap MW``, ``off`` while the site's power is off."""
        if self.power_off:
            return "off"
        if self.cap_mw is None:
            return fmt_quantity(self.power_mw, "MW")
        return f"{fmt_quantity(self.power_mw, 'MW').removesuffix(' MW')}/{fmt_quantity(self.cap_mw, 'MW')}"


class LiveProgress:
    """Per-site progress of a run, redrawn as records arrive. Use as a context manager.

    Thread-safe: :meth:`update` may be called from the thread that tails the sites' metrics while rich's refresh
    thread redraws.
    """

    def __init__(
        self,
        sites: int,
        *,
        title: str,
        total_tokens: int,
        console: Console | None = None,
        plain_interval_s: float = 5.0,
        refresh_per_second: float = 4.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if sites < 1:
            raise ValueError(f"sites must be at least 1, got {sites}")
        self.sites = sites
        self.title = title
        self.total_tokens = max(int(total_tokens), 0)
        self.console = console if console is not None else Console()
        self.plain_interval_s = plain_interval_s
        self.refresh_per_second = refresh_per_second
        self._clock = clock
        self._lock = threading.RLock()
        self._state: dict[int, _SiteState] = {s: _SiteState() for s in range(sites)}
        self._eval_loss: float | None = None
        self._eval_tokens: float | None = None
        self._chosen: list[str] = []
        self._chosen_printed = False
        self._start: float | None = None
        self._live: Live | None = None
        self._last_plain: float | None = None
        self._dirty = False

    # -- context manager ----------------------------------------------------------------------------------------

    def __enter__(self) -> LiveProgress:
        self._start = self._clock()
        if self.console.is_terminal:
            # get_renderable: the refresh thread re-renders, so elapsed time ticks even when no records arrive.
            self._live = Live(
                get_renderable=self.render,
                console=self.console,
                refresh_per_second=self.refresh_per_second,
                transient=False,
            )
            self._live.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._live is not None:
            self._live.refresh()
            self._live.stop()
            self._live = None
        elif self._dirty or self._last_plain is None:
            self._print_plain()

    # -- feeding ------------------------------------------------------------------------------------------------

    def update(self, records: Iterable[dict[str, Any]]) -> None:
        """Take new metrics records (any order, unknown kinds ignored) and refresh the display."""
        with self._lock:
            for rec in records:
                if isinstance(rec, dict):
                    self._apply(rec)
        if self._live is not None:
            self._live.refresh()
            return
        now = self._clock()
        if self._last_plain is None or now - self._last_plain >= self.plain_interval_s:
            self._print_plain()

    def _apply(self, rec: dict[str, Any]) -> None:
        kind = rec.get("kind")
        if kind == "start" and rec.get("site") == 0 and isinstance(rec.get("auto"), list) and not self._chosen:
            # Every site chooses the same values from the same agreed step time; site 0 speaks for them.
            self._chosen = [f"chose {a.get('key')} = {a.get('value')}: {a.get('reason')}"
                            for a in rec["auto"] if isinstance(a, dict)]
            self._dirty = bool(self._chosen)
            return
        if kind == "eval":
            loss = as_float(rec.get("eval_loss"))
            if loss is not None:
                self._eval_loss = loss
                self._eval_tokens = as_float(rec.get("tokens"))
                self._dirty = True
            return
        if kind not in ("step", "sync", "power_off", "power_on"):
            return
        site = rec.get("site")
        if not isinstance(site, int) or isinstance(site, bool) or site < 0:
            return
        # A site the launcher did not announce (a joiner) gets a row rather than being dropped.
        state = self._state.setdefault(site, _SiteState())
        self._dirty = True
        if kind == "sync":
            state.sync_bytes += as_float(rec.get("bytes")) or 0.0
            return
        if kind in ("power_off", "power_on"):
            state.power_off = kind == "power_off"
            return
        if (power := as_float(rec.get("power_mw"))) is not None:
            state.power_mw, state.cap_mw, state.power_off = power, as_float(rec.get("cap_mw")), False
        tokens = as_float(rec.get("tokens"))
        if tokens is not None:
            state.tokens = max(state.tokens, tokens)
        for name in ("loss", "utilization"):
            v = as_float(rec.get(name))
            if v is not None:
                setattr(state, name, v)
        wan = as_float(rec.get("wan_bytes"))
        if wan is not None:
            state.wan_bytes = max(state.wan_bytes, wan)
        for name in ("outer_rounds", "step"):
            v = rec.get(name)
            if isinstance(v, int) and not isinstance(v, bool):
                setattr(state, name, v)

    # -- rendering ----------------------------------------------------------------------------------------------

    @property
    def _share(self) -> float:
        return self.total_tokens / self.sites if self.total_tokens else 0.0

    def _elapsed(self) -> float:
        return self._clock() - self._start if self._start is not None else 0.0

    def _fraction(self, tokens: float) -> float | None:
        return tokens / self._share if self._share else None

    def _powered(self) -> bool:
        return any(s.powered for s in self._state.values())

    def _footer(self) -> str:
        total = sum(s.tokens for s in self._state.values())
        sent = sum(s.sent for s in self._state.values())
        parts = []
        if self._eval_loss is not None:
            at = f" @ {fmt_tokens(self._eval_tokens)} tokens" if self._eval_tokens is not None else ""
            parts.append(f"eval loss {fmt_loss(self._eval_loss)}{at}")
        else:
            parts.append("eval loss —")
        budget = f" / {fmt_tokens(self.total_tokens)}" if self.total_tokens else ""
        pct = f" ({fmt_percent(total / self.total_tokens, digits=0)})" if self.total_tokens else ""
        parts.append(f"tokens {fmt_tokens(total)}{budget}{pct}")
        parts.append(f"WAN {fmt_bytes(sent)}")
        elapsed = self._elapsed()
        # Whole seconds: a ticking decimal is noise on a display that redraws four times a second.
        parts.append(f"elapsed {int(elapsed)} s" if elapsed < 60 else f"elapsed {fmt_seconds(elapsed)}")
        return "  ·  ".join(parts)

    def render(self) -> RenderableType:
        """The live view: a table with one row per site and a footer line."""
        with self._lock:
            table = Table(title=Text(self.title, style="bold"), title_justify="left")
            table.add_column("site", no_wrap=True)
            table.add_column("tokens", justify="right", no_wrap=True)
            table.add_column("progress", no_wrap=True)
            table.add_column("%", justify="right", no_wrap=True)
            table.add_column("loss", justify="right", no_wrap=True)
            table.add_column("WAN sent", justify="right", no_wrap=True)
            table.add_column("util.", justify="right", no_wrap=True)
            table.add_column("rounds", justify="right", no_wrap=True)
            powered = self._powered()
            if powered:
                table.add_column("draw/cap", justify="right", no_wrap=True)
            for site in sorted(self._state):
                s = self._state[site]
                frac = self._fraction(s.tokens)
                bar = ProgressBar(total=self._share or 1.0, completed=min(s.tokens, self._share or 0.0), width=20)
                table.add_row(
                    Text(f"site {site}"),
                    fmt_tokens(s.tokens),
                    bar,
                    fmt_percent(min(frac, 1.0), digits=0) if frac is not None else MISSING,
                    fmt_loss(s.loss),
                    fmt_bytes(s.sent),
                    fmt_percent(s.utilization),
                    MISSING if s.outer_rounds is None else str(s.outer_rounds),
                    *([s.power() if s.powered else MISSING] if powered else []),
                )
            return Group(table, Text(self._footer(), style="dim"), *(Text(c, style="cyan") for c in self._chosen))

    def _plain_lines(self) -> list[str]:
        lines = []
        share = fmt_tokens(self._share) if self._share else MISSING
        for site in sorted(self._state):
            s = self._state[site]
            frac = self._fraction(s.tokens)
            pct = f" ({fmt_percent(frac, digits=0)})" if frac is not None else ""
            rounds = MISSING if s.outer_rounds is None else str(s.outer_rounds)
            lines.append(
                f"[{self.title}] site {site}: tokens {fmt_tokens(s.tokens)}/{share}{pct}  loss {fmt_loss(s.loss)}  "
                f"WAN {fmt_bytes(s.sent)}  util {fmt_percent(s.utilization)}  rounds {rounds}"
                + (f"  power {s.power()}" if s.powered else "")
            )
        lines.append(f"[{self.title}] {self._footer()}")
        if self._chosen and not self._chosen_printed:
            lines += [f"[{self.title}] {c}" for c in self._chosen]
            self._chosen_printed = True
        return lines

    def _print_plain(self) -> None:
        with self._lock:
            lines = self._plain_lines()
            self._last_plain = self._clock()
            self._dirty = False
        # markup/highlight off: a title or path with [brackets] must print as written, with no escape codes.
        for line in lines:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)


def final_table(summary: dict[str, Any]) -> Table:
    """A finished (or partial) run's summary as a table: one row per site and an ``all`` row of totals."""
    status, reason = run_status(summary)
    algorithm = summary.get("algorithm") or "run"
    title = Text(f"geotrain {algorithm}: ", style="bold")
    title.append(status, style={"ok": "bold green", "partial": "bold yellow", "failed": "bold red"}[status])
    if status != "ok":
        title.append(f" ({reason})", style="dim")
    table = Table(title=title, title_justify="left")
    for name in ("site", "tokens", "WAN sent", "compute", "comm. wait", "wall", "util.", "rounds"):
        table.add_column(name, justify="left" if name == "site" else "right", no_wrap=True)

    def rounds(v: Any) -> str:
        return MISSING if not isinstance(v, int) or isinstance(v, bool) else str(v)

    per_site = summary.get("per_site") if isinstance(summary.get("per_site"), list) else []
    for entry in per_site:
        if not isinstance(entry, dict):
            continue
        table.add_row(
            Text(f"site {entry.get('site', '?')}"),
            fmt_tokens(entry.get("tokens")),
            fmt_bytes(entry.get("wan_bytes")),
            fmt_seconds(entry.get("compute_seconds")),
            fmt_seconds(entry.get("comm_seconds")),
            fmt_seconds(entry.get("wall_seconds")),
            fmt_percent(entry.get("utilization")),
            rounds(entry.get("outer_rounds")),
        )
    table.add_row(
        Text("all", style="bold"),
        fmt_tokens(summary.get("tokens")),
        fmt_bytes(summary.get("wan_bytes")),
        MISSING,
        MISSING,
        fmt_seconds(summary.get("wall_seconds")),
        fmt_percent(summary.get("utilization")),
        rounds(summary.get("outer_rounds")),
        end_section=False,
    )
    if per_site:
        # A rule above the totals row: rich draws it under the last site row.
        table.rows[-2].end_section = True
    caption = [f"eval loss {fmt_loss(summary.get('eval_loss'))}"]
    for key, label in (("link", "link"), ("codec", "codec"), ("sync_every", "H")):
        if summary.get(key) is not None:
            caption.append(f"{label} {summary[key]}")
    for key, label, unit in (("energy_mwh", "energy", "MWh"), ("carbon_kg", "carbon", "kg")):
        if as_float(summary.get(key)) is not None:
            caption.append(f"{label} {fmt_quantity(summary[key], unit)}")
    for chosen in summary.get("auto_settings") or []:
        if isinstance(chosen, dict):
            caption.append(f"{str(chosen.get('key')).rpartition('.')[2]} {chosen.get('value')} (chosen)")
    table.caption = Text("  ·  ".join(caption))
    table.caption_justify = "left"
    return table
