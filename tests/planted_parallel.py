"""Sequence-parallel attention with planted bugs, as public frameworks have shipped them.

Each is written as a user would write one: the interface of rlparity.parallel.interface (this rank's
shard, the whole sinks, the process group), given to the check as "tests.planted_parallel:NAME".
`rlparity check sequence-parallel` (rlparity.parallel.check.measure_sp on every rank) must fail each.
"""

import os

import torch
import torch.distributed as dist

from rlparity.attention import get_backend
from rlparity.parallel import check_shards
from rlparity.parallel.blocks import plan_block, ring_steps
from rlparity.parallel.comm import HeadToSeq, SeqToHead, Shift
from rlparity.parallel.ring import attend_block, merge
from rlparity.parallel.ulysses import kv_replication
from rlparity.reference.attention import default_scale

KERNEL = "chunked"  # the per-rank kernel of these implementations


def ulysses_all_sinks(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None, group=None):
    """Ulysses that hands every rank's kernel all the sinks instead of its slice of heads; the kernel
    indexes them by local head, so each rank uses the sinks of heads 0 .. H/P - 1: right on rank 0
    only, and dSink lands on the wrong heads."""
    layout = check_shards("Ulysses", q, k, v, sinks, window=window, cu_seqlens=cu_seqlens, group=group,
                          split_heads=True)
    copies = kv_replication(k.shape[1], layout.world)
    k, v = k.repeat_interleave(copies, dim=1), v.repeat_interleave(copies, dim=1)
    q_h, k_h, v_h = (SeqToHead.apply(x, group) for x in (q, k, v))  # [B, H/P, S, D]
    local_sinks = sinks[: q_h.shape[1]]  # the bug: the first H/P of all the sinks, whatever this rank's heads
    out_h, lse_h = get_backend(KERNEL).attend(q_h, k_h, v_h, local_sinks, causal=causal, window=window, scale=scale,
                                              cu_seqlens=cu_seqlens)
    return HeadToSeq.apply(out_h, group), HeadToSeq.apply(lse_h.unsqueeze(-1), group).squeeze(-1)


def ring_sink_per_block(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None, group=None):
    """Ring attention that passes the real sinks to the kernel for every block and merges the partial
    results by lse: the sink enters the normaliser once per block a query sees. Differentiable
    through autograd (the keys travel with Shift, whose backward sends gradients back)."""
    layout = check_shards("ring", q, k, v, sinks, window=window, cu_seqlens=cu_seqlens, group=group)
    kernel = get_backend(KERNEL).attend
    scale = default_scale(q.shape[-1]) if scale is None else scale
    kv = torch.stack([k, v])
    out = lse = None
    # Autograd runs only the hops a rank's own output depends on; a rank whose queries skip a block
    # would leave its neighbour waiting in that hop's backward. Depending on every hop (times zero)
    # keeps the ranks in step.
    every_hop = torch.zeros((), dtype=torch.float32, device=q.device)
    for step in range(ring_steps(layout.world, layout.seq_local, causal=causal, window=window) + 1):
        if step:
            kv = Shift.apply(kv, 1, group)
            every_hop = every_hop + 0.0 * kv.float().sum()
        source = (layout.rank - step) % layout.world
        call = plan_block(layout.positions(layout.rank), layout.positions(source), causal=causal, window=window,
                          cu_seqlens=layout.cu_seqlens)
        if call is None:
            continue
        out_b, lse_b = attend_block(kernel, q[:, :, call.queries], kv[0][:, :, call.keys], kv[1][:, :, call.keys],
                                    sinks, call, scale, "planted ring")
        out_b, lse_b = _to_shard_rows(out_b.float(), lse_b.float(), call.queries, q.shape[2])
        out, lse = (out_b, lse_b) if out is None else merge(out, lse, out_b, lse_b)
    return (out + every_hop).to(q.dtype), lse


def _to_shard_rows(out_b, lse_b, rows, seq):
    """A block's partial result on all rows of the shard: rows it does not cover get lse = -inf."""
    before, after = rows.start, seq - rows.stop
    out = torch.nn.functional.pad(out_b, (0, 0, before, after))
    lse = torch.nn.functional.pad(lse_b, (before, after), value=float("-inf"))
    return out, lse


def not_implemented(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None, group=None):
    """An implementation that supports nothing yet: every cell is skipped, so nothing is checked."""
    raise NotImplementedError("sequence parallelism is not implemented yet")


def rank1_dies(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None, group=None):
    """Rank 1 crashes outside Python (as a segfaulting kernel would) while rank 0 waits for it."""
    if dist.get_rank(group) == 1:
        os._exit(7)
    dist.barrier(group=group)
    raise AssertionError("unreachable: rank 1 never reaches the barrier")


def rank1_raises(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None, group=None):
    """Rank 1 raises before the all-to-all that rank 0 has already entered."""
    if dist.get_rank(group) == 1:
        raise RuntimeError("injected failure on rank 1")
    return ulysses_all_sinks(q, k, v, sinks, causal=causal, window=window, scale=scale, cu_seqlens=cu_seqlens,
                             group=group)
