"""Raw vs processed log-probs: temperature, top-k and top-p as vLLM's sampler applies them."""

import math

import pytest
import torch

from rlparity.engines import Sampling
from rlparity.engines.sampling import sampling_logprobs, token_logprobs
from rlparity.errors import RlparityError

PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
LOGITS = PROBS.log()


def kept(sampling: Sampling) -> list[bool]:
    return torch.isfinite(sampling_logprobs(LOGITS, sampling))[0].tolist()


def test_raw_ignores_sampling_settings():
    raw = sampling_logprobs(LOGITS, Sampling(temperature=0.5, top_k=1, top_p=0.1, logprobs="raw"))
    torch.testing.assert_close(raw, LOGITS)


def test_temperature_divides_logits():
    processed = sampling_logprobs(LOGITS, Sampling(temperature=0.7, logprobs="processed"))
    torch.testing.assert_close(processed, torch.log_softmax(LOGITS / 0.7, dim=-1))


@pytest.mark.parametrize(("top_p", "expected"), [(0.75, [True, True, False, False]), (0.85, [True, True, True, False]),
                                                 (0.1, [True, False, False, False]), (1.0, [True] * 4)])
def test_top_p_keeps_the_smallest_top_set_reaching_p(top_p, expected):
    assert kept(Sampling(top_p=top_p, logprobs="processed")) == expected


def test_top_k_keeps_ties_with_the_kth():
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0]])
    assert torch.isfinite(sampling_logprobs(logits, Sampling(top_k=2, logprobs="processed")))[0].tolist() == [
        True, True, True, False]


def test_top_k_shifts_kept_logprobs_by_minus_log_kept_mass():
    """The closed form a semantics preflight predicts: processed = raw - log S, S the kept probability mass."""
    processed = sampling_logprobs(LOGITS, Sampling(top_k=2, logprobs="processed"))
    torch.testing.assert_close(processed[0, :2], LOGITS[0, :2] - math.log(0.8))


def test_token_logprobs_align_logits_t_minus_1_with_token_t():
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tokens = torch.tensor([3, 1, 4, 1, 5])
    out = token_logprobs(logits, tokens, prompt_len=2, sampling=Sampling())
    expected = torch.stack([torch.log_softmax(logits[t - 1], -1)[tokens[t]] for t in range(2, 5)])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"logprobs": "logits"}, "logprobs must be one of"),
])
def test_invalid_sampling_is_named(kwargs, message):
    with pytest.raises(RlparityError, match=message):
        Sampling(**kwargs)


def test_engine_processed_logprobs_are_temperature_scaled(reference_micro):
    sequence = [1, 30, 31, 40, 41, 50, 2]
    logits = reference_micro.hidden_states(sequence)["logits"]
    processed = reference_micro.logprobs([sequence], [3], Sampling(temperature=0.7, logprobs="processed"))[0]
    expected = torch.log_softmax(logits[2:-1] / 0.7, dim=-1).gather(-1, torch.tensor(sequence[3:])[:, None])[:, 0]
    torch.testing.assert_close(processed, expected)
