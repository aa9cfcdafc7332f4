"""`rlparity check sequence-parallel` on a user's implementation, as a user runs it: a correct one
passes, one that hands every rank all the sinks fails, one that supports nothing exits 3, a rank
that crashes is named promptly, and a function that cannot be called as the interface says is a
usage error. Few cases and one dtype, so that each run takes seconds."""

import time

import pytest

from rlparity.cli import main
from rlparity.parallel.check import QUANTITIES
from rlparity.parallel.interface import SPImplementation, get_implementation
from rlparity.results import ERROR, FAIL, PASS, SKIP, read_records

pytestmark = pytest.mark.multi_process

USER = "tests.user_sequence_parallel:attend"
ALL_SINKS = "tests.planted_parallel:ulysses_all_sinks"
# Starting a group of ranks and the cases below take seconds; a hang would take the 60 s collective timeout.
PROMPT_S = 30.0


def check(tmp_path, capsys, impl, *options, case="sp_window_cross"):
    """(exit code, stdout, records written) of one run of the command."""
    results = tmp_path / f"{impl.replace(':', '-')}.jsonl"
    code = main(["check", "sequence-parallel", "--impl", impl, "--case", case, "--dtype", "fp32",
                 "--results", str(results), *options])
    records = read_records(results) if results.exists() else []
    return code, capsys.readouterr().out, records


def test_a_user_ulysses_passes_on_two_and_four_ranks(tmp_path, capsys):
    code, out, records = check(tmp_path, capsys, USER, "--world", "2", "--world", "4")
    assert code == 0, out
    assert {(r["extra"]["world_size"], r["verdict"]) for r in records} == {(2, PASS), (4, PASS)}
    assert len(records) == 2 * len(QUANTITIES)
    assert f"{USER}: {2 * len(QUANTITIES)} passed, 0 failed, 0 errored, 0 skipped" in out


def test_a_ulysses_handing_every_rank_all_the_sinks_fails(tmp_path, capsys):
    code, out, records = check(tmp_path, capsys, ALL_SINKS, "--world", "2", case="sp_varlen")
    assert code == 1
    assert {r["property"].split(".")[1]: r["verdict"] for r in records} == dict.fromkeys(QUANTITIES, FAIL), out
    assert f"{ALL_SINKS}     2 sp_varlen         fp32  dsink_via_dlse" in out


def test_on_one_rank_every_slice_is_the_whole_sinks_so_it_passes(tmp_path, capsys):
    # The planted bug needs more than one rank to show: the world of one is no evidence either way.
    code, out, _ = check(tmp_path, capsys, ALL_SINKS, "--world", "1")
    assert code == 0, out


def test_an_implementation_supporting_nothing_exits_3(tmp_path, capsys):
    code, out, records = check(tmp_path, capsys, "tests.planted_parallel:not_implemented", "--world", "2",
                               case="sp_causal,sp_varlen")
    assert code == 3
    assert {r["verdict"] for r in records} == {SKIP}
    assert "nothing was checked for tests.planted_parallel:not_implemented" in out
    skip_lines = [line.split() for line in out.split("skipped, by reason:\n", 1)[1].splitlines()
                  if line.startswith("  ")]
    assert skip_lines == [[str(2 * len(QUANTITIES)), "x", "tests.planted_parallel:not_implemented:", "not",
                           "supported:", "sequence", "parallelism", "is", "not", "implemented", "yet"]]


@pytest.mark.parametrize("impl, message", [
    ("tests.planted_parallel:rank1_dies", "rank 1 of 2 exited with code 7"),
    ("tests.planted_parallel:rank1_raises", "rank 1 of 2 raised RankRaised in measure_sp: "
                                            "tests.planted_parallel:rank1_raises raised RuntimeError: injected failure "
                                            "on rank 1"),
])
def test_a_failing_rank_is_named_with_its_error_without_a_hang(tmp_path, capsys, impl, message):
    start = time.monotonic()
    code, out, records = check(tmp_path, capsys, impl, "--world", "2")
    assert time.monotonic() - start < PROMPT_S
    assert code == 1
    assert {r["verdict"] for r in records} == {ERROR}
    assert message in out
    assert out.count("every quantity") == 1  # the case errored as a whole: one row, not one per quantity


@pytest.mark.parametrize("impl, options, message", [
    ("nope", [], "unknown sequence-parallel attention 'nope': expected one of ulysses, ring or a 'module:function'"),
    ("rlparity.reference:sink_attention", [], "expected signature attend(q, k, v, sinks, *, causal, window, scale, "
                                              "cu_seqlens, group), got sink_attention("),
    (USER, ["--inner", "chunked"], "an inner kernel ('chunked') was given, but attend takes no `inner` keyword"),
    ("ring", ["--inner", "nope"], "unknown attention backend 'nope'"),
    ("ring", ["--world", "0"], "--world counts ranks and must be >= 1, got [0]"),
])
def test_what_cannot_run_is_a_usage_error(tmp_path, capsys, impl, options, message):
    code = main(["check", "sequence-parallel", "--impl", impl, "--results", str(tmp_path / "r.jsonl"), *options])
    assert code == 2
    assert message in capsys.readouterr().err


def test_rlparity_implementations_enter_through_the_same_door():
    assert get_implementation("ulysses") == SPImplementation("ulysses")
    assert get_implementation("ring", inner="reference").name == "ring[reference]"
    assert get_implementation(USER).name == USER
