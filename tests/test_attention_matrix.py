"""The sink-attention matrix tells correct backends from planted bugs, and reports broken ones in one line."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlparity.attention import get_backend
from rlparity.attention.cases import CASES, CASES_BY_NAME
from rlparity.attention.matrix import QUANTITIES, measure, sink_sensitivity
from rlparity.results import ERROR, FAIL, PASS, SKIP

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
PLANTED = "tests.planted_attention:"


def verdicts(backend_name, case_names, dtype=torch.float32):
    backend = get_backend(backend_name)
    return {(case, m.quantity): m for case in case_names
            for m in measure(backend, CASES_BY_NAME[case], dtype, CPU)}


@pytest.mark.parametrize("name", ["reference", "chunked", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_correct_backends_pass_every_cell(name, dtype):
    results = verdicts(name, [case.name for case in CASES], dtype)
    failing = {key: m.reason for key, m in results.items() if m.verdict != PASS}
    assert not failing


def test_backend_that_ignores_sinks_fails_forward_backward_and_sensitivity():
    results = verdicts(PLANTED + "ignores_sinks", ["gqa8"])
    assert all(results[("gqa8", q)].verdict == FAIL for q in QUANTITIES)
    sensitivity = sink_sensitivity(get_backend(PLANTED + "ignores_sinks"), CASES_BY_NAME["gqa8"], torch.float32, CPU)
    assert [m.verdict for m in sensitivity] == [FAIL, FAIL]
    assert "ignores the sinks" in sensitivity[0].reason


def test_dsink_with_the_wrong_sign_fails_only_dsink():
    results = verdicts(PLANTED + "dsink_wrong_sign", ["tiny", "varlen"])
    for (case, quantity), m in results.items():
        assert m.verdict == (FAIL if quantity.startswith("dsink") else PASS), (case, quantity)


def test_window_off_by_one_fails_at_the_window_edge_only():
    results = verdicts(PLANTED + "window_off_by_one", ["window_edge", "window_edge_plus1", "window_edge_query", "tiny"])
    # seq == window: no query is old enough to see one key too many, so both agree there.
    assert all(results[("window_edge", q)].verdict == PASS for q in QUANTITIES)
    assert all(results[("window_edge_plus1", q)].verdict == FAIL for q in QUANTITIES)
    assert all(results[("window_edge_query", q)].verdict == FAIL for q in ("out", "lse", "dq", "dk"))
    assert all(results[("tiny", q)].verdict == PASS for q in QUANTITIES)


@pytest.mark.parametrize("planted, message", [
    ("returns_nan", "out holds"),
    ("wrong_shape", "out has shape (1, 24, 4, 64), expected (1, 4, 24, 64)"),
    ("raises", "raised RuntimeError: planted failure inside the kernel"),
])
def test_broken_backend_is_an_error_naming_backend_and_case(planted, message):
    results = verdicts(PLANTED + planted, ["scale"])
    for m in results.values():
        assert m.verdict == ERROR
        assert message in m.reason
        assert f"{PLANTED}{planted} [scale, fp32]" in m.reason
        assert "\n" not in m.reason


def test_unsupported_feature_is_a_skip_with_the_backends_reason(monkeypatch):
    def no_varlen(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
        if cu_seqlens is not None:
            raise NotImplementedError("packed input needs the varlen entry point")
        return get_backend("reference").attend(q, k, v, sinks, causal=causal, window=window, scale=scale)

    monkeypatch.setattr(sys.modules[__name__], "no_varlen", no_varlen, raising=False)
    results = verdicts(f"{__name__}:no_varlen", ["varlen", "tiny"])
    assert {results[("varlen", q)].verdict for q in QUANTITIES} == {SKIP}
    assert "packed input needs the varlen entry point" in results[("varlen", "out")].reason
    assert {results[("tiny", q)].verdict for q in QUANTITIES} == {PASS}


@pytest.mark.slow
def test_conformance_suite_fails_a_planted_backend_end_to_end(tmp_path):
    results = tmp_path / "records.jsonl"
    command = [sys.executable, "-m", "pytest", "conformance/test_sink_attention.py", "-q", "-p", "no:cacheprovider",
               "--attention-backend", PLANTED + "ignores_sinks", "-k", "fp32 and gqa8", "--results", str(results)]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    assert "failed" in run.stdout
    assert f"written to {results}" in run.stdout
    assert results.read_text().count('"verdict": "fail"') >= len(QUANTITIES)
