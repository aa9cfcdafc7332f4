"""The routing checks on the micro model: transformers passes them, and each planted bug
(tests/planted_routing.py) is caught by the check meant for it."""

import pytest

from rlparity.engines import open_engine
from rlparity.models.language import Language
from rlparity.results import FAIL, PASS
from rlparity.routing.checks import (
    check_batch_invariance,
    check_determinism,
    check_dual_forward,
    check_replay,
    check_router_precision,
)
from rlparity.routing.engines import engine_routes
from tests.planted_routing import DetachedWeightsReplay, IgnoringReplay, position_tiebreak_router

LENGTHS = (48, 33, 41, 26)


@pytest.fixture(scope="module")
def hf32(micro_checkpoint):
    return open_engine("hf", micro_checkpoint, dtype="float32")


@pytest.fixture(scope="module")
def hf16(micro_checkpoint):
    return open_engine("hf", micro_checkpoint, dtype="bfloat16")


@pytest.fixture(scope="module")
def sequences(hf32):
    block = next(Language(hf32.config["vocab_size"], seed=0).batches(seed=11, batch=len(LENGTHS), seq_len=48))
    return [row[:length] for row, length in zip(block, LENGTHS)]


@pytest.fixture(scope="module")
def engine(reference_micro, sequences):
    """The float64 reference as the rollout engine: its routes and log-probs."""
    return engine_routes(reference_micro, sequences), reference_micro.logprobs(sequences, [1] * len(sequences))


def batch_invariance(hf, sequences):
    probe, others = sequences[2], [sequences[0], sequences[3]]  # probe padded at row 1, beside longer and shorter
    return check_batch_invariance(hf.model, hf.name, probe, others, hf.pad_id)


def test_transformers_is_batch_invariant_up_to_rounding(hf32, sequences):
    record = batch_invariance(hf32, sequences)
    assert record.verdict == PASS, record.reason


def test_a_router_that_breaks_near_ties_by_batch_row_is_caught(hf32, sequences):
    with position_tiebreak_router(hf32.model):
        record = batch_invariance(hf32, sequences)
    assert record.verdict == FAIL
    assert "flips at a gap too large for float32 rounding" in record.reason
    assert record.extra["comparison"]["large_gap_flips"] > 0


def test_in_bf16_the_same_bug_is_caught_by_the_logits_it_reports(hf16, sequences):
    """A 1e-2 gap is within bf16 rounding, but the router's own logits, alone and in the batch, cannot
    produce the flip: the check names it inconsistent."""
    with position_tiebreak_router(hf16.model):
        record = batch_invariance(hf16, sequences)
    assert record.verdict == FAIL
    comparison = record.extra["comparison"]
    assert comparison["large_gap_flips"] == 0 and comparison["inconsistent_flips"] > 0


def test_repeated_passes_and_the_dual_forward_are_bitwise_on_cpu(hf32, sequences):
    for record in (check_determinism(hf32.model, hf32.name, sequences, hf32.pad_id),
                   check_dual_forward(hf32.model, hf32.name, sequences, hf32.pad_id)):
        assert record.verdict == PASS, record.reason
        assert record.extra["claims_determinism"] and record.error == 0.0


def test_the_router_precision_check_runs(hf32, sequences):
    record = check_router_precision(hf32.model, hf32.name, sequences, hf32.pad_id)
    assert record.verdict == PASS, record.reason
    assert record.extra["comparison"]["tokens"] == sum(LENGTHS)


def test_replay_of_the_engines_routes_passes_and_brings_log_probs_closer(hf16, sequences, engine):
    routes, logprobs = engine
    record = check_replay(hf16.model, hf16.name, sequences, hf16.pad_id, "reference", routes, logprobs)
    assert record.verdict == PASS, record.reason
    # bf16 vs float64 routes differ somewhere on these sequences, so the improvement was actually required
    assert record.extra["improvement_applicable"] and record.error < record.tolerance


@pytest.mark.parametrize("hf_name", ["hf32", "hf16"])
def test_a_replay_that_ignores_the_routes_is_caught(request, hf_name, sequences, engine):
    hf = request.getfixturevalue(hf_name)
    routes, logprobs = engine
    record = check_replay(hf.model, hf.name, sequences, hf.pad_id, "reference", routes, logprobs,
                          replay=IgnoringReplay)
    assert record.verdict == FAIL
    # fp32 routes equal the reference's, so only the runner-up routes show the replay was ignored
    assert "with the runner-up routes forced" in record.reason


def test_a_replay_that_detaches_the_routing_weights_is_caught(hf32, sequences, engine):
    routes, logprobs = engine
    record = check_replay(hf32.model, hf32.name, sequences, hf32.pad_id, "reference", routes, logprobs,
                          replay=DetachedWeightsReplay)
    assert record.verdict == FAIL
    assert "got no (or a non-finite) gradient" in record.reason
