"""Sink-attention backends behind one signature, looked up by name.

    attend(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None) -> (out, lse)

A new backend is one module plus one `register` line here.
"""

import torch

from rlparity.attention import flex
from rlparity.attention.registry import (
    AVAILABLE,
    Backend,
    get_backend,
    register,
    registered_backends,
    user_backend,
)

_FP32_BF16 = (torch.float32, torch.bfloat16)

register(Backend("reference", "rlparity.attention.reference_backend:attend",
                 "float64 math on any input dtype, returned in that dtype"))
register(Backend("eager", "rlparity.attention.eager:attend",
                 "transformers' GPT-OSS eager attention with transformers' own masks"))
register(Backend("chunked", "rlparity.attention.chunked:attend",
                 "online softmax over key blocks in torch, blockwise backward"))
register(Backend("flex", "rlparity.attention.flex:attend",
                 "torch FlexAttention, sink folded in through its lse",
                 probe=flex.probe, backward_probe=flex.backward_probe))

__all__ = ["AVAILABLE", "Backend", "get_backend", "register", "registered_backends", "user_backend"]
