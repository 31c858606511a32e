"""geotrain's planner: predict utilization, time to train, WAN bytes and energy of a multi-site run.

The cost model follows DiLoCo (arXiv 2311.08105) and Streaming DiLoCo (arXiv 2501.18512) and charges
communication with ``geotrain.wan.model``, the functions the WAN emulation charges real runs. Pure Python and
numpy: importing the planner imports no torch (nor rich or matplotlib, which only the CLI and the plot load).

    from geotrain.planner import PlanSpec, ModelSpec, SiteSpec, AlgorithmSpec, plan
"""

from geotrain.planner.calibrate import expected_slowest, measured_jitter, measured_step_seconds, predict_run
from geotrain.planner.model import (
    AlgorithmSpec,
    ModelSpec,
    PlanResult,
    PlanSpec,
    SiteResult,
    SiteSpec,
    plan,
    sync_comm,
    sync_period,
    uniform_topology,
)
from geotrain.planner.presets import ACCELERATORS, CODECS, LINK_PRESETS, Accelerator, Codec
from geotrain.planner.questions import (
    bandwidth_needed,
    compare_variants,
    mildest_codec,
    smallest_sync_every,
    sweep,
    with_bandwidth,
)
from geotrain.planner.simulate import SimulationResult, SimulationSpec, simulate

__all__ = [
    "ACCELERATORS",
    "CODECS",
    "LINK_PRESETS",
    "Accelerator",
    "AlgorithmSpec",
    "Codec",
    "ModelSpec",
    "PlanResult",
    "PlanSpec",
    "SimulationResult",
    "SimulationSpec",
    "SiteResult",
    "SiteSpec",
    "bandwidth_needed",
    "compare_variants",
    "expected_slowest",
    "measured_jitter",
    "measured_step_seconds",
    "mildest_codec",
    "plan",
    "predict_run",
    "simulate",
    "smallest_sync_every",
    "sweep",
    "sync_comm",
    "sync_period",
    "uniform_topology",
    "with_bandwidth",
]
