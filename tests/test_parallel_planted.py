"""The sequence-parallel conformance check catches the ways public frameworks broke the sinks.

It runs the very function the conformance suite and `rlparity check sequence-parallel` run
(rlparity.parallel.check.measure_sp) on two ranks, with the planted implementations of
tests/planted_parallel.py given as a user gives theirs ("module:function") in place of the real ones.
"""

import pytest

from rlparity.parallel.check import QUANTITIES, SCHEMES, MeasureGroup
from rlparity.parallel.interface import SPImplementation
from rlparity.results import FAIL, PASS

pytestmark = pytest.mark.multi_process

WORLD = 2


@pytest.fixture(scope="module")
def two_ranks():
    group = MeasureGroup(WORLD, backend="gloo")
    yield group
    group.close()


def verdicts(group, implementation, case_name, dtype_name="fp32"):
    return {m.quantity: m for m in group.measure(implementation, case_name, dtype_name)}


@pytest.mark.parametrize("case_name", ["sp_causal", "sp_window_cross", "sp_varlen"])
def test_ring_adding_the_sink_once_per_block_fails_forward_and_backward(two_ranks, case_name):
    results = verdicts(two_ranks, "tests.planted_parallel:ring_sink_per_block", case_name)
    # Rank 1's queries see two blocks, so their normaliser holds the sink twice.
    assert {q: results[q].verdict for q in ("out", "lse", "dq", "dk", "dv")} == dict.fromkeys(
        ("out", "lse", "dq", "dk", "dv"), FAIL)
    assert FAIL in (results["dsink_via_do"].verdict, results["dsink_via_dlse"].verdict)


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_ulysses_giving_every_rank_all_the_sinks_fails_every_quantity(two_ranks, dtype_name):
    results = verdicts(two_ranks, "tests.planted_parallel:ulysses_all_sinks", "sp_window_cross", dtype_name)
    failing = {q for q, m in results.items() if m.verdict == FAIL}
    assert failing == set(QUANTITIES), {q: (m.verdict, m.reason) for q, m in results.items()}


def test_the_real_schemes_pass_the_same_cases(two_ranks):
    for scheme in SCHEMES:
        results = verdicts(two_ranks, SPImplementation(scheme, "chunked"), "sp_window_cross")
        assert {q: m.verdict for q, m in results.items()} == dict.fromkeys(QUANTITIES, PASS), scheme
