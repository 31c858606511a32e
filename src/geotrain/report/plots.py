"""The run report's figures, each rendered to PNG bytes.

Four figures describe one run (see :func:`run_figures`):

- loss against tokens trained over all sites: each site's train loss (thin, EMA-smoothed over the raw loss,
  which is drawn faintly behind it) and the held-out eval loss (bold markers);
- the same against wall time, which is what a slow link actually costs;
- cumulative bytes sent over the WAN against wall time, per site and in total;
- per-site utilization: compute against communication-wait seconds as stacked bars, with compute / wall
  annotated (the guide's definition of utilization).

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
from typing import TYPE_CHECKING, Any

import numpy as np

from geotrain.report.metrics import (
    Run,
    eval_series,
    global_tokens_at_steps,
    site_times,
    sites_in,
    step_series,
    total_wan_series,
    wan_series,
)
from geotrain.report.units import fmt_bytes, fmt_percent, fmt_tokens

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "PLOT_TITLES",
    "comparison_png",
    "ema",
    "loss_vs_tokens_png",
    "loss_vs_wall_png",
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

PLOT_TITLES = {
    "loss_tokens": "Loss vs tokens",
    "loss_wall": "Loss vs wall time",
    "wan_bytes": "WAN bytes sent",
    "utilization": "Per-site utilization",
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


def _loss_panel(ax: Axes, run: Run, *, x: str) -> bool:
    """Draw train (per site) and eval loss against ``x`` ("tokens" or "wall_s"); False when nothing to draw."""
    drawn = False
    smoothed_all: list[np.ndarray] = []
    raw_all: list[np.ndarray] = []
    sites = sites_in(run)
    t_max = 0.0
    if x == "wall_s":
        for site in sites:
            xs, _ = step_series(run, site, x="wall_s")
            if xs.size:
                t_max = max(t_max, float(xs.max()))
        ex, _ = eval_series(run, x="wall_s")
        if ex.size:
            t_max = max(t_max, float(ex.max()))
    scale, unit = _time_scale(t_max)

    for site in sites:
        if x == "tokens":
            xs, ys, _ = global_tokens_at_steps(run, site)
        else:
            xs, ys = step_series(run, site, x="wall_s")
            xs = xs / scale
        if not xs.size:
            continue
        smooth = ema(ys)
        smoothed_all.append(smooth)
        raw_all.append(ys)
        color = _site_color(site)
        rx, ry, rs = _thin(xs, ys, smooth)
        if xs.size > 1:
            ax.plot(rx, ry, color=color, alpha=0.15, linewidth=0.6, zorder=1)
        ax.plot(rx, rs, color=color, linewidth=1.3, label=f"site {site} train (EMA)", zorder=2,
                # A sparsely logged run gets small markers: the reader sees where the samples are and does not
                # read the straight segments between them as measurements.
                marker="o" if xs.size <= 40 else None, markersize=2.5)
        drawn = True

    ex, ey = eval_series(run, x="tokens" if x == "tokens" else "wall_s")
    if ex.size:
        if x == "wall_s":
            ex = ex / scale
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
        ax.set_xlabel(f"wall time ({unit})")
    ax.set_xlim(left=0)
    _legend(ax, loc="upper right")
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
    """Train loss per site and eval loss against wall time."""
    with _style():
        fig, (ax,) = _figure(4.5)
        _title(ax, PLOT_TITLES["loss_wall"], run)
        _loss_panel(ax, run, x="wall_s")
        return _png(fig)


def wan_bytes_png(run: Run) -> bytes:
    """Cumulative bytes sent over cross-site links against wall time: each site, and all sites together."""
    with _style():
        fig, (ax,) = _figure(4.5)
        _title(ax, PLOT_TITLES["wan_bytes"], run)
        curves = {site: wan_series(run, site) for site in sites_in(run)}
        curves = {s: c for s, c in curves.items() if c[0].size}
        tx, ty = total_wan_series(run)
        if not curves or not tx.size:
            _placeholder(ax, "no WAN traffic recorded")
            return _png(fig)
        scale, unit = _time_scale(float(tx.max()))
        for site, (x, y) in curves.items():
            x, y = _thin(*_from_origin(x, y))
            ax.step(x / scale, y, where="post", color=_site_color(site), linewidth=1.3, label=f"site {site}")
        if len(curves) > 1:
            tx, ty = _thin(*_from_origin(tx, ty))
            ax.step(tx / scale, ty, where="post", color=TOTAL_COLOR, linewidth=2.2, label="all sites")
        ax.set_xlabel(f"wall time ({unit})")
        ax.set_ylabel("bytes sent (cumulative)")
        _byte_axis(ax.yaxis)
        final = float(ty[-1]) if ty.size else 0.0
        ax.set_xlim(0, float(tx[-1]) / scale * 1.02 if tx[-1] > 0 else 1)
        # Headroom above the final total for its label.
        ax.set_ylim(0, final * 1.12 if final > 0 else 1)
        ax.annotate(f"total {fmt_bytes(final)}", xy=(tx[-1] / scale, final), xytext=(-4, 5),
                    textcoords="offset points", ha="right", va="bottom", fontsize=9.5, fontweight="bold",
                    color=TOTAL_COLOR)
        _legend(ax, loc="upper left")
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
            if compute is None and st.utilization is not None and wall is not None:
                compute = st.utilization * wall
            if compute is None and comm is None:
                continue
            compute, comm = compute or 0.0, comm or 0.0
            # Wall time not spent computing or waiting on the link (data loading, eval, start-up) is shown
            # too, so bar length is wall time and utilization reads off the bar.
            other = max(0.0, wall - compute - comm) if wall is not None else 0.0
            util = st.utilization if st.utilization is not None else (compute / wall if wall else None)
            rows.append((st.site, compute, comm, other, util))
        if not rows:
            _placeholder(ax, "no per-site timings recorded")
            return _png(fig)

        labels = [f"site {r[0]}" for r in rows]
        y = np.arange(len(rows))[::-1]  # site 0 on top
        compute = np.array([r[1] for r in rows])
        comm = np.array([r[2] for r in rows])
        other = np.array([r[3] for r in rows])
        total = compute + comm + other
        scale, unit = _time_scale(float(total.max()) if total.size else 0.0)
        bar = dict(height=0.62, edgecolor="white", linewidth=0.8)
        ax.barh(y, compute / scale, color=COMPUTE_COLOR, label="compute", **bar)
        ax.barh(y, comm / scale, left=compute / scale, color=COMM_COLOR, label="communication wait", **bar)
        if other.sum() > 0.01 * total.sum():
            ax.barh(y, other / scale, left=(compute + comm) / scale, color=OTHER_COLOR, label="other (data, eval, idle)", **bar)
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
    """All four figures of a run, keyed as in :data:`PLOT_TITLES` and in display order."""
    return {
        "loss_tokens": loss_vs_tokens_png(run),
        "loss_wall": loss_vs_wall_png(run),
        "wan_bytes": wan_bytes_png(run),
        "utilization": utilization_png(run),
    }


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

