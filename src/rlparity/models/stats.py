"""Statistics that show a checkpoint behaves like a trained model, measured with the float64 reference.

Next-token peakedness (mean max probability, entropy, loss on held-out documents), router margins (the
gap between the k-th and (k+1)-th router logit, which decides the top-k set: near zero means a
near-tie that rounding can flip), expert load, sink logits and the attention mass the sinks take.
"""

import torch

from rlparity.reference.gpt_oss import forward

MARGIN_QUANTILES = (0.01, 0.1, 0.5, 0.9)
NEAR_TIE_GAPS = (1e-3, 1e-2, 1e-1)


def quantiles(values: torch.Tensor, qs=MARGIN_QUANTILES) -> dict[str, float]:
    return {f"p{round(q * 100)}": values.quantile(q).item() for q in qs}


def router_margins(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """[T, E] -> [T]: k-th largest minus (k+1)-th largest logit."""
    ordered = router_logits.sort(dim=-1, descending=True).values
    return ordered[:, top_k - 1] - ordered[:, top_k]


def model_statistics(config: dict, weights: dict[str, torch.Tensor], token_ids: torch.Tensor) -> dict:
    """weights in float64; token_ids [B, S] held-out text."""
    out = forward(config, weights, token_ids)
    logprobs = torch.log_softmax(out.logits[:, :-1], dim=-1)  # predicts tokens 1..S-1
    probs = logprobs.exp()
    targets = token_ids[:, 1:]
    top_k, num_experts = config["num_experts_per_tok"], config["num_local_experts"]
    layers = []
    for layer in range(config["num_hidden_layers"]):
        margins = router_margins(out.router_logits[layer], top_k)
        load = torch.bincount(out.expert_ids[layer].flatten(), minlength=num_experts).double()
        sinks = weights[f"model.layers.{layer}.self_attn.sinks"]
        sink_mass = torch.exp(sinks.reshape(1, -1, 1) - out.attention_lse[layer])  # [B, Hq, S]
        layers.append({
            "layer_type": config["layer_types"][layer],
            "router_margin": quantiles(margins),
            "router_margin_below": {str(gap): (margins < gap).double().mean().item() for gap in NEAR_TIE_GAPS},
            "expert_load": (load / load.sum()).tolist(),
            "sinks": sinks.tolist(),
            "sink_attention_mass": sink_mass.mean().item(),
        })
    return {
        "tokens": targets.numel(),
        "eval_loss": -logprobs.gather(-1, targets[..., None]).mean().item(),
        "mean_max_prob": probs.max(dim=-1).values.mean().item(),
        "mean_entropy": -(probs * logprobs).sum(dim=-1).mean().item(),
        "layers": layers,
    }


def summary_lines(stats: dict) -> list[str]:
    lines = [
        f"held-out tokens {stats['tokens']}: loss {stats['eval_loss']:.3f} nats, "
        f"mean max next-token prob {stats['mean_max_prob']:.3f}, mean entropy {stats['mean_entropy']:.3f} nats",
    ]
    for i, layer in enumerate(stats["layers"]):
        margin = layer["router_margin"]
        load = layer["expert_load"]
        sinks = layer["sinks"]
        lines.append(
            f"layer {i} ({layer['layer_type']}): router top-k margin p1 {margin['p1']:.3f} p10 {margin['p10']:.3f} "
            f"p50 {margin['p50']:.3f} p90 {margin['p90']:.3f}, below 0.01: {layer['router_margin_below']['0.01']:.2%}; "
            f"expert load {min(load):.2f}-{max(load):.2f}; sinks {min(sinks):.2f}..{max(sinks):.2f}, "
            f"sink attention mass {layer['sink_attention_mass']:.3f}"
        )
    return lines
