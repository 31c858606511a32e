"""The ``geotrain`` command: run | compare | plan | report | sample | coordinator | site | netlab.

Exit codes: 0 success; 2 bad input (the message names the field and the fix, no traceback); 1 anything else.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from geotrain.errors import ConfigError

__all__ = ["main"]

def choices_epilog() -> str:
    """The registered algorithms and codecs with their one-line summaries, for help texts."""
    from geotrain.algorithms import algorithm_names, get_algorithm
    from geotrain.comm.codecs.registry import codec_names, get_codec_spec

    lines = ["algorithms:"]
    lines += [f"  {name:<12} {get_algorithm(name).summary}" for name in algorithm_names()]
    lines += ["codecs:"]
    lines += [f"  {name:<12} {get_codec_spec(name).summary}" for name in codec_names()]
    return "\n".join(lines)


def _speeds(text: str) -> list[float]:
    """``--site-speeds 1,1,0.5,0.25``: one factor per site (the range is checked with the config)."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers such as 1,1,0.5,0.25") from None


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    from geotrain.algorithms import algorithm_names
    from geotrain.algorithms.diloco import OVERLAP_THRESHOLD
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
    p.add_argument("--sync-every-seconds", type=float, metavar="T",
                   help="diloco: end each outer round after T seconds of training on every site instead of after H "
                   "steps; each site contributes the steps it managed, weighted by its tokens (default: off)")
    p.add_argument("--site-speeds", type=_speeds, metavar="F,F,...",
                   help="speed factor of each site's compute in (0, 1], e.g. 1,1,0.5,0.25 for heterogeneous "
                   "hardware, emulated by holding each step back (default: all 1)")
    p.add_argument("--codec", help=f"cross-site payload codec: {', '.join(codec_names())} (default {d.comm.codec})")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="diloco: overlap each outer all-reduce with the next round's compute (default: on when a "
                   f"blocking sync would stall more than {100 * OVERLAP_THRESHOLD:g}%% of a round; the run says what "
                   "it chose)")
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
    p.add_argument("--model", metavar="ARCH",
                   help="gpt (the demo byte-level GPT), hf:TYPE for a transformers causal LM built from [model]'s "
                        "sizes (hf:llama, hf:qwen2, hf:gpt2, ...) or hf:PATH for a local directory; hf: needs "
                        f"pip install 'geotrain[hf]' (default {d.model.arch})")
    p.add_argument("--seed", type=int, help=f"seed of initialisation and sampling (default {d.run.seed})")
    p.add_argument("--device", help=f"cpu or cuda (default {d.run.device})")
    p.add_argument("--precision", help=f"fp32, or bf16: autocast forward and backward, fp32 weights, optimizer "
                   f"state and payloads (default {d.run.precision})")
    p.add_argument("--fsdp", action="store_true", default=None,
                   help="shard the model over a site's workers with FSDP2 instead of replicating it with DDP")
    p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                   help="also write live TensorBoard scalars under OUT/tensorboard (needs pip install "
                   "'geotrain[tensorboard]'; default off)")


def _config_from_args(args: argparse.Namespace, *, out: str | None = None, variant: list[str] | None = None) -> Any:
    """The run's config: the file, then ``--set``, then the flags, then a compare variant's own settings
    (a variant's settings win over the flags every variant shares). A setting only another algorithm reads is
    refused when given for this run, and dropped when it comes from the file or, in a comparison, from the
    flags the variants share."""
    from geotrain.config import SHORT_KEYS, _parse_value, load_config

    values: dict[str, Any] = {}
    for flag, key in SHORT_KEYS.items():
        v = getattr(args, flag, None)
        if v is not None:
            values[key] = v
    if out is not None:
        values["run.out"] = out
    shared = (*values, *(item.partition("=")[0].strip() for item in args.set)) if variant is not None else ()
    for item in variant or ():
        key, _, text = item.partition("=")
        values[key] = _parse_value(text)
    return load_config(args.config, overrides=args.set, values=values, fit=True, soft=shared)


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console

    from geotrain.report.live import final_table

    Console(stderr=False).print(final_table(summary))


