"""Time the Triton sink kernel's tile configurations at a GPT-OSS shape on CUDA, and keep the fastest.

    python benchmarks/tune_triton_blocks.py --seq 8192 --out tuning.jsonl --best best-config.json

GPT-OSS attention (64 query heads, 8 KV heads, head_dim 64), bfloat16, full causal. The forward's tiles
are tuned on the forward alone; the backward's (dK/dV tiles, dQ tiles, warps, stages) on forward+backward
with the forward's default tiles, the dK/dV sweep first, then dQ with the best dK/dV choice. Every
configuration is compiled first in a pool of processes (Triton's on-disk cache then makes the timing
process's compile a load), then timed with triton.testing.do_bench (median, CUDA events). Each one's
output and gradients are compared with the default configuration's (relative L2 norm): a tile choice
that compiles into a wrong kernel shows as a large difference, and is never chosen.

Writes one JSON line per configuration (as it is timed, so a run cut short keeps what it measured), and
the best BlockConfig as JSON that benchmarks/bench_attention.py reads from RLPARITY_TRITON_BLOCKS.
"""

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import multiprocessing
import sys
import time

import torch

from rlparity.attention import triton_sink
from rlparity.attention.cases import timing_inputs
from rlparity.attention.contract import trusted_values
from rlparity.attention.flops import attention_flops, matmul_peak_tflops

DEVICE = torch.device("cuda")
SHAPE = dict(heads_q=64, heads_kv=8, head_dim=64)
DTYPE = torch.bfloat16
# A tile choice whose outputs differ from the default's by more than this (relative L2 norm) computed a
# different function: both round P and dS to bfloat16 (relative error 2^-8 = 3.9e-3 each) and accumulate
# in float32 in different orders, which moves a relative norm by ~1e-3 (METHOD: bf16 operands land
# between 1e-3 and 1e-2); a wrong mask or a dropped block moves it by O(1).
SAME_FUNCTION_REL_NORM = 2e-2
FWD_TILES = [(m, n, w, s) for m, n, w, s in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))
             if not (m == 64 and w == 8) and not (n == 32 and m == 64)]
DKDV_TILES = [(m, n, w, s) for m, n, w, s in itertools.product((32, 64), (64, 128), (4, 8), (2, 3))]
DQ_TILES = [(m, n) for m, n in itertools.product((64, 128), (32, 64))]


def _inputs(seq, device, with_grad):
    return timing_inputs(seq, **SHAPE, dtype=DTYPE, device=device, with_grad=with_grad)


def _step(tensors, dout, config, window, backward):
    def run():
        with trusted_values():  # no host synchronisation inside the timed call; _inputs are finite by construction
            out, lse = triton_sink.attend(*tensors, causal=True, window=window, config=config)
        if not backward:
            return (out, lse)
        return (out, *torch.autograd.grad(out, tensors, dout))

    return run


