"""Sink-attention benchmarks: forward and forward+backward of every available backend.

    pytest benchmarks/bench_attention.py --benchmark-json benchmarks/results/attention-<device>.json

CUDA: GPT-OSS shapes (64 query heads, 8 KV heads, head_dim 64, bfloat16), full causal and the
128-token sliding window, sequence 1k/4k/8k/16k, batch 1. Each record's extra_info holds the FLOPs
(counted exactly over the visible (query, key) pairs, rlparity.attention.flops), TFLOP/s at the median
GPU time (CUDA events around back-to-back calls, `tflops`) and at pytest-benchmark's wall-clock median
(each round synchronised, host overhead included, `tflops_wall_clock`), the first as a percentage of the
bfloat16 matmul peak measured in the same session (best of 20 by CUDA events), and the peak memory
the call allocates above its inputs (torch.cuda.max_memory_allocated). FlexAttention is timed compiled
(uncompiled it falls back to materialising the scores), its block mask built once per cell outside the
timed call as a model builds it once per batch for all layers (results before 2026-11-26 14:30 UTC, which
have no `flex_block_mask` field, timed the mask's construction in every call); the float64 `reference`
is not a kernel and is not benchmarked.

CPU: time is not the point (the Triton kernel runs in Triton's interpreter). Recorded is the peak memory
of chunked and triton against eager at seq 4k, full causal, float32, with 2 query heads and 1 KV head
(per-head memory scales alike), as `memory_ratio_vs_eager`. CPU memory is the peak of live tensor
storage allocated inside the call, counted by rlparity.memory's TorchDispatchMode meter: process RSS
would mix in allocator caching and the interpreter's own numpy temporaries (which stand for GPU
registers, not memory), and tracemalloc does not see torch's allocations at all. Each CPU cell runs
once, metered and timed together.

RLPARITY_BENCH_LOG=FILE also appends each cell's numbers to FILE as one JSON line as soon as it is measured
(pytest-benchmark writes its JSON only when the session ends normally; a run cut short keeps the log).
RLPARITY_TRITON_BLOCKS=FILE runs the triton backend on CUDA with the BlockConfig in FILE (the JSON that
benchmarks/tune_triton_blocks.py writes); each record names the tiles it ran with.

A benchmark records numbers and never fails on them; a backend that cannot run a cell (probe reason,
out of memory) is skipped with the reason.
"""

import dataclasses
import functools
import gc
import json
import os

import pytest
import torch

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the Triton kernels are defined

from rlparity.attention import flex, registered_backends, triton_sink  # noqa: E402
from rlparity.attention.cases import timing_inputs  # noqa: E402
from rlparity.attention.contract import check_inputs, trusted_values  # noqa: E402
from rlparity.attention.flops import attention_flops  # noqa: E402
from rlparity.attention.flops import matmul_peak_tflops as matmul_peak  # noqa: E402
from rlparity.attention.registry import AVAILABLE, Backend  # noqa: E402
from rlparity.memory.meter import meter_for  # noqa: E402
from rlparity.results import environment_fingerprint  # noqa: E402

DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
EXCLUDED = {"reference": "the float64 ground truth, not a candidate kernel"}

# GPT-OSS attention (gpt-oss-20b and -120b): 64 query heads, 8 KV heads, head_dim 64, window 128.
GPT_OSS = dict(heads_q=64, heads_kv=8, head_dim=64)
GPT_OSS_WINDOW = 128
CUDA_SEQS = (1024, 4096, 8192, 16384)
CUDA_WINDOWS = (None, GPT_OSS_WINDOW)
CUDA_DTYPE = torch.bfloat16
CUDA_ROUNDS, CUDA_WARMUP_ROUNDS = 10, 3
MATMUL_PEAK_SIZE = 8192  # square bf16 GEMM, large enough to saturate an H100's tensor cores
MATMUL_PEAK_REPEATS = 20

CPU_SHAPE = dict(heads_q=2, heads_kv=1, head_dim=64)
CPU_SEQ = 4096
CPU_BACKENDS = ("eager", "chunked", "triton")  # eager first: the others' ratios divide by its peak
CPU_DTYPE = torch.float32
# Larger tiles than the interpreter's default: each tile costs the interpreter a fixed Python overhead,
# so 64 x 64 tiles cut the CPU run to seconds; tile sizes do not change what the kernel allocates.
CPU_TRITON_CONFIG = triton_sink.BlockConfig(fwd_m=64, fwd_n=64, dkdv_m=64, dkdv_n=64, dq_m=64, dq_n=64,
                                            preprocess_m=64)
