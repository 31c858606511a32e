"""``geotrain plan``: can these datacenters train this model, how fast, and at what energy?

``add_parser(subparsers)`` adds the ``plan`` subcommand to geotrain's argparse CLI and ``run(args)`` executes
it. Bad input raises ``ConfigError``, which geotrain's ``main`` turns into exit code 2 and a one-paragraph
message. Every flag defaults to None so that a plan file's values stand unless a flag is given.

The model is ``geotrain.planner.model`` (DiLoCo, arXiv 2311.08105; Streaming DiLoCo, arXiv 2501.18512).
"""

from __future__ import annotations

import argparse
import json
import sys

from geotrain.planner.config import PlanConfig, apply_flags, build, load_raw
from geotrain.planner.model import PlanResult, plan
from geotrain.planner.presets import ACCELERATORS, CODECS, LINK_PRESETS
from geotrain.planner.questions import bandwidth_needed, compare_variants, mildest_codec, smallest_sync_every, sweep
from geotrain.planner.simulate import simulate

__all__ = ["add_parser", "plan_output", "run"]

_EPILOG = """examples:
  geotrain plan --model-params 70b --tokens 15t --sites 3 --power-cap 300 --link 10gbit/30ms --compare
  geotrain plan --config configs/plan-three-datacenters.toml --target-utilization 0.95 --json
  geotrain plan --model-params 7b --tokens 1t --accelerators-per-site 1024 --sweep 100mbit:100gbit:30 --plot sweep.png
  geotrain plan --config plan.toml --simulate --mtbf-hours 24 --seed 1
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``plan`` subcommand to an argparse ``subparsers`` object and return its parser."""
    p = subparsers.add_parser(
        "plan",
        help="predict utilization, time to train and energy of a multi-site run",
        description="Plan a training run across datacenters: utilization, time to train, WAN bytes, peak "
        "bandwidth, energy and power caps; the bandwidth, H or codec a target utilization needs; a "
        "seeded simulation with failures. Flags override the plan file.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="PLAN.toml", help="plan file (see docs/planner.md)")
    g = p.add_argument_group("model")
    g.add_argument("--model-params", metavar="N", help="parameters: 70e9 or 70b")
    g.add_argument("--tokens", metavar="N", help="tokens to train on, all sites: 15e12 or 15t")
    g.add_argument("--batch-tokens", metavar="N", help="global batch per inner step in tokens (default 16m)")
    g.add_argument("--seq-len", metavar="N", help="sequence length (default 8192)")
    g = p.add_argument_group("sites")
    g.add_argument("--sites", metavar="K", help="number of identical sites (default 3)")
    g.add_argument("--accelerator", metavar="NAME", help=f"accelerator type: {', '.join(ACCELERATORS)} (default H100)")
    g.add_argument("--accelerators-per-site", metavar="N",
                   help="accelerators at each site (default: all that the power cap feeds)")
    g.add_argument("--mfu", metavar="F", help="model FLOP utilization while computing, in (0, 1] (default 0.4)")
    g.add_argument("--power-cap", metavar="MW", help="facility power cap per site in MW")
    g.add_argument("--pue", metavar="X", help="power usage effectiveness (default 1.2)")
    g.add_argument("--watts", metavar="W", help="power per accelerator in W (default: the board power)")
    g = p.add_argument_group("links (any of these replaces every link of the plan file)")
    g.add_argument("--link", metavar="PRESET|B/L",
                   help=f"a preset ({', '.join(LINK_PRESETS)}) or BANDWIDTH/LATENCY such as 10gbit/30ms")
    g.add_argument("--bandwidth", metavar="B", help="bandwidth of every link, e.g. 10gbit")
    g.add_argument("--latency", metavar="L", help="one-way latency of every link, e.g. 30ms")
    g = p.add_argument_group("algorithm")
    g.add_argument("--algorithm", metavar="NAME", help="ddp, diloco or streaming (default diloco)")
    g.add_argument("--sync-every", metavar="H", help="inner steps between syncs (default 100)")
    g.add_argument("--fragments", metavar="P", help="streaming: fragments synced in turn")
    g.add_argument("--overlap-steps", metavar="TAU", help="streaming: inner steps a fragment sync may overlap")
    g.add_argument("--codec", metavar="NAME", help=f"{', '.join(CODECS)} or topk:F (default fp32)")
    g.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="hide communication behind compute (diloco: behind the next round)")
    g = p.add_argument_group("questions and output")
    g.add_argument("--compare", action="store_true", help="ddp, diloco, diloco+overlap, streaming+overlap side by side")
    g.add_argument("--target-utilization", metavar="U", help="e.g. 0.95: bandwidth, H and codec needed")
    g.add_argument("--sweep", metavar="BWS", help="bandwidths: 1gbit,10gbit,100gbit or START:STOP:POINTS (log)")
    g.add_argument("--plot", metavar="FILE", help="write the sweep's plot (.png, .svg, .pdf)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    g = p.add_argument_group("simulation")
    g.add_argument("--simulate", action="store_true", help="also simulate the run round by round")
    g.add_argument("--mtbf-hours", metavar="H", help="mean time between failures of each site (or a,b,c per site)")
    g.add_argument("--seed", metavar="S", help="seed of the simulation (default 0)")
    g.add_argument("--recovery", metavar="MODE", help="elastic (default) or restart from checkpoint")
    g.add_argument("--jitter", metavar="CV", help="coefficient of variation of a site's round time")
    p.set_defaults(func=run)
    return p


def plan_output(cfg: PlanConfig) -> tuple[dict, dict[str, PlanResult], object, object]:
    """Run everything ``cfg`` asks for. Returns the JSON object and the objects behind it."""
    spec = cfg.spec
    main = plan(spec)
    out: dict = main.to_dict()
    out["inputs"] = {
        "params": spec.model.params,
        "tokens": spec.model.tokens,
        "batch_tokens": spec.model.batch_tokens,
        "seq_len": spec.model.seq_len,
        "link": cfg.link_text,
        "balance": spec.balance,
        "sites": [
            {"name": s.name, "accelerator": s.accel.name, "accelerators": s.accelerators, "mfu": s.mfu,
             "power_cap_mw": s.power_cap_mw, "pue": s.pue, "watts": s.watts_each, "peak_flops": s.flops_each}
            for s in spec.sites
        ],
    }
    results: dict[str, PlanResult] = {"plan": main}
    variants = compare_variants(spec)
    if cfg.compare:
        for name, vspec in variants.items():
            results[name] = plan(vspec)
        out["compare"] = {name: results[name].to_dict() for name in variants}

    if cfg.target_utilization is not None:
        target = cfg.target_utilization
        out["target_utilization"] = target
        out["bandwidth_needed_bps"] = bandwidth_needed(spec, target=target)
        out["bandwidth_needed_bps_by_algorithm"] = {name: bandwidth_needed(v, target=target) for name, v in variants.items()}
        out["smallest_sync_every"] = smallest_sync_every(spec, target=target, candidates=cfg.sync_every_candidates)
        codec = mildest_codec(spec, target=target, candidates=cfg.codec_candidates)
        out["mildest_codec"] = None if codec is None else codec.name

    swept = None
    if cfg.sweep_bps is not None:
        swept = sweep(variants, bandwidths_bps=cfg.sweep_bps)
        out["sweep"] = swept.to_dict()
        if cfg.plot:
            from geotrain.planner.report import plot_sweep

            title = (f"{out['inputs']['params'] / 1e9:g}B params, {len(spec.sites)} sites, "
                     f"codec {spec.codec_spec.name}, H={variants['diloco'].algorithm.sync_every}")
            out["plot"] = str(plot_sweep(swept, path=cfg.plot, target=cfg.target_utilization, title=title))

    simulated = None
    if cfg.simulation is not None:
        simulated = simulate(spec, cfg.simulation)
        out["simulation"] = simulated.to_dict() | {
            "recovery": cfg.simulation.recovery,
            "mtbf_hours": cfg.simulation.mtbf_hours,
            "jitter": cfg.simulation.jitter,
        }
    return out, results, swept, simulated


def run(args: argparse.Namespace) -> int:
    """Execute ``geotrain plan``. Returns the exit code; raises ConfigError on bad input."""
    raw = apply_flags(load_raw(getattr(args, "config", None)), args)
    if isinstance(raw.get("simulate", {}).get("mtbf_hours"), str) and "," in raw["simulate"]["mtbf_hours"]:
        raw["simulate"]["mtbf_hours"] = [v.strip() for v in raw["simulate"]["mtbf_hours"].split(",")]
    cfg = build(raw)
    out, results, swept, simulated = plan_output(cfg)
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(out, indent=2, allow_nan=False) + "\n")
        return 0
    from geotrain.planner.report import render

    render(out, results=results, sweep=swept, simulation=simulated)
    return 0
