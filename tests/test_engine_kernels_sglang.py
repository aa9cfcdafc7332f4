"""SGLang's Triton attention kernels (rlparity.attention.sglang_triton) through the matrix, interpreted on CPU.

Each kernel runs as SGLang's Triton backend calls it (token pool with scattered slots, kv_indptr / kv_indices,
qo_indptr, KV splits from SGLang's own rule) and is judged by the matrix's rule against the float64 reference.
Skipped with what to install where sglang's kernels are not importable: the `tests` session has no sglang,
`nox -s engine_kernels` has.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # SGLang's kernels are interpreted only if this is set before they are defined (imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rlparity.attention import get_backend, sglang_triton  # noqa: E402
from rlparity.attention.cases import CASES_BY_NAME, attend_kwargs, make_inputs  # noqa: E402
from rlparity.attention.matrix import measure, sink_sensitivity  # noqa: E402
from rlparity.attention.paged import token_batch  # noqa: E402
from rlparity.attention.registry import AVAILABLE  # noqa: E402
from rlparity.metrics import K_FORWARD, max_abs_error, rounding_floor, tolerance  # noqa: E402
from rlparity.reference import sink_attention  # noqa: E402
from rlparity.results import PASS, SKIP  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SGLANG_REASON = sglang_triton.probe(DEVICE)
needs_sglang = pytest.mark.skipif(SGLANG_REASON != AVAILABLE, reason=SGLANG_REASON)


def _verdicts(backend: str, case: str, dtype=torch.float32) -> dict:
    return {m.quantity: m for m in measure(get_backend(backend), CASES_BY_NAME[case], dtype, DEVICE)}


@needs_sglang
@pytest.mark.parametrize("backend", ["sglang_p1_extend", "sglang_p16_extend"])
def test_extend_kernel_passes_new_tokens_on_cached_prefixes(backend):
    measurements = _verdicts(backend, "extend")
    for quantity in ("out", "lse"):
        assert measurements[quantity].verdict == PASS, measurements[quantity].reason
    assert "forward-only" in measurements["dq"].reason


@needs_sglang
@pytest.mark.parametrize("backend", ["sglang_p1_decode", "sglang_p16_decode"])
def test_decode_kernel_passes_a_case_cut_into_several_kv_splits(backend):
    case = CASES_BY_NAME["decode_long"]
    splits, _ = sglang_triton.num_kv_splits(torch.tensor(case.seqlens_k, device=DEVICE), case.heads_q, case.heads_kv)
    used = [sglang_triton.splits_used(length, count) for length, count in zip(case.seqlens_k, splits.tolist())]
    assert min(used) > 1, f"decode_long fills {used} KV splits: the reduce stage merges nothing"
    measurements = _verdicts(backend, "decode_long")
    assert measurements["out"].verdict == PASS, measurements["out"].reason
    assert measurements["lse"].verdict == SKIP and "lse-less" in measurements["lse"].reason
    # the matrix's own sensitivity case has several queries per sequence; the decode kernel's is checked here
    moved = {m.quantity: m for m in sink_sensitivity(get_backend(backend), case, torch.float32, DEVICE)}
    assert moved["sinks_change_out"].verdict == PASS, moved["sinks_change_out"].reason


def _error_and_tolerance(candidate, inputs, kwargs) -> tuple[float, float]:
    """The matrix's rule for out: error against float64 <= K_FORWARD x the naive float32 error + rounding floor."""
    exact, _ = sink_attention(*(t.double() for t in inputs.tensors()), **kwargs)
    naive, _ = sink_attention(*inputs.tensors(), **kwargs)
    allowed = tolerance(max_abs_error(naive, exact), rounding_floor(exact, inputs.q.dtype), K_FORWARD)
    return max_abs_error(candidate, exact), allowed


@needs_sglang
def test_decode_under_a_window_reads_one_key_short():
    """The finding (SGLang 0.5.23): the Triton backend's decode rail holds window - 1 keys, so the kernel computes
    attention over a window one token narrower; handed the whole window it matches the reference."""
    case = CASES_BY_NAME["window_edge_query"]
    inputs = make_inputs(case, torch.float32, DEVICE)
    kwargs = attend_kwargs(case, inputs)
    as_sglang, _ = sglang_triton.attend_decode(*inputs.tensors(), **kwargs)
    whole_window, _ = sglang_triton.attend_decode(*inputs.tensors(), **kwargs, window_keys=case.window)

    error, allowed = _error_and_tolerance(as_sglang, inputs, kwargs)
    assert error > allowed, "SGLang's decode window matches GPT-OSS's: the finding is gone, update the README"
    error, allowed = _error_and_tolerance(as_sglang, inputs, kwargs | {"window": case.window - 1})
    assert error <= allowed, f"not the one-key-short window either: error {error:.3g} > {allowed:.3g}"
    error, allowed = _error_and_tolerance(whole_window, inputs, kwargs)
    assert error <= allowed, f"the kernel given the whole window: error {error:.3g} > {allowed:.3g}"


@needs_sglang
@pytest.mark.skipif(DEVICE.type != "cpu", reason="an interpreter limit, for machines without CUDA")
def test_bfloat16_is_a_skip_under_the_interpreter_not_a_failure():
    measurements = _verdicts("sglang_p1_extend", "tiny", torch.bfloat16)
    assert {m.verdict for m in measurements.values()} == {SKIP}
    assert "interpreter" in measurements["out"].reason


def test_window_rail_is_the_last_window_minus_one_slots_of_each_sequence():
    """SGLang's update_sliding_window_buffer with GPT-OSS's sliding_window_size = window - 1 (no sglang needed)."""
    case = CASES_BY_NAME["decode_batch_window"]
    inputs = make_inputs(case, torch.float32)
    batch = token_batch(*inputs.tensors()[:3], inputs.cu_seqlens)
    _, _, req_to_token = sglang_triton._token_pool(batch, page_size=16)
    kv_indptr, kv_indices = sglang_triton._kv_rails(req_to_token, batch.k_lens, case.window - 1, "cpu")
    lengths = [min(length, case.window - 1) for length in case.seqlens_k]
    assert kv_indptr.tolist() == [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    expected = torch.cat([row[len(row) - taken:] for row, taken in zip(req_to_token, lengths)])
    assert torch.equal(kv_indices, expected)
    # the 37-key sequence's rail (positions 22..36) crosses from its second page into its third
    pages = (req_to_token[0][22:37] // 16).unique()
    assert pages.numel() == 2 and (req_to_token[0][31] + 1 != req_to_token[0][32])


@pytest.mark.skipif(SGLANG_REASON == AVAILABLE, reason="sglang's kernels are installed here")
def test_probe_says_what_to_install_or_set():
    assert "pip install --no-deps sglang==" in SGLANG_REASON or "TRITON_INTERPRET" in SGLANG_REASON, SGLANG_REASON
