"""Memory and time of the fixed components against the paths they replace, forward + backward.

    pytest benchmarks/bench_memory.py --benchmark-json benchmarks/results/memory-<device>.json

log-probs: rlparity.ops.logprobs_and_entropy (chunked) against the naive full-vocabulary pass.
experts: rlparity.ops.grouped_experts against transformers' GPT-OSS experts (eager loop, grouped_mm,
batched_mm) and the dense all-experts path (transformers' eval path before 5.0) on the same weights
and routing.

CUDA: GPT-OSS-20B shapes (hidden 2880, vocab 201,088; 32 experts of 2880, top-4), bfloat16; the peak is
the allocator's above what was allocated before (rlparity.memory.cuda). CPU: small shapes, one round,
tracked live tensors (rlparity.memory.tracker) in the timed round itself. Each record carries the FLOPs
counted from the shapes, the peak bytes and the ratio of its peak to the naive path's in the same
session. Nothing is asserted about time; a path that runs out of memory is skipped with the reason.
"""

import pytest
import torch

from rlparity.memory import TrackedMeter
from rlparity.ops import grouped_experts, logprobs_and_entropy, naive_logprobs_and_entropy
from rlparity.ops.hf import DENSE_EXPERTS_IMPLEMENTATION, EXPERTS_IMPLEMENTATION, register_experts
from rlparity.results import environment_fingerprint

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
DTYPE = torch.bfloat16
CUDA_ROUNDS, CUDA_WARMUP_ROUNDS = 5, 2
LOGPROBS = (dict(tokens=8192, hidden=2880, vocab=201088, chunk=1024) if ON_CUDA
            else dict(tokens=512, hidden=128, vocab=32768, chunk=128))
EXPERTS = (dict(tokens=4096, hidden=2880, intermediate=2880, experts=32, top_k=4) if ON_CUDA
           else dict(tokens=256, hidden=128, intermediate=128, experts=32, top_k=4))
WEIGHT_STD = 0.02  # transformers' GPT-OSS initializer_range

_PEAKS = {}  # (benchmark, variant) -> peak bytes, for the ratios against the naive path


def _peak_and_benchmark(benchmark, run):
    if ON_CUDA:
        from rlparity.memory.cuda import CudaMeter

        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        with CudaMeter(DEVICE) as meter:
            run()
        benchmark.pedantic(run, rounds=CUDA_ROUNDS, warmup_rounds=CUDA_WARMUP_ROUNDS, iterations=1)
        return meter.report().peak - baseline
    peaks = []

    def tracked():
        with TrackedMeter() as meter:
            run()
        peaks.append(meter.report().peak)

    benchmark.pedantic(tracked, rounds=1, warmup_rounds=0, iterations=1)
    return peaks[0]


def _record(benchmark, name, variant, naive_variant, peak, flops, shape):
    _PEAKS[(name, variant)] = peak
    naive = _PEAKS.get((name, naive_variant))
    benchmark.extra_info.update({
        "kind": name, "variant": variant, "device": str(DEVICE), "dtype": "bf16", **shape, "flops": flops,
        "tflops": flops / benchmark.stats.stats.median / 1e12, "peak_memory_bytes": peak,
        "peak_ratio_vs_naive": None if naive is None else peak / naive, "environment": environment_fingerprint(),
    })


def _sync():
    if ON_CUDA:
        torch.cuda.synchronize()


