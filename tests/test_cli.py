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


def test_env_names_the_engines_interpreters_and_their_versions(monkeypatch, tmp_path, capsys):
    import json
    import sys
    from importlib import metadata

    monkeypatch.setenv("RLPARITY_VLLM_PYTHON", sys.executable)  # stands in for a vLLM environment
    monkeypatch.setenv("RLPARITY_SGLANG_PYTHON", str(tmp_path / "no-such-python"))
    assert main(["env"]) == 0
    engines = json.loads(capsys.readouterr().out)["engines"]
    assert engines["vllm"]["python"] == sys.executable
    assert engines["vllm"]["versions"]["torch"] == metadata.version("torch")
    assert "vllm" in engines["vllm"]["versions"]  # asked for, even where it is not installed (None)
    assert "not an executable file" in engines["sglang"]["unavailable"]
