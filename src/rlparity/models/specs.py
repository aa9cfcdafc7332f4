"""The bundled model family, read from fixtures/models/: one JSON file per model, plus the expected hashes.

A model file holds the GPT-OSS config.json fields, the synthetic language's seed and the training
recipe. `hashes.json` holds, per model, the expected recipe hash (and the weights hash it gave where it
was recorded); see rlparity.models.recipe for what each covers.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from rlparity.errors import RlparityError
from rlparity.models.config import normalise
from rlparity.models.train import TrainingRecipe

FIXTURES_ENV = "RLPARITY_FIXTURES"
HASHES_FILE = "hashes.json"


def models_dir() -> Path:
    """fixtures/models of the installed package (rlparity/fixtures: in a checkout, a link to the top-level
    fixtures/), or of the folder named by RLPARITY_FIXTURES."""
    root = os.environ.get(FIXTURES_ENV)
    fixtures = Path(root) if root else Path(__file__).parents[1] / "fixtures"
    folder = fixtures / "models"
    if not folder.is_dir():
        raise RlparityError(
            f"the bundled model configs are not at {folder}: they ship in the package (rlparity/fixtures); "
            f"reinstall rlparity or set {FIXTURES_ENV} to a fixtures/ folder"
        )
    return folder


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    config: dict  # config.json as written into the checkpoint
    language_seed: int
    training: TrainingRecipe

    def as_dict(self) -> dict:
        return {"name": self.name, "config": self.config, "language_seed": self.language_seed,
                "training": self.training.__dict__}


def model_names() -> list[str]:
    return sorted(path.stem for path in models_dir().glob("*.json") if path.name != HASHES_FILE)


def load_spec(name: str) -> ModelSpec:
    path = models_dir() / f"{name}.json"
    if not path.is_file():
        raise RlparityError(f"unknown bundled model {name!r}: expected one of {model_names()} (files in {path.parent})")
    try:
        raw = json.loads(path.read_text())
        spec = ModelSpec(name=name, description=raw["description"], config=raw["config"],
                         language_seed=raw["language"]["seed"], training=TrainingRecipe.from_dict(raw["training"]))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise RlparityError(f"{path} is not a valid model spec ({type(exc).__name__}: {exc}); expected the keys "
                            "description, config, language.seed and training") from exc
    normalise(spec.config, str(path))
    return spec


def expected_hashes(name: str) -> dict:
    path = models_dir() / HASHES_FILE
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    return recorded.get(name, {})