def _resume_config(args: argparse.Namespace) -> Any:
    """The configuration of the run in ``--resume DIR`` (its config.json), with no other settings allowed."""
    from geotrain.config import load_config

    given = [f"--{k.replace('_', '-')}" for k in ("config", "sites", "workers_per_site", "algorithm", "sync_every",
                                                  "codec", "overlap", "fragments", "overlap_steps", "mix_alpha",
                                                  "sync_every_seconds", "site_speeds",
                                                  "tokens", "wall_seconds", "link", "data", "model", "seed", "device",
                                                  "precision", "fsdp", "out")
             if getattr(args, k, None) is not None] + (["--set"] if args.set else [])
    if given:
        raise ConfigError(f"continues the run as it was configured; drop {', '.join(given)}", field="--resume")
    from geotrain.rundirs import follow_latest

    args.resume = str(follow_latest(Path(args.resume)))  # through runs/latest: the run's own directory
    path = Path(args.resume) / "config.json"
    try:
        tree = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{str(args.resume)!r} holds no run (no config.json); give the --out of the run to "
                          "continue", field="--resume") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {str(path)!r} ({e})", field="--resume") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{str(path)!r} is not a run configuration", field="--resume")
    run = {**tree.get("run", {}), "out": str(args.resume)}
    if args.tensorboard is not None:  # the one setting a resume may change: it only adds output
        run["tensorboard"] = args.tensorboard
    return load_config(values={**tree, "run": run})


def cmd_run(args: argparse.Namespace) -> int:
    from geotrain.faults import parse_fault
    from geotrain.train.launch import check_launch, launch

    config = _resume_config(args) if args.resume else _config_from_args(args)
    faults = [parse_fault(f) for f in args.fault or []]
    if args.network != "netlab":
        for flag, value, default in (("--router", args.router, "auto"), ("--tcp", args.tcp, "host")):
            if value != default:
                raise ConfigError("sets up the network lab; add --network netlab, or leave it out", field=flag)
    tcp = _lab_tcp(args)
    if args.dry_run:
        check_launch(config)
        print(json.dumps(config.to_dict(), indent=2))
        print(f"valid: {config.algorithm().label(config)}, codec {config.comm.codec}, {config.run.sites} sites over "
              f"{config.wan.link}; nothing was started", file=sys.stderr)
        return 0
    if args.network == "netlab":
        from geotrain.netlab import Lab, config_lab_links

        links = config_lab_links(config)
        lab = Lab(sites=config.run.sites, links=links, forwarder=args.router, tcp=tcp)
        with _terminate_as_interrupt(), lab:
            _lab_warnings(lab)
            print(f"network lab: {config.run.sites} sites in namespaces {lab.namespace(0)}.., links "
                  f"{config.wan.link}, coordinator on {lab.control_address}, TCP {lab.tcp.describe()}",
                  file=sys.stderr, flush=True)
            outcome = launch(config, progress=not args.quiet, faults=faults, resume=bool(args.resume),
                             overwrite=args.overwrite, lab=lab)
        if not args.quiet and (line := lab.traffic()):
            print(line, file=sys.stderr)
    else:
        outcome = launch(config, progress=not args.quiet, faults=faults, resume=bool(args.resume),
                         overwrite=args.overwrite)
    if not args.quiet:
        _print_summary(outcome.summary)
    out = outcome.out
    for f in outcome.summary.get("failures") or []:
        print(f"warning: site {f['site']} failed and left the run: {f['message']}", file=sys.stderr)
    if outcome.summary.get("sites_in_sync") is False:  # every method ends with one global model: a bug if not
        print("warning: the sites that finished hold different models (their parameters' SHA-256 differ: see the "
              "done records in sites/*.jsonl); the run's eval loss mixes them", file=sys.stderr)
    if outcome.exit_code == 0:
        print(f"wrote {out / 'summary.json'}, {out / 'metrics.jsonl'} and {out / 'report.html'}")
    else:
        print(f"error: {outcome.summary.get('error')}", file=sys.stderr)
        print(f"partial results in {out / 'summary.json'}", file=sys.stderr)
    return outcome.exit_code


