"""Codec benchmark: speed against memcpy on one core, JIT compile time, checksum cost, block size, and all-reduce patterns.

    .venv/bin/python benchmarks/codec_bench.py                  # full run, writes benchmarks/results/<date>-codecs.md
    .venv/bin/python benchmarks/codec_bench.py --quick --out -  # small sizes, print only

Sections:

1. Throughput. For tensors of 4M and 16M float32 values, the median over repeats of encode and of decode time
   per codec, and of ``torch.Tensor.copy_`` of the same tensor into a preallocated one (memcpy), all measured
   interleaved (round-robin) in the same run so that machine noise hits them alike. Throughput = input bytes / (encode +
   decode seconds); ratio = codec throughput / memcpy throughput = t_memcpy / (t_encode + t_decode). Encode
   and decode write into preallocated ``out=`` buffers (the steady state of a collective that reuses its
   buffers); the "allocating" column calls them without ``out=``, paying for fresh memory each call. Every
   function runs once before timing, so the numba kernels are compiled (section 5 times that) before the clock
   starts. Also the fixed cost of one call: encode + decode of 1000 values.
2. Checksum. zlib.crc32 and zlib.adler32 against the codecs' two-level additive checksum (numba, and the same
   sums in numpy), on an int8 body.
3. Block size. Relative L2 error and bytes per value of int8/int4 for block sizes 64..4096, on Gaussian and
   heavy-tailed (Student t, 3 degrees of freedom) data.
4. All-reduce patterns. K sites simulated in one process; bytes each site sends (summed from the encoded
   payloads themselves) and the relative error of the mean against the exact float32 mean, for
   (a) a ring that re-quantizes the partial sum at each hop, (b) an all-gather of encoded payloads, and
   (c) a reduce-scatter of encoded chunks (all-to-all), decode + sum in fp32, re-encode, all-gather.
5. JIT compile time. A fresh process with an empty numba cache directory (cold), then another one with the
   cache it left (warm): the time of ``import numba`` and of each codec's first encode and first decode.

Timings use one thread (torch.set_num_threads(1)), as every site process does.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from geotrain.comm.codecs import Codec, ErrorFeedback, get_codec
from geotrain.comm.codecs.base import HEADER_SIZE, SEGMENT_WORDS, body_checksum
from geotrain.comm.codecs.dense import Fp4Codec

ROOT = Path(__file__).resolve().parent.parent


def make_codec(name: str) -> Codec:
    if name == "fp4":  # implemented but not registered (see docs/codecs.md)
        return Fp4Codec()
    if name.startswith("topk"):
        return get_codec(name, fraction=0.01)
    return get_codec(name)


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float]]:
    """Median wall and thread-CPU seconds of each function, run round-robin ``repeats`` times after a warm-up."""
    for f in fns.values():
        f()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            c0, w0 = time.thread_time(), time.perf_counter()
            f()
            wall[k].append(time.perf_counter() - w0)
            cpu[k].append(time.thread_time() - c0)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}


def throughput(names: list[str], sizes: list[int], repeats: dict[int, int]) -> list[str]:
    lines = [
        "| codec | values | bytes/value | encode ms | decode ms | MB/s (enc+dec) | memcpy MB/s | ratio (wall) | ratio (cpu) | enc+dec ms allocating |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in sizes:
        x = torch.randn(n, generator=torch.Generator().manual_seed(0))
        dst = torch.empty_like(x)
        fns: dict[str, Callable[[], object]] = {"memcpy": lambda: dst.copy_(x)}
        codecs = {name: make_codec(name) for name in names}
        alloc: dict[str, Callable[[], object]] = {"memcpy": fns["memcpy"]}
        for name, codec in codecs.items():
            payload = codec.encode(x)
            send = torch.empty_like(payload)
            recv = torch.empty(n)
            fns[f"{name}/enc"] = lambda c=codec, s=send: c.encode(x, out=s)
            fns[f"{name}/dec"] = lambda c=codec, p=payload, r=recv: c.decode(p, out=r)
            alloc[f"{name}/alloc"] = lambda c=codec: c.decode(c.encode(x))
        t = interleaved_medians(fns, repeats[n])
        # The allocating calls in a loop of their own: their page faults and munmaps would disturb the others.
        t |= {k: v for k, v in interleaved_medians(alloc, max(3, repeats[n] // 3)).items() if k != "memcpy"}
        mem_wall, mem_cpu = t["memcpy"]
        mb = 4 * n / 1e6
        for name, codec in codecs.items():
            ew, ec = t[f"{name}/enc"]
            dw, dc = t[f"{name}/dec"]
            lines.append(
                f"| {name} | {n / 2**20:g}M | {codec.encoded_size(n) / n:.4f} | {ew * 1e3:.2f} | {dw * 1e3:.2f} | "
                f"{mb / (ew + dw):.0f} | {mb / mem_wall:.0f} | {mem_wall / (ew + dw):.2f} | {mem_cpu / (ec + dc):.2f} | "
                f"{t[f'{name}/alloc'][0] * 1e3:.2f} |"
            )
        print("\n".join(lines[-len(codecs) :]), flush=True)
    return lines


def fixed_cost(names: list[str], n: int, repeats: int) -> list[str]:
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    fns: dict[str, Callable[[], object]] = {}
    for name in names:
        codec = make_codec(name)
        send, recv = torch.empty(codec.encoded_size(n), dtype=torch.uint8), torch.empty(n)
        fns[name] = lambda c=codec, s=send, r=recv: c.decode(c.encode(x, out=s), out=r)
    t = interleaved_medians(fns, repeats)
    lines = [f"Fixed cost of one call: encode + decode of {n} values with out= buffers, median of {repeats}.", ""]
    lines += ["| codec | enc+dec us |", "|---|---|"] + [f"| {k} | {w * 1e6:.0f} |" for k, (w, _) in t.items()]
    print("\n".join(lines), flush=True)
    return lines


_FIRST_CALLS = """
import sys, time
t0 = time.perf_counter()
import numba
print(f"import numba {time.perf_counter() - t0:.3f}")
import torch
from geotrain.comm.codecs import get_codec
from geotrain.comm.codecs.dense import Fp4Codec
x = torch.randn(10_000)
for name in sys.argv[1:]:
    codec = Fp4Codec() if name == "fp4" else get_codec(name)
    t0 = time.perf_counter()
    payload = codec.encode(x)
    t1 = time.perf_counter()
    codec.decode(payload)
    print(f"{name} {t1 - t0:.3f} {time.perf_counter() - t1:.3f}")
