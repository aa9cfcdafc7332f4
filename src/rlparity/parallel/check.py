"""Sequence-parallel attention judged as any backend is: the same matrix, the same tolerance rule.

`sp_backend(scheme, inner)` is, on every rank of a process group, an ordinary backend of the
attention contract: it takes whole tensors, hands this rank its shard, runs the scheme, and gathers
the output. Gradients come back whole: the shards' gradients gathered, and the replicated sinks'
gradients summed over the ranks, which is how the full dSink is assembled. Then
rlparity.attention.matrix.measure judges it against the float64 reference computed in one process,
with the naive baseline in the candidate's dtype, exactly as it judges single-process backends.

The conformance suite and rlparity's own tests (planted bugs) both call `measure_sp` on every rank.
"""

import functools

import torch.distributed as dist

from rlparity.attention.cases import DTYPES_BY_NAME, Case
from rlparity.attention.matrix import QUANTITIES, Measurement, measure
from rlparity.attention.registry import Backend, get_backend
from rlparity.parallel import ring, ulysses
from rlparity.parallel.comm import GatherShards, ShardOf, SumGradients, world_and_rank
from rlparity.parallel.launch import RankFailedError, WorkerGroup, rank_device
from rlparity.results import ERROR, Record

SCHEMES = {"ulysses": ulysses.attend, "ring": ring.attend}
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


def global_view(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None, scheme, inner, group=None):
    """Whole tensors in, whole (out, lse) out, computed by `scheme` on this rank's shard."""
    q_shard, k_shard, v_shard = (ShardOf.apply(x, SEQ_DIM, group) for x in (q, k, v))
    out, lse = scheme(q_shard, k_shard, v_shard, SumGradients.apply(sinks, group), causal=causal, window=window,
                      scale=scale, cu_seqlens=cu_seqlens, inner=inner, group=group)
    return GatherShards.apply(out, SEQ_DIM, group), GatherShards.apply(lse, SEQ_DIM, group)


def scheme_name(scheme) -> str:
    if isinstance(scheme, str):
        return scheme
    return f"{scheme.__module__}:{scheme.__qualname__}"


def sp_backend(scheme, inner: str, group=None) -> Backend:
    """A backend of the contract running `scheme` ("ulysses", "ring" or a function like them) over the group."""
    scheme_fn = SCHEMES[scheme] if isinstance(scheme, str) else scheme
    inner_backend = get_backend(inner)
    fn = functools.partial(global_view, scheme=scheme_fn, inner=inner_backend, group=group)
    world, _ = world_and_rank(group)
    return Backend(name=f"{scheme_name(scheme)}[{inner_backend.name}] x{world}",
                   target="rlparity.parallel.check:global_view",
                   summary=f"sequence-parallel over {world} ranks", probe=inner_backend.probe,
                   backward_probe=inner_backend.backward_probe, dtypes=inner_backend.dtypes,
                   gpu_only=inner_backend.gpu_only, _loaded=[fn])


def measure_sp(scheme, inner: str, case_name: str, dtype_name: str) -> list[Measurement]:
    """Run on every rank of the default group: every quantity of the matrix for the scheme on one case."""
    backend = sp_backend(scheme, inner)
    return measure(backend, SP_CASES_BY_NAME[case_name], DTYPES_BY_NAME[dtype_name], rank_device())


class MeasureGroup:
    """The caller's side: `measure_sp` on a group of `world` ranks, started once and kept while healthy.

    A case that errored (a rank raised inside the scheme, or crashed) may have left the ranks out of
    step in their collectives; the group is then replaced before the next case, and the error is
    reported as that case's verdict.
    """

    def __init__(self, world: int, backend: str | None = None):
        self.world, self.backend = world, backend
        self.group = WorkerGroup(world, backend=backend)

    def measure(self, scheme, inner: str, case_name: str, dtype_name: str) -> list[Measurement]:
        if not self.group.alive:
            self.group = WorkerGroup(self.world, backend=self.backend)
        try:
            measurements = self.group.run(measure_sp, scheme, inner, case_name, dtype_name)[0]
        except RankFailedError as exc:
            reason = f"sequence parallel over {self.world} ranks: {exc}"
            return [Measurement(quantity, ERROR, reason=reason) for quantity in QUANTITIES]
        if any(m.verdict == ERROR for m in measurements):
            self.group.close(reason=f"replaced after an error in {scheme_name(scheme)} on {case_name}")
        return measurements

    def close(self):
        self.group.close()


def to_records(scheme, inner: str, case_name: str, dtype_name: str, world: int,
               measurements: list[Measurement]) -> list[Record]:
    case = SP_CASES_BY_NAME[case_name]
    return [
        Record(property=f"sequence_parallel.{m.quantity}", subject=f"{scheme_name(scheme)}[{inner}]",
               case=f"{case.name}-world{world}", dtype=dtype_name, verdict=m.verdict, error=m.error,
               tolerance=m.tolerance, reason=m.reason, shapes=case.shapes() | {"world_size": world},
               extra={"world_size": world, "inner": inner}
               | ({} if m.naive_error is None else {"naive_error": m.naive_error}))
        for m in measurements
    ]


def smoke() -> str | None:
    """Both schemes on the window case under torchrun: a table on rank 0 (`torchrun ... -m rlparity.parallel`)."""
    world, rank = world_and_rank()
    rows = []
    for scheme in SCHEMES:
        for m in measure_sp(scheme, "chunked", "sp_window_cross", "fp32"):
            rows.append(f"{scheme:<8} {m.quantity:<15} {m.verdict:<5} "
                        f"error {m.error or 0:.3g} tolerance {m.tolerance or 0:.3g}")
    dist.barrier()
    title = f"sequence parallel over {world} ranks (sp_window_cross, fp32, chunked)"
    return None if rank else "\n".join([title, *rows])


__all__ = ["QUANTITIES", "SCHEMES", "SP_CASES", "MeasureGroup", "global_view", "measure_sp", "smoke", "sp_backend",
           "to_records"]
