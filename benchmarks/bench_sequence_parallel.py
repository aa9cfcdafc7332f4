"""Sequence-parallel sink attention at 8k tokens: forward+backward time and peak memory per rank,
Ulysses and ring on 2 and 4 ranks against the inner kernel alone on one rank.

gloo on CPU (few, narrow heads so that a round takes seconds on 2 cores), nccl on GPUs when there is
one per rank. The numbers go to pytest-benchmark's JSON through extra_info; nothing here fails on a
time. Run: pytest benchmarks/bench_sequence_parallel.py --benchmark-only --benchmark-json=sp.json
"""

import time

import pytest
import torch
import torch.distributed as dist

from rlparity.attention import get_backend
from rlparity.attention.contract import trusted_values
from rlparity.attention.flops import attention_flops
from rlparity.memory.tracker import TrackedMeter
from rlparity.parallel.launch import WorkerGroup, rank_device
from rlparity.parallel.ring import attend as ring_attend
from rlparity.parallel.ulysses import attend as ulysses_attend
from rlparity.results import environment_fingerprint

pytestmark = [pytest.mark.multi_process, pytest.mark.slow]

SEQ = 8192
ON_GPU = torch.cuda.is_available()
# GPU: GPT-OSS-20B's attention (64 query heads on 8 kv heads of 64); CPU: 4 on 2 of 16, about 6 s per
# forward+backward on one core with the chunked kernel.
HEADS_Q, HEADS_KV, HEAD_DIM = (64, 8, 64) if ON_GPU else (4, 2, 16)
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
INNER = "chunked"
ROUNDS = 1 if not ON_GPU else 3
WARMUP_SEQ = 256
# One thread per rank on CPU: on a shared 2-core machine multi-threaded matmuls slow down many-fold
# under contention, which would measure the neighbours instead of the schemes.
CPU_THREADS_PER_RANK = 1
VARIANTS = [("single", 1), ("ulysses", 2), ("ring", 2), ("ulysses", 4), ("ring", 4)]
SCHEMES = {"ulysses": ulysses_attend, "ring": ring_attend}


class PeakMemory:
    """Peak bytes this rank allocates in a step above its inputs: the CUDA allocator's peak on a GPU,
    live tensor storage tracked op by op on CPU (rlparity.memory's TrackedMeter; process RSS would
    mix in the allocator's cache and torch's own code pages)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "cpu live tensor bytes (TrackedMeter)"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.meter = TrackedMeter(self.device).__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.meter.__exit__(*exc)
            self.peak = self.meter.report().peak
        return False


def _forward_backward(scheme: str, seq_local: int, gen: torch.Generator, device: torch.device) -> tuple[float, int]:
    def shard(heads, grad=True):
        return torch.randn(1, heads, seq_local, HEAD_DIM, generator=gen).to(device, DTYPE).requires_grad_(grad)

    q, k, v = shard(HEADS_Q), shard(HEADS_KV), shard(HEADS_KV)
    sinks = torch.randn(HEADS_Q, generator=gen).to(device, DTYPE).requires_grad_()
    dout = shard(HEADS_Q, grad=False)
    dist.barrier()
    # seeded normal inputs; the contract's value checks would add a host synchronisation to every block
    with PeakMemory(device) as memory, trusted_values():
        start = time.perf_counter()
        if scheme == "single":
            out, lse = get_backend(INNER).attend(q, k, v, sinks, causal=True)
        else:
            out, lse = SCHEMES[scheme](q, k, v, sinks, causal=True, inner=INNER)
        torch.autograd.backward((out, lse), (dout, torch.ones_like(lse)))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    peak = memory.peak
    dist.barrier()
    return seconds, peak


def step_on_rank(scheme: str, seed: int = 0) -> dict:
    """One forward+backward of this rank's shard of SEQ tokens; its time and peak memory."""
    world, rank, device = dist.get_world_size(), dist.get_rank(), rank_device()
    if device.type == "cpu":
        torch.set_num_threads(CPU_THREADS_PER_RANK)
    gen = torch.Generator().manual_seed(seed + rank)
    _forward_backward(scheme, WARMUP_SEQ // world, gen, device)  # first calls pay one-off setup
    seconds, peak = _forward_backward(scheme, SEQ // world, gen, device)
    return {"rank": rank, "seconds": seconds, "peak_bytes": peak, "peak_memory_kind": PeakMemory(device).kind}


@pytest.fixture(scope="module")
def groups():
    started = {}

    def get(world):
        if world not in started:
            backend = "nccl" if torch.cuda.device_count() >= world else "gloo"
            if ON_GPU and backend == "gloo":
                pytest.skip(f"{world} ranks need {world} GPUs for nccl; {torch.cuda.device_count()} visible")
            started[world] = WorkerGroup(world, backend=backend)
        return started[world]

    yield get
    for group in started.values():
        group.close()


@pytest.mark.parametrize("scheme, world", VARIANTS, ids=[f"{s}-x{w}" for s, w in VARIANTS])
def test_sequence_parallel_step(benchmark, groups, scheme, world):
    group = groups(world)
    ranks = benchmark.pedantic(group.run, args=(step_on_rank, scheme), rounds=ROUNDS, iterations=1)
    slowest = max(r["seconds"] for r in ranks)
    flops = attention_flops(1, HEADS_Q, SEQ, SEQ, HEAD_DIM, causal=True, backward=True)
    benchmark.extra_info.update({
        "scheme": scheme, "world_size": world, "inner": INNER, "process_group": group.backend,
        "seq": SEQ, "heads_q": HEADS_Q, "heads_kv": HEADS_KV, "head_dim": HEAD_DIM, "dtype": str(DTYPE),
        "causal": True, "per_rank_seconds": [r["seconds"] for r in ranks],
        "per_rank_peak_bytes": [r["peak_bytes"] for r in ranks], "peak_memory_kind": ranks[0]["peak_memory_kind"],
        "step_seconds": slowest, "flops_forward_backward": flops, "gflops_per_second": flops / slowest / 1e9,
        "device": environment_fingerprint()["device"], "cpu_threads_per_rank": CPU_THREADS_PER_RANK,
    })
