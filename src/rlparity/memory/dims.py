"""GPT-OSS dimensions read from a config.json, and parameter counts in transformers' layout.

    P_attn    = (H + 1)(Hq + 2 Hkv) D + (Hq D + 1) H + Hq     q, k, v and o with biases; one sink per query head
    P_router  = E (H + 1)
    P_experts = E (2I (H + 1) + H (I + 1))                    gate/up and down projections with biases
    P_layer   = P_attn + P_router + P_experts + 2H             two RMSNorm weights
    P_root    = 2 V H + H                                      embedding, lm head (untied), final norm
    P         = L P_layer + P_root
"""

from dataclasses import dataclass

from rlparity.errors import RlparityError

INT_BYTES = 8  # int64 indices
FP32_BYTES = 4
BOOL_BYTES = 1
COMPUTE_DTYPE_NAMES = ("bfloat16", "float16")  # torch dtypes by name: this module does not import torch
LAYER_TENSORS = 17  # q, k, v, o weights and biases, sinks, router weight and bias, 4 expert tensors, 2 norms


@dataclass(frozen=True)
class Dims:
    layers: int
    hidden: int
    heads_q: int
    heads_kv: int
    head_dim: int
    experts: int
    top_k: int
    intermediate: int
    vocab: int
    tied: bool

    @classmethod
    def of(cls, config: dict) -> "Dims":
        try:
            return cls(layers=config["num_hidden_layers"], hidden=config["hidden_size"],
                       heads_q=config["num_attention_heads"], heads_kv=config["num_key_value_heads"],
                       head_dim=config["head_dim"], experts=config["num_local_experts"],
                       top_k=config["num_experts_per_tok"], intermediate=config["intermediate_size"],
                       vocab=config["vocab_size"], tied=bool(config.get("tie_word_embeddings", False)))
        except KeyError as exc:
            raise RlparityError(f"GPT-OSS config is missing {exc}; expected the keys of a GPT-OSS config.json") \
                from None


def dtype_bytes(dtype) -> int:
    return dtype.itemsize


def check_compute_dtype(dtype) -> int:
    """Bytes per element of a 16-bit compute dtype; the model does not cover float32 compute."""
    if str(dtype).removeprefix("torch.") not in COMPUTE_DTYPE_NAMES:
        raise RlparityError(f"the memory model covers 16-bit compute ({', '.join(COMPUTE_DTYPE_NAMES)}), got "
                            f"{dtype}: float32 compute saves other tensors (RMSNorm's upcast is a no-op)")
    return dtype_bytes(dtype)


def attention_parameters(d: Dims) -> int:
    return ((d.hidden + 1) * (d.heads_q + 2 * d.heads_kv) * d.head_dim + (d.heads_q * d.head_dim + 1) * d.hidden
            + d.heads_q)


def router_parameters(d: Dims) -> int:
    return d.experts * (d.hidden + 1)


def experts_parameters(d: Dims) -> int:
    return d.experts * (2 * d.intermediate * (d.hidden + 1) + d.hidden * (d.intermediate + 1))


def layer_parameters(d: Dims) -> int:
    return attention_parameters(d) + router_parameters(d) + experts_parameters(d) + 2 * d.hidden


def root_parameters(d: Dims) -> int:
    return (1 if d.tied else 2) * d.vocab * d.hidden + d.hidden


def parameters(d: Dims) -> int:
    return d.layers * layer_parameters(d) + root_parameters(d)


def parameter_tensors(d: Dims) -> int:
    return LAYER_TENSORS * d.layers + (2 if d.tied else 3)


def largest_parameter(d: Dims) -> int:
    return max(d.vocab * d.hidden, d.experts * 2 * d.intermediate * d.hidden)