# naive first: the fixed path's ratio divides by its peak
@pytest.mark.parametrize("variant", ["naive", "chunked"])
def test_logprobs(benchmark, variant):
    s = LOGPROBS
    g = torch.Generator(device=DEVICE).manual_seed(0)
    hidden = torch.randn(s["tokens"], s["hidden"], generator=g, device=DEVICE, dtype=DTYPE, requires_grad=True)
    weight = (torch.randn(s["vocab"], s["hidden"], generator=g, device=DEVICE, dtype=DTYPE)
              / s["hidden"] ** 0.5).requires_grad_()
    targets = torch.randint(0, s["vocab"], (s["tokens"],), generator=g, device=DEVICE)

    def run():
        if variant == "naive":
            logp, entropy = naive_logprobs_and_entropy(hidden, weight, targets)
        else:
            logp, entropy = logprobs_and_entropy(hidden, weight, targets, s["chunk"])
        torch.autograd.grad(logp.sum() + entropy.sum(), (hidden, weight))
        _sync()

    try:
        peak = _peak_and_benchmark(benchmark, run)
    except torch.OutOfMemoryError as exc:
        pytest.skip(f"{variant} log-probs ran out of memory: {str(exc).splitlines()[0]}")
    # forward: the logits (2 T V H), recomputed in the chunked backward; backward: dH and dW (4 T V H)
    matmuls = 3 if variant == "naive" else 4
    _record(benchmark, "logprobs", variant, "naive", peak, matmuls * 2 * s["tokens"] * s["vocab"] * s["hidden"], s)


@pytest.mark.parametrize("variant", ["eager", "batched_mm", DENSE_EXPERTS_IMPLEMENTATION, "grouped_mm",
                                     EXPERTS_IMPLEMENTATION])
def test_experts(benchmark, variant):
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    s = EXPERTS
    register_experts()
    config = GptOssConfig(hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                          num_local_experts=s["experts"], num_experts_per_tok=s["top_k"])
    config._experts_implementation = variant
    with torch.device(DEVICE):
        experts = GptOssExperts(config).to(DTYPE)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    with torch.no_grad():
        for parameter in experts.parameters():
            parameter.normal_(std=WEIGHT_STD, generator=g)
    x = torch.randn(s["tokens"], s["hidden"], generator=g, device=DEVICE, dtype=DTYPE, requires_grad=True)
    scores = torch.randn(s["tokens"], s["experts"], generator=g, device=DEVICE)
    top, ids = scores.topk(s["top_k"], dim=-1)
    weights = torch.softmax(top, dim=-1).to(DTYPE)

    def run():
        if variant == EXPERTS_IMPLEMENTATION:
            out = grouped_experts(x, ids, weights, experts.gate_up_proj, experts.gate_up_proj_bias, experts.down_proj,
                                  experts.down_proj_bias, experts.alpha, experts.limit)
        else:
            out = experts(x, ids, weights)
        torch.autograd.grad(out.sum(), (x, *experts.parameters()))
        _sync()

    try:
        peak = _peak_and_benchmark(benchmark, run)
    except torch.OutOfMemoryError as exc:
        pytest.skip(f"{variant} experts ran out of memory: {str(exc).splitlines()[0]}")
    except RuntimeError as exc:  # grouped_mm's kernel refuses some devices and strides
        pytest.skip(f"{variant} experts cannot run here: {str(exc).splitlines()[0]}")
    # gate/up (2I) and down (I): 3 H I multiply-adds per routed pair, three times for forward and backward;
    # the dense path computes every (token, expert) pair
    pairs = s["tokens"] * (s["experts"] if variant == DENSE_EXPERTS_IMPLEMENTATION else s["top_k"])
    flops = 3 * 2 * pairs * 3 * s["hidden"] * s["intermediate"]
    _record(benchmark, "experts", variant, "eager", peak, flops, s)


@pytest.mark.parametrize("model", ["gpt-oss-20b", "gpt-oss-120b"])
def test_phase_table(benchmark, model, capsys):
    """`rlparity memory` at real size (issue 8 wants the 20B and 120B tables in under a minute on CPU)."""
    import argparse

    from rlparity.memory.cli import add_memory_parser, memory_command

    parser = argparse.ArgumentParser()
    add_memory_parser(parser.add_subparsers())
    argv = ["memory", "--model", model, "--tokens", "24576", "--world", "16", "--attention", "triton"]
    args = parser.parse_args(argv)
    benchmark.pedantic(memory_command, args=(args,), rounds=1, warmup_rounds=0, iterations=1)
    benchmark.extra_info.update({"model": model, "tokens": 24576, "world": 16, "attention": "triton"})
    capsys.readouterr()
