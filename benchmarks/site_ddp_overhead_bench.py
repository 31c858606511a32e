"""What geotrain's loop costs per step against a plain PyTorch DDP loop, inside one site.

Both train the demo GPT with 2 workers (processes, one thread each) joined by gloo and wrapped in PyTorch's
``DistributedDataParallel``, on the same corpus, batches, inner AdamW and schedule:

* **geotrain**: ``geotrain run`` with 1 site x 2 workers, DiLoCo with H equal to the run's steps, so nothing
  crosses sites until the very last step (no WAN, no outer round in the measured window);
* **plain**: the textbook loop (forward, backward, clip, step, schedule, zero_grad; the loss read every
  ``log_every`` steps as geotrain logs it) in two processes started here.

The figure is the time per inner step between steps ``--skip`` and ``steps - --skip`` (warm-up and the final
sync left out): from the records' ``wall_s`` for geotrain, from timestamps at the same steps for the plain loop.
Runs alternate (plain, geotrain, plain, ...), and the table quotes the median of ``--repeats`` runs of each and
their ratio.

    PYTHONPATH=src python benchmarks/site_ddp_overhead_bench.py [--repeats 5] [--steps 210]

Writes benchmarks/results/DATE-site-ddp-overhead.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, write_result  # noqa: E402

WORKERS = 2


def _values(steps: int, out: Path) -> dict:
    from geotrain.config import load_config

    base = load_config(values={"run.sites": 1})
    tokens = steps * base.data.batch_size * base.model.seq_len * WORKERS
    return {"run.sites": 1, "run.workers_per_site": WORKERS, "run.algorithm": "diloco", "outer.sync_every": steps,
            "run.tokens": tokens, "run.eval_every_tokens": tokens, "wan.link": "none", "run.out": str(out),
            "checkpoint.every_rounds": 0, "comm.overlap": False}


def _plain_worker(rank: int, store: str, values: dict, data_dir: str, steps: int, queue: mp.Queue) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from geotrain.comm.site_parallel import ddp_buffer_options
    from geotrain.config import load_config
    from geotrain.data.corpus import BatchSampler, open_corpus
    from geotrain.models.gpt import init_gpt
    from geotrain.train.workload import inner_optimizer, lr_schedule

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORKERS)
    config = load_config(values=values)
    model = init_gpt(config.model, seed=config.run.seed)
    ddp = DistributedDataParallel(model, **ddp_buffer_options())
    params = list(model.parameters())
    optimizer = inner_optimizer(params, config.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(config.optim, steps))
    sampler = BatchSampler(open_corpus(Path(data_dir)).train, batch_size=config.data.batch_size,
                           seq_len=config.model.seq_len, seed=config.run.seed * 1_000_003 + rank)
    stamps = {}
    for step in range(steps):
        x, y = sampler.next()
        loss = ddp(x, y)[1]
        loss.backward()
        if config.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % config.run.log_every == 0:
            float(loss.detach())
            stamps[step] = time.perf_counter()
    dist.destroy_process_group()
    queue.put((rank, stamps))


def _per_step(stamps: dict[int, float], a: int, b: int) -> float:
    return (stamps[b] - stamps[a]) / (b - a)


def run_plain(values: dict, data_dir: Path, steps: int, a: int, b: int) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_plain_worker, args=(r, str(Path(tmp) / "store"), values, str(data_dir), steps,
                                                          queue)) for r in range(WORKERS)]
        for p in procs:
            p.start()
        try:
            results = dict(queue.get(timeout=900) for _ in procs)
        finally:
            for p in procs:
                p.join(timeout=60)
                if p.is_alive():
                    p.kill()
    return statistics.median(_per_step(results[r], a, b) for r in results)


def run_geotrain(values: dict, data_dir: Path, a: int, b: int) -> float:
    from geotrain.config import load_config
    from geotrain.train.launch import launch

    outcome = launch(load_config(values=values), factory_kwargs={"data_dir": data_dir}, overwrite=True, progress=False)
    if outcome.exit_code != 0:
        raise RuntimeError(outcome.summary.get("error"))
    out = Path(values["run.out"])
    records = [json.loads(line) for line in (out / "sites" / "site0.jsonl").read_text().splitlines()]
    walls = {r["step"]: r["wall_s"] for r in records if r.get("kind") == "step"}
    return _per_step(walls, a, b)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=210)
    ap.add_argument("--skip", type=int, default=10, help="steps left out at each end (a multiple of log_every)")
    args = ap.parse_args()

    from geotrain.config import load_config
    from geotrain.train.workload import prepare_corpus

    work = Path(tempfile.mkdtemp(prefix="site-ddp-"))
    values = _values(args.steps, work / "run")
    data_dir = prepare_corpus(load_config(values=values), work / "data")
    a, b = args.skip, args.steps - args.skip
    plain, geo = [], []
    for i in range(args.repeats):
        plain.append(run_plain(values, data_dir, args.steps, a, b))
        geo.append(run_geotrain(values, data_dir, a, b))
        print(f"repeat {i + 1}: plain {plain[-1] * 1e3:.2f} ms/step, geotrain {geo[-1] * 1e3:.2f} ms/step "
              f"({geo[-1] / plain[-1]:.3f}x)", flush=True)
    mp_, mg = statistics.median(plain), statistics.median(geo)
    ratios = sorted(g / p for g, p in zip(geo, plain))
    cfg = load_config(values=values)
    body = "\n".join([
        "# Step time of geotrain's loop against a plain PyTorch DDP loop (1 site x 2 workers)",
        "",
        f"Command: `{command_line()}`",
        "",
        f"Demo GPT ({cfg.model.n_layer} layers, d_model {cfg.model.d_model}, seq {cfg.model.seq_len}), batch "
        f"{cfg.data.batch_size} per worker, AdamW, {WORKERS} worker processes with one thread each on gloo, both "
        f"wrapped in DistributedDataParallel. Time per inner step between steps {a} and {b} of {args.steps}; "
        f"{args.repeats} runs of each, alternating. Machine: {os.cpu_count()} cores, shared.",
        "",
        "| loop | median ms/step | runs (ms/step) |",
        "|---|---|---|",
        f"| plain DDP | {mp_ * 1e3:.2f} | {', '.join(f'{t * 1e3:.2f}' for t in plain)} |",
        f"| geotrain (DiLoCo, 1 site) | {mg * 1e3:.2f} | {', '.join(f'{t * 1e3:.2f}' for t in geo)} |",
        "",
        f"Overhead (ratio of medians - 1): **{(mg / mp_ - 1) * 100:+.2f}%**. Per-pair ratios, sorted: "
        f"{', '.join(f'{r:.3f}' for r in ratios)}.",
        "",
    ])
    write_result("site-ddp-overhead", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
