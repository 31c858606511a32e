"""geotrain's planner: predict utilization, time to train, WAN bytes and energy of a multi-site run.

A plan reads the same configuration as a run (``geotrain.config``) and prices it with the same definitions:
the algorithm's communication pattern and timing model (``geotrain.algorithms``), the codec's exact sizes
(``geotrain.comm.codecs``) and the collective costs the WAN emulation charges (``geotrain.topology``). Pure Python
and numpy: importing the planner imports no torch (nor rich or matplotlib, which only the CLI and the plot
load).

    from geotrain.config import load_config
    from geotrain.planner import plan, plan_spec
    result = plan(plan_spec(load_config("configs/plan-three-datacenters.toml")))

``failure_costs(config)`` predicts what one failure costs an elastic run (detection, re-forming, healing),
from the same configuration a fault benchmark runs. ``predict_power_run(config, step_seconds=...)`` plays a run
with ``[grid]`` traces or ``run.site_speeds`` step by step under its sites' power and speeds.
"""

from geotrain.hardware import ACCELERATORS, Accelerator
from geotrain.planner.config import PlanInputs, plan_inputs
from geotrain.planner.model import (
    ModelSpec,
    PlanResult,
    PlanSpec,
    SiteResult,
    SiteSpec,
    plan,
    plan_spec,
    site_step_seconds,
    sync_comm,
)
from geotrain.planner.power import PowerPrediction, SitePrediction, models_power, predict_power_run
from geotrain.planner.questions import (
    bandwidth_needed,
    compare_variants,
    mildest_codec,
    smallest_sync_every,
    sweep,
    with_bandwidth,
)
from geotrain.planner.simulate import FailureCosts, SimulationResult, failure_costs, simulate
from geotrain.topology import LINK_PRESETS

__all__ = [
    "ACCELERATORS",
    "Accelerator",
    "FailureCosts",
    "LINK_PRESETS",
    "ModelSpec",
    "PlanInputs",
    "PlanResult",
    "PlanSpec",
    "PowerPrediction",
    "SimulationResult",
    "SitePrediction",
    "SiteResult",
    "SiteSpec",
    "bandwidth_needed",
    "compare_variants",
    "failure_costs",
    "mildest_codec",
    "models_power",
    "plan",
    "plan_inputs",
    "plan_spec",
    "predict_power_run",
    "simulate",
    "site_step_seconds",
    "smallest_sync_every",
    "sweep",
    "sync_comm",
    "with_bandwidth",
]
