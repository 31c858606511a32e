"""The run report's figures, each rendered to PNG bytes.

Four figures describe one run (see :func:`run_figures`):

- loss against tokens trained over all sites: each site's train loss (thin, EMA-smoothed over the raw loss,
  which is drawn faintly behind it) and the held-out eval loss (bold markers);
- the same against wall time, which is what a slow link actually costs;
- cumulative bytes sent over the WAN against wall time, per site and in total;
- per-site utilization: compute against communication-wait seconds as stacked bars, with compute / wall
  annotated (the guide's definition of utilization).

A run that models its sites' power adds two (:func:`power_figures`): each site's draw against the grid's cap
over its training wall time, one panel per site, with the windows its power was off shaded; and the energy
the sites used, cumulative, per site and in total.

:func:`comparison_png` draws several runs' eval loss against tokens and against wall time.

matplotlib is imported only inside the functions that draw, and only the Agg canvas is used: importing the
report package stays cheap (the launcher imports it to write the report at the end of a run), and drawing never
touches the user's interactive backend or pyplot's global figure list, so it is safe on a headless machine and
inside a notebook alike. Every figure is 8 inches wide and saved at 150 dpi (1200 px), so its text stays legible
when the HTML scales it down to 800 px.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from geotrain.report.metrics import (
    Membership,
    Run,
    eval_series,
    global_tokens_at_steps,
    membership_of,
    run_clock_series,
    run_power,
    site_times,
    sites_in,
    step_series,
    summed_curves,
    total_wan_series,
    wan_series,
)
from geotrain.report.units import fmt_bytes, fmt_percent, fmt_quantity, fmt_tokens

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "PLOT_TITLES",
    "comparison_png",
    "ema",
    "energy_png",
    "loss_vs_tokens_png",
    "loss_vs_wall_png",
    "marks_membership",
    "power_figures",
    "power_png",
    "run_figures",
    "utilization_png",
    "wan_bytes_png",
]

WIDTH_IN = 8.0
DPI = 150
# Enough points to look continuous at 1200 px; more only slows Agg down on long runs.
MAX_POINTS = 2500

EVAL_COLOR = "#111111"
TOTAL_COLOR = "#111111"
COMPUTE_COLOR = "#2b6cb0"
COMM_COLOR = "#dd6b20"
OTHER_COLOR = "#cbd5e0"

# Membership marks, distinct by kind: red for a site lost, green for one back, blue for one healed. Events the
# coordinator saw are solid lines, the faults injected to cause them dashed, rejected updates dotted.
LEFT_COLOR = "#e53e3e"
JOINED_COLOR = "#38a169"
HEALED_COLOR = "#3182ce"
REJECTED_COLOR = "#d53f8c"
FAULT_COLORS = {"kill": "#c53030", "rejoin": "#2f855a", "partition": "#dd6b20", "heal": "#319795",
                "slow": "#b7791f", "nan": "#97266d", "outlier": "#97266d"}
COORDINATOR_COLOR = "#805ad5"
OUT_COLOR = "#fed7d7"
RUN_CLOCK_LABEL = "time since the run started"
CAP_COLOR = "#4a5568"
CAP_FILL = "#edf2f7"

PLOT_TITLES = {
    "loss_tokens": "Loss vs tokens",
    "loss_wall": "Loss vs wall time",
    "wan_bytes": "WAN bytes sent",
    "utilization": "Per-site utilization",
    "power": "Power draw vs grid cap",
    "energy": "Energy used",
}

_STYLE = {
    "font.size": 10,
    "axes.titlesize": 12,
    "axes.titleweight": "bold",
    "axes.labelsize": 10.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,  # grid behind bars, not striped across them
    "grid.color": "#e2e8f0",
    "grid.linewidth": 0.8,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
}


@contextmanager
def _style() -> Iterator[None]:
    import matplotlib

    with matplotlib.rc_context(_STYLE):
        yield


def _figure(height: float, *, rows: int = 1) -> tuple[Figure, list[Axes]]:
    """A figure on the Agg canvas, without pyplot (see the module docstring for why)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH_IN, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, 1, i + 1) for i in range(rows)]
    return fig, axes


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # No "Software" metadata: the same run then gives byte-identical PNGs across matplotlib versions.
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _site_color(site: int) -> Any:
    from matplotlib import colormaps

    return colormaps["tab10"](site % 10)


def _placeholder(ax: Axes, message: str) -> None:
    """Mark an empty panel instead of dropping it, so a partial run's report keeps its layout."""
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#718096", fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def ema(values: np.ndarray, *, span: float | None = None) -> np.ndarray:
    """Exponential moving average, started at the first value (so there is no bias toward zero).

    The default span grows with the series (about 3% of its length, at least 1) so a short demo run is barely
    smoothed and a long one is readable, up to 100 points: an EMA lags by about span / 2 points, and a wider
    window would draw a long run's train loss visibly behind its eval loss while the loss falls fast.
    """
    y = np.asarray(values, dtype=float)
    if y.size == 0:
        return y
    if span is None:
        span = min(max(1.0, y.size / 30), 100.0)
    alpha = 2.0 / (span + 1.0)
    out = np.empty_like(y)
    acc = y[0]
    for i, v in enumerate(y):  # a Python loop: a million points take about a second, fine for a report
        acc = alpha * v + (1 - alpha) * acc
        out[i] = acc
    return out


