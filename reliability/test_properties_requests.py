"""Generated engine requests: every request gets a correct answer or a one-line RlparityError naming the argument.

Engines: hf (float32) and the float64 reference on the `micro` model, opened once per session (reliability/conftest);
vLLM's and SGLang's request checks (check_logprobs_request, vLLM's check_sample_request), which run in the caller's
process before anything is sent to the engine, so they are tested without starting one.
Correct: one log-prob per response token, finite and <= 0 for raw log-probs (processed ones are -inf exactly for the
tokens top-k/top-p drop, never NaN), and hf float32 within FP32_PARITY_BOUND of the float64 reference.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from rlparity.engines import sglang, vllm
from rlparity.engines.base import Sampling
from rlparity.errors import RlparityError
from tests.test_engines import FP32_PARITY_BOUND

# micro's vocabulary and the max length the request checks of vLLM and SGLang are given here (a request longer
# than the engine's max length is one of the generated faults)
VOCAB = 1024
MAX_LEN = 16
# Per-test limits (pytest-timeout). Measured here (2 cores), idle / under a load average of 7: each property 0.3-2.3 s
# / under 10 s (the micro engines answer in milliseconds); a minute each leaves room for a loaded machine.
VALID_TIMEOUT_S = 60
BAD_TIMEOUT_S = 60
SAMPLING_TIMEOUT_S = 60
SAMPLE_TIMEOUT_S = 60
SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large,
                HealthCheck.function_scoped_fixture]


def one_line_error(exc: BaseException) -> str:
    message = str(exc)
    assert message and "\n" not in message, f"{type(exc).__name__} is not one line: {message!r}"
    return message


@pytest.fixture(scope="module")
def engines(hf_micro, reference_micro):
    assert hf_micro.config["vocab_size"] == VOCAB
    return hf_micro, reference_micro


@st.composite
def requests(draw, max_len=10):
    """(token_ids, prompt_len): 1-3 sequences of 2..max_len token ids, each with a prompt of 1..len-1 tokens."""
    sequences = draw(st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=2, max_size=max_len), min_size=1,
                              max_size=3))
    prompts = [draw(st.integers(1, len(sequence) - 1)) for sequence in sequences]
    return sequences, prompts


def request_checks(engines):
    """Every place a logprobs request enters: the two in-process engines and the checks of vLLM and SGLang."""
    hf, reference = engines
    return {
        "hf": hf.logprobs, "reference": reference.logprobs,
        "vllm": lambda t, p: vllm.check_logprobs_request("vllm", t, p, Sampling(), MAX_LEN, VOCAB),
        "sglang": lambda t, p: sglang.check_logprobs_request("sglang", t, p, Sampling(), MAX_LEN, VOCAB),
    }


def check_answer(answer, token_ids, prompt_len, processed=False):
    assert [len(x) for x in answer] == [len(s) - p for s, p in zip(token_ids, prompt_len)]
    for logprobs in answer:
        assert not torch.isnan(logprobs).any() and (logprobs <= 0).all()
        if not processed:
            assert torch.isfinite(logprobs).all()


@pytest.mark.timeout(VALID_TIMEOUT_S)
@settings(suppress_health_check=SLOW_IS_FINE)
@given(request=requests())
def test_valid_request_gets_finite_logprobs_agreeing_with_the_reference(engines, request):
    hf, reference = engines
    token_ids, prompt_len = request
    got, exact = hf.logprobs(token_ids, prompt_len), reference.logprobs(token_ids, prompt_len)
    check_answer(got, token_ids, prompt_len)
    check_answer(exact, token_ids, prompt_len)
    gap = max((a.double() - b).abs().max().item() for a, b in zip(got, exact))
    assert gap <= FP32_PARITY_BOUND, f"hf fp32 vs reference: max |dlogp| {gap:.2e} > {FP32_PARITY_BOUND:g}"
    for name in ("vllm", "sglang"):
        assert request_checks(engines)[name](token_ids, prompt_len) == token_ids


MUTATIONS = {
    # name: (what the message names, mutate(token_ids, prompt_len) -> (token_ids, prompt_len))
    "token id -1": ("token id", lambda t, p: ([[-1, *t[0][1:]], *t[1:]], p)),
    "token id = vocab": ("token id", lambda t, p: ([[*t[0][:-1], VOCAB], *t[1:]], p)),
    "token id 10**30": ("token id", lambda t, p: ([[10**30, *t[0][1:]], *t[1:]], p)),
    "token id float": ("token ids are ints", lambda t, p: ([[float(t[0][0]), *t[0][1:]], *t[1:]], p)),
    "token id bool": ("token ids are ints", lambda t, p: ([[True, *t[0][1:]], *t[1:]], p)),
    "token id text": ("token ids are ints", lambda t, p: ([[str(t[0][0]), *t[0][1:]], *t[1:]], p)),
    "token id None": ("token ids are ints", lambda t, p: ([[None, *t[0][1:]], *t[1:]], p)),
    "token id nested": ("token ids are ints", lambda t, p: ([[t[0][:1], *t[0][1:]], *t[1:]], p)),
    "flat token_ids": ("sequence of token ids", lambda t, p: (t[0], [1] * len(t[0]))),
    "token_ids text": ("token_ids", lambda t, p: ("hello", p)),
    "token_ids None": ("token_ids", lambda t, p: (None, p)),
    "empty batch": ("token_ids holds no sequences", lambda t, p: ([], [])),
    "empty sequence": ("is empty", lambda t, p: ([[], *t[1:]], p)),
    "float tensor": ("integer token ids", lambda t, p: ([torch.tensor(t[0], dtype=torch.float32), *t[1:]], p)),
    "too long": ("max length", lambda t, p: ([t[0] * 200_000, *t[1:]], p)),
    "prompt_len 0": ("prompt_len", lambda t, p: (t, [0, *p[1:]])),
    "prompt_len -1": ("prompt_len", lambda t, p: (t, [-1, *p[1:]])),
    "prompt_len = len": ("prompt_len", lambda t, p: (t, [len(t[0]), *p[1:]])),
    "prompt_len > len": ("prompt_len", lambda t, p: (t, [len(t[0]) + 3, *p[1:]])),
    "prompt_len float": ("prompt_len", lambda t, p: (t, [float(p[0]), *p[1:]])),
    "prompt_len bool": ("prompt_len", lambda t, p: (t, [True, *p[1:]])),
    "prompt_len None": ("prompt_len", lambda t, p: (t, [None, *p[1:]])),
    "prompt_len an int": ("prompt length", lambda t, p: (t, p[0])),
    "one prompt_len short": ("prompt length", lambda t, p: (t, p[:-1])),
    "one prompt_len more": ("prompt length", lambda t, p: (t, [*p, 1])),
}


@pytest.mark.timeout(BAD_TIMEOUT_S)
@settings(suppress_health_check=SLOW_IS_FINE)
@given(request=requests(), mutation=st.sampled_from(sorted(MUTATIONS)))
def test_bad_request_is_refused_naming_the_argument(engines, request, mutation):
    named, mutate = MUTATIONS[mutation]
    token_ids, prompt_len = mutate(*request)
    for name, logprobs in request_checks(engines).items():
        with pytest.raises(RlparityError) as refused:
            logprobs(token_ids, prompt_len)
        assert named in one_line_error(refused.value), f"{name} on {mutation}: {refused.value}"


ODD_NUMBERS = st.sampled_from([0, -1, 0.0, -0.5, math.inf, -math.inf, math.nan, 1e-300, 5e-324, 1e300, True, False,
                               None, "0.7", 10**400])
TEMPERATURES = st.one_of(st.floats(0.05, 5.0), st.floats(allow_nan=True, allow_infinity=True), ODD_NUMBERS)
TOP_PS = st.one_of(st.just(1.0), st.floats(0.0, 1.0), st.floats(allow_nan=True, allow_infinity=True), ODD_NUMBERS)
TOP_KS = st.one_of(st.just(0), st.integers(-3, VOCAB + 3), st.sampled_from([10**30, 2.5, True, None, "5"]))


LOGPROBS_REQUEST_CHECKS = {"vllm": vllm.check_logprobs_request, "sglang": sglang.check_logprobs_request}


def sampling_or_refusal(temperature, top_p, top_k, logprobs):
    """The Sampling, or None after checking the refusal names a field that is out of range."""
    try:
        return Sampling(temperature=temperature, top_p=top_p, top_k=top_k, logprobs=logprobs)
    except RlparityError as exc:
        message = one_line_error(exc)
        assert any(f"Sampling.{field}" in message for field in ("temperature", "top_p", "top_k")), message
        return None


@pytest.mark.timeout(SAMPLING_TIMEOUT_S)
@settings(suppress_health_check=SLOW_IS_FINE)
@given(request=requests(max_len=6), temperature=TEMPERATURES, top_p=TOP_PS, top_k=TOP_KS,
       logprobs=st.sampled_from(["processed", "raw"]))
def test_sampling_settings_get_logprobs_or_a_refusal_naming_the_field(engines, request, temperature, top_p, top_k,
                                                                     logprobs):
    sampling = sampling_or_refusal(temperature, top_p, top_k, logprobs)
    event("refused" if sampling is None else f"answered ({logprobs})")
    if sampling is None:
        return
    token_ids, prompt_len = request
    hf, reference = engines
    for engine in (hf, reference):
        check_answer(engine.logprobs(token_ids, prompt_len, sampling), token_ids, prompt_len,
                     processed=logprobs == "processed")
    for name, check in LOGPROBS_REQUEST_CHECKS.items():  # their teacher-forced log-probs are raw only, and say so
        if logprobs == "raw":
            assert check(name, token_ids, prompt_len, sampling, MAX_LEN, VOCAB) == token_ids
        else:
            with pytest.raises(RlparityError, match="not available") as refused:
                check(name, token_ids, prompt_len, sampling, MAX_LEN, VOCAB)
            one_line_error(refused.value)


@pytest.mark.timeout(SAMPLE_TIMEOUT_S)
@settings(suppress_health_check=SLOW_IS_FINE)
@given(prompt=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8),
       max_tokens=st.one_of(st.integers(-3, MAX_LEN + 3), st.sampled_from([2.0, True, None, "4", 10**30])),
       seed=st.one_of(st.none(), st.integers(-2**64, 2**64), st.sampled_from([1.5, "7", True])),
       temperature=st.one_of(st.floats(0.01, 3.0), st.just(2.0)))
def test_vllm_sample_requests_are_checked_before_vllm_sees_them(prompt, max_tokens, seed, temperature):
    sampling = Sampling(temperature=temperature, logprobs="raw")
    expected_refusals = []  # the fields out of range, in the order they are checked
    if temperature > vllm.MAX_TEMPERATURE:
        expected_refusals.append("temperature")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        expected_refusals.append("seed")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_LEN - len(prompt):
        expected_refusals.append("max_tokens")
    try:
        ids = vllm.check_sample_request("vllm", prompt, sampling, max_tokens, seed, "raw", MAX_LEN, VOCAB)
    except RlparityError as exc:
        assert expected_refusals and expected_refusals[0] in one_line_error(exc), (expected_refusals, str(exc))
        return
    assert not expected_refusals and ids == prompt