def _add_lab_flags(p: argparse.ArgumentParser) -> None:
    from geotrain.netlab.lab import FORWARDERS

    p.add_argument("--router", choices=FORWARDERS, default="auto",
                   help="with the network lab, the router's data plane: c (forward.c, built with the machine's C "
                        "compiler), python (the reference loop, under half as fast), or auto: c where it builds "
                        "(default %(default)s)")
    p.add_argument("--tcp", metavar="SETTINGS", default="host",
                   help="with the network lab, the sites' TCP: a congestion control (cubic, bbr, reno, ...) and/or "
                        "idle-restart or no-idle-restart (slow start after idle), comma-separated, e.g. "
                        "cubic,no-idle-restart; host: this machine's defaults (default %(default)s)")


def _lab_tcp(args: argparse.Namespace) -> Any:
    from geotrain.netlab import LabTcp

    return LabTcp.parse(args.tcp)


def _lab_warnings(lab: Any) -> None:
    """Say when the lab forwards in Python for want of a compiler, and when its links may outrun its router."""
    from geotrain.netlab import router_warning

    for line in (lab.forwarder_note, router_warning(lab.links, lab.forwarder_used)):
        if line is not None:
            print(f"warning: {line}", file=sys.stderr)


class _terminate_as_interrupt:
    """SIGTERM and SIGHUP raise KeyboardInterrupt while inside, so that a lab is torn down as on Ctrl+C."""

    def __enter__(self) -> None:
        import signal

        def interrupt(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        self.previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}

    def __exit__(self, *exc: Any) -> None:
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def cmd_netlab(args: argparse.Namespace) -> int:
    """Build a network lab from the run's topology, run a command in every site's namespace, tear it down."""
    import os
    import subprocess

    from geotrain.config import parse_size
    from geotrain.netlab import Lab, clean_stale, config_lab_links, require_root

    if args.clean:
        require_root()
        owners = clean_stale()
        print(f"removed {len(owners)} stale lab{'s' if len(owners) != 1 else ''}" +
              (f" (owners {', '.join(map(str, owners))})" if owners else ""))
        return 0
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise ConfigError("give the command to run in every site's namespace after --, e.g. geotrain netlab "
                          "--sites 2 -- python my_script.py; to train, use geotrain run --network netlab",
                          field="COMMAND")
    config = _config_from_args(args)
    links = config_lab_links(config, queue_bytes=None if args.queue is None else parse_size(args.queue,
                                                                                              field="--queue"),
                             loss=args.loss)
    tcp = _lab_tcp(args)
    require_root()
    lab = Lab(sites=config.run.sites, links=links, mtu=args.mtu, forwarder=args.router, tcp=tcp)
    codes: list[int | None] = []
    with _terminate_as_interrupt(), lab:
        _lab_warnings(lab)
        print(f"network lab: {config.run.sites} sites over {config.wan.link}; site k is "
              f"{lab.wan_address(0).rsplit('.', 1)[0]}.(k+1) in namespace {lab.namespace(0)[:-1]}K; control "
              f"address {lab.control_address}; TCP {lab.tcp.describe()}", file=sys.stderr, flush=True)
        procs = [lab.popen(k, [a.replace("{site}", str(k)) for a in command], env=dict(os.environ))
                 for k in range(config.run.sites)]
        try:
            codes = [p.wait() for p in procs]
        except KeyboardInterrupt:
            print("interrupted: stopping the sites and removing the lab", file=sys.stderr)
            return 1
        except OSError as e:
            raise ConfigError(f"cannot start {command[0]!r} ({e.strerror or e})", field="COMMAND") from None
    if line := lab.traffic():
        print(line, file=sys.stderr)
    bad = [(k, c) for k, c in enumerate(codes) if c != 0]
    for k, c in bad:
        print(f"site {k}: {command[0]} exited with {c}", file=sys.stderr)
    return 0 if not bad else 1


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
        outcome = launch(config, progress=not args.quiet, overwrite=True)  # a comparison runs each variant afresh
        worst = max(worst, outcome.exit_code)
        runs.append((name, outcome.out))
    table = write_comparison(out, runs)
    print((out / "compare.md").read_text(encoding="utf-8"))
    print(f"wrote {out / 'compare.md'}, {out / 'compare.json'} and {out / 'compare.html'}")
    return worst if table else 1