def _thin(*arrays: np.ndarray, limit: int = MAX_POINTS) -> tuple[np.ndarray, ...]:
    """Every k-th point (always keeping the last) so no series has more than ``limit`` points."""
    n = arrays[0].size
    if n <= limit:
        return arrays
    idx = np.unique(np.append(np.linspace(0, n - 1, limit).astype(int), n - 1))
    return tuple(a[idx] for a in arrays)


def _joined(pieces: list[np.ndarray]) -> np.ndarray:
    """The pieces end to end with a NaN between each two, where matplotlib breaks a line."""
    pieces = [p for p in pieces if p.size]
    if len(pieces) < 2:
        return pieces[0] if pieces else np.empty(0)
    gap = np.array([np.nan])
    return np.concatenate([a for p in pieces for a in (p, gap)][:-1])


def _from_origin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start a cumulative curve at (0, 0): nothing was sent before the run started."""
    if x.size and x[0] > 0:
        return np.concatenate([[0.0], x]), np.concatenate([[0.0], y])
    return x, y


def _time_scale(max_seconds: float) -> tuple[float, str]:
    """Divide wall seconds by this and label the axis in that unit, so ticks read 0, 10, 20 min, not 1200 s."""
    if max_seconds >= 3 * 3600:
        return 3600.0, "h"
    if max_seconds >= 300:
        return 60.0, "min"
    return 1.0, "s"


def _token_axis(axis: Any) -> None:
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _pos: fmt_tokens(v) if v else "0"))


def _byte_axis(axis: Any) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    # Decimal units line up with the locator's round numbers: ticks land on 2 MB, 4 MB, ...
    axis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: fmt_bytes(v) if v else "0"))


def _loss_ylim(ax: Axes, series: Sequence[np.ndarray], *, raw: Sequence[np.ndarray] = ()) -> None:
    """Clip the first steps' very high loss (about ln(vocab) at init) so later differences stay visible.

    The top is set by the ``series`` after their first 5% of points, plus headroom; it only applies when the
    early loss would otherwise squash the rest into a few pixels, and the panel then says it was clipped.
    ``raw`` (the faint unsmoothed losses) only widens the bottom, so the noise band is not cut off.
    """
    values = [s[np.isfinite(s)] for s in series if s.size]
    values = [v for v in values if v.size]
    if not values:
        return
    everything = np.concatenate(values)
    lo, hi = float(everything.min()), float(everything.max())
    tails = [v[max(1, len(v) // 20) :] for v in values if v.size >= 20]
    if not tails:
        return
    top = float(np.quantile(np.concatenate(tails), 0.995))
    span = top - lo
    if span <= 0 or hi <= top + 0.6 * span:
        return
    raw_tails = [r[np.isfinite(r)][len(r) // 20 :] for r in raw if r.size >= 20]
    if raw_tails:
        lo = min(lo, float(np.quantile(np.concatenate(raw_tails), 0.002)))
        span = top - lo
    ax.set_ylim(lo - 0.05 * span, top + 0.35 * span)
    # Bottom left, boxed: the clipped early curves run up the left edge, so the top left is taken.
    ax.text(0.012, 0.025, f"y axis clipped: early loss up to {hi:.2f}", transform=ax.transAxes, ha="left",
            va="bottom", fontsize=8.5, color="#4a5568", zorder=5,
            bbox=dict(boxstyle="round,pad=0.3", facecolor="white", edgecolor="#e2e8f0", alpha=0.9))


def _loss_panel(ax: Axes, run: Run, *, x: str, origin: float | None = None,
                time_scale: tuple[float, str] | None = None, idle: Sequence[tuple[float, float]] = ()) -> bool:
    """Draw train (per site) and eval loss against ``x`` ("tokens" or "wall_s"); False when nothing to draw.

    With ``origin`` (Unix seconds), wall time is the run's clock: seconds since then, from each record's
    ``time``. A site that started again (healed or resumed) then goes on where it was, its line broken over
    the time it was away, where its own ``wall_s`` would start again from zero. ``time_scale`` fixes the unit
    (to share an axis with another panel). The eval line is broken over the ``idle`` periods (seconds, on that
    clock) in which no site was in the run."""
    drawn = False
    smoothed_all: list[np.ndarray] = []
    raw_all: list[np.ndarray] = []
    sites = sites_in(run)
    clock = x == "wall_s" and origin is not None

    def site_xy(site: int) -> tuple[np.ndarray, np.ndarray]:
        if x == "tokens":
            return global_tokens_at_steps(run, site)[:2]
        if clock:
            return run_clock_series(run, "step", site, "loss", origin=origin)
        return step_series(run, site, x="wall_s")

    def eval_xy() -> tuple[np.ndarray, np.ndarray]:
        if clock:
            return run_clock_series(run, "eval", None, "eval_loss", origin=origin)
        return eval_series(run, x="tokens" if x == "tokens" else "wall_s")

    t_max = 0.0
    if x == "wall_s" and time_scale is None:
        for site in sites:
            xs, _ = site_xy(site)
            if xs.size:
                t_max = max(t_max, float(xs.max()))
        ex, _ = eval_xy()
        if ex.size:
            t_max = max(t_max, float(ex.max()))
    scale, unit = time_scale or _time_scale(t_max)

    for site in sites:
        xs, ys = site_xy(site)
        if not xs.size:
            continue
        if x == "wall_s":
            xs = xs / scale
        cuts: np.ndarray = np.empty(0, dtype=int)
        if clock:  # one piece per process the site ran, each smoothed on its own
            starts = run_clock_series(run, "start", site, "time", origin=origin)[0][1:] / scale
            cuts = np.unique(np.searchsorted(xs, starts))
        smooth = _joined([ema(piece) for piece in np.split(ys, cuts)])
        smoothed_all.append(smooth[np.isfinite(smooth)])
        raw_all.append(ys)
        xs, ys = _joined(np.split(xs, cuts)), _joined(np.split(ys, cuts))
        color = _site_color(site)
        rx, ry, rs = _thin(xs, ys, smooth)
        if xs.size > 1:
            ax.plot(rx, ry, color=color, alpha=0.15, linewidth=0.6, zorder=1)
        ax.plot(rx, rs, color=color, linewidth=1.3, label=f"site {site} train (EMA)", zorder=2,
                # A sparsely logged run gets small markers: the reader sees where the samples are and does not
                # read the straight segments between them as measurements.
                marker="o" if xs.size <= 40 else None, markersize=2.5)
        drawn = True

    ex, ey = eval_xy()
    if ex.size:
        if x == "wall_s":
            ex = ex / scale
        if clock and idle:
            cuts = np.unique(np.searchsorted(ex, [stop / scale for _, stop in idle]))
            ex, ey = _joined(np.split(ex, cuts)), _joined(np.split(ey, cuts))
        ax.plot(ex, ey, color=EVAL_COLOR, linewidth=1.8, marker="o", markersize=6.5 if ex.size <= 30 else 4.5,
                markerfacecolor=EVAL_COLOR, markeredgecolor="white", markeredgewidth=1.2 if ex.size <= 30 else 0.6,
                label="eval (held-out)", zorder=4)
        smoothed_all.append(ey)
        drawn = True

    if not drawn:
        _placeholder(ax, "no loss recorded yet")
        return False
    _loss_ylim(ax, smoothed_all, raw=raw_all)
    ax.set_ylabel("loss (nats/token)")
    if x == "tokens":
        ax.set_xlabel("tokens trained, all sites")
        _token_axis(ax.xaxis)
    else:
        ax.set_xlabel(f"{RUN_CLOCK_LABEL} ({unit})" if clock else f"wall time ({unit})")
    ax.set_xlim(left=0)
    # With membership marks, their labels take the top of the panel.
    _legend(ax, loc="lower left" if clock else "upper right")
    return True


def _legend(ax: Axes, **kwargs: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    # Many sites would bury the plot under the legend; past 8 entries, spread it over columns.
    ncol = 1 if len(handles) <= 5 else 2 if len(handles) <= 10 else 3
    ax.legend(handles, labels, ncol=ncol, **kwargs)


def _subtitle(run: Run) -> str:
    s = run.summary
    parts = [str(s[k]) for k in ("algorithm",) if s.get(k)]
    if s.get("sites"):
        parts.append(f"{s['sites']} sites")
    if s.get("link"):
        parts.append(f"link {s['link']}")
    if s.get("codec"):
        parts.append(f"codec {s['codec']}")
    return " · ".join(parts)


def _title(ax: Axes, title: str, run: Run | None = None) -> None:
    sub = _subtitle(run) if run is not None else ""
    ax.set_title(title, loc="left")
    if sub:
        ax.set_title(sub, loc="right", fontsize=9, fontweight="normal", color="#4a5568")


def loss_vs_tokens_png(run: Run) -> bytes:
    """Train loss per site and eval loss against tokens trained over all sites."""
    with _style():
        fig, (ax,) = _figure(4.5)
        _title(ax, PLOT_TITLES["loss_tokens"], run)
        _loss_panel(ax, run, x="tokens")
        return _png(fig)


def loss_vs_wall_png(run: Run) -> bytes:
    """Train loss per site and eval loss against wall time; for a run whose membership changed, on the run's
    clock, under a lane per site that shows when it was in the run, and with its events marked."""
    m = membership_of(run)
    if marks_membership(run, m):
        return _loss_with_membership_png(run, m)
    with _style():
        fig, (ax,) = _figure(4.5)
        _title(ax, PLOT_TITLES["loss_wall"], run)
        _loss_panel(ax, run, x="wall_s")
        return _png(fig)


# -- membership -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Mark:
    """One thing that happened to the run's membership, as drawn: a vertical line at ``x`` (seconds since the
    launch) with ``label`` beside it, and ``marker`` on the lane of ``site`` (None: the coordinator's)."""

    x: float
    site: int | None
    label: str
    legend: str
    color: str
    line: str
    marker: str


def marks_membership(run: Run, m: Membership | None = None) -> bool:
    """Whether the wall-time figures mark membership: something happened, and the records can be put on the
    run's clock (they carry Unix times; a hand-written or very old log may not)."""
    m = membership_of(run) if m is None else m
    return m.changed and m.origin is not None and bool(np.isfinite(run.column("step", None, "time")).any())


def _is_site(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _marks(m: Membership) -> list[_Mark]:
    """What to mark: the membership changes, the injected faults and the rejected updates whose time and site
    are known (a damaged entry is left to the tables, which show what was written)."""
    marks: list[_Mark] = []
    for e in m.changes:
        site, kind, wall = e.get("site"), e.get("kind"), e.get("wall")
        if wall is None or not _is_site(site):
            continue
        if kind == "left":
            marks.append(_Mark(wall, site, f"site {site} left", "site left", LEFT_COLOR, "-", "X"))
        elif kind == "healed":
            marks.append(_Mark(wall, site, f"site {site} healed", "site healed (state received)", HEALED_COLOR, "-",
                               "D"))
        else:
            marks.append(_Mark(wall, site, f"site {site} {kind}", "site joined / rejoined", JOINED_COLOR, "-", "^"))
    for f in m.faults:
        action, site, wall = str(f.get("action")), f.get("site"), f.get("wall")
        if wall is None or not (site is None or _is_site(site)):
            continue
        if site is None:
            marks.append(_Mark(wall, None, f"{action} coordinator", f"fault: {action} coordinator",
                               COORDINATOR_COLOR, "--", "v"))
        else:
            marks.append(_Mark(wall, site, f"{action} site {site}", f"fault: {action}",
                               FAULT_COLORS.get(action, "#4a5568"), "--", "v"))
    for r in m.rejected:
        if r.get("wall") is not None and _is_site(r.get("site")):
            marks.append(_Mark(r["wall"], r.get("site"), f"site {r.get('site')} rejected", "update rejected",
                               REJECTED_COLOR, ":", "s"))
    return sorted(marks, key=lambda mk: mk.x)


def _mark_lines(ax: Axes, marks: Sequence[_Mark], *, scale: float, labels: bool) -> None:
    """A vertical line per mark across ``ax``; with ``labels``, its label beside it at the top, the labels
    of marks too close to read apart set side by side. Without, the lines are fainter: they only echo a
    figure that has them."""
    from matplotlib.transforms import ScaledTranslation, blended_transform_factory

    for mk in marks:
        ax.axvline(mk.x / scale, color=mk.color, linestyle=mk.line, linewidth=1.1, alpha=0.75 if labels else 0.5,
                   zorder=0.8)
    if not labels:
        return
    left, right = ax.get_xlim()
    close = 0.018 * (right - left)  # about one rotated label's width at 1200 px
    base = blended_transform_factory(ax.transData, ax.transAxes)
    slot, previous = 0, None
    for mk in marks:
        x = mk.x / scale
        slot = slot + 1 if previous is not None and x - previous < close * (slot + 1) else 0
        previous = x if slot == 0 else previous
        # right of the line, a label's width further for each neighbour already there
        shift = ScaledTranslation((2 + 11 * slot) / 72, 0, ax.figure.dpi_scale_trans)
        ax.text(x, 0.985, mk.label, transform=base + shift, rotation=90, ha="left", va="top", fontsize=7.5,
                color=mk.color, zorder=6, bbox=dict(boxstyle="square,pad=0.1", facecolor="white", edgecolor="none",
                                                    alpha=0.75))


def _lanes(ax: Axes, run: Run, m: Membership, marks: Sequence[_Mark], *, scale: float) -> None:
    """One lane per site over the run: solid while a member, faint and hatched while being healed, hatched
    red while out, a dashed box while partitioned; the marks on the lane they concern."""
    spans = m.intervals()
    sites = sorted(set(sites_in(run)) | set(spans) | {mk.site for mk in marks if mk.site is not None})
    lanes: list[int | None] = [*sites, *([None] if any(mk.site is None for mk in marks) else [])]
    y = {lane: len(lanes) - 1 - i for i, lane in enumerate(lanes)}  # site 0 on top
    for site, intervals in spans.items():
        color = _site_color(site)
        for start, stop, state in intervals:
            left, width = start / scale, (stop - start) / scale
            if state == "member":
                ax.barh(y[site], width, left=left, height=0.5, color=color, linewidth=0)
            elif state == "healing":
                ax.barh(y[site], width, left=left, height=0.5, facecolor="white", edgecolor=color, hatch="////",
                        linewidth=0.8)
            elif state == "out":
                ax.barh(y[site], width, left=left, height=0.5, facecolor=OUT_COLOR, edgecolor=LEFT_COLOR, hatch="xx",
                        linewidth=0.8)
            else:  # partitioned
                ax.barh(y[site], width, left=left, height=0.82, fill=False, edgecolor=FAULT_COLORS["partition"],
                        linestyle="--", linewidth=1.1)
    if None in y and m.end is not None:
        ax.plot([0, m.end / scale], [y[None], y[None]], color="#a0aec0", linewidth=1.2, zorder=1)
    for mk in marks:
        above = 0.42 if mk.marker == "v" else 0.0  # a fault strikes the lane from above
        ax.scatter([mk.x / scale], [y[mk.site] + above], marker=mk.marker, s=42 if mk.marker != "s" else 30,
                   color=mk.color, edgecolors="white", linewidths=0.7, zorder=5)
    ax.set_yticks(list(y.values()), ["coordinator" if lane is None else f"site {lane}" for lane in y])
    ax.set_ylim(-0.6, len(lanes) - 0.4 + 0.25)
    ax.grid(axis="y", visible=False)
    ax.tick_params(axis="x", labelbottom=False)
    ax.tick_params(axis="y", length=0)
    ax.spines["left"].set_visible(False)


def _membership_legend(marks: Sequence[_Mark], spans: dict[int, list[Any]]) -> dict[str, Any]:
    """Legend handles by label: one per lane state and kind of mark present."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: dict[str, Any] = {}
    states = {state for intervals in spans.values() for *_, state in intervals}
    if "member" in states:
        handles["in the run"] = Patch(facecolor="#718096", linewidth=0)
    if "healing" in states:
        handles["being healed"] = Patch(facecolor="white", edgecolor="#4a5568", hatch="////", linewidth=0.8)
    if "out" in states:
        handles["out of the run"] = Patch(facecolor=OUT_COLOR, edgecolor=LEFT_COLOR, hatch="xx", linewidth=0.8)
    if "partitioned" in states:
        handles["partitioned"] = Patch(fill=False, edgecolor=FAULT_COLORS["partition"], linestyle="--")
    # events first, then rejected updates, then the faults, each kind once
    for mk in sorted(marks, key=_legend_rank):
        handles.setdefault(mk.legend, Line2D([], [], color=mk.color, linestyle=mk.line, linewidth=1.1, marker=mk.marker,
                                             markersize=6, markeredgecolor="white"))
    return handles


def _idle(spans: dict[int, list[Any]]) -> list[tuple[float, float]]:
    """The periods between the first site joining and the last leaving in which no site was in the run (all of
    them stopped, say, and the run resumed later)."""
    busy = sorted((start, stop) for intervals in spans.values() for start, stop, state in intervals
                  if state in ("member", "healing"))
    idle: list[tuple[float, float]] = []
    reach = None
    for start, stop in busy:
        if reach is not None and start > reach:
            idle.append((reach, start))
        reach = stop if reach is None else max(reach, stop)
    return idle


def _legend_rank(mk: _Mark) -> tuple[int, int]:
    events = ("site left", "site joined / rejoined", "site healed (state received)", "update rejected")
    if mk.legend in events:
        return 0, events.index(mk.legend)
    actions = list(FAULT_COLORS)
    action = mk.legend.removeprefix("fault: ")
    return 1, actions.index(action) if action in actions else len(actions)


def _loss_with_membership_png(run: Run, m: Membership) -> bytes:
    marks = _marks(m)
    spans = m.intervals()
    lanes = len({*sites_in(run), *spans}) + (1 if any(mk.site is None for mk in marks) else 0)
    lane_height = 0.35 + 0.3 * lanes
    legend = _membership_legend(marks, spans)
    legend_rows = -(-len(legend) // 4)
    end = m.end or 0.0
    scale, unit = _time_scale(end)
    with _style():
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(WIDTH_IN, 4.5 + lane_height + 0.25 * legend_rows), layout="constrained")
        FigureCanvasAgg(fig)
        grid = fig.add_gridspec(2, 1, height_ratios=[lane_height, 4.5])
        lane_ax = fig.add_subplot(grid[0])
        ax = fig.add_subplot(grid[1], sharex=lane_ax)
        _title(lane_ax, PLOT_TITLES["loss_wall"], run)
        _lanes(lane_ax, run, m, marks, scale=scale)
        drawn = _loss_panel(ax, run, x="wall_s", origin=m.origin, time_scale=(scale, unit), idle=_idle(spans))
        lo = min([0.0, *(mk.x / scale for mk in marks), *(a / scale for v in spans.values() for a, *_ in v)])
        ax.set_xlim(lo, end / scale * 1.02 if end > 0 else 1)
        if drawn:
            _mark_lines(ax, marks, scale=scale, labels=True)
        if legend:  # below the figure, outside the panels
            fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncol=min(4, len(legend)),
                       frameon=False, fontsize=8.5)
        return _png(fig)


def wan_bytes_png(run: Run) -> bytes:
    """Cumulative bytes sent over cross-site links against wall time: each site, and all sites together."""
    with _style():
        fig, (ax,) = _figure(4.5)
        _title(ax, PLOT_TITLES["wan_bytes"], run)
        # A run whose membership changed is drawn on the run's clock, as its loss is, with the same marks.
        m = membership_of(run)
        origin = m.origin if marks_membership(run, m) else None
        curves = {site: wan_series(run, site, origin=origin) for site in sites_in(run)}
        curves = {s: c for s, c in curves.items() if c[0].size}
        tx, ty = total_wan_series(run, origin=origin)
        if not curves or not tx.size:
            _placeholder(ax, "no WAN traffic recorded")
            return _png(fig)
        end = float(tx.max()) if origin is None else max(float(tx.max()), m.end or 0.0)
        scale, unit = _time_scale(end)
        for site, (x, y) in curves.items():
            x, y = _thin(*_from_origin(x, y))
            ax.step(x / scale, y, where="post", color=_site_color(site), linewidth=1.3, label=f"site {site}")
        if len(curves) > 1:
            tx, ty = _thin(*_from_origin(tx, ty))
            ax.step(tx / scale, ty, where="post", color=TOTAL_COLOR, linewidth=2.2, label="all sites")
        ax.set_xlabel(f"wall time ({unit})" if origin is None else f"{RUN_CLOCK_LABEL} ({unit})")
        ax.set_ylabel("bytes sent (cumulative)")
        _byte_axis(ax.yaxis)
        final = float(ty[-1]) if ty.size else 0.0
        ax.set_xlim(0, end / scale * 1.02 if end > 0 else 1)
        if origin is not None:
            _mark_lines(ax, _marks(m), scale=scale, labels=False)
        # Headroom above the final total for its label.
        ax.set_ylim(0, final * 1.12 if final > 0 else 1)
        # On a white ground: membership lines may run behind the label and the legend.
        ground = dict(boxstyle="square,pad=0.15", facecolor="white", edgecolor="none", alpha=0.85)
        ax.annotate(f"total {fmt_bytes(final)}", xy=(tx[-1] / scale, final), xytext=(-4, 5),
                    textcoords="offset points", ha="right", va="bottom", fontsize=9.5, fontweight="bold",
                    color=TOTAL_COLOR, bbox=ground if origin is not None else None)
        if origin is None:
            _legend(ax, loc="upper left")
        else:
            _legend(ax, loc="upper left", frameon=True, facecolor="white", edgecolor="none", framealpha=0.85)
        return _png(fig)


def utilization_png(run: Run) -> bytes:
    """Stacked bars per site: compute seconds, communication-wait seconds, and the rest of wall time."""
    times = site_times(run)
    height = max(2.6, 1.7 + 0.42 * len(times))
    with _style():
        fig, (ax,) = _figure(height)
        _title(ax, PLOT_TITLES["utilization"], run)
        rows = []
        for st in times:
            compute, comm, wall = st.compute_seconds, st.comm_seconds, st.wall_seconds
            held = st.throttled_seconds or 0.0
            if compute is None and st.utilization is not None and wall is not None:
                compute = st.utilization * wall - held
            if compute is None and comm is None:
                continue
            compute, comm = compute or 0.0, comm or 0.0
            # Wall time not spent computing, held back or waiting on the link (data loading, eval, start-up) is
            # shown too, so bar length is wall time and utilization reads off the bar.
            other = max(0.0, wall - compute - held - comm) if wall is not None else 0.0
            util = st.utilization if st.utilization is not None else ((compute + held) / wall if wall else None)
            rows.append((st.site, compute, comm, other, util, held))
        if not rows:
            _placeholder(ax, "no per-site timings recorded")
            return _png(fig)

        labels = [f"site {r[0]}" for r in rows]
        y = np.arange(len(rows))[::-1]  # site 0 on top
        compute = np.array([r[1] for r in rows])
        comm = np.array([r[2] for r in rows])
        other = np.array([r[3] for r in rows])
        held = np.array([r[5] for r in rows])
        total = compute + held + comm + other
        scale, unit = _time_scale(float(total.max()) if total.size else 0.0)
        bar = dict(height=0.62, edgecolor="white", linewidth=0.8)
        ax.barh(y, compute / scale, color=COMPUTE_COLOR, label="compute", **bar)
        if held.sum() > 0:  # a slower or power-capped site: its steps held back, still computing (more slowly)
            ax.barh(y, held / scale, left=compute / scale, color=COMPUTE_COLOR, alpha=0.45, hatch="//",
                    label="throttled (power or speed)", **bar)
        ax.barh(y, comm / scale, left=(compute + held) / scale, color=COMM_COLOR, label="communication wait", **bar)
        if other.sum() > 0.01 * total.sum():
            ax.barh(y, other / scale, left=(compute + held + comm) / scale, color=OTHER_COLOR,
                    label="other (data, eval, idle)", **bar)
        for yi, tot, row in zip(y, total, rows):
            util = row[4]
            text = f"{fmt_percent(util)} util." if util is not None else "—"
            ax.annotate(text, xy=(tot / scale, yi), xytext=(5, 0), textcoords="offset points",
                        va="center", ha="left", fontsize=9.5, fontweight="bold", color="#2d3748")
        ax.set_yticks(y, labels)
        ax.grid(axis="y", visible=False)
        ax.set_xlabel(f"wall time ({unit})")
        # Headroom on the right for the utilization labels.
        ax.set_xlim(0, float(total.max()) / scale * 1.18 if total.max() > 0 else 1)
        # Below the axes, outside them: inside, it would cover the bars of the lowest site.
        fig.legend(loc="outside lower center", ncol=3, frameon=False)
        return _png(fig)


def run_figures(run: Run) -> dict[str, bytes]:
    """All figures of a run, keyed as in :data:`PLOT_TITLES` and in display order: the four every run has,
    then the power figures of a run that models power."""
    return {
        "loss_tokens": loss_vs_tokens_png(run),
        "loss_wall": loss_vs_wall_png(run),
        "wan_bytes": wan_bytes_png(run),
        "utilization": utilization_png(run),
        **power_figures(run),
    }


def _grid_axis(ax: Axes, series: Sequence[Any], *, scale: float) -> None:
    """Grid time (hours) along the top of ``ax``, read off the records: training wall time maps onto the
    grid trace's time through the steps that carry both."""
    pairs = sorted((w / scale, g) for ps in series for w, g in zip(ps.wall_s, ps.grid_hours)
                   if np.isfinite(w) and np.isfinite(g))
    if len(pairs) < 2:
        return
    wall = np.array([w for w, _ in pairs])
    grid = np.maximum.accumulate(np.array([g for _, g in pairs]))
    if grid[-1] <= grid[0] or wall[-1] <= wall[0]:
        return
    # beyond the first and the last step, at the run's mean rate (the axis starts before the first step)
    rate = (grid[-1] - grid[0]) / (wall[-1] - wall[0])
    far = 10 * (wall[-1] - wall[0]) + abs(wall[0])
    wall = np.concatenate([[wall[0] - far], wall, [wall[-1] + far]])
    grid = np.concatenate([[grid[0] - far * rate], grid, [grid[-1] + far * rate]])
    top = ax.secondary_xaxis("top", functions=(lambda x: np.interp(x, wall, grid),
                                               lambda h: np.interp(h, grid, wall)))
    top.set_xlabel("grid time (h)", fontsize=9, color="#4a5568")
    top.tick_params(labelsize=8.5, colors="#4a5568")


def _broken_at(x: np.ndarray, ys: Sequence[np.ndarray], cuts: Sequence[float]) -> tuple[np.ndarray, ...]:
    """``x`` and each of ``ys`` with a break (NaN) wherever one of ``cuts`` falls between two points (a line
    is not drawn across a window in which the site wrote nothing) and wherever ``x`` goes back (a new process
    of the site, whose clock started again)."""
    if x.size < 2:
        return (x, *ys)
    before, after = x[:-1, None], x[1:, None]
    c = np.asarray(cuts, dtype=float)[None, :]
    across = ((c >= before) & (c < after)).any(axis=1) if c.size else np.zeros(x.size - 1, dtype=bool)
    idx = np.flatnonzero(across | (x[1:] < x[:-1])) + 1
    return tuple(_joined(np.split(a, idx)) for a in (x, *ys))


def power_png(run: Run) -> bytes:
    """One panel per site over training wall time: its draw (a line) under the grid's cap (dashed, the power
    available shaded), with the windows its power was off shaded red; the grid's clock along the top."""
    series = list(run_power(run).values())
    # past six sites the panels get lower, so that the figure stays about as tall as a page
    panel = 1.45 if len(series) <= 6 else max(0.8, 8.7 / len(series))
    height = 1.3 + panel * max(len(series), 1)
    with _style():
        fig, axes = _figure(height, rows=max(len(series), 1))
        _title(axes[0], PLOT_TITLES["power"], run)
        if not series:
            _placeholder(axes[0], "no power recorded")
            return _png(fig)
        end = max(max(ps.wall_s) for ps in series)
        end = max([end, *(b for ps in series for a, b in ps.off if b is not None)])
        scale, unit = _time_scale(end)
        for ax, ps in zip(axes, series):
            # each site on its own scale: sites differ in size, and what a panel shows is draw against cap
            top = max(np.nanmax(ps.power_mw), np.nanmax(ps.cap_mw) if np.isfinite(ps.cap_mw).any() else 0.0)
            x, power, cap = _thin(np.asarray(ps.wall_s) / scale, np.asarray(ps.power_mw), np.asarray(ps.cap_mw))
            x, power, cap = _broken_at(x, [power, cap], [a / scale for a, _ in ps.off])
            ax.fill_between(x, 0, cap, color=CAP_FILL, linewidth=0, zorder=0.5)
            ax.plot(x, cap, color=CAP_COLOR, linestyle="--", linewidth=1.1, zorder=2)
            ax.plot(x, power, color=_site_color(ps.site), linewidth=1.5, zorder=3)
            for a, b in ps.off:
                ax.axvspan(a / scale, (b if b is not None else end) / scale, facecolor=OUT_COLOR,
                           edgecolor=LEFT_COLOR, hatch="xx", linewidth=0, alpha=0.8, zorder=1)
            name = f"site {ps.site}" + (f" · speed {ps.speed:g}" if ps.speed is not None and ps.speed != 1 else "")
            ax.text(0.005, 0.96, name, transform=ax.transAxes, ha="left", va="top", fontsize=9.5, fontweight="bold",
                    color=_site_color(ps.site), zorder=6,
                    bbox=dict(boxstyle="round,pad=0.25", facecolor="white", edgecolor="none", alpha=0.85))
            ax.set_ylim(0, top * 1.25 if top > 0 else 1)
            ax.set_ylabel("MW")
            ax.set_xlim(0, end / scale * 1.01 if end > 0 else 1)
            if ax is not axes[-1]:
                ax.tick_params(axis="x", labelbottom=False)
        for ax in axes[1:]:
            ax.sharex(axes[0])
        _grid_axis(axes[0], series, scale=scale)
        axes[-1].set_xlabel(f"training wall time ({unit})")
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        handles = [Line2D([], [], color="#718096", linewidth=1.5), Line2D([], [], color=CAP_COLOR, linestyle="--"),
                   Patch(facecolor=CAP_FILL, linewidth=0)]
        labels = ["draw (site's colour)", "grid cap", "power available"]
        if any(ps.off for ps in series):
            handles.append(Patch(facecolor=OUT_COLOR, edgecolor=LEFT_COLOR, hatch="xx", linewidth=0))
            labels.append("power off (site out of the run)")
        fig.legend(handles, labels, loc="outside lower center", ncol=len(handles), frameon=False, fontsize=8.5)
        return _png(fig)


def energy_png(run: Run) -> bytes:
    """The energy each site used, cumulative, against its training wall time, and all sites together."""
    series = list(run_power(run).values())
    with _style():
        fig, (ax,) = _figure(4.0)
        _title(ax, PLOT_TITLES["energy"], run)
        curves = {ps.site: _sorted_energy(ps) for ps in series}
        curves = {site: c for site, c in curves.items() if c[0].size}
        if not curves:
            _placeholder(ax, "no energy recorded")
            return _png(fig)
        tx, ty = summed_curves(curves.values())
        end = float(tx.max())
        scale, unit = _time_scale(end)
        for site, (x, y) in curves.items():
            ax.plot(*_thin(*_from_origin(x / scale, y)), color=_site_color(site), linewidth=1.4, label=f"site {site}")
        if len(curves) > 1:
            ax.plot(*_thin(*_from_origin(tx / scale, ty)), color=TOTAL_COLOR, linewidth=2.2, label="all sites")
        final = float(ty[-1])
        ax.annotate(f"total {fmt_quantity(final, 'MWh')}", xy=(tx[-1] / scale, final), xytext=(-4, 5),
                    textcoords="offset points", ha="right", va="bottom", fontsize=9.5, fontweight="bold",
                    color=TOTAL_COLOR)
        ax.set_xlim(0, end / scale * 1.02 if end > 0 else 1)
        ax.set_ylim(0, final * 1.15 if final > 0 else 1)
        ax.set_xlabel(f"training wall time ({unit})")
        ax.set_ylabel("energy (MWh, cumulative)")
        _legend(ax, loc="upper left")
        return _png(fig)


def _sorted_energy(ps: Any) -> tuple[np.ndarray, np.ndarray]:
    """A site's cumulative energy against its wall time, sorted, where both are known."""
    x, y = np.asarray(ps.wall_s, dtype=float), np.asarray(ps.energy_mwh, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    order = np.argsort(x[keep], kind="stable")
    return x[keep][order], np.maximum.accumulate(y[keep][order])


def power_figures(run: Run) -> dict[str, bytes]:
    """The power figures of a run that models its sites' power, keyed as in :data:`PLOT_TITLES`; empty for
    one that does not."""
    if not run_power(run):
        return {}
    return {"power": power_png(run), "energy": energy_png(run)}


def comparison_png(runs: Sequence[tuple[str, Run]]) -> bytes:
    """Eval loss against tokens (top) and against wall time (bottom), one line per named run."""
    with _style():
        fig, (ax_tok, ax_wall) = _figure(8.0, rows=2)
        ax_tok.set_title("Eval loss vs tokens", loc="left")
        ax_wall.set_title("Eval loss vs wall time", loc="left")
        series = [(name, run, eval_series(run, x="tokens"), eval_series(run, x="wall_s")) for name, run in runs]
        t_max = max((float(w[0].max()) for *_, w in series if w[0].size), default=0.0)
        scale, unit = _time_scale(t_max)
        drawn_tok = drawn_wall = False
        ys: list[np.ndarray] = []
        missing: list[str] = []
        from matplotlib import colormaps

        cmap = colormaps["tab10"]
        for i, (name, _run, (tx, ty), (wx, wy)) in enumerate(series):
            # Markers show where evals happened; past ~60 points they only thicken the line.
            marker = "o" if max(tx.size, wx.size) <= 60 else None
            style = dict(color=cmap(i % 10), linewidth=1.8, marker=marker, markersize=4.5, label=name)
            if tx.size:
                ax_tok.plot(*_thin(tx, ty), **style)
                drawn_tok = True
                ys.append(ty)
            if wx.size:
                ax_wall.plot(*_thin(wx / scale, wy), **style)
                drawn_wall = True
            if not tx.size and not wx.size:
                missing.append(name)
        for ax, drawn in ((ax_tok, drawn_tok), (ax_wall, drawn_wall)):
            if not drawn:
                _placeholder(ax, "no eval loss recorded")
                continue
            _loss_ylim(ax, ys)
            ax.set_ylabel("eval loss")
            ax.set_xlim(left=0)
            _legend(ax, loc="upper right")
        if missing and (drawn_tok or drawn_wall):
            # Say which runs are absent rather than leave the reader to count lines.
            fig.text(0.01, 0.0, "no eval loss recorded: " + ", ".join(missing), fontsize=9, color="#718096",
                     ha="left", va="bottom")
        if drawn_tok:
            ax_tok.set_xlabel("tokens trained, all sites")
            _token_axis(ax_tok.xaxis)
        if drawn_wall:
            ax_wall.set_xlabel(f"wall time ({unit})")
        return _png(fig)

