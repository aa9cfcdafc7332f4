"""`rlparity check attention`: rows for checked cells, skips by reason, and an exit status that is never 0 for
a run that checked nothing."""

import re

import pytest

from rlparity.cli import main
from rlparity.results import read_records

PLANTED = "tests.planted_attention:"
AUTOGRAD_NO_BACKWARD = "You must implement either the backward or vjp method"


def check(capsys, tmp_path, backend, *options):
    code = main(["check", "attention", "--backend", backend, "--results", str(tmp_path / "r.jsonl"), *options])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rows(out: str, verdict: str) -> list[str]:
    return [line for line in out.splitlines() if re.match(rf"^\S+\s+fp\d\d\s+\S+\s+\S*\s+\S*\s+{verdict}\b", line)]


def skip_lines(out: str) -> list[str]:
    lines = out.split("skipped, by reason:\n", 1)[1].splitlines()
    return [line for line in lines if line.startswith("  ")]


def test_forward_only_kernel_passes_on_out_and_lse_with_its_backward_skipped_by_reason(capsys, tmp_path):
    code, out, _ = check(capsys, tmp_path, PLANTED + "forward_only", "--case", "tiny", "--dtype", "fp32")
    assert code == 0
    assert [row.split()[2] for row in rows(out, "pass")] == ["out", "lse", "sinks_change_out"]
    assert not rows(out, "skip")  # skips are not rows
    reason = f"{PLANTED}forward_only: forward-only: its backward raised NotImplementedError: {AUTOGRAD_NO_BACKWARD}"
    [line] = skip_lines(out)
    assert line.startswith(f"      6 x {reason}")  # dq, dk, dv, dsink_via_do, dsink_via_dlse, dsink_nonzero
    assert "3 passing, 0 failing cells, 6 skipped" in out
    records = read_records(tmp_path / "r.jsonl")
    assert sorted(r["verdict"] for r in records) == ["pass"] * 3 + ["skip"] * 6


def test_forward_only_kernel_whose_lse_leaves_the_sink_out_exits_1(capsys, tmp_path):
    code, out, _ = check(capsys, tmp_path, PLANTED + "forward_only_sinkless_lse", "--case", "tiny",
                         "--dtype", "fp32")
    assert code == 1
    [failed] = rows(out, "fail")
    assert failed.split()[:3] == ["tiny", "fp32", "lse"]
    assert "1 failing cells" in out


def test_lse_less_kernel_skips_lse_and_dsink_via_dlse_and_checks_the_rest(capsys, tmp_path):
    code, out, _ = check(capsys, tmp_path, PLANTED + "lse_less", "--case", "tiny", "--dtype", "fp32")
    assert code == 0
    assert [row.split()[2] for row in rows(out, "pass")] == ["out", "dq", "dk", "dv", "dsink_via_do",
                                                             "sinks_change_out", "dsink_nonzero"]
    assert skip_lines(out) == [f"      2 x {PLANTED}lse_less: lse-less: it returns (out, None), so lse and the sink "
                               "gradient through lse are not checked"]


def test_kernel_that_supports_nothing_exits_3_saying_nothing_was_checked(capsys, tmp_path):
    code, out, _ = check(capsys, tmp_path, PLANTED + "supports_nothing", "--case", "tiny,varlen", "--dtype",
                         "fp32,bf16")
    assert code == 3
    assert out.rstrip().endswith(f"nothing was checked for {PLANTED}supports_nothing")
    # (2 cases x 7 quantities + 2 sensitivity checks) x 2 dtypes, in one line
    assert skip_lines(out) == [f"     32 x {PLANTED}supports_nothing: not supported: planted: this kernel supports "
                               "no case"]


def test_skips_are_summarised_one_line_per_reason_with_its_count(capsys, tmp_path):
    code, out, _ = check(capsys, tmp_path, PLANTED + "forward_only", "--case", "tiny,varlen,scale",
                         "--dtype", "fp32,fp64")
    assert code == 0
    lines = skip_lines(out)
    assert len(lines) == 2
    # fp64: 3 cases x 7 quantities + 2 sensitivity checks; fp32: 3 cases x 5 backward quantities + dsink_nonzero
    assert lines[0] == f"     23 x {PLANTED}forward_only does not support fp64 (it supports fp32, bf16, fp16)"
    assert lines[1].startswith(f"     16 x {PLANTED}forward_only: forward-only: ")


def test_a_backend_that_is_not_available_here_checked_nothing(capsys, tmp_path):
    code, out, _ = check(capsys, tmp_path, "fa3", "--case", "tiny", "--dtype", "bf16", "--device", "cpu")
    assert code == 3
    assert "nothing was checked for fa3" in out
    [line] = skip_lines(out)
    assert line.startswith("      9 x fa3 needs a CUDA device")


@pytest.mark.parametrize("options, message", [
    (["--backend", "no_such_backend"], "unknown attention backend 'no_such_backend'"),
    (["--backend", "tests.no_such_module:attend"], "tests.no_such_module"),
    (["--backend", PLANTED + "wrong_signature"], "expected signature attend(q, k, v, sinks, *,"),
    (["--backend", "chunked", "--case", "tiny,nope"], "unknown case 'nope'"),
    (["--backend", "chunked", "--dtype", "fp32,fp8"], "unknown dtype 'fp8'"),
])
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, options, message):
    code = main(["check", "attention", "--results", str(tmp_path / "r.jsonl"), *options])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1