_PATH_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR, errno.ENOENT,
                          errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP})
"""OSError numbers that mean "this path cannot be written" rather than "the machine is in trouble"."""


def cmd_report(args: argparse.Namespace) -> int:
    from geotrain.report.html import REPORT_FILE, write_report

    run_dir = Path(args.dir)
    if not (run_dir / "summary.json").is_file():
        raise ConfigError(f"{str(run_dir)!r} holds no summary.json; give a run's output directory", field="DIR")
    out = Path(args.out) if args.out else run_dir / REPORT_FILE
    try:
        path = write_report(run_dir, out=out)
    except OSError as e:
        # Errors of the path itself are the user's to fix; others (a full disk, an I/O error) are not bad input.
        if e.errno not in _PATH_ERRNOS:
            raise
        # mkstemp and os.replace name a temporary file beside the report; name only a path elsewhere.
        elsewhere = e.filename and Path(e.filename).resolve().parent != out.resolve().parent
        reason = f"{e.strerror or e}" + (f": {e.filename}" if elsewhere else "")
        if e.errno == errno.EISDIR:
            reason, fix = "it is a directory", "Move it away"
        elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            fix = f"Make {str(out.parent)!r} writable (e.g. chmod u+w)"
        elif e.errno in (errno.EEXIST, errno.ENOTDIR):  # creating the parent directories met a file
            fix = "A part of that path is a file, not a directory: move it away"
        else:
            fix = "Check the path"
        other = "choose another --out FILE" if args.out else "pass --out FILE to write the report elsewhere"
        raise ConfigError(f"cannot write the report to {str(out)!r} ({reason}). {fix}, or {other}.",
                          field="--out" if args.out else "DIR") from None
    print(f"wrote {path}")
    return 0


SAMPLE_MAX_BYTES = 10_000
"""Most bytes one `geotrain sample` generates. Each byte costs a forward pass over up to seq_len bytes, and the
small demo model loses the thread long before this."""
# Sampling temperatures allowed besides 0 (greedy). Below 0.01 a sample is greedy in all but name, and far below
# it logits / temperature overflow float32 into NaN probabilities; above 10 the 40 most likely bytes are about
# equally likely, which is noise rather than a sample of the model.
SAMPLE_TEMPERATURE_MIN, SAMPLE_TEMPERATURE_MAX = 0.01, 10.0
_MODEL_SHAPE = ("n_layer", "n_head", "d_model", "seq_len")  # what the weights' shapes depend on


