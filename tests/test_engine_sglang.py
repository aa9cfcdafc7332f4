"""The SGLang engine (rlparity.engines.sglang).

Everywhere: how the engine finds SGLang or says why it cannot, the options and requests it refuses before
starting anything, the engine process's own start failure without a GPU, and the reading of SGLang's
input_token_logprobs (alignment and token ids checked). On a CUDA machine with SGLang (gpu-marked, skipped with
the reason elsewhere): SGLang's teacher-forced log-probs against the float64 reference on the `micro` model.
"""

import json
import sys

import pytest
import torch

from rlparity.engines.base import Sampling
from rlparity.engines.process import EngineProcessError
from rlparity.engines.sglang import (
    NEEDS_CUDA,
    PYTHON_ENV,
    START_TIMEOUT_S,
    SglangEngine,
    check_logprobs_request,
    find_sglang_python,
    unavailable_reason,
)
from rlparity.engines.sglang_worker import FIXED_ENGINE_ARGS, engine_args, input_logprobs
from rlparity.errors import RlparityError
from rlparity.metrics import K_FORWARD
from tests.conftest import ENGINE_PROMPT_LENGTHS

pytestmark = pytest.mark.engine_sglang

REASON = unavailable_reason()
# SGLang's own start-up limit (START_TIMEOUT_S, 900 s) must report before the test's (rlparity.pytest_plugin's
# default is 600 s); 300 s more for the test's requests (REQUEST_TIMEOUT_S is 180 s).
SGLANG_TEST_TIMEOUT_S = START_TIMEOUT_S + 300
SGLANG_MARKS = (pytest.mark.gpu, pytest.mark.multi_process, pytest.mark.timeout(SGLANG_TEST_TIMEOUT_S),
                pytest.mark.skipif(REASON is not None, reason=f"needs SGLang: {REASON}"))
VOCAB = 1024
MAX_LEN = 256


def needs_sglang(test):
    for mark in SGLANG_MARKS:
        test = mark(test)
    return test


def sglang_entries(token_ids, logprobs):
    """input_token_logprobs as SGLang returns it for logprob_start_len=0 with skip_tokenizer_init."""
    return [(None, token_ids[0], None)] + [(value, token, None) for value, token in zip(logprobs, token_ids[1:])]


# --- finding SGLang ---------------------------------------------------------------------------------------------

def test_without_cuda_the_reason_says_so(monkeypatch, micro_checkpoint):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert unavailable_reason() == NEEDS_CUDA
    assert "SGLang needs a CUDA GPU" in NEEDS_CUDA
    with pytest.raises(RlparityError, match="sglang engine unavailable: SGLang needs a CUDA GPU"):
        SglangEngine(micro_checkpoint)


