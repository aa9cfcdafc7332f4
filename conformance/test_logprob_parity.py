"""Trainer <-> engine per-token log-prob parity on the bundled tiny GPT-OSS.

For every pair of rlparity.parity.pairs.PARITY_PAIRS (transformers fp32 vs the float64 reference, vs vLLM fp32,
bf16 vs vLLM bf16, each engine against itself in other batch layouts, ...), on the seeded parity batch of tiny's
synthetic language: the semantics preflight first (do both sides mean the same log-probs?), then |dlogp| mean /
p99 / max, k1 and k3 KL, the importance ratio's mean, std and fraction outside [1 - e, 1 + e] for e = 0.2 and
0.001, and the Pearson correlation of the probabilities, each within K_PARITY x its noise floor measured by
`python -m rlparity.parity calibrate --model tiny` (fixtures/noise_floors.json). Each cell writes a Record.
With --checkpoint DIR the same pairs run on your checkpoint: the batch is the prompt set of fixtures/prompts in its
own tokenizer, the floors those `python -m rlparity.parity calibrate --checkpoint DIR` measured for its content.

An engine that is not installed skips with what to install (vLLM: RLPARITY_VLLM_PYTHON); one that fails to start
or dies fails its cells with its error and log tail, and the other pairs still run.

Your engine, `--engine NAME=module:Class` (rlparity.engines.user): the pairs are then yours instead, in float32 and
bfloat16: the trainer (transformers) against NAME, and NAME against itself in other batch layouts, each judged as the
bundled pairs of its kind (rlparity.parity.pairs.pair_of). A dtype your engine does not run in is skipped.
"""

import pytest

from rlparity.errors import RlparityError
from rlparity.parity import PARITY_PAIRS, Pair, Side, diff_sides, load_floors
from rlparity.parity.check import check_pair
from rlparity.parity.pairs import HF_FP32, pair_of
from rlparity.pytest_plugin import components
from rlparity.results import FAIL, PASS, SKIP, Record

# vLLM told to ignore the sliding window, as a user's hf_overrides (or an engine without window support) would.
VLLM_WITHOUT_WINDOW = Side.parse("vllm:float32", options={"hf_overrides": {"sliding_window": None}})
USER_ENGINE_DTYPES = ("float32", "bfloat16")


def marks(pair: Pair):
    return [pytest.mark.engine_vllm, pytest.mark.multi_process] if "vllm" in pair.engines else []


def user_engine_pairs(names: list[str]) -> list[Pair]:
    """Each user engine against the trainer in each dtype, and against itself in other batch layouts."""
    pairs = []
    for name in names:
        for dtype in USER_ENGINE_DTYPES:
            trainer, engine = Side("hf", dtype), Side(name, dtype)
            pairs += [pair_of(trainer, engine), pair_of(engine, engine)]
    return pairs


def pytest_generate_tests(metafunc):
    if "pair" not in metafunc.fixturenames:
        return
    user_engines = components(metafunc.config).engines
    pairs = user_engine_pairs(user_engines) if user_engines else PARITY_PAIRS
    metafunc.parametrize("pair", [pytest.param(pair, marks=marks(pair), id=pair.id) for pair in pairs])


@pytest.fixture(scope="module")
def batch(model_batch):
    """tiny's synthetic-language batch, or with --checkpoint DIR the prompt set in that checkpoint's tokenizer."""
    return model_batch


@pytest.fixture(scope="module")
def floors(model_source, batch):
    """The model's noise floors; a checkpoint's are measured with `python -m rlparity.parity calibrate --checkpoint
    DIR` (the failure says so)."""
    try:
        return load_floors(model_source, batch)
    except RlparityError as exc:
        pytest.fail(str(exc))


def test_logprob_parity(pair, parity_engines, batch, floors, recorder):
    result = check_pair(parity_engines, pair, batch, floors)
    recorder.record(*result.records(batch))
    details = "\n".join(result.preflight.lines()) if result.preflight else ""
    recorder.judge(result, details=f"{pair.label}\n{details}")


@pytest.mark.engine_vllm
@pytest.mark.multi_process
def test_planted_window_mismatch_is_caught(parity_engines, batch, floors, recorder):
    """Sensitivity of this file: a vLLM that ignores the sliding window must fail parity, and the layer diff must
    name layer 0's attention from the window's first token on."""
    pair = Pair(HF_FP32, VLLM_WITHOUT_WINDOW, "cross")
    result = check_pair(parity_engines, pair, batch, floors)
    if result.verdict == SKIP:
        pytest.skip(result.reason)
    window = parity_engines.get(HF_FP32).config["sliding_window"]
    try:
        report = diff_sides(parity_engines, HF_FP32, VLLM_WITHOUT_WINDOW, max(batch.token_ids, key=len))
    finally:
        parity_engines.release(VLLM_WITHOUT_WINDOW)
    first = report.first
    caught = (result.verdict == FAIL and first is not None and first.name == "layers.0.attn"
              and first.first_token == window)
    reason = f"parity: {result.verdict} ({result.reason}); diff: {report.hint}"
    recorder.check(Record(property="logprob_parity.sensitivity", subject=f"planted: {pair.label}",
                          case=batch.label(), dtype=pair.floor_dtype, verdict=PASS if caught else FAIL, reason=reason,
                          error=result.measurement.stats["dlogp_max"] if result.measurement else None,
                          extra={"points": [point.__dict__ for point in report.points]},
                          engines=result.engine_versions),
                   details="\n".join(report.table()))
