"""Real-size GPT-OSS pieces on the meta device: every op runs for its shapes and allocates nothing.

transformers' own GptOssDecoderLayer is built on the meta device and run forward and backward under
the tracker (rlparity.memory.tracker), which counts meta storages exactly as it counts CPU ones. Two
parts cannot run on meta tensors and are replaced by their allocation footprint:

- a fused attention kernel (Triton, FlashAttention) cannot run without its device. `footprint_attention`
  allocates what the kernel's host code allocates (rlparity.memory.footprints.ATTENTION_KERNELS, read
  from rlparity.attention.triton_sink and FlashAttention 3's interface); everything around the kernel
  (projections, RoPE, layout copies) is transformers' code, run for real. The gpu-marked conformance
  test measures the real kernels against the same ceiling.
- data-dependent routing: meta tensors have no values, so rlparity.ops.grouped_experts skips its
  per-expert loop there; its allocations do not depend on the routing (see that module).

transformers' eager attention runs on meta as it is, and so do its `batched_mm` and `grouped_mm` experts.
The builders take a device, so the CPU and CUDA checks build their layers with them too.
"""

import torch

from rlparity.errors import RlparityError
from rlparity.memory.footprints import ATTENTION_KERNELS

META = torch.device("meta")


class _FootprintAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, kernel):
        batch, heads_q, seq_q, _ = q.shape
        rows = [q.new_empty(batch, heads_q, seq_q, dtype=torch.float32) for _ in range(kernel.forward_fp32_rows)]
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, sinks, out, *rows[: kernel.saved_fp32_rows])
        ctx.kernel = kernel
        return out, rows[0]

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, sinks, out, *_ = ctx.saved_tensors
        kernel = ctx.kernel
        batch, heads_q, seq_q, _ = q.shape
        workspace = [q.new_empty(batch, heads_q, seq_q, dtype=torch.float32) for _ in range(kernel.backward_fp32_rows)]
        if kernel.backward_fp32_dq:
            workspace.append(torch.empty_like(q, dtype=torch.float32))
        grads = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(sinks)
        del workspace
        return (*grads, None)


def footprint_attention(kernel: str):
    """An attention function (the contract's signature) for meta tensors, allocating as `kernel` does."""
    if kernel not in ATTENTION_KERNELS:
        raise RlparityError(f"no allocation footprint for attention kernel {kernel!r}: expected one of "
                            f"{', '.join(ATTENTION_KERNELS)}")
    footprint = ATTENTION_KERNELS[kernel]

    def attend(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
        if q.device.type != "meta":
            raise RlparityError(f"footprint_attention({kernel!r}) only allocates, it does not compute; it got "
                                f"a {q.device.type} tensor, expected meta")
        return _FootprintAttention.apply(q, k, v, sinks, footprint)

    attend.__qualname__ = f"footprint_{kernel}"
    return attend


def gpt_oss_config(config: dict, *, attention: str, experts: str):
    """transformers' GptOssConfig for `config`, with the attention and experts implementations named.

    attention: "eager" (transformers'), a kernel of ATTENTION_KERNELS (its meta footprint), or any rlparity
    backend that runs on the config's device; experts: rlparity's ("rlparity_grouped", "naive_dense") or one
    of transformers' (eager, grouped_mm, batched_mm).
    """
    from transformers import GptOssConfig

    from rlparity.ops.hf import (
        DENSE_EXPERTS_IMPLEMENTATION,
        EXPERTS_IMPLEMENTATION,
        register_attention,
        register_experts,
    )

    hf_config = GptOssConfig(**config)
    if attention == "eager":
        hf_config._attn_implementation = "eager"
    elif attention in ATTENTION_KERNELS:
        hf_config._attn_implementation = register_attention(footprint_attention(attention),
                                                            name=f"rlparity:footprint_{attention}")
    else:
        hf_config._attn_implementation = register_attention(attention)
    if experts in (EXPERTS_IMPLEMENTATION, DENSE_EXPERTS_IMPLEMENTATION):
        register_experts()
    hf_config._experts_implementation = experts
    return hf_config


def decoder_layer(hf_config, layer_index: int, dtype: torch.dtype, device: torch.device = META):
    """transformers' GptOssDecoderLayer `layer_index` of `hf_config`, its parameters in `dtype` on `device`."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssDecoderLayer

    with torch.device(device):
        return GptOssDecoderLayer(hf_config, layer_index).to(dtype)


def position_embeddings(hf_config, tokens: int, dtype: torch.dtype, device: torch.device = META):
    """(cos, sin) [1, tokens, head_dim / 2] from transformers' GPT-OSS rotary embedding (YaRN)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    with torch.device(device):
        rotary = GptOssRotaryEmbedding(hf_config)
        anchor = torch.empty(1, tokens, hf_config.hidden_size, dtype=dtype)
        return rotary(anchor, torch.arange(tokens)[None])
