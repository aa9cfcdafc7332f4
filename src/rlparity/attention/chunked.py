"""Online softmax over key blocks in plain torch: the algorithm a flash kernel runs.

The sink starts the running normaliser (m = sigma, l = 1), so it enters Z exactly once. The forward
keeps one [Sq, block] score tile at a time; the backward recomputes each tile from lse. Scores and
accumulators are float32 (float64 for float64 input); P is cast to the input dtype for P @ V, as in
FlashAttention.
"""

import torch

from rlparity.attention.contract import check_inputs, split_cu_seqlens
from rlparity.reference.attention import default_scale, query_key_positions, visibility

BLOCK_K = 64


def _blocks(seq_q, seq_k, causal, window, cu_seqlens, device, block):
    """Yield (key slice, visibility [Sq, block]) for every key block with at least one visible key.

    Query positions never decrease (packed sequences lie in order), so the first and last query bound them."""
    q_pos, k_pos, docs = query_key_positions(seq_q, seq_k, cu_seqlens, device)
    for start in range(0, seq_k, block):
        stop = min(start + block, seq_k)
        if causal and start > q_pos[-1]:
            break
        if window is not None and stop - 1 <= q_pos[0] - window:
            continue  # the whole block is older than every query's window
        block_docs = None if docs is None else (docs[0], docs[1][start:stop])
        visible = visibility(q_pos, k_pos[start:stop], causal=causal, window=window, docs=block_docs)
        if visible.any():
            yield slice(start, stop), visible


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class ChunkedSinkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, causal, window, scale, cu_q, cu_k, block):
        cu_seqlens = None if cu_q is None else (cu_q, cu_k)
        batch, heads_q, seq_q, head_dim = q.shape
        heads_kv, seq_k = k.shape[1], k.shape[2]
        groups = heads_q // heads_kv
        acc_dtype = _acc_dtype(q.dtype)
        qg = q.reshape(batch, heads_kv, groups, seq_q, head_dim)  # queries grouped by their kv head
        running_max = sinks.to(acc_dtype).reshape(1, heads_kv, groups, 1).expand(batch, -1, -1, seq_q).clone()
        running_sum = torch.ones_like(running_max)
        acc = torch.zeros(batch, heads_kv, groups, seq_q, head_dim, dtype=acc_dtype, device=q.device)
        for keys, visible in _blocks(seq_q, seq_k, causal, window, cu_seqlens, q.device, block):
            scores = torch.matmul(qg, k[:, :, None, keys].transpose(-1, -2)).to(acc_dtype) * scale
            scores = scores.masked_fill(~visible, float("-inf"))
            new_max = torch.maximum(running_max, scores.amax(dim=-1))
            correction = torch.exp(running_max - new_max)
            probs = torch.exp(scores - new_max[..., None])
            running_sum = running_sum * correction + probs.sum(dim=-1)
            acc = acc * correction[..., None] + torch.matmul(probs.to(v.dtype), v[:, :, None, keys]).to(
                acc_dtype
            )
            running_max = new_max
        out = (acc / running_sum[..., None]).to(q.dtype).reshape(batch, heads_q, seq_q, head_dim)
        lse = (running_max + torch.log(running_sum)).reshape(batch, heads_q, seq_q)
        ctx.save_for_backward(q, k, v, sinks, out, lse, cu_q, cu_k)
        ctx.options = (causal, window, scale, block)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, sinks, out, lse, cu_q, cu_k = ctx.saved_tensors
        cu_seqlens = None if cu_q is None else (cu_q, cu_k)
        causal, window, scale, block = ctx.options
        batch, heads_q, seq_q, head_dim = q.shape
        heads_kv, seq_k = k.shape[1], k.shape[2]
        groups = heads_q // heads_kv
        acc_dtype = _acc_dtype(q.dtype)
        if dout is None:
            dout = torch.zeros_like(out)
        if dlse is None:
            dlse = torch.zeros_like(lse)
        grouped = (batch, heads_kv, groups, seq_q)
        qg = q.reshape(*grouped, head_dim)
        dout_g = dout.reshape(*grouped, head_dim)
        lse_g = lse.reshape(grouped)
        dlse_g = dlse.to(acc_dtype).reshape(grouped)
        row_dot = (dout.to(acc_dtype) * out.to(acc_dtype)).sum(dim=-1).reshape(grouped)  # D_i
        dq = torch.zeros(*grouped, head_dim, dtype=acc_dtype, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc_dtype, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc_dtype, device=q.device)
        for keys, visible in _blocks(seq_q, seq_k, causal, window, cu_seqlens, q.device, block):
            k_blk, v_blk = k[:, :, None, keys], v[:, :, None, keys]
            scores = torch.matmul(qg, k_blk.transpose(-1, -2)).to(acc_dtype) * scale
            probs = torch.exp(scores.masked_fill(~visible, float("-inf")) - lse_g[..., None])
            dv[:, :, keys] += torch.matmul(probs.to(v.dtype).transpose(-1, -2), dout_g).to(acc_dtype).sum(dim=2)
            dprobs = torch.matmul(dout_g, v_blk.transpose(-1, -2)).to(acc_dtype)
            dscores = (probs * (dprobs - row_dot[..., None] + dlse_g[..., None])).to(q.dtype)
            dq += torch.matmul(dscores, k_blk).to(acc_dtype) * scale
            dk[:, :, keys] += torch.matmul(dscores.transpose(-1, -2), qg).to(acc_dtype).sum(dim=2) * scale
        p_sink = torch.exp(sinks.to(acc_dtype).reshape(1, heads_kv, groups, 1) - lse_g)
        dsinks = (p_sink * (dlse_g - row_dot)).sum(dim=(0, 3)).reshape(heads_q)
        dq = dq.reshape(q.shape).to(q.dtype)
        return dq, dk.to(k.dtype), dv.to(v.dtype), dsinks.to(sinks.dtype), None, None, None, None, None, None


def attend(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None, block=BLOCK_K):
    check_inputs(q, k, v, sinks, causal=causal, window=window, scale=scale, cu_seqlens=cu_seqlens, where="chunked")
    scale = default_scale(q.shape[-1]) if scale is None else scale
    cu_q, cu_k = (None, None) if cu_seqlens is None else split_cu_seqlens(cu_seqlens)
    return ChunkedSinkAttention.apply(q, k, v, sinks, causal, window, scale, cu_q, cu_k, block)
