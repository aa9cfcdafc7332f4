"""The bundled `tiny` model: it behaves like a trained model, and hf float32 matches the float64 reference.

Slow on first use: building `tiny` trains it for a few minutes on one core; it is cached after that
(`python -m rlparity.models build tiny`). Measured on the recorded build (fixtures/models/hashes.json),
16 held-out sequences of 128 tokens with 32-token prompts (1536 response tokens): hf float32 max
|dlogp| 5.7e-6 (mean 8.1e-7) against the float64 reference; the naive float32 reference reaches 6.2e-6,
so the allowed error is 2 x 6.2e-6 + 1.9e-6 = 1.4e-5. (hf bfloat16: max 0.20, mean 6.8e-3.)
"""

import pytest
import torch

from rlparity.engines import open_engine
from rlparity.metrics import K_FORWARD, max_abs_error, rounding_floor, tolerance
from rlparity.models import Language, ensure_model, open_checkpoint
from rlparity.models.stats import model_statistics

pytestmark = pytest.mark.slow

# Untrained, the model's next-token distribution is near uniform over 1024 tokens (max prob ~0.001);
# the recorded build reaches 0.56 on held-out text. Half of that still says "trained".
MIN_MEAN_MAX_PROB = 0.25
# transformers zero-initialises the router, which makes every top-k margin exactly 0; the recorded build
# has median margins of 0.17-0.31 per layer. A tenth of the smallest still rules out untrained routers.
MIN_MEDIAN_ROUTER_MARGIN = 0.017
# Sinks start at N(0, 1); a layer whose sinks collapsed to one value would show a spread near 0.
MIN_SINK_SPREAD = 0.1
# The recorded build puts 0.02-0.29 of the attention mass on the sinks, depending on the layer: the
# sinks must matter somewhere, or a backend that drops them would go unnoticed.
MIN_LARGEST_SINK_MASS = 0.05
HELD_OUT_SEQUENCES, HELD_OUT_LEN, PROMPT_LEN = 16, 128, 32


@pytest.fixture(scope="module")
def tiny():
    return ensure_model("tiny")


@pytest.fixture(scope="module")
def held_out(tiny):
    checkpoint = open_checkpoint(tiny)
    language = Language(checkpoint.config["vocab_size"], seed=0)
    return next(language.batches(seed=7, batch=HELD_OUT_SEQUENCES, seq_len=HELD_OUT_LEN))


def test_tiny_behaves_like_a_trained_model(tiny, held_out):
    checkpoint = open_checkpoint(tiny)
    stats = model_statistics(checkpoint.config, checkpoint.weights(torch.float64), torch.tensor(held_out))
    assert stats["mean_max_prob"] >= MIN_MEAN_MAX_PROB
    for layer in stats["layers"]:
        assert layer["router_margin"]["p50"] >= MIN_MEDIAN_ROUTER_MARGIN
        assert torch.tensor(layer["sinks"]).std() >= MIN_SINK_SPREAD
    assert max(layer["sink_attention_mass"] for layer in stats["layers"]) >= MIN_LARGEST_SINK_MASS


def test_tiny_hf_float32_matches_float64_reference(tiny, held_out):
    prompts = [PROMPT_LEN] * len(held_out)
    exact = torch.cat(open_engine("reference", tiny).logprobs(held_out, prompts))
    naive = torch.cat(open_engine("reference", tiny, dtype=torch.float32).logprobs(held_out, prompts))
    candidate = torch.cat(open_engine("hf", tiny, dtype="float32").logprobs(held_out, prompts))
    naive_error, candidate_error = max_abs_error(naive, exact), max_abs_error(candidate, exact)
    allowed = tolerance(naive_error, rounding_floor(exact, torch.float32), K_FORWARD)
    assert candidate_error <= allowed, f"max |dlogp| {candidate_error:.2e} > {allowed:.2e} (naive {naive_error:.2e})"
