"""Shared fixtures of the conformance suite, and its one recording path.

The options (--attention-backend, --engine, --checkpoint, --sequence-parallel, --device, --require-cuda,
--results) come from rlparity's pytest plugin (rlparity.pytest_plugin), installed with the package:

    pytest conformance                                        every registered backend and engine
    pytest conformance --attention-backend pkg.module:attend  the attention checks against your own kernel
    rlparity conformance ...                                  the same, from an installed rlparity

Every check goes through the `recorder` fixture: it writes the check's records to the results file, counts
their verdicts for the summary and the exit status, and judges the test (skip with the reason, or fail).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through the interpreter; it must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rlparity.pytest_plugin import Verdicts, conformance_run  # noqa: E402
from rlparity.results import ERROR, FAIL, SKIP, Record, ResultStore  # noqa: E402
from rlparity.tally import FIXED, KNOWN  # noqa: E402


def pytest_configure(config):
    conformance_run(config)


class Recorder:
    """Records, counts and judges. `outcome` is anything with a verdict and a reason (a Record, a Measurement)."""

    def __init__(self, verdicts: Verdicts):
        self._verdicts = verdicts

    @property
    def store(self) -> ResultStore:
        """The results file, for components that write records of their own (a trainer's per-step records)."""
        return self._verdicts.store

    def record(self, *records: Record) -> None:
        for record in records:
            self._verdicts.add(record)

    def judge(self, outcome, details: str = "") -> None:
        """A known finding's record (rlparity.findings, --known-findings) is an expected failure: xfail when it
        fails, a failure when it passes."""
        if isinstance(outcome, Record):
            verdict, finding = self._verdicts.classify(outcome)
            if verdict == KNOWN:
                pytest.xfail(f"known finding: {finding.describe()}")
            if verdict == FIXED:
                pytest.fail(f"known finding no longer reproduces: {finding.describe()}; remove it from the findings "
                            "file", pytrace=False)
        if outcome.verdict == SKIP:
            pytest.skip(outcome.reason)
        if outcome.verdict in (FAIL, ERROR):
            pytest.fail(f"{outcome.verdict}: {outcome.reason}" + (f"\n{details}" if details else ""), pytrace=False)

    def check(self, record: Record, details: str = "") -> None:
        """Records one check's record and judges the test by it."""
        self.record(record)
        self.judge(record, details)


@pytest.fixture(scope="session")
def recorder(pytestconfig) -> Recorder:
    from rlparity.pytest_plugin import verdicts

    return Recorder(verdicts(pytestconfig))


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    name = pytestconfig.getoption("--device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@pytest.fixture(scope="session")
def model_source(pytestconfig):
    """The model the suite runs on: the user's --checkpoint folder (checked when pytest started), else `tiny`."""
    from rlparity.model_option import ModelSource
    from rlparity.pytest_plugin import components

    folder = components(pytestconfig).checkpoint
    return ModelSource(checkpoint=folder) if folder is not None else ModelSource(name="tiny")


@pytest.fixture(scope="session")
def tiny_checkpoint(model_source):
    """The checkpoint folder: the user's (--checkpoint DIR), else the bundled `tiny` (built and cached on first use:
    a few minutes)."""
    return model_source.folder(log=lambda message: None)


@pytest.fixture(scope="session")
def model_batch(model_source):
    """The model's parity batch: tiny's synthetic language, or the prompt set in the checkpoint's tokenizer."""
    from rlparity.parity.batch import parity_batch

    return parity_batch(model_source)


@pytest.fixture(scope="session")
def parity_engines(tiny_checkpoint, model_batch):
    """Engines on the model by side (rlparity.parity.Side): each started on first request, once per session, and
    closed at its end; one that is unavailable, fails to start or dies is remembered as such."""
    from rlparity.parity import EnginePool

    with EnginePool(tiny_checkpoint, max_len=model_batch.max_len) as pool:
        yield pool


@pytest.fixture(scope="session")
def tiny_sft_checkpoint():
    """The RL trainer's starting policy: tiny fine-tuned on the tool format (rlparity.trainer.sft), built once."""
    from rlparity.trainer.sft import sft_checkpoint

    return sft_checkpoint("tiny", log=lambda message: None)
