"""Is MoE routing deterministic, batch invariant, the same in verl's two forward passes, the same in trainer and
engine, and does router replay take effect? Measured per layer on the tiny GPT-OSS (rlparity.routing.checks).

    repeated passes     the trainer (transformers) over one batch, REPEATS times: bitwise where the path
                        claims determinism (CPU), else flips only at rounding-level gaps
    batch invariance    a sequence alone vs padded at row 1 of a batch with a longer and a shorter one
    dual forward        the rollout log-prob pass (eval, no grad), then the training forward (train, grad):
                        routes, log-probs, and the PPO ratio's deviation from 1
    trainer vs engine   per-layer agreement with the float64 reference and with vLLM (when installed); with
                        --engine NAME=module:Class, with your engine instead (it needs routing(token_ids))
    router precision    each router alone in bf16 vs fp32 on the same hidden states
    replay              the engine's routes forced in the training forward: exact routes, router gradients,
                        log-probs closer to the engine's than without replay
    replay variants     none, ids, ids in reversed slot order, ids + the engine's weights, R2 (rlparity.routing.
                        variants): forced routes ran, router gradients where the variant keeps them; the
                        |dlogp| to the engine, route agreement, gradient norm and PPO ratio are recorded

A flip at a gap too large for the compared dtype's rounding fails every check (rlparity.routing.census).
One Record per check; the per-layer table is in the record's extra["comparison"] and in failure messages.
"""

import pytest

from rlparity.engines import EngineUnavailable, engine_class, is_user_engine, open_engine, routes
from rlparity.engines.base import process_versions
from rlparity.engines.process import EngineProcessError
from rlparity.errors import RlparityError
from rlparity.models import Language
from rlparity.pytest_plugin import components
from rlparity.results import ERROR, SKIP, Record
from rlparity.routing.agreement import coarser_dtype
from rlparity.routing.checks import (
    check_agreement,
    check_batch_invariance,
    check_determinism,
    check_dual_forward,
    check_replay,
    check_router_precision,
)
from rlparity.routing.engines import engine_routes, open_routing_engine, vllm_unavailable_reason
from rlparity.routing.forward import run_pass
from rlparity.routing.report import agreement_table
from rlparity.routing.variants import PROPERTY as VARIANT_PROPERTY
from rlparity.routing.variants import VARIANTS, measure_variant, weights_unknown
from rlparity.routing.variants import check as check_variant

# Held-out text of the tiny model's synthetic language; unequal lengths so that batches carry padding.
SEQUENCE_LENGTHS = (128, 97, 64, 120, 80, 111)
HELD_OUT_SEED = 11
PROBE, LONGER, SHORTER = 2, 0, 4  # batch invariance: the 64-token sequence between the 128- and 80-token ones
TRAINER_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
# The RL trainer's dtype: where replay has routing flips to remove (bf16 vs the engine flips ~1 % of tokens).
REPLAY_TRAINER_DTYPE = "bf16"
VLLM_MARKS = [pytest.mark.engine_vllm, pytest.mark.multi_process]


@pytest.fixture(scope="module")
def sequences(model_source, model_batch):
    """Held-out text of tiny's language; with --checkpoint DIR, consecutive pieces of the prompt set (its tokenizer)."""
    if model_source.checkpoint is not None:
        stream = [token for sequence in model_batch.token_ids for token in sequence]
        if len(stream) < sum(SEQUENCE_LENGTHS):
            pytest.fail(f"the parity prompt set is {len(stream)} tokens in the tokenizer of {model_source.checkpoint}, "
                        f"fewer than the {sum(SEQUENCE_LENGTHS)} the routing sequences need", pytrace=False)
        starts = [sum(SEQUENCE_LENGTHS[:i]) for i in range(len(SEQUENCE_LENGTHS))]
        return [stream[start:start + length] for start, length in zip(starts, SEQUENCE_LENGTHS)]
    vocab = model_source.config()["vocab_size"]
    block = next(Language(vocab, seed=0).batches(seed=HELD_OUT_SEED, batch=len(SEQUENCE_LENGTHS),
                                                 seq_len=max(SEQUENCE_LENGTHS)))
    return [row[:length] for row, length in zip(block, SEQUENCE_LENGTHS)]


