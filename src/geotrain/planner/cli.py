"""``geotrain plan``: can these datacenters train this model, how fast, and at what energy?

``add_parser(subparsers)`` adds the ``plan`` subcommand to geotrain's argparse CLI and ``run(args)`` executes
it. A plan reads the run vocabulary (``--config`` takes a run file or a plan file) and every flag defaults to
None, so the file's values stand unless a flag is given. Bad input raises ``ConfigError``, which geotrain's
``main`` turns into exit code 2 and a one-paragraph message.

The model is ``geotrain.planner.model`` (DiLoCo, arXiv 2311.08105; Streaming DiLoCo, arXiv 2501.18512).
"""

from __future__ import annotations

import argparse
import json
import sys

from geotrain.algorithms import algorithm_names
from geotrain.algorithms.diloco import OVERLAP_THRESHOLD
from geotrain.errors import ConfigError
from geotrain.comm.codecs.registry import codec_names
from geotrain.hardware import ACCELERATORS
from geotrain.planner.config import PlanInputs, plan_inputs
from geotrain.planner.model import PlanResult, plan
from geotrain.planner.power import models_power, predict_power_run
from geotrain.planner.questions import bandwidth_needed, compare_variants, mildest_codec, smallest_sync_every, sweep
from geotrain.planner.simulate import failure_costs, simulate
from geotrain.topology import LINK_PRESETS

__all__ = ["add_parser", "plan_output", "run"]

