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
    python -m rlparity.parity calibrate --checkpoint DIR  # your checkpoint's floors, kept outside the repository

A bundled model's entry is keyed by its name, in fixtures/noise_floors.json. A user's checkpoint's entry is keyed
by the checkpoint's content hash (rlparity.models.checkpoint_sha256: config, weights, tokenizer), in
<cache>/noise_floors.json ($RLPARITY_CACHE, default ~/.cache/rlparity): a changed checkpoint has no floors until
they are measured again, and the same weights in another folder reuse them.
"""

import json
import time
from pathlib import Path

from rlparity.errors import RlparityError
from rlparity.metrics import AGREEMENT_METRICS, K_FORWARD, agreement_tolerances
from rlparity.model_option import ModelSource, as_source
from rlparity.models import cache_root, checkpoint_sha256
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


def floors_path(model: "ModelSource | str" = "tiny") -> Path:
    """fixtures/noise_floors.json for a bundled model; <cache>/noise_floors.json for a user's checkpoint."""
    if as_source(model).checkpoint is not None:
        return cache_root() / FLOORS_FILE
    return models_dir().parent / FLOORS_FILE


def calibrate_command(model: "ModelSource | str") -> str:
    return f"python -m rlparity.parity calibrate {as_source(model).argument}"


def floors_key(model: "ModelSource | str") -> str:
    """The entry's key: a bundled model's name, or "checkpoint-sha256:<content hash>" (reads the weights once)."""
    source = as_source(model)
    return source.name if source.checkpoint is None else f"checkpoint-sha256:{checkpoint_sha256(source.checkpoint)}"


def model_identity(source: ModelSource, checkpoint: Path) -> dict:
    """What the floors were measured on: a bundled model's recipe and weights hash, or a checkpoint's content hash."""
    if source.checkpoint is not None:
        key = floors_key(source)
        return {"name": key, "checkpoint": str(source.checkpoint), "content_sha256": key.partition(":")[2]}
    manifest_file = checkpoint / "rlparity-build.json"
    weights = json.loads(manifest_file.read_text())["files"]["model.safetensors"] if manifest_file.is_file() else None
    return {"name": source.name, "recipe_sha256": recipe_hash(load_spec(source.name)), "weights_sha256": weights}


def calibration_pairs(dtype: str) -> dict[str, Pair]:
    hf, reference = Side("hf", dtype), Side("reference", dtype)
    return {"naive": Pair(reference, Side("reference", "float64"), "naive"),
            "cross": Pair(hf, reference, "cross"),
            "self": Pair(hf, hf, "self")}


def calibrate(model: "ModelSource | str", checkpoint: Path, batch: ParityBatch, dtypes=CALIBRATION_DTYPES,
              log=print) -> dict:
    """The model's floors entry: every calibration pair measured on `batch`, with what identifies the measurement."""
    source = as_source(model)
    floors: dict[str, dict] = {}
    with EnginePool(checkpoint, max_len=batch.max_len) as pool:
        for dtype in dtypes:
            floors[dtype] = {}
            for kind, pair in calibration_pairs(dtype).items():
                started = time.monotonic()
                measured = measure_pair(pool.get(pair.a), pool.get(pair.b), batch)
                floors[dtype][kind] = {"pair": pair.label, "deviations": measured.deviations, "stats": measured.stats,
                                       "layouts": measured.layouts}
                log(f"{dtype:9s} {kind:6s} {pair.label:45s} max |dlogp| {measured.stats['dlogp_max']:.3g} "
                    f"({time.monotonic() - started:.1f}s)")
    return {"command": calibrate_command(source), "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": model_identity(source, checkpoint), "batch": batch.describe(), "k": K_PARITY,
            "environment": environment_fingerprint(), "floors": floors}


def save_floors(entry: dict, path: Path | None = None) -> Path:
    """Writes (or replaces) the model's entry, keeping the other models' entries."""
    path = path or (cache_root() / FLOORS_FILE if "content_sha256" in entry["model"] else floors_path())
    path.parent.mkdir(parents=True, exist_ok=True)
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


def load_floors(model: "ModelSource | str", batch: ParityBatch, path: Path | None = None) -> NoiseFloors:
    """The model's floors, refused unless they were measured on this model (a bundled model's recipe, a checkpoint's
    content) and on this batch."""
    source = as_source(model)
    path = path or floors_path(source)
    command = calibrate_command(source)
    if not path.is_file():
        raise RlparityError(f"no noise floors at {path}: measure them with `{command}`")
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RlparityError(f"{path} is not valid JSON ({exc}); re-measure with `{command}`") from exc
    key = floors_key(source)
    if key not in table:
        if source.checkpoint is not None:
            raise RlparityError(f"{path} has no noise floors for checkpoint {source.checkpoint} as it is now (content "
                                f"{key}); calibrate them with `{command}`")
        raise RlparityError(f"{path} has no noise floors for model {key!r} (it has {sorted(table)}); measure them "
                            f"with `{command}`")
    entry = table[key]
    if source.checkpoint is None:
        recipe = recipe_hash(load_spec(source.name))
        if entry["model"]["recipe_sha256"] != recipe:
            raise RlparityError(f"{path}: the floors of {key!r} were measured on recipe "
                                f"{entry['model']['recipe_sha256']}, the model's recipe is now {recipe}; re-measure "
                                f"with `{command}`")
    measured = entry["batch"]
    if measured["token_ids_sha256"] != batch.sha256:
        raise RlparityError(f"{path}: the floors of {source.label!r} were measured on batch {measured['lengths']} "
                            f"({measured.get('prompts') or 'seed ' + str(measured['seed'])}, sha256 "
                            f"{measured['token_ids_sha256'][:12]}), not on this one {batch.lengths} "
                            f"({batch.prompts or 'seed ' + str(batch.seed)}, sha256 {batch.sha256[:12]}); re-measure "
                            f"with `{command}`")
    for dtype, kinds in entry["floors"].items():
        for kind in FLOOR_KINDS:
            missing = [m for m in AGREEMENT_METRICS if m not in kinds.get(kind, {}).get("deviations", {})]
            if missing:
                raise RlparityError(f"{path}: the {kind!r} floor of {source.label!r} in {dtype} lacks {missing}; "
                                    f"re-measure with `{command}`")
    return NoiseFloors(entry, path)
