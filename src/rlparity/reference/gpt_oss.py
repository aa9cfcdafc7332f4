"""The GPT-OSS forward pass, written out: the ground truth the engines' log-probs are compared to.

    x_0     = E[tokens]
    h_l     = x_{l-1} + Attn_l(RMSNorm(x_{l-1}))          sink attention, YaRN RoPE, sliding or full
    x_l     = h_l + MoE_l(RMSNorm(h_l))                   top-k router, clamped SwiGLU experts
    logits  = RMSNorm(x_L) W_lm^T

`config` is a GPT-OSS config.json as a dict, with RoPE given as `rope_theta` and `rope_scaling` (the
published spelling); the keys read are listed in CONFIG_KEYS. `weights` maps transformers' parameter
names (model.layers.0.self_attn.q_proj.weight, ...) to tensors; pass float64 tensors for the ground truth.
The MoE is the reference's router and experts (the two halves of `moe_block`), called separately so
that the router logits come back too.
"""

import math
from dataclasses import dataclass

import torch

from rlparity.reference.attention import sink_attention
from rlparity.reference.moe import moe_experts, moe_router

# Head counts and sizes come from the weights' shapes; these are what the weights cannot say.
CONFIG_KEYS = (
    "num_hidden_layers", "head_dim", "layer_types", "sliding_window", "rms_norm_eps", "num_experts_per_tok",
    "swiglu_alpha", "swiglu_limit", "rope_theta", "rope_scaling",
)


@dataclass
class GptOssOutput:
    """The logits and every intermediate a comparison may localise a difference to.

    activations: "embed", then per layer "layers.{i}.attn" (attention block output, before the residual
    add), "layers.{i}.mlp" (MoE block output, before the residual add), "layers.{i}" (the residual stream
    after the layer), then "norm" and "logits"; each [B, S, H] (logits [B, S, V]).
    Per layer: router_logits [B*S, E], expert_ids and routing_weights [B*S, k], attention_lse [B, Hq, S].
    """

    logits: torch.Tensor
    activations: dict[str, torch.Tensor]
    router_logits: list[torch.Tensor]
    routing_weights: list[torch.Tensor]
    expert_ids: list[torch.Tensor]
    attention_lse: list[torch.Tensor]


def rms_norm(x, weight, eps):
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension."""
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def yarn_correction_dim(rotations, dim, base, original_max_positions):
    """The rotary dimension whose wavelength fits `rotations` full turns into the original context."""
    return dim * math.log(original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_frequencies(head_dim, theta, factor, beta_fast, beta_slow, original_max_positions, truncate):
    """(inv_freq [head_dim/2] float64, attention scaling): YaRN's blend of original and interpolated frequencies.

    Dimensions turning more than beta_fast times over the original context keep their frequency
    (extrapolation); those turning fewer than beta_slow times are divided by `factor` (interpolation);
    a linear ramp blends the ones between. cos and sin are scaled by 0.1 ln(factor) + 1.
    """
    extrapolated = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    interpolated = extrapolated / factor
    low = yarn_correction_dim(beta_fast, head_dim, theta, original_max_positions)
    high = yarn_correction_dim(beta_slow, head_dim, theta, original_max_positions)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid dividing by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    inv_freq = interpolated * ramp + extrapolated * (1 - ramp)
    scaling = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, scaling


def rope_cos_sin(positions, inv_freq, scaling, dtype):
    """positions [S] -> cos, sin [S, head_dim/2], scaled."""
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return (angles.cos() * scaling).to(dtype), (angles.sin() * scaling).to(dtype)


def apply_rope(x, cos, sin):
    """x [B, H, S, D]: rotate dimension i with i + D/2 (GPT-OSS pairs the two halves) by the position's angle."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def linear(x, weights, prefix):
    return x @ weights[f"{prefix}.weight"].T + weights[f"{prefix}.bias"]


