"""Building, caching and verifying the bundled models (on `micro`, which builds in seconds)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import GptOssForCausalLM

from rlparity.errors import RlparityError
from rlparity.models import ensure_model, load_spec, model_names, open_checkpoint
from rlparity.models.builder import build, build_environment
from rlparity.models.cache import MANIFEST_FILE, weights_environment
from rlparity.models.recipe import recipe_hash
from rlparity.models.specs import FIXTURES_ENV, HASHES_FILE, models_dir

CHECKPOINT_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", MANIFEST_FILE}


def test_family_has_tiny_and_micro():
    assert {"tiny", "micro"} <= set(model_names())


def test_tiny_spec_is_shaped_as_issue_5_asks():
    config = load_spec("tiny").config
    assert 2 <= config["num_hidden_layers"] <= 4 and 128 <= config["hidden_size"] <= 256
    assert config["head_dim"] == 64 and 4 <= config["num_attention_heads"] <= 8
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert config["num_local_experts"] == 8 and config["num_experts_per_tok"] in (2, 4)
    assert 16 <= config["sliding_window"] <= 32
    assert set(config["layer_types"]) == {"sliding_attention", "full_attention"}
    assert config["rope_scaling"]["rope_type"] == "yarn" and config["vocab_size"] >= 1000


def test_unknown_model_names_the_known_ones():
    with pytest.raises(RlparityError, match=r"unknown bundled model 'huge': expected one of \[.*'tiny'"):
        load_spec("huge")


def test_recipe_hash_is_recorded_for_every_model():
    for name in model_names():
        recorded = json.loads((models_dir() / HASHES_FILE).read_text())[name]["recipe_sha256"]
        assert recipe_hash(load_spec(name)) == recorded, name


def test_built_folder_is_a_loadable_checkpoint(micro_checkpoint):
    assert {path.name for path in micro_checkpoint.iterdir()} == CHECKPOINT_FILES
    model = GptOssForCausalLM.from_pretrained(micro_checkpoint)
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    assert model.config.rope_parameters["rope_type"] == "yarn"
    assert open_checkpoint(micro_checkpoint).config["vocab_size"] == 1024


def test_trained_weights_are_not_initialisation(micro_checkpoint):
    weights = load_file(micro_checkpoint / "model.safetensors")
    for layer in range(2):
        router = weights[f"model.layers.{layer}.mlp.router.weight"]
        sinks = weights[f"model.layers.{layer}.self_attn.sinks"]
        assert router.abs().min() > 0 and router.std() > 0.01  # transformers' zero router makes every route a tie
        assert sinks.abs().min() > 0 and sinks.std() > 0.1
    manifest = json.loads((micro_checkpoint / MANIFEST_FILE).read_text())
    assert manifest["train_losses"]["last"] < manifest["train_losses"]["first"] - 2  # ln(1024) = 6.9 at the start


def test_build_is_bitwise_deterministic(micro_checkpoint, tmp_path):
    """What the weights hash relies on: the same recipe on the same machine gives the same bytes."""
    build(load_spec("micro"), tmp_path / "again", log=lambda message: None)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (micro_checkpoint / name).read_bytes()


def test_build_leaves_global_torch_settings_alone(micro_checkpoint):
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.fixture
def private_cache(micro_checkpoint, tmp_path):
    """A copy of the session's micro cache that a test may damage."""
    cache = tmp_path / "cache"
    shutil.copytree(micro_checkpoint.parent, cache / "models")
    return cache, cache / "models" / micro_checkpoint.name


def test_cached_model_is_reused(private_cache):
    cache, folder = private_cache
    before = (folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_model("micro", cache_dir=cache, log=lambda message: None) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == before


def test_corrupt_weights_are_named(private_cache):
    cache, folder = private_cache
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(RlparityError, match=r"corrupt: model.safetensors has sha256 \w+, the manifest recorded \w+"):
        ensure_model("micro", cache_dir=cache, log=lambda message: None)


def test_missing_file_and_missing_manifest_are_named(private_cache):
    cache, folder = private_cache
    (folder / "tokenizer.json").unlink()
    with pytest.raises(RlparityError, match="corrupt: tokenizer.json is missing"):
        ensure_model("micro", cache_dir=cache, log=lambda message: None)
    (folder / MANIFEST_FILE).unlink()
    with pytest.raises(RlparityError, match=f"manifest {MANIFEST_FILE} cannot be read"):
        ensure_model("micro", cache_dir=cache, log=lambda message: None)


def test_force_rebuilds_a_corrupt_cache(private_cache):
    cache, folder = private_cache
    (folder / "model.safetensors").write_bytes(b"garbage")
    assert ensure_model("micro", cache_dir=cache, force=True, log=lambda message: None) == folder
    assert open_checkpoint(folder).config["num_hidden_layers"] == 2


@pytest.fixture
def fixtures_copy(tmp_path, monkeypatch):
    """A copy of fixtures/ that RLPARITY_FIXTURES points at, so hashes.json can be edited."""
    copy = tmp_path / "fixtures"
    shutil.copytree(models_dir(), copy / "models")
    monkeypatch.setenv(FIXTURES_ENV, str(copy))
    return copy / "models"


def edit_hashes(folder, name, change):
    hashes = json.loads((folder / HASHES_FILE).read_text())
    change(hashes[name])
    (folder / HASHES_FILE).write_text(json.dumps(hashes))


def test_recipe_mismatch_with_the_recorded_hash_is_an_error(fixtures_copy, tmp_path):
    edit_hashes(fixtures_copy, "micro", lambda entry: entry.update(recipe_sha256="0" * 64))
    with pytest.raises(RlparityError, match=r"hashes to \w+, but .*records 0{64}.*python -m rlparity.models record"):
        ensure_model("micro", cache_dir=tmp_path / "cache")


def test_unrecorded_model_is_an_error(fixtures_copy, tmp_path):
    edit_hashes(fixtures_copy, "micro", lambda entry: entry.pop("recipe_sha256"))
    with pytest.raises(RlparityError, match="records no recipe hash for 'micro'"):
        ensure_model("micro", cache_dir=tmp_path / "cache")


def test_weights_hash_is_checked_in_the_recorded_environment(fixtures_copy, private_cache):
    cache, _ = private_cache
    here = weights_environment(build_environment())
    edit_hashes(fixtures_copy, "micro", lambda entry: entry.update(weights={"sha256": "f" * 64, "environment": here}))
    with pytest.raises(RlparityError, match="not deterministic here, or the recorded hash is stale"):
        ensure_model("micro", cache_dir=cache, log=lambda message: None)
    elsewhere = here | {"cpu_model": "another CPU"}
    edit_hashes(fixtures_copy, "micro",
                lambda entry: entry.update(weights={"sha256": "f" * 64, "environment": elsewhere}))
    ensure_model("micro", cache_dir=cache, log=lambda message: None)  # last bits legitimately differ elsewhere
