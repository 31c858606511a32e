"""Run reports: read a run directory, draw its figures, write report.html, compare runs, show live progress.

Modules (none is imported here, so ``import geotrain.report`` costs nothing; none imports torch, and
matplotlib is imported only when a figure is drawn):

- :mod:`~geotrain.report.metrics`: ``read_run(dir) -> Run`` and series helpers, tolerant of partial runs;
- :mod:`~geotrain.report.plots`: the report's figures as PNG bytes;
- :mod:`~geotrain.report.html`: ``write_report(dir) -> Path`` writes a self-contained ``dir/report.html``;
- :mod:`~geotrain.report.compare`: ``write_comparison(out_dir, [(name, dir), ...])`` writes compare.md/json/png/html;
- :mod:`~geotrain.report.live`: ``LiveProgress`` (rich live view for the launcher) and ``final_table(summary)``;
- :mod:`~geotrain.report.units`: human-readable numbers.

The records of ``metrics.jsonl`` that the report reads (one JSON object a line; other kinds are ignored):

- ``{"kind": "step", "site", "step", "tokens" (the site's, cumulative), "loss", "lr", "wall_s", "compute_s",
  "comm_s", "wan_bytes" (sent by the site, cumulative), "outer_rounds", "utilization"}``
- ``{"kind": "eval", "step", "tokens" (all sites), "wall_s", "eval_loss", "wan_bytes" (all sites), "outer_rounds"}``
- ``{"kind": "sync", "site", "transfer", "step", "bytes" (this collective), "seconds", "wall_s"}``

Every record also has ``time`` (Unix seconds). For a run whose membership changed, the report places records
by it, counting from the summary's ``started_at``, and reads ``start``, ``done``, ``rejected``, ``fault``,
``fault_due``, ``healed`` and ``error`` records beside the summary's ``membership``, ``rejected_updates``,
``faults`` and ``failures`` (see :func:`geotrain.report.metrics.membership_of`).
"""
