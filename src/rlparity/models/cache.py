"""Bundled models built on demand into a cache folder and verified on every use.

    <cache>/models/<name>-<recipe hash[:16]>/      the checkpoint, plus rlparity-build.json (the manifest)

<cache> is $RLPARITY_CACHE or ~/.cache/rlparity. A build goes to a temporary sibling folder that is
renamed into place only once complete, under a file lock, so concurrent test sessions build once and
an interrupted build never looks finished. Each use re-hashes every file against the manifest.
"""

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout

from rlparity.errors import RlparityError
from rlparity.models.builder import build
from rlparity.models.recipe import recipe_hash, sha256_bytes
from rlparity.models.specs import HASHES_FILE, expected_hashes, load_spec, models_dir

CACHE_ENV = "RLPARITY_CACHE"
MANIFEST_FILE = "rlparity-build.json"
# How long to wait for another process building the same model: several times the slowest build.
LOCK_TIMEOUT_S = 30 * 60
# The part of the build environment that decides the weights' bits (see rlparity.models.recipe).
WEIGHTS_ENVIRONMENT_KEYS = ("torch", "transformers", "machine", "cpu_capability", "cpu_model")


def cache_root(cache_dir: Path | str | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rlparity")


def model_folder(name: str, recipe: str, cache_dir: Path | str | None = None) -> Path:
    return cache_root(cache_dir) / "models" / f"{name}-{recipe[:16]}"


def sha256_file(path: Path) -> str:
    return sha256_bytes(path.read_bytes())


def file_hashes(folder: Path, manifest_file: str = MANIFEST_FILE) -> dict[str, str]:
    return {path.name: sha256_file(path) for path in sorted(folder.iterdir())
            if path.is_file() and path.name != manifest_file}


def rebuild_hint(name: str) -> str:
    return f"delete the folder or rebuild it with `python -m rlparity.models build {name} --force`"


# Shared by every cache of built folders (the bundled models here, the SFT warm starts in rlparity.trainer.sft): a
# build writes into a staging sibling renamed into place once its manifest (every file's sha256) is written, under
# a file lock; each use re-hashes every file. A damaged folder is refused with a one-line reason, not rebuilt: it
# may be in use by another process, and a silent rebuild would hide whatever damaged it.

def staging_folder(folder: Path, log: Callable[[str], None] = print) -> Path:
    """Where a build of `folder` writes before its rename into place, after removing the staging folders of killed
    builds. Call it holding the folder's lock: no other build of the folder is running then."""
    for stale in sorted(folder.parent.glob(f"{folder.name}.building-*")):
        shutil.rmtree(stale)
        log(f"removed {stale}, left by an interrupted build")
    return folder.with_name(f"{folder.name}.building-{os.getpid()}")


def read_manifest(folder: Path, manifest_file: str, what: str, hint: str, keys=("files",)) -> dict:
    try:
        manifest = json.loads((folder / manifest_file).read_text())
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8
        raise RlparityError(f"{what} is corrupt: its manifest {manifest_file} cannot be read "
                            f"({type(exc).__name__}: {exc}); {hint}") from exc
    if not isinstance(manifest, dict) or not all(key in manifest for key in keys):
        raise RlparityError(f"{what} is corrupt: its manifest {manifest_file} is not a build's manifest (expected "
                            f"an object with {list(keys)}); {hint}")
    return manifest


def check_files(folder: Path, recorded: dict[str, str], what: str, hint: str,
                manifest_file: str = MANIFEST_FILE) -> None:
    """Every file the build recorded hashes as recorded, and there is no other."""
    present = file_hashes(folder, manifest_file)
    for file, expected in recorded.items():
        if file not in present:
            raise RlparityError(f"{what} is corrupt: {file} is missing; {hint}")
        if present[file] != expected:
            raise RlparityError(f"{what} is corrupt: {file} has sha256 {present[file]}, the manifest recorded "
                                f"{expected}; {hint}")
    if extra := sorted(set(present) - set(recorded)):
        raise RlparityError(f"{what} holds files its build did not write: {extra}; {hint}")


def verify(folder: Path, name: str, recipe: str) -> dict:
    """The manifest of a cached build, after checking every file against it."""
    what, hint = f"cached model {name!r} at {folder}", rebuild_hint(name)
    manifest = read_manifest(folder, MANIFEST_FILE, what, hint, keys=("files", "recipe_sha256"))
    if manifest["recipe_sha256"] != recipe:
        raise RlparityError(f"{what} was built from recipe {manifest['recipe_sha256']}, expected {recipe}; {hint}")
    check_files(folder, manifest["files"], what, hint)
    return manifest


def check_recipe_recorded(name: str, recipe: str) -> None:
    recorded = expected_hashes(name).get("recipe_sha256")
    where = models_dir() / HASHES_FILE
    if recorded is None:
        raise RlparityError(f"{where} records no recipe hash for {name!r}; once its build is checked, record it with "
                            f"`python -m rlparity.models record {name}`")
    if recorded != recipe:
        raise RlparityError(
            f"the recipe of bundled model {name!r} hashes to {recipe}, but {where} records {recorded}: its spec, the "
            f"synthetic language, the tokenizer or BUILDER_VERSION changed. If that was intended, rebuild and record "
            f"it with `python -m rlparity.models record {name}`"
        )


def weights_environment(environment: dict) -> dict:
    return {key: environment.get(key) for key in WEIGHTS_ENVIRONMENT_KEYS}


def check_weights_recorded(name: str, manifest: dict) -> None:
    """Compares the weights' hash with the recorded one where the build environment is the recorded one."""
    recorded = expected_hashes(name).get("weights")
    if not recorded or weights_environment(manifest["environment"]) != recorded["environment"]:
        return
    built = manifest["files"]["model.safetensors"]
    if built != recorded["sha256"]:
        raise RlparityError(
            f"bundled model {name!r} was built in the environment its weights hash was recorded in "
            f"({recorded['environment']}), yet model.safetensors has sha256 {built}, not the recorded "
            f"{recorded['sha256']}: the build is not deterministic here, or the recorded hash is stale"
        )


def _build_into(name: str, recipe: str, folder: Path, log: Callable[[str], None]) -> None:
    staging = staging_folder(folder, log)
    log(f"building bundled model {name!r} into {folder}")
    record = build(load_spec(name), staging, log=log)
    manifest = {"name": name, "recipe_sha256": recipe, "files": file_hashes(staging), **record}
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(staging, folder)


def cached_model(name: str, *, cache_dir: Path | str | None = None, force: bool = False,
                 log: Callable[[str], None] = print) -> tuple[Path, dict]:
    """(folder, manifest), building when absent; does not consult fixtures/models/hashes.json."""
    recipe = recipe_hash(load_spec(name))
    folder = model_folder(name, recipe, cache_dir)
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder) + ".lock")
    try:
        with lock.acquire(timeout=LOCK_TIMEOUT_S):
            if force and folder.exists():
                shutil.rmtree(folder)
            if not folder.exists():
                start = time.monotonic()
                _build_into(name, recipe, folder, log)
                log(f"built {name!r} in {time.monotonic() - start:.0f}s")
            return folder, verify(folder, name, recipe)
    except Timeout as exc:
        raise RlparityError(f"waited {LOCK_TIMEOUT_S}s for another process building {name!r} (lock {lock.lock_file}); "
                            f"if no build is running, delete the lock file") from exc


def ensure_model(name: str = "tiny", *, cache_dir: Path | str | None = None, force: bool = False,
                 log: Callable[[str], None] = print) -> Path:
    """The checkpoint folder of a bundled model, built if needed and verified against the recorded hashes."""
    check_recipe_recorded(name, recipe_hash(load_spec(name)))
    folder, manifest = cached_model(name, cache_dir=cache_dir, force=force, log=log)
    check_weights_recorded(name, manifest)
    return folder


def record_hashes(name: str, manifest: dict) -> Path:
    """Writes the model's recipe hash and weights hash (with its environment) into fixtures/models/hashes.json."""
    path = models_dir() / HASHES_FILE
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    recorded[name] = {
        "recipe_sha256": manifest["recipe_sha256"],
        "weights": {"sha256": manifest["files"]["model.safetensors"],
                    "environment": weights_environment(manifest["environment"])},
    }
    path.write_text(json.dumps(recorded, indent=2, sort_keys=True) + "\n")
    return path
