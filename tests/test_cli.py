"""`rlparity check attention` prints the matrix, writes records and sets the exit code."""

from rlparity.cli import main
from rlparity.results import read_records


def test_check_attention_passes_a_correct_backend(tmp_path, capsys):
    results = tmp_path / "r.jsonl"
    code = main(["check", "attention", "--backend", "chunked", "--dtype", "fp32", "--case", "tiny,window_edge_plus1",
                 "--results", str(results)])
    out = capsys.readouterr().out
    assert code == 0
    assert "window_edge_plus1      fp32  dsink_via_dlse" in out
    records = read_records(results)
    assert len(records) == 2 * 7 + 2
    assert {r["verdict"] for r in records} == {"pass"}
    assert records[0]["environment"]["packages"]["torch"]


def test_check_attention_fails_a_planted_bug_and_keeps_going(tmp_path, capsys):
    results = tmp_path / "r.jsonl"
    code = main(["check", "attention", "--backend", "tests.planted_attention:raises", "--dtype", "fp32,bf16",
                 "--case", "tiny,varlen", "--results", str(results)])
    out = capsys.readouterr().out
    assert code == 1
    assert out.count("raised RuntimeError: planted failure inside the kernel") == 2 * 2 * 7 + 2 * 2
    assert "32 failing cells" in out


def test_bad_arguments_are_one_line_errors(capsys):
    assert main(["check", "attention", "--backend", "chunked", "--dtype", "fp8"]) == 2
    assert "unknown dtype 'fp8'" in capsys.readouterr().err
