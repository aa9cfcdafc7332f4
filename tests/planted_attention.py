"""Sink-attention backends with planted bugs, which the conformance matrix must fail, and backends that
declare what they do not compute (forward-only, lse-less, nothing at all), which it must skip with the reason.

Run one against the suite:  pytest conformance --attention-backend tests.planted_attention:ignores_sinks
"""

import torch

from rlparity.attention.paged import paged_layout, scatter_to_pages, token_batch
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


# ------------------------------------------------------------------------ kernels that declare what they lack


def _exact(q, k, v, sinks, *, causal, window, scale, cu_seqlens):
    """The float64 reference, returned in the contract's dtypes: out like q, lse float32 (float64 for float64)."""
    out, lse = sink_attention(q.double(), k.double(), v.double(), sinks.double(), causal=causal, window=window,
                              scale=scale, cu_seqlens=cu_seqlens)
    return out.to(q.dtype), lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def _lse_without_sink(q, k, v, sinks, *, causal, window, scale, cu_seqlens):
    """Right out, but an lse that leaves the sink out of the normaliser: log sum_j exp(s_ij)."""
    out, lse = _exact(q, k, v, sinks, causal=causal, window=window, scale=scale, cu_seqlens=cu_seqlens)
    scores = masked_scores(q.double(), k.double(), causal=causal, window=window, scale=scale, cu_seqlens=cu_seqlens)
    return out, torch.logsumexp(scores, dim=-1).to(lse.dtype)


class _ForwardOnly(torch.autograd.Function):
    """An inference kernel as engines ship them: a forward and no backward."""

    @staticmethod
    def forward(ctx, math, q, k, v, sinks, options):
        return math(q, k, v, sinks, **options)


def forward_only(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
    """Correct forward; taking gradients raises autograd's NotImplementedError."""
    options = {"causal": causal, "window": window, "scale": scale, "cu_seqlens": cu_seqlens}
    return _ForwardOnly.apply(_exact, q, k, v, sinks, options)


def forward_only_sinkless_lse(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
    """Forward-only, right out, and an lse without the sink: the bug a forward-only check must still catch."""
    options = {"causal": causal, "window": window, "scale": scale, "cu_seqlens": cu_seqlens}
    return _ForwardOnly.apply(_lse_without_sink, q, k, v, sinks, options)


def no_grad_forward(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
    """Correct forward computed under torch.no_grad: out does not require grad (forward-only by detaching)."""
    with torch.no_grad():
        return _exact(q, k, v, sinks, causal=causal, window=window, scale=scale, cu_seqlens=cu_seqlens)


def lse_less(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
    """Correct out with gradients, and no lse: returns (out, None)."""
    out, _ = _exact(q, k, v, sinks, causal=causal, window=window, scale=scale, cu_seqlens=cu_seqlens)
    return out, None


def detached_sinks(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
    """Right values, but the sinks enter detached: out requires grad and the sink gradient is silently zero."""
    return _exact(q, k, v, sinks.detach(), causal=causal, window=window, scale=scale, cu_seqlens=cu_seqlens)


def supports_nothing(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
    raise NotImplementedError("planted: this kernel supports no case")


def lse_less_ignores_sinks(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
    """No lse, and plain attention: without an lse to check, out and the gradients must still fail."""
    out, _ = ignores_sinks(q, k, v, sinks, causal=causal, window=window, scale=scale, cu_seqlens=cu_seqlens)
    return out, None


class _BackwardRaises(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, options):
        return _exact(q, k, v, sinks, **options)

    @staticmethod
    def backward(ctx, dout, dlse):
        raise RuntimeError("planted failure inside the backward")


def backward_raises(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
    """Correct forward; a backward that crashes (not a declared gap): an error of the backward cells only."""
    options = {"causal": causal, "window": window, "scale": scale, "cu_seqlens": cu_seqlens}
    return _BackwardRaises.apply(q, k, v, sinks, options)


# ------------------------------------------------------------------------ paged kernels

PLANTED_PAGE_SIZE = 16


@torch.no_grad()
def paged_wrong_page(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
    """Paged attention in plain torch, forward-only, whose gather reads page p of a sequence through block-table
    entry p - 1: right while a sequence fits in one page, wrong from its first page boundary on."""
    batch = token_batch(q, k, v, cu_seqlens)
    layout = paged_layout(batch.k_lens, PLANTED_PAGE_SIZE)
    pools = scatter_to_pages(batch.k, layout), scatter_to_pages(batch.v, layout)
    gathered = ([], [])
    for i, length in enumerate(batch.k_lens):
        positions = torch.arange(length)
        entries = (positions // PLANTED_PAGE_SIZE - 1).clamp(min=0)  # the planted bug: should be positions // size
        pages = layout.block_table[i, entries].long()
        for pool, tokens in zip(pools, gathered):
            tokens.append(pool[pages, positions % PLANTED_PAGE_SIZE])
    batch_size, heads_kv, seq_k, head_dim = k.shape
    k_read, v_read = (torch.cat(tokens).reshape(batch_size, seq_k, heads_kv, head_dim).transpose(1, 2)
                      for tokens in gathered)
    return _exact(q, k_read, v_read, sinks, causal=causal, window=window, scale=scale, cu_seqlens=cu_seqlens)