@pytest.fixture(scope="module")
def trainers(tiny_checkpoint, device):
    """transformers' GPT-OSS per dtype, opened on first use, on the suite's device."""
    opened = {}

    def get(dtype: str):
        if dtype not in opened:
            engine = open_engine("hf", tiny_checkpoint, dtype=TRAINER_DTYPES[dtype])
            engine.model.to(device)
            opened[dtype] = engine
        return opened[dtype]

    return get


class RolloutEngines:
    """Rollout-side engines on the tiny model, each opened once, with their routes and log-probs of `sequences`."""

    def __init__(self, checkpoint, sequences):
        self.checkpoint, self.sequences, self.cache, self.engines, self.failed = checkpoint, sequences, {}, [], {}

    def get(self, name: str, dtype: str):
        """(engine, routes, log-probs); an engine that failed to start or died raises the same error again."""
        if (name, dtype) in self.failed:
            raise self.failed[(name, dtype)]
        try:
            return self._open(name, dtype)
        except (RlparityError, EngineProcessError) as exc:
            self.failed[(name, dtype)] = exc
            raise

    def _open(self, name: str, dtype: str):
        if (name, dtype) not in self.cache:
            if name == "reference":
                engine = open_engine("reference", self.checkpoint)
            elif is_user_engine(name):
                engine = open_routing_engine(name, self.checkpoint, TRAINER_DTYPES[dtype], max(SEQUENCE_LENGTHS))
            else:
                from rlparity.engines.vllm import VllmEngine

                engine = VllmEngine(self.checkpoint, dtype=TRAINER_DTYPES[dtype], max_len=max(SEQUENCE_LENGTHS))
            self.engines.append(engine)
            routes = engine_routes(engine, self.sequences)
            logprobs = engine.logprobs(self.sequences, [1] * len(self.sequences))
            self.cache[(name, dtype)] = (engine, routes, logprobs)
        return self.cache[(name, dtype)]

    def close(self):
        for engine in self.engines:
            engine.close()


@pytest.fixture(scope="module")
def rollout(tiny_checkpoint, sequences):
    engines = RolloutEngines(tiny_checkpoint, sequences)
    yield engines
    engines.close()


