"""The semantics preflight on `micro`: engines that agree pass; each planted definitional mismatch
(tests/planted_engines.py) is caught and named with its closed-form effect; a numerical one is not blamed on
definitions."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from rlparity.engines import RAW, open_engine
from rlparity.errors import RlparityError
from rlparity.metrics import K_FORWARD, rounding_floor, tolerance
from rlparity.models.tokenizer_info import tokenizer_info
from rlparity.parity import parity_batch, preflight
from rlparity.parity.semantics import MISMATCH, NUMERIC, OK, SKIPPED, check_round_trip, check_tokenizers
from rlparity.parity.tokens import round_trip_failures
from tests.planted_engines import (
    GreedySampler,
    IgnoresTemperature,
    IncludesLastPromptToken,
    MissingNextTokenShift,
    OffByOne,
    ProcessedAtTemperature,
    SamplerLabellingProcessedAsRaw,
    TopKRenormalised,
    TopPRenormalised,
    hf_without_sliding_window,
)

# micro slides over 8 tokens: lengths below, past and well past the window.
LENGTHS = (12, 20, 33, 48)
RAW_CHECK, PROCESSED_CHECK = "log-probs [raw]", "log-probs [processed T=0.7]"


@pytest.fixture(scope="module")
def batch():
    return parity_batch("micro", lengths=LENGTHS)


@pytest.fixture(scope="module")
def preflight_tolerance(micro_checkpoint, reference_micro, batch):
    """The project's rule for float32: K_FORWARD x the naive float32 error (the reference in float32 against
    float64, on this batch) plus the rounding floor of float32 log-probs."""
    naive = open_engine("reference", micro_checkpoint, dtype=torch.float32)
    exact = torch.cat(reference_micro.logprobs(batch.token_ids, batch.prompt_len))
    plain = torch.cat(naive.logprobs(batch.token_ids, batch.prompt_len))
    return tolerance((plain - exact).abs().max().item(), rounding_floor(exact, torch.float32), K_FORWARD)


def findings(report) -> dict:
    return {finding.check: finding for finding in report.findings}


def test_engines_that_mean_the_same_pass(hf_micro, reference_micro, batch, preflight_tolerance):
    report = preflight(hf_micro, reference_micro, batch, preflight_tolerance)
    assert report.ok and [f.status for f in report.findings] == [OK, OK, OK, OK], "\n".join(report.lines())
    assert report.summary() == "semantics agree"


@pytest.mark.parametrize("planted, check, name, message, parameters", [
    (ProcessedAtTemperature, RAW_CHECK, "temperature 0.7", "processed log-probs where raw ones were asked",
     {"temperature": 0.7, "top_k": 0, "top_p": 1.0}),
    (TopKRenormalised, RAW_CHECK, "temperature 1, top-k 5", "top-k 5 renormalised",
     {"temperature": 1.0, "top_k": 5}),
    (TopPRenormalised, RAW_CHECK, "temperature 1, top-p 0.8", "top-p 0.8 renormalised",
     {"temperature": 1.0, "top_p": 0.8}),
    (IgnoresTemperature, PROCESSED_CHECK, "temperature 1", "raw log-probs where processed T=0.7 ones were asked",
     {"temperature": 1.0, "top_k": 0}),
    (OffByOne, RAW_CHECK, "window shifted -1", "off by -1: it starts 1 token early", {"shift": -1}),
    (IncludesLastPromptToken, RAW_CHECK, "window shifted -1", "come in [7, 11, 18, 25] values per sequence where "
     "the responses have [6, 10, 17, 24]", {"shift": -1}),
    (MissingNextTokenShift, RAW_CHECK, "next-token shift missing", "scored against token t itself",
     {"shift": 0, "unshifted": True}),
], ids=["processed_T0.7", "top_k5", "top_p0.8", "ignores_temperature", "off_by_one", "extra_prompt_token",
        "unshifted_labels"])
def test_planted_mismatch_is_named(hf_micro, reference_micro, batch, preflight_tolerance, planted, check, name,
                                   message, parameters):
    report = preflight(hf_micro, planted(reference_micro), batch, preflight_tolerance)
    finding = findings(report)[check]
    assert not report.ok and finding.status == MISMATCH, "\n".join(report.lines())
    assert finding.name == name and message in finding.message, finding.message
    assert {key: finding.parameters[key] for key in parameters} == parameters
    assert finding.parameters["residual"] <= preflight_tolerance
    assert "reproduces the engine's values" in finding.effect


def test_closed_form_effects_are_stated(hf_micro, reference_micro, batch, preflight_tolerance):
    temperature = findings(preflight(hf_micro, ProcessedAtTemperature(reference_micro), batch, preflight_tolerance))
    assert "log p_T(x) = z_x/T - logsumexp(z/T)" in temperature[RAW_CHECK].effect
    top_k = findings(preflight(hf_micro, TopKRenormalised(reference_micro), batch, preflight_tolerance))
    assert "shift by -log S" in top_k[RAW_CHECK].effect and "fall outside the kept set" in top_k[RAW_CHECK].effect
    # predicted and observed shift agree on this batch: "the predicted shift is X ..., the observed X"
    effect = top_k[RAW_CHECK].effect
    predicted = effect.split("the predicted shift is ")[1].split(" ")[0]
    assert effect.split("the observed ")[1].split(" ")[0] == predicted


def test_sampled_logprobs_are_judged_as_the_engine_labels_them(hf_micro, reference_micro, batch,
                                                               preflight_tolerance):
    check = "sampled log-probs [raw]"
    honest = findings(preflight(hf_micro, GreedySampler(reference_micro), batch, preflight_tolerance))[check]
    assert honest.status == OK, honest.message
    report = preflight(hf_micro, SamplerLabellingProcessedAsRaw(reference_micro), batch, preflight_tolerance)
    mislabelled = findings(report)[check]
    assert not report.ok and mislabelled.status == MISMATCH and mislabelled.name == "temperature 0.7"
    assert "processed log-probs where raw ones were asked" in mislabelled.message


def test_a_numerical_difference_is_not_blamed_on_definitions(hf_micro, micro_checkpoint, batch, preflight_tolerance,
                                                            tmp_path):
    no_window = hf_without_sliding_window(micro_checkpoint, tmp_path / "no-window")
    report = preflight(hf_micro, no_window, batch, preflight_tolerance, diff_command="rlparity diff --a hf --b X")
    raw = findings(report)[RAW_CHECK]
    assert report.ok and raw.status == NUMERIC, "\n".join(report.lines())
    assert "no definitional difference explains it" in raw.message and "`rlparity diff --a hf --b X`" in raw.message


def test_an_engine_without_processed_logprobs_is_skipped_with_its_reason(hf_micro, reference_micro, batch,
                                                                          preflight_tolerance):
    class RawOnly(IgnoresTemperature):
        def logprobs(self, token_ids, prompt_len, sampling=RAW):
            if sampling.logprobs != "raw":
                raise RlparityError("processed teacher-forced log-probs are not available here")
            return self.inner.logprobs(token_ids, prompt_len)

    report = preflight(hf_micro, RawOnly(reference_micro), batch, preflight_tolerance)
    processed = findings(report)[PROCESSED_CHECK]
    assert processed.status == SKIPPED and "not available here" in processed.message and report.ok


@pytest.fixture(scope="module")
def broken_tokenizer(micro_checkpoint, batch, tmp_path_factory):
    """micro's tokenizer with one name that occurs in the batch respelled with a '.', which the pre-tokenizer
    splits off: decoding gives text that encodes to other ids. Returns (file, the respelled id)."""
    folder = tmp_path_factory.mktemp("broken-tokenizer")
    shutil.copy(micro_checkpoint / "tokenizer_config.json", folder)
    tokenizer = json.loads((micro_checkpoint / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    by_id = {i: token for token, i in vocab.items()}
    victim = next(i for i in batch.token_ids[0] if len(by_id.get(i, "")) > 3 and by_id[i].isalpha())
    word = by_id[victim]
    vocab[f"{word[:2]}.{word[2:]}"] = vocab.pop(word)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return folder / "tokenizer.json", victim


def test_ids_that_do_not_survive_decode_encode_are_named(micro_checkpoint, batch, broken_tokenizer):
    file, victim = broken_tokenizer
    assert round_trip_failures(micro_checkpoint / "tokenizer.json", batch.token_ids) == []
    failures = round_trip_failures(file, batch.token_ids)
    first = batch.token_ids[0].index(victim)
    assert failures and failures[0].startswith(f"sequence 0: position {first} is id {victim} ("), failures
    side = SimpleNamespace(tokenizer=SimpleNamespace(source=str(file)))
    finding = check_round_trip(side, side, batch.token_ids)
    assert finding.status == MISMATCH and "decode -> encode" in finding.message


def test_mismatched_tokenizers_are_named(micro_checkpoint, broken_tokenizer):
    file, victim = broken_tokenizer
    trainer = SimpleNamespace(name="trainer", tokenizer=tokenizer_info(micro_checkpoint))
    engine = SimpleNamespace(name="engine", tokenizer=tokenizer_info(file))
    finding = check_tokenizers(trainer, engine)
    assert finding.status == MISMATCH and f"id {victim} is" in finding.message


def test_a_trainer_without_logits_is_refused(reference_micro, batch):
    class LogprobsOnly:
        name, tokenizer = "logprobs-only", reference_micro.tokenizer

        def logprobs(self, token_ids, prompt_len, sampling=RAW):
            return reference_micro.logprobs(token_ids, prompt_len, sampling)

    with pytest.raises(RlparityError, match="the trainer side logprobs-only does not expose its logits"):
        preflight(LogprobsOnly(), reference_micro, batch, 1e-5)
