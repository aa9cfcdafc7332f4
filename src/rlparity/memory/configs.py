"""Model configs the memory tools know by name: GPT-OSS-20B and -120B at real size, and the bundled ones.

The real-size fields are those of openai/gpt-oss-20b and openai/gpt-oss-120b's config.json (Hugging
Face hub, August 2025): only what memory depends on, plus what transformers' GptOssConfig needs to build
a layer on the meta device. The bundled models (fixtures/models: micro, tiny) are read through
rlparity.models.specs. A user's checkpoint folder is read from its config.json alone (`folder_config`): the
weights need not be there to plan memory.
"""

from rlparity.errors import RlparityError

_GPT_OSS_COMMON = {
    "model_type": "gpt_oss",
    "architectures": ["GptOssForCausalLM"],
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "head_dim": 64,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "num_experts_per_tok": 4,
    "vocab_size": 201088,
    "sliding_window": 128,
    "max_position_embeddings": 131072,
    "rope_theta": 150000.0,
    "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                     "original_max_position_embeddings": 4096},
    "rms_norm_eps": 1e-05,
    "swiglu_limit": 7.0,
    "attention_bias": True,
    "tie_word_embeddings": False,
}


def _gpt_oss(layers: int, experts: int) -> dict:
    return {**_GPT_OSS_COMMON, "num_hidden_layers": layers, "num_local_experts": experts,
            "layer_types": ["sliding_attention", "full_attention"] * (layers // 2)}


REAL_SIZE = {
    "gpt-oss-20b": _gpt_oss(layers=24, experts=32),
    "gpt-oss-120b": _gpt_oss(layers=36, experts=128),
}


def model_names() -> list[str]:
    from rlparity.models.specs import model_names as bundled

    return sorted(REAL_SIZE) + bundled()


def model_config(name: str) -> dict:
    """The config.json dict of a real-size GPT-OSS or a bundled model."""
    if name in REAL_SIZE:
        return dict(REAL_SIZE[name])
    from rlparity.models.specs import load_spec
    from rlparity.models.specs import model_names as bundled

    if name not in bundled():
        raise RlparityError(f"unknown model {name!r}: expected one of {', '.join(model_names())}")
    return dict(load_spec(name).config)


def folder_config(folder: str) -> dict:
    """The config.json of a GPT-OSS checkpoint folder, checked and normalised (rlparity.models.checkpoint_config)."""
    from rlparity.models import checkpoint_config

    return checkpoint_config(folder)
