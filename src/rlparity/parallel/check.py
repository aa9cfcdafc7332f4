"""Sequence-parallel attention judged as any backend is: the same matrix, the same tolerance rule.

`sp_backend(implementation)` is, on every rank of a process group, an ordinary backend of the
attention contract: it takes whole tensors, hands this rank its shard, calls the implementation
(the interface of rlparity.parallel.interface), and gathers the output. Gradients come back whole:
the shards' gradients gathered, and the replicated sinks' gradients summed over the ranks, which is
how the full dSink is assembled. Then rlparity.attention.matrix.measure judges it against the
float64 reference computed in one process, with the naive baseline in the candidate's dtype, exactly
as it judges single-process backends.

`rlparity check sequence-parallel`, the conformance suite and rlparity's own tests (planted bugs) all
call `measure_sp` on every rank, through `MeasureGroup`.
"""

import torch.distributed as dist

from rlparity.attention.cases import DTYPES_BY_NAME, Case
from rlparity.attention.contract import check_outputs
from rlparity.attention.matrix import QUANTITIES, Measurement, measure
from rlparity.attention.registry import Backend, get_backend
from rlparity.errors import RlparityError
from rlparity.parallel.comm import GatherShards, ShardOf, SumGradients, world_and_rank
from rlparity.parallel.interface import IMPLEMENTATIONS, SPImplementation
from rlparity.parallel.launch import COLLECTIVE_TIMEOUT_S, RankFailedError, WorkerGroup, rank_device
from rlparity.results import ERROR, Record

SEQ_DIM = 2

# 96 tokens split into 1, 2 or 4 shards of 96, 48, 24. 8 query heads on 2 kv heads: on 4 ranks Ulysses
# has fewer kv heads than ranks and replicates them. Sinks from -4 to 3: some heads dominated by theirs.
_SHAPE = {"heads_q": 8, "heads_kv": 2, "seq_q": 96, "head_dim": 16,
          "sinks": (0.3, 3.0, -1.2, 0.8, -4.0, 1.5, 0.0, -0.6)}
# Sequences straddle every shard boundary (24, 48, 72) and include sequences of length 1.
_SEQLENS = (1, 29, 1, 39, 26)
SP_CASES = (
    Case("sp_causal", batch=2, **_SHAPE),
    # 37 > 24: on 4 ranks the window reaches two shards back, the second only in part; on 2 ranks it
    # reaches into the previous shard only; the ring stops before the blocks it cannot reach.
    Case("sp_window_cross", batch=2, window=37, **_SHAPE),
    Case("sp_varlen", batch=1, seqlens=_SEQLENS, **_SHAPE),
    Case("sp_varlen_window", batch=1, seqlens=_SEQLENS, window=13, **_SHAPE),
)
SP_CASES_BY_NAME = {case.name: case for case in SP_CASES}
SP_DTYPES = ("fp32", "bf16")
SCHEMES = tuple(IMPLEMENTATIONS)  # rlparity's own implementations, by name


def _as_implementation(implementation) -> SPImplementation:
    return SPImplementation(implementation) if isinstance(implementation, str) else implementation


def _agree_on_outputs(result, q_shard, where: str, group) -> None:
    """Check this rank's (out, lse) shard and raise the same error on every rank, so none waits in the gather."""
    try:
        check_outputs(result, q_shard, where=where)
        problem = None
    except RlparityError as exc:
        problem = str(exc)
    world, _ = world_and_rank(group)
    problems = [problem]
    if world > 1:
        problems = [None] * world
        dist.all_gather_object(problems, problem, group=group)
    first = next((p for p in problems if p), None)
    if first:
        raise RlparityError(first)


class RankRaised(BaseException):
    """An implementation raised on this rank. Its peers may be waiting for it in a collective, so this
    ends the task (measure lets it through; the worker group reports it with its traceback and ends
    the ranks left waiting) instead of becoming this rank's verdict while the others hang."""


def global_view(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None, attend, name, group=None):
    """Whole tensors in, whole (out, lse) out, computed by `attend` (the interface) on this rank's shard."""
    world, rank = world_and_rank(group)
    q_shard, k_shard, v_shard = (ShardOf.apply(x, SEQ_DIM, group) for x in (q, k, v))
    try:
        result = attend(q_shard, k_shard, v_shard, SumGradients.apply(sinks, group), causal=causal, window=window,
                        scale=scale, cu_seqlens=cu_seqlens, group=group)
    except (NotImplementedError, RlparityError):
        raise  # a declared gap, or rlparity's input checks: raised on every rank alike, a verdict of the case
    except Exception as exc:
        raise RankRaised(f"{name} raised {type(exc).__name__}: {exc}") from exc
    _agree_on_outputs(result, q_shard, f"{name} on rank {rank} of {world}", group)
    out, lse = result
    return GatherShards.apply(out, SEQ_DIM, group), GatherShards.apply(lse, SEQ_DIM, group)