def test_without_sglang_the_reason_says_how_to_install(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv(PYTHON_ENV, raising=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    reason = unavailable_reason()
    assert "SGLang is not importable here" in reason and "pip install 'sglang>=0.5'" in reason
    assert f"set {PYTHON_ENV}=VENV/bin/python" in reason


def test_the_named_interpreter_is_used(monkeypatch):
    monkeypatch.setenv(PYTHON_ENV, sys.executable)
    assert find_sglang_python() == (sys.executable, f"{PYTHON_ENV}={sys.executable}")


def test_a_bad_interpreter_is_named_with_what_to_do(monkeypatch, tmp_path, micro_checkpoint):
    monkeypatch.setenv(PYTHON_ENV, str(tmp_path / "no-python"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    python, reason = find_sglang_python()
    assert python is None and f"{PYTHON_ENV}='{tmp_path / 'no-python'}' is not an executable file" in reason
    with pytest.raises(RlparityError, match=f"sglang engine unavailable: {PYTHON_ENV}="):
        SglangEngine(micro_checkpoint)


# --- refusing bad options and requests before SGLang is asked ----------------------------------------------------

def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(RlparityError, match=f"checkpoint {tmp_path / 'absent'} does not exist"):
        SglangEngine(tmp_path / "absent")


@pytest.mark.parametrize("option, value, message", [
    ("dtype", "float16", "dtype 'float16' is not supported"),
    ("mem_fraction_static", 1.5, r"mem_fraction_static must be in \(0, 1\), got 1.5"),
    ("max_len", 10**9, r"max_len 1000000000 must be at most \d+: SGLang's context length is max_len \+ 2"),
    ("max_len", 0, "max_len 0 must be in"),
])
def test_bad_options_are_refused(micro_checkpoint, option, value, message):
    with pytest.raises(RlparityError, match=message):
        SglangEngine(micro_checkpoint, **{option: value})


@pytest.mark.parametrize("token_ids, prompt_len, message", [
    ([[5, 6, 7]], [3], "sequence 0 has 3 tokens and prompt_len 3"),
    ([[5, 6, 7]], [0], "sequence 0 has 3 tokens and prompt_len 0"),
    ([[5, 6, VOCAB]], [1], f"token id {VOCAB}, outside the vocabulary"),
    ([[5] * (MAX_LEN + 1)], [1], f"has {MAX_LEN + 1} tokens, more than the engine's max length {MAX_LEN}"),
    ([[5, 6, 7], [5, 6]], [1], "expected one prompt length per sequence"),
    ([[]], [1], "sequence 0 is empty"),
])
def test_bad_requests_are_refused(token_ids, prompt_len, message):
    with pytest.raises(RlparityError, match=message):
        check_logprobs_request("sglang[bfloat16]", token_ids, prompt_len, Sampling(), MAX_LEN, VOCAB)


def test_processed_teacher_forced_logprobs_are_refused_with_the_reason():
    with pytest.raises(RlparityError, match=r"Sampling\(logprobs='processed'\) are not available: SGLang computes "
                                            r"input \(teacher-forced\) log-probs from the raw logits"):
        check_logprobs_request("sglang[bfloat16]", [[5, 6, 7]], [1],
                               Sampling(temperature=0.7, logprobs="processed"), MAX_LEN, VOCAB)


def test_a_good_request_becomes_plain_int_lists():
    assert check_logprobs_request("sglang[bfloat16]", [torch.tensor([5, 6, 7]).tolist(), (8, 9)], [1, 1],
                                  Sampling(temperature=0.7), MAX_LEN, VOCAB) == [[5, 6, 7], [8, 9]]


# --- the engine process and SGLang's output ----------------------------------------------------------------------

def test_engine_args_fix_what_parity_needs():
    args = engine_args({"checkpoint": "/ckpt", "dtype": "bfloat16", "seed": 3, "context_length": 256,
                        "mem_fraction_static": 0.3, "tokenizer": None, "attention_backend": "triton",
                        "model_overrides": {"sliding_window": 4}})
    assert args | FIXED_ENGINE_ARGS == args
    assert args["disable_radix_cache"] and args["skip_tokenizer_init"]
    assert (args["model_path"], args["context_length"], args["random_seed"]) == ("/ckpt", 256, 3)
    assert args["attention_backend"] == "triton" and json.loads(args["json_model_override_args"]) == {
        "sliding_window": 4}
    assert "tokenizer_path" not in args


def test_input_logprobs_are_read_in_order_after_the_first_token():
    ids = [7, 3, 9, 11]
    assert input_logprobs(sglang_entries(ids, [-1.5, -0.25, -3.0]), ids) == [-1.5, -0.25, -3.0]


@pytest.mark.parametrize("entries, message", [
    ([(None, 7, None), (-1.5, 3, None)], "returned 2 input-token log-probs for 4 input tokens"),
    ([(-0.1, 7, None), (-1.5, 3, None), (-0.25, 9, None), (-3.0, 11, None)], "first input-token log-prob is -0.1"),
    ([(None, 7, None), (-1.5, 9, None), (-0.25, 11, None), (-3.0, 2, None)], "log-prob 1 is for token id 9"),
    ([(None, 7, None), (-1.5, 3, None), (None, 9, None), (-3.0, 11, None)], "no log-prob for input token 2"),
])
def test_misaligned_input_logprobs_are_named(entries, message):
    with pytest.raises(ValueError, match=message):
        input_logprobs(entries, [7, 3, 9, 11])


@pytest.mark.multi_process
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the engine process's own refusal on a machine without "
                                                      "CUDA")
def test_the_engine_process_refuses_to_start_without_cuda(monkeypatch, micro_checkpoint, tmp_path):
    # the parent is told there is a GPU, so it starts the engine process, which finds none and says so
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv(PYTHON_ENV, sys.executable)
    log = tmp_path / "sglang.log"
    with pytest.raises(EngineProcessError, match=r"sglang engine \(pid \d+\): failed to start: RuntimeError: "
                                                 r"SGLang needs a CUDA GPU; none is visible to the engine process"
                                                 r"(.|\n)*--- last 40 lines of .*sglang.log ---\nTraceback"):
        SglangEngine(micro_checkpoint, max_len=64, start_timeout=60, log_path=log)


# --- the real engine (GPU) ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sglang_bf16(micro_checkpoint):
    with SglangEngine(micro_checkpoint, dtype="bfloat16", max_len=MAX_LEN) as engine:
        yield engine


@needs_sglang
def test_sglang_bfloat16_mean_error_is_within_the_naive_bfloat16_error(sglang_bf16, reference_micro, micro_checkpoint,
                                                                        engine_sequences):
    """As tests/test_engines.py does for hf bf16: mean |dlogp| vs float64, against the reference run in bf16.

    K_FORWARD is the project's rule, not calibrated on SGLang (no GPU run yet): the first GPU run's ratio belongs
    in this docstring.
    """
    from rlparity.engines import open_engine

    exact = torch.cat([x.double() for x in reference_micro.logprobs(engine_sequences, ENGINE_PROMPT_LENGTHS)])
    out = sglang_bf16.logprobs(engine_sequences, ENGINE_PROMPT_LENGTHS)
    assert [len(x) for x in out] == [len(s) - p for s, p in zip(engine_sequences, ENGINE_PROMPT_LENGTHS)]
    candidate = (torch.cat([x.double() for x in out]) - exact).abs().mean().item()
    naive = open_engine("reference", micro_checkpoint, dtype=torch.bfloat16)
    naive_logprobs = naive.logprobs(engine_sequences, ENGINE_PROMPT_LENGTHS)
    naive_error = (torch.cat([x.double() for x in naive_logprobs]) - exact).abs().mean()
    assert candidate <= K_FORWARD * naive_error.item(), (
        f"SGLang bf16 mean |dlogp| {candidate:.2e}, naive bf16 {naive_error.item():.2e}")


@needs_sglang
def test_sglang_reports_what_it_runs(sglang_bf16):
    assert sglang_bf16.info["server_args"]["disable_radix_cache"] is True
    assert sglang_bf16.info["versions"]["sglang"]
    assert sglang_bf16.name == "sglang[bfloat16]"


@needs_sglang
def test_sglang_refuses_processed_teacher_forced_logprobs(sglang_bf16, engine_sequences):
    with pytest.raises(RlparityError, match="only raw teacher-forced log-probs exist"):
        sglang_bf16.logprobs(engine_sequences[:1], ENGINE_PROMPT_LENGTHS[:1],
                             Sampling(temperature=0.7, logprobs="processed"))


class SglangShapedEngine:
    """Stands in for sglang.Engine in-process: answers generate() with what SGLang's documented output looks like
    (one dict per request, meta_info["input_token_logprobs"] as (logprob, id, None), the first None), its values
    computed by the hf engine. It checks that the worker asks for what the engine module says it asks for."""

    def __init__(self, hf):
        self.hf = hf
        self.calls = []

    def generate(self, input_ids, sampling_params, return_logprob, logprob_start_len):
        assert (sampling_params, return_logprob, logprob_start_len) == ({"max_new_tokens": 1, "temperature": 0.0},
                                                                       True, 0)
        self.calls.append(input_ids)
        values = self.hf.logprobs(input_ids, [1] * len(input_ids))
        outputs = [{"meta_info": {"input_token_logprobs": sglang_entries(ids, v.tolist())}}
                   for ids, v in zip(input_ids, values)]
        return outputs

    def shutdown(self):
        self.calls.append("shutdown")


def test_the_worker_serves_one_generate_call_per_batch_and_reports_failures(hf_micro, engine_sequences):
    from rlparity.engines import wire
    from rlparity.engines.sglang_worker import Server, serve

    server = object.__new__(Server)  # everything but SGLang's own start-up
    server.engine = SglangShapedEngine(hf_micro)
    batch, single = engine_sequences[:3], engine_sequences[3:4]
    requests = [wire.dumps({"id": 1, "op": "prompt_logprobs", "token_ids": batch}),
                wire.dumps({"id": 2, "op": "prompt_logprobs", "token_ids": single}),
                wire.dumps({"id": 3, "op": "prompt_logprobs", "token_ids": [[5, 6, VOCAB + 7]]}),
                wire.dumps({"id": 4, "op": "sample"}),
                wire.dumps({"id": 5, "op": "shutdown"})]
    replies = []
    serve(server, requests, replies.append)
    assert [reply["id"] for reply in replies] == [1, 2, 3, 4, 5]
    assert server.engine.calls[:2] == [batch, single] and server.engine.calls[-1] == "shutdown"
    expected = hf_micro.logprobs(batch, [1] * 3) + hf_micro.logprobs(single, [1])
    served = replies[0]["result"]["logprobs"] + replies[1]["result"]["logprobs"]
    assert all(torch.equal(torch.tensor(got, dtype=torch.float32), want) for got, want in zip(served, expected))
    # an exception inside the engine is answered as a failed request, named, and serving goes on
    assert not replies[2]["ok"] and replies[2]["error"].startswith("RlparityError: ")
    assert not replies[3]["ok"] and "unknown request 'sample'" in replies[3]["error"]
    assert replies[4] == {"id": 5, "ok": True, "result": {}}
