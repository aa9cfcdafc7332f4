"""Sink-attention backends with planted bugs. The conformance matrix must fail each of them.

Run one against the suite:  pytest conformance --attention-backend tests.planted_attention:ignores_sinks
"""

import torch

from rlparity.reference import sink_attention, sink_attention_backward
from rlparity.reference.attention import masked_scores


def ignores_sinks(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
    """Plain attention: what transformers' flash path computed when its kernel took no sinks."""
    scores = masked_scores(q, k, causal=causal, window=window, scale=scale, cu_seqlens=cu_seqlens)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.softmax(scores, dim=-1), v.repeat_interleave(q.shape[1] // v.shape[1], dim=1))
    return out, lse.float()


class _WrongSignDsink(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, causal, window, scale, cu_seqlens):
        out, lse = sink_attention(q, k, v, sinks, causal=causal, window=window, scale=scale, cu_seqlens=cu_seqlens)
        ctx.save_for_backward(q, k, v, sinks, out, lse, cu_seqlens)
        ctx.options = {"causal": causal, "window": window, "scale": scale}
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, sinks, out, lse, cu_seqlens = ctx.saved_tensors
        dq, dk, dv, dsinks = sink_attention_backward(q, k, v, sinks, out, lse, dout, dlse, cu_seqlens=cu_seqlens,
                                                     **ctx.options)
        return dq, dk, dv, -dsinks, None, None, None, None


def dsink_wrong_sign(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
    out, lse = _WrongSignDsink.apply(q.double(), k.double(), v.double(), sinks.double(), causal, window, scale,
                                     cu_seqlens)
    return out.to(q.dtype), lse.float()


def window_off_by_one(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
    """Sees one key too many: i - window <= j instead of i - window < j."""
    window = None if window is None else window + 1
    out, lse = sink_attention(q.double(), k.double(), v.double(), sinks.double(), causal=causal, window=window,
                              scale=scale, cu_seqlens=cu_seqlens)
    return out.to(q.dtype), lse.float()


def returns_nan(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
    out = torch.full_like(q, float("nan"))
    return out, torch.zeros(q.shape[:3], dtype=torch.float32)


def wrong_shape(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
    return q.transpose(1, 2), torch.zeros(q.shape[:3], dtype=torch.float32)


def raises(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
    raise RuntimeError("planted failure inside the kernel")


def wrong_signature(q, k, v):
    return q, q