def _one_line(error: BaseException, limit: int = 240) -> str:
    """An exception's text squeezed into one line (the CLI's messages are one paragraph)."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_sample_flags(args: argparse.Namespace) -> None:
    """Check every flag before reading any file, so a typo is reported at once."""
    if not args.prompt:
        raise ConfigError("the prompt is empty; give some text to continue", field="--prompt")
    if not 1 <= args.max_bytes <= SAMPLE_MAX_BYTES:
        raise ConfigError(f"must be from 1 to {SAMPLE_MAX_BYTES} bytes, got {args.max_bytes}; for example "
                          "--max-bytes 200", field="--max-bytes")
    t = args.temperature
    if not (t == 0 or SAMPLE_TEMPERATURE_MIN <= t <= SAMPLE_TEMPERATURE_MAX):  # NaN fails both tests
        raise ConfigError(f"must be 0 (greedy: always the most likely byte) or from {SAMPLE_TEMPERATURE_MIN} to "
                          f"{SAMPLE_TEMPERATURE_MAX:g}, got {t}; 0.8 is a good start", field="--temperature")
    if not 0 <= args.seed < 2**64:  # the range torch.Generator.manual_seed takes without wrapping
        raise ConfigError(f"must be from 0 to 2**64 - 1, got {args.seed}; for example --seed 0", field="--seed")


def _gpt_config(m: dict[str, Any]) -> Any:
    """The model's config from config.json's "model" object (the run's [model] section), checked as the run
    checked it (``geotrain.config.ModelConfig``). Raises ValueError naming the field. A missing size is refused
    rather than defaulted: the default need not match the weights' shapes."""
    from geotrain.config import ModelConfig, _build

    for k in _MODEL_SHAPE:
        if k not in m:
            raise ValueError(f"model.{k} is missing")
    return _build(ModelConfig, {k: v for k, v in m.items() if k != "params"}, "model")


def _load_sample_model(run_dir: Path) -> Any:
    """The run's GPT from DIR/config.json and DIR/model.safetensors; a ConfigError if either is damaged."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from geotrain.models.gpt import GPT

    weights, cfg_path = run_dir / "model.safetensors", run_dir / "config.json"
    if not weights.is_file() or not cfg_path.is_file():
        raise ConfigError(f"{str(run_dir)!r} holds no trained model (model.safetensors and config.json); "
                          "give the --out directory of a finished 'geotrain run'", field="DIR")
    again = f"train again with 'geotrain run --out {run_dir}', or give the --out directory of another finished run"
    try:
        tree = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError and UnicodeDecodeError
        raise ConfigError(f"{str(cfg_path)!r} could not be read as JSON ({_one_line(e)}); {again}",
                          field="DIR") from None
    m = tree.get("model") if isinstance(tree, dict) else None
    if not isinstance(m, dict):
        raise ConfigError(f"{str(cfg_path)!r} has no \"model\" object (the run's [model] section), so the model's "
                          f"size is unknown; {again}", field="DIR")
    if isinstance(m.get("arch"), str) and m["arch"].startswith("hf:"):
        raise ConfigError(f"the run in {str(run_dir)!r} trained a Hugging Face model ({m.get('arch')}); sample it "
                          f"with transformers: AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained "
                          f"of {str(run_dir / 'hf')!r}", field="DIR")
    try:
        config = _gpt_config(m)
    except ValueError as e:
        raise ConfigError(f"the \"model\" object in {str(cfg_path)!r} is not a valid model config ({_one_line(e)}); "
                          f"{again}", field="DIR") from None
    try:
        state = load_file(str(weights))
    except (OSError, SafetensorError) as e:
        raise ConfigError(f"{str(weights)!r} is not a readable safetensors file ({_one_line(e)}): it is empty, "
                          f"cut short or damaged; {again}", field="DIR") from None
    # A run that diverged saves NaN weights; sampling from them fails inside torch.multinomial.
    bad = next((n for n, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise ConfigError(f"{str(weights)!r} holds NaN or infinite weights (first in {bad}): the run that wrote "
                          "it diverged; train again with 'geotrain run' and a lower learning rate "
                          "(--set optim.lr=...)", field="DIR")
    model = GPT(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"model.safetensors does not match the run's config.json ({_one_line(e, 200)}); {again}",
                          field="DIR") from None
    return model.eval()


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    _check_sample_flags(args)
    model = _load_sample_model(Path(args.dir))
    # surrogateescape gives back the bytes of an argument that was not valid UTF-8, instead of failing on them.
    prompt = args.prompt.encode("utf-8", "surrogateescape")
    gen = torch.Generator().manual_seed(args.seed)
    idx = torch.tensor([list(prompt)], dtype=torch.long)
    out = model.generate(idx, args.max_bytes, temperature=args.temperature, generator=gen)
    text = bytes(out[0].tolist()).decode("utf-8", errors="replace")
    print(text)
    return 0


def _is_local_address(host: str) -> bool:
    """Whether ``host`` names this machine: a socket can be bound to one of its addresses (on a free port)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):  # gaierror: a name that does not resolve
        return False
    for family, kind, proto, _, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.bind(sockaddr)
            return True
        except OSError:
            continue
    return False


