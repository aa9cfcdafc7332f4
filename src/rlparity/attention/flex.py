"""torch FlexAttention with the sink folded in through the log-normaliser.

Flex computes attention without the sink and returns its lse; the sink joins afterwards:
lse = logaddexp(lse_flex, sigma), out = out_flex * exp(lse_flex - lse). Masks are block masks built
from the same visibility rule as the reference. On CPU torch runs flex uncompiled, forward only
(its uncompiled backward is documented as possibly wrong), so the backward is checked on CUDA.
`attend_compiled` is the compiled call (CUDA): the kernel users train with, checked on a few cases
(each compiles its own kernels) in conformance/test_sink_attention.py.
"""

import torch

from rlparity.attention.contract import check_inputs
from rlparity.attention.registry import AVAILABLE
from rlparity.reference.attention import default_scale, query_key_positions


def probe(device: torch.device) -> str:
    try:
        from torch.nn.attention.flex_attention import AuxRequest  # noqa: F401
    except ImportError as exc:
        return f"torch {torch.__version__} has no FlexAttention with AuxRequest ({exc}); needs torch >= 2.9"
    return AVAILABLE


def backward_probe(device: torch.device) -> str:
    if device.type != "cuda":
        return "FlexAttention's backward runs only compiled, which torch supports on CUDA; run on a GPU"
    return AVAILABLE


def _mask_mod(seq_q, seq_k, causal, window, cu_seqlens, device):
    q_positions, _, docs = query_key_positions(seq_q, seq_k, cu_seqlens, device)

    def mask_mod(b, h, q_idx, kv_idx):
        q_pos = q_positions[q_idx]
        visible = kv_idx >= 0
        if causal:
            visible = visible & (kv_idx <= q_pos)
        if window is not None:
            visible = visible & (kv_idx > q_pos - window)
        if docs is not None:
            visible = visible & (docs[0][q_idx] == docs[1][kv_idx])
        return visible

    return mask_mod


def attend(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
    from torch.nn.attention.flex_attention import flex_attention

    return _attend(flex_attention, q, k, v, sinks, causal, window, scale, cu_seqlens)


_COMPILED = []


def attend_compiled(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
    """The same with flex_attention compiled, as training code runs it (`torch.compile(flex_attention)`): the
    fused Triton kernels, forward and backward, instead of the unfused path the uncompiled call takes."""
    from torch.nn.attention.flex_attention import flex_attention

    if not _COMPILED:
        _COMPILED.append(torch.compile(flex_attention, dynamic=False))
    return _attend(_COMPILED[0], q, k, v, sinks, causal, window, scale, cu_seqlens)


def block_mask(seq_q, seq_k, *, causal=True, window=None, cu_seqlens=None, device):
    """The flex BlockMask of the reference's visibility rule. Training code builds it once per batch and
    every layer reuses it; `attend` builds it on each call."""
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = _mask_mod(seq_q, seq_k, causal, window, cu_seqlens, device)
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=seq_q, KV_LEN=seq_k, device=device)


def attend_masked(flex_attention, q, k, v, sinks, mask, scale=None):
    """`flex_attention` (compiled or not) under a prebuilt `block_mask`, the sink folded into its lse."""
    from torch.nn.attention.flex_attention import AuxRequest

    heads_q, head_dim = q.shape[1], q.shape[3]
    scale = default_scale(head_dim) if scale is None else scale
    out, aux = flex_attention(
        q, k, v, block_mask=mask, scale=scale, enable_gqa=heads_q != k.shape[1],
        return_aux=AuxRequest(lse=True),
    )
    lse_flex = aux.lse
    lse_flex = lse_flex.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    sink = sinks.to(lse_flex.dtype).reshape(1, -1, 1).expand_as(lse_flex)
    lse = torch.logaddexp(lse_flex, sink)
    out = (out.to(lse.dtype) * torch.exp(lse_flex - lse)[..., None]).to(q.dtype)
    return out, lse


def _attend(flex_attention, q, k, v, sinks, causal, window, scale, cu_seqlens):
    check_inputs(q, k, v, sinks, causal=causal, window=window, scale=scale, cu_seqlens=cu_seqlens, where="flex")
    mask = block_mask(q.shape[2], k.shape[2], causal=causal, window=window, cu_seqlens=cu_seqlens,
                      device=q.device)
    return attend_masked(flex_attention, q, k, v, sinks, mask, scale)
