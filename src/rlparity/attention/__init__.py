"""Sink-attention backends behind one signature, looked up by name.

    attend(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None) -> (out, lse)

A new backend is one module plus one `register` line here.
"""

import torch

from rlparity.attention import flash, flex, triton_sink
from rlparity.attention.registry import (
    AVAILABLE,
    Backend,
    get_backend,
    register,
    registered_backends,
    user_backend,
)

_FLASH_DTYPES = (torch.bfloat16, torch.float16)

register(Backend("reference", "rlparity.attention.reference_backend:attend",
                 "float64 math on any input dtype, returned in that dtype"))
register(Backend("eager", "rlparity.attention.eager:attend",
                 "transformers' GPT-OSS eager attention with transformers' own masks"))
register(Backend("chunked", "rlparity.attention.chunked:attend",
                 "online softmax over key blocks in torch, blockwise backward"))
register(Backend("flex", "rlparity.attention.flex:attend",
                 "torch FlexAttention, sink folded in through its lse",
                 probe=flex.probe, backward_probe=flex.backward_probe))
register(Backend("triton", "rlparity.attention.triton_sink:attend",
                 "rlparity's fused Triton kernel: online softmax with the sink in the normaliser, fused backward "
                 "with dSink", probe=triton_sink.probe, backward_probe=triton_sink.probe))
register(Backend("fa3", "rlparity.attention.flash:attend_fa3",
                 "FlashAttention 3 (flash_attn_interface, hopper) with a sink argument",
                 probe=flash.probe_fa3, backward_probe=flash.backward_probe_fa3, dtypes=_FLASH_DTYPES, gpu_only=True))
register(Backend("vllm_fa3", "rlparity.attention.flash:attend_vllm_fa3",
                 "vLLM's flash-attn build (FA3 kernels, sinks as s_aux), forward only",
                 probe=flash.probe_vllm_fa3, backward_probe=flash.backward_probe_vllm_fa3, dtypes=_FLASH_DTYPES,
                 gpu_only=True))
register(Backend("fa4", "rlparity.attention.flash:attend_fa4",
                 "FlashAttention 4 (flash_attn.cute, sm90/sm100), sinks as learnable_sink",
                 probe=flash.probe_fa4, backward_probe=flash.backward_probe_fa4, dtypes=_FLASH_DTYPES, gpu_only=True))

__all__ = ["AVAILABLE", "Backend", "get_backend", "register", "registered_backends", "user_backend"]
