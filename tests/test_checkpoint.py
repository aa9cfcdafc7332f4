"""--checkpoint DIR: a user's GPT-OSS folder (here a plain copy of the bundled `micro`, under a name rlparity does
not know) through parity (calibrate, then check), routing, diff and memory; its prompt-set batch and its floors
keyed by content."""

import json
import shutil

import pytest

from rlparity.cli import main
from rlparity.model_option import ModelSource, user_checkpoint
from rlparity.models import checkpoint_sha256
from rlparity.parity.__main__ import main as parity_main
from rlparity.parity.batch import parity_batch, prompt_set
from rlparity.parity.floors import FLOORS_FILE, floors_key
from rlparity.parity.tokens import load_tokenizer


@pytest.fixture(scope="module")
def user_cache(tmp_path_factory):
    """$RLPARITY_CACHE for this module: where a checkpoint's floors and file hashes are kept."""
    cache = tmp_path_factory.mktemp("user-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RLPARITY_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def folder(micro_checkpoint, tmp_path_factory):
    """The user's folder: the checkpoint files only, without rlparity's build manifest."""
    folder = tmp_path_factory.mktemp("user") / "my-gpt-oss"
    shutil.copytree(micro_checkpoint, folder, ignore=shutil.ignore_patterns("rlparity-build.json"))
    return folder


@pytest.fixture(scope="module")
def calibrated(folder, user_cache):
    assert parity_main(["calibrate", "--checkpoint", str(folder)]) == 0
    return user_cache / FLOORS_FILE


def test_the_batch_is_the_prompt_set_in_the_checkpoints_tokenizer(folder):
    batch = parity_batch(user_checkpoint(folder))
    prompts, separator, _ = prompt_set()
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    assert len(batch.token_ids) == len(prompts)
    for ids, prompt_len, entry in zip(batch.token_ids, batch.prompt_len, prompts):
        assert ids == tokenizer.encode(entry["prompt"] + separator + entry["response"], add_special_tokens=False).ids
        assert prompt_len == len(tokenizer.encode(entry["prompt"], add_special_tokens=False).ids)
    # below micro's window (8) nothing; below, around and past a 128-token window, up to four of them
    assert min(batch.lengths) > 8 and min(batch.lengths) < 32 < 128 < max(batch.lengths)
    assert any(len(ids) < 128 for ids in batch.token_ids) and sum(len(ids) > 2 * 128 for ids in batch.token_ids) >= 2
    assert batch.max_len == max(batch.lengths) and batch.model_option == f"--checkpoint {folder}"


def test_the_batch_is_clipped_to_the_models_positions(folder, tmp_path):
    short = tmp_path / "short-context"
    shutil.copytree(folder, short)
    config = json.loads((short / "config.json").read_text())
    config["max_position_embeddings"] = 64
    (short / "config.json").write_text(json.dumps(config))
    batch = parity_batch(user_checkpoint(short))
    assert max(batch.lengths) == 63  # one short of the model's positions: vLLM scores by generating one more
    assert all(1 <= p < n for p, n in zip(batch.prompt_len, batch.lengths))


def test_the_content_hash_follows_the_bytes_not_the_folder(folder, user_cache, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(folder, moved)
    assert checkpoint_sha256(moved) == checkpoint_sha256(folder)
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps(config | {"initializer_range": 0.03}))
    assert checkpoint_sha256(moved) != checkpoint_sha256(folder)
    cached = json.loads((user_cache / "checkpoint-hashes.json").read_text())
    assert str((moved / "model.safetensors").resolve()) in cached


def test_calibrated_floors_are_kept_in_the_cache_by_content(calibrated, folder):
    table = json.loads(calibrated.read_text())
    key = floors_key(ModelSource(checkpoint=folder.resolve()))
    assert key in table and key.startswith("checkpoint-sha256:")
    assert table[key]["command"] == f"python -m rlparity.parity calibrate --checkpoint {folder.resolve()}"
    assert table[key]["batch"]["prompts"].startswith("parity_prompts.json@")


@pytest.mark.parametrize("sides", [["--a", "hf:float32", "--b", "reference:float64"],
                                   ["--a", "hf:float32", "--b", "hf:float32"]], ids=["naive", "self"])
def test_check_parity_on_the_checkpoint(calibrated, folder, tmp_path, capsys, sides):
    results = tmp_path / "parity.jsonl"
    code = main(["check", "parity", "--checkpoint", str(folder), *sides, "--results", str(results)])
    out = capsys.readouterr().out
    assert code == 0, out
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert records[-1]["verdict"] == "pass" and records[-1]["case"].startswith("checkpoint:my-gpt-oss:parity_prompts")


def test_a_checkpoint_without_floors_names_the_command_that_calibrates_them(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RLPARITY_CACHE", str(tmp_path / "empty-cache"))
    assert main(["check", "parity", "--checkpoint", str(folder), "--b", "reference:float64"]) == 2
    err = capsys.readouterr().err
    assert f"measure them with `python -m rlparity.parity calibrate --checkpoint {folder.resolve()}`" in err
    assert err.count("\n") == 1


def test_routing_on_the_checkpoint(folder, tmp_path, capsys):
    results = tmp_path / "routing.jsonl"
    code = main(["routing", "--a", "reference", "--b", "hf", "--checkpoint", str(folder), "--sequences", "3",
                 "--length", "40", "--results", str(results)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "routing.agreement: pass" in out and "120 tokens" in out


def test_diff_on_the_checkpoint(folder, tmp_path, capsys):
    results = tmp_path / "diff.jsonl"
    code = main(["diff", "--a", "hf", "--b", "reference:float64", "--checkpoint", str(folder), "--tokens", "40",
                 "--results", str(results)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "no capture point is above its noise floor" in out
    (record,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert record["case"].startswith("checkpoint:my-gpt-oss:40tok:parity_prompts.json@")


def test_memory_reads_the_folders_config_alone(folder, tmp_path, capsys):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(folder / "config.json", config_only)
    assert main(["memory", "--checkpoint", str(config_only), "--tokens", "256", "--budget", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {config_only}" in out and "2 layers, 4 experts top-2" in out and "fits" in out
    assert main(["memory", "--checkpoint", str(config_only), "--tokens", "256", "--budget", "1KiB"]) == 1
