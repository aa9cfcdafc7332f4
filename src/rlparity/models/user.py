"""A user's GPT-OSS checkpoint folder: checked as a whole at the boundary, and identified by its content.

    validate_checkpoint(folder) -> Path     config, weights, tokenizer; one-line RlparityError naming the problem
    checkpoint_config(folder) -> dict        the normalised config.json alone (for the memory model)
    checkpoint_sha256(folder) -> str         the hash of what decides the log-probs: config, weights, tokenizer

The content hash reads every byte of the weights once (sha256, about 1 GiB/s on one core: minutes for a 120B
checkpoint in bf16); each file's hash is then kept in <cache>/checkpoint-hashes.json under its path, size and
modification time, so a later run re-reads only files that changed.
"""

import hashlib
import json
import os
from pathlib import Path

from rlparity.errors import RlparityError
from rlparity.models.cache import MANIFEST_FILE, cache_root
from rlparity.models.checkpoint import SINGLE_WEIGHTS, WEIGHTS_INDEX, open_checkpoint
from rlparity.models.config import normalise
from rlparity.models.tokenizer import TOKENIZER_FILES

HASH_CACHE_FILE = "checkpoint-hashes.json"
HASH_CHUNK = 16 << 20  # bytes read per update: large enough to keep sha256 busy, small enough for any machine
FOLDER_NEEDS = (f"config.json (model_type gpt_oss), {SINGLE_WEIGHTS} or {WEIGHTS_INDEX} with its shards, "
                "tokenizer.json")


def _folder(folder: Path | str) -> Path:
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise RlparityError(f"checkpoint {path} does not exist or is not a folder; expected a GPT-OSS checkpoint "
                            f"folder with {FOLDER_NEEDS}")
    return path.resolve()


def _raw_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise RlparityError(f"checkpoint {path} has no config.json; expected a GPT-OSS checkpoint folder with "
                            f"{FOLDER_NEEDS}")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise RlparityError(f"{file} is not valid JSON: {exc}") from exc


def checkpoint_config(folder: Path | str) -> dict:
    """The folder's config.json, normalised; raises unless it is GPT-OSS-like. Weights and tokenizer are not read."""
    path = _folder(folder)
    raw = _raw_config(path)
    if isinstance(raw, dict) and raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method", "?") if isinstance(raw["quantization_config"], dict) \
            else raw["quantization_config"]
        raise RlparityError(f"{path / 'config.json'} has quantization_config ({method}): rlparity compares "
                            f"unquantised weights; use a bf16 copy (e.g. load with transformers' "
                            f"Mxfp4Config(dequantize=True) and save_pretrained)")
    return normalise(raw, str(path / "config.json"))


def _check_files(path: Path) -> None:
    """The files a checkpoint needs, each missing one named, before any is read."""
    if not (path / "tokenizer.json").is_file():
        raise RlparityError(f"checkpoint {path} has no tokenizer.json; expected the tokenizer saved by the "
                            f"`tokenizers` library (tokenizer.save_pretrained writes it)")
    index = path / WEIGHTS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as exc:
            raise RlparityError(f"{index} is not a safetensors index (expected a JSON object with a weight_map): "
                                f"{type(exc).__name__}: {exc}") from exc
        if missing := [shard for shard in shards if not (path / shard).is_file()]:
            raise RlparityError(f"checkpoint {path}: {WEIGHTS_INDEX} names {len(missing)} of its {len(shards)} "
                                f"shards that are not in the folder: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    elif not (path / SINGLE_WEIGHTS).is_file():
        found = sorted(file.name for file in path.glob("*.safetensors"))
        detail = f"it has {found[:3]} but no index naming them" if found else "it has no *.safetensors file"
        raise RlparityError(f"checkpoint {path} has no weights: expected {SINGLE_WEIGHTS} or {WEIGHTS_INDEX} "
                            f"({detail})")


def validate_checkpoint(folder: Path | str) -> Path:
    """The folder (absolute) once it is a usable GPT-OSS checkpoint: a GPT-OSS config.json, unquantised
    safetensors whose names and shapes match it, and a tokenizer.json that fits it. Raises RlparityError
    (one line) naming the first problem found."""
    path = _folder(folder)
    checkpoint_config(path)
    _check_files(path)
    open_checkpoint(path)  # tensor names and shapes against the config, the tokenizer against the config
    return path


def identity_files(path: Path) -> list[Path]:
    """The files whose bytes decide the log-probs: config.json, the weights (and index), the tokenizer files."""
    names = {"config.json", WEIGHTS_INDEX, *TOKENIZER_FILES}
    return sorted(file for file in path.iterdir() if file.is_file() and file.name != MANIFEST_FILE
                  and (file.name in names or file.suffix == ".safetensors"))


def _file_sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _read_hash_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}  # a damaged cache only costs a re-hash


def checkpoint_sha256(folder: Path | str, cache_dir: Path | str | None = None) -> str:
    """sha256 over (name, sha256) of each identity file; per-file hashes are cached by path, size and mtime."""
    path = _folder(folder)
    cache_file = cache_root(cache_dir) / HASH_CACHE_FILE
    cached = _read_hash_cache(cache_file)
    changed = False
    parts = []
    for file in identity_files(path):
        stat = file.stat()
        key, stamp = str(file), [stat.st_size, stat.st_mtime_ns]
        entry = cached.get(key)
        if not entry or entry.get("stamp") != stamp:
            cached[key] = entry = {"stamp": stamp, "sha256": _file_sha256(file)}
            changed = True
        parts.append([file.name, entry["sha256"]])
    if changed:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        staging = cache_file.with_name(f"{cache_file.name}.{os.getpid()}")
        staging.write_text(json.dumps(cached, indent=1, sort_keys=True) + "\n")
        os.replace(staging, cache_file)  # a concurrent writer loses its entries, which are re-hashed next time
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def require_same_side_tokenizers(folder: Path | str, tokenizers: dict[str, "Path | str | None"]) -> None:
    """Each side of a comparison reads its tokenizer from `folder` unless given its own (an engine's `tokenizer`
    option): raises, naming the first id whose token differs, unless every side's gives ids the same meaning."""
    from rlparity.models.tokenizer_info import require_same_tokenizer, tokenizer_info

    sides = [(label, tokenizer_info(Path(tokenizer or folder))) for label, tokenizer in tokenizers.items()]
    for label, info in sides[1:]:
        require_same_tokenizer(sides[0][0], sides[0][1], label, info)


def require_language_tokenizer(folder: Path | str, model: str) -> None:
    """Raises unless the folder's tokenizer is the one of bundled model `model`'s synthetic language (what the
    reference trainer's tool task is written in), naming the first id that differs."""
    from rlparity.models.language import EOS, PAD
    from rlparity.models.recipe import language_of
    from rlparity.models.specs import load_spec
    from rlparity.models.tokenizer_info import TokenizerInfo, require_same_tokenizer, tokenizer_info

    language = TokenizerInfo(source=f"fixtures/models/{model}.json", tokens=tuple(language_of(load_spec(model)).tokens),
                             eos_token=EOS, pad_token=PAD)
    try:
        require_same_tokenizer(f"checkpoint {folder}", tokenizer_info(Path(folder)), f"model {model!r}", language)
    except RlparityError as exc:
        raise RlparityError(f"the tool task is written in the synthetic language of bundled model {model!r}, so the "
                            f"checkpoint must use that model's tokenizer (give --model the bundled model it was "
                            f"fine-tuned from): {exc}") from exc