MODES = ("fwd", "fwd_bwd")

_PEAK_MEMORY = {}  # (seq, window, mode, backend) -> bytes, for the ratios against eager


def _candidates() -> list[Backend]:
    backends = {b.name: b for b in registered_backends() if b.name not in EXCLUDED}
    backends.setdefault("triton", Backend("triton", "rlparity.attention.triton_sink:attend",
                                          "rlparity's Triton kernel", probe=triton_sink.probe))
    if not ON_CUDA:
        return [backends[name] for name in CPU_BACKENDS if name in backends]
    return list(backends.values())


def _cells():
    if ON_CUDA:
        return [(seq, window) for seq in CUDA_SEQS for window in CUDA_WINDOWS]
    return [(CPU_SEQ, None)]


def _cell_id(cell):
    seq, window = cell
    return f"seq{seq // 1024}k-{'causal' if window is None else f'window{window}'}"


def _triton_config(head_dim, dtype):
    if not ON_CUDA:
        return CPU_TRITON_CONFIG
    if path := os.environ.get("RLPARITY_TRITON_BLOCKS"):
        with open(path) as handle:
            return triton_sink.BlockConfig(**json.load(handle)["config"])
    return triton_sink.block_config(DEVICE, head_dim, dtype)


def _function(backend: Backend, shape, dtype, seq, window):
    if backend.name == "triton":
        return functools.partial(triton_sink.attend, config=_triton_config(shape["head_dim"], dtype))
    if backend.name == "flex" and ON_CUDA:
        return _compiled_flex(seq, window)
    return backend.attend


def _compiled_flex(seq, window):
    """FlexAttention as training code runs it: the block mask built once, outside the timed call (a model
    builds it once per batch and all its layers reuse it), and flex_attention with the sink folded in
    compiled. One static compile per cell, from a clean slate: after a shape change dynamo recompiles with
    dynamic shapes, and that flex graph failed to lower in torch 2.11 on an H100 (InductorError
    "'ShapeAsConstantBuffer' object has no attribute 'dtype'", window cells and seq 16k)."""
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.reset()
    mask = flex.block_mask(seq, seq, causal=True, window=window, device=DEVICE)
    compiled = torch.compile(functools.partial(flex.attend_masked, flex_attention), dynamic=False)
    return lambda q, k, v, sinks, causal, window: compiled(q, k, v, sinks, mask)


def _step(fn, tensors, dout, window, mode, sync=True):
    """One timed call. The contract's value checks (a host synchronisation each) stay out of it: test_attention
    checks the inputs once before timing."""
    def run():
        with trusted_values():
            if mode == "fwd":
                with torch.no_grad():
                    fn(*tensors, causal=True, window=window)
            else:
                out, _ = fn(*tensors, causal=True, window=window)
                torch.autograd.grad(out, tensors, dout)
        if ON_CUDA and sync:
            torch.cuda.synchronize()

    return run


def _cuda_event_median(run, rounds=CUDA_ROUNDS) -> float:
    """Median seconds of `run` between CUDA events, the host never waiting in between: the GPU's time.

    pytest-benchmark's wall clock adds the host's launch overhead and a synchronisation to every round
    (0.3 ms on a 1.3 ms kernel, seen on an H100), which a training step overlaps with earlier GPU work.
    """
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rounds)]
    for start, stop in events:
        start.record()
        run()
        stop.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(stop) / 1e3 for start, stop in events)
    return times[len(times) // 2]


def _log_cell(benchmark) -> None:
    if path := os.environ.get("RLPARITY_BENCH_LOG"):
        stats = benchmark.stats.stats
        row = {"name": benchmark.name, "median_s": stats.median, "min_s": stats.min, "max_s": stats.max,
               "rounds": stats.rounds, "extra_info": benchmark.extra_info}
        with open(path, "a") as handle:
            handle.write(json.dumps(row) + "\n")


@pytest.fixture(scope="session")
def matmul_peak_tflops():
    """Best bf16 GEMM throughput, measured with CUDA events in this session."""
    return matmul_peak(MATMUL_PEAK_SIZE, MATMUL_PEAK_REPEATS) if ON_CUDA else None


@pytest.mark.gpu
@pytest.mark.skipif(not ON_CUDA, reason="the matmul peak is a CUDA measurement; run on a GPU machine")
def test_matmul_peak(benchmark, matmul_peak_tflops):
    n = MATMUL_PEAK_SIZE
    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)

    def run():
        a @ b
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=CUDA_ROUNDS, warmup_rounds=CUDA_WARMUP_ROUNDS, iterations=1)
    benchmark.extra_info.update({
        "kind": "matmul_peak", "size": n, "dtype": "bf16", "flops": 2 * n**3,
        "tflops_median": 2 * n**3 / benchmark.stats.stats.median / 1e12,
        "tflops_best_cuda_events": matmul_peak_tflops, "environment": environment_fingerprint(),
    })
    _log_cell(benchmark)


