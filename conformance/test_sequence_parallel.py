"""Is sink attention still right under sequence parallelism, forward and backward?

The matrix is world size (1, 2, 4) x scheme (Ulysses, ring) x inner kernel x mask family (full
causal, a sliding window that crosses shard boundaries, packed varlen, packed varlen with a window)
x dtype x quantity (out, lse, dq, dk, dv, dsink via dO, dsink via dLSE). Each rank runs the scheme on
its shard; outputs and gradients are assembled across ranks (dSink summed over ranks) and judged
against the single-process float64 reference by the tolerance rule of rlparity.metrics, the naive
baseline being the reference run in the candidate's dtype (rlparity.parallel.check).

Worker processes start once per world size: gloo on CPU, nccl where there is a GPU per rank.
The implementations are rlparity's ulysses and ring, or those named with --sequence-parallel (a
name or module:function, the interface of rlparity.parallel.interface). Those that take an inner
kernel run with `reference` and `chunked`, or the ones named with --attention-backend.
"""

import pytest
import torch

from rlparity.parallel.check import QUANTITIES, SCHEMES, SP_CASES, SP_DTYPES, MeasureGroup, to_records
from rlparity.parallel.interface import with_inner_kernels
from rlparity.pytest_plugin import components

pytestmark = pytest.mark.multi_process

WORLDS = (1, 2, 4)
DEFAULT_INNER = ("reference", "chunked")


def pytest_generate_tests(metafunc):
    if "workers" not in metafunc.fixturenames:
        return
    metafunc.parametrize("workers", WORLDS, indirect=True, scope="module", ids=lambda world: f"world{world}")
    inners = metafunc.config.getoption("--attention-backend") or DEFAULT_INNER
    implementations = [implementation for target in components(metafunc.config).sequence_parallel or SCHEMES
                       for implementation in with_inner_kernels(target, inners)]
    params = [pytest.param(implementation, case.name, dtype, quantity,
                           id=f"{implementation.name}-{case.name}-{dtype}-{quantity}")
              for implementation in implementations for case in SP_CASES for dtype in SP_DTYPES
              for quantity in QUANTITIES]
    metafunc.parametrize(("implementation", "case_name", "dtype_name", "quantity"), params)


class _Workers:
    """The worker group of one world size and the measurements it made, one entry per case."""

    def __init__(self, world: int):
        self.world = world
        self.backend = "nccl" if torch.cuda.device_count() >= world else "gloo"
        self.group = MeasureGroup(world, backend=self.backend)
        self.cache = {}

    def measure(self, key, recorder):
        if key not in self.cache:
            measurements = self.group.measure(*key)
            records = to_records(*key, self.world, measurements)
            for record in records:
                record.extra["process_group"] = self.backend
            recorder.record(*records)
            self.cache[key] = {m.quantity: m for m in measurements}
        return self.cache[key]

    def close(self):
        self.group.close()


@pytest.fixture(scope="module")
def workers(request):
    workers = _Workers(request.param)
    yield workers
    workers.close()


def test_sequence_parallel(workers, recorder, implementation, case_name, dtype_name, quantity):
    measurement = workers.measure((implementation, case_name, dtype_name), recorder)[quantity]
    recorder.judge(measurement, details=f"on {workers.world} ranks")
