"""The float64 reference behind the backend signature: exact math, returned in the input dtype."""

import torch

from rlparity.attention.contract import check_inputs
from rlparity.reference import sink_attention


def attend(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
    check_inputs(q, k, v, sinks, causal=causal, window=window, scale=scale, cu_seqlens=cu_seqlens, where="reference")
    out, lse = sink_attention(
        q.double(), k.double(), v.double(), sinks.double(),
        causal=causal, window=window, scale=scale, cu_seqlens=cu_seqlens,
    )
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out.to(q.dtype), lse.to(lse_dtype)
