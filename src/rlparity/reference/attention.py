"""Sink attention as GPT-OSS defines it, and its closed-form backward.

With scores s_ij = scale * q_i.k_j over the visible keys and a per-head sink logit sigma_h:
    Z_i = sum_j exp(s_ij) + exp(sigma_h),   P_ij = exp(s_ij) / Z_i,   P_sink,i = exp(sigma_h) / Z_i
    out_i = sum_j P_ij v_j,                 lse_i = log Z_i
The sink is a logit added unscaled: `scale` multiplies q.k only.
"""

import math

import torch


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def visible_keys(
    seq_q: int,
    seq_k: int,
    *,
    causal: bool = True,
    window: int | None = None,
    cu_seqlens=None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Boolean [seq_q, seq_k]: may query i see key j?

    Queries are the last seq_q positions (bottom-right alignment). A query at absolute position p sees
    key j when j <= p (causal) and p - window < j (the GPT-OSS window counts the current token).
    With cu_seqlens, queries and keys never cross a sequence boundary: one tensor of offsets when queries
    and keys share the packed positions, or a pair (cu_seqlens_q, cu_seqlens_k) when each sequence's
    queries are the last of its keys (decode, extend on a cached prefix).
    """
    q_pos, k_pos, docs = query_key_positions(seq_q, seq_k, cu_seqlens, device)
    return visibility(q_pos, k_pos, causal=causal, window=window, docs=docs)


def query_key_positions(seq_q: int, seq_k: int, cu_seqlens=None, device: torch.device | str = "cpu"):
    """(absolute query positions [Sq], key positions [Sk], (query, key) sequence ids or None) in the key index."""
    k_pos = torch.arange(seq_k, device=device)
    if cu_seqlens is None:
        q_pos = k_pos[seq_k - seq_q :] if seq_k >= seq_q else torch.arange(seq_k - seq_q, seq_k, device=device)
        return q_pos, k_pos, None
    cu_q, cu_k = cu_seqlens if isinstance(cu_seqlens, (tuple, list)) else (cu_seqlens, cu_seqlens)
    cu_q, cu_k = cu_q.to(device=device, dtype=torch.int64), cu_k.to(device=device, dtype=torch.int64)
    doc_q, doc_k = sequence_ids(cu_q, seq_q), sequence_ids(cu_k, seq_k)
    # query t of sequence i sits at key position cu_k[i+1] - (cu_q[i+1] - t): the last q_len_i of its keys
    q_pos = cu_k[doc_q + 1] - (cu_q[doc_q + 1] - torch.arange(seq_q, device=device))
    return q_pos, k_pos, (doc_q, doc_k)


def visibility(q_pos, k_pos, *, causal=True, window=None, docs=None) -> torch.Tensor:
    """Boolean [len(q_pos), len(k_pos)] from absolute positions (and sequence ids for packed input)."""
    q_pos, k_pos = q_pos[:, None], k_pos[None, :]
    visible = torch.ones(q_pos.shape[0], k_pos.shape[1], dtype=torch.bool, device=q_pos.device)
    if causal:
        visible = visible & (k_pos <= q_pos)
    if window is not None:
        visible = visible & (k_pos > q_pos - window)
    if docs is not None:
        doc_q, doc_k = docs
        visible = visible & (doc_q[:, None] == doc_k[None, :])
    return visible


def sequence_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total] index of the packed sequence each token belongs to."""
    positions = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].to(torch.int64), positions, right=True)


def expand_kv_heads(x: torch.Tensor, heads_q: int) -> torch.Tensor:
    """[B, Hkv, S, D] -> [B, Hq, S, D]: query head h reads kv head h // (Hq // Hkv)."""
    return x.repeat_interleave(heads_q // x.shape[1], dim=1)


def sum_kv_groups(dx: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """[B, Hq, S, D] -> [B, Hkv, S, D]: the adjoint of expand_kv_heads."""
    b, hq, s, d = dx.shape
    return dx.reshape(b, heads_kv, hq // heads_kv, s, d).sum(dim=2)


def masked_scores(q, k, *, causal, window, scale, cu_seqlens) -> torch.Tensor:
    """[B, Hq, Sq, Sk] scores with invisible keys at -inf."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    k = expand_kv_heads(k, q.shape[1])
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    visible = visible_keys(
        q.shape[2], k.shape[2], causal=causal, window=window, cu_seqlens=cu_seqlens, device=q.device
    )
    return scores.masked_fill(~visible, float("-inf"))


def sink_attention(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
    """(out [B, Hq, Sq, D], lse [B, Hq, Sq]) in the dtype of the inputs: the naive implementation.

    Called on float64 inputs it is the ground truth; on low-precision inputs it is the naive
    same-dtype baseline that the tolerance rule compares candidates against.
    """
    scores = masked_scores(q, k, causal=causal, window=window, scale=scale, cu_seqlens=cu_seqlens)
    sink = sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1)
    lse = torch.logsumexp(torch.cat([scores, sink], dim=-1), dim=-1)  # [B, Hq, Sq]
    probs = torch.exp(scores - lse[..., None])
    out = torch.matmul(probs, expand_kv_heads(v, q.shape[1]))
    return out, lse


def sink_attention_backward(q, k, v, sinks, out, lse, dout, dlse, *, causal=True, window=None, scale=None,
                            cu_seqlens=None):
    """(dq, dk, dv, dsinks), written out.

    dS_ij = P_ij (dO_i.v_j - D_i) + P_ij dLSE_i with D_i = dO_i.out_i
    dsink_h = sum_i P_sink,i (dLSE_i - D_i)
    """
    scale_ = default_scale(q.shape[-1]) if scale is None else scale
    heads_q, heads_kv = q.shape[1], k.shape[1]
    scores = masked_scores(q, k, causal=causal, window=window, scale=scale, cu_seqlens=cu_seqlens)
    probs = torch.exp(scores - lse[..., None])  # [B, Hq, Sq, Sk]
    p_sink = torch.exp(sinks.to(lse.dtype).reshape(1, -1, 1) - lse)  # [B, Hq, Sq]
    row_dot = (dout * out).sum(dim=-1)  # D_i: [B, Hq, Sq]
    v_q = expand_kv_heads(v, heads_q)
    dprobs = torch.matmul(dout, v_q.transpose(-1, -2))
    dscores = probs * (dprobs - row_dot[..., None] + dlse[..., None])
    dq = torch.matmul(dscores, expand_kv_heads(k, heads_q)) * scale_
    dk = sum_kv_groups(torch.matmul(dscores.transpose(-1, -2), q) * scale_, heads_kv)
    dv = sum_kv_groups(torch.matmul(probs.transpose(-1, -2), dout), heads_kv)
    dsinks = (p_sink * (dlse - row_dot)).sum(dim=(0, 2))
    return dq, dk, dv, dsinks
