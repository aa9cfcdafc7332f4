"""What makes a config GPT-OSS-like, checked at the boundary, and the normalised dict the reference reads.

GPT-OSS's published config.json writes RoPE as `rope_theta` + `rope_scaling` (transformers 4.x and
vLLM read that); transformers 5 writes `rope_parameters` with the theta inside. Both are accepted and
normalised to `rope_theta` + `rope_scaling`, with GPT-OSS's defaults for keys its config leaves out.
"""

from rlparity.errors import RlparityError

LAYER_TYPES = ("sliding_attention", "full_attention")
# Defaults transformers' GptOssConfig and YaRN code apply when the checkpoint's config omits the key.
DEFAULTS = {"swiglu_alpha": 1.702, "swiglu_limit": 7.0, "rms_norm_eps": 1e-5, "attention_bias": True}
YARN_DEFAULTS = {"truncate": True}
POSITIVE_INTS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "num_local_experts", "num_experts_per_tok", "intermediate_size", "vocab_size", "max_position_embeddings",
)
YARN_KEYS = ("factor", "beta_fast", "beta_slow", "original_max_position_embeddings")


def rope_of(config: dict) -> tuple[float | None, dict | None]:
    """(theta, scaling) from either spelling."""
    if isinstance(config.get("rope_parameters"), dict):
        parameters = dict(config["rope_parameters"])
        theta = parameters.pop("rope_theta", config.get("rope_theta"))
        return theta, parameters
    return config.get("rope_theta"), config.get("rope_scaling")


def problems_with(config: dict) -> list[str]:
    """Every way `config` departs from GPT-OSS, each naming the expected and the received value."""
    if not isinstance(config, dict):
        return [f"expected a JSON object, got {type(config).__name__}"]
    problems = []
    if config.get("model_type") != "gpt_oss":
        problems.append(f"model_type is {config.get('model_type')!r}, expected 'gpt_oss'")
    architectures = config.get("architectures")
    if architectures is not None and "GptOssForCausalLM" not in architectures:
        problems.append(f"architectures is {architectures!r}, expected it to contain 'GptOssForCausalLM'")
    for key in POSITIVE_INTS:
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            problems.append(f"{key} is {value!r}, expected a positive integer")
    if problems:
        return problems

    if config["num_attention_heads"] % config["num_key_value_heads"]:
        problems.append(f"num_key_value_heads={config['num_key_value_heads']} does not divide "
                        f"num_attention_heads={config['num_attention_heads']} (GQA needs whole groups)")
    if config["num_experts_per_tok"] > config["num_local_experts"]:
        problems.append(f"num_experts_per_tok={config['num_experts_per_tok']} exceeds "
                        f"num_local_experts={config['num_local_experts']}")
    if config["head_dim"] % 2:
        problems.append(f"head_dim={config['head_dim']} is odd; RoPE rotates pairs of dimensions")

    layer_types = config.get("layer_types")
    if not isinstance(layer_types, list) or len(layer_types) != config["num_hidden_layers"]:
        problems.append(f"layer_types is {layer_types!r}, expected a list of {config['num_hidden_layers']} "
                        f"entries from {LAYER_TYPES}")
    elif unknown := sorted(set(layer_types) - set(LAYER_TYPES)):
        problems.append(f"layer_types contains {unknown}, expected only {LAYER_TYPES}")
    elif "sliding_attention" in layer_types:
        window = config.get("sliding_window")
        if not isinstance(window, int) or window <= 0:
            problems.append(f"sliding_window is {window!r}, expected a positive integer for the sliding layers")

    theta, scaling = rope_of(config)
    if not isinstance(theta, (int, float)) or theta <= 0:
        problems.append(f"rope_theta is {theta!r}, expected a positive number")
    if not isinstance(scaling, dict) or scaling.get("rope_type", scaling.get("type")) != "yarn":
        problems.append(f"RoPE scaling is {scaling!r}, expected GPT-OSS's YaRN: rope_type 'yarn' with {YARN_KEYS}")
    elif missing := [key for key in YARN_KEYS if not isinstance(scaling.get(key), (int, float))]:
        problems.append(f"YaRN parameters {missing} are missing or not numbers in {scaling!r}")
    if config.get("tie_word_embeddings", False) is not False:
        problems.append(f"tie_word_embeddings is {config.get('tie_word_embeddings')!r}, expected false "
                        "(GPT-OSS has its own lm_head)")
    if config.get("attention_bias", True) is not True:
        problems.append(
            f"attention_bias is {config.get('attention_bias')!r}, expected true (GPT-OSS has q/k/v/o biases)")
    return problems


def normalise(config: dict, source: str) -> dict:
    """The config with RoPE as rope_theta + rope_scaling and GPT-OSS defaults filled in; raises if not GPT-OSS-like."""
    problems = problems_with(config)
    if problems:
        raise RlparityError(f"{source} is not a GPT-OSS-like config: " + "; ".join(problems))
    theta, scaling = rope_of(config)
    normalised = {**DEFAULTS, **config}
    normalised.pop("rope_parameters", None)
    normalised["rope_theta"] = float(theta)
    normalised["rope_scaling"] = {**YARN_DEFAULTS, **scaling, "rope_type": "yarn"}
    return normalised
