"""Measured noise floors of log-prob agreement, kept in fixtures/noise_floors.json with the command that measured them.

For each dtype, three floors (see rlparity.parity.pairs), each the deviation from perfect agreement of every
metric in rlparity.metrics.AGREEMENT_METRICS, measured on the model's parity batch by engines already trusted:

    naive   reference[dtype] vs reference[float64]
    cross   hf[dtype] vs reference[dtype]
    self    hf[dtype] against itself in other batch layouts

A pair is within tolerance when each metric's deviation is at most K_PARITY x its floor plus what rounding the
delivered log-probs allows (rlparity.metrics.agreement_tolerances). The floors are tied to the model's recipe
and the batch (both hashed in the file): using them on anything else is refused with the command to re-measure.

    python -m rlparity.parity calibrate --model tiny      # re-measure and rewrite the model's entry
"""

import json
import time
from pathlib import Path

from rlparity.errors import RlparityError
from rlparity.metrics import AGREEMENT_METRICS, K_FORWARD, agreement_tolerances
from rlparity.models.recipe import recipe_hash
from rlparity.models.specs import load_spec, models_dir
from rlparity.parity.batch import ParityBatch
from rlparity.parity.pairs import FLOOR_KINDS, Pair, PairMeasurement, measure_pair
from rlparity.parity.sides import EnginePool, Side
from rlparity.results import environment_fingerprint

# FlashAttention's forward rule (rlparity.metrics.K_FORWARD): two correct implementations may differ by at most
# twice what the trusted ones were measured to differ by in the same dtype.
K_PARITY = K_FORWARD
FLOORS_FILE = "noise_floors.json"
CALIBRATION_DTYPES = ("float32", "bfloat16")


def floors_path() -> Path:
    return models_dir().parent / FLOORS_FILE


def calibrate_command(model: str) -> str:
    return f"python -m rlparity.parity calibrate --model {model}"


def calibration_pairs(dtype: str) -> dict[str, Pair]:
    hf, reference = Side("hf", dtype), Side("reference", dtype)
    return {"naive": Pair(reference, Side("reference", "float64"), "naive"),
            "cross": Pair(hf, reference, "cross"),
            "self": Pair(hf, hf, "self")}


def calibrate(model: str, checkpoint: Path, batch: ParityBatch, dtypes=CALIBRATION_DTYPES, log=print) -> dict:
    """The model's floors entry: every calibration pair measured on `batch`, with what identifies the measurement."""
    floors: dict[str, dict] = {}
    with EnginePool(checkpoint) as pool:
        for dtype in dtypes:
            floors[dtype] = {}
            for kind, pair in calibration_pairs(dtype).items():
                started = time.monotonic()
                measured = measure_pair(pool.get(pair.a), pool.get(pair.b), batch)
                floors[dtype][kind] = {"pair": pair.label, "deviations": measured.deviations, "stats": measured.stats,
                                       "layouts": measured.layouts}
                log(f"{dtype:9s} {kind:6s} {pair.label:45s} max |dlogp| {measured.stats['dlogp_max']:.3g} "
                    f"({time.monotonic() - started:.1f}s)")
    manifest_file = checkpoint / "rlparity-build.json"
    weights = json.loads(manifest_file.read_text())["files"]["model.safetensors"] if manifest_file.is_file() else None
    return {"command": calibrate_command(model), "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": {"name": model, "recipe_sha256": recipe_hash(load_spec(model)), "weights_sha256": weights},
            "batch": batch.describe(), "k": K_PARITY, "environment": environment_fingerprint(), "floors": floors}


def save_floors(entry: dict, path: Path | None = None) -> Path:
    """Writes (or replaces) the model's entry, keeping the other models' entries."""
    path = path or floors_path()
    table = json.loads(path.read_text()) if path.is_file() else {}
    table[entry["model"]["name"]] = entry
    path.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    return path


class NoiseFloors:
    def __init__(self, entry: dict, source: Path):
        self.entry, self.source = entry, source

    @property
    def command(self) -> str:
        return self.entry["command"]

    def floor(self, kind: str, dtype: str) -> dict[str, float]:
        try:
            return self.entry["floors"][dtype][kind]["deviations"]
        except KeyError:
            raise RlparityError(f"{self.source} has no {kind!r} floor for {dtype} (model "
                                f"{self.entry['model']['name']}); measure it with `{self.command}`") from None

    def tolerances(self, pair: Pair, rounding: float) -> dict[str, float]:
        return agreement_tolerances(self.floor(pair.floor, pair.floor_dtype), rounding, K_PARITY)

    def max_dlogp_tolerance(self, pair: Pair, rounding: float) -> float:
        return self.tolerances(pair, rounding)["dlogp_max"]


def judge(measured: PairMeasurement, tolerances: dict[str, float], bar: float | None = None) -> list[str]:
    """What exceeds its tolerance (empty when the pair passes)."""
    failures = [f"{name} deviates by {measured.deviations[name]:.3g} > tolerance {tolerances[name]:.3g}"
                for name in AGREEMENT_METRICS if measured.deviations[name] > tolerances[name]]
    if bar is not None and measured.stats["dlogp_max"] > bar:
        failures.append(f"max |dlogp| {measured.stats['dlogp_max']:.3g} > the required {bar:g}")
    return failures


def load_floors(model: str, batch: ParityBatch, path: Path | None = None) -> NoiseFloors:
    """The model's floors, refused unless they were measured on this model's recipe and on this batch."""
    path = path or floors_path()
    command = calibrate_command(model)
    if not path.is_file():
        raise RlparityError(f"no noise floors at {path}: measure them with `{command}`")
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RlparityError(f"{path} is not valid JSON ({exc}); re-measure with `{command}`") from exc
    if model not in table:
        raise RlparityError(f"{path} has no noise floors for model {model!r} (it has {sorted(table)}); measure them "
                            f"with `{command}`")
    entry = table[model]
    recipe = recipe_hash(load_spec(model))
    if entry["model"]["recipe_sha256"] != recipe:
        raise RlparityError(f"{path}: the floors of {model!r} were measured on recipe {entry['model']['recipe_sha256']}"
                            f", the model's recipe is now {recipe}; re-measure with `{command}`")
    measured = entry["batch"]
    if measured["token_ids_sha256"] != batch.sha256:
        raise RlparityError(f"{path}: the floors of {model!r} were measured on batch {measured['lengths']} (seed "
                            f"{measured['seed']}, sha256 {measured['token_ids_sha256'][:12]}), not on this one "
                            f"{batch.lengths} (seed {batch.seed}, sha256 {batch.sha256[:12]}); re-measure with "
                            f"`{command}`")
    for dtype, kinds in entry["floors"].items():
        for kind in FLOOR_KINDS:
            missing = [m for m in AGREEMENT_METRICS if m not in kinds.get(kind, {}).get("deviations", {})]
            if missing:
                raise RlparityError(f"{path}: the {kind!r} floor of {model!r} in {dtype} lacks {missing}; re-measure "
                                    f"with `{command}`")
    return NoiseFloors(entry, path)
