"""Options and shared fixtures of the conformance suite.

    pytest conformance                                        every registered backend
    pytest conformance --attention-backend pkg.module:attend  the matrix against your own kernel
    pytest conformance --require-cuda                         fail at once when no GPU is visible
"""

import os
from collections import Counter

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through the interpreter; it must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rlparity.errors import RlparityError  # noqa: E402
from rlparity.results import ResultStore, default_results_path  # noqa: E402

_STORE_KEY = pytest.StashKey[ResultStore]()
_BACKENDS_KEY = pytest.StashKey[list]()
_COUNTS_KEY = pytest.StashKey[Counter]()


def pytest_addoption(parser):
    group = parser.getgroup("rlparity")
    group.addoption("--attention-backend", action="append", default=[], metavar="NAME|module:function",
                    help="run the attention matrix against this backend only (repeatable)")
    group.addoption("--device", default=None, help="torch device for the checks (default: cuda if visible, else cpu)")
    group.addoption("--require-cuda", action="store_true", help="fail at once if no CUDA device is visible")
    group.addoption("--results", default=None, help="JSON-lines results file (default: results/<suite>-<time>.jsonl)")


def pytest_configure(config):
    if config.getoption("--require-cuda") and not torch.cuda.is_available():
        raise pytest.UsageError(
            "--require-cuda: no CUDA device is visible (torch.cuda.is_available() is False, torch "
            f"{torch.__version__}); run this session on a GPU machine with a CUDA build of torch"
        )
    config.stash[_BACKENDS_KEY] = _resolve_attention_backends(config.getoption("--attention-backend"))
    path = config.getoption("--results") or default_results_path("conformance")
    config.stash[_STORE_KEY] = ResultStore(path)
    config.stash[_COUNTS_KEY] = Counter()


@pytest.fixture(scope="session")
def result_store(pytestconfig) -> ResultStore:
    return pytestconfig.stash[_STORE_KEY]


@pytest.fixture(scope="session")
def verdict_counts(pytestconfig) -> Counter:
    """(subject, verdict) -> count, for the summary table."""
    return pytestconfig.stash[_COUNTS_KEY]


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    name = pytestconfig.getoption("--device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _resolve_attention_backends(names):
    from rlparity.attention import get_backend, registered_backends

    if not names:
        return registered_backends()
    try:
        return [get_backend(name) for name in names]
    except RlparityError as exc:
        raise pytest.UsageError(str(exc)) from None


def selected_attention_backends(config):
    """The backends named with --attention-backend, else every registered one."""
    return config.stash[_BACKENDS_KEY]


def pytest_terminal_summary(terminalreporter, config):
    store = config.stash.get(_STORE_KEY, None)
    counts = config.stash.get(_COUNTS_KEY, Counter())
    if counts:
        subjects = sorted({subject for subject, _ in counts})
        terminalreporter.section("rlparity verdicts")
        terminalreporter.write_line(f"{'subject':<48} {'pass':>6} {'fail':>6} {'error':>6} {'skip':>6}")
        for subject in subjects:
            row = [counts[(subject, v)] for v in ("pass", "fail", "error", "skip")]
            terminalreporter.write_line(f"{subject:<48} " + " ".join(f"{n:>6}" for n in row))
    if store is not None and store.count:
        terminalreporter.write_line(f"rlparity: {store.count} result records written to {store.path}")


@pytest.fixture(scope="session")
def tiny_checkpoint():
    """The bundled `tiny` GPT-OSS checkpoint folder (built and cached on first use: a few minutes)."""
    from rlparity.models import ensure_model

    return ensure_model("tiny")


@pytest.fixture(scope="session")
def parity_engines(tiny_checkpoint):
    """Engines on `tiny` by side (rlparity.parity.Side): each started on first request, once per session, and
    closed at its end; one that is unavailable, fails to start or dies is remembered as such."""
    from rlparity.parity import EnginePool
    from rlparity.parity.batch import PARITY_MAX_LEN

    with EnginePool(tiny_checkpoint, max_len=PARITY_MAX_LEN) as pool:
        yield pool


@pytest.fixture(scope="session")
def tiny_sft_checkpoint():
    """The RL trainer's starting policy: tiny fine-tuned on the tool format (rlparity.trainer.sft), built once."""
    from rlparity.trainer.sft import sft_checkpoint

    return sft_checkpoint("tiny", log=lambda message: None)
