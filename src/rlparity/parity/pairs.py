"""Which sides are compared, and the measurement of one pair on a batch.

A pair is (trainer side, engine side): the trainer's log-probs are pi_theta, the engine's the rollout's pi_old.
A self-consistency pair runs one engine on the same batch laid out differently (one call, each sequence
alone, reversed, split in halves): what an RL step sees when it recomputes log-probs in another batch shape.
Each pair is judged against the noise floor of its kind, measured by `rlparity.parity calibrate`:
    naive   a side against float64 ground truth: the plain reference run in that dtype vs float64
    cross   two engines in one dtype: transformers vs the plain reference, both in that dtype
    self    one engine against itself: transformers' batch-layout differences
"""

from dataclasses import dataclass

import torch

from rlparity.errors import RlparityError
from rlparity.metrics import agreement_deviations, logprob_agreement, rounding_floor
from rlparity.mismatch_metrics import framework_metrics
from rlparity.parity.batch import ParityBatch
from rlparity.parity.sides import Side

FLOOR_KINDS = ("naive", "cross", "self")
# Issue 5's acceptance bar for transformers fp32 vs vLLM fp32 on CPU, on top of the calibrated tolerance.
FP32_ENGINE_BAR = 1e-4


@dataclass(frozen=True)
class Pair:
    a: Side  # the trainer side
    b: Side  # the engine side (the same side for a self-consistency pair)
    floor: str
    bar: float | None = None  # a ceiling on max |dlogp| that holds whatever the floors say

    def __post_init__(self):
        if self.floor not in FLOOR_KINDS:
            raise RlparityError(f"pair {self.id}: floor kind {self.floor!r}, expected one of {FLOOR_KINDS}")
        if (self.floor == "self") != (self.a == self.b):
            raise RlparityError(f"pair {self.id}: the 'self' floor is for one side against itself, and only for it")

    @property
    def self_consistency(self) -> bool:
        return self.a == self.b

    @property
    def id(self) -> str:
        return f"{self.a.short}-self" if self.a == self.b else f"{self.a.short}_vs_{self.b.short}"

    @property
    def label(self) -> str:
        return f"{self.a.label} batch layouts" if self.a == self.b else f"{self.a.label} vs {self.b.label}"

    @property
    def floor_dtype(self) -> str:
        """The dtype whose noise bounds the pair: the less precise side's."""
        return max((self.a, self.b), key=lambda side: torch.finfo(side.torch_dtype).eps).dtype

    @property
    def engines(self) -> tuple[str, ...]:
        return tuple(sorted({self.a.engine, self.b.engine}))


HF_FP32, HF_BF16 = Side("hf", "float32"), Side("hf", "bfloat16")
VLLM_FP32, VLLM_BF16 = Side("vllm", "float32"), Side("vllm", "bfloat16")
REF_FP64 = Side("reference", "float64")

PARITY_PAIRS = (
    Pair(HF_FP32, REF_FP64, "naive"),
    Pair(VLLM_FP32, REF_FP64, "naive"),
    Pair(HF_FP32, VLLM_FP32, "cross", bar=FP32_ENGINE_BAR),
    Pair(HF_BF16, REF_FP64, "naive"),
    Pair(VLLM_BF16, REF_FP64, "naive"),
    Pair(HF_BF16, VLLM_BF16, "cross"),
    Pair(HF_FP32, HF_FP32, "self"),
    Pair(HF_BF16, HF_BF16, "self"),
    Pair(VLLM_FP32, VLLM_FP32, "self"),
    Pair(VLLM_BF16, VLLM_BF16, "self"),
)


