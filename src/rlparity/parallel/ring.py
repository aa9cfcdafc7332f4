"""Ring sequence parallelism: K/V blocks travel around the ranks; partial results merge by their lse.

Each rank passes its sequence shard (layout in rlparity.parallel.shard) with all heads and the whole
sinks. At step t rank r holds the keys and values of rank r - t and attends its queries to them with
the inner kernel, one contract call per block (rlparity.parallel.blocks: causal and window blocks
entirely outside every query's reach are skipped, and the ring stops once the window is covered).

The sink enters the normaliser exactly once per query: every block is attended with the sink logit
NO_SINK, whose exp vanishes next to any visible score, and the true sink is folded in once after
the merge:  lse = logaddexp(lse_blocks, sigma),  out = out_blocks * exp(lse_blocks - lse).

Backward: the keys go round again with their dK/dV accumulators travelling alongside, and each
block's gradient comes from the inner kernel's own backward, recomputed from its forward (the one way
to differentiate any registered kernel), driven by the block's share of the upstream gradient:
    w_b = exp(lse_b - lse),  dO_b = w_b dO,  dLSE_b = w_b (dO.(o_b - out) + dLSE).
The gradient this rank gets for `sinks` is the sum over its own queries of P_sink (dLSE - dO.out);
summed over the group (rlparity.parallel.comm.SumGradients) it is the full dSink.
"""

import torch

from rlparity.attention.contract import check_outputs
from rlparity.attention.registry import get_backend
from rlparity.parallel.blocks import plan_block, ring_steps
from rlparity.parallel.comm import exchange, shift
from rlparity.parallel.shard import check_shards
from rlparity.reference.attention import default_scale

# The sink logit of a block: finite in every float dtype (float16 reaches 65504), so no kernel meets
# inf - inf, and exp(NO_SINK - lse_b) is exactly 0 (float32 underflows below e^-104, float64 below
# e^-746) whenever the block's largest visible score exceeds NO_SINK + 746: any attention logit.
# Every row of a block call sees a key (rlparity.parallel.blocks), so lse_b is at least that score.
NO_SINK = -1.0e4


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge(out_a, lse_a, out_b, lse_b):
    """Two partial softmax results over disjoint keys, as one: (out [B,H,S,D], lse [B,H,S])."""
    lse = torch.logaddexp(lse_a, lse_b)
    out = out_a * torch.exp(lse_a - lse).unsqueeze(-1) + out_b * torch.exp(lse_b - lse).unsqueeze(-1)
    return out, lse


def fold_sink(out, lse, sinks):
    """Add the sink to the normaliser of a result over the keys: once, after every block is merged."""
    lse_with_sink = torch.logaddexp(lse, sinks.to(lse.dtype).reshape(1, -1, 1))
    return out * torch.exp(lse - lse_with_sink).unsqueeze(-1), lse_with_sink


def attend_block(kernel, q_rows, k_rows, v_rows, sinks, call, scale, where):
    """One contract call on the visible part of a block, its queries and keys already cut out."""
    cu = None if call.cu_seqlens is None else torch.tensor(call.cu_seqlens, dtype=torch.int32, device=q_rows.device)
    result = kernel(q_rows, k_rows, v_rows, sinks, causal=call.causal, window=call.window, scale=scale, cu_seqlens=cu)
    return check_outputs(result, q_rows, where=where)


class _Ring:
    """What both passes of one ring attention share: the layout, the kernel and the options."""

    def __init__(self, layout, kernel, where, causal, window, scale, group):
        self.layout, self.kernel, self.where, self.group = layout, kernel, where, group
        self.causal, self.window, self.scale = causal, window, scale
        self.steps = ring_steps(layout.world, layout.seq_local, causal=causal, window=window)

    def calls(self):
        """(step, plan of the block held at that step or None)."""
        layout = self.layout
        for step in range(self.steps + 1):
            source = (layout.rank - step) % layout.world
            yield step, plan_block(layout.positions(layout.rank), layout.positions(source), causal=self.causal,
                                   window=self.window, cu_seqlens=layout.cu_seqlens)

    def start_exchange(self, step, kv):
        if step == self.steps:
            return None
        world, rank = self.layout.world, self.layout.rank
        return exchange(kv, (rank + 1) % world, (rank - 1) % world, self.group)

    @staticmethod
    def finish_exchange(pending, kv):
        if pending is None:
            return kv
        received, requests = pending
        for request in requests:
            request.wait()
        return received


class RingSinkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, ring):
        acc = _acc_dtype(q.dtype)
        batch, heads_q, seq, head_dim = q.shape
        no_sink = torch.full((heads_q,), NO_SINK, dtype=torch.float32, device=q.device)
        out_keys = torch.zeros(batch, heads_q, seq, head_dim, dtype=acc, device=q.device)
        lse_keys = torch.full((batch, heads_q, seq), float("-inf"), dtype=acc, device=q.device)
        kv = torch.stack([k, v])
        for step, call in ring.calls():
            pending = ring.start_exchange(step, kv)
            if call is not None:
                rows, keys = call.queries, call.keys
                out_b, lse_b = attend_block(ring.kernel, q[:, :, rows], kv[0][:, :, keys], kv[1][:, :, keys], no_sink,
                                            call, ring.scale, ring.where)
                merged = merge(out_keys[:, :, rows], lse_keys[:, :, rows], out_b.to(acc), lse_b.to(acc))
                out_keys[:, :, rows], lse_keys[:, :, rows] = merged
            kv = ring.finish_exchange(pending, kv)
        out, lse = fold_sink(out_keys, lse_keys, sinks)
        out = out.to(q.dtype)
        lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
        ctx.save_for_backward(q, k, v, sinks, out, lse)
        ctx.ring = ring
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, sinks, out, lse = ctx.saved_tensors
        ring = ctx.ring
        acc = _acc_dtype(q.dtype)
        dout = torch.zeros_like(out) if dout is None else dout
        dlse = torch.zeros_like(lse) if dlse is None else dlse
        dout_acc, out_acc, lse_acc, dlse_acc = dout.to(acc), out.to(acc), lse.to(acc), dlse.to(acc)
        row_dot = (dout_acc * out_acc).sum(dim=-1)  # D_i = dO_i . out_i: [B, H, S]
        p_sink = torch.exp(sinks.to(acc).reshape(1, -1, 1) - lse_acc)
        dsinks = (p_sink * (dlse_acc - row_dot)).sum(dim=(0, 2))

        no_sink = torch.full((q.shape[1],), NO_SINK, dtype=torch.float32, device=q.device)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv = torch.stack([k, v])
        dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)  # travels with the block it belongs to
        for step, call in ring.calls():
            pending = ring.start_exchange(step, kv)
            if call is not None:
                dq_b, dk_b, dv_b = _block_backward(ring, q, kv, no_sink, call, dout_acc, out_acc, lse_acc, dlse_acc)
                dq[:, :, call.queries] += dq_b.to(acc)
                dkv[0][:, :, call.keys] += dk_b.to(acc)
                dkv[1][:, :, call.keys] += dv_b.to(acc)
            kv = ring.finish_exchange(pending, kv)
            if step < ring.steps:
                dkv = shift(dkv, 1, ring.group)
        dkv = shift(dkv, -ring.steps, ring.group)  # home to the rank whose keys these are
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), dsinks.to(sinks.dtype), None


def _block_backward(ring, q, kv, no_sink, call, dout, out, lse, dlse):
    rows = call.queries
    with torch.enable_grad():
        q_b = q[:, :, rows].detach().requires_grad_()
        k_b = kv[0][:, :, call.keys].detach().requires_grad_()
        v_b = kv[1][:, :, call.keys].detach().requires_grad_()
        out_b, lse_b = attend_block(ring.kernel, q_b, k_b, v_b, no_sink, call, ring.scale, ring.where)
    weight = torch.exp(lse_b.to(lse.dtype) - lse[:, :, rows])  # w_b: this block's share of the normaliser
    dout_rows = dout[:, :, rows]
    grad_out = (weight.unsqueeze(-1) * dout_rows).to(out_b.dtype)
    grad_lse = weight * ((dout_rows * (out_b.to(out.dtype) - out[:, :, rows])).sum(dim=-1) + dlse[:, :, rows])
    grads = torch.autograd.grad((out_b, lse_b), (q_b, k_b, v_b), (grad_out, grad_lse.to(lse_b.dtype)),
                                allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, (q_b, k_b, v_b)))


def attend(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None, inner="chunked", group=None):
    """The interface of rlparity.parallel.interface on this rank's shard; `inner`: a registered backend or
    module:function."""
    layout = check_shards("ring", q, k, v, sinks, window=window, cu_seqlens=cu_seqlens, group=group)
    backend = get_backend(inner) if isinstance(inner, str) else inner
    scale = default_scale(q.shape[-1]) if scale is None else scale
    ring = _Ring(layout, backend.attend, f"ring inner kernel {backend.name!r} on rank {layout.rank}", causal, window,
                 scale, group)
    return RingSinkAttention.apply(q, k, v, sinks, ring)