def cmd_coordinator(args: argparse.Namespace) -> int:
    """Serve one run's membership and rendezvous to sites started with torchrun; ends after --hours."""
    from geotrain.membership.coordinator import serve
    from geotrain.membership.wire import create_token_file, read_token_file

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"must be a TCP port from 1 to 65535 (0: any free one), got {args.port}; for example "
                          "--port 29400",
                          field="--port")
    if not args.hours > 0:  # NaN fails too
        raise ConfigError(f"must be a positive number of hours, got {args.hours}; for example --hours 72",
                          field="--hours")
    if not _is_local_address(args.host):
        raise ConfigError(f"{args.host!r} is not an address of this machine; use 0.0.0.0 (every interface), "
                          "127.0.0.1 or this machine's own name or address", field="--host")
    token = Path(args.token_file)
    if not token.exists():
        create_token_file(token)
        print(f"wrote a fresh secret to {token} (mode 600); copy it to every site and pass it as --token-file",
              flush=True)
    secret = read_token_file(token)
    events = Path(args.events) if args.events else None

    def ready(port: int) -> None:
        print(f"geotrain coordinator listening on {args.host}:{port}; sites join with --coordinator HOST:{port} "
              f"--token-file {token}", flush=True)

    def log(message: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)

    try:
        serve(secret, args.host, args.port, events_path=events, hours=args.hours, log=log, ready=ready)
    except KeyboardInterrupt:
        pass
    except OSError as e:
        raise ConfigError(f"could not listen on {args.host}:{args.port} ({e.strerror or e}); is another "
                          "coordinator running? Stop it or choose another --port", field="--port") from None
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with the project's bad-input contract: a flag it cannot read is exit code 2 with one line that
    names the flag and points at the help, not a usage block."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message}; see '{self.prog} --help'", field=None)


