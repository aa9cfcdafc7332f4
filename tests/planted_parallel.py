"""Sequence-parallel attention with planted bugs, as public frameworks have shipped them.

Each takes the arguments of rlparity.parallel.ulysses.attend / ring.attend, so the conformance check
(rlparity.parallel.check.measure_sp) runs them like the real schemes; it must fail each of them.
"""

import torch

from rlparity.attention.registry import get_backend
from rlparity.parallel.blocks import plan_block, ring_steps
from rlparity.parallel.comm import Shift
from rlparity.parallel.ring import attend_block, merge
from rlparity.parallel.shard import check_shards
from rlparity.parallel.ulysses import head_sharded_attention, kv_replication
from rlparity.reference.attention import default_scale


def _first_heads(kernel):
    """A kernel that indexes its sinks by local head, never checking that it got one per local head."""

    def attend(q, k, v, sinks, **kwargs):
        return kernel(q, k, v, sinks[: q.shape[1]], **kwargs)

    return attend


def ulysses_all_sinks(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None, inner="chunked",
                      group=None):
    """Ulysses that hands every rank all the sinks instead of its slice: each rank's kernel reads
    the sinks of heads 0.. H/P - 1, right on rank 0 only, and dSink lands on the wrong heads."""
    layout = check_shards("Ulysses", q, k, v, sinks, window=window, cu_seqlens=cu_seqlens, group=group,
                          split_heads=True)
    backend = get_backend(inner) if isinstance(inner, str) else inner
    copies = kv_replication(k.shape[1], layout.world)
    k, v = k.repeat_interleave(copies, dim=1), v.repeat_interleave(copies, dim=1)
    return head_sharded_attention(q, k, v, sinks, causal=causal, window=window, scale=scale, cu_seqlens=cu_seqlens,
                                  kernel=_first_heads(backend.attend), group=group, where="planted Ulysses")


def ring_sink_per_block(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None, inner="chunked",
                        group=None):
    """Ring attention that passes the real sinks to the kernel for every block and merges the partial
    results by lse: the sink enters the normaliser once per block a query sees. Differentiable
    through autograd (the keys travel with Shift, whose backward sends gradients back)."""
    layout = check_shards("ring", q, k, v, sinks, window=window, cu_seqlens=cu_seqlens, group=group)
    kernel = (get_backend(inner) if isinstance(inner, str) else inner).attend
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
