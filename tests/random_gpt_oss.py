"""A small random GPT-OSS checkpoint for engine tests that must not depend on the bundled trained model.

transformers initialises routers and sinks to zero, which makes every routing a tie and every sink
inert; they are drawn here from a seeded generator so that both take effect. The tokenizer is a
word-level one over made-up tokens, built with `tokenizers` (no hub).
"""

import json
from pathlib import Path

import torch

VOCAB_SIZE = 1024
SEED = 0
ROUTER_STD = 1.0  # router logits of order 1 per unit hidden norm: distinct, non-tied top-k choices
SINK_STD = 1.0
# transformers' 0.02 gives logits of std ~0.2 over 1024 tokens, i.e. nearly uniform next-token
# distributions; 0.3 gives a logit std of ~3, peaked like a trained model's.
LM_HEAD_STD = 0.3


def config_kwargs(sliding_window: int = 16, head_dim: int = 64) -> dict:
    # head_dim 64: vLLM's CPU attention rejects smaller head sizes (16 is refused).
    return dict(
        num_hidden_layers=2, hidden_size=128, head_dim=head_dim, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=8, num_experts_per_tok=2, intermediate_size=128, vocab_size=VOCAB_SIZE,
        sliding_window=sliding_window, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=4096, eos_token_id=1, pad_token_id=0, bos_token_id=None,
        tie_word_embeddings=False,
    )


def write_tokenizer(folder: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tokens = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(3, VOCAB_SIZE)]
    tokenizer = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens[:3]])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096,
        "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "clean_up_tokenization_spaces": False,
    }))


def save_random_gpt_oss(folder: Path, seed: int = SEED, sliding_window: int = 16, head_dim: int = 64) -> Path:
    """Writes config.json, model.safetensors and the tokenizer into `folder`; returns it."""
    from transformers import GptOssConfig, GptOssForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = GptOssForCausalLM(GptOssConfig(**config_kwargs(sliding_window, head_dim)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("router.weight"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * ROUTER_STD)
            elif name.endswith("sinks"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * SINK_STD)
            elif name == "lm_head.weight":
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * LM_HEAD_STD)
    model.save_pretrained(folder)
    write_tokenizer(folder)
    return folder


if __name__ == "__main__":
    import sys

    print(save_random_gpt_oss(Path(sys.argv[1])))
