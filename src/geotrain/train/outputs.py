"""A run's files: ``summary.json``, ``metrics.jsonl`` and ``report.html``, written once the sites are done.

The local launcher writes them after its processes end; under torchrun, where sites may not share a disk,
the lowest member at the end (site 0 unless it left) gathers the other sites' record files over the cross-site
group and writes them. Both go through :func:`write_run_files`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from geotrain.files import write_json_atomic
from geotrain.summary import build_summary, merge_metrics, read_site_records

__all__ = ["write_run_files"]


def write_run_files(out: Path, config: dict[str, Any], *, elapsed_seconds: float, ok: bool, interrupted: bool = False,
                    error: str | None = None, membership: list[dict[str, Any]] | None = None,
                    faults: list[dict[str, Any]] | None = None, started_at: float | None = None) -> dict[str, Any]:
    """Build the summary from ``out/sites/*.jsonl`` and write the run's three files; returns the summary."""
    records = read_site_records(out, config["run"]["sites"])
    summary = build_summary(config, records, elapsed_seconds=elapsed_seconds, ok=ok, interrupted=interrupted,
                            error=error, membership=membership, faults=faults, started_at=started_at)
    write_json_atomic(out / "summary.json", summary)
    merge_metrics(out, records)
    try:
        from geotrain.report.html import write_report

        write_report(out)
    except Exception as e:  # noqa: BLE001 - a report failure must not hide the run's own result
        print(f"warning: could not render report.html: {e}", file=sys.stderr)
    return summary