"""


def compile_times(names: list[str]) -> list[str]:
    """First-call times in fresh processes: cold (empty numba cache directory), then warm (the cache it left)."""
    runs = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        for _ in ("cold", "warm"):
            done = subprocess.run(
                [sys.executable, "-c", _FIRST_CALLS, *names], env=env, capture_output=True, text=True, check=True
            )
            runs.append({line.split()[0]: line.split()[-2:] for line in done.stdout.splitlines()})
    lines = [
        "Seconds, in a fresh process each (one each, not a median: this is what a site process pays once). Cold: an "
        "empty cache directory (`NUMBA_CACHE_DIR` set to a new temporary one). Warm: the next process, which "
        "loads what the first one cached. The first call also pays for importing numba (timed apart) and for "
        "initialising LLVM (in the first codec's row).",
        "",
        "| | cold: first encode | cold: first decode | warm: first encode | warm: first decode |",
        "|---|---|---|---|---|",
        f"| import numba | {runs[0]['import'][1]} | | {runs[1]['import'][1]} | |",
    ]
    for name in names:
        (ce, cd), (we, wd) = runs[0][name], runs[1][name]
        lines.append(f"| {name} | {ce} | {cd} | {we} | {wd} |")
    print("\n".join(lines), flush=True)
    return lines


def numpy_body_checksum(body: torch.Tensor) -> tuple[int, int]:
    """The same two-level checksum in numpy (the implementation before the numba kernels), for comparison."""
    words = body.numpy().view(np.uint64)
    nfull, rest = divmod(words.size, SEGMENT_WORDS)
    sums = np.empty(nfull + (1 if rest else 0), dtype=np.uint64)
    np.add.reduce(words[: nfull * SEGMENT_WORDS].reshape(nfull, SEGMENT_WORDS), axis=1, out=sums[:nfull])
    if rest:
        sums[nfull] = np.add.reduce(words[nfull * SEGMENT_WORDS :], dtype=np.uint64)
    s2 = np.add.reduce(sums * np.arange(1, sums.size + 1, dtype=np.uint64), dtype=np.uint64)
    return int(np.add.reduce(sums, dtype=np.uint64)), int(s2)


def checksums(n: int, repeats: int) -> list[str]:
    codec = get_codec("int8")
    payload = codec.encode(torch.randn(n))
    body = payload[HEADER_SIZE:]
    raw = body.numpy()
    assert numpy_body_checksum(body) == body_checksum(body)
    t = interleaved_medians(
        {
            "zlib.crc32": lambda: zlib.crc32(raw),
            "zlib.adler32": lambda: zlib.adler32(raw),
            "two-level additive, numpy": lambda: numpy_body_checksum(body),
            "two-level additive, numba (ours)": lambda: body_checksum(body),
        },
        repeats,
    )
    lines = [
        f"Body of an int8 payload of {n / 2**20:g}M values ({body.numel() / 1e6:.1f} MB); median of {repeats}. "
        "Measured on its own; the encode kernels sum each 32 KiB segment of the body right after writing it, "
        "so an encode does not pay this, and a decode pays it once before decoding.",
        "",
        "| checksum | ms | GB/s |",
        "|---|---|---|",
    ]
    for k, (w, _) in t.items():
        lines.append(f"| {k} | {w * 1e3:.3f} | {body.numel() / w / 1e9:.1f} |")
    print("\n".join(lines), flush=True)
    return lines


def block_sizes(n: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # StudentT samples from the global generator
    data = {
        "gaussian": torch.randn(n, generator=g),
        "student-t(3)": torch.distributions.StudentT(3.0).sample((n,)).float(),
    }
    lines = ["| codec | block | bytes/value | rel. L2 error, gaussian | rel. L2 error, student-t(3) |", "|---|---|---|---|---|"]
    for name in ("int8", "int4"):
        for block in (64, 128, 256, 512, 1024, 4096):
            codec = get_codec(name, block_size=block)
            errs = []
            for x in data.values():
                y = codec.decode(codec.encode(x))
                errs.append(((x - y).norm() / x.norm()).item())
            lines.append(f"| {name} | {block} | {codec.encoded_size(n) / n:.4f} | {errs[0]:.5f} | {errs[1]:.5f} |")
    print("\n".join(lines), flush=True)
    return lines


# -- compressed all-reduce patterns, K sites simulated in one process --------------------------------------


def chunks_of(n: int, k: int) -> list[slice]:
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(k)]


Encode = Callable[[object, torch.Tensor], torch.Tensor]
"""encode(key, tensor): key names the sender's stream (site, chunk, stage) so that error feedback can keep one
residual per stream."""


def ring_requantize(codec: Codec, encode: Encode, xs: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """(a) Ring reduce-scatter that decodes, adds its own chunk and re-encodes at every hop; then a ring
    all-gather that forwards each reduced chunk's payload unchanged."""
    k, n = len(xs), xs[0].numel()
    parts = chunks_of(n, k)
    sent = [0] * k
    acc = [[x[p].clone() for p in parts] for x in xs]  # acc[site][chunk]
    for step in range(k - 1):
        msgs = []
        for i in range(k):
            c = (i - step) % k
            payload = encode((i, c, "rs"), acc[i][c])
            sent[i] += payload.numel()
            msgs.append(((i + 1) % k, c, payload))
        for j, c, payload in msgs:
            acc[j][c] += codec.decode(payload)
    mean = torch.empty(n)
    for i in range(k):
        c = (i + 1) % k  # site i now holds the full sum of chunk i+1
        payload = encode((i, c, "ag"), acc[i][c] / k)
        for hop in range(k - 1):  # forwarded around the ring: K-1 sends of this payload in total
            sent[(i + hop) % k] += payload.numel()
        mean[parts[c]] = codec.decode(payload)
    return mean, sent


