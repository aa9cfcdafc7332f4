"""Session fixtures for rlparity's own tests: the `micro` bundled model, built once per session."""

import pytest

import rlparity.engines
from rlparity.models import ensure_model


@pytest.fixture(scope="session")
def micro_checkpoint(tmp_path_factory):
    """The `micro` checkpoint folder, built (seconds) into a cache private to this test session."""
    return ensure_model("micro", cache_dir=tmp_path_factory.mktemp("rlparity-cache"), log=lambda message: None)


@pytest.fixture(scope="session")
def reference_micro(micro_checkpoint):
    from rlparity.engines import open_engine

    return open_engine("reference", micro_checkpoint)


@pytest.fixture(scope="session")
def hf_micro(micro_checkpoint):
    from rlparity.engines import open_engine

    return open_engine("hf", micro_checkpoint, dtype="float32")


def language_sequences(vocab_size: int, lengths, seed: int = 7) -> list[list[int]]:
    """Seeded sequences of the given lengths from the bundled synthetic language (one block, cut per row)."""
    from rlparity.models.language import Language

    block = next(Language(vocab_size, seed=0).batches(seed=seed, batch=len(lengths), seq_len=max(lengths)))
    return [row[:length] for row, length in zip(block, lengths)]


# The engine tests' batch: six micro sequences of unequal lengths (so a batch carries padding), their prompts
# from one token to one short of the whole sequence.
ENGINE_SEQUENCE_LENGTHS = (48, 41, 33, 48, 40, 36)
ENGINE_PROMPT_LENGTHS = (12, 1, 20, 47, 8, 16)


@pytest.fixture(scope="module")
def engine_sequences(reference_micro):
    return language_sequences(reference_micro.config["vocab_size"], ENGINE_SEQUENCE_LENGTHS)


@pytest.fixture
def forget_user_engines(monkeypatch):
    """The engines a test registers (--engine NAME=module:Class) go with it: the registry is the process's, and
    other tests list it."""
    monkeypatch.setattr(rlparity.engines, "_ENGINES", dict(rlparity.engines._ENGINES))
    monkeypatch.setattr(rlparity.engines, "_USER_ENGINES", set(rlparity.engines._USER_ENGINES))
