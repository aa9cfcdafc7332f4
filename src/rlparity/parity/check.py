"""One parity cell: open both sides, run the semantics preflight, measure the pair, judge it against its floor.

Used by conformance/test_logprob_parity.py and `python -m rlparity.parity compare`; every outcome is a verdict
with a reason, never an exception: an engine that cannot run here is a skip with what to install, an engine that
fails to start or dies is an error with its message (and log tail), and the session's other pairs go on.
"""

import time
from dataclasses import dataclass, field

import torch

from rlparity.engines.base import process_versions
from rlparity.metrics import cannot_fail, rounding_floor
from rlparity.parity.batch import ParityBatch
from rlparity.parity.floors import NoiseFloors, judge
from rlparity.parity.pairs import Pair, PairMeasurement, measure_pair
from rlparity.parity.semantics import PreflightReport, preflight
from rlparity.parity.sides import EngineFailed, EnginePool, EngineUnavailable
from rlparity.results import ERROR, FAIL, PASS, SKIP, Record


@dataclass
class PairResult:
    pair: Pair
    verdict: str
    reason: str = ""
    measurement: PairMeasurement | None = None
    tolerances: dict[str, float] | None = None
    preflight: PreflightReport | None = None
    engines: list[str] = field(default_factory=list)
    engine_versions: dict = field(default_factory=dict)  # engines.base.process_versions of the two sides
    seconds: float = 0.0

    def records(self, batch: ParityBatch) -> list[Record]:
        shapes = {"sequences": len(batch.token_ids), "response_tokens": batch.response_tokens,
                  "lengths": batch.lengths}
        common = {"subject": self.pair.label, "case": batch.label(), "dtype": self.pair.floor_dtype, "shapes": shapes,
                  "engines": self.engine_versions}
        records = []
        if self.preflight is not None:
            records.append(Record(property="logprob_parity.semantics", verdict=PASS if self.preflight.ok else FAIL,
                                  tolerance=self.preflight.tolerance, reason=self.preflight.summary(),
                                  extra={"findings": [finding.__dict__ for finding in self.preflight.findings]},
                                  **common))
        measured = self.measurement
        records.append(Record(
            property="logprob_parity", verdict=self.verdict, reason=self.reason,
            error=measured.stats["dlogp_max"] if measured else None,
            tolerance=self.tolerances["dlogp_max"] if self.tolerances else None,
            extra={"pair": self.pair.id, "floor": self.pair.floor, "engines": self.engines, "bar": self.pair.bar,
                   "metrics": measured.stats if measured else None,
                   "frameworks": measured.frameworks if measured else None,
                   "deviations": measured.deviations if measured else None, "tolerances": self.tolerances,
                   "cannot_fail": cannot_fail(self.tolerances) if self.tolerances else [],
                   "layouts": measured.layouts if measured else None, "seconds": self.seconds},
            **common))
        return records


def preflight_tolerance(floors: NoiseFloors, pair: Pair, trainer_values: list[torch.Tensor]) -> float:
    # Every engine here delivers log-probs in float32 or finer: their rounding is part of the allowance.
    rounding = rounding_floor(torch.cat([v.double() for v in trainer_values]), torch.float32)
    return floors.max_dlogp_tolerance(pair, rounding)


def check_pair(pool: EnginePool, pair: Pair, batch: ParityBatch, floors: NoiseFloors) -> PairResult:
    started = time.monotonic()
    result = _check(pool, pair, batch, floors)
    result.seconds = time.monotonic() - started
    return result


def _check(pool: EnginePool, pair: Pair, batch: ParityBatch, floors: NoiseFloors) -> PairResult:
    try:
        a, b = pool.get(pair.a), pool.get(pair.b)
    except EngineUnavailable as exc:
        return PairResult(pair, SKIP, str(exc))
    except EngineFailed as exc:
        return PairResult(pair, ERROR, str(exc))
    result = PairResult(pair, PASS, engines=[a.name] if a is b else [a.name, b.name],
                        engine_versions=process_versions(a, b))
    try:
        if a is not b:
            tolerance = preflight_tolerance(floors, pair, a.logprobs(batch.token_ids, batch.prompt_len))
            result.preflight = preflight(a, b, batch, tolerance,
                                         diff_command=f"rlparity diff --a {pair.a.engine}:{pair.a.dtype} "
                                                      f"--b {pair.b.engine}:{pair.b.dtype} {batch.model_option}")
            if not result.preflight.ok:
                result.verdict, result.reason = FAIL, f"semantics differ: {result.preflight.summary()}"
                return result
        result.measurement = measure_pair(a, b, batch)
    except EngineFailed as exc:
        result.verdict, result.reason = ERROR, str(exc)
        return result
    except ValueError as exc:  # RlparityError and rlparity.metrics' refusals: a request or an answer was unusable
        result.verdict, result.reason = ERROR, str(exc)
        return result
    result.tolerances = floors.tolerances(pair, result.measurement.rounding)
    failures = judge(result.measurement, result.tolerances, pair.bar)
    if failures:
        result.verdict, result.reason = FAIL, "; ".join(failures)
    return result
