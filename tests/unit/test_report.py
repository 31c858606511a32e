"""Tests of the run report (geotrain.report): reading run directories, the HTML report, comparisons, live progress.

Run directories are written by hand here (``make_run``) with plausible values: four sites running DiLoCo over a
slow link, with a sync every ``sync_every`` steps, eval records and one sync record per site per round. A partial
run drops summary keys and ends in a truncated line, as after Ctrl+C or a crash.
"""

from __future__ import annotations

import base64
import io
import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from geotrain.report.compare import write_comparison
from geotrain.report.html import esc, render_report, toml_ish, write_report
from geotrain.report.live import LiveProgress, final_table
from geotrain.report.metrics import (
    derived_summary,
    eval_series,
    global_tokens_at_steps,
    merged_summary,
    read_run,
    run_status,
    total_wan_series,
    wan_series,
)
from geotrain.report.units import fmt_bytes, fmt_percent, fmt_seconds, fmt_tokens

pytestmark = pytest.mark.timeout(60)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOKENS_PER_STEP = 2048


def make_run(
    run_dir: Path,
    *,
    algorithm: str = "diloco",
    sites: int = 4,
    steps: int = 120,
    sync_every: int = 20,
    payload: int = 250_000,
    step_compute_s: float = 0.05,
    sync_s: float = 0.8,
    final_loss: float = 4.0,
    codec: str = "int8",
    extra_summary: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a plausible finished run; return its summary. Loss falls from ~10.8 toward ``final_loss``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines: list[dict[str, Any]] = []
    per_site = []
    for site in range(sites):
        rng = random.Random(site)  # noisy but reproducible train loss
        wall = compute = comm = 0.0
        sent = rounds = 0
        for step in range(steps):
            compute += step_compute_s
            wall += step_compute_s
            if (step + 1) % sync_every == 0:
                rounds += 1
                sent += payload
                comm += sync_s
                wall += sync_s
                lines.append({"kind": "sync", "site": site, "round": rounds, "step": step, "bytes": payload,
                              "seconds": sync_s, "wall_s": wall})
            tokens = (step + 1) * TOKENS_PER_STEP
            loss = final_loss + 6.8 * math.exp(-step / (steps / 5)) + rng.gauss(0.0, 0.12)
            lines.append({"kind": "step", "site": site, "step": step, "tokens": tokens, "loss": loss, "lr": 3e-4,
                          "wall_s": wall, "compute_s": compute, "comm_s": comm, "wan_bytes": sent,
                          "outer_rounds": rounds, "utilization": compute / wall})
        per_site.append({"site": site, "tokens": steps * TOKENS_PER_STEP, "wan_bytes": sent, "compute_seconds": compute,
                         "comm_seconds": comm, "wall_seconds": wall, "utilization": compute / wall,
                         "outer_rounds": rounds, "steps": steps})
    for step in range(sync_every - 1, steps, sync_every):
        r = (step + 1) // sync_every
        wall = (step + 1) * step_compute_s + r * sync_s
        lines.append({"kind": "eval", "step": step, "tokens": sites * (step + 1) * TOKENS_PER_STEP, "wall_s": wall,
                      "eval_loss": final_loss + 0.1 + 6.8 * math.exp(-step / (steps / 5)), "wan_bytes": sites * r * payload,
                      "outer_rounds": r})
    lines.append({"kind": "heartbeat", "site": 0, "note": "unknown kinds are ignored"})
    eval_loss = [r for r in lines if r["kind"] == "eval"][-1]["eval_loss"]
    summary: dict[str, Any] = {
        "algorithm": algorithm, "sites": sites, "workers_per_site": 1, "tokens": sites * steps * TOKENS_PER_STEP,
        "eval_loss": eval_loss, "outer_rounds": steps // sync_every, "wan_bytes": sum(p["wan_bytes"] for p in per_site),
        "wall_seconds": max(p["wall_seconds"] for p in per_site),
        "utilization": sum(p["utilization"] for p in per_site) / sites, "params_sha256": "ab" * 32, "ok": True,
        "interrupted": False, "error": None, "link": "5mbit/50ms", "codec": codec, "sync_every": sync_every,
        "steps": steps, "param_bytes": 4 * payload, "payload_bytes_per_sync": payload, "peak_bandwidth_bps": 5e6,
        "config": {"seed": 0, "algorithm": {"name": algorithm, "sync_every": sync_every, "outer_lr": 0.7},
                   "wan": {"link": "5mbit/50ms", "codec": codec}, "data": {"path": None}},
        "per_site": per_site,
    }
    summary.update(extra_summary or {})
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return summary


def make_partial_run(run_dir: Path) -> None:
    """A run stopped by Ctrl+C: a summary missing most keys, and a log cut off mid-line."""
    make_run(run_dir, algorithm="streaming")
    full = json.loads((run_dir / "summary.json").read_text())
    partial = {k: full[k] for k in ("algorithm", "sites", "link", "codec")}
    partial.update(ok=False, interrupted=True, error=None)
    (run_dir / "summary.json").write_text(json.dumps(partial))
    text = (run_dir / "metrics.jsonl").read_text()
    # Keep the first half of the log and cut the next line in the middle, as a killed writer leaves it.
    lines = text.splitlines(keepends=True)
    half = len(lines) // 2
    (run_dir / "metrics.jsonl").write_text("".join(lines[:half]) + lines[half][: len(lines[half]) // 2])


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


# --- units -----------------------------------------------------------------------------------------------------


def test_units_are_human_and_tolerate_missing_values() -> None:
    assert fmt_tokens(1_234_567) == "1.23M"
    assert fmt_tokens(7e9) == "7B"
    assert fmt_tokens(999_999) == "1M"  # promoted after rounding, not "1000k"
    assert fmt_bytes(12_345_678) == "12.3 MB"
    assert fmt_bytes(512) == "512 B"
    assert fmt_seconds(245.3) == "4m 05s"
    assert fmt_percent(0.8734) == "87.3%"
    for fmt in (fmt_tokens, fmt_bytes, fmt_seconds, fmt_percent):
        assert fmt(None) == "—"
        assert fmt("oops") == "—"


# --- reading runs ----------------------------------------------------------------------------------------------


def test_read_run_groups_records_and_ignores_unknown_kinds(tmp_path: Path) -> None:
    make_run(tmp_path, sites=2, steps=40, sync_every=10)
    run = read_run(tmp_path)
    assert run.bad_lines == 0 and not run.problems
    assert len(run.steps) == 80
    assert len(run.syncs) == 8
    assert len(run.evals) == 4
    assert "heartbeat" in run.records  # kept, never used
    x, y = eval_series(run)
    assert list(x) == sorted(x) and len(y) == 4


def test_truncated_last_line_is_skipped_and_figures_rebuilt(tmp_path: Path) -> None:
    make_partial_run(tmp_path)
    run = read_run(tmp_path)
    assert run.bad_lines == 1
    assert run_status(run.summary) == ("partial", "interrupted")
    merged, filled = merged_summary(run)
    assert {"tokens", "wan_bytes", "wall_seconds", "per_site"} <= filled
    assert "algorithm" not in filled and merged["algorithm"] == "streaming"
    # The rebuilt total equals the sum of each site's last logged cumulative count.
    last = {}
    for rec in run.steps:
        last[rec["site"]] = rec
    assert merged["tokens"] == sum(r["tokens"] for r in last.values())


def test_missing_files_give_an_empty_run_not_an_error(tmp_path: Path) -> None:
    run = read_run(tmp_path)
    assert run.summary == {} and run.records == {}
    assert any("summary.json is missing" in p for p in run.problems)
    assert derived_summary(run) == {}


def test_global_tokens_align_sites_with_eval_axis(tmp_path: Path) -> None:
    make_run(tmp_path, sites=3, steps=30, sync_every=10)
    run = read_run(tmp_path)
    x, _loss, _wall = global_tokens_at_steps(run, 1)
    # Sites run in lockstep here, so a step's global position is within one step of sites x site tokens.
    site_tokens = [r["tokens"] for r in run.steps if r["site"] == 1]
    assert all(abs(g - 3 * t) <= 2 * TOKENS_PER_STEP for g, t in zip(x, sorted(site_tokens)))
    assert x[-1] == 3 * 30 * TOKENS_PER_STEP


def test_global_tokens_with_sites_at_different_speeds(tmp_path: Path) -> None:
    # Site 0 steps every 0.5 s, site 1 every 1 s, 100 tokens a step: at wall time t the sites together
    # have trained 200 t + 100 t tokens, whatever each site's own count.
    lines = [{"kind": "step", "site": 0, "step": i, "tokens": 100 * (i + 1), "loss": 5.0, "wall_s": 0.5 * (i + 1)}
             for i in range(8)]
    lines += [{"kind": "step", "site": 1, "step": i, "tokens": 100 * (i + 1), "loss": 5.0, "wall_s": 1.0 * (i + 1)}
              for i in range(4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    run = read_run(tmp_path)
    x1, _, wall1 = global_tokens_at_steps(run, 1)
    assert list(x1) == [300 * t for t in wall1]
    x0, _, wall0 = global_tokens_at_steps(run, 0)
    assert list(x0) == [200 * t + 100 * math.floor(t) for t in wall0]


def test_wan_series_sums_sync_bytes(tmp_path: Path) -> None:
    summary = make_run(tmp_path, sites=2, steps=40, sync_every=10, payload=1000)
    run = read_run(tmp_path)
    _, y0 = wan_series(run, 0)
    assert list(y0) == [1000, 2000, 3000, 4000]
    _, total = total_wan_series(run)
    assert total[-1] == summary["wan_bytes"] == 8000


# --- the HTML report -------------------------------------------------------------------------------------------


def test_report_embeds_four_valid_pngs_and_the_summary(tmp_path: Path) -> None:
    make_run(tmp_path, extra_summary={"codec": "<int8 & co>"})
    path = write_report(tmp_path)
    assert path == tmp_path / "report.html"
    page = path.read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 4
    pngs = embedded_pngs(page)
    assert len(pngs) == 4 and all(p.startswith(PNG_SIGNATURE) for p in pngs)
    assert "diloco" in page
    assert "&lt;int8 &amp; co&gt;" in page and "<int8 & co>" not in page
    assert 'class="badge ok"' in page
    assert "983k" in page  # 4 sites x 120 steps x 2048 tokens, in human units
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page
    assert "<details><summary>Resolved configuration</summary>" in page
    assert "outer_lr = 0.7" in page


def test_report_of_partial_run_renders_what_it_has(tmp_path: Path) -> None:
    make_partial_run(tmp_path)
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert 'class="badge partial"' in page
    assert page.count("data:image/png;base64,") == 4
    assert all(p.startswith(PNG_SIGNATURE) for p in embedded_pngs(page))
    assert "streaming" in page
    assert "rebuilt from metrics.jsonl" in page
    assert "truncated last line" in page


def test_report_of_failed_run_escapes_the_error(tmp_path: Path) -> None:
    make_run(tmp_path, sites=2, steps=20, sync_every=10,
             extra_summary={"ok": False, "error": "RuntimeError: <gloo> peer 'site-1' closed"})
    # Figures are covered by the tests above; a stand-in keeps this one fast.
    page = render_report(read_run(tmp_path), figures={"loss_tokens": PNG_SIGNATURE})
    assert 'class="badge failed"' in page
    assert esc("RuntimeError: <gloo> peer 'site-1' closed") in page
    assert "<gloo>" not in page


def test_report_of_empty_directory_still_renders(tmp_path: Path) -> None:
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 4
    assert "summary.json is missing" in page


def test_report_survives_garbage_values(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text(json.dumps({
        "algorithm": "<b>x</b>", "sites": "four", "tokens": "lots", "utilization": None, "ok": "yes",
        "per_site": [{"site": "a"}, 5, {"site": 1, "tokens": "many", "wall_seconds": -1}], "config": "not a table",
    }))
    (tmp_path / "metrics.jsonl").write_bytes(
        b'{"kind":"step","site":1,"step":0,"tokens":10,"loss":NaN,"wall_s":1}\n'
        b'{"kind":"step","loss":3.0}\n[1,2]\n"text"\n{"kind":"eval","eval_loss":"x"}\n\xff\xfe\n'
        b'{"kind":"sync","site":true,"bytes":5}\n'
    )
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 4
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
    assert ">lots<" in page  # a non-number is shown as written, not hidden
    assert 'class="badge partial"' in page  # "ok": "yes" is not a boolean true


def test_toml_ish_renders_nested_sections() -> None:
    text = toml_ish({"seed": 1, "name": "a\"b", "opt": None, "wan": {"link": "5mbit/50ms", "inner": {"x": True}}})
    assert 'name = "a\\"b"' in text
    assert "# opt = (unset)" in text
    assert "[wan]" in text and "[wan.inner]" in text and "x = true" in text


# --- comparisons -----------------------------------------------------------------------------------------------


def test_comparison_ratios_against_ddp(tmp_path: Path) -> None:
    ddp = make_run(tmp_path / "ddp", algorithm="ddp", sync_every=1, payload=1_000_000, sync_s=0.5, final_loss=4.0,
                   codec="none")
    dil = make_run(tmp_path / "dil", algorithm="diloco", sync_every=20, payload=250_000, final_loss=4.2)
    out = tmp_path / "cmp"
    result = write_comparison(out, [("diloco-int8", tmp_path / "dil"), ("ddp", tmp_path / "ddp")])
    assert {p.name for p in out.iterdir()} >= {"compare.md", "compare.json", "compare.png", "compare.html"}
    assert (out / "compare.png").read_bytes().startswith(PNG_SIGNATURE)
    assert json.loads((out / "compare.json").read_text()) == result
    assert result["reference"] == "ddp"
    rows = {r["name"]: r for r in result["runs"]}
    assert rows["ddp"]["eval_loss_ratio"] == pytest.approx(1.0)
    assert rows["ddp"]["bytes_ratio"] == pytest.approx(1.0)
    assert rows["diloco-int8"]["eval_loss_ratio"] == pytest.approx(dil["eval_loss"] / ddp["eval_loss"])
    assert rows["diloco-int8"]["bytes_ratio"] == pytest.approx(ddp["wan_bytes"] / dil["wan_bytes"])
    assert rows["diloco-int8"]["H"] == 20
    md = (out / "compare.md").read_text()
    assert md.splitlines()[0].startswith("| name |")
    assert "diloco-int8" in md and f"{ddp['wan_bytes'] / dil['wan_bytes']:.0f}x" in md
    page = (out / "compare.html").read_text()
    assert page.count("data:image/png;base64,") == 1


def test_comparison_without_ddp_has_no_ratios_and_tolerates_partial_runs(tmp_path: Path) -> None:
    make_run(tmp_path / "a", sites=2, steps=40, sync_every=10)
    make_partial_run(tmp_path / "b")
    result = write_comparison(tmp_path / "cmp", [("a", tmp_path / "a"), ("b|pipe", tmp_path / "b")])
    assert result["reference"] is None
    assert all(r["eval_loss_ratio"] is None and r["bytes_ratio"] is None for r in result["runs"])
    assert result["runs"][1]["status"] == "partial"
    assert "b\\|pipe" in (tmp_path / "cmp" / "compare.md").read_text()


# --- live progress ---------------------------------------------------------------------------------------------


def _records(tmp_path: Path) -> list[dict[str, Any]]:
    make_run(tmp_path, sites=3, steps=20, sync_every=10)
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_live_progress_plain_output_is_rate_limited(tmp_path: Path) -> None:
    from rich.console import Console

    records = _records(tmp_path)
    buf = io.StringIO()
    now = [0.0]
    console = Console(file=buf, width=120)
    assert not console.is_terminal
    with LiveProgress(3, title="demo", total_tokens=3 * 20 * TOKENS_PER_STEP, console=console,
                      clock=lambda: now[0]) as live:
        live.update(records[:10])
        first = buf.getvalue()
        for rec in records[10:]:
            live.update([rec])  # many updates within the same 5 s: no new output
        assert buf.getvalue() == first
        now[0] = 6.0
        live.update([])
    out = buf.getvalue()
    for site in range(3):
        assert f"site {site}" in first
    assert "\x1b[" not in out  # no terminal control codes in a log file
    # First print, one after 6 s, and a final status on exit: three blocks of one line per site at most.
    assert out.count("site 0") <= 3
    assert "eval" in out


def test_live_progress_terminal_shows_site_rows(tmp_path: Path) -> None:
    from rich.console import Console

    records = _records(tmp_path)
    buf = io.StringIO()
    console = Console(file=buf, width=120, force_terminal=True, color_system=None)
    with LiveProgress(3, title="demo run", total_tokens=3 * 20 * TOKENS_PER_STEP, console=console) as live:
        live.update(records)
    out = buf.getvalue()
    assert "demo run" in out
    for site in range(3):
        assert f"site {site}" in out
    assert "100%" in out  # each site trained its full share


def test_final_table_from_summary(tmp_path: Path) -> None:
    from rich.console import Console

    summary = make_run(tmp_path, sites=2, steps=20, sync_every=10)
    buf = io.StringIO()
    Console(file=buf, width=140).print(final_table(summary))
    out = buf.getvalue()
    assert "site 0" in out and "site 1" in out and "all" in out
    assert fmt_bytes(summary["wan_bytes"]) in out
    # A partial summary still gives a table.
    Console(file=io.StringIO()).print(final_table({"algorithm": "ddp"}))


# --- weight ----------------------------------------------------------------------------------------------------


@pytest.mark.slow  # starts a process
def test_report_package_does_not_import_torch_or_matplotlib_eagerly() -> None:
    code = (
        "import sys\n"
        "import geotrain.report.html, geotrain.report.compare, geotrain.report.metrics, geotrain.report.live\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib was imported at module import time'\n"
        "import geotrain.report.plots\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
