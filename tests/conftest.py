"""Session fixtures for rlparity's own tests: the `micro` bundled model, built once per session."""

import pytest

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


def language_sequences(vocab_size: int, lengths) -> list[list[int]]:
    """Seeded sequences of the given lengths from the bundled synthetic language (one block, cut per row)."""
    from rlparity.models.language import Language

    block = next(Language(vocab_size, seed=0).batches(seed=7, batch=len(lengths), seq_len=max(lengths)))
    return [row[:length] for row, length in zip(block, lengths)]
