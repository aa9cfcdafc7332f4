"""Router replay's overhead: one training step (forward + backward) of the tiny GPT-OSS with the model's
own routing, with RouterReplay forcing recorded routes, and with RouterCapture recording them.

    pytest benchmarks/bench_routing.py --benchmark-only --benchmark-json benchmarks/results/routing.json

The replayed routes are each token's runner-up set (rlparity.routing.checks.runner_up_routes), so the
replay changes every token's experts and cannot be skipped as a no-op. Each record's extra_info has the
shapes, the bytes of forced ids the replay holds, and its time relative to the plain step measured in the
same session (the number to compare across runs). Nothing is asserted about time.
"""

import statistics
import time

import pytest
import torch

from rlparity.engines import open_engine
from rlparity.models import Language, ensure_model
from rlparity.results import environment_fingerprint
from rlparity.routing.capture import RouterCapture
from rlparity.routing.checks import runner_up_routes
from rlparity.routing.forward import pad_batch, run_pass
from rlparity.routing.replay import RouterReplay

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
# CPU: a few rounds of a small batch (about a second each on 2 cores); GPU: a batch large enough to time.
BATCH, SEQ = (16, 1024) if ON_CUDA else (4, 128)
ROUNDS, WARMUP_ROUNDS = (10, 2) if ON_CUDA else (5, 1)
# One thread on CPU: on a shared 2-core machine multi-threaded matmuls measure the neighbours' load.
CPU_THREADS = 1
DTYPES = ("float32", "bfloat16")
VARIANTS = ("plain", "replay", "capture")  # plain first: the others are reported relative to it

_MEDIANS = {}  # (dtype, variant) -> median seconds, for the ratios to the plain step


@pytest.fixture(scope="module", autouse=True)
def cpu_threads():
    saved = torch.get_num_threads()
    if not ON_CUDA:
        torch.set_num_threads(CPU_THREADS)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module", params=DTYPES)
def setup(request):
    checkpoint = ensure_model("tiny")
    engine = open_engine("hf", checkpoint, dtype=request.param)
    engine.model.to(DEVICE)
    language = Language(engine.config["vocab_size"], seed=0)
    lengths = [SEQ - 8 * row for row in range(BATCH)]  # unequal: the batch carries padding, as in RL
    block = next(language.batches(seed=11, batch=BATCH, seq_len=SEQ))
    sequences = [row[:length] for row, length in zip(block, lengths)]
    own = run_pass(engine.model, sequences, engine.pad_id, train=False, grad=False)
    return request.param, engine, sequences, runner_up_routes(own.routing)


def _synchronize():
    if ON_CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("variant", VARIANTS)
def test_replay_overhead(benchmark, setup, variant):
    dtype, engine, sequences, routes = setup
    model = engine.model
    ids, mask = (tensor.to(DEVICE) for tensor in pad_batch(sequences, engine.pad_id))
    lengths = [len(sequence) for sequence in sequences]

    def step():
        model.train()
        if variant == "replay":
            context = RouterReplay(model, routes, lengths)
        elif variant == "capture":
            context = RouterCapture(model)
        else:
            context = torch.enable_grad()
        with context:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logits.float().logsumexp(dim=-1).sum().backward()
        model.zero_grad(set_to_none=True)
        _synchronize()

    started = time.perf_counter()
    RouterReplay(model, routes, lengths)  # checking the routes and laying them out, once per batch
    replay_setup_s = time.perf_counter() - started
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
    model.eval()
    median = statistics.median(benchmark.stats.stats.data)
    _MEDIANS[(dtype, variant)] = median
    plain = _MEDIANS.get((dtype, "plain"))
    top_k = model.config.num_experts_per_tok
    benchmark.extra_info.update({
        "variant": variant, "dtype": dtype, "batch": BATCH, "seq": SEQ, "tokens": sum(lengths),
        "layers": model.config.num_hidden_layers, "experts": model.config.num_local_experts, "top_k": top_k,
        "forced_id_bytes": model.config.num_hidden_layers * BATCH * SEQ * top_k * 8,
        "replay_setup_s": replay_setup_s, "median_s": median,
        "ratio_to_plain": None if plain is None else median / plain,
        "device": str(DEVICE), "cpu_threads": None if ON_CUDA else CPU_THREADS,
        "environment": environment_fingerprint(),
    })