def rollout_engine(rollout, name: str, dtype: str, subject: str, recorder, check: str):
    """The engine's (engine, routes, log-probs); a skip record when it is not installed, an error record when it
    fails to start or dies."""
    if name == "vllm" and (reason := vllm_unavailable_reason()):
        report(recorder, Record(f"routing.{check}", subject, f"{name}_{dtype}", dtype, SKIP,
                                     reason=f"needs vLLM: {reason}"))
    if is_user_engine(name) and not routes(engine_class(name)):
        report(recorder, Record(f"routing.{check}", subject, f"{name}_{dtype}", dtype, SKIP,
                                reason=f"engine {name!r} has no routing(token_ids): its routes are not checked"))
    try:
        return rollout.get(name, dtype)
    except EngineUnavailable as exc:
        report(recorder, Record(f"routing.{check}", subject, f"{name}_{dtype}", dtype, SKIP, reason=str(exc)))
    except (RlparityError, EngineProcessError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    report(recorder, Record(f"routing.{check}", subject, f"{name}_{dtype}", dtype, ERROR, reason=error))


def report(recorder, record: Record) -> None:
    table = "\n".join(agreement_table(record.extra["comparison"])) if "comparison" in record.extra else ""
    recorder.check(record, details=f"{record.property} {record.subject}\n{table}")


@pytest.mark.parametrize("dtype", TRAINER_DTYPES)
def test_repeated_passes(trainers, sequences, dtype, recorder):
    trainer = trainers(dtype)
    report(recorder, check_determinism(trainer.model, trainer.name, sequences, trainer.pad_id))


@pytest.mark.parametrize("dtype", TRAINER_DTYPES)
def test_batch_invariance(trainers, sequences, dtype, recorder):
    trainer = trainers(dtype)
    record = check_batch_invariance(trainer.model, trainer.name, sequences[PROBE],
                                    [sequences[LONGER], sequences[SHORTER]], trainer.pad_id)
    report(recorder, record)


@pytest.mark.parametrize("dtype", TRAINER_DTYPES)
def test_dual_forward(trainers, sequences, dtype, recorder):
    trainer = trainers(dtype)
    report(recorder, check_dual_forward(trainer.model, trainer.name, sequences, trainer.pad_id))


def pytest_generate_tests(metafunc):
    """The rollout engines of test_trainer_vs_engine: the reference and vLLM, or the user's (--engine) instead."""
    if metafunc.function.__name__ != "test_trainer_vs_engine":
        return
    user_engines = [pytest.param(name, "same", id=name) for name in components(metafunc.config).engines]
    metafunc.parametrize("engine_name, engine_dtype", user_engines or [
        pytest.param("reference", "fp64", id="reference"), pytest.param("vllm", "same", marks=VLLM_MARKS, id="vllm")])


@pytest.mark.parametrize("dtype", TRAINER_DTYPES)
def test_trainer_vs_engine(trainers, rollout, sequences, dtype, engine_name, engine_dtype, recorder):
    trainer = trainers(dtype)
    engine_dtype = dtype if engine_dtype == "same" else engine_dtype
    subject = f"{trainer.name} vs {engine_name}[{TRAINER_DTYPES.get(engine_dtype, 'float64')}]"
    engine, routes, _ = rollout_engine(rollout, engine_name, engine_dtype, subject, recorder,
                                       "trainer_vs_engine")
    trained = run_pass(trainer.model, sequences, trainer.pad_id, train=False, grad=False)
    record = check_agreement(routes, trained.routing, (engine.name, trainer.name),
                             coarser_dtype(engine.dtype, trainer.dtype),
                             shapes={"lengths": list(SEQUENCE_LENGTHS), "trainer": "one padded batch",
                                     "engine": "each sequence alone"})
    record.engines = process_versions(engine)
    report(recorder, record)


def test_router_precision(trainers, sequences, recorder):
    trainer = trainers("fp32")
    report(recorder, check_router_precision(trainer.model, trainer.name, sequences, trainer.pad_id))


@pytest.mark.parametrize("engine_name, engine_dtype", [("reference", "fp64"),
                                                       pytest.param("vllm", REPLAY_TRAINER_DTYPE, marks=VLLM_MARKS)],
                         ids=["reference", "vllm"])
def test_replay(trainers, rollout, sequences, engine_name, engine_dtype, recorder):
    trainer = trainers(REPLAY_TRAINER_DTYPE)
    engine, routes, logprobs = rollout_engine(rollout, engine_name, engine_dtype, trainer.name, recorder,
                                              "replay")
    record = check_replay(trainer.model, trainer.name, sequences, trainer.pad_id, engine.name, routes, logprobs)
    record.engines = process_versions(engine)
    report(recorder, record)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("engine_name, engine_dtype", [("reference", "fp64"),
                                                       pytest.param("vllm", REPLAY_TRAINER_DTYPE, marks=VLLM_MARKS)],
                         ids=["reference", "vllm"])
def test_replay_variant(trainers, rollout, sequences, engine_name, engine_dtype, variant, recorder):
    trainer = trainers(REPLAY_TRAINER_DTYPE)
    subject = f"{trainer.name} vs {engine_name}[{TRAINER_DTYPES.get(engine_dtype, 'float64')}]"
    engine, routes, logprobs = rollout_engine(rollout, engine_name, engine_dtype, subject, recorder,
                                              "replay_variant")
    if reason := weights_unknown(engine.name, variant):
        report(recorder, Record(VARIANT_PROPERTY, subject, variant, TRAINER_DTYPES[REPLAY_TRAINER_DTYPE],
                                SKIP, reason=reason))
    result = measure_variant(trainer.model, sequences, trainer.pad_id, variant, engine.name, routes, logprobs)
    record = check_variant(result, f"{trainer.name} vs {engine.name}", TRAINER_DTYPES[REPLAY_TRAINER_DTYPE],
                           shapes={"lengths": list(SEQUENCE_LENGTHS), "mini_batch": "the whole batch"})
    record.engines = process_versions(engine)
    report(recorder, record)