def pair_of(a: Side, b: Side) -> Pair:
    """The pair of a trainer side and an engine side (any engines, a user's included), judged as the bundled pairs of
    its kind are: PARITY_PAIRS' own entry, with its bar, when it is one of them; else one side against itself is a
    'self' pair, two engines in one dtype a 'cross' pair (as hf vs vllm in float32), and sides in two dtypes a
    'naive' pair. Either way the floor is of Pair.floor_dtype, the coarser side's dtype (the trainer's whenever the
    engine runs in the trainer's dtype): two engines in one dtype each carry that dtype's rounding, which the cross
    floor (hf[dtype] vs reference[dtype]) measures; with two dtypes the coarser side's rounding dominates and the
    finer side stands for ground truth, which the naive floor (reference[dtype] vs reference[float64]) measures."""
    for pair in PARITY_PAIRS:
        if (pair.a, pair.b) == (a, b):
            return pair
    if a == b:
        return Pair(a, b, "self")
    return Pair(a, b, "cross" if a.dtype == b.dtype else "naive")


@dataclass
class PairMeasurement:
    stats: dict[str, float]  # logprob_agreement; for a self pair, of the layout that moved max |dlogp| most
    deviations: dict[str, float]  # each metric's distance from agreement (a self pair: the worst layout's, per metric)
    rounding: float  # the error of delivering the log-probs in the coarser of the two dtypes they came in
    layouts: dict[str, dict[str, float]] | None = None  # a self pair: logprob_agreement per layout
    frameworks: dict[str, float] | None = None  # the same pair in verl's, slime's and NeMo-RL's metric names


def check_lengths(where: str, values: list[torch.Tensor], batch: ParityBatch) -> None:
    expected = [n - p for n, p in zip(batch.lengths, batch.prompt_len)]
    got = [len(v) for v in values]
    if got != expected:
        raise RlparityError(f"{where}: returned {got} log-probs per sequence, expected {expected} (the response "
                            f"lengths); the semantics preflight names the alignment this fits")


def delivered_rounding(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    coarser = max((a[0].dtype, b[0].dtype), key=lambda dtype: torch.finfo(dtype).eps)
    return rounding_floor(torch.cat([v.double() for v in a + b]), coarser)


def compare(a_name: str, a: list[torch.Tensor], b_name: str, b: list[torch.Tensor],
            batch: ParityBatch) -> PairMeasurement:
    check_lengths(a_name, a, batch)
    check_lengths(b_name, b, batch)
    stats = logprob_agreement(a, b)
    return PairMeasurement(stats, agreement_deviations(stats), delivered_rounding(a, b),
                           frameworks=framework_metrics(a, b))


def self_layouts(engine, batch: ParityBatch) -> dict[str, list[torch.Tensor]]:
    """The batch's log-probs computed in other layouts, each returned in the batch's order."""
    ids, prompts = batch.token_ids, batch.prompt_len
    n, half = len(ids), len(ids) // 2
    reversed_call = engine.logprobs(ids[::-1], prompts[::-1])[::-1]
    alone = [engine.logprobs([s], [p])[0] for s, p in zip(ids[::-1], prompts[::-1])][::-1]
    halves = engine.logprobs(ids[:half], prompts[:half]) + engine.logprobs(ids[half:n], prompts[half:n])
    return {"reversed": reversed_call, "each alone": alone, "two halves": halves}


def measure_self(engine, batch: ParityBatch) -> PairMeasurement:
    whole = engine.logprobs(batch.token_ids, batch.prompt_len)
    check_lengths(engine.name, whole, batch)
    per_layout = {name: compare(engine.name, whole, f"{engine.name} ({name})", values, batch)
                  for name, values in self_layouts(engine, batch).items()}
    worst = max(per_layout.values(), key=lambda m: m.stats["dlogp_max"])
    deviations = {metric: max(m.deviations[metric] for m in per_layout.values()) for metric in worst.deviations}
    return PairMeasurement(worst.stats, deviations, worst.rounding, {k: m.stats for k, m in per_layout.items()},
                           worst.frameworks)


def measure_pair(a_engine, b_engine, batch: ParityBatch) -> PairMeasurement:
    """Both sides' raw log-probs of the batch's responses, compared; one engine twice measures self-consistency."""
    if a_engine is b_engine:
        return measure_self(a_engine, batch)
    a = a_engine.logprobs(batch.token_ids, batch.prompt_len)
    b = b_engine.logprobs(batch.token_ids, batch.prompt_len)
    return compare(a_engine.name, a, b_engine.name, b, batch)