def attention_block(x, weights, prefix, config, cos, sin, window):
    """x [B, S, H] -> (out [B, S, H], lse [B, Hq, S])."""
    batch, seq, _ = x.shape
    head_dim = config["head_dim"]

    def heads(projection):  # [B, S, n*D] -> [B, n, S, D]
        return projection.reshape(batch, seq, -1, head_dim).transpose(1, 2)

    q = apply_rope(heads(linear(x, weights, f"{prefix}.q_proj")), cos, sin)
    k = apply_rope(heads(linear(x, weights, f"{prefix}.k_proj")), cos, sin)
    v = heads(linear(x, weights, f"{prefix}.v_proj"))
    out, lse = sink_attention(q, k, v, weights[f"{prefix}.sinks"], causal=True, window=window,
                              scale=1.0 / math.sqrt(head_dim))
    out = out.transpose(1, 2).reshape(batch, seq, -1)  # [B, Hq, S, D] -> [B, S, Hq*D]
    return linear(out, weights, f"{prefix}.o_proj"), lse


def mlp_block(x, weights, prefix, config):
    """x [B, S, H] -> (out [B, S, H], router logits [B*S, E], routing weights [B*S, k], expert ids [B*S, k])."""
    tokens = x.reshape(-1, x.shape[-1])  # [B, S, H] -> [B*S, H]
    router_logits, routing_weights, expert_ids = moe_router(
        tokens, weights[f"{prefix}.router.weight"], weights[f"{prefix}.router.bias"], config["num_experts_per_tok"])
    out = moe_experts(
        tokens, expert_ids, routing_weights,
        weights[f"{prefix}.experts.gate_up_proj"], weights[f"{prefix}.experts.gate_up_proj_bias"],
        weights[f"{prefix}.experts.down_proj"], weights[f"{prefix}.experts.down_proj_bias"],
        config["swiglu_alpha"], config["swiglu_limit"],
    )
    return out.reshape(x.shape), router_logits, routing_weights, expert_ids


def layer_window(config, layer):
    return config["sliding_window"] if config["layer_types"][layer] == "sliding_attention" else None


def forward(config: dict, weights: dict[str, torch.Tensor], token_ids: torch.Tensor) -> GptOssOutput:
    """token_ids [B, S] (positions 0..S-1, no padding) -> GptOssOutput, computed in the weights' dtype."""
    eps = config["rms_norm_eps"]
    yarn = config["rope_scaling"]
    inv_freq, scaling = yarn_frequencies(
        config["head_dim"], config["rope_theta"], yarn["factor"], yarn["beta_fast"], yarn["beta_slow"],
        yarn["original_max_position_embeddings"], yarn.get("truncate", True),
    )
    embedding = weights["model.embed_tokens.weight"]
    cos, sin = rope_cos_sin(torch.arange(token_ids.shape[1]), inv_freq, scaling, embedding.dtype)

    x = embedding[token_ids]  # [B, S] -> [B, S, H]
    activations = {"embed": x}
    router_logits, routing_weights, expert_ids, attention_lse = [], [], [], []
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        attn, lse = attention_block(rms_norm(x, weights[f"{p}.input_layernorm.weight"], eps), weights,
                                    f"{p}.self_attn", config, cos, sin, layer_window(config, layer))
        h = x + attn
        mlp, logits_l, weights_l, ids_l = mlp_block(
            rms_norm(h, weights[f"{p}.post_attention_layernorm.weight"], eps), weights, f"{p}.mlp", config)
        x = h + mlp
        activations |= {f"layers.{layer}.attn": attn, f"layers.{layer}.mlp": mlp, f"layers.{layer}": x}
        router_logits.append(logits_l)
        routing_weights.append(weights_l)
        expert_ids.append(ids_l)
        attention_lse.append(lse)
    normed = rms_norm(x, weights["model.norm.weight"], eps)
    logits = normed @ weights["lm_head.weight"].T  # [B, S, H] -> [B, S, V]
    activations |= {"norm": normed, "logits": logits}
    return GptOssOutput(logits, activations, router_logits, routing_weights, expert_ids, attention_lse)