def _measure_peak(run) -> int:
    """Peak bytes the call allocates beyond what exists before it (its inputs)."""
    meter = meter_for(DEVICE)
    before = torch.cuda.memory_allocated(DEVICE) if ON_CUDA else 0  # the CPU meter counts only new storage
    with meter:
        run()
    return meter.report().peak - before


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cell", _cells(), ids=_cell_id)
@pytest.mark.parametrize("backend", _candidates(), ids=lambda b: b.name)
def test_attention(benchmark, matmul_peak_tflops, backend, cell, mode):
    seq, window = cell
    reason = backend.availability(DEVICE)
    if reason == AVAILABLE and mode == "fwd_bwd":
        reason = backend.backward_probe(DEVICE)
    if reason != AVAILABLE:
        pytest.skip(reason)
    shape, dtype = (GPT_OSS, CUDA_DTYPE) if ON_CUDA else (CPU_SHAPE, CPU_DTYPE)
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.name} does not support {dtype}")
    if ON_CUDA:  # what earlier cells left (an out-of-memory traceback's tensors) must not count here
        gc.collect()
        torch.cuda.empty_cache()
    tensors, dout = timing_inputs(seq, **shape, dtype=dtype, device=DEVICE, with_grad=mode == "fwd_bwd")
    check_inputs(*tensors, causal=True, window=window, where=backend.name)
    gpu_median = None
    try:
        fn = _function(backend, shape, dtype, seq, window)
        run = _step(fn, tensors, dout, window, mode)
        if ON_CUDA:
            peak = _measure_peak(run)
            benchmark.pedantic(run, rounds=CUDA_ROUNDS, warmup_rounds=CUDA_WARMUP_ROUNDS, iterations=1)
            gpu_median = _cuda_event_median(_step(fn, tensors, dout, window, mode, sync=False))
        else:
            peaks = []
            benchmark.pedantic(lambda: peaks.append(_measure_peak(run)), rounds=1, warmup_rounds=0, iterations=1)
            peak = peaks[0]
    except torch.OutOfMemoryError as exc:
        message = str(exc).splitlines()[0]
        del exc, tensors, dout
        if ON_CUDA:
            gc.collect()
            torch.cuda.empty_cache()
        pytest.skip(f"{backend.name} ran out of memory at seq {seq}: {message}")

    flops = attention_flops(1, shape["heads_q"], seq, seq, shape["head_dim"], causal=True, window=window,
                            backward=mode == "fwd_bwd")
    wall_median = benchmark.stats.stats.median
    info = {
        "backend": backend.name, "mode": mode, "device": str(DEVICE), "dtype": str(dtype).removeprefix("torch."),
        "seq": seq, "window": window, "causal": True, **shape, "flops": flops,
        "tflops_wall_clock": flops / wall_median / 1e12, "peak_memory_bytes": peak,
        "compiled": backend.name == "flex" and ON_CUDA,
        "flex_block_mask": "built once, outside the timed call" if backend.name == "flex" and ON_CUDA else None,
        "triton_config": dataclasses.asdict(_triton_config(shape["head_dim"], dtype)) if backend.name == "triton"
        else None,
        "environment": environment_fingerprint(),
    }
    if gpu_median is not None:
        info["cuda_event_median_s"] = gpu_median
        info["tflops"] = flops / gpu_median / 1e12
    else:
        info["tflops"] = info["tflops_wall_clock"]
        info["note"] = "CPU: time includes memory tracking and the Triton interpreter; compare memory only"
    if matmul_peak_tflops:
        info["matmul_peak_tflops"] = matmul_peak_tflops
        info["pct_of_matmul_peak"] = 100 * info["tflops"] / matmul_peak_tflops
    _PEAK_MEMORY[(seq, window, mode, backend.name)] = peak
    eager_peak = _PEAK_MEMORY.get((seq, window, mode, "eager"))
    if eager_peak and backend.name != "eager":
        info["memory_ratio_vs_eager"] = peak / eager_peak
    benchmark.extra_info.update(info)
    _log_cell(benchmark)
