"""Does every attention path honour the sinks, forward and backward?

The matrix is backend x dtype x shape family x quantity (out, lse, dq, dk, dv, dsink via dO, dsink
via dLSE), each judged against the float64 reference by rlparity.metrics' tolerance rule, plus a
sink-sensitivity check per backend. One JSON record per cell goes to the results file.
"""

import itertools

import pytest
import torch

from rlparity.attention import flex
from rlparity.attention.cases import CASES, CASES_BY_NAME, DTYPE_NAMES, LARGE_CASES
from rlparity.attention.matrix import QUANTITIES, SENSITIVITY_CASE, measure, sink_sensitivity, to_records
from rlparity.attention.registry import Backend
from rlparity.pytest_plugin import selected_attention_backends

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# FlexAttention as training code runs it, compiled. Every case compiles its own kernels (tens of seconds
# each), so it runs a few cases in the training dtype rather than the matrix: the window edge, packing,
# and both GPT-OSS masks at size. Run with the flex backend (the default selection includes it).
COMPILED_FLEX = Backend("flex_compiled", "rlparity.attention.flex:attend_compiled",
                        "torch.compile(flex_attention), sink folded in through its lse",
                        probe=flex.probe, backward_probe=flex.backward_probe, gpu_only=True)
COMPILED_FLEX_CASES = ("window_edge", "varlen_window", "gpt_oss_causal_2k", "gpt_oss_window_2k")
COMPILED_FLEX_DTYPE = torch.bfloat16


def pytest_generate_tests(metafunc):
    backends = selected_attention_backends(metafunc.config)
    marks = lambda backend, case=None: (  # noqa: E731
        [pytest.mark.gpu] if backend.gpu_only or case in LARGE_CASES else [])
    if metafunc.definition.name == "test_sink_attention":
        params = [
            pytest.param(backend, dtype, case, quantity, marks=marks(backend, case),
                         id=f"{backend.name}-{DTYPE_NAMES[dtype]}-{case.name}-{quantity}")
            for backend, dtype, case, quantity in itertools.product(backends, DTYPES, CASES + LARGE_CASES,
                                                                    QUANTITIES)
        ]
        metafunc.parametrize(("backend", "dtype", "case", "quantity"), params)
    elif metafunc.definition.name == "test_compiled_flex":
        params = [pytest.param(CASES_BY_NAME[name], quantity, marks=[pytest.mark.gpu],
                               id=f"flex_compiled-{DTYPE_NAMES[COMPILED_FLEX_DTYPE]}-{name}-{quantity}")
                  for name in COMPILED_FLEX_CASES for quantity in QUANTITIES]
        if not any(backend.name == "flex" for backend in backends):
            params = [pytest.param(None, None, id="flex_compiled", marks=pytest.mark.skip(
                reason="compiled flex runs with the flex backend: add --attention-backend flex"))]
        metafunc.parametrize(("case", "quantity"), params)
    elif metafunc.definition.name == "test_sink_sensitivity":
        params = [pytest.param(backend, dtype, marks=marks(backend), id=f"{backend.name}-{DTYPE_NAMES[dtype]}")
                  for backend, dtype in itertools.product(backends, DTYPES)]
        metafunc.parametrize(("backend", "dtype"), params)


class _Matrix:
    """Measures each (backend, case, dtype) once, for all its quantities, and records them."""

    def __init__(self, recorder, device):
        self.recorder, self.device = recorder, device
        self.cache = {}

    def get(self, key, compute, backend, case, dtype, prefix):
        """{quantity: its record}, measured once per (backend, case, dtype)."""
        if key not in self.cache:
            measurements = compute(backend, case, dtype, self.device)
            records = to_records(backend, case, dtype, measurements, prefix)
            self.recorder.record(*records)
            self.cache[key] = {m.quantity: record for m, record in zip(measurements, records)}
        return self.cache[key]


@pytest.fixture(scope="module")
def matrix(recorder, device):
    return _Matrix(recorder, device)


def test_sink_attention(matrix, backend, dtype, case, quantity):
    if case in LARGE_CASES and matrix.device.type != "cuda":
        pytest.skip(f"{case.name} is a GPT-OSS-sized case for CUDA (its float64 reference holds 2 GiB score "
                    "tensors): run `nox -s gpu_conformance` on a GPU machine")
    records = matrix.get(("matrix", backend.name, case.name, dtype), measure, backend, case, dtype,
                              "sink_attention")
    matrix.recorder.judge(records[quantity])


def test_compiled_flex(matrix, case, quantity):
    records = matrix.get(("matrix", COMPILED_FLEX.name, case.name, COMPILED_FLEX_DTYPE), measure, COMPILED_FLEX,
                              case, COMPILED_FLEX_DTYPE, "sink_attention")
    matrix.recorder.judge(records[quantity])


@pytest.mark.parametrize("check", ["sinks_change_out", "dsink_nonzero"])
def test_sink_sensitivity(matrix, backend, dtype, check):
    case = CASES_BY_NAME[SENSITIVITY_CASE]
    records = matrix.get(("sensitivity", backend.name, dtype), sink_sensitivity, backend, case, dtype,
                              "sink_sensitivity")
    matrix.recorder.judge(records[check])
