"""The GPT-OSS mixture-of-experts block.

router: linear -> top-k on the logits -> softmax over the k kept logits
expert: interleaved gate/up projection; gate clamped above at `limit`, up clamped to +-limit;
        glu = gate * sigmoid(alpha * gate); (up + 1) * glu; down projection
block:  the routing-weighted sum of the k chosen experts
"""

import torch

SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0


def moe_router(x, weight, bias, top_k):
    """x [T, H], weight [E, H], bias [E] -> (logits [T, E], weights [T, k], expert ids [T, k])."""
    logits = x @ weight.T + bias
    top_logits, expert_ids = torch.topk(logits, top_k, dim=-1)
    return logits, torch.softmax(top_logits, dim=-1), expert_ids


def swiglu_clamped(gate_up, alpha=SWIGLU_ALPHA, limit=SWIGLU_LIMIT):
    """[..., 2I] interleaved (gate, up, gate, up, ...) -> [..., I]."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    glu = gate * torch.sigmoid(alpha * gate)
    return (up + 1) * glu


def moe_experts(x, expert_ids, routing_weights, gate_up_proj, gate_up_bias, down_proj, down_bias,
                alpha=SWIGLU_ALPHA, limit=SWIGLU_LIMIT):
    """x [T, H]; expert_ids, routing_weights [T, k]; gate_up_proj [E, H, 2I]; down_proj [E, I, H] -> [T, H].

    Every token runs through each of its k experts one at a time: no gathering tricks.
    """
    out = torch.zeros_like(x)
    for slot in range(expert_ids.shape[1]):
        ids = expert_ids[:, slot]  # [T]
        hidden = torch.einsum("th,thi->ti", x, gate_up_proj[ids]) + gate_up_bias[ids]
        expert_out = torch.einsum("ti,tih->th", swiglu_clamped(hidden, alpha, limit), down_proj[ids]) + down_bias[ids]
        out = out + routing_weights[:, slot, None] * expert_out
    return out


def moe_block(x, router_weight, router_bias, top_k, gate_up_proj, gate_up_bias, down_proj, down_bias,
              alpha=SWIGLU_ALPHA, limit=SWIGLU_LIMIT):
    """x [B, S, H] -> (y [B, S, H], routing weights [B*S, k], expert ids [B*S, k])."""
    batch, seq, hidden = x.shape
    tokens = x.reshape(-1, hidden)  # [B, S, H] -> [T, H]
    _, weights, expert_ids = moe_router(tokens, router_weight, router_bias, top_k)
    y = moe_experts(tokens, expert_ids, weights, gate_up_proj, gate_up_bias, down_proj, down_bias, alpha, limit)
    return y.reshape(batch, seq, hidden), weights, expert_ids
