"""Sink-attention backends behind one signature, looked up by name.

    attend(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None) -> (out, lse)

A new backend is one module plus one `register` line here.
"""

import torch

from rlparity.attention import flash, flex, sglang_triton, triton_sink, vllm_triton
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
register(Backend("sglang_p1_extend", "rlparity.attention.sglang_triton:attend_extend_p1",
                 "SGLang's Triton extend_attention_fwd (sinks, lse_extend): new tokens on prefixes in its token pool, "
                 "page size 1, forward only", probe=sglang_triton.probe, backward_probe=sglang_triton.probe))
register(Backend("sglang_p16_extend", "rlparity.attention.sglang_triton:attend_extend_p16",
                 "SGLang's Triton extend_attention_fwd as sglang_p1_extend, pages of 16 slots",
                 probe=sglang_triton.probe, backward_probe=sglang_triton.probe))
register(Backend("sglang_p1_decode", "rlparity.attention.sglang_triton:attend_decode_p1",
                 "SGLang's Triton decode_attention_fwd (sinks): split-KV decode and its reduce stage, one query per "
                 "sequence, page size 1, forward only, no lse", probe=sglang_triton.probe,
                 backward_probe=sglang_triton.probe))
register(Backend("sglang_p16_decode", "rlparity.attention.sglang_triton:attend_decode_p16",
                 "SGLang's Triton decode_attention_fwd as sglang_p1_decode, pages of 16 slots",
                 probe=sglang_triton.probe, backward_probe=sglang_triton.probe))
register(Backend("vllm_triton_p16", "rlparity.attention.vllm_triton:attend_p16",
                 "vLLM's Triton unified_attention (TRITON_ATTN, sinks): paged KV in 16-token blocks, its 2D path and "
                 "its 3D split-KV path with reduce_segments for decode batches; forward only, no lse",
                 probe=vllm_triton.probe))
register(Backend("vllm_triton_p1", "rlparity.attention.vllm_triton:attend_p1",
                 "vLLM's Triton unified_attention as vllm_triton_p16 on 1-token blocks (a kernel edge vLLM itself does "
                 "not select)", probe=vllm_triton.probe))

__all__ = ["AVAILABLE", "Backend", "get_backend", "register", "registered_backends", "user_backend"]