def sp_backend(implementation, group=None) -> Backend:
    """A backend of the contract running the implementation (a name, "module:function" or SPImplementation)."""
    implementation = _as_implementation(implementation)
    attend = implementation.load()
    world, _ = world_and_rank(group)

    def whole(q, k, v, sinks, **kwargs):
        return global_view(q, k, v, sinks, attend=attend, name=implementation.name, group=group, **kwargs)

    inner = {} if implementation.inner is None else get_backend(implementation.inner)
    capabilities = {} if not inner else {"probe": inner.probe, "backward_probe": inner.backward_probe,
                                         "dtypes": inner.dtypes, "gpu_only": inner.gpu_only}
    return Backend(name=implementation.name, target="rlparity.parallel.check:global_view",
                   summary=f"sequence-parallel over {world} ranks", _loaded=[whole], **capabilities)


def measure_sp(implementation, case_name: str, dtype_name: str) -> list[Measurement]:
    """Run on every rank of the default group: every quantity of the matrix for the implementation on one case."""
    try:
        backend = sp_backend(implementation)
    except RlparityError as exc:  # the same on every rank: it cannot be imported or called as the interface says
        return [Measurement(quantity, ERROR, reason=str(exc)) for quantity in QUANTITIES]
    return measure(backend, SP_CASES_BY_NAME[case_name], DTYPES_BY_NAME[dtype_name], rank_device())


class MeasureGroup:
    """The caller's side: `measure_sp` on a group of `world` ranks, started once and kept while healthy.

    A case that errored (a rank raised inside the implementation, or crashed) may have left the ranks
    out of step in their collectives; the group is then replaced before the next case, and the error
    is reported as that case's verdict.
    """

    def __init__(self, world: int, backend: str | None = None, collective_timeout_s: float = COLLECTIVE_TIMEOUT_S):
        self.world, self.backend, self.collective_timeout_s = world, backend, collective_timeout_s
        self.group = self._start()

    def _start(self) -> WorkerGroup:
        return WorkerGroup(self.world, backend=self.backend, collective_timeout_s=self.collective_timeout_s)

    def measure(self, implementation, case_name: str, dtype_name: str) -> list[Measurement]:
        implementation = _as_implementation(implementation)
        if not self.group.alive:
            self.group = self._start()
        try:
            measurements = self.group.run(measure_sp, implementation, case_name, dtype_name)[0]
        except RankFailedError as exc:
            reason = f"sequence parallel over {self.world} ranks: {exc}"
            return [Measurement(quantity, ERROR, reason=reason) for quantity in QUANTITIES]
        if any(m.verdict == ERROR for m in measurements):
            self.group.close(reason=f"replaced after an error in {implementation.name} on {case_name}")
        return measurements

    def close(self):
        self.group.close()


def to_records(implementation, case_name: str, dtype_name: str, world: int,
               measurements: list[Measurement]) -> list[Record]:
    implementation = _as_implementation(implementation)
    case = SP_CASES_BY_NAME[case_name]
    return [
        Record(property=f"sequence_parallel.{m.quantity}", subject=implementation.name,
               case=f"{case.name}-world{world}", dtype=dtype_name, verdict=m.verdict, error=m.error,
               tolerance=m.tolerance, reason=m.reason, shapes=case.shapes() | {"world_size": world},
               extra={"world_size": world, "inner": implementation.inner}
               | ({} if m.naive_error is None else {"naive_error": m.naive_error}))
        for m in measurements
    ]


def smoke() -> str | None:
    """Both schemes on the window case under torchrun: a table on rank 0 (`torchrun ... -m rlparity.parallel`)."""
    world, rank = world_and_rank()
    rows = []
    for scheme in SCHEMES:
        for m in measure_sp(SPImplementation(scheme, "chunked"), "sp_window_cross", "fp32"):
            rows.append(f"{scheme:<8} {m.quantity:<15} {m.verdict:<5} "
                        f"error {m.error or 0:.3g} tolerance {m.tolerance or 0:.3g}")
    dist.barrier()
    title = f"sequence parallel over {world} ranks (sp_window_cross, fp32, chunked)"
    return None if rank else "\n".join([title, *rows])


__all__ = ["QUANTITIES", "SCHEMES", "SP_CASES", "SP_DTYPES", "MeasureGroup", "global_view", "measure_sp", "smoke",
           "sp_backend", "to_records"]
