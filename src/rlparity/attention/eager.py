"""transformers' GPT-OSS eager attention, called the way GptOssAttention calls it.

The mask comes from transformers' own mask builders (causal, sliding window, packed sequences), so
this backend checks transformers' window and packing conventions too. transformers' eager attention
returns probabilities, not the log-normaliser: `lse` is computed here from the same logits the eager
path builds (q.k * scaling + mask, with the sink column), in the input dtype.
"""

import torch
from torch import nn

from rlparity.attention.contract import check_inputs, refuse_query_key_pair
from rlparity.reference.attention import sequence_ids


class _SinkModule(nn.Module):
    """The attributes eager_attention_forward reads from GptOssAttention."""

    def __init__(self, sinks: torch.Tensor, num_key_value_groups: int):
        super().__init__()
        self.sinks = sinks
        self.num_key_value_groups = num_key_value_groups
        self.training = False


def transformers_mask(batch, seq_q, seq_k, *, causal, window, cu_seqlens, dtype, device):
    from transformers import masking_utils as mu

    if causal:
        mask_function = mu.causal_mask_function if window is None else mu.sliding_window_causal_mask_function(window)
    else:
        if window is not None:
            raise NotImplementedError("eager: a window without causal masking is not a GPT-OSS pattern")
        mask_function = mu.bidirectional_mask_function
    if cu_seqlens is not None:
        docs = sequence_ids(cu_seqlens.to(device), seq_k)[None, :]  # [1, S]
        mask_function = mu.and_masks(mask_function, mu.packed_sequence_mask_function(docs))
    return mu.eager_mask(
        batch_size=batch, q_length=seq_q, kv_length=seq_k, q_offset=seq_k - seq_q,
        mask_function=mask_function, dtype=dtype, device=device,
    )


def attend(q, k, v, sinks, *, causal=True, window=None, scale=None, cu_seqlens=None):
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward, repeat_kv

    check_inputs(q, k, v, sinks, causal=causal, window=window, scale=scale, cu_seqlens=cu_seqlens, where="eager")
    refuse_query_key_pair(cu_seqlens, "eager", "transformers' masks give every query of a batch one offset")
    batch, heads_q, seq_q, head_dim = q.shape
    if seq_q > k.shape[2]:  # found by reliability/test_properties_attention.py: the rows came back as sink-only
        raise NotImplementedError(f"eager: transformers' masks place queries at positions seq_k - seq_q + i and mask "
                                  f"negative ones entirely, so seq_q={seq_q} > seq_k={k.shape[2]} is not a pattern "
                                  f"transformers runs")
    scaling = head_dim**-0.5 if scale is None else scale
    groups = heads_q // k.shape[1]
    mask = transformers_mask(batch, seq_q, k.shape[2], causal=causal, window=window, cu_seqlens=cu_seqlens,
                             dtype=q.dtype, device=q.device)
    module = _SinkModule(sinks, groups)
    out, _ = eager_attention_forward(module, q, k, v, mask, scaling=scaling, dropout=0.0)
    out = out.transpose(1, 2)  # [B, S, H, D] -> [B, H, S, D]

    logits = torch.matmul(q, repeat_kv(k, groups).transpose(2, 3)) * scaling + mask
    sink_column = sinks.to(q.dtype).reshape(1, -1, 1, 1).expand(batch, -1, seq_q, 1)
    lse = torch.logsumexp(torch.cat([logits, sink_column], dim=-1), dim=-1)
    return out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