def build_parser() -> argparse.ArgumentParser:
    from geotrain import __version__

    parser = _Parser(prog="geotrain", description="Train one model across several datacenters.")
    parser.add_argument("--version", action="version", version=f"geotrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train across emulated sites on this machine", epilog=choices_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_flags(p)
    p.add_argument("--out", help="output directory (default: a fresh runs/YYYYMMDD-HHMMSS, with the link "
                   "runs/latest pointing to it)")
    p.add_argument("--quiet", action="store_true", help="no live progress")
    p.add_argument("--dry-run", action="store_true",
                   help="check the configuration and print it resolved, without starting anything")
    p.add_argument("--fault", action="append", metavar="ACTION[:ARG]:SITE@WHEN",
                   help="inject a fault (repeatable): kill, rejoin, partition, heal, slow:FACTOR, nan, outlier:FACTOR; "
                        "SITE a site index or 'coordinator' (kill only); WHEN an outer round (@3, its middle) or "
                        "seconds of training (@30s). Example: --fault kill:2@3 --fault rejoin:2@6")
    p.add_argument("--resume", metavar="DIR", nargs="?", const="runs/latest",
                   help="continue the run in DIR (its --out; default runs/latest, the newest run) from its last "
                        "checkpoint, as it was configured")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that holds an earlier run's checkpoints (deletes them)")
    p.add_argument("--network", choices=("emulated", "netlab"), default="emulated",
                   help="emulated: the WAN emulator charges each collective its modelled time; netlab: every site in "
                        "a network namespace of its own, the links applied to real packets by a router (root only; "
                        "see 'geotrain netlab --help') (default %(default)s)")
    _add_lab_flags(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compare", help="run several algorithms on the same budget and compare them",
                       epilog=choices_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("dir", metavar="DIR", nargs="?", default="runs/latest",
                   help="a run's output directory, the --out of 'geotrain run' (default %(default)s)")
    p.add_argument("--out", metavar="FILE", help="where to write the report (default DIR/report.html)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("sample", help="continue a prompt with a run's trained demo model")
    p.add_argument("dir", metavar="DIR", nargs="?", default="runs/latest",
                   help="a finished run's output directory, holding model.safetensors and config.json "
                        "(default %(default)s)")
    p.add_argument("--prompt", required=True, help="text to continue (required; no default)")
    p.add_argument("--max-bytes", type=int, default=200, metavar="N",
                   help=f"bytes to generate after the prompt, 1 to {SAMPLE_MAX_BYTES} (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T",
                   help=f"0 for greedy decoding (always the most likely byte), or {SAMPLE_TEMPERATURE_MIN} to "
                        f"{SAMPLE_TEMPERATURE_MAX:g}: lower is safer, higher more varied; sampling keeps the 40 "
                        "most likely bytes (default %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the sampling, 0 to 2**64 - 1; the same seed gives the same text (default %(default)s)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("coordinator", help="serve a run's membership to sites started with torchrun",
                       description="The coordinator of one run: sites join it with the run's secret (challenge-"
                       "response, the secret never crosses the wire), heartbeat, and agree on who takes part in "
                       "each sync. Start a new one for each run. gloo's traffic between sites is not encrypted: "
                       "keep the sites on a private network or VPN.")
    p.add_argument("--host", default="0.0.0.0",
                   help="address to listen on: 0.0.0.0 for every interface, or one of this machine's addresses "
                        "(default %(default)s)")
    p.add_argument("--port", type=int, default=29400,
                   help="TCP port, 1 to 65535, or 0 for any free one (printed); sites join with --coordinator HOST:PORT (default %(default)s)")
    p.add_argument("--token-file", required=True,
                   help="the run's secret (required); written fresh (mode 600) if the file does not exist, then "
                        "copy it to every site")
    p.add_argument("--events", metavar="FILE",
                   help="append membership events (joined, left, healed) to FILE (default: none)")
    p.add_argument("--hours", type=float, default=72.0,
                   help="stop after this many hours, a positive number; inf runs until Ctrl+C (default %(default)s)")
    p.set_defaults(func=cmd_coordinator)

    p = sub.add_parser("netlab", help="run a command in every site's network namespace over real, shaped links",
                       description="Build one Linux network namespace per site from the run's topology (--sites, "
                       "--link, [[wan.links]] of --config), joined by a router process that applies each link's "
                       "bandwidth, one-way latency, queue and loss to every packet in each direction; run COMMAND in "
                       "every site's namespace (with NETLAB_SITE, NETLAB_SITES, NETLAB_ADDRESSES (the sites' "
                       "addresses, comma-separated), NETLAB_CONTROL_ADDRESS (the host, unshaped) and "
                       "GLOO_SOCKET_IFNAME=wan0 set, and {site} in its arguments replaced by the site's index); "
                       "then remove everything, also on Ctrl+C or an error. A lab left by a killed run is removed at "
                       "the next start, or with --clean. Root only. To train in the lab: geotrain run --network "
                       "netlab.")
    p.add_argument("--config", help="a run configuration file (TOML) whose [wan] links and sites to build")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set wan.link=10mbit/20ms (repeatable)")
    from geotrain.config import defaults

    d = defaults()
    p.add_argument("--sites", type=int, help=f"number of sites (default {d.run.sites})")
    p.add_argument("--link", metavar="BANDWIDTH/LATENCY",
                   help=f"the link between every pair of sites, e.g. 10mbit/50ms or a preset (default {d.wan.link})")
    p.add_argument("--queue", metavar="BYTES",
                   help="each link's queue, e.g. 64kb (default: one round trip's bandwidth-delay product, at least "
                        "64kb)")
    p.add_argument("--loss", type=float, default=0.0, help="probability that a packet is lost (default 0)")
    p.add_argument("--mtu", type=int, default=1500, help="MTU of the sites' WAN interfaces (default %(default)s)")
    _add_lab_flags(p)
    p.add_argument("--clean", action="store_true", help="only remove labs left by killed runs, then exit")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="what every site runs")
    p.set_defaults(func=cmd_netlab)

    p = sub.add_parser("site", help="one worker of one site (what torchrun starts); see --help")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda a: __import__("geotrain.train.site", fromlist=["main"]).main(a.rest))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
