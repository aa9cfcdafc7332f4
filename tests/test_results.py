"""Result records are validated, appended line by line, and carry the environment."""

import pytest

from rlparity.results import Record, ResultStore, environment_fingerprint, read_records


def test_records_append_and_read_back(tmp_path):
    store = ResultStore(tmp_path / "sub" / "r.jsonl")
    store.append(Record("p", "s", "c", "fp32", "pass", error=1e-7, tolerance=1e-6))
    store.append(Record("p", "s", "c2", "bf16", "skip", reason="needs CUDA"))
    rows = read_records(store.path)
    assert [r["case"] for r in rows] == ["c", "c2"]
    assert rows[1]["reason"] == "needs CUDA"
    assert rows[0]["environment"] == environment_fingerprint()


def test_versions_of_out_of_process_engines_join_the_environment(tmp_path):
    store = ResultStore(tmp_path / "r.jsonl")
    versions = {"vllm[float32]": {"vllm": "0.31.0", "torch": "2.13.0+cpu"}}
    store.append(Record("p", "hf vs vllm", "c", "fp32", "pass", engines=versions))
    store.append(Record("p", "hf vs reference", "c", "fp32", "pass"))
    with_engine, without = read_records(store.path)
    assert "engines" not in with_engine and with_engine["environment"]["engines"] == versions
    assert without["environment"] == environment_fingerprint()


def test_unknown_verdict_is_rejected():
    with pytest.raises(ValueError, match="verdict must be one of"):
        Record("p", "s", "c", "fp32", "ok")


def test_fingerprint_names_the_versions_that_matter():
    packages = environment_fingerprint()["packages"]
    assert {"torch", "transformers", "vllm", "sglang", "flash-attn", "triton"} <= set(packages)
    assert packages["torch"]
