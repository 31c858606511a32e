"""Shared pieces of the benchmark scripts: running variants and writing dated result tables."""

from __future__ import annotations

import datetime
import json
import shlex
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def run_variant(name: str, out: Path, values: dict[str, Any], *, progress: bool = False,
                netlab: bool = False) -> dict[str, Any]:
    """One geotrain run on this machine; returns its summary (raises if the run failed). ``netlab``: the sites
    run in a network lab built from the run's links (root only), as ``geotrain run --network netlab``."""
    from geotrain.config import load_config
    from geotrain.train.launch import launch

    config = load_config(values={**values, "run.out": str(out / name)})
    print(f"-- {name}: {json.dumps(values)}" + (" in the network lab" if netlab else ""), flush=True)
    if netlab:
        from geotrain.netlab import Lab, config_lab_links

        with Lab(sites=config.run.sites, links=config_lab_links(config)) as lab:
            outcome = launch(config, progress=progress, lab=lab)
    else:
        outcome = launch(config, progress=progress)
    s = outcome.summary
    if outcome.exit_code != 0:
        raise RuntimeError(f"{name} failed: {s.get('error')}")
    print(f"   eval_loss {s['eval_loss']:.4f}  wan_bytes {s['wan_bytes']:,}  wall {s['wall_seconds']:.1f}s  "
          f"utilization {s['utilization']:.3f}", flush=True)
    return s


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def write_result(what: str, body: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{datetime.date.today().isoformat()}-{what}.md"
    path.write_text(body, encoding="utf-8")
    print(f"wrote {path}")
    return path
