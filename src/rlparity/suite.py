"""`rlparity conformance`: the conformance suite installed with rlparity, run against your components.

    rlparity conformance                                               the whole suite (CPU: minutes)
    rlparity conformance --only attention --attention-backend pkg.kernels:attend
    rlparity conformance --only parity,routing --engine mine=pkg.engine:MyEngine --checkpoint ./my-gpt-oss
    rlparity conformance --only sequence-parallel --sequence-parallel pkg.sp:attend

Every other argument goes to pytest (the suite is pytest, its options come from rlparity's pytest plugin):
`-k window_edge`, `-x`, `--results FILE`. Exit status: 0 every checked cell passed, 1 a cell failed,
2 usage or input error, 3 nothing was checked.
"""

import subprocess
import sys

from rlparity.errors import RlparityError
from rlparity.tally import EXIT_NOTHING_CHECKED, EXIT_USAGE

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


def split_only(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the value of --only, the rest for pytest)."""
    rest, only, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--only":
            if i + 1 == len(argv):
                raise RlparityError("--only needs a value, e.g. --only attention,parity")
            only, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--only="):
            only = arg.partition("=")[2]
        else:
            rest.append(arg)
        i += 1
    return only, rest


def run_suite(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    only, rest = split_only(argv)
    targets = suite_targets(only)
    # A process of its own: pytest then imports the suite and rlparity itself (its assertion rewriting needs that).
    status = subprocess.run([sys.executable, "-m", "pytest", *targets, "-p", "no:cacheprovider", *rest]).returncode
    return {PYTEST_USAGE_ERROR: EXIT_USAGE, PYTEST_NO_TESTS: EXIT_NOTHING_CHECKED}.get(status, status)
