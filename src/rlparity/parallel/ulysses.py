"""Ulysses sequence parallelism: all-to-all from sequence shards to head shards, attend, and back.

Each rank passes its sequence shard (see rlparity.parallel.shard for the layout) with all heads and
the whole sinks [heads_q]. After the all-to-all, rank r holds heads r H/P .. (r+1) H/P - 1 for the
whole sequence, so the inner kernel sees an ordinary single-process problem: the whole sequence,
the whole cu_seqlens, the window unchanged, and exactly its own slice of the sinks.

GQA: query head h reads kv head h // (H / Hkv). When Hkv is not a multiple of the world size P
(e.g. 2 kv heads on 4 ranks), each kv head is replicated f = P / gcd(Hkv, P) times before the
all-to-all, giving lcm(Hkv, P) kv heads, so that every rank receives whole kv heads: exactly those its
query heads read. The replicas' gradients sum back into the one kv head (repeat_interleave's adjoint).

Gradients: dq, dk, dv come back through the all-to-alls (each one's backward is the other). The
gradient this rank gets for `sinks` is zero outside its slice and, on its slice, the whole dSink of
those heads (every position contributes on the rank owning the head). Summing the sinks' gradients
over the sequence-parallel group, as data parallelism does for any replicated parameter
(rlparity.parallel.comm.SumGradients does it in autograd), assembles the full dSink.
"""

import math

from rlparity.attention.contract import check_outputs
from rlparity.attention.registry import get_backend
from rlparity.parallel.comm import HeadToSeq, SeqToHead
from rlparity.parallel.shard import check_shards


def kv_replication(heads_kv: int, world: int) -> int:
    """How many copies of each kv head make the kv heads split evenly and aligned over the ranks."""
    return world // math.gcd(heads_kv, world)


def sinks_slice(heads_q: int, world: int, rank: int) -> slice:
    per_rank = heads_q // world
    return slice(rank * per_rank, (rank + 1) * per_rank)


def head_sharded_attention(q, k, v, local_sinks, *, causal, window, scale, cu_seqlens, kernel, group, where):
    """All-to-all to head shards, `kernel` on this rank's heads with `local_sinks`, all-to-all back."""
    q_h, k_h, v_h = (SeqToHead.apply(x, group) for x in (q, k, v))  # [B, H/P, S, D]
    out_h, lse_h = check_outputs(
        kernel(q_h, k_h, v_h, local_sinks, causal=causal, window=window, scale=scale, cu_seqlens=cu_seqlens),
        q_h, where=where,
    )
    out = HeadToSeq.apply(out_h, group)  # [B, H, S/P, D]
    lse = HeadToSeq.apply(lse_h.unsqueeze(-1), group).squeeze(-1)  # [B, H, S/P]
    return out, lse


def attend(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None, inner="chunked", group=None):
    """The interface of rlparity.parallel.interface on this rank's shard; `inner`: a registered backend or
    module:function."""
    layout = check_shards("Ulysses", q, k, v, sinks, window=window, cu_seqlens=cu_seqlens, group=group,
                          split_heads=True)
    backend = get_backend(inner) if isinstance(inner, str) else inner
    copies = kv_replication(k.shape[1], layout.world)
    if copies > 1:
        k, v = k.repeat_interleave(copies, dim=1), v.repeat_interleave(copies, dim=1)
    local_sinks = sinks[sinks_slice(q.shape[1], layout.world, layout.rank)]
    return head_sharded_attention(q, k, v, local_sinks, causal=causal, window=window, scale=scale,
                                  cu_seqlens=cu_seqlens, kernel=backend.attend, group=group,
                                  where=f"Ulysses inner kernel {backend.name!r} on rank {layout.rank}")
