"""Train a small transformers Llama across 2 sites with DiLoCo, then load it back with plain transformers.

geotrain builds the model from a LlamaConfig (``model="hf:llama"``, no download), trains it on two emulated
sites with DiLoCo, and writes the global model to ``OUT/hf`` with ``save_pretrained``, beside a tokenizer.
This script then loads ``OUT/hf`` with ``AutoModelForCausalLM.from_pretrained``, scores it on the run's own
eval batches and checks that the loss equals the eval loss the run reported (to 1e-4); it exits 1 if not.

    python examples/hf_llama.py [--out runs/hf-llama] [--tokens 400k] [--d-model 128] [--layers 4]

Byte-level by default (token id = byte value); ``--tokenizer DIR`` trains on the ids of a local tokenizer
directory instead. Needs the hf extra: ``pip install 'geotrain[hf]'``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from geotrain.api import train


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/hf-llama", help="output directory (default %(default)s)")
    p.add_argument("--tokens", default="400k", help="training tokens over both sites (default %(default)s)")
    p.add_argument("--d-model", type=int, default=128, help="hidden size (default %(default)s)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default %(default)s)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per inner step per site (default %(default)s)")
    p.add_argument("--sync-every", type=int, default=20, help="DiLoCo's H, inner steps per round (default %(default)s)")
    p.add_argument("--eval-batches", type=int, default=8, help="held-out batches per evaluation (default %(default)s)")
    p.add_argument("--link", default="100mbit/50ms", help="emulated link between the sites (default %(default)s)")
    p.add_argument("--data", help="text file or directory (default: Python's standard library sources)")
    p.add_argument("--tokenizer", help="local tokenizer directory (default: byte-level)")
    p.add_argument("--progress", action="store_true", help="show live progress")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from geotrain.models.hf import run_eval_batches

    settings = {"model.d_model": args.d_model, "model.n_layer": args.layers, "model.n_head": args.heads,
                "model.seq_len": args.seq_len, "data.batch_size": args.batch_size,
                "run.eval_batches": args.eval_batches}
    if args.tokenizer:
        settings["data.tokenizer"] = args.tokenizer
    summary = train(model="hf:llama", sites=2, algorithm="diloco", sync_every=args.sync_every, tokens=args.tokens,
                    link=args.link, data=args.data, out=args.out, settings=settings, progress=args.progress,
                    overwrite=True)
    out = Path(args.out)

    # From here on, only transformers and torch: the export stands on its own.
    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    tokenizer = AutoTokenizer.from_pretrained(out / "hf")
    batches = run_eval_batches(out)  # the windows the run's eval loss was measured on
    with torch.no_grad():
        losses = [float(F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())) for x, y in batches]
    reloaded = sum(losses) / len(losses)
    params = sum(p.numel() for p in model.parameters())
    print(f"{type(model).__name__}, {params:,} parameters, trained on {summary['tokens']:,} tokens by 2 sites "
          f"with DiLoCo ({summary['outer_rounds']} outer rounds, {summary['wan_bytes'] / 1e6:.1f} MB over the WAN)")
    print(f"eval loss: run {summary['eval_loss']:.6f}, reloaded from {out / 'hf'} {reloaded:.6f} "
          f"(difference {abs(reloaded - summary['eval_loss']):.2e})")
    prompt = tokenizer("def ", return_tensors="pt").input_ids
    room = max(1, min(60, args.seq_len - prompt.shape[1]))  # stay within the positions it was trained on
    torch.manual_seed(0)
    sample = model.generate(prompt, max_new_tokens=room, do_sample=True, temperature=0.8, top_k=40,
                            pad_token_id=tokenizer.pad_token_id or 0)
    print(f"sample: {tokenizer.decode(sample[0])!r}")
    if not abs(reloaded - summary["eval_loss"]) <= 1e-4:
        print("error: the reloaded model's eval loss differs from the run's by more than 1e-4", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
