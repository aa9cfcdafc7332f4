"""`rlparity conformance`: the conformance suite installed with rlparity, run against your components.

    rlparity conformance                                               the whole suite (CPU: minutes)
    rlparity conformance --only attention --attention-backend pkg.kernels:attend
    rlparity conformance --only parity,routing --engine mine=pkg.engine:MyEngine --checkpoint ./my-gpt-oss
    rlparity conformance --only sequence-parallel --sequence-parallel pkg.sp:attend
    rlparity conformance --repeat 3 --only attention                   three runs, compared record by record

Every other argument goes to pytest (the suite is pytest, its options come from rlparity's pytest plugin):
`-k window_edge`, `-x`, `--results FILE`. Exit status: 0 every checked cell passed, 1 a cell failed,
2 usage or input error, 3 nothing was checked.

--repeat N runs the suite N times, each in a process of its own writing its own results file (FILE-run<i>.jsonl
for --results FILE, else results/repetition-<time>-<pid>/run-<i>.jsonl), then compares the runs record by record
(rlparity.repetition): every verdict and every number must be the same in each run. Exit status 1 also when any
check differs between runs; each difference is listed with the check's name.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

from rlparity.errors import RlparityError
from rlparity.results import RESULTS_DIR_ENV, read_records
from rlparity.tally import EXIT_FAIL, EXIT_NOTHING_CHECKED, EXIT_PASS, EXIT_USAGE

SUITE_PACKAGE = "rlparity.conformance"
PARTS = {
    "attention": "test_sink_attention",
    "sequence-parallel": "test_sequence_parallel",
    "parity": "test_logprob_parity",
    "routing": "test_routing",
    "memory": "test_memory_ceilings",
    "trainer": "test_trainer",
    "drift": "test_drift",
}
# pytest's own codes for a usage error and an empty selection, and what rlparity calls them.
PYTEST_USAGE_ERROR, PYTEST_NO_TESTS = 4, 5


def suite_targets(only: str | None) -> list[str]:
    """pytest arguments naming the suite's modules: all of it, or the comma-separated parts of `only`."""
    if not only:
        return ["--pyargs", SUITE_PACKAGE]
    names = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in names if name not in PARTS]
    if unknown or not names:
        raise RlparityError(f"--only {only!r}: expected comma-separated parts of {', '.join(PARTS)}")
    return ["--pyargs", *(f"{SUITE_PACKAGE}.{PARTS[name]}" for name in names)]


def split_option(argv: list[str], name: str, example: str) -> tuple[str | None, list[str]]:
    """(the value of the option `name` (`name VALUE` or `name=VALUE`), the rest of argv)."""
    rest, value, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == name:
            if i + 1 == len(argv):
                raise RlparityError(f"{name} needs a value, e.g. {name} {example}")
            value, i = argv[i + 1], i + 2
            continue
        if arg.startswith(f"{name}="):
            value = arg.partition("=")[2]
        else:
            rest.append(arg)
        i += 1
    return value, rest


def split_only(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the value of --only, the rest for pytest)."""
    return split_option(argv, "--only", "attention,parity")


def repeat_count(value: str | None) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or int(value) < 2:
        raise RlparityError(f"--repeat {value!r}: expected a whole number of runs, at least 2")
    return int(value)


def run_suite(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    only, rest = split_only(argv)
    repeat, rest = split_option(rest, "--repeat", "3")
    targets = suite_targets(only)
    if (runs := repeat_count(repeat)) is not None:
        return run_repeated(targets, rest, runs)
    return run_once(targets, rest)


def run_once(targets: list[str], pytest_args: list[str]) -> int:
    """One run of the suite in a process of its own (pytest then imports the suite and rlparity itself: its
    assertion rewriting needs that); rlparity's exit status."""
    status = subprocess.run([sys.executable, "-m", "pytest", *targets, "-p", "no:cacheprovider",
                             *pytest_args]).returncode
    return {PYTEST_USAGE_ERROR: EXIT_USAGE, PYTEST_NO_TESTS: EXIT_NOTHING_CHECKED}.get(status, status)


def run_results_paths(results: str | None, runs: int) -> list[Path]:
    """Where run 1..N write: beside --results FILE as FILE-run<i>.jsonl, else in a folder of their own."""
    if results:
        path = Path(results)
        return [path.with_name(f"{path.name.removesuffix('.jsonl')}-run{i}.jsonl") for i in range(1, runs + 1)]
    folder = Path(os.environ.get(RESULTS_DIR_ENV, "results")) / (
        f"repetition-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}")
    return [folder / f"run-{i}.jsonl" for i in range(1, runs + 1)]


def run_repeated(targets: list[str], pytest_args: list[str], runs: int) -> int:
    """The suite `runs` times, then the runs compared (rlparity.repetition). A usage error stops at the first run."""
    from rlparity.repetition import compare_runs, report

    results, pytest_args = split_option(pytest_args, "--results", "results/run.jsonl")
    paths = run_results_paths(results, runs)
    statuses = []
    for run, path in enumerate(paths, start=1):
        if path.exists():
            raise RlparityError(f"--repeat: run {run}'s results file {path} exists already; expected a new file "
                                "(each run's records are compared as a whole)")
        start = time.monotonic()
        statuses.append(run_once(targets, [*pytest_args, "--results", str(path)]))
        print(f"rlparity repetition: run {run} of {runs} exited {statuses[-1]} after {time.monotonic() - start:.0f}s",
              flush=True)
        if statuses[-1] == EXIT_USAGE:
            return EXIT_USAGE
    records = [read_records(path) if path.exists() else [] for path in paths]
    differences = compare_runs(records)
    for line in report(paths, records, differences):
        print(line)
    if len(set(statuses)) > 1:
        print(f"rlparity repetition: the runs' exit statuses differ: {statuses}")
    if differences or len(set(statuses)) > 1 or EXIT_FAIL in statuses:
        return EXIT_FAIL
    return EXIT_NOTHING_CHECKED if EXIT_NOTHING_CHECKED in statuses else EXIT_PASS
