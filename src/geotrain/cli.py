"""The ``geotrain`` command: run | compare | plan | report | sample | coordinator | site.

Exit codes: 0 success; 2 bad input (the message names the field and the fix, no traceback); 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from geotrain.errors import ConfigError

__all__ = ["main"]

def _add_run_flags(p: argparse.ArgumentParser) -> None:
    from geotrain.algorithms import algorithm_names
    from geotrain.comm.codecs.registry import codec_names
    from geotrain.config import defaults

    d = defaults()
    p.add_argument("--config", help="run configuration file (TOML); see configs/")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--sites", type=int, help=f"number of sites (default {d.run.sites})")
    p.add_argument("--workers-per-site", type=int,
                   help=f"data-parallel workers inside each site (default {d.run.workers_per_site})")
    p.add_argument("--algorithm", help=f"{' | '.join(algorithm_names())} (default {d.run.algorithm})")
    p.add_argument("--sync-every", type=int, metavar="H",
                   help=f"inner steps between outer rounds (default {d.outer.sync_every})")
    p.add_argument("--codec", help=f"cross-site payload codec: {', '.join(codec_names())} (default {d.comm.codec})")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="diloco: overlap each outer all-reduce with the next round's compute (default: on when a "
                   "blocking sync would stall more than 2%% of a round; the run says what it chose)")
    p.add_argument("--fragments", type=int, help=f"streaming: number of fragments P (default {d.streaming.fragments})")
    p.add_argument("--overlap-steps", type=int, metavar="TAU",
                   help="streaming: inner steps a fragment's sync overlaps (default: the fewest its predicted "
                   "transfer hides behind; the run says what it chose)")
    p.add_argument("--mix-alpha", type=float,
                   help=f"streaming: merge weight of the local fragment (default {d.streaming.mix_alpha})")
    p.add_argument("--tokens", help=f"training-token budget over all sites, e.g. 2M (default {d.run.tokens:,})")
    p.add_argument("--wall-seconds", type=float,
                   help="stop at a sync point, before a round that would overrun this training time (default: none)")
    p.add_argument("--link", metavar="BANDWIDTH/LATENCY",
                   help=f"emulated link between sites, e.g. 10mbit/50ms, a preset, or none (default {d.wan.link})")
    p.add_argument("--data", metavar="PATH", help="text file or directory of text files (default: Python's stdlib)")
    p.add_argument("--seed", type=int, help=f"seed of initialisation and sampling (default {d.run.seed})")
    p.add_argument("--device", help=f"cpu or cuda (default {d.run.device})")


def _config_from_args(args: argparse.Namespace, *, out: str | None = None, variant: list[str] = ()) -> Any:
    """The run's config: the file, then ``--set``, then the flags, then a compare variant's own settings
    (a variant's settings win over the flags every variant shares)."""
    from geotrain.config import SHORT_KEYS, _parse_value, load_config

    values: dict[str, Any] = {}
    for flag, key in SHORT_KEYS.items():
        v = getattr(args, flag, None)
        if v is not None:
            values[key] = v
    if out is not None:
        values["run.out"] = out
    for item in variant:
        key, _, text = item.partition("=")
        values[key] = _parse_value(text)
    return load_config(args.config, overrides=args.set, values=values)


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console

    from geotrain.report.live import final_table

    Console(stderr=False).print(final_table(summary))


def cmd_run(args: argparse.Namespace) -> int:
    from geotrain.train.launch import check_launch, launch

    config = _config_from_args(args)
    if args.dry_run:
        check_launch(config)
        print(json.dumps(config.to_dict(), indent=2))
        print(f"valid: {config.algorithm().label(config)}, codec {config.comm.codec}, {config.run.sites} sites over "
              f"{config.wan.link}; nothing was started", file=sys.stderr)
        return 0
    outcome = launch(config, progress=not args.quiet)
    if not args.quiet:
        _print_summary(outcome.summary)
    out = outcome.out
    if outcome.exit_code == 0:
        print(f"wrote {out / 'summary.json'}, {out / 'metrics.jsonl'} and {out / 'report.html'}")
    else:
        print(f"error: {outcome.summary.get('error')}", file=sys.stderr)
        print(f"partial results in {out / 'summary.json'}", file=sys.stderr)
    return outcome.exit_code


def _parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME`` or ``NAME:key=value,key=value`` (keys dotted, or one of the run flags' short names). A name
    that starts with an algorithm's name (``diloco-int4``) runs that algorithm unless it sets one."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise ConfigError(f"variant {text!r} needs a name, e.g. 'diloco-h50:outer.sync_every=50'", field="--variant")
    from geotrain.algorithms import algorithm_names
    from geotrain.config import SHORT_KEYS

    sets = []
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"variant setting {item!r} must be key=value", field="--variant")
        sets.append(f"{SHORT_KEYS.get(key.strip(), key.strip())}={value.strip()}")
    if not any(s.startswith("run.algorithm=") for s in sets):
        algo = name.split("-")[0]
        if algo in algorithm_names():
            sets.insert(0, f"run.algorithm={algo}")
    return name, sets  # values are read as TOML where they parse (50, true) and as strings otherwise (int8)


def cmd_compare(args: argparse.Namespace) -> int:
    from geotrain.report.compare import write_comparison
    from geotrain.train.launch import check_out_dir, launch

    out = Path(args.out or "runs/compare")
    check_out_dir(out)
    variants = [_parse_variant(v) for v in (args.variant or [])]
    for algo in (args.algorithms.split(",") if args.algorithms else []):
        variants.append(_parse_variant(algo.strip()))
    if not variants:
        variants = [_parse_variant(v) for v in ("ddp", "diloco")]
    configs = []
    for name, sets in variants:
        args_v = argparse.Namespace(**vars(args))
        args_v.algorithm = None  # --algorithms names the variants; each variant says its own
        configs.append((name, _config_from_args(args_v, out=str(out / name), variant=sets)))  # validate all first
    runs = []
    worst = 0
    for name, config in configs:
        print(f"== {name}: {config.algorithm().label(config)}, codec {config.comm.codec}, link {config.wan.link}",
              flush=True)
        outcome = launch(config, progress=not args.quiet)
        worst = max(worst, outcome.exit_code)
        runs.append((name, outcome.out))
    table = write_comparison(out, runs)
    print((out / "compare.md").read_text(encoding="utf-8"))
    print(f"wrote {out / 'compare.md'}, {out / 'compare.json'} and {out / 'compare.html'}")
    return worst if table else 1


def cmd_report(args: argparse.Namespace) -> int:
    from geotrain.report.html import write_report

    run_dir = Path(args.dir)
    if not (run_dir / "summary.json").is_file():
        raise ConfigError(f"{str(run_dir)!r} holds no summary.json; give a run's output directory", field="DIR")
    print(f"wrote {write_report(run_dir)}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import load_file

    from geotrain.config import ModelConfig
    from geotrain.models.gpt import GPT

    run_dir = Path(args.dir)
    weights, cfg_path = run_dir / "model.safetensors", run_dir / "config.json"
    if not weights.is_file() or not cfg_path.is_file():
        raise ConfigError(f"{str(run_dir)!r} holds no trained model (model.safetensors and config.json); "
                          "give the --out directory of a finished 'geotrain run'", field="DIR")
    tree = json.loads(cfg_path.read_text(encoding="utf-8"))
    m = tree["model"]
    model = GPT(ModelConfig(**{k: v for k, v in m.items() if k != "params"}))  # the run's [model], from config.json
    state = load_file(str(weights))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"model.safetensors does not match the run's config.json ({str(e)[:200]})", field="DIR") from None
    model.eval()
    prompt = args.prompt.encode("utf-8")
    if not prompt:
        raise ConfigError("the prompt is empty; give some text to continue", field="--prompt")
    gen = torch.Generator().manual_seed(args.seed)
    idx = torch.tensor([list(prompt)], dtype=torch.long)
    out = model.generate(idx, args.max_bytes, temperature=args.temperature, generator=gen)
    text = bytes(out[0].tolist()).decode("utf-8", errors="replace")
    print(text)
    return 0


def cmd_coordinator(args: argparse.Namespace) -> int:
    """Host the cross-site rendezvous store for sites started with torchrun; ends after --hours."""
    from geotrain.comm.groups import connect_store

    address = f"{args.host}:{args.port}"
    store = connect_store(address, is_server=True, timeout_s=60)
    print(f"geotrain coordinator listening on {address}; sites join with --coordinator HOST:{args.port}", flush=True)
    deadline = time.monotonic() + args.hours * 3600
    try:
        while time.monotonic() < deadline:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    del store
    return 0


def build_parser() -> argparse.ArgumentParser:
    from geotrain import __version__

    parser = argparse.ArgumentParser(prog="geotrain", description="Train one model across several datacenters.")
    parser.add_argument("--version", action="version", version=f"geotrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train across emulated sites on this machine")
    _add_run_flags(p)
    p.add_argument("--out", help="output directory (default runs/latest)")
    p.add_argument("--quiet", action="store_true", help="no live progress")
    p.add_argument("--dry-run", action="store_true",
                   help="check the configuration and print it resolved, without starting anything")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="run several algorithms on the same budget and compare them")
    _add_run_flags(p)
    p.add_argument("--algorithms", help="comma-separated variants, e.g. ddp,diloco")
    p.add_argument("--variant", action="append",
                   help="NAME:key=value,... e.g. 'diloco-int8:H=50,codec=int8' (repeatable)")
    p.add_argument("--out", help="output directory (default runs/compare)")
    p.add_argument("--quiet", action="store_true", help="no live progress")
    p.set_defaults(func=cmd_compare)

    try:
        from geotrain.planner.cli import add_parser as add_plan_parser

        add_plan_parser(sub)
    except ImportError:  # the planner ships with the package; this only guards a partial install
        pass

    p = sub.add_parser("report", help="render DIR/report.html again from a run's files")
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("sample", help="continue a prompt with a run's trained demo model")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-bytes", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("coordinator", help="host the cross-site store for sites launched with torchrun")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=29400)
    p.add_argument("--hours", type=float, default=72.0, help="stop after this long")
    p.set_defaults(func=cmd_coordinator)

    p = sub.add_parser("site", help="one worker of one site (what torchrun starts); see --help")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda a: __import__("geotrain.train.site", fromlist=["main"]).main(a.rest))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
