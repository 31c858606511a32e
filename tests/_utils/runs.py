"""Helpers shared by the multi-process tests: tiny configs and their runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from geotrain.config import load_config
from geotrain.train.launch import launch

# A model small enough that a few steps on two single-thread processes take a second or two.
TINY = {
    "model.n_layer": 1,
    "model.d_model": 32,
    "model.n_head": 2,
    "model.seq_len": 32,
    "data.batch_size": 4,
    "run.eval_batches": 4,
    "wan.link": "none",
    "run.collective_timeout_s": 60,
}


def tiny_config(out: Path, **values: Any):
    merged = {**TINY, "run.out": str(out), **values}
    return load_config(values=merged)


def run_tiny(out: Path, *, workload_factory=None, factory_kwargs=None, faults=None, resume=False, **values: Any):
    from geotrain.faults import parse_fault

    return launch(tiny_config(out, **values), workload_factory=workload_factory, factory_kwargs=factory_kwargs,
                  progress=False, faults=[parse_fault(f) for f in faults or []], resume=resume)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