def all_gather_encoded(codec: Codec, encode: Encode, xs: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """(b) Every site encodes its vector once; a ring all-gather delivers all K payloads to every site, which
    decodes them and averages in fp32. Each site sends (K-1) payloads."""
    k = len(xs)
    payloads = [encode(i, x) for i, x in enumerate(xs)]
    total = torch.zeros(xs[0].numel())
    for p in payloads:
        total += codec.decode(p)
    sent = [(k - 1) * p.numel() for p in payloads]  # all payloads have the same size
    return total / k, sent


def reduce_scatter_then_gather(codec: Codec, encode: Encode, xs: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """(c) All-to-all of encoded chunks: site j receives every site's chunk j, decodes and sums them in fp32
    (its own chunk unencoded), encodes the mean of chunk j once, and an all-gather delivers it to all."""
    k, n = len(xs), xs[0].numel()
    parts = chunks_of(n, k)
    sent = [0] * k
    mean = torch.empty(n)
    for j, part in enumerate(parts):
        total = xs[j][part].clone()
        for i in range(k):
            if i != j:
                payload = encode((i, j, "rs"), xs[i][part])
                sent[i] += payload.numel()
                total += codec.decode(payload)
        payload = encode((j, j, "ag"), total / k)
        sent[j] += (k - 1) * payload.numel()  # one copy to each other site (or K-1 ring forwards, same bytes)
        mean[part] = codec.decode(payload)
    return mean, sent


PATTERNS = (
    ("(a) ring, re-quantize per hop", ring_requantize),
    ("(b) all-gather encoded", all_gather_encoded),
    ("(c) reduce-scatter + all-gather", reduce_scatter_then_gather),
)


def site_vectors(signal: torch.Tensor, k: int, g: torch.Generator) -> list[torch.Tensor]:
    """K sites' pseudo-gradients of one round: a signal shared by all sites and rounds, plus site noise."""
    return [signal + torch.randn(signal.numel(), generator=g) for _ in range(k)]


def allreduce_patterns(n: int, ks: list[int], names: list[str], rounds: int) -> list[str]:
    lines = [
        f"{n / 2**20:g}M values per site. Site i's pseudo-gradient in round r = a signal shared by all sites and "
        "rounds (Student t, 3 dof) + fresh site noise (Gaussian, same scale). S = one site's full encoded payload. "
        "One round: ||mean_hat - mean|| / ||mean|| against the exact fp32 mean, no error feedback. "
        f"{rounds} rounds: the same for the sums over {rounds} rounds, with error feedback at every point where a "
        "value is encoded (each site for its own sends, each chunk owner for its re-encoded mean); with feedback "
        "the error of the sum is one residual, so this falls like 1/rounds unless the pattern loses more.",
        "",
        "| codec | K | S (MB) | pattern | bytes sent per site (MB) | per site / S | rel. error, one round | "
        f"rel. error of the {rounds}-round sum, with EF |",
        "|---|---|---|---|---|---|---|---|",
    ]
    torch.manual_seed(0)
    signal = torch.distributions.StudentT(3.0).sample((n,)).float()
    for k in ks:
        xs = site_vectors(signal, k, torch.Generator().manual_seed(k))
        exact = torch.stack(xs).double().mean(0)
        for name in names:
            codec = make_codec(name)
            s = codec.encoded_size(n)
            for label, fn in PATTERNS:
                mean, sent = fn(codec, lambda _key, t, c=codec: c.encode(t), xs)
                err = ((mean.double() - exact).norm() / exact.norm()).item()
                # Several rounds with error feedback: the error of the accumulated sum of means.
                efs: dict[object, ErrorFeedback] = {}
                g = torch.Generator().manual_seed(1000 + k)
                got = torch.zeros(n, dtype=torch.float64)
                want = torch.zeros(n, dtype=torch.float64)
                for _ in range(rounds):
                    xr = site_vectors(signal, k, g)
                    want += torch.stack(xr).double().mean(0)
                    m, _ = fn(codec, lambda key, t, c=codec: efs.setdefault(key, ErrorFeedback(c)).encode(t), xr)
                    got += m.double()
                err_ef = ((got - want).norm() / want.norm()).item()
                per_site = max(sent)
                lines.append(
                    f"| {name} | {k} | {s / 1e6:.3f} | {label} | {per_site / 1e6:.3f} | {per_site / s:.2f} | "
                    f"{err:.5f} | {err_ef:.5f} |"
                )
            print("\n".join(lines[-3:]), flush=True)
    return lines


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{model}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, torch {torch.__version__}, "
        f"numpy {np.__version__}; 1 torch thread; 1-min load average at start {load:.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run)")
    parser.add_argument("--out", default=None, help="markdown output path, '-' for none (default: results/<date>-codecs.md)")
    parser.add_argument("--skip-allreduce", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    today = dt.date.today().isoformat()
    sizes = [1 << 16, 1 << 18] if args.quick else [1 << 22, 1 << 24]
    repeats = {sizes[0]: 5 if args.quick else 21, sizes[1]: 3 if args.quick else 11}
    names = ["fp32", "bf16", "int8", "int4", "fp4", "topk", "topk+int8"]
    started = time.perf_counter()
    sections = [
        f"# Codec benchmark, {today}",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}` (from the repository root)",
        "",
        f"Machine: {machine()}.",
        "",
        "## 1. Encode + decode throughput against memcpy (one core)",
        "",
        f"Median of {repeats[sizes[0]]} ({sizes[0] / 2**20:g}M) and {repeats[sizes[1]]} ({sizes[1] / 2**20:g}M) "
        "interleaved repeats. ratio = t_memcpy / (t_encode + t_decode), with memcpy = `dst.copy_(x)` of the same "
        "tensor in the same run; ratio (cpu) uses thread CPU time instead of wall time (less sensitive to other "
        "processes on this shared machine). topk keeps 1% of each 4096-value chunk. fp4 (E3M0) is implemented but "
        "not registered. The last column is encode + decode without out= buffers (fresh tensors each call, "
        "measured in a separate loop). Every function ran once before the timed repeats, so JIT compile time "
        "(section 5) is not in these figures.",
        "",
        *throughput(names, sizes, repeats),
        "",
        *fixed_cost(["fp32", "bf16", "int8", "int4"], 1000, 201 if not args.quick else 21),
        "",
        "## 2. Checksum cost",
        "",
        *checksums(sizes[0], 31 if not args.quick else 5),
        "",
        "## 3. Block size: error against bytes",
        "",
        *block_sizes(1 << 20 if not args.quick else 1 << 16),
    ]
    if not args.skip_allreduce:
        sections += [
            "",
            "## 4. Compressed all-reduce: which pattern",
            "",
            *allreduce_patterns(1 << 19 if not args.quick else 1 << 14, [4, 8], ["int8", "int4", "topk+int8"], 10 if not args.quick else 3),
        ]
    compile_section = compile_times(["int8", "int4", "bf16", "fp32", "fp4"])
    sections += ["", "## 5. JIT compile time (first call in a process)", "", *compile_section]
    sections += ["", f"Total benchmark time: {time.perf_counter() - started:.0f} s.", ""]
    out = args.out if args.out is not None else str(ROOT / "benchmarks" / "results" / f"{today}-codecs.md")
    if out != "-":
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("\n".join(sections))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