_EPILOG = """examples:
  geotrain plan --model-params 70b --tokens 15t --sites 3 --power-cap 300 --link 10gbit/30ms --compare
  geotrain plan --config configs/plan-three-datacenters.toml --target-utilization 0.95 --json
  geotrain plan --config configs/streaming-int4.toml                       # a run file, at its own scale
  geotrain plan --config configs/demo.toml --model-params 10b --accelerators-per-site 4096 --link internet
  geotrain plan --model-params 7b --tokens 1t --accelerators-per-site 1024 --sweep 100mbit:100gbit:30 --plot sweep.png
  geotrain plan --config plan.toml --simulate --mtbf-hours 24 --sim-seed 1
  geotrain plan --config plan.toml --simulate --mtbf-hours 24 --recovery restart   # checkpoint/restart instead
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``plan`` subcommand to an argparse ``subparsers`` object and return its parser."""
    from geotrain.cli import choices_epilog

    p = subparsers.add_parser(
        "plan",
        help="predict utilization, time to train and energy of a multi-site run",
        description="Plan a training run across datacenters: utilization, time to train, WAN bytes, peak "
        "bandwidth, energy and power caps; the bandwidth, H or codec a target utilization needs; a "
        "seeded simulation with failures. --config takes a run file (planned at its own scale) or a plan "
        "file: both use one vocabulary. Flags override the file; defaults are a run's defaults.",
        epilog=_EPILOG + "\n" + choices_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from geotrain.config import defaults

    d = defaults()
    p.add_argument("--config", metavar="FILE.toml", help="run or plan file (see docs/planner.md)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set outer.lr=0.5 (repeatable)")
    g = p.add_argument_group("model and budget")
    g.add_argument("--model-params", metavar="N", help="parameters: 70e9 or 70b (default: the demo GPT's, from [model])")
    g.add_argument("--tokens", metavar="N", help=f"tokens to train on, all sites: 15e12 or 15t (default {d.run.tokens:,})")
    g.add_argument("--batch-tokens", metavar="N",
                   help="global batch per inner step in tokens (default: the run's own, batch_size x seq_len x workers)")
    g.add_argument("--seq-len", metavar="N", help=f"sequence length (default {d.model.seq_len})")
    g = p.add_argument_group("sites")
    g.add_argument("--sites", metavar="K", help=f"number of sites (default {d.run.sites})")
    g.add_argument("--workers-per-site", metavar="W", help=f"workers per site sharing its link (default {d.run.workers_per_site})")
    g.add_argument("--accelerator", metavar="NAME", help=f"accelerator type: {', '.join(ACCELERATORS)} (default {d.sites.accelerator})")
    g.add_argument("--accelerators-per-site", metavar="N",
                   help="accelerators at each site (default: all that the power cap feeds, else one per worker)")
    g.add_argument("--mfu", metavar="F", help=f"model FLOP utilization while computing, in (0, 1] (default {d.sites.mfu})")
    g.add_argument("--power-cap", metavar="MW", help="facility power cap per site in MW")
    g.add_argument("--pue", metavar="X", help=f"power usage effectiveness (default {d.sites.pue})")
    g.add_argument("--watts", metavar="W", help="power per accelerator in W (default: the board power)")
    g.add_argument("--step-seconds", metavar="S",
                   help="measured compute per inner step at every site; replaces the FLOP model")
    g = p.add_argument_group("links (any of these replaces every link of the file)")
    g.add_argument("--link", metavar="PRESET|B/L",
                   help=f"a preset ({', '.join(LINK_PRESETS)}) or BANDWIDTH/LATENCY such as 10gbit/30ms (default {d.wan.link})")
    g.add_argument("--bandwidth", metavar="B", help="bandwidth of every link, e.g. 10gbit")
    g.add_argument("--latency", metavar="L", help="one-way latency of every link, e.g. 30ms")
    g = p.add_argument_group("algorithm")
    g.add_argument("--algorithm", metavar="NAME", help=f"{', '.join(algorithm_names())} (default {d.run.algorithm})")
    g.add_argument("--sync-every", metavar="H", help=f"inner steps between syncs (default {d.outer.sync_every})")
    g.add_argument("--fragments", metavar="P", help=f"streaming: fragments synced in turn (default {d.streaming.fragments})")
    g.add_argument("--overlap-steps", metavar="TAU",
                   help="streaming: inner steps a fragment sync may overlap (default: the fewest its transfer hides behind)")
    g.add_argument("--codec", metavar="NAME", help=f"{', '.join(codec_names())} (default {d.comm.codec})")
    g.add_argument("--topk-fraction", metavar="F", help=f"top-k codecs: share of each chunk kept (default {d.comm.topk_fraction})")
    g.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="diloco: overlap each outer sync with the next round (default: on when a blocking sync "
                   f"would stall more than {100 * OVERLAP_THRESHOLD:g}%% of a round)")
    g = p.add_argument_group("questions and output")
    g.add_argument("--compare", action="store_true", help="ddp, diloco, diloco+overlap, streaming side by side")
    g.add_argument("--target-utilization", metavar="U", help="e.g. 0.95: bandwidth, H and codec needed")
    g.add_argument("--sweep", metavar="BWS", help="bandwidths: 1gbit,10gbit,100gbit or START:STOP:POINTS (log)")
    g.add_argument("--plot", metavar="FILE", help="write the sweep's plot (.png, .svg, .pdf)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    g = p.add_argument_group("simulation")
    g.add_argument("--simulate", action="store_true", help="also simulate the run round by round")
    g.add_argument("--mtbf-hours", metavar="H", help="mean time between failures of each site (or a,b,c per site)")
    g.add_argument("--sim-seed", metavar="S",
                   help=f"seed of the simulation, simulate.seed (default {d.simulate.seed}; a run's seed is run.seed)")
    g.add_argument("--recovery", metavar="MODE",
                   help="elastic (default: the others go on and the failed site rejoins, healed from a peer, as "
                   "geotrain's elastic membership does; its costs come from [membership] and the links) or "
                   "restart (every site rolls back to the last checkpoint)")
    g.add_argument("--silent-fraction", metavar="F",
                   help=f"share of failures that are silent, found after membership.heartbeat_timeout_s; the rest "
                   f"crash and are found at once (default {d.simulate.silent_fraction:g})")
    g.add_argument("--jitter", metavar="CV", help=f"coefficient of variation of a site's round time (default {d.simulate.jitter:g})")
    p.set_defaults(func=run)
    return p


def plan_output(inputs: PlanInputs) -> tuple[dict, dict[str, PlanResult], object, object]:
    """Run everything ``inputs`` asks for. Returns the JSON object and the objects behind it."""
    spec = inputs.spec
    main = plan(spec)
    out: dict = main.to_dict()
    out["inputs"] = {
        "params": spec.model.params,
        "tokens": spec.model.tokens,
        "batch_tokens": spec.model.batch_tokens,
        "seq_len": spec.model.seq_len,
        "link": inputs.link_text,
        "balance": inputs.config.sites.balance,
        "workers_per_site": inputs.config.run.workers_per_site,
        "sites": [
            {"name": s.name, "accelerator": s.accelerator.name, "accelerators": s.accelerators, "mfu": s.mfu,
             "power_cap_mw": s.power_cap_mw, "pue": s.pue, "watts": s.watts, "peak_flops": s.peak_flops,
             "step_seconds": s.step_seconds}
            for s in spec.sites
        ],
    }
    results: dict[str, PlanResult] = {"plan": main}
    variants = compare_variants(spec)
    if inputs.compare:
        for name, vspec in variants.items():
            results[name] = plan(vspec)
        out["compare"] = {name: results[name].to_dict() for name in variants}

    target = inputs.target_utilization
    if target is not None:
        out["target_utilization"] = target
        out["bandwidth_needed_bps"] = bandwidth_needed(spec, target=target)
        out["bandwidth_needed_bps_by_algorithm"] = {name: bandwidth_needed(v, target=target) for name, v in variants.items()}
        out["smallest_sync_every"] = smallest_sync_every(spec, target=target)
        out["mildest_codec"] = mildest_codec(spec, target=target)

    swept = None
    if inputs.sweep_bps is not None:
        swept = sweep(variants, bandwidths_bps=inputs.sweep_bps)
        out["sweep"] = swept.to_dict()
        if inputs.plot:
            from geotrain.planner.report import plot_sweep

            from geotrain.planner.report import _count

            title = (f"{_count(out['inputs']['params'])} params, {len(spec.sites)} sites, "
                     f"codec {main.codec}, H={inputs.config.outer.sync_every}")
            out["plot"] = str(plot_sweep(swept, path=inputs.plot, target=target, title=title))

    if models_power(inputs.config):  # [grid] or run.site_speeds: the run played step by step under its power
        try:
            out["power"] = predict_power_run(spec).to_dict()
        except ConfigError as e:
            out["notes"].append(f"no prediction under power and speeds: {e}")

    simulated = None
    if inputs.simulation is not None:
        simulated = simulate(spec, inputs.simulation)
        sim = inputs.simulation
        out["simulation"] = simulated.to_dict() | {
            "recovery": sim.recovery,
            "mtbf_hours": sim.mtbf_hours,
            "jitter": sim.jitter,
            "restart_hours": sim.restart_hours,
            "silent_fraction": sim.silent_fraction,
        }
        if sim.recovery == "elastic":
            out["simulation"]["failure_costs"] = failure_costs(spec, sim=sim).to_dict()
    return out, results, swept, simulated


def run(args: argparse.Namespace) -> int:
    """Execute ``geotrain plan``. Returns the exit code; raises ConfigError on bad input."""
    inputs = plan_inputs(getattr(args, "config", None), args, overrides=getattr(args, "set", None) or [])
    out, results, swept, simulated = plan_output(inputs)
    if getattr(args, "json", False):
        try:
            text = json.dumps(out, indent=2, allow_nan=False)
        except ValueError:  # a figure overflowed: inputs at the edge of every range
            raise ConfigError("the inputs make some of the plan's figures overflow (infinite); bring the links, "
                              "accelerators or budget nearer to a real deployment", field="--config") from None
        sys.stdout.write(text + "\n")
        return 0
    from geotrain.planner.report import render

    render(out, results=results, sweep=swept, simulation=simulated)
    return 0
