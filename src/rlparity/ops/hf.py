"""rlparity's components inside transformers' GPT-OSS: an attention function and an experts function.

transformers looks both up by name in its registries (AttentionInterface, ExpertsInterface), read
from `config._attn_implementation` and `config._experts_implementation`. Registering here adds:

    "rlparity_grouped"        experts: rlparity.ops.grouped_experts
    "naive_dense"             experts: rlparity.ops.experts.dense_experts, transformers' eval path before
                              5.0, to show what the ceilings catch
    "rlparity:<backend>"      attention: any function with the attention contract (DESIGN.md), called
                              with GPT-OSS's sinks, window and scale; a registered backend name or
                              module:function

transformers builds no mask for an attention name it does not know, so the backend applies causality
and the window itself, as the contract says. Padding masks cannot be honoured: pack sequences and pass
cu_seqlens (transformers forwards `cu_seq_lens_q`) instead.
"""

from collections.abc import Callable

from rlparity.errors import RlparityError
from rlparity.ops.experts import dense_experts, grouped_experts

EXPERTS_IMPLEMENTATION = "rlparity_grouped"
DENSE_EXPERTS_IMPLEMENTATION = "naive_dense"
ATTENTION_PREFIX = "rlparity:"


def _experts_forward(experts):
    def forward(self, hidden_states, router_indices, routing_weights):
        """GptOssExperts.forward's signature: hidden [T, H], router indices and weights [T, k] -> [T, H]."""
        return experts(hidden_states, router_indices, routing_weights, self.gate_up_proj, self.gate_up_proj_bias,
                       self.down_proj, self.down_proj_bias, self.alpha, self.limit)

    return forward


def register_experts() -> str:
    """Registers the grouped experts (and the naive dense ones) with transformers; returns the grouped's name."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, _experts_forward(grouped_experts))
    ALL_EXPERTS_FUNCTIONS.register(DENSE_EXPERTS_IMPLEMENTATION, _experts_forward(dense_experts))
    return EXPERTS_IMPLEMENTATION


def _attention_forward(attend: Callable, name: str):
    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                s_aux=None, **kwargs):
        if attention_mask is not None:
            raise RlparityError(f"attention {name!r} got an attention mask of shape {tuple(attention_mask.shape)}; "
                                "expected none (pack sequences and pass cu_seqlens instead of padding)")
        if dropout:
            raise RlparityError(f"attention {name!r} got dropout {dropout}; expected 0 (GPT-OSS trains without it)")
        sinks = module.sinks if s_aux is None else s_aux
        cu_seqlens = kwargs.get("cu_seq_lens_q")
        out, _ = attend(query, key, value, sinks, causal=True, window=sliding_window, scale=scaling,
                        cu_seqlens=cu_seqlens)
        return out.transpose(1, 2), None  # [B, Hq, S, D] -> [B, S, Hq, D], as transformers' functions return

    return forward


def register_attention(backend: str | Callable, name: str | None = None) -> str:
    """Registers an attention backend (name, module:function, or the function itself) with transformers;
    returns the implementation name to set as `attn_implementation`."""
    from transformers import AttentionInterface

    if callable(backend):
        attend = backend
        name = name or f"{ATTENTION_PREFIX}{backend.__module__}.{backend.__qualname__}"
    else:
        from rlparity.attention import get_backend

        attend = get_backend(backend).attend
        name = name or f"{ATTENTION_PREFIX}{backend}"
    AttentionInterface.register(name, _attention_forward(attend, name))
    return name


def configure(config, *, attention: str | Callable | None = None, experts: bool = True):
    """Points a GptOssConfig (before the model is built) at rlparity's components; returns the config."""
    if attention is not None:
        config._attn_implementation = register_attention(attention)
    if experts:
        config._experts_implementation = register_experts()
    return config