def _rel_norm(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _candidates(default: triton_sink.BlockConfig, part: str, bwd_base=None):
    if part == "fwd":
        return [dataclasses.replace(default, fwd_m=m, fwd_n=n, fwd_warps=w, fwd_stages=s) for m, n, w, s in FWD_TILES]
    if part == "dkdv":
        return [dataclasses.replace(default, dkdv_m=m, dkdv_n=n, bwd_warps=w, bwd_stages=s)
                for m, n, w, s in DKDV_TILES]
    return [dataclasses.replace(bwd_base, dq_m=m, dq_n=n) for m, n in DQ_TILES]


def _warm(config_dict, seq, window, backward):
    """Compile one configuration (in a pool process): Triton caches the binaries on disk."""
    try:
        tensors, dout = _inputs(seq, DEVICE, backward)
        _step(tensors, dout, triton_sink.BlockConfig(**config_dict), window, backward)()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return None
    except Exception as exc:  # a tile that does not fit is a result, reported by the timing pass
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _precompile(configs, seq, window, backward, workers):
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        list(pool.map(_warm, [dataclasses.asdict(c) for c in configs], itertools.repeat(seq),
                      itertools.repeat(window), itertools.repeat(backward)))


def _median_ms(run) -> float:
    import triton.testing

    return triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")


def _time_all(configs, part, seq, window, backward, reference, out_file, peak):
    tensors, dout = _inputs(seq, DEVICE, backward)
    flops = attention_flops(1, SHAPE["heads_q"], seq, seq, SHAPE["head_dim"], causal=True, window=window,
                            backward=backward)
    rows = []
    for config in configs:
        row = {"part": part, "seq": seq, "window": window, "config": dataclasses.asdict(config)}
        try:
            run = _step(tensors, dout, config, window, backward)
            result = run()
            row["max_rel_norm_vs_default"] = max(_rel_norm(a, b) for a, b in zip(result, reference))
            row["ms"] = _median_ms(run)
            row["tflops"] = flops / (row["ms"] / 1e3) / 1e12
            row["pct_of_matmul_peak"] = 100 * row["tflops"] / peak
            row["valid"] = row["max_rel_norm_vs_default"] <= SAME_FUNCTION_REL_NORM
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            row["valid"] = False
        rows.append(row)
        out_file.write(json.dumps(row) + "\n")
        out_file.flush()
        cfg = row["config"]
        tiles = {"fwd": ("fwd_m", "fwd_n", "fwd_warps", "fwd_stages"),
                 "dkdv": ("dkdv_m", "dkdv_n", "bwd_warps", "bwd_stages"), "dq": ("dq_m", "dq_n")}[part]
        print(f"{part:5s} {'/'.join(str(cfg[t]) for t in tiles):16s} "
              + (f"{row['ms']:8.3f} ms {row['tflops']:6.1f} TFLOP/s {row['pct_of_matmul_peak']:5.1f}% "
                 f"diff {row['max_rel_norm_vs_default']:.1e}" if "ms" in row else row["error"]), flush=True)
    valid = [r for r in rows if r.get("valid")]
    return min(valid, key=lambda r: r["ms"]) if valid else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--window", type=int, default=None, help="tune for a sliding window instead of full causal")
    parser.add_argument("--workers", type=int, default=12, help="processes that compile configurations in parallel")
    parser.add_argument("--out", default="triton-tuning.jsonl")
    parser.add_argument("--best", default="triton-best-config.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_triton_blocks: needs a CUDA device", file=sys.stderr)
        return 2
    default = triton_sink.block_config(DEVICE, SHAPE["head_dim"], DTYPE)
    peak = matmul_peak_tflops()
    print(f"{torch.cuda.get_device_name()}: bf16 matmul peak {peak:.0f} TFLOP/s; default {default}", flush=True)
    best = default
    with open(args.out, "a") as out_file:
        for part, backward in (("fwd", False), ("dkdv", True), ("dq", True)):
            started = time.time()
            tensors, dout = _inputs(args.seq, DEVICE, backward)
            reference = _step(tensors, dout, default, args.window, backward)()
            configs = _candidates(default, part, bwd_base=best)
            _precompile(configs, args.seq, args.window, backward, args.workers)
            winner = _time_all(configs, part, args.seq, args.window, backward, reference, out_file, peak)
            print(f"{part}: {len(configs)} configurations in {time.time() - started:.0f} s", flush=True)
            if winner is None:
                print(f"{part}: no configuration ran and matched the default; keeping the default", flush=True)
                continue
            fields = {"fwd": ("fwd_m", "fwd_n", "fwd_warps", "fwd_stages"),
                      "dkdv": ("dkdv_m", "dkdv_n", "bwd_warps", "bwd_stages"), "dq": ("dq_m", "dq_n")}[part]
            best = dataclasses.replace(best, **{f: winner["config"][f] for f in fields})
            with open(args.best, "w") as handle:  # rewritten after each part: a cut-short run keeps its best
                json.dump({"device": torch.cuda.get_device_name(), "seq": args.seq, "window": args.window,
                           "matmul_peak_tflops": peak, "config": dataclasses.asdict(best)}, handle, indent=1)
    print(f"best: {best}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
