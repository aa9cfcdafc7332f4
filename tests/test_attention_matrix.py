"""The sink-attention matrix tells correct backends from planted bugs, and reports broken ones in one line."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlparity.attention import get_backend
from rlparity.attention.cases import CASES, CASES_BY_NAME
from rlparity.attention.contract import check_outputs
from rlparity.attention.matrix import (
    BACKWARD_QUANTITIES,
    FORWARD_QUANTITIES,
    LSE_QUANTITIES,
    QUANTITIES,
    measure,
    sink_sensitivity,
)
from rlparity.errors import RlparityError
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
    """Every cell passes, except that eager declares (skips) the decode/extend batches its masks cannot express."""
    results = verdicts(name, [case.name for case in CASES], dtype)
    declared = {case.name for case in CASES if case.seqlens_k} if name == "eager" else set()
    failing = {key: m.reason for key, m in results.items() if m.verdict != PASS and key[0] not in declared}
    assert not failing
    assert all(results[(case, q)].verdict == SKIP for case in declared for q in QUANTITIES)


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


def sensitivity(backend_name, dtype=torch.float32):
    results = sink_sensitivity(get_backend(backend_name), CASES_BY_NAME["gqa8"], dtype, CPU)
    return {m.quantity: m for m in results}


@pytest.mark.parametrize("planted, reason", [
    ("forward_only", "forward-only: its backward raised NotImplementedError: You must implement either the backward"),
    ("no_grad_forward", "forward-only: its out does not require grad"),
])
def test_forward_only_kernel_has_its_forward_judged_and_its_backward_skipped(planted, reason):
    results = verdicts(PLANTED + planted, ["tiny", "varlen", "window_edge_plus1"])
    for (case, quantity), m in results.items():
        if quantity in FORWARD_QUANTITIES:
            assert m.verdict == PASS, (case, quantity, m.reason)
        else:
            assert m.verdict == SKIP and m.reason.startswith(f"{PLANTED}{planted}: {reason}"), (case, quantity)
    checks = sensitivity(PLANTED + planted)
    assert checks["sinks_change_out"].verdict == PASS
    assert checks["dsink_nonzero"].verdict == SKIP and reason in checks["dsink_nonzero"].reason


def test_forward_only_kernel_whose_lse_leaves_the_sink_out_fails_lse():
    results = verdicts(PLANTED + "forward_only_sinkless_lse", ["tiny", "varlen"])
    for case in ("tiny", "varlen"):
        assert results[(case, "out")].verdict == PASS
        assert results[(case, "lse")].verdict == FAIL
        assert "error" in results[(case, "lse")].reason and "> tolerance" in results[(case, "lse")].reason
        assert {results[(case, q)].verdict for q in BACKWARD_QUANTITIES} == {SKIP}


def test_lse_less_kernel_skips_lse_and_dsink_via_dlse_and_judges_the_rest():
    results = verdicts(PLANTED + "lse_less", ["tiny", "varlen"])
    for (case, quantity), m in results.items():
        if quantity in LSE_QUANTITIES:
            assert m.verdict == SKIP
            assert m.reason.startswith(f"{PLANTED}lse_less: lse-less: it returns (out, None)")
        else:
            assert m.verdict == PASS, (case, quantity, m.reason)
    assert sensitivity(PLANTED + "lse_less")["dsink_nonzero"].verdict == PASS


def test_lse_less_kernel_that_ignores_the_sinks_still_fails_out_and_its_gradients():
    results = verdicts(PLANTED + "lse_less_ignores_sinks", ["tiny"])
    assert {results[("tiny", q)].verdict for q in LSE_QUANTITIES} == {SKIP}
    assert {results[("tiny", q)].verdict for q in ("out", "dq", "dk", "dv", "dsink_via_do")} == {FAIL}


def test_a_cut_sink_gradient_fails_the_dsink_cells_and_says_so():
    results = verdicts(PLANTED + "detached_sinks", ["tiny"])
    for quantity in QUANTITIES:
        m = results[("tiny", quantity)]
        if quantity.startswith("dsink"):
            assert m.verdict == FAIL and "the backend returned no gradient for it (the graph is cut)" in m.reason
        else:
            assert m.verdict == PASS, (quantity, m.reason)
    assert sensitivity(PLANTED + "detached_sinks")["dsink_nonzero"].verdict == FAIL


def test_a_backward_that_crashes_is_an_error_of_the_backward_cells_only():
    results = verdicts(PLANTED + "backward_raises", ["tiny"])
    assert {results[("tiny", q)].verdict for q in FORWARD_QUANTITIES} == {PASS}
    for quantity in BACKWARD_QUANTITIES:
        m = results[("tiny", quantity)]
        assert m.verdict == ERROR
        assert "raised RuntimeError: planted failure inside the backward" in m.reason
        assert f"{PLANTED}backward_raises [tiny, fp32]: backward through" in m.reason


def test_kernel_that_supports_nothing_has_every_cell_skipped_with_its_reason():
    measurements = [*verdicts(PLANTED + "supports_nothing", ["tiny"]).values(),
                    *sensitivity(PLANTED + "supports_nothing").values()]
    assert {m.verdict for m in measurements} == {SKIP}
    reasons = {m.reason for m in measurements}
    assert reasons == {f"{PLANTED}supports_nothing: not supported: planted: this kernel supports no case"}


def test_the_contract_takes_none_for_lse_only_where_the_caller_can_do_without():
    q = torch.randn(1, 2, 3, 4)
    out = torch.randn(1, 2, 3, 4)
    assert check_outputs((out, None), q, where="k", lse_optional=True) == (out, None)
    with pytest.raises(RlparityError, match=r"^k: returned \(out, None\), a kernel without lse, but this use needs"):
        check_outputs((out, None), q, where="k")
    poisoned = out.clone()
    poisoned[0, 1, 2, 3] = float("nan")
    with pytest.raises(RlparityError, match="out holds 1 non-finite"):
        check_outputs((poisoned, None), q, where="k", lse_optional=True)


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


@pytest.mark.slow
@pytest.mark.parametrize("planted, status, summary", [
    ("forward_only", 0, "6 passed, 15 skipped"),  # out and lse in 3 dtypes; the 5 backward quantities skipped
    ("supports_nothing", 3, "21 skipped"),
])
def test_conformance_suite_judges_a_forward_only_kernel_and_is_not_green_when_nothing_was_checked(
        tmp_path, planted, status, summary):
    command = [sys.executable, "-m", "pytest", "conformance/test_sink_attention.py", "-q", "-p", "no:cacheprovider",
               "--attention-backend", PLANTED + planted, "-k", "tiny", "--results", str(tmp_path / "r.jsonl")]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == status, run.stdout[-2000:] + run.stderr[-2000:]
    assert summary in run.stdout
    if status == 3:
        assert f"nothing was checked for {PLANTED}{planted}" in run.stdout
